"""Helpers shared by the tests (not tests themselves): synthetic data files, the CLI runner,
TFF worker accounting, and the small FedMask process set-up of the unit tests."""

import collections
import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import tensorflow as tf

from fedmask_tff.algorithms import fedmask
from fedmask_tff.masks.layers import MaskedDense

IDX_CODES = {
    np.dtype('uint8'): 0x08,
    np.dtype('int8'): 0x09,
    np.dtype('int16'): 0x0B,
    np.dtype('int32'): 0x0C,
    np.dtype('float32'): 0x0D,
    np.dtype('float64'): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
  array = np.asarray(array)
  header = struct.pack('>BBBB', 0, 0, IDX_CODES[array.dtype], array.ndim)
  header += struct.pack(f'>{array.ndim}I', *array.shape)
  return header + array.astype(array.dtype.newbyteorder('>')).tobytes()


def write_file(path, payload: bytes, compress: bool) -> str:
  path = str(path)
  if compress:
    with gzip.open(path, 'wb') as f:
      f.write(payload)
  else:
    with open(path, 'wb') as f:
      f.write(payload)
  return path


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_learnable_fashion_dir(directory, n_train=600, n_test=100, seed=0):
  """Fashion-MNIST-shaped files whose class c lights up the image's row band c."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
      images[i, 2 * c + 4: 2 * c + 7, 4:24] = 255
    write_file(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), idx_bytes(images), True)
    write_file(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), idx_bytes(labels), True)


def learnable_fashion_dir(tmp_path_factory, name: str) -> str:
  """A new temporary folder of :func:`write_learnable_fashion_dir`'s files; returns its path."""
  directory = str(tmp_path_factory.mktemp(name))
  write_learnable_fashion_dir(directory)
  return directory


def tff_workers():
  out = subprocess.run(["pgrep", "-f", "tensorflow_federated/data/worker_binary"],
                       capture_output=True, text=True).stdout
  return set(out.split())


def orphan_workers():
  """TFF workers whose parent is gone (re-parented to init): what a leak looks like. Workers of
  other live processes on the machine (other runs, other test sessions) are not counted."""
  orphans = set()
  for pid in tff_workers():
    try:
      with open(f"/proc/{pid}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      with open(f"/proc/{ppid}/cmdline", "rb") as f:
        parent = f.read()
    except (OSError, ValueError, IndexError):
      continue
    if ppid == 1 or b"python" not in parent:
      orphans.add(pid)
  return orphans


def run_cli(args, timeout=600):
  # The console as a user sees it: no TF_CPP_MIN_LOG_LEVEL of the test environment.
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  before = tff_workers()
  proc = subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout,
                        stdin=subprocess.DEVNULL)
  return proc, before


def stderr_tail(stderr: str, chars: int = 3000) -> str:
  """The end of a subprocess's stderr for a failure message, without the one long line of
  loaded extension modules that Python's fault handler prints after the threads' stacks (it
  alone is ~7,000 characters and would push the stacks out)."""
  lines = [line for line in stderr.splitlines() if not line.startswith("Extension modules:")]
  return "\n".join(lines)[-chars:]


NUM_CLIENTS = 4


BATCH = 4


PRUNE_RATE = 0.3


# The paper's upload (the binary mask) and vote rule; score_sign is tested in test_vote_rules.
CONFIG = fedmask.FedMaskConfig(prune_rate=PRUNE_RATE, prune_last_layers=2, learning_rate=1.0,
                                local_epochs=1, upload="mask", score_restart="scaled_logit")


ELEMENT_SPEC = collections.OrderedDict(x=tf.TensorSpec([None, 8], tf.float32),
                                       y=tf.TensorSpec([None], tf.int32))


SHAPES = [(8, 16), (16, 12), (12, 3)]


PRUNABLE = [False, True, True]


# Kept elements per client: 128 + round(0.3 * 192) + round(0.3 * 36) = 128 + 58 + 11.
KEPT = [128, 58, 11]


def model_fn(mask_mode="ste"):
  return tf.keras.Sequential([
      tf.keras.Input(shape=(8,)),
      MaskedDense(16, activation="relu", seed=1, mask_mode=mask_mode, name="d1"),
      MaskedDense(12, activation="relu", seed=2, mask_mode=mask_mode, name="d2"),
      MaskedDense(3, seed=3, mask_mode=mask_mode, name="d3"),
  ])


def make_data(seed=0, n=16):
  """Per-client (x, y): labels from a shared linear rule plus a client-specific shift."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((8, 3))
  data = []
  for c in range(NUM_CLIENTS):
    x = rng.standard_normal((n, 8)).astype(np.float32)
    y = np.argmax(x @ w + rng.standard_normal(3) * c, axis=1).astype(np.int32)
    data.append((x, y))
  return data


def to_datasets(data, batch=BATCH):
  # Deterministic (no shuffle): client_update and next see the same batches.
  return [tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(batch)
          for x, y in data]


def np_state(state):
  return collections.OrderedDict(
      scores=tuple(np.asarray(s, np.float32) for s in state["scores"]),
      keep=tuple(np.asarray(k, np.float32) for k in state["keep"]),
      personal=tuple(np.asarray(p, np.float32) for p in state["personal"]),
      rounds=np.int32(state["rounds"]))


def fedmask_next(process, server_state, datasets, states):
  """``process.next`` on full-size client states: packed into the process's wire form on the
  way in, unpacked on the way out (as the FedMask adapter does)."""
  server_state, new_states, metrics = process.next(server_state, datasets,
                                                   [process.pack_state(s) for s in states])
  return server_state, [process.unpack_state(s) for s in new_states], metrics


def fedmask_prepare(process, datasets, states):
  """``process.prepare`` on full-size client states (see :func:`fedmask_next`)."""
  new_states, metrics = process.prepare(datasets, [process.pack_state(s) for s in states])
  return [process.unpack_state(s) for s in new_states], metrics


def fedmask_evaluate(process, datasets, masks):
  """``process.evaluate`` on full-size 0/1 masks (one tuple per client)."""
  return process.evaluate(datasets, [process.pack_masks(m) for m in masks])


def sampled_mlp_context(width: float = 0.05):
  """The BuildContext the sampled-mask unit tests share: the ``mlp`` over 6 float32 features,
  3 classes, at ``width``, one local epoch of batch 8, learning rate 0.1, seed 0."""
  import collections as _collections
  from fedmask_tff.algorithms.base import BuildContext
  spec = _collections.OrderedDict(x=tf.TensorSpec([None, 6], tf.float32),
                                  y=tf.TensorSpec([None], tf.int32))
  return BuildContext(input_shape=(6,), num_classes=3, model="mlp", model_width=width, seed=0,
                      element_spec=spec, eval_element_spec=spec, local_epochs=1,
                      learning_rate=0.1, batch_size=8)
