"""TFF worker memory per client of a round: ``python -m benchmarks.worker_memory``.

For each model and each number of clients per round, runs two FedMask rounds (1 local epoch)
and samples, every 0.2 s, the resident memory (RSS, /proc) of TFF's worker; reports its peak,
the peak above an idle worker (started, nothing run), that excess per client, and
what a client brings: its state (the arrays of its FedMask state) and its training data
(float32 images and int32 labels). Writes ``benchmarks/results/worker_memory.{json,md}``.

UCI-HAR has 30 subjects, so ``har_mlp`` is measured at 10, 20 and 30 clients a round.
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
flags.DEFINE_string("fashion_mnist_dir", None, "Fashion-MNIST directory (default: searched).")
flags.DEFINE_string("har_dir", "../shared/data/har_inertial", "UCI-HAR directory.")
flags.DEFINE_list("cnn_clients", ["20", "40", "80"], "Clients per round for cnn (Fashion-MNIST).")
flags.DEFINE_list("har_clients", ["10", "20", "30"], "Clients per round for har_mlp (UCI-HAR).")
flags.DEFINE_string("output_dir", "runs/worker_memory", "Run directories.")
flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), "results", "worker_memory"),
                    "Where the table goes (.json and .md are added).")


def idle_worker_mb() -> float:
  """RSS of a TFF worker that has started and run nothing (its TensorFlow runtime)."""
  from fedmask_tff import runtime
  runtime.install_local_context()
  time.sleep(3.0)
  rss = runtime.process_rss_mb(runtime.local_worker_pids()[0])
  runtime.reset_local_context()
  return rss


def measure(config, idle_mb: float, client_data_mb: float) -> dict:
  """Runs ``config`` while sampling the worker; returns its memory figures (MB)."""
  from fedmask_tff import runtime
  from fedmask_tff.simulation import runner
  peak, stop = [0.0], threading.Event()

  def sample():
    while not stop.is_set():
      pids = runtime.local_worker_pids()
      if pids:
        peak[0] = max(peak[0], runtime.process_rss_mb(pids[0]))
      stop.wait(0.2)

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  results = runner.run(config)
  stop.set()
  thread.join()
  clients = config.clients_per_round
  state_mb = results["config"]["model_parameters"] * 3 * 4 / 1e6  # scores, keep, personal
  excess = (peak[0] - idle_mb) / clients
  return {"model": config.model, "clients_per_round": clients, "worker_idle_mb": round(idle_mb),
          "worker_peak_mb": round(peak[0]), "excess_per_client_mb": round(excess, 1),
          "client_state_mb": round(state_mb, 2), "client_data_mb": round(client_data_mb, 2),
          "excess_over_state_and_data": round(excess / (state_mb + client_data_mb), 1),
          "round_s": round(results["totals"]["train_wall_s"] / results["totals"]["rounds"], 1)}


def main(argv):
  del argv
  from fedmask_tff.simulation.run_config import RunConfig
  rows, idle = [], idle_worker_mb()
  cases = [("cnn", "fashion_mnist", FLAGS.fashion_mnist_dir, int(n), 100, 560 * (28 * 28 + 1) * 4 / 1e6)
           for n in FLAGS.cnn_clients]
  cases += [("har_mlp", "har", FLAGS.har_dir, int(n), 30, 275 * (128 * 9 + 1) * 4 / 1e6)
            for n in FLAGS.har_clients]
  for model, dataset, data_dir, clients, num_clients, data_mb in cases:
    print(f"[worker_memory] {model}, {clients} clients a round ...", file=sys.stderr, flush=True)
    config = RunConfig(dataset=dataset, data_dir=data_dir, model=model, num_clients=num_clients,
                       clients_per_round=clients, rounds=2, local_epochs=1, progress=False,
                       overwrite=True, worker_memory_limit_mb=1e9,
                       output_dir=os.path.join(FLAGS.output_dir, f"{model}_{clients}"))
    rows.append(measure(config, idle, data_mb))
    print(json.dumps(rows[-1]), flush=True)
  os.makedirs(os.path.dirname(FLAGS.results), exist_ok=True)
  with open(FLAGS.results + ".json", "w") as f:
    json.dump({"rows": rows, "note": "client_data_mb: the median client's training examples as "
               "float32 images + int32 labels (cnn: 560, HAR: ~275)"}, f, indent=1)
  columns = list(rows[0])
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
  with open(FLAGS.results + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
