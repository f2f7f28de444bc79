"""One FedMask round of the paper's VGG-16 at full width: ``python -m benchmarks.vgg16_paper_round``.

The paper's CIFAR-10 set-up: ``vgg16_paper`` at width 1 (134,301,514 parameters), 400 clients
with 2 classes and 25 examples each, 20 clients a round, client states as files. Samples every
0.5 s the resident memory (RSS, /proc) of TFF's worker and of this process, and the machine's
available memory; reports the peaks, the round's wall time, one client's state on disk and the
run's measured bits. Writes ``benchmarks/results/vgg16_paper_round.{json,md}``.

Refuses to start with less than ``--min_free_gb`` of available memory, and stops the run (its
worker and this process, exit code 3) when the machine's available memory falls under
``--stop_below_gb``, after writing the peaks so far: the machine is shared.
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
flags.DEFINE_string("cifar10_dir", "../shared/data/cifar10_jpeg", "CIFAR-10 directory.")
flags.DEFINE_integer("clients_per_round", 20, "Clients a round (the paper: 20).")
flags.DEFINE_integer("local_epochs", 1, "Local epochs (the paper: 5; one keeps it short).")
flags.DEFINE_integer("max_concurrent_clients", 2, "The worker's cap on concurrent clients.")
flags.DEFINE_float("model_width", 1.0, "Width of vgg16_paper.")
flags.DEFINE_float("min_free_gb", 16.0, "Do not start with less available memory (GB).")
flags.DEFINE_float("stop_below_gb", 4.0, "Stop the run when available memory falls below (GB).")
flags.DEFINE_string("output_dir", "runs/vgg16_paper_round", "Run directory.")
flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), "results",
                                            "vgg16_paper_round"), "Table path (.json, .md added).")

GB = 1e9


def available_bytes() -> float:
  """``MemAvailable`` of /proc/meminfo, in bytes."""
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return float(line.split()[1]) * 1024
  return 0.0


def rss_bytes(pid) -> float:
  """Resident memory of ``pid`` (``VmRSS`` of /proc), in bytes; 0 if it is gone."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return float(line.split()[1]) * 1024
  except OSError:
    pass
  return 0.0


class Sampler:
  """Peaks of the worker's and this process's RSS and the trough of available memory; stops
  the worker it started when the machine runs short."""

  def __init__(self, on_shortage):
    self.on_shortage = on_shortage
    self.worker_peak = self.driver_peak = 0.0
    self.available_low = available_bytes()
    self.stopped = False
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True)

  def _loop(self):
    from fedmask_tff import runtime
    while not self._done.is_set():
      pids = runtime.local_worker_pids()
      if pids:
        self.worker_peak = max(self.worker_peak, rss_bytes(pids[0]))
      self.driver_peak = max(self.driver_peak, rss_bytes(os.getpid()))
      self.available_low = min(self.available_low, available_bytes())
      if self.available_low < FLAGS.stop_below_gb * GB and not self.stopped:
        self.stopped = True
        print(f"[vgg16_paper_round] available memory {self.available_low / GB:.1f} GB: "
              "stopping", file=sys.stderr, flush=True)
        for pid in pids:
          os.kill(pid, 9)
        self.on_shortage(self)
        os._exit(3)
      self._done.wait(0.5)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._done.set()
    self._thread.join()


def _config():
  from fedmask_tff.simulation.run_config import RunConfig
  return RunConfig(dataset="cifar10", data_dir=FLAGS.cifar10_dir, model="vgg16_paper",
                   model_width=FLAGS.model_width, num_clients=400, classes_per_client=2,
                   examples_per_client=25, clients_per_round=FLAGS.clients_per_round, rounds=1,
                   local_epochs=FLAGS.local_epochs, progress=False, overwrite=True,
                   worker_memory_limit_mb=1e9, client_states="files",
                   max_concurrent_clients=FLAGS.max_concurrent_clients,
                   output_dir=FLAGS.output_dir)


def _state_file_bytes(directory: str) -> float:
  sizes = [os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(directory)
           for n in names if n.endswith(".npz")]
  return max(sizes) if sizes else 0.0


def main(argv):
  del argv
  free = available_bytes()
  if free < FLAGS.min_free_gb * GB:
    print(f"error: {free / GB:.1f} GB available, under --min_free_gb={FLAGS.min_free_gb}",
          file=sys.stderr)
    sys.exit(2)
  from fedmask_tff.simulation import runner
  config, t0 = _config(), time.perf_counter()
  report = lambda sampler, results=None, error=None: _write(  # noqa: E731
      _row(sampler, config, free, t0, results, error))
  results, error = None, None
  with Sampler(report) as sampler:
    try:
      results = runner.run(config)
    except Exception as e:  # a failure is reported with the peaks it reached
      error = f"{type(e).__name__}: {str(e)[:300]}"
  report(sampler, results, error)


def _row(sampler, config, free: float, t0: float, results, error) -> dict:
  """The measured row: peaks (GB = 1e9 bytes), times (s), sizes (MB = 1e6 bytes)."""
  row = {"model": "vgg16_paper", "model_width": FLAGS.model_width,
         "clients_per_round": FLAGS.clients_per_round, "local_epochs": FLAGS.local_epochs,
         "max_concurrent_clients": FLAGS.max_concurrent_clients,
         "available_gb_at_start": round(free / GB, 1),
         "worker_peak_gb": round(sampler.worker_peak / GB, 2),
         "driver_peak_gb": round(sampler.driver_peak / GB, 2),
         "available_gb_lowest": round(sampler.available_low / GB, 1),
         "stopped_for_memory": sampler.stopped, "error": error,
         "total_wall_s": round(time.perf_counter() - t0, 1),
         "largest_state_file_mb": round(_state_file_bytes(config.output_dir) / 1e6, 1)}
  if results is not None:
    rounds = results["rounds"]
    row.update(round_wall_s=round(rounds[0]["wall_s"], 1),
               parameters=results["config"].get("model_parameters"),
               client_state_mb=round(results["config"]["client_state_bytes"] / 1e6, 1),
               uplink_mb_per_client=round(rounds[0]["uplink_bits_per_client"] / 8e6, 2),
               downlink_mb_per_client=round(rounds[0]["downlink_bits_per_client"] / 8e6, 2))
  return row


def _write(row: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.results)), exist_ok=True)
  with open(FLAGS.results + ".json", "w") as f:
    json.dump(row, f, indent=1)
  with open(FLAGS.results + ".md", "w") as f:
    f.write("| " + " | ".join(row) + " |\n|" + "---|" * len(row) + "\n| "
            + " | ".join(str(v) for v in row.values()) + " |\n")
  print(json.dumps(row, indent=1), flush=True)

if __name__ == "__main__":
  app.run(main)
