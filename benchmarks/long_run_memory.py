"""Memory over a long run: ``python -m benchmarks.long_run_memory [--rounds=500]``.

Runs FedMask for many rounds (``--preset=small``: the embedded default with a small model;
``--preset=har``: the paper's HAR set-up, har_mlp with 1.7 M mask elements) and samples, once a
second, the resident memory (RSS, from /proc) of this driver
process and of TFF's worker process. Writes ``--results`` (every ``--save_every_s`` while it
runs, so a killed run keeps what it measured) with the samples, the worker's RSS just after
each round, the peaks up to ``--checkpoint_round`` (20) and over the run, the number of worker
processes seen (1: never restarted) and ``flat``: whether the worker's RSS after the last round
is within ``--flat_tolerance`` (10 %) of its RSS after ``--checkpoint_round``.
The paper's HAR run: ``--preset=har --rounds=200`` (66 min on 2 cores).
"""

from __future__ import annotations

import json
import os
import sys
import time

import tensorflow as tf  # noqa: F401  (before absl's main, see benchmarks.run)
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 500, "Rounds of the long run.")
flags.DEFINE_integer("checkpoint_round", 20,
                     "The early round compared with the last: the worker's RSS just after it and its "
                     "peak up to it (flat: the last round within --flat_tolerance of it).")
flags.DEFINE_float("flat_tolerance", 0.10,
                   "How far (a fraction) the worker's RSS after the last round may be above its RSS "
                   "after --checkpoint_round for the run to count as flat.")
flags.DEFINE_integer("save_every_s", 60, "Seconds between saves of the measurements so far (a "
                     "killed run keeps what it measured).")
flags.DEFINE_string("output_dir", "runs/long_run_memory", "Run directory.")
flags.DEFINE_string("data_dir", None, "Data directory (default: searched).")
flags.DEFINE_enum("preset", "small", ["small", "har"],
                  "small: Fashion-MNIST, mlp at width 0.5, 1 local epoch; har: UCI-HAR with the "
                  "paper's har_mlp (1.7 M mask elements), 5 local epochs, 20 clients a round.")
flags.DEFINE_integer("num_clients", None, "Clients (default: the preset's).")
flags.DEFINE_integer("clients_per_round", None, "Clients per round (default: the preset's).")
flags.DEFINE_integer("local_epochs", None, "Local epochs (default: the preset's).")
flags.DEFINE_float("worker_memory_limit_mb", 1e9,
                   "The runner's worker restart threshold (default: never restart, so that growth "
                   "shows); each restart is recorded in the samples.")

PRESETS = {
    "small": dict(dataset="fashion_mnist", model="mlp", model_width=0.5, local_epochs=1,
                  num_clients=100, clients_per_round=10),
    "har": dict(dataset="har", model="har_mlp", model_width=1.0, local_epochs=5, num_clients=30,
                clients_per_round=20),
}
flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), "results", "long_run_memory.json"),
                    "Where the measurements go.")


def _rounds_done(output_dir) -> int:
  try:
    with open(os.path.join(output_dir, "results.json")) as f:
      return len(json.load(f)["rounds"])
  except (OSError, ValueError, KeyError):
    return 0


def main(argv):
  del argv
  from fedmask_tff.simulation import run_config
  from benchmarks.sampling import run_sampled
  from fedmask_tff import runtime
  settings = dict(PRESETS[FLAGS.preset])
  for name in ("num_clients", "clients_per_round", "local_epochs"):
    if getattr(FLAGS, name) is not None:
      settings[name] = getattr(FLAGS, name)
  config = run_config.RunConfig(rounds=FLAGS.rounds, data_dir=FLAGS.data_dir,
                                output_dir=FLAGS.output_dir, overwrite=True, progress=False,
                                worker_memory_limit_mb=FLAGS.worker_memory_limit_mb, **settings)
  # A results file of an earlier run here would be read as this run's rounds until replaced.
  if os.path.exists(os.path.join(config.output_dir, "results.json")):
    os.remove(os.path.join(config.output_dir, "results.json"))
  samples, last_save = [], [time.time()]
  t0 = time.time()

  def sample():
    worker = (runtime.local_worker_pids() or [None])[0]
    samples.append({"t": time.time(), "round": _rounds_done(config.output_dir),
                    "driver_rss": runtime.process_rss_mb(os.getpid()) * 2 ** 20,
                    "worker_rss": runtime.process_rss_mb(worker) * 2 ** 20 if worker else 0,
                    "worker_pid": worker})
    if time.time() - last_save[0] >= FLAGS.save_every_s:
      _save(summarize(samples, settings, t0, results=None), FLAGS.results)
      last_save[0] = time.time()

  results = run_sampled(config, sample, 1.0)
  summary = summarize(samples, settings, t0, results)
  _save(summary, FLAGS.results)
  print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2))
  sys.stdout.flush()


def summarize(samples, settings, t0, results) -> dict:
  """The measurements so far; ``results`` is None while the run goes on (a partial record).

  Memory in MB (2**20 bytes) of resident set; ``worker_rss_mb_after_round[r]`` is the first
  sample that saw round r saved.
  """
  from fedmask_tff import runtime
  early, last = FLAGS.checkpoint_round, max([s["round"] for s in samples] or [0])

  def peak(key, upto):
    values = [s[key] for s in samples if s["round"] <= upto]
    return max(values) / 2 ** 20 if values else 0

  after_round = {}
  for s in samples:
    after_round.setdefault(s["round"], s["worker_rss"] / 2 ** 20)
  summary = {
      "settings": dict(settings, preset=FLAGS.preset, rounds=FLAGS.rounds),
      "complete": results is not None,
      "rounds_done": last,
      "worker_allocator": runtime.worker_allocator_env() or "glibc malloc (defaults)",
      "wall_s": time.time() - t0,
      "worker_processes": len({s["worker_pid"] for s in samples if s["worker_pid"]}),
      "worker_rss_mb_after_round": {r: round(v, 1) for r, v in sorted(after_round.items()) if r > 0},
      f"driver_peak_rss_mb_to_round_{early}": peak("driver_rss", early),
      "driver_peak_rss_mb": peak("driver_rss", last),
      f"worker_peak_rss_mb_to_round_{early}": peak("worker_rss", early),
      "worker_peak_rss_mb": peak("worker_rss", last),
  }
  if early in after_round and last > early:
    growth = after_round[last] / after_round[early] - 1
    summary[f"worker_rss_growth_round_{early}_to_{last}"] = round(growth, 4)
    summary["flat"] = growth <= FLAGS.flat_tolerance
  if results is not None:
    summary["worker_restarts"] = sum(bool(r.get("worker_restarted")) for r in results["rounds"])
    summary["accuracy"] = results["final"]["accuracy"]
  summary["samples"] = samples
  return summary


def _save(summary, path):
  """Writes ``summary`` to ``path`` whole or not at all (a temporary file, then a rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=1)
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  app.run(main)
