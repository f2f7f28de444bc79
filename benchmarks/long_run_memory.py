"""Memory over a long run: ``python -m benchmarks.long_run_memory [--rounds=500]``.

Runs FedMask on the embedded default with a small model for many rounds and
samples, once a second, the resident memory (RSS, from /proc) of this driver
process and of TFF's worker process. Writes
``benchmarks/results/long_run_memory.json`` with the samples and the peak RSS
of both processes up to round 50 and up to the last round: flat memory means
the two peaks are close (TFF has had leaks with repeated dataset creation).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import tensorflow as tf  # noqa: F401  (before absl's main, see benchmarks.run)
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 500, "Rounds of the long run.")
flags.DEFINE_integer("checkpoint_round", 50, "The early round whose peak is compared with the last.")
flags.DEFINE_string("output_dir", "runs/long_run_memory", "Run directory.")
flags.DEFINE_string("data_dir", None, "Fashion-MNIST directory (default: searched).")
flags.DEFINE_integer("num_clients", 100, "Clients.")
flags.DEFINE_integer("clients_per_round", 10, "Clients per round.")
flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), "results", "long_run_memory.json"),
                    "Where the measurements go.")


def _rss_bytes(pid) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def _rounds_done(output_dir) -> int:
  try:
    with open(os.path.join(output_dir, "results.json")) as f:
      return len(json.load(f)["rounds"])
  except (OSError, ValueError, KeyError):
    return 0


def main(argv):
  del argv
  from fedmask_tff.simulation import run_config, runner
  from fedmask_tff import runtime
  config = run_config.RunConfig(model="mlp", model_width=0.5, rounds=FLAGS.rounds, local_epochs=1,
                            num_clients=FLAGS.num_clients, clients_per_round=FLAGS.clients_per_round,
                            data_dir=FLAGS.data_dir, output_dir=FLAGS.output_dir, overwrite=True,
                            progress=False)
  samples, stop = [], threading.Event()

  def sample():
    while not stop.is_set():
      worker = (runtime.local_worker_pids() or [None])[0]
      samples.append({"t": time.time(), "round": _rounds_done(config.output_dir),
                      "driver_rss": _rss_bytes(os.getpid()),
                      "worker_rss": _rss_bytes(worker) if worker else 0})
      stop.wait(1.0)

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  t0 = time.time()
  results = runner.run(config)
  stop.set()
  thread.join()

  def peak(key, upto):
    values = [s[key] for s in samples if s["round"] <= upto]
    return max(values) if values else 0

  early, last = FLAGS.checkpoint_round, FLAGS.rounds
  summary = {
      "settings": {"model": "mlp", "model_width": 0.5, "rounds": last, "clients_per_round":
                   config.clients_per_round, "num_clients": config.num_clients, "local_epochs": 1},
      "wall_s": time.time() - t0,
      "accuracy": results["final"]["accuracy"],
      f"driver_peak_rss_mb_to_round_{early}": peak("driver_rss", early) / 2 ** 20,
      f"driver_peak_rss_mb_to_round_{last}": peak("driver_rss", last) / 2 ** 20,
      f"worker_peak_rss_mb_to_round_{early}": peak("worker_rss", early) / 2 ** 20,
      f"worker_peak_rss_mb_to_round_{last}": peak("worker_rss", last) / 2 ** 20,
      "samples": samples,
  }
  os.makedirs(os.path.dirname(FLAGS.results), exist_ok=True)
  with open(FLAGS.results, "w") as f:
    json.dump(summary, f, indent=1)
  print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
