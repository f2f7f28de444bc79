"""Benchmarks of fedmask_tff, as ratios measured side by side in one process.

    python -m benchmarks.run --quick        # a few minutes on 2 cores

writes ``benchmarks/results/latest.json`` and ``benchmarks/results/latest.md``:

* ``fedmask_over_fedavg_round_time``: median time of one round of FedMask
  (``next`` plus the client-state store's loads and saves, as the runner does
  it) over one round of TFF's own ``build_weighted_fed_avg`` on the dense
  counterpart of the same CNN, same clients, batch size and epochs; the two
  alternate round by round (interleaved), after warm-up rounds.
* ``cnn_fraction_of_peak_flops`` (and the LSTM's): client training throughput
  (examples/s, training FLOPs/s counted by :mod:`fedmask_tff.models.costs`) over the
  machine's own float32 peak, measured in the same process with a large matmul.
* scaling rows: FedMask round time and peak memory (this process and the TFF
  worker) for 20/40/80 clients per round, and for 100/1000/3000 total clients
  with the same clients per round.
* ``startup_s``: from launching ``python -m experiments.run`` to its first
  finished round (read from its results.json).

Machines are shared and noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow must be imported before absl.app.run starts main(): imported inside it, Keras
# in TF 2.14 builds symbolic tensors where KerasTensors are expected and Sequential models fail.
import tensorflow  # noqa: E402,F401

flags.DEFINE_bool("quick", False, "Small preset (a few minutes on 2 cores).")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where latest.json and latest.md go.")
flags.DEFINE_string("data_dir", None, "Fashion-MNIST folder (default: search; else synthetic).")
FLAGS = flags.FLAGS

TARGETS = {"fedmask_over_fedavg_round_time": ("<=", 1.1), "cnn_fraction_of_peak_flops": (">=", 0.30)}


def _log(msg):
  print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _status_kb(pid, field):
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def _worker_pids():
  from fedmask_tff import runtime
  return runtime.local_worker_pids()


def _reset_peaks():
  """Resets the peak-RSS marks (VmHWM) of this process and the TFF worker (Linux clear_refs 5)."""
  for pid in ["self"] + _worker_pids():
    try:
      with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    except OSError:
      pass


def _rss_peak_mb() -> float:
  return _status_kb("self", "VmHWM") / 1024.0


def _worker_peak_mb() -> float:
  return max([_status_kb(pid, "VmHWM") / 1024.0 for pid in _worker_pids()] or [0.0])


def _images(num_clients, seed=0):
  """(images, labels, source): Fashion-MNIST when present, else random data of its shape."""
  import numpy as np
  from fedmask_tff import data as data_lib
  try:
    x, y = data_lib.load_fashion_mnist(FLAGS.data_dir)
    return x, y, "fashion_mnist"
  except data_lib.DataError:
    rng = np.random.default_rng(seed)
    n = max(70000, 30 * num_clients)
    return rng.random((n, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32), "synthetic"


def _split(x, y, num_clients, seed=0):
  from fedmask_tff import data as data_lib
  parts = data_lib.pathological_partition(y, num_clients, 2, seed)
  return data_lib.build_federated_split(x, y, parts, test_fraction=0.2, seed=seed)


def _batched_spec(split):
  import tensorflow as tf
  spec = split.train.element_type_structure
  return collections.OrderedDict(
      (k, tf.TensorSpec([None] + v.shape.as_list(), v.dtype)) for k, v in spec.items())


def _fedmask_round_fn(split, clients, batch_size, epochs, store_dir):
  """A callable running one round of FedMask's default recipe (sampled masks, uploads
  entropy-coded as ``--uplink_coding=auto`` does) on ``clients`` as the runner does:
  ``algorithm.next`` plus the client-state store's loads and saves."""
  from fedmask_tff.algorithms.base import BuildContext
  from fedmask_tff.algorithms.sampled_masks.algorithm import SampledFedMask
  from fedmask_tff.algorithms.sampled_masks.config import SampledMaskConfig
  spec = _batched_spec(split)
  context = BuildContext(input_shape=tuple(spec["x"].shape.as_list()[1:]), num_classes=10,
                         model="cnn", model_width=1.0, seed=0, element_spec=spec,
                         eval_element_spec=spec, local_epochs=epochs, learning_rate=0.1,
                         batch_size=batch_size)
  from fedmask_tff.algorithms import SAMPLED_UPLOAD, uplink_coding_used
  coding = uplink_coding_used("fedmask", SAMPLED_UPLOAD, "auto")  # the CLI's default: entropy
  algorithm = SampledFedMask(context, SampledMaskConfig(local_epochs=epochs), uplink_coding=coding)
  store = algorithm.make_store(store_dir)
  state = [algorithm.initialize()]

  def one_round():
    datasets = [split.train.create_tf_dataset_for_client(c).batch(batch_size) for c in clients]
    state[0], new_states, _ = algorithm.next(state[0], datasets, [store.get(c) for c in clients])
    for c, s in zip(clients, new_states):
      store.put(c, s)
  return one_round


def _fedavg_round_fn(split, clients, batch_size, epochs):
  import tensorflow as tf
  import tensorflow_federated as tff
  from fedmask_tff.models import basic
  spec = _batched_spec(split)

  def model_fn():
    return tff.learning.models.from_keras_model(
        basic.build_reference_cnn(seed=0), input_spec=spec,
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))

  process = tff.learning.algorithms.build_weighted_fed_avg(
      model_fn, client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.05),
      server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0))
  state = [process.initialize()]

  def one_round():
    datasets = [split.train.create_tf_dataset_for_client(c).repeat(epochs).batch(batch_size)
                for c in clients]
    state[0] = process.next(state[0], datasets).state
  return one_round


def _timed(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def bench_round_time(split, quick):
  clients = split.client_ids[:10]
  reps = 5 if quick else 15
  with tempfile.TemporaryDirectory() as tmp:
    fm = _fedmask_round_fn(split, clients, 32, 1, tmp)
    fa = _fedavg_round_fn(split, clients, 32, 1)
    for fn in (fm, fm, fa, fa):  # warm-up: tracing, worker start, FedMask's pruning round
      fn()
    t_fm, t_fa = [], []
    for _ in range(reps):
      t_fm.append(_timed(fm))
      t_fa.append(_timed(fa))
  m_fm, m_fa = statistics.median(t_fm), statistics.median(t_fa)
  return {"fedmask_round_s_median": m_fm, "fedavg_round_s_median": m_fa,
          "fedmask_round_s": t_fm, "fedavg_round_s": t_fa,
          "fedmask_over_fedavg_round_time": m_fm / m_fa,
          "round_setup": {"clients": len(clients), "batch_size": 32, "local_epochs": 1,
                          "examples_per_client": int(split.summary()["median_train_examples_per_client"]),
                          "reps_interleaved": reps}}


def _peak_matmul_flops(n=2048, reps=10):
  import tensorflow as tf
  a = tf.random.normal([n, n])
  b = tf.random.normal([n, n])

  @tf.function
  def mm(a, b):
    return tf.matmul(a, b)
  mm(a, b).numpy()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    mm(a, b).numpy()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def _training_throughput(model, x, y, batch_size, steps):
  """Examples/s of a plain TF training loop on the model's trainable weights (SGD)."""
  import tensorflow as tf
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  variables = model.trainable_variables

  @tf.function
  def step(xb, yb):
    with tf.GradientTape() as tape:
      loss = loss_fn(yb, model(xb, training=True))
    grads = tape.gradient(loss, variables)
    for v, g in zip(variables, grads):
      v.assign_sub(0.01 * tf.convert_to_tensor(g))
    return loss
  xb, yb = x[:batch_size], y[:batch_size]
  for _ in range(3):
    step(xb, yb)
  t0 = time.perf_counter()
  for i in range(steps):
    lo = (i * batch_size) % (len(x) - batch_size)
    step(x[lo:lo + batch_size], y[lo:lo + batch_size])
  float(step(xb, yb))
  return (steps + 1) * batch_size / (time.perf_counter() - t0)


def bench_throughput(x, y, quick):
  import numpy as np
  import tensorflow as tf
  from fedmask_tff.models import costs, basic
  from fedmask_tff.masks.lstm import MaskedLSTM
  peak = _peak_matmul_flops()
  rows = {"peak_matmul_flops": peak}
  steps = 40 if quick else 200
  xs, ys = tf.constant(x[:4096]), tf.constant(y[:4096])
  for name, model in (("cnn", basic.build_cnn(seed=0)), ("reference_cnn", basic.build_reference_cnn(seed=0))):
    for bs in (32, 128):
      eps = _training_throughput(model, xs, ys, bs, steps)
      flops = eps * costs.train_flops_per_example(model)
      rows[f"{name}_b{bs}"] = {"examples_per_s": eps, "train_flops_per_s": flops,
                               "fraction_of_peak": flops / peak}
  # Shakespeare-like LSTM: 8-d character embedding, two masked LSTM(256) layers, 80 steps.
  lstm = tf.keras.Sequential([
      tf.keras.Input((80,), dtype=tf.int32), tf.keras.layers.Embedding(86, 8),
      MaskedLSTM(256, return_sequences=True, seed=1), MaskedLSTM(256, seed=2),
      tf.keras.layers.Dense(86)])
  chars = tf.constant(np.random.default_rng(0).integers(0, 86, (1024, 80)).astype(np.int32))
  nxt = tf.constant(np.random.default_rng(1).integers(0, 86, 1024).astype(np.int32))
  eps = _training_throughput(lstm, chars, nxt, 32, max(5, steps // 8))
  flops = eps * costs.train_flops_per_example(lstm)
  rows["lstm_b32"] = {"examples_per_s": eps, "train_flops_per_s": flops, "fraction_of_peak": flops / peak}
  rows["cnn_fraction_of_peak_flops"] = max(rows["cnn_b32"]["fraction_of_peak"],
                                           rows["cnn_b128"]["fraction_of_peak"])
  rows["lstm_fraction_of_peak_flops"] = rows["lstm_b32"]["fraction_of_peak"]
  return rows


class _TiledClients:
  """``total`` clients whose data repeats a base split's clients (client i has base client i % n).

  Every client then has the same amount of data whatever ``total`` is, so rows with
  more total clients differ only in how many clients exist, not in the round's work.
  """

  def __init__(self, base, total):
    self.client_ids = [f"client_{i:05d}" for i in range(total)]
    self._base, self._n = base, len(base.client_ids)
    self.train = self

  @property
  def element_type_structure(self):
    return self._base.train.element_type_structure

  def create_tf_dataset_for_client(self, cid):
    return self._base.train.create_tf_dataset_for_client(self._base.client_ids[int(cid[7:]) % self._n])


def bench_scaling(x, y, quick):
  import shutil
  rows = []
  reps = 2 if quick else 4
  base = _split(x, y, 100)
  examples = int(base.summary()["median_train_examples_per_client"])
  # Total clients first: the TFF worker keeps the memory a large round took.
  for total, per_round in ((100, 10), (1000, 10), (3000, 10), (100, 20), (100, 40), (100, 80)):
    split = _TiledClients(base, total)
    step = total // per_round
    clients = split.client_ids[::step][:per_round]  # spread over the whole id range
    _reset_peaks()
    with tempfile.TemporaryDirectory() as tmp:
      fm = _fedmask_round_fn(split, clients, 32, 1, tmp)
      fm()  # first round: tracing and pruning
      # Fill the store with a state for every client, as after a long run: the disk holds
      # `total` clients; a round must still touch only its own.
      template = os.path.join(tmp, f"{clients[0]}.npz")
      for cid in split.client_ids:
        if cid not in clients:
          shutil.copyfile(template, os.path.join(tmp, f"{cid}.npz"))
      store_mb = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)) / 2**20
      times = [_timed(fm) for _ in range(reps)]
    rows.append({"total_clients": total, "clients_per_round": per_round,
                 "examples_per_client": examples, "store_mb": store_mb,
                 "round_s_median": statistics.median(times),
                 "round_s_per_client": statistics.median(times) / per_round,
                 "driver_peak_rss_mb": _rss_peak_mb(), "worker_peak_rss_mb": _worker_peak_mb()})
    _log(f"scaling {rows[-1]}")
  return rows


def bench_startup():
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "run")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "experiments.run", f"--output_dir={out}",
                             "--rounds=2", "--num_clients=20", "--clients_per_round=5",
                             "--progress=false"] + ([f"--data_dir={FLAGS.data_dir}"] if FLAGS.data_dir else []),
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    first = None
    results = os.path.join(out, "results.json")
    while proc.poll() is None:
      if first is None and os.path.exists(results):
        try:
          with open(results) as f:
            if json.load(f)["rounds"]:
              first = time.perf_counter() - t0
        except (json.JSONDecodeError, OSError):
          pass
      time.sleep(0.05)
    return {"startup_s": first, "exit_code": proc.returncode}


def _markdown(res):
  lines = ["# fedmask_tff benchmarks", "",
           f"Measured {res['when']} on {res['machine']} ({res['data']} data). "
           "Ratios are measured side by side in one process; absolute times drift.", "",
           "| metric | value | target | met |", "|---|---|---|---|"]
  for key, (op, target) in TARGETS.items():
    value = res["summary"][key]
    met = value <= target if op == "<=" else value >= target
    lines.append(f"| {key} | {value:.3f} | {op} {target} | {'yes' if met else '**no**'} |")
  s = res["summary"]
  lines += [f"| lstm_fraction_of_peak_flops | {s['lstm_fraction_of_peak_flops']:.3f} | | |",
            f"| startup_s (command to first round) | {s['startup_s']:.1f} | | |", "",
            "## Round time (median s)", "",
            f"FedMask {res['round_time']['fedmask_round_s_median']:.3f} s (next plus client-state loads and "
            f"saves), TFF `build_weighted_fed_avg` on the dense counterpart "
            f"{res['round_time']['fedavg_round_s_median']:.3f} s; setup {res['round_time']['round_setup']}.", "",
            "## Client training throughput", "", "| model | batch | examples/s | GFLOP/s | fraction of peak |",
            "|---|---|---|---|---|"]
  for key, row in res["throughput"].items():
    if isinstance(row, dict):
      name, _, bs = key.rpartition("_b")
      lines.append(f"| {name} | {bs} | {row['examples_per_s']:.0f} | {row['train_flops_per_s'] / 1e9:.1f} | "
                   f"{row['fraction_of_peak']:.3f} |")
  lines.append(f"\nPeak (float32 2048x2048 matmul, same process): "
               f"{res['throughput']['peak_matmul_flops'] / 1e9:.1f} GFLOP/s.")
  lines += ["", "## Scaling (FedMask, one round)", "",
            "| total clients | clients/round | examples/client | client-state store MB | round s | s per client | driver peak MB | worker peak MB |",
            "|---|---|---|---|---|---|---|---|"]
  for r in res["scaling"]:
    lines.append(f"| {r['total_clients']} | {r['clients_per_round']} | {r['examples_per_client']} | "
                 f"{r['store_mb']:.0f} | {r['round_s_median']:.2f} | {r['round_s_per_client']:.3f} | {r['driver_peak_rss_mb']:.0f} | "
                 f"{r['worker_peak_rss_mb']:.0f} |")
  lines += ["", "Peak memory: VmHWM of the driver and of TFF's worker, reset before each row (the row's own",
            "peak; a reset cannot go below the current RSS, and TFF's worker keeps the memory it took, so",
            "its column can only grow down the table). Rows with 1000 and 3000 clients repeat the",
            "100 clients' data (client i holds client i mod 100's examples), so every client has the same",
            "data; the store holds a state file for every client before the timed rounds.", ""]
  return "\n".join(lines)


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from fedmask_tff import runtime
  runtime.install_local_context()
  t0 = time.perf_counter()
  res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
         "quick": FLAGS.quick}
  x, y, source = _images(3000)
  res["data"] = source
  _log("round time: FedMask vs TFF FedAvg, interleaved ...")
  res["round_time"] = bench_round_time(_split(x, y, 100), FLAGS.quick)
  _log(f"  ratio {res['round_time']['fedmask_over_fedavg_round_time']:.3f}")
  _log("client training throughput vs peak ...")
  res["throughput"] = bench_throughput(x, y, FLAGS.quick)
  _log("scaling ...")
  res["scaling"] = bench_scaling(x, y, FLAGS.quick)
  _log("start-up ...")
  startup = bench_startup()
  res["startup"] = startup
  res["summary"] = {
      "fedmask_over_fedavg_round_time": res["round_time"]["fedmask_over_fedavg_round_time"],
      "cnn_fraction_of_peak_flops": res["throughput"]["cnn_fraction_of_peak_flops"],
      "lstm_fraction_of_peak_flops": res["throughput"]["lstm_fraction_of_peak_flops"],
      "startup_s": startup["startup_s"]}
  res.update(res["summary"])  # the headline ratios also at the top level of latest.json
  res["targets"] = {k: {"op": op, "target": t} for k, (op, t) in TARGETS.items()}
  res["wall_s"] = time.perf_counter() - t0
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  from fedmask_tff.simulation.outputs import write_json_atomic
  write_json_atomic(os.path.join(FLAGS.output_dir, "latest.json"), res)
  with open(os.path.join(FLAGS.output_dir, "latest.md"), "w") as f:
    f.write(_markdown(res))
  print(_markdown(res))


if __name__ == "__main__":
  app.run(main)
