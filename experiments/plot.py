"""Command line: ``python -m experiments.plot RUN_DIR [RUN_DIR ...] --output=FILE.png``.

Draws any set of runs (each an ``--output_dir`` of ``experiments.run``, ``compare`` or a study)
side by side: personalized accuracy against rounds, and against cumulative communication per
client (uplink + downlink, MB; the paper's Fig. 10 axes). Accuracy points are the rounds a run
evaluated (``--eval_every``) and its final evaluation; bits are those of the run's payloads
(``results.json``). Each line is labelled by its algorithm and the settings in which the runs
differ or leave the defaults. A run that sent nothing (Standalone, ``local_masks``) is a dashed level on the bits axis.
Also writes ``FILE.csv`` with the plotted points.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

# Settings never worth a label: where outputs went, and how the run was executed.
_UNLABELLED = {"output_dir", "overwrite", "progress", "verbose", "workers", "max_concurrent_clients",
               "worker_memory_limit_mb", "client_datasets", "client_data_dir", "client_states", "eval_every",
               "eval_batch_size", "partition_file", "data_dir"}


class PlotError(ValueError):
  """A run directory that cannot be plotted; the message names it and why."""


def load_results(run_dir: str) -> dict:
  path = os.path.join(run_dir, "results.json")
  if not os.path.isdir(run_dir):
    raise PlotError(f"{run_dir} is not a directory")
  if not os.path.isfile(path):
    raise PlotError(f"{path} is missing (is {run_dir} the --output_dir of a run? a compare or "
                    "study folder holds one run per subfolder)")
  try:
    with open(path) as f:
      results = json.load(f)
    results["rounds"], results["config"]  # pylint: disable=pointless-statement
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise PlotError(f"{path} is unreadable or not a run's results ({e})") from e
  if not results["rounds"]:
    raise PlotError(f"{path} has no finished round")
  return results


def labels(all_results: list[dict]) -> tuple[list[str], str]:
  """A label per run, and the settings common to every run (for the title).

  A run's label is its algorithm plus the settings it uses in which the runs differ, or that
  leave the default and only some runs use; settings every run uses with one non-default value
  go to the common line. A setting a run's results predate counts as its default."""
  from fedmask_tff.simulation import run_config
  default = run_config.RunConfig()
  fields = [f for f in run_config.RunConfig.__dataclass_fields__ if f not in _UNLABELLED | {"algorithm"}]
  configs = [{f: r["config"].get(f, getattr(default, f)) for f in fields + ["algorithm"]}
             for r in all_results]
  for c, r in zip(configs, all_results):  # the model a run built, where --model was left unset
    c["model"] = c["model"] or r["config"].get("model_used")
  unused = [run_config.unused_settings(run_config.RunConfig(**c)) for c in configs]
  per_run, common = [], []
  for f in fields:
    users = [c for c, u in zip(configs, unused) if f not in u]
    values = {json.dumps(c[f]) for c in users}
    if len(values) > 1:
      per_run.append(f)
    elif values and values != {json.dumps(getattr(default, f))}:
      (common if len(users) == len(configs) else per_run).append(f)
  out = []
  for r, c, u in zip(all_results, configs, unused):
    parts = [f"{f}={c[f]}" for f in per_run if f not in u]
    label = c["algorithm"] + (f" ({', '.join(parts)})" if parts else "")
    if not r.get("complete"):
      label += f" [unfinished: round {r['rounds'][-1]['round']}]"
    out.append(label)
  return out, ", ".join(f"{f}={configs[0][f]}" for f in common)


def points(results: dict) -> list[dict]:
  """``[{round, accuracy, cumulative_mb_per_client}]`` at every evaluated round."""
  from experiments.study_reports import run_record
  if not results.get("complete"):  # no final evaluation yet: the rounds evaluated so far
    results = dict(results, final={"accuracy": None, "accuracy_client_mean": None,
                                   "evaluated_clients": 0},
                   totals={k: 0 for k in ("rounds", "uplink_bits_per_client_round",
                                          "downlink_bits_per_client_round",
                                          "train_flops_per_client_round", "wall_s")})
  return [{"round": s["round"], "accuracy": s["accuracy"],
           "cumulative_mb_per_client": s["cumulative_mb_per_client"]}
          for s in run_record("", {}, results)["series"] if s["accuracy"] is not None]


def plot(run_dirs: list[str], output: str) -> list[dict]:
  """Draws the runs into ``output`` (PNG) and writes the points to ``output``'s ``.csv``."""
  all_results = [load_results(d) for d in run_dirs]
  names, common = labels(all_results)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (by_round, by_bits) = plt.subplots(1, 2, figsize=(13, 5))
  rows = []
  for run_dir, results, name in zip(run_dirs, all_results, names):
    pts = points(results)
    if not pts:
      raise PlotError(f"{run_dir}: no round was evaluated yet (an unfinished run plots only with "
                      "--eval_every)")
    line, = by_round.plot([p["round"] for p in pts], [p["accuracy"] for p in pts], marker="o",
                          ms=3, label=name)
    if pts[-1]["cumulative_mb_per_client"] <= 0:
      by_bits.axhline(pts[-1]["accuracy"], ls="--", lw=1, color=line.get_color(),
                      label=f"{name}: 0 bits sent")
    else:
      by_bits.plot([p["cumulative_mb_per_client"] for p in pts], [p["accuracy"] for p in pts],
                   marker="o", ms=3, color=line.get_color(), label=name)
    rows += [dict(run_dir=run_dir, label=name, **p) for p in pts]
  evaluated_on = {(r.get("final") or {}).get("evaluated_on", "test") for r in all_results}
  ylabel = f"personalized {' / '.join(sorted(evaluated_on))} accuracy"
  by_round.set_xlabel("round")
  by_bits.set_xlabel("cumulative communication per client, uplink + downlink (MB, log)")
  if any(p["cumulative_mb_per_client"] > 0 for p in rows):
    by_bits.set_xscale("log")
  for ax in (by_round, by_bits):
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  by_bits.legend(fontsize=7, loc="lower right")
  datasets = sorted({r.get("dataset", "?") for r in all_results})
  fig.suptitle(f"{', '.join(datasets)}: {len(run_dirs)} run(s)" + (f"\n{common}" if common else ""),
               fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  fig.savefig(output, dpi=120)
  plt.close(fig)
  with open(os.path.splitext(output)[0] + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["run_dir", "label", "round", "accuracy",
                                           "cumulative_mb_per_client"])
    writer.writeheader()
    writer.writerows(rows)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.plot", description=__doc__.split("\n")[0])
  p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's --output_dir")
  p.add_argument("--output", required=True, help="the PNG to write (a .csv of the points beside it)")
  p.add_argument("--verbose", action="store_true", help="show TensorFlow's C++ log lines")
  args = p.parse_args(argv)
  if not args.output.lower().endswith(".png"):
    print(f"error: --output must name a .png file, got {args.output!r}", file=sys.stderr)
    return 2
  try:
    rows = plot(args.run_dirs, args.output)
  except PlotError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.output} and {os.path.splitext(args.output)[0]}.csv "
        f"({len(args.run_dirs)} runs, {len(rows)} points)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
