"""Round time with one local TFF worker against several workers, and with client datasets built
by the driver against built inside the computation: ``python -m benchmarks.workers``.

Each variant is the same FedMask run (``experiments.run``; Fashion-MNIST, ``--num_clients``
clients, ``--clients_per_round`` per round, ``--rounds`` rounds, cnn), run as its own process.
The variants are interleaved ``--repeats`` times (A B C D A B C D ...), since the machine is
shared and noisy; a variant's time is the median over repeats of its median round time after
round 1 (tracing and pruning). Ratios are to the local, driver-built variant of the same run.
Workers are started on loopback with ``python -m fedmask_tff.runtime.worker``; every run's results must
be identical to the local run's (checked), so the table compares the same work.

On a machine with few cores, several workers on one host share those cores: the table then shows
the cost of the split (serialization, merging) rather than a speed-up, which needs workers on
separate hosts. Writes ``benchmarks/results/workers.json`` and ``.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_clients", 100, "Total clients.")
flags.DEFINE_integer("clients_per_round", 10, "Clients per round.")
flags.DEFINE_integer("rounds", 4, "Rounds per run (round 1 is not timed).")
flags.DEFINE_integer("workers", 2, "Workers of the multi-worker variants.")
flags.DEFINE_integer("repeats", 2, "Interleaved repetitions of every variant.")
flags.DEFINE_string("model", "cnn", "Model.")
flags.DEFINE_float("model_width", 0.5, "Model width.")
flags.DEFINE_string("output", "benchmarks/results/workers", "Output path without extension.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(out_dir, extra):
  args = [sys.executable, "-m", "experiments.run", f"--output_dir={out_dir}", "--overwrite",
          f"--num_clients={FLAGS.num_clients}", f"--clients_per_round={FLAGS.clients_per_round}",
          f"--rounds={FLAGS.rounds}", f"--model={FLAGS.model}", f"--model_width={FLAGS.model_width}",
          "--local_epochs=1", "--progress=false", *extra]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                        stdin=subprocess.DEVNULL)
  if proc.returncode != 0:
    raise RuntimeError(f"run {extra} failed:\n{proc.stderr[-3000:]}")
  with open(os.path.join(out_dir, "results.json")) as f:
    results = json.load(f)
  times = [r["wall_s"] for r in results["rounds"][1:]]
  key = ([r["train_loss"] for r in results["rounds"]], results["final"]["accuracy_per_client"])
  return statistics.median(times), key


def main(argv):
  del argv
  from fedmask_tff.runtime import worker
  import portpicker
  ports = [portpicker.pick_unused_port() for _ in range(FLAGS.workers)]
  procs = [worker.start(p) for p in ports]
  addresses = ",".join(f"127.0.0.1:{p}" for p in ports)
  variants = {
      "local, driver-built datasets": [],
      "local, datasets built in the computation": ["--client_datasets=workers"],
      f"{FLAGS.workers} workers, driver-built datasets": [f"--workers={addresses}"],
      f"{FLAGS.workers} workers, datasets built in the computation":
          [f"--workers={addresses}", "--client_datasets=workers"],
  }
  times = {name: [] for name in variants}
  keys = {}
  tmp = tempfile.mkdtemp(prefix="bench_workers_")
  try:
    for rep in range(FLAGS.repeats):
      for i, (name, extra) in enumerate(variants.items()):
        t0 = time.perf_counter()
        median, key = _run(os.path.join(tmp, str(i)), extra)
        times[name].append(median)
        keys.setdefault(name, key)
        print(f"[bench] repeat {rep + 1}: {name}: median round {median:.2f} s "
              f"(run {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
  finally:
    for p in procs:
      p.terminate()
      p.wait()
    shutil.rmtree(tmp, ignore_errors=True)
  base_name = next(iter(variants))
  base = statistics.median(times[base_name])
  rows = [{"variant": name, "round_s": statistics.median(t), "round_s_all": t,
           "ratio_to_local": statistics.median(t) / base,
           "identical_results": keys[name] == keys[base_name]} for name, t in times.items()]
  settings = {k: getattr(FLAGS, k) for k in ("num_clients", "clients_per_round", "rounds", "workers",
                                              "repeats", "model", "model_width")}
  settings["cpu_count"] = os.cpu_count()
  os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
  with open(FLAGS.output + ".json", "w") as f:
    json.dump({"settings": settings, "rows": rows}, f, indent=1)
  lines = ["| variant | round (s, median) | × local | results identical to local |", "|---|---|---|---|"]
  lines += [f"| {r['variant']} | {r['round_s']:.2f} | {r['ratio_to_local']:.2f} | "
            f"{'yes' if r['identical_results'] else 'no'} |" for r in rows]
  table = "\n".join(lines)
  with open(FLAGS.output + ".md", "w") as f:
    f.write(f"Settings: {settings}\n\n{table}\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
