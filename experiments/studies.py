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
  pruning, for the paper's models at width 1 (no training: the models are only built);
* ``paper_table`` (Fig. 10, §4.4): every task runnable here with all eight algorithms, beside the
  paper's accuracies and communication ratios (``experiments.paper_table``).

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

import dataclasses
import json
import os
import sys
import time

from absl import app, flags

from experiments import compare, model_size, paper_table, study_reports  # compare defines every flag of experiments.run, --algorithms, --learning_rates
from experiments import run as run_cli  # noqa: F401  (the run flags; also defined via compare)
from fedmask_tff.algorithms import ALGORITHMS

FLAGS = flags.FLAGS
STUDIES = ("communication", "computation", "devices", "epochs", "fedmask_ablation", "mask_capacity",
           "model_size", "paper_table")
PRESETS = ("small", "paper")
flags.DEFINE_string("study", None, f"Which study: one of {', '.join(STUDIES)}.")
flags.DEFINE_string("preset", "small", "small (minutes, Fashion-MNIST) or paper (the paper's set-up).")
flags.DEFINE_list("devices", None, "devices study: participating devices (clients per round) to "
                  "compare (default: the preset's; paper 20,40,80).")
# --dry_run (defined with the run flags): print the planned runs and their settings, run nothing.
flags.DEFINE_list("epochs", None, "epochs study: local epochs to compare (default: the preset's; "
                  "paper 1,2,5, small 1,2).")
flags.DEFINE_list("variants", None, "fedmask_ablation study: which of its variants to run, in this "
                  "order (default: all of ABLATION_VARIANTS).")

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
# fedmask_ablation: FedMask's own default p_r (unset: 0.5 for sampled masks, 0.2 for the
# score-threshold uploads), so its variants differ from the default in what they name only.
SMALL_STUDY = {"communication": dict(eval_every=1), "computation": {},
               "devices": dict(eval_every=2), "epochs": {}, "fedmask_ablation": dict(prune_rate=None),
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
               "epochs": {}, "fedmask_ablation": dict(prune_rate=None), "mask_capacity": {}}

# The fedmask_ablation study: FedMask's parts one at a time on one partition, beside the simple
# things (how the defaults were chosen). Each variant is (run name, RunConfig changes); FedMask's own settings not
# named take the run's values (the defaults: upload=sampled, Adam 0.1, N(0, 1) scores, theta
# down in 2 bits, the pruned head the device's own, evidence reset every round).
ABLATION_VARIANTS = (
    ("standalone", dict(algorithm="standalone")),
    ("fedavg", dict(algorithm="fedavg")),
    ("local_masks", dict(algorithm="local_masks")),
    ("fedpm", dict(algorithm="fedpm")),
    ("sampled_threshold_forward", dict(algorithm="fedmask", training_forward="threshold")),
    ("sampled_allones_init", dict(algorithm="fedmask", score_init_mean=0.05, score_init_std=0.0)),
    ("sampled_sgd", dict(algorithm="fedmask", optimizer="sgd", learning_rate=30.0)),
    ("sampled_shared_head", dict(algorithm="fedmask", personal_head=False)),
    ("sampled_head_from_theta", dict(algorithm="fedmask", head_start="theta")),
    ("sampled_all_from_theta", dict(algorithm="fedmask", personal_layers=0)),
    ("sampled_prune02", dict(algorithm="fedmask", prune_rate=0.2)),  # the paper's p_r
    ("sampled_prune05", dict(algorithm="fedmask", prune_rate=0.5)),
    ("sampled_all_from_theta_prune05", dict(algorithm="fedmask", personal_layers=0, prune_rate=0.5)),
    ("sampled_evidence_kept", dict(algorithm="fedmask", evidence_decay=0.5)),
    ("sampled_1bit_down", dict(algorithm="fedmask", downlink_bits=1)),
    ("sampled_8bit_down", dict(algorithm="fedmask", downlink_bits=8)),
    ("sampled_float_down", dict(algorithm="fedmask", downlink_bits=32)),
    ("score_sign_previous_default", dict(algorithm="fedmask", upload="score_sign")),
    ("local_masks_threshold_recipe", dict(algorithm="local_masks", upload="mask")),
    ("mask_scaled_logit", dict(algorithm="fedmask", upload="mask", score_restart="scaled_logit")),
    ("paper_algorithm1", dict(algorithm="fedmask", upload="mask", score_restart="scaled_logit",
                              global_mask=True, prune_at_init=True)),
    ("mask_disagree_shift", dict(algorithm="fedmask", upload="mask", score_restart="disagree_shift")),
    ("mask_disagree_shift_1bit_down", dict(algorithm="fedmask", upload="mask",
                                           score_restart="disagree_shift", downlink_bits=1)),
    ("bernoulli_fedpm", dict(algorithm="fedmask", upload="bernoulli", score_restart="scaled_logit",
                             restart_scale=1.0)),
    ("score_sign_shared_head", dict(algorithm="fedmask", upload="score_sign",
                                    personal_head=False)),
    ("fedmask_default", dict(algorithm="fedmask")),
)


def ablation_variants(names=None) -> list:
  """``[(name, changes)]``: ``ABLATION_VARIANTS``, or the ones ``names`` lists, in its order."""
  if not names:
    return list(ABLATION_VARIANTS)
  known = dict(ABLATION_VARIANTS)
  unknown = [n for n in names if n not in known]
  if unknown or len(set(names)) != len(names):
    raise _config_error(f"--variants: unknown or repeated {unknown or names}; valid: "
                        f"{', '.join(known)}")
  return [(n, known[n]) for n in names]


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
  from fedmask_tff.simulation import run_config
  return run_config.ConfigError(message)


# --- Planning and running ----------------------------------------------------------------------


def base_config(study: str, preset: str):
  """The study's RunConfig before the per-run changes: defaults < preset < given flags."""
  from fedmask_tff.simulation.run_config import RunConfig
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
            for name, changes in ablation_variants(FLAGS.variants)]
  if FLAGS["variants"].present:
    raise _config_error("--variants selects fedmask_ablation's variants; it does not apply to "
                        f"the {study} study")
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


PARTITION_KEYS = ("dataset", "data_dir", "partition", "classes_per_client", "dirichlet_alpha",
                  "num_clients", "test_fraction", "seed")


def ensure_partition(base, out: str):
  """Writes ``<out>/partition.json`` once (Fashion-MNIST); returns the config that uses it."""
  from fedmask_tff.simulation import run_config, runner
  from fedmask_tff.data import partition_file as partition_file_lib
  if base.dataset not in run_config.POOLED_DATASETS or base.partition_file:
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
        raise run_config.ConfigError(
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
    plan = runner.plan_run(config, replace=base_overwrite())
    if plan.action == "skip":
      _log(f"run {i}/{n} {name}: complete, skipped")
      all_results[name] = plan.results
      continue
    word = {"resume": "resuming", "replace": "replacing the old run"}.get(plan.action, "starting")
    _log(f"run {i}/{n} {name}: {word} ({config.output_dir})")
    t0 = time.perf_counter()
    all_results[name] = runner.run(plan.config)
    _log(f"run {i}/{n} {name}: done in {time.perf_counter() - t0:.1f} s, accuracy "
         f"{all_results[name]['final']['accuracy']:.4f}")
  return all_results


def training_study(study: str, preset: str, out: str) -> str:
  from fedmask_tff.simulation import run_config
  base = base_config(study, preset)
  runs = plan_runs(study, preset, base, out)
  for _, _, config in runs:  # every value checked before anything runs
    dataclasses.replace(config, output_dir=os.path.join(out, "_check"), overwrite=True).validate()
  if FLAGS.dry_run:
    lines = [f"{study} ({preset} preset): {len(runs)} runs into {out}",
             "shared settings: " + json.dumps({k: v for k, v in dataclasses.asdict(base).items()
                                               if k not in run_config.RESUME_FREE})]
    lines += [f"  {name}: {json.dumps({'algorithm': c.algorithm, **swept})}" for name, swept, c in runs]
    return "\n".join(lines)
  os.makedirs(out, exist_ok=True)
  _log(f"{study} ({preset} preset): {len(runs)} runs on {base.dataset} into {out}")
  base = ensure_partition(base, out)
  runs = [(name, swept, dataclasses.replace(config, partition_file=base.partition_file))
          for name, swept, config in runs]
  all_results = execute(runs)
  records = [study_reports.run_record(name, swept, all_results[name]) for name, swept, _ in runs]
  settings = {k: v for k, v in dataclasses.asdict(base).items() if k not in run_config.RESUME_FREE}
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
  text = study_reports.training_table(study, records, header)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(text)
  payload = {"study": study, "preset": preset, "settings": settings,
             "sweep": sorted({json.dumps(s, sort_keys=True) for _, s, _ in runs}),
             "runs": records}
  payload["sweep"] = [json.loads(s) for s in payload["sweep"]]
  study_reports.write_raw(out, payload, list(study_reports.series_rows(records)), study_reports.SERIES_COLUMNS)
  study_reports.training_figure(study, records, os.path.join(out, "figure.png"),
                  f"{study_reports.FIGURE_TITLES[study]}: {base.dataset}, {preset} preset")
  return text


# --- Main -------------------------------------------------------------------------------------


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments: {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  from fedmask_tff.simulation import run_config
  from fedmask_tff.data import DataError
  try:
    if FLAGS.study not in STUDIES:
      raise run_config.ConfigError(f"--study must be one of {', '.join(STUDIES)}, got {FLAGS.study!r}")
    if FLAGS.preset not in PRESETS:
      raise run_config.ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {FLAGS.preset!r}")
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
      text = f"model_size: builds {', '.join(m[0] for m in model_size.SIZE_MODELS)}; no training"
    elif FLAGS.study == "model_size":
      width = FLAGS.model_width if FLAGS["model_width"].present else 1.0
      prune_rate = 0.2 if FLAGS.prune_rate is None else FLAGS.prune_rate  # the paper's p_r
      text = model_size.model_size_study(FLAGS.preset, out, width, prune_rate, _log)
    elif FLAGS.study == "paper_table":
      text = paper_table.from_flags(out, plan_runs, execute, ensure_partition, _log)
    else:
      text = training_study(FLAGS.study, FLAGS.preset, out)
    print(text)
    if FLAGS.dry_run:
      return
    _log(f"{FLAGS.study}: done in {time.perf_counter() - t0:.1f} s; {out}/table.md, figure.png, "
         "study.json, study.csv")
  except (run_config.ConfigError, DataError) as e:
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
