"""One command per study of the FedMask paper: ``python -m experiments.studies --study=NAME``.

Studies (see ``docs/studies.md`` for what each preset runs and which values follow the paper):

* ``communication`` (the paper's Fig. 10): accuracy against the cumulative communication cost
  per client (uplink + downlink bits, summed over rounds), all seven algorithms;
* ``computation`` (Fig. 11): training FLOPs per client per round and cumulative, per algorithm,
  with the final accuracy;
* ``devices`` (Fig. 12): FedMask (and FedAvg for reference) with several numbers of
  participating devices per round: accuracy per round and final accuracy;
* ``epochs``: FedMask's training cost and accuracy against the number of local epochs;
* ``fedmask_ablation``: FedMask's parts one at a time on one partition (the paper's vote rule,
  persistent rules, the 1-bit downlink, a random start, Bernoulli masks, server-held scores)
  beside Standalone, FedAvg and ``local_masks`` (no aggregation);
* ``mask_capacity`` (Table 2): a mask over frozen random weights against training the weights,
  centrally on the pooled clients (``experiments.mask_capacity``; ``--epochs=N`` sets the epochs);
* ``model_size`` (Table 5): parameters, float32 size, 1-bit mask size, and both after one-shot
  pruning, for the paper's models at width 1 (no training: the models are only built).

``--preset=small`` (default) runs in minutes on the embedded Fashion-MNIST; ``--preset=paper``
uses the paper's set-up where the data is available (``--dataset=cifar10`` default; ``har``,
``femnist_leaf``, ``shakespeare_leaf``). Every flag of ``experiments.run`` is accepted and, when
given, overrides the preset (``--rounds=3``, ``--num_clients=6``, ...); ``--algorithms`` and
``--learning_rates`` are ``experiments.compare``'s; ``--devices`` and ``--epochs`` set the
values the ``devices`` and ``epochs`` studies sweep.

Outputs in ``--output_dir`` (default ``runs/studies/NAME``, ``runs/studies/NAME_paper`` for the
paper preset): one subdirectory per run (the runner's own outputs), ``partition.json`` (the split
every run uses, Fashion-MNIST), ``study.json`` (settings and every run's raw numbers),
``study.csv`` (one row per run and round; per model for ``model_size``), ``figure.png`` and
``table.md``. Progress (which run of how many) goes to stderr.

Rerunning the same command resumes where it stopped: runs whose ``results.json`` is complete
with the same settings are skipped, an unfinished run resumes after its last finished round
(the runner's checkpoint); a run directory holding other settings is refused unless
``--overwrite`` is given (then only those runs start again).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time

from absl import app, flags

from experiments import compare  # defines every flag of experiments.run, --algorithms, --learning_rates
from experiments import run as run_cli  # noqa: F401  (the run flags; also defined via compare)
from fedmask_tff.algorithms import ALGORITHMS

FLAGS = flags.FLAGS
STUDIES = ("communication", "computation", "devices", "epochs", "fedmask_ablation", "mask_capacity",
           "model_size")
PRESETS = ("small", "paper")
flags.DEFINE_string("study", None, f"Which study: one of {', '.join(STUDIES)}.")
flags.DEFINE_string("preset", "small", "small (minutes, Fashion-MNIST) or paper (the paper's set-up).")
flags.DEFINE_list("devices", None, "devices study: participating devices (clients per round) to "
                  "compare (default: the preset's; paper 20,40,80).")
# --dry_run (defined with the run flags): print the planned runs and their settings, run nothing.
flags.DEFINE_list("epochs", None, "epochs study: local epochs to compare (default: the preset's; "
                  "paper 1,2,5, small 1,2).")

MB = 1e6  # bytes in a megabyte, as reported here (decimal)
_STUDY_ALGORITHMS = {"communication": list(ALGORITHMS), "computation": list(ALGORITHMS),
                     "devices": ["fedmask", "fedavg"], "epochs": ["fedmask"]}


def _log(message: str) -> None:
  print(f"[studies] {message}", file=sys.stderr, flush=True)


# --- Presets ------------------------------------------------------------------------------------

# The small preset: the embedded Fashion-MNIST, a small MLP, few clients and rounds (minutes on 2
# cores). Every value is scaled down from the paper; only the pathological 2-class split and
# p_r = 0.2 follow it.
SMALL_COMMON = dict(dataset="fashion_mnist", partition="pathological", classes_per_client=2,
                    num_clients=30, clients_per_round=5, rounds=6, local_epochs=1, batch_size=32,
                    model="mlp", model_width=0.25, prune_rate=0.2, seed=0, eval_every=0)
SMALL_STUDY = {"communication": dict(eval_every=1), "computation": {},
               "devices": dict(eval_every=2), "epochs": {}, "fedmask_ablation": {},
               "mask_capacity": dict(model=None, model_width=1.0)}
SMALL_SWEEPS = {"devices": [3, 6, 12], "epochs": [1, 2]}

# The paper preset, per dataset. PAPER_FOLLOWS names the values taken from the paper (or from
# this project's reading of it, see README.md); everything else is our choice, listed in
# docs/studies.md.
PAPER_COMMON = dict(rounds=100, local_epochs=5, batch_size=32, prune_rate=0.2, seed=0, model=None,
                    model_width=1.0, eval_every=0)
PAPER_DATASET = {
    # 400 clients x 2 classes x 25 examples, VGG-16 (prunes its last 8 layers).
    "cifar10": dict(num_clients=400, classes_per_client=2, examples_per_client=25,
                    clients_per_round=20),
    "har": dict(num_clients=30, clients_per_round=20),  # one client per subject (30)
    "femnist_leaf": dict(num_clients=1000, clients_per_round=20),  # every writer in the files
    "shakespeare_leaf": dict(num_clients=1000, clients_per_round=10),  # every role (10 here)
    "fashion_mnist": dict(num_clients=100, classes_per_client=2, partition="pathological",
                          clients_per_round=20),
}
PAPER_STUDY = {"communication": dict(eval_every=5), "computation": {}, "devices": dict(eval_every=5),
               "epochs": {}, "fedmask_ablation": {}, "mask_capacity": {}}

# The fedmask_ablation study: FedMask's parts one at a time on one partition, beside the simple
# things (issue 14). Each variant is (run name, RunConfig changes); FedMask's own settings not
# named take the run's values (the defaults: upload=score_sign, global_weight=0.5,
# personal_head).
ABLATION_VARIANTS = (
    ("standalone", dict(algorithm="standalone")),
    ("fedavg", dict(algorithm="fedavg")),
    ("local_masks", dict(algorithm="local_masks")),
    ("mask_scaled_logit", dict(algorithm="fedmask", upload="mask", score_restart="scaled_logit")),
    ("paper_algorithm1", dict(algorithm="fedmask", upload="mask", score_restart="scaled_logit",
                              global_mask=True, prune_at_init=True)),
    ("mask_scaled_logit_random_start", dict(algorithm="fedmask", upload="mask",
                                            score_restart="scaled_logit", score_init_noise=0.05)),
    ("mask_disagree_shift", dict(algorithm="fedmask", upload="mask", score_restart="disagree_shift")),
    ("mask_vote_shift", dict(algorithm="fedmask", upload="mask", score_restart="vote_shift")),
    ("mask_disagree_shift_1bit_down", dict(algorithm="fedmask", upload="mask",
                                           score_restart="disagree_shift", downlink_bits=1)),
    ("mask_disagree_shift_8bit_down", dict(algorithm="fedmask", upload="mask",
                                           score_restart="disagree_shift", downlink_bits=8)),
    ("bernoulli_fedpm", dict(algorithm="fedmask", upload="bernoulli", score_restart="scaled_logit",
                             restart_scale=1.0)),
    ("score_sign_w1", dict(algorithm="fedmask", upload="score_sign", global_weight=1.0,
                           personal_head=False)),
    ("score_sign_shared_head", dict(algorithm="fedmask", upload="score_sign",
                                    personal_head=False)),
    ("fedmask_default_8bit_down", dict(algorithm="fedmask", downlink_bits=8)),
    ("fedmask_default", dict(algorithm="fedmask")),
)
PAPER_SWEEPS = {"devices": [20, 40, 80], "epochs": [1, 2, 5]}
PAPER_FOLLOWS = ("cifar10: 400 clients, 2 classes per client, 25 examples per client, vgg16",
                 "20 devices per round (shakespeare_leaf: its 10 roles), 5 local epochs",
                 "prune_rate 0.2 (p_r) and the pruned layers (VGG-16: last 8; others: last 2)",
                 "devices 20, 40, 80 per round", "local epochs 1, 2, 5",
                 "the models: vgg16 (cifar10), har_mlp (har), cnn (femnist_leaf), "
                 "shakespeare_lstm (shakespeare_leaf)")


def preset_values(study: str, preset: str, dataset: str) -> dict:
  """RunConfig overrides of ``preset`` for ``study`` on ``dataset`` (before command-line flags)."""
  if preset == "small":
    values = dict(SMALL_COMMON)
    if dataset != "fashion_mnist":  # the data set's own model, small
      values.update(dataset=dataset, model=None)
    values.update(SMALL_STUDY[study])
    return values
  values = dict(PAPER_COMMON, dataset=dataset)
  values.update(PAPER_DATASET.get(dataset, {}))
  values.update(PAPER_STUDY[study])
  return values


def sweep_values(study: str, preset: str) -> list[int]:
  flag = {"devices": FLAGS.devices, "epochs": FLAGS.epochs}.get(study)
  if flag:
    try:
      values = [int(v) for v in flag]
    except ValueError:
      raise _config_error(f"--{study}: expected integers, got {flag}") from None
    if any(v < 1 for v in values) or len(set(values)) != len(values):
      raise _config_error(f"--{study}: expected distinct integers >= 1, got {flag}")
    return values
  return list((SMALL_SWEEPS if preset == "small" else PAPER_SWEEPS)[study])


def _config_error(message):
  from fedmask_tff.simulation import runner
  return runner.ConfigError(message)


# --- Planning and running ----------------------------------------------------------------------


def base_config(study: str, preset: str):
  """The study's RunConfig before the per-run changes: defaults < preset < given flags."""
  from fedmask_tff.simulation.runner import RunConfig
  dataset = FLAGS.dataset if FLAGS["dataset"].present else ("fashion_mnist" if preset == "small"
                                                             else "cifar10")
  values = dataclasses.asdict(RunConfig())
  values.update(preset_values(study, preset, dataset))
  for field in dataclasses.fields(RunConfig):
    if field.name in FLAGS and FLAGS[field.name].present:
      values[field.name] = getattr(FLAGS, field.name)
  values["overwrite"] = False
  return RunConfig(**values)


def plan_runs(study: str, preset: str, base, out: str) -> list[tuple[str, dict, object]]:
  """``[(run name, swept values, RunConfig)]`` in the order they run."""
  if study == "fedmask_ablation":
    if FLAGS["algorithms"].present:
      raise _config_error("the fedmask_ablation study runs its own variants (ABLATION_VARIANTS); "
                          "--algorithms does not apply")
    return [(name, {k: v for k, v in changes.items() if k != "algorithm"},
             dataclasses.replace(base, output_dir=os.path.join(out, name), **changes))
            for name, changes in ABLATION_VARIANTS]
  algorithms = list(FLAGS.algorithms) if FLAGS["algorithms"].present else _STUDY_ALGORITHMS[study]
  unknown = [a for a in algorithms if a not in ALGORITHMS]
  if unknown or not algorithms:
    raise _config_error(f"--algorithms: unknown {unknown}; valid: {ALGORITHMS}")
  try:
    rates = compare._parse_rates(FLAGS.learning_rates)  # pylint: disable=protected-access
  except ValueError as e:
    raise _config_error(str(e)) from None
  if FLAGS["learning_rate"].present and len(algorithms) > 1:
    raise _config_error("--learning_rate would apply one rate to every algorithm; "
                        "use --learning_rates=name=value,...")
  if study == "devices" and FLAGS["clients_per_round"].present:
    raise _config_error("the devices study sets clients per round itself: use --devices=20,40,80")
  if study == "epochs" and FLAGS["local_epochs"].present:
    raise _config_error("the epochs study sets local epochs itself: use --epochs=1,2,5")
  runs = []
  sweep = sweep_values(study, preset) if study in ("devices", "epochs") else [None]
  for algorithm in algorithms:
    for value in sweep:
      changes = dict(algorithm=algorithm)
      if algorithm in rates:
        changes["learning_rate"] = rates[algorithm]
      if study == "devices":
        if value > base.num_clients:
          raise _config_error(f"--devices: {value} devices per round but --num_clients is "
                              f"{base.num_clients} on {base.dataset}; choose --devices <= {base.num_clients}")
        changes["clients_per_round"] = value
        name = f"{algorithm}_devices{value}"
      elif study == "epochs":
        changes["local_epochs"] = value
        name = f"{algorithm}_epochs{value}"
      else:
        name = algorithm
      swept = {k: v for k, v in changes.items() if k in ("clients_per_round", "local_epochs")}
      config = dataclasses.replace(base, output_dir=os.path.join(out, name), **changes)
      runs.append((name, swept, config))
  return runs


def finished_results(config):
  """The run's results when its ``results.json`` is complete with the same settings, else None."""
  return compare.complete_results(os.path.join(config.output_dir, "results.json"), config)


PARTITION_KEYS = ("dataset", "data_dir", "partition", "classes_per_client", "dirichlet_alpha",
                  "num_clients", "test_fraction", "seed")


def ensure_partition(base, out: str):
  """Writes ``<out>/partition.json`` once (Fashion-MNIST); returns the config that uses it."""
  from fedmask_tff.simulation import runner
  from fedmask_tff.data import partition_file as partition_file_lib
  if base.dataset not in runner.POOLED_DATASETS or base.partition_file:
    return base  # other data sets: the split is fixed by the files, the seed and the flags
  path = os.path.join(out, "partition.json")
  settings_path = os.path.join(out, "partition_settings.json")
  settings = {k: getattr(base, k) for k in PARTITION_KEYS}
  if os.path.exists(path):
    try:
      with open(settings_path) as f:
        stored = json.load(f)
    except (OSError, ValueError):
      stored = None
    if stored != settings:
      if not base_overwrite():
        raise runner.ConfigError(
            f"{path} was written for other settings ({_diff_words(stored, settings)}): choose "
            "another --output_dir or pass --overwrite to replace it (and the runs using it)")
      os.remove(path)
  if not os.path.exists(path):
    partition_file_lib.save_split_partition(path, runner.load_split(base), base.dataset)
    with open(settings_path, "w") as f:
      json.dump(settings, f, indent=2)
    _log(f"partition written to {path}")
  return dataclasses.replace(base, partition_file=path)


def _diff_words(stored, settings) -> str:
  if not isinstance(stored, dict):
    return "unknown: no readable partition_settings.json"
  return ", ".join(f"--{k}" for k in settings if stored.get(k) != settings[k]) or "unknown"


def base_overwrite() -> bool:
  return bool(FLAGS.overwrite)


def execute(runs) -> dict:
  """Runs (or skips, or resumes) every planned run; returns ``{name: results}``."""
  from fedmask_tff.simulation import runner
  all_results = {}
  n = len(runs)
  for i, (name, _, config) in enumerate(runs, start=1):
    done = finished_results(config)
    if done is not None:
      _log(f"run {i}/{n} {name}: complete, skipped")
      all_results[name] = done
      continue
    try:
      state = runner.resume_state(config)
    except runner.ConfigError:
      if not base_overwrite():
        raise
      state = "replace"
    if state in ("complete", "no_checkpoint"):
      if not base_overwrite():
        results_path = os.path.join(config.output_dir, "results.json")
        why = "an unreadable or unresumable run"
        try:
          with open(results_path) as f:
            differ = runner.differing_settings(json.load(f).get("config", {}), config)
          why = f"a run with other settings ({', '.join('--' + d for d in differ)})" if differ else why
        except (OSError, ValueError):
          pass
        raise runner.ConfigError(f"{config.output_dir} holds {why}: pass --overwrite to replace "
                                 "it, or choose another --output_dir")
      state = "replace"
    if state == "replace":
      config = dataclasses.replace(config, overwrite=True)
    word = {"resume": "resuming", "replace": "replacing the old run"}.get(state, "starting")
    _log(f"run {i}/{n} {name}: {word} ({config.output_dir})")
    t0 = time.perf_counter()
    all_results[name] = runner.run(config)
    _log(f"run {i}/{n} {name}: done in {time.perf_counter() - t0:.1f} s, accuracy "
         f"{all_results[name]['final']['accuracy']:.4f}")
  return all_results


# --- Summaries ---------------------------------------------------------------------------------


def run_record(name: str, swept: dict, results: dict) -> dict:
  """A run's numbers for the study: totals, and one entry per round (``series``)."""
  rows, final, totals, cfg = results["rounds"], results["final"], results["totals"], results["config"]
  init = results.get("initialization") or {}  # --prune_at_init: pruning masks sent before round 1
  cum_bits = float(init.get("uplink_bits_per_client", 0.0))
  cum_flops = float(init.get("train_flops", 0.0)) / max(1, init.get("clients", 1))
  series = []
  last = rows[-1]["round"] if rows else 0
  for r in rows:
    cum_bits += r["uplink_bits_per_client"] + r["downlink_bits_per_client"]
    cum_flops += r["train_flops_per_client"]
    acc = r.get("accuracy")
    acc_mean = r.get("accuracy_client_mean")
    if r["round"] == last:  # the runner's last round is evaluated in "final"
      acc, acc_mean = final["accuracy"], final["accuracy_client_mean"]
    series.append({"round": r["round"], "uplink_bits_per_client": r["uplink_bits_per_client"],
                   "downlink_bits_per_client": r["downlink_bits_per_client"],
                   "cumulative_bits_per_client": cum_bits,
                   "cumulative_mb_per_client": cum_bits / 8 / MB,
                   "train_flops_per_client": r["train_flops_per_client"],
                   "cumulative_train_flops_per_client": cum_flops,
                   "accuracy": acc, "accuracy_client_mean": acc_mean, "wall_s": r["wall_s"]})
  return {
      "run": name, "algorithm": results["algorithm"], "dataset": results["dataset"],
      "clients_per_round": cfg["clients_per_round"], "local_epochs": cfg["local_epochs"],
      **{f"swept_{k}": v for k, v in swept.items()},
      "output_dir": cfg["output_dir"], "model": cfg.get("model_used"),
      "model_parameters": cfg.get("model_parameters"), "learning_rate": cfg.get("learning_rate_used"),
      "accuracy": final["accuracy"], "accuracy_client_mean": final["accuracy_client_mean"],
      "accuracy_after_aggregation": final.get("accuracy_after_aggregation"),
      "evaluated_clients": final["evaluated_clients"], "rounds": totals["rounds"],
      "uplink_bits_per_client_round": totals["uplink_bits_per_client_round"],
      "downlink_bits_per_client_round": totals["downlink_bits_per_client_round"],
      "cumulative_bits_per_client": cum_bits, "cumulative_mb_per_client": cum_bits / 8 / MB,
      "train_flops_per_client_round": totals["train_flops_per_client_round"],
      "cumulative_train_flops_per_client": cum_flops, "wall_s": totals["wall_s"],
      "series": series,
  }


SERIES_COLUMNS = ("run", "algorithm", "clients_per_round", "local_epochs", "round",
                  "uplink_bits_per_client", "downlink_bits_per_client", "cumulative_bits_per_client",
                  "cumulative_mb_per_client", "train_flops_per_client",
                  "cumulative_train_flops_per_client", "accuracy", "accuracy_client_mean", "wall_s")


def write_raw(out: str, payload: dict, csv_rows: list[dict], columns) -> None:
  with open(os.path.join(out, "study.json"), "w") as f:
    json.dump(payload, f, indent=2, default=str)
  with open(os.path.join(out, "study.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in csv_rows:
      writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def _series_rows(records):
  for rec in records:
    for s in rec["series"]:
      yield {"run": rec["run"], "algorithm": rec["algorithm"],
             "clients_per_round": rec["clients_per_round"], "local_epochs": rec["local_epochs"], **s}


def _fmt(value, spec):
  return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _ratio(value, base):
  return value / base if base else None


def training_table(study: str, records: list[dict], header: str) -> str:
  base = {r["algorithm"]: r for r in records}.get("fedavg")
  if study == "fedmask_ablation":
    lines = ["| variant | algorithm | accuracy | client mean | before local training "
             "| up bits/client/round | down bits/client/round | cumulative MB/client |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
      lines.append(f"| {r['run']} | {r['algorithm']} | {r['accuracy']:.4f} "
                   f"| {r['accuracy_client_mean']:.4f} | {_fmt(r.get('accuracy_after_aggregation'), '.4f')} "
                   f"| {r['uplink_bits_per_client_round']:,.0f} | {r['downlink_bits_per_client_round']:,.0f} "
                   f"| {r['cumulative_mb_per_client']:.4g} |")
  elif study == "communication":
    lines = ["| algorithm | accuracy | cumulative MB/client (up+down) | up bits/client/round "
             "| down bits/client/round | cumulative ÷ FedAvg |", "|---|---|---|---|---|---|"]
    for r in records:
      lines.append(f"| {r['algorithm']} | {r['accuracy']:.4f} | {r['cumulative_mb_per_client']:.4g} "
                   f"| {r['uplink_bits_per_client_round']:,.0f} | {r['downlink_bits_per_client_round']:,.0f} "
                   f"| {_fmt(_ratio(r['cumulative_bits_per_client'], base and base['cumulative_bits_per_client']), '.4f')} |")
  elif study == "computation":
    lines = ["| algorithm | accuracy | train FLOPs/client/round | cumulative train FLOPs/client "
             "| FLOPs ÷ FedAvg |", "|---|---|---|---|---|"]
    for r in records:
      lines.append(f"| {r['algorithm']} | {r['accuracy']:.4f} | {r['train_flops_per_client_round']:.4g} "
                   f"| {r['cumulative_train_flops_per_client']:.4g} "
                   f"| {_fmt(_ratio(r['train_flops_per_client_round'], base and base['train_flops_per_client_round']), '.3f')} |")
  elif study == "devices":
    lines = ["| algorithm | devices per round | accuracy | client mean | evaluated clients "
             "| up bits/client/round | down bits/client/round |", "|---|---|---|---|---|---|---|"]
    for r in records:
      lines.append(f"| {r['algorithm']} | {r['clients_per_round']} | {r['accuracy']:.4f} "
                   f"| {r['accuracy_client_mean']:.4f} | {r['evaluated_clients']} "
                   f"| {r['uplink_bits_per_client_round']:,.0f} | {r['downlink_bits_per_client_round']:,.0f} |")
  else:  # epochs
    lines = ["| algorithm | local epochs | accuracy | train FLOPs/client/round "
             "| cumulative train FLOPs/client | up bits/client/round | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
      lines.append(f"| {r['algorithm']} | {r['local_epochs']} | {r['accuracy']:.4f} "
                   f"| {r['train_flops_per_client_round']:.4g} | {r['cumulative_train_flops_per_client']:.4g} "
                   f"| {r['uplink_bits_per_client_round']:,.0f} | {r['wall_s']:.1f} |")
  return header + "\n\n" + "\n".join(lines) + "\n"


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def training_figure(study: str, records: list[dict], path: str, title: str) -> None:
  plt = _pyplot()
  if study == "fedmask_ablation":
    fig, ax = plt.subplots(figsize=(9, 5))
    names = [r["run"] for r in records]
    ax.barh(range(len(names)), [r["accuracy"] for r in records], color="tab:blue")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    lo = min(r["accuracy"] for r in records)
    ax.set_xlim(max(0.0, lo - 0.1), 1.0)
    ax.set_xlabel("personalized accuracy")
  elif study == "communication":
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in records:
      pts = [(s["cumulative_mb_per_client"], s["accuracy"]) for s in r["series"]
             if s["accuracy"] is not None]
      if r["cumulative_bits_per_client"] <= 0:  # nothing sent: not on a log axis
        ax.axhline(r["accuracy"], ls="--", lw=1, color="gray",
                   label=f"{r['algorithm']} (0 bits sent), final")
        continue
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=r["algorithm"])
    ax.set_xscale("log")
    ax.set_xlabel("cumulative communication per client, uplink + downlink (MB, log)")
    ax.set_ylabel("personalized test accuracy")
    ax.legend(fontsize=8)
  elif study == "computation":
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    names = [r["algorithm"] for r in records]
    flops = [r["train_flops_per_client_round"] for r in records]
    a1.bar(names, flops, color="tab:blue")
    positive = [v for v in flops if v > 0]
    log = bool(positive) and max(positive) / min(positive) > 50  # log only for wide ranges
    if log:
      a1.set_yscale("log")
    a1.set_ylabel("training FLOPs per client per round" + (" (log)" if log else ""))
    a2.bar(names, [r["accuracy"] for r in records], color="tab:green")
    a2.set_ylabel("personalized test accuracy")
    a2.set_ylim(0, 1)
    for a in (a1, a2):
      a.tick_params(axis="x", rotation=35)
  elif study == "devices":
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    styles = {}
    values = sorted({r["clients_per_round"] for r in records})
    colors = {v: plt.cm.viridis(i / max(1, len(values) - 1)) for i, v in enumerate(values)}
    for r in records:
      ls = styles.setdefault(r["algorithm"], ["-", "--", ":", "-."][len(styles) % 4])
      pts = [(s["round"], s["accuracy"]) for s in r["series"] if s["accuracy"] is not None]
      a1.plot([p[0] for p in pts], [p[1] for p in pts], ls=ls, marker="o", ms=3,
              color=colors[r["clients_per_round"]], label=f"{r['algorithm']}, {r['clients_per_round']} devices")
    a1.set_xlabel("round")
    a1.set_ylabel("personalized test accuracy")
    a1.legend(fontsize=8)
    for algorithm in styles:
      rs = sorted((r for r in records if r["algorithm"] == algorithm), key=lambda r: r["clients_per_round"])
      a2.plot([r["clients_per_round"] for r in rs], [r["accuracy"] for r in rs], marker="o", label=algorithm)
    a2.set_xlabel("participating devices per round")
    a2.set_ylabel("final personalized test accuracy")
    a2.set_xticks(values)
    a2.legend(fontsize=8)
  else:  # epochs
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for algorithm in dict.fromkeys(r["algorithm"] for r in records):
      rs = sorted((r for r in records if r["algorithm"] == algorithm), key=lambda r: r["local_epochs"])
      x = [r["local_epochs"] for r in rs]
      a1.plot(x, [r["train_flops_per_client_round"] for r in rs], marker="o", label=algorithm)
      a2.plot(x, [r["accuracy"] for r in rs], marker="o", label=algorithm)
    values = sorted({r["local_epochs"] for r in records})
    a1.set_ylabel("training FLOPs per client per round")
    a2.set_ylabel("final personalized test accuracy")
    for a in (a1, a2):
      a.set_xlabel("local epochs")
      a.set_xticks(values)
      a.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


FIGURE_TITLES = {"communication": "Accuracy vs. communication (cf. FedMask Fig. 10)",
                 "computation": "Training computation per client (cf. FedMask Fig. 11)",
                 "devices": "Participating devices per round (cf. FedMask Fig. 12)",
                 "epochs": "Local epochs: training cost and accuracy",
                 "fedmask_ablation": "FedMask's parts, one at a time, beside the simple things"}


def training_study(study: str, preset: str, out: str) -> str:
  from fedmask_tff.simulation import runner
  base = base_config(study, preset)
  runs = plan_runs(study, preset, base, out)
  for _, _, config in runs:  # every value checked before anything runs
    dataclasses.replace(config, output_dir=os.path.join(out, "_check"), overwrite=True).validate()
  if FLAGS.dry_run:
    lines = [f"{study} ({preset} preset): {len(runs)} runs into {out}",
             "shared settings: " + json.dumps({k: v for k, v in dataclasses.asdict(base).items()
                                               if k not in runner.RESUME_FREE})]
    lines += [f"  {name}: {json.dumps({'algorithm': c.algorithm, **swept})}" for name, swept, c in runs]
    return "\n".join(lines)
  os.makedirs(out, exist_ok=True)
  _log(f"{study} ({preset} preset): {len(runs)} runs on {base.dataset} into {out}")
  base = ensure_partition(base, out)
  runs = [(name, swept, dataclasses.replace(config, partition_file=base.partition_file))
          for name, swept, config in runs]
  all_results = execute(runs)
  records = [run_record(name, swept, all_results[name]) for name, swept, _ in runs]
  settings = {k: v for k, v in dataclasses.asdict(base).items() if k not in runner.RESUME_FREE}
  header = (f"**{study}** study, {preset} preset: {base.dataset}, model {records[0]['model']} "
            f"(width {base.model_width}), {base.num_clients} clients, {base.rounds} rounds, "
            f"batch {base.batch_size}, seed {base.seed}"
            + (f", partition {base.partition_file}" if base.partition_file else "")
            + (f", validation fraction {base.validation_fraction:g}" if base.validation_fraction else "")
            + f". Accuracy: personalized {'validation' if base.validation_fraction else 'test'} "
            "accuracy (example-weighted) after the last round. "
            "Bits per client are measured from the payloads (mean over each round's clients); "
            "cumulative = summed over rounds, i.e. what one device taking part in every round "
            f"would send and receive; MB = 10^6 bytes. FLOPs: fedmask_tff.models.costs.train_flops.")
  if study in ("communication", "computation"):
    compare.write_table(out, compare.table_rows({r["algorithm"]: all_results[r["run"]] for r in records}),
                        header)
  text = training_table(study, records, header)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(text)
  payload = {"study": study, "preset": preset, "settings": settings,
             "sweep": sorted({json.dumps(s, sort_keys=True) for _, s, _ in runs}),
             "runs": records}
  payload["sweep"] = [json.loads(s) for s in payload["sweep"]]
  write_raw(out, payload, list(_series_rows(records)), SERIES_COLUMNS)
  training_figure(study, records, os.path.join(out, "figure.png"),
                  f"{FIGURE_TITLES[study]}: {base.dataset}, {preset} preset")
  return text


# --- Model size (Table 5) -----------------------------------------------------------------------

# (label, model name, input shape, classes, input dtype note)
SIZE_MODELS = (
    ("vgg16 (CIFAR-10)", "vgg16", (32, 32, 3), 10),
    ("har_mlp (HAR)", "har_mlp", (128, 9), 6),
    ("shakespeare_lstm (Shakespeare)", "shakespeare_lstm", (80,), 90),
    ("cnn (Fashion-MNIST)", "cnn", (28, 28, 1), 10),
    ("cnn (FEMNIST)", "cnn", (28, 28, 1), 62),
)
SIZE_COLUMNS = ("model", "architecture", "input_shape", "classes", "width", "parameters",
                "float32_mb", "mask_parameters", "mask_mb", "compression", "pruned_layers",
                "prune_rate", "pruned_layer_parameters", "removed_parameters",
                "pruned_float32_mb", "pruned_mask_mb", "pruning_mask_mb_once",
                "uplink_mb_per_round_as_implemented", "downlink_mb_per_round_as_implemented")


def size_row(label: str, name: str, input_shape, classes: int, width: float, prune_rate: float) -> dict:
  """One model's Table-5 sizes (builds the masked model; no training)."""
  import tensorflow as tf
  from fedmask_tff import models
  from fedmask_tff.models import paper
  from fedmask_tff.masks.layers import masked_layers
  from fedmask_tff.masks.pruning import kept_count
  tf.keras.backend.clear_session()
  model = models.masked_builder(name)(input_shape, classes, width=width, seed=0)
  report = paper.model_size_report(model)
  prune_last = models.prune_last_layers(name)  # what the runner uses
  layers = masked_layers(model)
  first_pruned = len(layers) - prune_last
  pruned_n, removed, pruned_mask_bytes, once_bytes, pruned_names = 0, 0, 0, 0, []
  for i, layer in enumerate(layers):
    for _, kernel, _, _ in layer.masked_weights:
      n = int(kernel.shape.num_elements())
      if i >= first_pruned:
        k = kept_count(n, prune_rate)
        pruned_n += n
        removed += n - k
        pruned_mask_bytes += (k + 7) // 8
        once_bytes += (n + 7) // 8
      else:
        pruned_mask_bytes += (n + 7) // 8
    if i >= first_pruned:
      pruned_names.append(layer.name)
  kept_masked = report["mask_parameters"] - removed
  row = {
      "model": label, "architecture": name, "input_shape": list(input_shape), "classes": classes,
      "width": width, "parameters": report["parameters"],
      "float32_mb": report["float32_bytes"] / MB, "mask_parameters": report["mask_parameters"],
      "mask_mb": report["mask_bytes"] / MB, "compression": report["compression"],
      "pruned_layers": ",".join(pruned_names), "prune_rate": prune_rate,
      "pruned_layer_parameters": pruned_n, "removed_parameters": removed,
      "pruned_float32_mb": 4 * (report["parameters"] - removed) / MB,
      "pruned_mask_mb": pruned_mask_bytes / MB, "pruning_mask_mb_once": once_bytes / MB,
      "uplink_mb_per_round_as_implemented": report["mask_bytes"] / MB,
      "downlink_mb_per_round_as_implemented": 4 * kept_masked / MB,
      "other_parameters": report["other_parameters"],
  }
  del model
  return row


SIZE_NOTES = """How the sizes are counted (MB = 10^6 bytes):

- **parameters**: the network's weights as a dense model has them (`paper.model_size_report`:
  the frozen W, frozen biases and embedding; not the mask scores, which are training state);
  **float32 MB** = 4 bytes each.
- **1-bit mask MB**: one bit per masked element (every Dense/Conv2D/LSTM kernel), packed per tensor
  (`ceil(n / 8)` bytes): what a FedMask client uploads per round before pruning.
- **pruned**: one-shot pruning keeps `max(1, round(p_r * n))` elements of each weight tensor of the
  last `L` masked layers (`L` = 8 for VGG-16, 2 otherwise; the runner's setting), p_r = {p};
  **removed** = the elements it drops for good.
- **pruned float32 MB** = 4 bytes × (parameters − removed): the values of the pruned model; their
  positions are the pruning mask (next but one column), not counted here.
- **pruned 1-bit mask MB**: one bit per element that is still kept (the pruned layers' kept
  elements only): pruned positions cost nothing to send after a client's first round, because
  the server holds each client's pruning mask from that first upload.
- **pruning mask MB (once)**: that first upload, one bit per element of the pruned layers.
- **as implemented**: what `fedmask_tff` measures in a run today: uplink = the full packed masks
  every round (pruned positions are still sent, as zero bits; plus the pruning masks in a client's
  first round); downlink = one float32 per kept element (32 × kept bits).

The paper's Table 5 is below, quoted from the paper (Li et al., SenSys 2021, camera-ready PDF).
Its "Baseline" sizes are 4 bytes per float32 parameter of larger networks than ours: the
ImageNet-style VGG-16 classifier (25088-4096-4096-classes, i.e. 224×224 inputs) rather than the
CIFAR one we build (512-512-classes), and a HAR MLP on the 561 UCI-HAR features. The column
"parameters that give it" is computed here, not quoted; it reproduces the paper's Baseline MB to
the printed digits. The paper's FedMask column is not explained by pruning alone (keeping 20 % of
the last 8 VGG-16 layers would leave 116.8 MB, not 365.30), and its text does not say how it was
counted, so compare ratios with care.
"""

# The paper's Table 5 (MB): FedMask, Baseline, BNN-FedAvg, quoted from the paper's PDF.
PAPER_TABLE5 = (("IC-CIFAR10", 365.30, 537.21, 16.78), ("IC-EMNIST", 364.72, 538.09, 16.82),
                ("HAR", 2.69, 4.41, 0.14), ("NCP", 0.92, 1.53, 0.05))


def _dense_parameters(sizes) -> int:
  """Weights and biases of a chain of dense layers ``sizes[0] -> sizes[1] -> ...``."""
  return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def _vgg16_imagenet_parameters(classes: int) -> int:
  """VGG-16 (configuration D) with biases and the ImageNet classifier 25088-4096-4096-classes."""
  from fedmask_tff.models import paper
  convs, channels = 0, 3
  for c in paper.VGG16_FEATURES:
    if c != "M":
      convs += 9 * channels * c + c
      channels = c
  return convs + _dense_parameters((7 * 7 * 512, 4096, 4096, classes))


def paper_table5_rows() -> list[dict]:
  explained = {"IC-CIFAR10": ("VGG-16, ImageNet classifier, 10 classes", _vgg16_imagenet_parameters(10)),
               "IC-EMNIST": ("VGG-16, ImageNet classifier, 64 classes", _vgg16_imagenet_parameters(64)),
               "HAR": ("MLP 561-1024-512-6", _dense_parameters((561, 1024, 512, 6)))}
  rows = []
  for task, fedmask, baseline, bnn in PAPER_TABLE5:
    label, params = explained.get(task, ("not inferred", None))
    rows.append({"task": task, "fedmask_mb": fedmask, "baseline_mb": baseline, "bnn_fedavg_mb": bnn,
                 "fedmask_over_baseline": fedmask / baseline, "baseline_over_bnn": baseline / bnn,
                 "baseline_network": label, "baseline_network_parameters": params,
                 "baseline_network_float32_mb": None if params is None else 4 * params / MB})
  return rows


def paper_table5_markdown() -> str:
  lines = ["**The paper's Table 5** (MB, quoted) and the float32 parameters that give its Baseline "
           "column (computed here):", "",
           "| task | FedMask | Baseline | BNN-FedAvg | FedMask ÷ Baseline | Baseline ÷ BNN "
           "| parameters that give it | their float32 MB |", "|---|---|---|---|---|---|---|---|"]
  for r in paper_table5_rows():
    params = r["baseline_network_parameters"]
    lines.append(f"| {r['task']} | {r['fedmask_mb']:.2f} | {r['baseline_mb']:.2f} "
                 f"| {r['bnn_fedavg_mb']:.2f} | {r['fedmask_over_baseline']:.3f} "
                 f"| {r['baseline_over_bnn']:.1f} | {r['baseline_network']}"
                 + (f" ({params:,})" if params else "") + " | "
                 + (f"{r['baseline_network_float32_mb']:.2f}" if params else "–") + " |")
  return "\n".join(lines)


def model_size_study(preset: str, out: str) -> str:
  width = FLAGS.model_width if FLAGS["model_width"].present else 1.0
  prune_rate = FLAGS.prune_rate
  if not (math.isfinite(width) and width > 0):
    raise _config_error(f"--model_width must be > 0, got {width}")
  if not 0 < prune_rate <= 1:
    raise _config_error(f"--prune_rate (the fraction kept) must be in (0, 1], got {prune_rate}")
  os.makedirs(out, exist_ok=True)
  rows = []
  for i, (label, name, shape, classes) in enumerate(SIZE_MODELS, start=1):
    _log(f"model {i}/{len(SIZE_MODELS)} {label}: building at width {width:g} ...")
    rows.append(size_row(label, name, shape, classes, width, prune_rate))
  lines = [f"**model_size** study (cf. FedMask Table 5): masked models at width {width:g}, "
           f"p_r = {prune_rate:g}; no training.", "",
           "| model | input | parameters | float32 MB | 1-bit mask MB | float32 ÷ mask | pruned layers "
           "| removed | pruned float32 MB | pruned 1-bit mask MB | pruning mask MB (once) "
           "| downlink MB/round as implemented |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {'×'.join(map(str, r['input_shape']))} / {r['classes']} "
                 f"| {r['parameters']:,} | {r['float32_mb']:.4g} | {r['mask_mb']:.4g} "
                 f"| {r['compression']:.1f} | {r['pruned_layers']} | {r['removed_parameters']:,} "
                 f"| {r['pruned_float32_mb']:.4g} | {r['pruned_mask_mb']:.4g} "
                 f"| {r['pruning_mask_mb_once']:.4g} | {r['downlink_mb_per_round_as_implemented']:.4g} |")
  text = ("\n".join(lines) + "\n\n" + SIZE_NOTES.replace("{p}", f"{prune_rate:g}") + "\n"
          + paper_table5_markdown() + "\n")
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(text)
  write_raw(out, {"study": "model_size", "preset": preset, "width": width, "prune_rate": prune_rate,
                  "mb_bytes": MB, "paper_table5": paper_table5_rows(), "models": rows},
            rows, SIZE_COLUMNS)
  plt = _pyplot()
  import numpy as np
  fig, ax = plt.subplots(figsize=(10, 4.8))
  keys = (("float32_mb", "float32"), ("pruned_float32_mb", f"float32, pruned (p_r={prune_rate:g})"),
          ("mask_mb", "1-bit mask"), ("pruned_mask_mb", "1-bit mask, pruned (kept positions)"))
  x = np.arange(len(rows))
  for j, (key, label) in enumerate(keys):
    ax.bar(x + (j - 1.5) * 0.2, [r[key] for r in rows], 0.2, label=label)
  ax.set_xticks(x)
  ax.set_xticklabels([r["model"] for r in rows], fontsize=8)
  ax.set_yscale("log")
  ax.set_ylabel("MB (10^6 bytes, log)")
  ax.set_title(f"Model size (cf. FedMask Table 5), width {width:g}", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "figure.png"), dpi=110)
  plt.close(fig)
  return text


# --- Main -------------------------------------------------------------------------------------


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments: {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  from fedmask_tff.simulation import runner
  from fedmask_tff.data import DataError
  try:
    if FLAGS.study not in STUDIES:
      raise runner.ConfigError(f"--study must be one of {', '.join(STUDIES)}, got {FLAGS.study!r}")
    if FLAGS.preset not in PRESETS:
      raise runner.ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {FLAGS.preset!r}")
    out = FLAGS.output_dir if FLAGS["output_dir"].present else os.path.join(
        "runs", "studies", FLAGS.study + ("" if FLAGS.preset == "small" else "_paper"))
    t0 = time.perf_counter()
    if FLAGS.study == "mask_capacity":
      from experiments import mask_capacity
      base = base_config("mask_capacity", FLAGS.preset)
      epochs = FLAGS.epochs[0] if FLAGS.epochs else None
      text = (f"mask_capacity: {base.dataset}, masked vs dense, central training" if FLAGS.dry_run
              else mask_capacity.run_study(base, FLAGS.preset, out, _log, epochs))
    elif FLAGS.study == "model_size" and FLAGS.dry_run:
      text = f"model_size: builds {', '.join(m[0] for m in SIZE_MODELS)}; no training"
    elif FLAGS.study == "model_size":
      text = model_size_study(FLAGS.preset, out)
    else:
      text = training_study(FLAGS.study, FLAGS.preset, out)
    print(text)
    if FLAGS.dry_run:
      return
    _log(f"{FLAGS.study}: done in {time.perf_counter() - t0:.1f} s; {out}/table.md, figure.png, "
         "study.json, study.csv")
  except (runner.ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("interrupted: every finished round is saved; rerun the same command to resume",
          file=sys.stderr)
    sys.exit(130)
  except FloatingPointError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
