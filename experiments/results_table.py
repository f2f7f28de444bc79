"""The README's results table, made from run folders: ``python -m experiments.results_table``.

Reads every finished run under ``--runs`` (an ``experiments.run`` output folder, an
``experiments.compare`` folder with one run per algorithm, or a folder of those, searched
recursively), and the rows of ``--recorded`` (a JSON file of rows measured earlier whose run
folders are gone: each with its command, date and commit), and writes one Markdown table:
per task and algorithm the personalized test accuracy (example-weighted), its mean over
clients, the per-client minimum and 10th percentile, the bits per parameter each client sent
up and received down per round (from the payloads), the paper's Figure 10 number for that
task and algorithm (read off its plots, the paper's own set-up), the date (when the run's
``results.json`` was last written) and the command that made the row, rebuilt from the run's
settings (those that differ from the defaults). A run replaces a recorded row of the same task
and algorithm.

``--readme=README.md`` writes the table between the lines ``<!-- results-table:begin -->``
and ``<!-- results-table:end -->``; ``--output=FILE.md`` writes it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys
from typing import Optional

import numpy as np

BEGIN, END = "<!-- results-table:begin -->", "<!-- results-table:end -->"
# Figure 10 of the paper, read off its plots (personalized accuracy, %, about +-1 point).
PAPER_FIG10 = {
    "IC-CIFAR10": {"fedmask": 83, "per_fedavg": 80, "lg_fedavg": 77, "fedavg": 58, "topk": 54,
                   "standalone": 65, "bnn_fedavg": 21},
    "IC-EMNIST": {"fedmask": 90, "per_fedavg": 89, "lg_fedavg": 88, "fedavg": 84, "topk": 82,
                  "standalone": 66, "bnn_fedavg": 53},
    "HAR": {"fedmask": 99.5, "per_fedavg": 99.3, "lg_fedavg": 99.1, "fedavg": 97.4, "topk": 97,
            "standalone": 91.6, "bnn_fedavg": 89.3},
    "NCP": {"fedmask": 58.5, "per_fedavg": 57.5, "lg_fedavg": 57, "fedavg": 54, "topk": 51,
            "standalone": 35, "bnn_fedavg": 25},
}
PAPER_TASK = {"cifar10": "IC-CIFAR10", "emnist": "IC-EMNIST", "femnist_leaf": "IC-EMNIST",
              "har": "HAR", "har_features": "HAR", "shakespeare": "NCP", "shakespeare_leaf": "NCP",
              "shakespeare_h5": "NCP"}
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "har": "UCI-HAR", "har_features": "UCI-HAR features",
                 "femnist_leaf": "FEMNIST (LEAF)", "emnist": "EMNIST", "cifar10": "CIFAR-10",
                 "shakespeare": "Shakespeare", "shakespeare_leaf": "Shakespeare (LEAF)",
                 "shakespeare_h5": "Shakespeare (HDF5)"}
ALGORITHM_ORDER = ("fedmask", "fedpm", "local_masks", "standalone", "fedavg", "topk", "bnn_fedavg",
                   "per_fedavg", "lg_fedavg")
DEFAULT_ALGORITHMS = ("fedmask", "fedpm", "local_masks", "standalone", "fedavg")
DATASET_ORDER = ("fashion_mnist", "har", "har_features", "femnist_leaf", "emnist", "cifar10")
# What defines a task (the rows of one task are comparable); other settings label the algorithm.
TASK_SETTINGS = ("dataset", "partition", "classes_per_client", "dirichlet_alpha", "num_clients",
                 "clients_per_round", "rounds", "local_epochs", "model", "model_width",
                 "examples_per_client", "validation_fraction", "test_fraction", "seed")
# Settings that change no result (or are the row's own): never in a label or a command.
UNSHOWN = ("algorithm", "learning_rate", "output_dir", "partition_file", "data_dir", "eval_every",
           "eval_batch_size", "overwrite", "progress", "max_concurrent_clients", "workers",
           "worker_memory_limit_mb", "client_datasets", "client_data_dir", "client_states")


class TableError(ValueError):
  """A run folder or record that cannot make a row; the message names it."""


@dataclasses.dataclass
class Row:
  settings: dict            # every RunConfig setting of the run (defaults filled in)
  algorithm: str
  accuracy: Optional[float] = None
  client_mean: Optional[float] = None
  client_min: Optional[float] = None
  client_p10: Optional[float] = None
  up: Optional[float] = None      # bits per parameter per client per round, uplink
  down: Optional[float] = None
  date: str = ""
  command: str = ""
  note: str = ""


def _defaults() -> dict:
  from fedmask_tff.simulation.run_config import RunConfig
  return dataclasses.asdict(RunConfig())


def _model(s: dict) -> str:
  if s.get("model"):
    return s["model"]
  from fedmask_tff.models.paper import DEFAULT_MODEL_FOR_DATASET
  return DEFAULT_MODEL_FOR_DATASET.get(s["dataset"], "cnn")


def _unused(s: dict) -> set:
  from fedmask_tff.simulation.run_config import RunConfig, unused_settings
  known = {k: v for k, v in s.items() if k in _defaults()}
  return unused_settings(RunConfig(**known))


def task_key(s: dict) -> tuple:
  return tuple(_model(s) if k == "model" else s.get(k) for k in TASK_SETTINGS)


def task_label(s: dict) -> str:
  d = s["dataset"]
  words = [DATASET_NAMES.get(d, d)]
  if d == "fashion_mnist":
    words.append(f"Dirichlet {s['dirichlet_alpha']:g}" if s["partition"] == "dirichlet"
                 else f"{s['classes_per_client']} classes a client")
  elif d == "cifar10":
    words.append(f"{s['classes_per_client']} classes a client"
                 + (f", {s['examples_per_client']} examples each" if s["examples_per_client"] else ""))
  width = f" width {s['model_width']:g}" if s["model_width"] != 1 else ""
  words.append(f"{s['num_clients']} clients, {s['clients_per_round']} a round, {s['rounds']} rounds, "
               f"{s['local_epochs']} local epoch{'s' if s['local_epochs'] != 1 else ''}, {_model(s)}{width}")
  if s["validation_fraction"]:
    words.append(f"validation data ({s['validation_fraction']:g})")
  if s["seed"]:
    words.append(f"seed {s['seed']}")
  return ", ".join(words)


def flag_text(name: str, value) -> str:
  if isinstance(value, bool):
    return f"--{name}" if value else f"--no{name}"
  if isinstance(value, float):
    return f"--{name}={value:g}"
  return f"--{name}={value}"


def changed_flags(s: dict, skip=()) -> list[str]:
  """The flags that differ from the defaults, in RunConfig's order (unused ones left out)."""
  defaults, ignore = _defaults(), set(UNSHOWN) | set(skip) | _unused(s)
  return [flag_text(k, s[k]) for k in defaults
          if k not in ignore and s.get(k) is not None and s.get(k, defaults[k]) != defaults[k]]


def algorithm_label(row: Row) -> str:
  extra = changed_flags(row.settings, skip=TASK_SETTINGS)
  if row.settings.get("learning_rate") is not None:
    extra.append(f"lr {row.settings['learning_rate']:g}")
  return row.algorithm + (f" ({', '.join(extra)})" if extra else "")


def _percentiles(per_client: dict):
  values = list(per_client.values())
  if not values:
    return None, None
  q = np.percentile(values, [0, 10])
  return float(q[0]), float(q[1])


def row_from_results(results: dict, path: str) -> Row:
  """A row from a finished run's ``results.json`` (the file at ``path``)."""
  cfg, final, totals = results["config"], results["final"], results["totals"]
  settings = {**_defaults(), **{k: v for k, v in cfg.items() if k in _defaults()}}
  params = cfg.get("model_parameters")
  up = totals.get("uplink_bits_per_param")
  down = totals.get("downlink_bits_per_param")
  if up is None and params:
    up, down = (totals["uplink_bits_per_client_round"] / params,
                totals["downlink_bits_per_client_round"] / params)
  low, p10 = _percentiles(final.get("accuracy_per_client") or {})
  date = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
  return Row(settings=settings, algorithm=results["algorithm"], accuracy=final["accuracy"],
             client_mean=final.get("accuracy_client_mean"), client_min=low, client_p10=p10,
             up=up, down=down, date=date.strftime("%Y-%m-%d"))


def _command(folder: str, runs: list) -> str:
  """The command that makes ``runs`` (rows) in ``folder``: one compare, or one run each."""
  if os.path.isfile(os.path.join(folder, "comparison.json")):
    algorithms = [r.algorithm for r in runs]
    rates = [f"{r.algorithm}={r.settings['learning_rate']:g}" for r in runs
             if r.settings.get("learning_rate") is not None]
    words = [".venv/bin/python -m experiments.compare", f"--algorithms={','.join(algorithms)}",
             f"--output_dir={folder}", *changed_flags(runs[0].settings)]
    if rates:
      words.append(f"--learning_rates={','.join(rates)}")
    return " ".join(words)
  (run,) = runs
  rate = run.settings.get("learning_rate")
  return " ".join([".venv/bin/python -m experiments.run", f"--algorithm={run.algorithm}",
                   f"--output_dir={folder}", *changed_flags(run.settings),
                   *([flag_text("learning_rate", rate)] if rate else [])])


def rows_from_runs(paths: list[str]) -> list[Row]:
  """Every complete run under ``paths``; unfinished ones are named on stderr and left out."""
  found = {}
  for top in paths:
    if not os.path.isdir(top):
      raise TableError(f"--runs: {top} is not a folder")
    for folder, _, files in sorted(os.walk(top)):
      if "results.json" not in files:
        continue
      path = os.path.join(folder, "results.json")
      try:
        with open(path) as f:
          results = json.load(f)
      except (OSError, ValueError) as e:
        raise TableError(f"{path}: {e}") from None
      if not results.get("complete"):
        print(f"[results_table] {folder}: not complete, left out", file=sys.stderr)
        continue
      parent = os.path.dirname(folder)
      group = parent if os.path.isfile(os.path.join(parent, "comparison.json")) else folder
      found.setdefault(group, []).append(row_from_results(results, path))
  rows = []
  for group, runs in found.items():
    runs.sort(key=lambda r: _algorithm_rank(r.algorithm))
    for r in runs:  # a compare folder's runs differ only in algorithm and learning rate
      r.command = _command(group, runs)
    rows.extend(runs)
  return rows


def rows_from_record(path: str) -> list[Row]:
  """Rows measured earlier (``--recorded``): each group has the command, date, commit and the
  settings of its runs (RunConfig fields that differ from the defaults); each row its algorithm,
  its own settings and the numbers that were kept (missing ones are shown as n/r; a number
  given as a string is shown with the digits it was recorded with)."""
  with open(path) as f:
    record = json.load(f)
  rows = []
  for g in record["groups"]:
    for r in g["rows"]:
      settings = {**_defaults(), **g.get("settings", {}), **r.get("settings", {})}
      unknown = set(settings) - set(_defaults())
      if unknown:
        raise TableError(f"{path}: unknown settings {sorted(unknown)}")
      rows.append(Row(settings=settings, algorithm=r["algorithm"], accuracy=r.get("accuracy"),
                      client_mean=r.get("client_mean"), client_min=r.get("client_min"),
                      client_p10=r.get("client_p10"), up=r.get("up"), down=r.get("down"),
                      date=g["date"], command=g["command"],
                      note=f"commit {g['commit']}" + (f"; {g['note']}" if g.get("note") else "")))
  return rows


def _algorithm_rank(name: str) -> int:
  return ALGORITHM_ORDER.index(name) if name in ALGORITHM_ORDER else len(ALGORITHM_ORDER)


def merge(recorded: list[Row], measured: list[Row], algorithms=DEFAULT_ALGORITHMS) -> list[Row]:
  """Recorded rows, each replaced by a run of the same task and algorithm label; sorted by task
  (data set order, then label) and algorithm."""
  table = {}
  for row in recorded + measured:
    if row.algorithm in algorithms:
      table[(task_key(row.settings), algorithm_label(row))] = row
  def order(row):
    d = row.settings["dataset"]
    rank = DATASET_ORDER.index(d) if d in DATASET_ORDER else len(DATASET_ORDER)
    return (rank, task_label(row.settings), _algorithm_rank(row.algorithm), algorithm_label(row))
  return sorted(table.values(), key=order)


def _num(value, spec=".4f") -> str:
  """A recorded value given as a string is shown as it was recorded (its digits)."""
  if isinstance(value, str):
    return value
  return "n/r" if value is None else format(value, spec)


def _bits(value) -> str:
  if value is None or isinstance(value, str):
    return _num(value)
  return "0" if value == 0 else (f"{value:.0f}" if value >= 31.995 else f"{value:.2f}")


def _bits_pair(row: Row) -> str:
  return "n/r" if row.up is None and row.down is None else f"{_bits(row.up)} / {_bits(row.down)}"


def paper_cell(row: Row) -> str:
  task = PAPER_TASK.get(row.settings["dataset"])
  value = PAPER_FIG10.get(task, {}).get(row.algorithm)
  return "–" if value is None else f"{value / 100:.3f} ({task})"


def check_output_dirs_differ(commands: list[tuple[str, str]]) -> None:
  """Two different commands of the table must not write one ``--output_dir``: a user who runs
  both in order gets "holds a run with other settings" from the second (CI runs them)."""
  seen = {}
  for letter, command in commands:
    m = re.search(r"--output_dir=(\S+)", command)
    if not m:
      continue
    if m.group(1) in seen:
      raise TableError(f"commands ({seen[m.group(1)]}) and ({letter}) both write --output_dir="
                       f"{m.group(1)}: give one of them (in --recorded, or its run) another folder")
    seen[m.group(1)] = letter


def render(rows: list[Row]) -> str:
  """The Markdown table, then one line per command (a letter in the table's last column)."""
  letters, commands = {}, []
  lines = ["| task | algorithm | accuracy | client mean | client min | client 10th pct. "
           "| bits/param/round up / down | paper, Fig. 10 | date | command |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  last_task = None
  for row in rows:
    key = (row.command, row.date, row.note)
    if key not in letters:
      letters[key] = chr(ord("a") + len(letters)) if len(letters) < 26 else str(len(letters) + 1)
      commands.append((letters[key], *key))
    task = task_label(row.settings)
    lines.append(f"| {task if task != last_task else ''} | {algorithm_label(row)} | {_num(row.accuracy)} "
                 f"| {_num(row.client_mean)} | {_num(row.client_min, '.3f')} | {_num(row.client_p10, '.3f')} "
                 f"| {_bits_pair(row)} | {paper_cell(row)} | {row.date} "
                 f"| ({letters[key]}) |")
    last_task = task
  lines.append("")
  check_output_dirs_differ([(letter, command) for letter, command, _, _ in commands])
  for letter, command, date, note in commands:
    lines.append(f"({letter}) `{command}`" + (f" ({note})" if note else "") + "  ")
  return "\n".join(lines).rstrip() + "\n"


def write_between_markers(path: str, table: str) -> None:
  with open(path) as f:
    text = f.read()
  pattern = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.S)
  if not pattern.search(text):
    raise TableError(f"{path} has no lines {BEGIN} ... {END} to write the table between")
  text = pattern.sub(lambda _: f"{BEGIN}\n{table}{END}", text, count=1)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.results_table",
                              description=__doc__.split("\n")[0])
  p.add_argument("--runs", default="", help="comma-separated folders: run folders, compare folders, "
                 "or folders of those (searched recursively)")
  p.add_argument("--recorded", default=None, help="JSON of rows measured earlier (their run folders "
                 "are gone), with command, date and commit")
  p.add_argument("--algorithms", default=",".join(DEFAULT_ALGORITHMS),
                 help="which algorithms the table shows, in any order")
  p.add_argument("--readme", default=None, help=f"write the table between {BEGIN} and {END}")
  p.add_argument("--output", default=None, help="write the table alone to this Markdown file")
  args = p.parse_args(argv)
  try:
    measured = rows_from_runs([r for r in args.runs.split(",") if r])
    recorded = rows_from_record(args.recorded) if args.recorded else []
    rows = merge(recorded, measured, tuple(a for a in args.algorithms.split(",") if a))
    if not rows:
      raise TableError("no rows: give --runs with finished runs or --recorded")
    table = render(rows)
    if args.readme:
      write_between_markers(args.readme, table)
    if args.output:
      with open(args.output, "w") as f:
        f.write(table)
  except (TableError, OSError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not args.readme and not args.output:
    print(table, end="")
  print(f"[results_table] {len(rows)} rows ({len(measured)} from runs, {len(recorded)} recorded)",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
