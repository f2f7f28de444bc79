"""All seven algorithms on one partition, one table: ``python -m experiments.compare``.

Writes ``<output_dir>/partition.json`` first (the split every algorithm then
uses, via ``--partition_file``), runs each algorithm into
``<output_dir>/<algorithm>/`` and writes ``comparison.md``, ``comparison.csv``
and ``comparison.json``: personalized accuracy, uplink and downlink bits per
client per round, training FLOPs per client per round, each also as a ratio to
FedAvg. Rerunning the same command skips the algorithms whose run is complete
(``results.json`` with ``"complete": true`` and the same settings) and
resumes an unfinished one from its checkpoint; a run folder with other settings is refused
(naming them) unless ``--overwrite`` is given, as in the studies.

Every flag of ``experiments.run`` is accepted and applies to every algorithm,
except ``--learning_rate`` (each algorithm has its own documented default; set
some with ``--learning_rates=fedavg=0.1,fedmask=30``) and ``--output_dir``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys

import numpy as np
from absl import app, flags

from experiments import run as run_cli  # defines every run flag
from fedmask_tff.algorithms import ALGORITHMS

FLAGS = flags.FLAGS
flags.DEFINE_list("algorithms", list(ALGORITHMS), "Algorithms to compare, in table order.")
flags.DEFINE_list("learning_rates", [], "Per-algorithm learning rates, name=value (default: each "
                  "algorithm's documented default).")
FLAGS.set_default("output_dir", "runs/compare")

COLUMNS = ("algorithm", "accuracy", "accuracy_client_mean", "client_min", "client_p10",
           "before_local_training", "bits_per_parameter_round", "uplink_bits_per_client_round",
           "downlink_bits_per_client_round", "train_flops_per_client_round", "uplink_vs_fedavg",
           "downlink_vs_fedavg", "flops_vs_fedavg", "learning_rate", "rounds", "wall_s")


def _parse_rates(items):
  rates = {}
  for item in items:
    name, _, value = item.partition("=")
    if name not in ALGORITHMS or not value:
      raise ValueError(f"--learning_rates entry {item!r}: expected name=value with a name in {ALGORITHMS}")
    rates[name] = float(value)
  return rates


def run_variants(base, variants: dict, out: str, log=None) -> dict:
  """Runs ``{name: {RunConfig field: value}}`` into ``out/<name>``; returns ``{name: results}``.

  The runner's rerun policy (:func:`fedmask_tff.simulation.runner.plan_run`): finished runs
  with the same settings are skipped, an unfinished one resumes, and one with other settings
  is replaced only with ``--overwrite``.
  """
  from fedmask_tff.simulation import runner
  log = log or (lambda m: print(m, file=sys.stderr, flush=True))
  all_results = {}
  for i, (name, overrides) in enumerate(variants.items()):
    plan = runner.plan_run(dataclasses.replace(base, output_dir=os.path.join(out, name),
                                               **overrides), replace=base.overwrite)
    if plan.action == "skip":
      log(f"[compare] {i + 1}/{len(variants)} {name}: complete, skipped")
      all_results[name] = plan.results
      continue
    words = {"resume": ": resuming ...", "replace": ": replacing the old run ..."}
    log(f"[compare] {i + 1}/{len(variants)} {name}{words.get(plan.action, ' ...')}")
    all_results[name] = runner.run(plan.config)
  return all_results


def table_rows(all_results: dict) -> list[dict]:
  """One row per algorithm; ratios to FedAvg where FedAvg ran (else empty)."""
  base = all_results.get("fedavg", {}).get("totals")
  rows = []
  for name, results in all_results.items():
    t, f = results["totals"], results["final"]
    per_client = sorted(f.get("accuracy_per_client", {}).values())
    params = results["config"].get("model_parameters") or results["config"].get("masked_parameters")
    bits = t["uplink_bits_per_client_round"] + t["downlink_bits_per_client_round"]
    row = {"algorithm": name, "accuracy": f["accuracy"], "accuracy_client_mean": f["accuracy_client_mean"],
           "client_min": per_client[0] if per_client else None,
           "client_p10": float(np.percentile(per_client, 10)) if per_client else None,
           "before_local_training": f.get("accuracy_after_aggregation"),
           "bits_per_parameter_round": bits / params if params else None,
           "uplink_bits_per_client_round": t["uplink_bits_per_client_round"],
           "downlink_bits_per_client_round": t["downlink_bits_per_client_round"],
           "train_flops_per_client_round": t["train_flops_per_client_round"],
           "learning_rate": results["config"].get("learning_rate_used"),
           "rounds": t["rounds"], "wall_s": t["wall_s"]}
    for key, col in (("uplink_bits_per_client_round", "uplink_vs_fedavg"),
                     ("downlink_bits_per_client_round", "downlink_vs_fedavg"),
                     ("train_flops_per_client_round", "flops_vs_fedavg")):
      row[col] = (t[key] / base[key]) if base and base[key] else None
    rows.append(row)
  return rows


def write_table(output_dir: str, rows: list[dict], header: str) -> str:
  with open(os.path.join(output_dir, "comparison.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(output_dir, "comparison.json"), "w") as f:
    json.dump(rows, f, indent=2)
  fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
  lines = [header, "",
           "| algorithm | accuracy | client mean | client min | client 10th pct | before local "
           "training | bits/parameter/round (up + down) | uplink bits/client/round "
           "| downlink bits/client/round "
           "| train FLOPs/client/round | up ÷ FedAvg | down ÷ FedAvg | FLOPs ÷ FedAvg |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['algorithm']} | {r['accuracy']:.4f} | {r['accuracy_client_mean']:.4f} "
                 f"| {fmt(r['client_min'], '.3f')} | {fmt(r['client_p10'], '.3f')} "
                 f"| {fmt(r['before_local_training'], '.4f')} | {fmt(r['bits_per_parameter_round'], '.3f')} "
                 f"| {r['uplink_bits_per_client_round']:,.0f} | {r['downlink_bits_per_client_round']:,.0f} "
                 f"| {r['train_flops_per_client_round']:.3g} | {fmt(r['uplink_vs_fedavg'], '.4f')} "
                 f"| {fmt(r['downlink_vs_fedavg'], '.4f')} | {fmt(r['flops_vs_fedavg'], '.3f')} |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(output_dir, "comparison.md"), "w") as f:
    f.write(text)
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from fedmask_tff.simulation import run_config, runner
  from fedmask_tff.data import DataError
  try:
    unknown = [a for a in FLAGS.algorithms if a not in ALGORITHMS]
    if unknown:
      raise run_config.ConfigError(f"--algorithms: unknown {unknown}; valid: {ALGORITHMS}")
    if FLAGS["learning_rate"].present:
      raise run_config.ConfigError("--learning_rate would apply one rate to every algorithm; "
                               "use --learning_rates=name=value,...")
    try:
      rates = _parse_rates(FLAGS.learning_rates)
    except ValueError as e:
      raise run_config.ConfigError(str(e)) from None
    out = FLAGS.output_dir
    base = run_cli.config_from_flags()
    variants = {name: {"algorithm": name, "learning_rate": rates.get(name)} for name in FLAGS.algorithms}
    for name, overrides in variants.items():  # every run's settings checked before anything runs
      dataclasses.replace(base, output_dir=os.path.join(out, "_check"), overwrite=True,
                          **overrides).validate()
    if FLAGS.dry_run:
      print(f"{len(variants)} runs into {out}: {', '.join(variants)}; settings "
            + json.dumps({k: v for k, v in dataclasses.asdict(base).items()
                          if k not in run_config.RESUME_FREE}))
      return
    os.makedirs(out, exist_ok=True)
    if base.dataset in run_config.POOLED_DATASETS:
      partition_path = base.partition_file or os.path.join(out, "partition.json")
      base = runner.with_shared_partition(base, partition_path)
    else:  # the split is fixed by the data files, the seed and the flags: the same for every run
      partition_path = f"fixed by the {base.dataset} files, seed {base.seed} and the flags"
    all_results = run_variants(base, variants, out)
    header = (f"Comparison on {base.dataset}, partition {partition_path}, {base.rounds} rounds x "
              f"{base.clients_per_round} clients, {base.local_epochs} local epochs, batch "
              f"{base.batch_size}, model {base.model} (width {base.model_width}), seed {base.seed}. "
              f"Bits are counted from the payloads; FLOPs by fedmask_tff.models.costs.train_flops.")
    text = write_table(out, table_rows(all_results), header)
    print(text)
  except (run_config.ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
