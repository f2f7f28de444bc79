"""Reading a FedMask run's output directory: its config, a client's masks, its test data.

Everything that touches a run's files lives here, and every failure raises
:class:`ArtifactError` naming the file, so the CLIs can print one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Optional

import numpy as np
import tensorflow as tf

from fedmask_tff.models import basic
from fedmask_tff.wire.client_state import ClientStateError, ClientStateStore
from fedmask_tff.masks.layers import masked_layers, mask_variables

# Input shape of each dataset a run can name (the data loaders' element shapes).
INPUT_SHAPES = {"fashion_mnist": (28, 28, 1)}
# What an app must do to the camera/file image before the model, and what the outputs mean
# (written beside every exported model as model_info.json; fedmask_tff.data.fashion_mnist
# divides the uint8 pixels by 255).
DEPLOYMENT = {
    "fashion_mnist": {
        "input": {"layout": "NHWC, 28 x 28 grayscale, 1 channel, 0 = background",
                  "preprocess": "float32 = uint8 pixel * scale + offset", "scale": 1.0 / 255.0,
                  "offset": 0.0},
        "labels": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]},
}


class ArtifactError(RuntimeError):
  """A run directory, client state, packed model or .tflite file is missing or corrupt."""


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What rebuilds a run's frozen model W (never its masks): the builder and its arguments."""
  model: str
  width: float
  seed: int
  input_shape: tuple
  num_classes: int
  mask_mode: str = "ste"
  score_init: float = 0.05
  kernel_init: str = "signed_constant"

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["input_shape"] = list(self.input_shape)
    return d

  @classmethod
  def from_json(cls, d: dict) -> "Architecture":
    d = dict(d)
    d["input_shape"] = tuple(int(x) for x in d["input_shape"])
    return cls(**d)

  def build_masked(self) -> tf.keras.Model:
    """The run's masked model (frozen W from the seed, masks all ones until set)."""
    if self.model not in basic.MODEL_BUILDERS:
      raise ArtifactError(f"unknown model {self.model!r}; known: {sorted(basic.MODEL_BUILDERS)}")
    return basic.MODEL_BUILDERS[self.model](
        input_shape=self.input_shape, num_classes=self.num_classes, width=self.width,
        seed=self.seed, mask_mode=self.mask_mode, score_init=self.score_init,
        kernel_init=self.kernel_init)

  def build_dense(self) -> tf.keras.Model:
    """The dense (unmasked, trainable) model of the same architecture: the FedAvg baseline."""
    return basic.DENSE_MODEL_BUILDERS[self.model](input_shape=self.input_shape, num_classes=self.num_classes,
                                width=self.width, seed=self.seed)


@dataclasses.dataclass
class RunInfo:
  run_dir: str
  config: dict
  arch: Architecture
  shapes: list  # shape of each masked weight, in mask_specs order
  names: list

  @property
  def states_dir(self) -> str:
    return os.path.join(self.run_dir, "client_states")


def load_run(run_dir: str) -> RunInfo:
  """Reads ``run_dir/results.json``; raises :class:`ArtifactError` naming what is wrong."""
  if not os.path.isdir(run_dir):
    raise ArtifactError(f"run directory {run_dir} does not exist")
  path = os.path.join(run_dir, "results.json")
  if not os.path.isfile(path):
    raise ArtifactError(f"{path} is missing (is {run_dir} the --output_dir of a run?)")
  try:
    with open(path) as f:
      results = json.load(f)
    cfg = results["config"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ArtifactError(f"{path} is unreadable or has no config: {e}") from e
  algorithm = cfg.get("algorithm", "fedmask")
  if algorithm not in ("fedmask", "local_masks"):
    raise ArtifactError(f"{path}: algorithm is {algorithm!r}; only FedMask (and local_masks) runs "
                        "have client masks")
  dataset = cfg.get("dataset", "fashion_mnist")
  if dataset not in INPUT_SHAPES:
    raise ArtifactError(f"{path}: dataset {dataset!r} has no known input shape")
  # The model the run built: `model_used` (a run with --model left at its default records
  # `model` as None), else `model` (results older than `model_used`).
  model = cfg.get("model_used") or cfg.get("model")
  if not model:
    raise ArtifactError(f"{path}: config names no model (neither model_used nor model)")
  try:
    masks = cfg.get("masks") or cfg["algorithm_settings"]["masks"]
    arch = Architecture(
        model=str(model), width=float(cfg["model_width"]), seed=int(cfg["seed"]),
        input_shape=INPUT_SHAPES[dataset],
        num_classes=int((cfg.get("data") or {}).get("num_classes", 10)),
        # Sampled masks threshold at inference like the STE mode: the phone's model is binary.
        mask_mode=str(cfg.get("mask_mode_used", cfg.get("mask_mode", "ste"))).replace("sampled", "ste"),
        score_init=float(cfg.get("score_init", 0.05)),
        kernel_init=str(cfg.get("kernel_init", "signed_constant")))
    shapes = [tuple(int(d) for d in m["shape"]) for m in masks]
    names = [str(m["name"]) for m in masks]
  except (KeyError, TypeError, ValueError) as e:
    raise ArtifactError(f"{path}: config lacks the model settings ({e})") from e
  return RunInfo(run_dir, cfg, arch, shapes, names)


def client_ids(info: RunInfo) -> list[str]:
  if not os.path.isdir(info.states_dir):
    raise ArtifactError(f"{info.states_dir} is missing: the run stored no client states")
  ids = ClientStateStore(info.states_dir, info.shapes, lambda: None).client_ids()
  if not ids:
    raise ArtifactError(f"{info.states_dir} holds no client states")
  return ids


def _sampled_state_store(info: RunInfo):
  """The store of a sampled-mask run (``--upload=sampled``): each state is
  ``OrderedDict(scores, keep (packed uint8), pruned)`` (:mod:`fedmask_tff.algorithms.sampled_masks`)."""
  import collections
  from fedmask_tff.wire.client_state import ArrayStateStore
  template = collections.OrderedDict(
      scores=tuple(np.zeros(s, np.float32) for s in info.shapes),
      keep=tuple(np.zeros((int(np.prod(s)) + 7) // 8, np.uint8) for s in info.shapes),
      pruned=np.int32(0))
  return ArrayStateStore(info.states_dir, lambda: template)


def load_client_masks(info: RunInfo, client_id: str) -> list[np.ndarray]:
  """The client's binary masks (float32 0/1, ``mask_specs`` order) from its stored state: the
  stored ``personal`` masks, or for sampled masks ``1[sigmoid(m_r) >= 0.5] * keep``."""
  sampled = (info.config.get("algorithm_settings") or {}).get("recipe") == "sampled"
  store = (_sampled_state_store(info) if sampled
           else ClientStateStore(info.states_dir, info.shapes, lambda: None))
  try:
    path = store.path(client_id)
  except ValueError as e:
    raise ArtifactError(str(e)) from e
  if not os.path.isfile(path):
    known = ", ".join(client_ids(info)[:5])
    raise ArtifactError(f"client state {path} is missing (client {client_id!r} never trained "
                        f"or does not exist; stored clients include {known})")
  try:
    state = store.get(client_id)
  except ClientStateError as e:
    raise ArtifactError(str(e)) from e
  if sampled:
    from fedmask_tff.wire import bitpack
    return [(np.asarray(s) >= 0).astype(np.float32) * bitpack.unpack_bits_np(k, shape)
            for s, k, shape in zip(state["scores"], state["keep"], info.shapes)]
  return [np.asarray(m, np.float32) for m in state["personal"]]


def masked_model_with_masks(arch: Architecture, masks) -> tf.keras.Model:
  """The run's masked Keras model whose binary masks are exactly ``masks``.

  Scores are set to ``+-1 + logit(tau)`` and ``keep`` to 1, as FedMask's own
  ``evaluate_client`` does, so ``1[sigmoid(score) >= tau] * keep == mask``.
  """
  model = arch.build_masked()
  layers = masked_layers(model)
  thresholds = [l.threshold for l in layers for _ in l.masked_weights]
  kernels, scores, keeps = mask_variables(model)
  if len(masks) != len(scores):
    raise ArtifactError(f"{len(masks)} masks given, the {arch.model} model has {len(scores)}")
  for k, s, p, m, t in zip(kernels, scores, keeps, masks, thresholds):
    m = np.asarray(m, np.float32)
    if tuple(m.shape) != tuple(k.shape.as_list()):
      raise ArtifactError(f"mask of shape {m.shape} does not fit weight {k.name} "
                          f"{k.shape.as_list()} (another model or width?)")
    s.assign(np.where(m > 0, 1.0, -1.0).astype(np.float32) + math.log(t / (1 - t)))
    p.assign(np.ones_like(m))
  return model


def load_client_test_data(run_dir: str, client_id: str):
  """The client's own test examples as an unbatched ``tf.data.Dataset`` of ``{x, y}``.

  Rebuilds the run's federated split from its config (same data settings and
  seed, so the same partition). Raises :class:`ArtifactError` if the data or
  the client is missing.
  """
  return _client_part(run_dir, client_id, "test")


def load_client_calibration_data(run_dir: str, client_id: str):
  """The client's own *training* examples (int8 calibration never sees the test part)."""
  return _client_part(run_dir, client_id, "train")


@functools.lru_cache(maxsize=2)
def _rebuilt_split(run_dir: str):
  from fedmask_tff.data import load_partitioned_fashion_mnist
  cfg = load_run(run_dir).config
  try:
    return load_partitioned_fashion_mnist(
        data_dir=cfg.get("data_dir"), num_clients=int(cfg["num_clients"]),
        partition=cfg["partition"], classes_per_client=int(cfg["classes_per_client"]),
        dirichlet_alpha=float(cfg["dirichlet_alpha"]), test_fraction=float(cfg["test_fraction"]),
        seed=int(cfg["seed"]))
  except Exception as e:  # DataError and friends: report, naming the run
    raise ArtifactError(f"cannot rebuild the data split of run {run_dir}: {e}") from e


def _client_part(run_dir: str, client_id: str, part: str):
  split = _rebuilt_split(os.path.abspath(run_dir))
  if client_id not in split.client_ids:
    raise ArtifactError(f"client {client_id!r} is not in the data split of run {run_dir}")
  return getattr(split, part).create_tf_dataset_for_client(client_id)


def dataset_to_numpy(dataset, limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  xs, ys = [], []
  for i, ex in enumerate(dataset.as_numpy_iterator()):
    if limit is not None and i >= limit:
      break
    xs.append(ex["x"])
    ys.append(ex["y"])
  if not xs:
    raise ArtifactError("the client's test data is empty")
  return np.stack(xs).astype(np.float32), np.asarray(ys, np.int64)
