"""FedMask's communication options side by side: ``python -m experiments.compare_coding``.

Runs FedMask on one partition with each of its beyond-the-paper options
and writes ``coding.md`` / ``coding.csv`` / ``coding.json``: bits per mask
parameter per client per round up and down (from the payloads; the uplink of
``entropy`` from the coded stream), and personalized accuracy with its
difference to plain FedMask on the same seed. Every ``experiments.run`` flag
applies to all variants; rerunning skips finished ones and resumes unfinished ones.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys

from absl import app, flags

from experiments import compare
from experiments import run as run_cli  # defines every run flag

FLAGS = flags.FLAGS
flags.DEFINE_list("ldp_epsilons", ["1", "4"], "Randomized-response epsilons to try.")
FLAGS.set_default("output_dir", "runs/compare_coding")

COLUMNS = ("variant", "accuracy", "accuracy_delta", "uplink_bits_per_param", "downlink_bits_per_param",
           "uplink_bits_per_client_round", "downlink_bits_per_client_round", "settings")


def variants(epsilons) -> dict:
  """The coding options apply to the paper's upload (the binary mask, ``--upload=mask``); the
  default upload (``score_sign``, 1 bit up and float32 G down) is listed beside them."""
  out = {
      "plain": {},
      "score_sign_default": {"upload": "score_sign"},
      "entropy": {"uplink_coding": "entropy"},
      "entropy_down8": {"uplink_coding": "entropy", "downlink_bits": 8},
      "entropy_down4": {"uplink_coding": "entropy", "downlink_bits": 4},
      "entropy_down4_stochastic": {"uplink_coding": "entropy", "downlink_bits": 4,
                                   "downlink_stochastic": True},
      "secure_aggregation": {"secure_aggregation": True},
  }
  for eps in epsilons:
    out[f"ldp_eps{eps:g}"] = {"ldp_epsilon": eps}
  return out


def rows(all_results: dict, chosen: dict) -> list[dict]:
  base = all_results["plain"]["final"]["accuracy"]
  table = []
  for name, results in all_results.items():
    t, f = results["totals"], results["final"]
    table.append({"variant": name, "accuracy": f["accuracy"], "accuracy_delta": f["accuracy"] - base,
                  "uplink_bits_per_param": t["uplink_bits_per_param"],
                  "downlink_bits_per_param": t["downlink_bits_per_param"],
                  "uplink_bits_per_client_round": t["uplink_bits_per_client_round"],
                  "downlink_bits_per_client_round": t["downlink_bits_per_client_round"],
                  "settings": json.dumps(chosen[name])})
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from fedmask_tff.simulation import run_config, runner
  from fedmask_tff.data import DataError
  try:
    try:
      epsilons = [float(e) for e in FLAGS.ldp_epsilons]
    except ValueError:
      raise run_config.ConfigError(f"--ldp_epsilons must be numbers, got {FLAGS.ldp_epsilons}") from None
    out = FLAGS.output_dir
    base = dataclasses.replace(run_cli.config_from_flags(), algorithm="fedmask",
                               output_dir=os.path.join(out, "_check"), overwrite=True)
    if not FLAGS["upload"].present:  # the options below code and quantize the mask upload
      base = dataclasses.replace(base, upload="mask")
    chosen = variants(epsilons)
    for overrides in chosen.values():
      dataclasses.replace(base, **overrides).validate()
    os.makedirs(out, exist_ok=True)
    base = runner.with_shared_partition(base, base.partition_file or os.path.join(out, "partition.json"))
    all_results = compare.run_variants(base, chosen, out)
    table = rows(all_results, chosen)
    with open(os.path.join(out, "coding.csv"), "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=COLUMNS)
      writer.writeheader()
      writer.writerows(table)
    with open(os.path.join(out, "coding.json"), "w") as f:
      json.dump(table, f, indent=2)
    lines = [f"FedMask communication options (upload={base.upload}) on {base.dataset}: {base.num_clients} clients, "
             f"{base.rounds} rounds x {base.clients_per_round}, {base.local_epochs} local epochs, "
             f"model {base.model or 'default'} (width {base.model_width}), seed {base.seed}. Bits per "
             "mask parameter per client per round, from the payloads (entropy: the coded stream, "
             "plus the one-time pruning masks).", "",
             "| variant | accuracy | Δ vs plain | uplink bits/param | downlink bits/param |",
             "|---|---|---|---|---|"]
    for r in table:
      lines.append(f"| {r['variant']} | {r['accuracy']:.4f} | {r['accuracy_delta']:+.4f} "
                   f"| {r['uplink_bits_per_param']:.3f} | {r['downlink_bits_per_param']:.3f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "coding.md"), "w") as f:
      f.write(text)
    print(text)
  except (run_config.ConfigError, DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
