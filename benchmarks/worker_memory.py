"""TFF worker memory per client of a round: ``python -m benchmarks.worker_memory``.

For each model and each number of clients per round, runs two FedMask rounds (1 local epoch)
and samples, every 0.2 s, the resident memory (RSS, /proc) of TFF's worker; reports its peak,
the peak above an idle worker (started, nothing run), that excess per client, and what a client
brings: its state as it travels (``results.json["config"]["client_state_bytes"]``: float32
scores, bit-packed masks) and its training data (float32 images and int32 labels). Writes
``benchmarks/results/worker_memory.{json,md}``.

Cases: cnn on Fashion-MNIST (``--cnn_clients``), ``har_mlp`` on UCI-HAR (30 subjects, so 10,
20 and 30 clients a round) and ``vgg16`` at width 1 on the paper's CIFAR-10 partition (400
clients, 2 classes and 25 examples each; ``--vgg16_clients``).

``--baseline=DIR`` (a checkout of earlier code, e.g. ``git worktree add /tmp/before fba7873``)
measures each cnn and har_mlp case with that code too, right before this tree's, each in a fresh
process, and reports both peaks and round times with their ratios (measured side by side in one
run). Every case runs in its own process, so one case's worker never serves another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import tensorflow as tf  # noqa: F401  (before absl's main, see benchmarks.run)
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("fashion_mnist_dir", None, "Fashion-MNIST directory (default: searched).")
flags.DEFINE_string("har_dir", "../shared/data/har_inertial", "UCI-HAR directory.")
flags.DEFINE_string("cifar10_dir", "../shared/data/cifar10_jpeg", "CIFAR-10 directory.")
flags.DEFINE_list("cnn_clients", ["20", "40", "80"], "Clients per round for cnn (Fashion-MNIST).")
flags.DEFINE_list("har_clients", ["10", "20", "30"], "Clients per round for har_mlp (UCI-HAR).")
flags.DEFINE_list("vgg16_clients", ["20"], "Clients per round for vgg16 at width 1 (CIFAR-10).")
flags.DEFINE_integer("max_concurrent_clients", -1, "The worker's cap on concurrent client "
                     "computations (-1: the run's default).")
flags.DEFINE_enum("client_datasets", "driver", ["driver", "workers"],
                  "Where each client's dataset is built (the run's --client_datasets).")
flags.DEFINE_enum("client_states", "auto", ["auto", "messages", "files"],
                  "How client states reach the worker (the run's --client_states; auto: files).")
flags.DEFINE_string("baseline", None, "A checkout of earlier code to measure side by side.")
flags.DEFINE_bool("in_process", False, "Measure the given cases in this process (what each "
                  "case's own process runs).")
flags.DEFINE_string("output_dir", "runs/worker_memory", "Run directories.")
flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), "results", "worker_memory"),
                    "Where the table goes (.json and .md are added).")

# Flags that set the measured runs (passed on to each case's own process).
RUN_SETTINGS = ("max_concurrent_clients", "client_datasets", "client_states")

# (model, dataset, clients of the partition, MB of a median client's training data)
MODELS = {
    "cnn": ("fashion_mnist", 100, 560 * (28 * 28 + 1) * 4 / 1e6),
    "har_mlp": ("har", 30, 275 * (128 * 9 + 1) * 4 / 1e6),
    "vgg16": ("cifar10", 400, 20 * (32 * 32 * 3 + 1) * 4 / 1e6),  # 25 a client, 20 to train
}


def idle_worker_mb() -> float:
  """RSS of a TFF worker that has started and run nothing (its TensorFlow runtime)."""
  from fedmask_tff import runtime
  runtime.install_local_context()
  time.sleep(3.0)
  rss = runtime.process_rss_mb(runtime.local_worker_pids()[0])
  runtime.reset_local_context()
  return rss


def _config(model: str, clients: int):
  from fedmask_tff.simulation.run_config import RunConfig
  dataset, num_clients, _ = MODELS[model]
  data_dir = {"cnn": FLAGS.fashion_mnist_dir, "har_mlp": FLAGS.har_dir,
              "vgg16": FLAGS.cifar10_dir}[model]
  extra = dict(classes_per_client=2, examples_per_client=25) if model == "vgg16" else {}
  return RunConfig(dataset=dataset, data_dir=data_dir, model=model, model_width=1.0,
                   num_clients=num_clients, clients_per_round=clients, rounds=2, local_epochs=1,
                   progress=False, overwrite=True, worker_memory_limit_mb=1e9,
                   max_concurrent_clients=FLAGS.max_concurrent_clients,
                   client_datasets=FLAGS.client_datasets, client_states=FLAGS.client_states,
                   output_dir=os.path.join(FLAGS.output_dir, f"{model}_{clients}"), **extra)


def measure(config, idle_mb: float, client_data_mb: float) -> dict:
  """Runs ``config`` while sampling the worker; returns its memory figures (MB = 1e6 bytes
  for sizes, 2**20 for RSS as /proc gives it) and the mean round time (seconds)."""
  from fedmask_tff import runtime
  from benchmarks.sampling import run_sampled
  peak = [0.0]

  def sample():
    pids = runtime.local_worker_pids()
    if pids:
      peak[0] = max(peak[0], runtime.process_rss_mb(pids[0]))

  results = run_sampled(config, sample, 0.2)
  clients = config.clients_per_round
  state_mb = results["config"]["client_state_bytes"] / 1e6
  excess = (peak[0] - idle_mb) / clients
  return {"model": config.model, "clients_per_round": clients, "worker_idle_mb": round(idle_mb),
          "worker_peak_mb": round(peak[0]), "excess_per_client_mb": round(excess, 1),
          "client_state_mb": round(state_mb, 2), "client_data_mb": round(client_data_mb, 2),
          "excess_over_state_and_data": round(excess / (state_mb + client_data_mb), 1),
          "round_s": round(results["totals"]["train_wall_s"] / results["totals"]["rounds"], 1)}


def _cases():
  return [(model, int(n)) for model, ns in (("cnn", FLAGS.cnn_clients), ("har_mlp", FLAGS.har_clients),
                                           ("vgg16", FLAGS.vgg16_clients)) for n in ns]


def _in_process_rows() -> list:
  rows, idle = [], idle_worker_mb()
  for model, clients in _cases():
    print(f"[worker_memory] {model}, {clients} clients a round ...", file=sys.stderr, flush=True)
    rows.append(measure(_config(model, clients), idle, MODELS[model][2]))
    print(json.dumps(rows[-1]), flush=True)
  return rows


def _case_in_own_process(checkout: str, model: str, clients: int, baseline: bool) -> dict:
  """One case measured by ``checkout``'s own ``benchmarks.worker_memory`` in a fresh process."""
  lists = {"cnn": "--cnn_clients", "har_mlp": "--har_clients", "vgg16": "--vgg16_clients"}
  with open(os.path.join(checkout, "benchmarks", "worker_memory.py")) as f:
    source = f.read()  # earlier code may lack a case (vgg16 came later): not named, not run
  args = [f"{flag}={clients if name == model else ''}" for name, flag in lists.items()
          if f'"{flag[2:]}"' in source]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "table")
    data = [f"--har_dir={os.path.abspath(FLAGS.har_dir)}"]
    if FLAGS.fashion_mnist_dir:
      data.append(f"--fashion_mnist_dir={os.path.abspath(FLAGS.fashion_mnist_dir)}")
    if not baseline:
      data += [f"--cifar10_dir={os.path.abspath(FLAGS.cifar10_dir)}", "--in_process"]
    # The run's settings, where not the defaults (a baseline without a flag refuses it).
    settings = [f"--{name}={FLAGS[name].value}" for name in RUN_SETTINGS
                if FLAGS[name].value != FLAGS[name].default]
    command = [sys.executable, "-m", "benchmarks.worker_memory", *args, *data, *settings,
               f"--results={out}", f"--output_dir={os.path.join(tmp, 'runs')}"]
    subprocess.run(command, cwd=checkout, check=True,
                   env=dict(os.environ, PYTHONPATH=os.path.abspath(checkout)))
    with open(out + ".json") as f:
      return json.load(f)["rows"][0]


def _side_by_side_rows() -> list:
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  rows = []
  for model, clients in _cases():
    before = None
    if FLAGS.baseline and model != "vgg16":
      before = _case_in_own_process(FLAGS.baseline, model, clients, baseline=True)
    row = _case_in_own_process(here, model, clients, baseline=False)
    if before is not None:
      row.update(worker_peak_mb_before=before["worker_peak_mb"], round_s_before=before["round_s"],
                 peak_ratio=round(row["worker_peak_mb"] / before["worker_peak_mb"], 2),
                 round_time_ratio=round(row["round_s"] / before["round_s"], 2))
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def add_marginal(rows: list) -> list:
  """Adds ``marginal_mb_per_client``: per model, the worker peak's growth per added client from
  the fewest to the most clients measured (fixed costs cancel), and that over the client's
  state plus data (``marginal_over_state_and_data``, the "at most 3x" target)."""
  for model in dict.fromkeys(r["model"] for r in rows):
    mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["clients_per_round"])
    if len(mine) < 2 or mine[-1]["clients_per_round"] == mine[0]["clients_per_round"]:
      continue
    lo, hi = mine[0], mine[-1]
    added = hi["clients_per_round"] - lo["clients_per_round"]
    slope = (hi["worker_peak_mb"] - lo["worker_peak_mb"]) / added
    for r in mine:
      r["marginal_mb_per_client"] = round(slope, 1)
      r["marginal_over_state_and_data"] = round(slope / (r["client_state_mb"] + r["client_data_mb"]), 1)
      if "worker_peak_mb_before" in lo and "worker_peak_mb_before" in hi:
        r["marginal_mb_per_client_before"] = round(
            (hi["worker_peak_mb_before"] - lo["worker_peak_mb_before"]) / added, 1)
  return rows


def write_table(rows: list, path: str, note: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".json", "w") as f:
    json.dump({"rows": rows, "note": note}, f, indent=1)
  columns = list(dict.fromkeys(c for r in rows for c in r))
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
  with open(path + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def main(argv):
  del argv
  rows = _in_process_rows() if FLAGS.in_process else add_marginal(_side_by_side_rows())
  note = ("client_data_mb: the median client's training examples as float32 images + int32 "
          "labels (cnn: 560, HAR: ~275, CIFAR-10: 20); client_state_mb: one client's state as "
          "TFF carries it; round_s: mean wall time of the 2 rounds")
  if FLAGS.baseline:
    note += f"; *_before: the same case measured with the code in {FLAGS.baseline}, just before"
  write_table(rows, FLAGS.results, note)


if __name__ == "__main__":
  app.run(main)
