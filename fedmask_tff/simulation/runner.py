"""The round loop: data, client sampling, client states, evaluation and outputs.

``run(RunConfig)`` is what ``python -m experiments.run`` calls. It validates the
whole configuration before any training, builds the federated data and the
process, runs the rounds (writing ``results.json`` and ``metrics.csv`` after
each), evaluates every client that took part on its own held-out test data, and
returns the results dict.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from typing import Any, Optional

import numpy as np


class ConfigError(ValueError):
  """An impossible or inconsistent run configuration (reported before training)."""


ALGORITHMS = ("fedmask", "local_masks", "standalone", "fedavg", "topk", "bnn_fedavg", "per_fedavg", "lg_fedavg")
from fedmask_tff.data.registry import DATASETS  # noqa: E402  (no TensorFlow import)
PARTITIONS = ("pathological", "dirichlet")
MODELS = ("cnn", "mlp", "vgg16", "har_mlp", "shakespeare_lstm")
# Datasets whose partition file indexes a pooled source (and can be reused with --partition_file).
POOLED_DATASETS = ("fashion_mnist",)


@dataclasses.dataclass
class RunConfig:
  """Every setting of a run; all of it is written to ``results.json["config"]``."""
  algorithm: str = "fedmask"
  dataset: str = "fashion_mnist"
  data_dir: Optional[str] = None
  partition: str = "pathological"
  classes_per_client: int = 2
  dirichlet_alpha: float = 0.5
  num_clients: int = 100
  clients_per_round: int = 10
  rounds: int = 100
  local_epochs: int = 2
  batch_size: int = 32
  learning_rate: Optional[float] = None  # None: the algorithm's documented default (FedMask: 30)
  prune_rate: float = 0.2
  prune_last_layers: Optional[int] = None  # None: the model's (paper: VGG-16 8, others 2)
  mask_mode: str = "ste"
  score_init: float = 0.05
  score_init_noise: float = 0.0  # fedmask: uniform noise in [-a, a] around score_init
  upload: str = "score_sign"  # fedmask: what the 1 bit per element says (see FedMaskConfig)
  server_score_step: float = 0.03  # fedmask, upload=score_sign: the server's step on its scores
  personal_head: bool = True  # fedmask, upload=score_sign: pruned layers keep the client's scores
  global_weight: float = 0.5  # fedmask, upload=score_sign: start from w*G + (1-w)*own scores
  global_mask: bool = False  # fedmask, upload=mask/bernoulli: clients start from the server's m^T
  prune_at_init: bool = False  # fedmask: every client prunes before round 1 (Algorithm 1, 4-6)
  score_restart: str = "scaled_logit"
  restart_scale: Optional[float] = None  # None: the rule's default (masking.DEFAULT_RULE_SCALE)
  model: Optional[str] = None  # None: the data set's model (fashion_mnist: cnn; har: har_mlp; ...)
  model_width: float = 1.0
  test_fraction: float = 0.2
  validation_fraction: float = 0.0  # > 0: evaluate on this share of each client's train data
  seed: int = 0
  partition_file: Optional[str] = None
  server_learning_rate: float = 1.0
  topk_fraction: float = 0.1
  error_feedback: bool = False
  per_fedavg_variant: str = "fo"
  per_fedavg_alpha: Optional[float] = None
  per_fedavg_beta: Optional[float] = None
  lg_global_layers: int = 2
  dropout_rate: float = 0.0
  group_lasso: float = 0.0
  examples_per_client: int = 0
  secure_aggregation: bool = False
  unseen_clients: float = 0.0
  uplink_coding: str = "none"
  downlink_bits: int = 0
  downlink_stochastic: bool = False
  ldp_epsilon: Optional[float] = None
  output_dir: str = "runs/fedmask"
  eval_every: int = 0
  eval_batch_size: int = 256
  max_concurrent_clients: int = -1
  workers: Optional[str] = None  # "host:port,...": TFF workers (python -m fedmask_tff.runtime.worker)
  worker_memory_limit_mb: float = 0.0  # restart the local worker above this RSS (0: half the RAM)
  client_datasets: str = "driver"  # "workers": built inside the round's computation from files
  client_data_dir: Optional[str] = None  # where those files go (default OUTPUT_DIR/client_data)
  overwrite: bool = False
  progress: bool = True

  def validate(self) -> "RunConfig":
    """Raises :class:`ConfigError` naming the first impossible setting."""
    def need(ok, message):
      if not ok:
        raise ConfigError(message)

    need(self.algorithm in ALGORITHMS, f"--algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
    need(self.dataset in DATASETS, f"--dataset must be one of {DATASETS}, got {self.dataset!r}")
    need(self.partition in PARTITIONS, f"--partition must be one of {PARTITIONS}, got {self.partition!r}")
    need(self.model is None or self.model in MODELS, f"--model must be one of {MODELS}, got {self.model!r}")
    need(math.isfinite(self.group_lasso) and self.group_lasso >= 0,
         f"--group_lasso must be a finite number >= 0, got {self.group_lasso}")
    need(not self.secure_aggregation or self.algorithm == "fedmask",
         "--secure_aggregation is implemented for --algorithm=fedmask (its rule needs only two sums)")
    fedmask_only = [name for name, on in (("uplink_coding", self.uplink_coding != "none"),
                                          ("downlink_bits", self.downlink_bits != 0),
                                          ("downlink_stochastic", self.downlink_stochastic),
                                          ("ldp_epsilon", self.ldp_epsilon is not None)) if on]
    need(not fedmask_only or self.algorithm == "fedmask",
         f"--{', --'.join(fedmask_only)} apply to --algorithm=fedmask only")
    need(self.uplink_coding in ("none", "entropy"),
         f"--uplink_coding must be 'none' or 'entropy', got {self.uplink_coding!r}")
    need(0 <= self.downlink_bits <= 16,
         f"--downlink_bits must be 0 (float32), 1 (the vote's decision) or in [2, 16], got {self.downlink_bits}")
    need(not self.downlink_stochastic or self.downlink_bits >= 2,
         "--downlink_stochastic needs --downlink_bits >= 2")
    need(self.ldp_epsilon is None or (self.ldp_epsilon > 0 and not math.isnan(self.ldp_epsilon)),
         f"--ldp_epsilon must be > 0 (leave it unset for no LDP), got {self.ldp_epsilon}")
    need(not (self.uplink_coding == "entropy" and self.ldp_epsilon is not None),
         "--uplink_coding=entropy codes against the previous upload, which --ldp_epsilon hides "
         "from the server: use one of them")
    need(0.0 <= self.unseen_clients < 1.0, f"--unseen_clients must be in [0, 1), got {self.unseen_clients}")
    need(self.examples_per_client >= 0, f"--examples_per_client must be >= 0, got {self.examples_per_client}")
    need(self.partition_file is None or self.dataset in POOLED_DATASETS,
         f"--partition_file is supported for {POOLED_DATASETS}; {self.dataset}'s split is fixed by "
         "the data files, the seed and the flags (its partition.json records it)")
    need(self.num_clients >= 2, f"--num_clients must be >= 2, got {self.num_clients}")
    need(1 <= self.clients_per_round <= self.num_clients,
         f"--clients_per_round must be in [1, num_clients={self.num_clients}], got {self.clients_per_round}")
    need(self.rounds >= 1, f"--rounds must be >= 1, got {self.rounds}")
    need(self.local_epochs >= 1, f"--local_epochs must be >= 1, got {self.local_epochs}")
    need(self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}")
    need(self.learning_rate is None or (math.isfinite(self.learning_rate) and self.learning_rate > 0),
         f"--learning_rate must be a finite number > 0, got {self.learning_rate}")
    need(math.isfinite(self.server_learning_rate) and self.server_learning_rate > 0,
         f"--server_learning_rate must be a finite number > 0, got {self.server_learning_rate}")
    need(0.0 < self.topk_fraction <= 1.0, f"--topk_fraction must be in (0, 1], got {self.topk_fraction}")
    need(self.per_fedavg_variant in ("fo", "hf"),
         f"--per_fedavg_variant must be 'fo' or 'hf', got {self.per_fedavg_variant!r}")
    for name in ("per_fedavg_alpha", "per_fedavg_beta"):
      value = getattr(self, name)
      need(value is None or (math.isfinite(value) and value > 0),
           f"--{name} must be a finite number > 0, got {value}")
    need(0.0 <= self.dropout_rate < 1.0, f"--dropout_rate must be in [0, 1), got {self.dropout_rate}")
    need(self.lg_global_layers >= 1, f"--lg_global_layers must be >= 1, got {self.lg_global_layers}")
    if self.partition_file is not None:
      need(os.path.isfile(self.partition_file), f"--partition_file {self.partition_file!r} does not exist")
    need(0.0 < self.prune_rate <= 1.0, f"--prune_rate (the fraction kept) must be in (0, 1], got {self.prune_rate}")
    need(self.prune_last_layers is None or self.prune_last_layers >= 0,
         f"--prune_last_layers must be >= 0, got {self.prune_last_layers}")
    need(self.mask_mode in ("ste", "soft"), f"--mask_mode must be 'ste' or 'soft', got {self.mask_mode!r}")
    need(math.isfinite(self.score_init), f"--score_init must be finite, got {self.score_init}")
    need(self.upload in ("mask", "bernoulli", "score_sign"),
         f"--upload must be 'mask', 'bernoulli' or 'score_sign', got {self.upload!r}")
    need(math.isfinite(self.server_score_step) and self.server_score_step > 0,
         f"--server_score_step must be a finite number > 0, got {self.server_score_step}")
    need(not (self.upload == "score_sign" and self.downlink_bits == 1),
         "--downlink_bits=1 sends the vote's decision of --upload=mask; with --upload=score_sign "
         "the server's real-valued scores go down: use 0 (float32) or 2..16 bits")
    need(not (self.upload != "mask" and self.uplink_coding != "none"),
         "--uplink_coding=entropy codes the thresholded mask against the previous one; it "
         "applies to --upload=mask")
    need(not (self.global_mask and self.upload == "score_sign"),
         "--global_mask keeps the binary global mask m^T of --upload=mask or bernoulli; "
         "--upload=score_sign already starts clients from the server's scores")
    need(not (self.global_mask and self.downlink_bits >= 2),
         f"--global_mask sends m^T down as 1 bit per kept element; --downlink_bits="
         f"{self.downlink_bits} does not apply (use 0 or 1)")
    need(0.0 < self.global_weight <= 1.0 and not math.isnan(self.global_weight),
         f"--global_weight must be in (0, 1], got {self.global_weight}")
    need(math.isfinite(self.score_init_noise) and self.score_init_noise >= 0,
         f"--score_init_noise must be a finite number >= 0, got {self.score_init_noise}")
    from fedmask_tff.masks.vote_rules import RESTART_RULES
    need(self.score_restart in RESTART_RULES,
         f"--score_restart must be one of {RESTART_RULES}, got {self.score_restart!r}")
    need(self.restart_scale is None or (math.isfinite(self.restart_scale) and self.restart_scale > 0),
         f"--restart_scale must be a finite number > 0, got {self.restart_scale}")
    need(self.partition != "pathological" or self.classes_per_client >= 1,
         f"--classes_per_client must be >= 1, got {self.classes_per_client}")
    need(self.partition != "dirichlet" or (math.isfinite(self.dirichlet_alpha) and self.dirichlet_alpha > 0),
         f"--dirichlet_alpha must be a finite number > 0, got {self.dirichlet_alpha}")
    need(0.0 < self.test_fraction < 1.0, f"--test_fraction must be in (0, 1), got {self.test_fraction}")
    need(0.0 <= self.validation_fraction < 1.0 and not math.isnan(self.validation_fraction),
         f"--validation_fraction must be in [0, 1), got {self.validation_fraction}")
    need(math.isfinite(self.model_width) and self.model_width > 0,
         f"--model_width must be > 0, got {self.model_width}")
    need(self.eval_every >= 0, f"--eval_every must be >= 0, got {self.eval_every}")
    need(self.eval_batch_size >= 1, f"--eval_batch_size must be >= 1, got {self.eval_batch_size}")
    need(bool(self.output_dir), "--output_dir must be set")
    need(math.isfinite(self.worker_memory_limit_mb) and self.worker_memory_limit_mb >= 0,
         f"--worker_memory_limit_mb must be >= 0 (0: half the machine's memory), "
         f"got {self.worker_memory_limit_mb}")
    need(self.client_datasets in ("driver", "workers"),
         f"--client_datasets must be 'driver' or 'workers', got {self.client_datasets!r}")
    need(self.client_data_dir is None or self.client_datasets == "workers",
         "--client_data_dir is where --client_datasets=workers writes client files; it needs that flag")
    if self.workers is not None:
      from fedmask_tff.runtime.worker import parse_workers
      try:
        parse_workers(self.workers)
      except ValueError as e:
        raise ConfigError(str(e)) from e
      need(self.max_concurrent_clients == -1,
           "--max_concurrent_clients caps the local worker; with --workers give each worker "
           "--max_concurrent_computation_calls instead")
    if self.data_dir is not None:
      need(os.path.isdir(self.data_dir), f"--data_dir {self.data_dir!r} is not a directory")
    if not self.overwrite:
      state = resume_state(self)
      need(state != "complete", f"{os.path.join(self.output_dir, 'results.json')} exists and the run "
           "is complete: choose another --output_dir or pass --overwrite")
      need(state != "no_checkpoint", f"{os.path.join(self.output_dir, 'results.json')} exists but "
           "there is no checkpoint to resume from: choose another --output_dir or pass --overwrite")
    return self


# Settings that may differ between a run and its resumption (they do not change results).
RESUME_FREE = ("overwrite", "progress", "max_concurrent_clients", "output_dir", "workers",
               "worker_memory_limit_mb",
               "client_datasets", "client_data_dir")


# FedMask's own settings: they change nothing for the other algorithms.
FEDMASK_SETTINGS = ("score_restart", "restart_scale", "score_init_noise", "upload",
                    "server_score_step", "personal_head", "global_weight", "global_mask",
                    "prune_at_init")


# FedMask's communication and privacy options (validate() refuses them for other algorithms).
FEDMASK_COMMUNICATION = ("uplink_coding", "downlink_bits", "downlink_stochastic",
                         "secure_aggregation", "ldp_epsilon")


def unused_settings(config: RunConfig) -> set[str]:
  """FedMask settings that cannot change ``config``'s results (other algorithms; the vote rule
  under ``score_sign``; the server-score settings under the mask uploads; all but the initial
  scores for ``local_masks``)."""
  if config.algorithm == "local_masks":  # no aggregation: only the initial scores and pruning
    return set(FEDMASK_SETTINGS + FEDMASK_COMMUNICATION) - {"score_init_noise", "prune_at_init"}
  if config.algorithm != "fedmask":
    return set(FEDMASK_SETTINGS + FEDMASK_COMMUNICATION)
  if config.upload == "score_sign":
    return {"score_restart", "restart_scale", "global_mask"}
  return {"server_score_step", "personal_head", "global_weight"}


def differing_settings(stored: dict, config: RunConfig) -> list[str]:
  """Names of the settings (those that change results) where a stored ``results.json``
  config differs from ``config``; a setting the stored results predate counts as its default.
  FedMask's own settings are compared only for ``fedmask`` and ``local_masks`` runs."""
  default = RunConfig()
  ignored = set(RESUME_FREE) | unused_settings(config)
  return [f.name for f in dataclasses.fields(config)
          if f.name not in ignored
          and stored.get(f.name, getattr(default, f.name)) != getattr(config, f.name)]


def resume_state(config: RunConfig) -> str:
  """``"fresh"``, ``"resume"``, ``"complete"`` or ``"no_checkpoint"`` for ``config.output_dir``.

  Raises :class:`ConfigError` when the directory holds an unfinished run of
  other settings (naming them).
  """
  import json
  results_path = os.path.join(config.output_dir, "results.json")
  if not os.path.exists(results_path):
    return "fresh"
  try:
    with open(results_path) as f:
      results = json.load(f)
  except (OSError, ValueError):
    return "no_checkpoint"
  if results.get("complete"):
    return "complete"
  if not os.path.exists(os.path.join(config.output_dir, "checkpoint.npz")):
    return "no_checkpoint"
  differ = differing_settings(results.get("config", {}), config)
  if differ:
    raise ConfigError(f"{config.output_dir} holds an unfinished run with other settings "
                      f"({', '.join('--' + d for d in differ)}): rerun with the same flags to "
                      "resume it, or pass --overwrite to start again")
  return "resume"


def _unseen_clients(client_ids: list, fraction: float, seed: int) -> set:
  """``--unseen_clients``: ``round(fraction * N)`` clients held out of training (late joiners)."""
  count = int(math.floor(fraction * len(client_ids) + 0.5))
  if count <= 0:
    return set()
  rng = np.random.default_rng([seed, 104729])
  return set(rng.choice(sorted(client_ids), size=count, replace=False).tolist())


def _dropped_clients(sampled: list, rate: float, seed: int, round_num: int) -> set:
  """``--dropout_rate``: the sampled clients that fail this round (never all of them).

  ``round(rate * n)`` of the ``n`` sampled clients, at most ``n - 1``, drawn from
  an RNG of its own (seeded by the run's seed and the round), so that drop-out
  does not change which clients are sampled.
  """
  if rate <= 0 or not sampled:
    return set()
  count = min(len(sampled) - 1, int(math.floor(rate * len(sampled) + 0.5)))
  rng = np.random.default_rng([seed, round_num, 7919])
  return set(rng.choice(sampled, size=count, replace=False).tolist()) if count > 0 else set()


_STOP_REQUESTED = False


def request_stop(*_) -> None:
  """SIGINT handler (``experiments.run``): raises KeyboardInterrupt now and remembers it, so that
  an interrupt swallowed where Python ignores exceptions (a ``__del__`` or a garbage-collector
  callback) still stops the run after the round in progress is saved."""
  global _STOP_REQUESTED
  _STOP_REQUESTED = True
  raise KeyboardInterrupt


def _check_stop() -> None:
  if _STOP_REQUESTED:
    raise KeyboardInterrupt


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _client_seed(seed: int, round_num: int, client_index: int) -> int:
  return int(np.random.SeedSequence([seed, round_num, client_index]).generate_state(1)[0] >> 1)


# Data sets federated by nature: one client per writer, role or subject (no partitioning).
NATURAL_CLIENTS = {"emnist": "writer", "femnist_leaf": "writer", "shakespeare": "role",
                   "shakespeare_leaf": "role", "shakespeare_h5": "role", "har": "subject"}


def _loading_words(config: RunConfig) -> str:
  """What loading does, in words: partitioning a pooled data set, or taking its own clients."""
  if config.dataset in NATURAL_CLIENTS:
    return (f"loading {config.dataset}: federated by nature, one client per "
            f"{NATURAL_CLIENTS[config.dataset]} (at most --num_clients={config.num_clients})")
  if config.partition_file:
    return f"loading {config.dataset} and splitting it into clients as --partition_file {config.partition_file} says"
  how = (f"dirichlet, alpha {config.dirichlet_alpha:g}" if config.partition == "dirichlet"
         else f"pathological, {config.classes_per_client} classes per client")
  return f"loading {config.dataset} and partitioning it into {config.num_clients} clients ({how})"


def load_split(config: RunConfig):
  """The run's :class:`FederatedSplit` (from ``--partition_file`` when given)."""
  from fedmask_tff import data as data_lib
  if config.dataset != "fashion_mnist":
    options = {}
    if config.dataset == "cifar10":
      options["classes_per_client"] = config.classes_per_client
      if config.examples_per_client:
        options["examples_per_client"] = config.examples_per_client
    return data_lib.load_federated(config.dataset, data_dir=config.data_dir,
                                   num_clients=config.num_clients, seed=config.seed,
                                   test_fraction=config.test_fraction, **options)
  return data_lib.load_partitioned_fashion_mnist(
      data_dir=config.data_dir, num_clients=config.num_clients, partition=config.partition,
      classes_per_client=config.classes_per_client, dirichlet_alpha=config.dirichlet_alpha,
      test_fraction=config.test_fraction, seed=config.seed, partition_file=config.partition_file)


def with_shared_partition(config: RunConfig, path: str) -> RunConfig:
  """For runs that must share one partition (a comparison, a study): on the pooled data sets,
  writes the split of ``config`` to ``path`` unless that file exists, and returns ``config``
  reading its clients from ``path``. Other data sets are split by their files, the seed and
  the flags alike for every run: ``config`` is returned unchanged."""
  if config.dataset not in POOLED_DATASETS:
    return config
  if not os.path.exists(path):
    from fedmask_tff.data import partition_file as partition_file_lib
    partition_file_lib.save_split_partition(path, load_split(config), config.dataset)
    _log(f"[fedmask_tff] partition written to {path}")
  return dataclasses.replace(config, partition_file=path)


def run(config: RunConfig) -> dict[str, Any]:
  """Runs one configuration end to end; returns the results written to results.json.

  A local TFF worker this run starts is stopped when it ends, so that runs one after another in
  one process (studies, comparisons) each start with a fresh worker: the worker keeps the memory
  of every computation and dataset it has seen (a 7-algorithm study on HAR grew one to 13 GB).
  """
  from fedmask_tff import runtime
  owned = not runtime.context_installed()
  try:
    return _run(config)
  finally:
    if owned:
      runtime.reset_local_context()


def _run(config: RunConfig) -> dict[str, Any]:
  config.validate()
  # Heavy imports after validation, so bad flags fail fast.
  import tensorflow as tf
  from fedmask_tff import algorithms, runtime
  from fedmask_tff.algorithms.base import BuildContext
  from fedmask_tff.data import partition_file as partition_file_lib
  from fedmask_tff.simulation.outputs import RunOutputs

  t_start = time.perf_counter()
  tf.keras.utils.set_random_seed(config.seed)
  _log(f"[fedmask_tff] {_loading_words(config)} ...")
  resuming = not config.overwrite and resume_state(config) == "resume"
  partition_path = os.path.join(config.output_dir, "partition.json")
  reuse = resuming and config.dataset in POOLED_DATASETS
  split = load_split(dataclasses.replace(config, partition_file=partition_path) if reuse else config)
  partition_split = split  # partition.json records the clients' real train/test split
  if config.validation_fraction > 0:
    from fedmask_tff.data.validation import holdout_validation
    split = holdout_validation(split, config.validation_fraction, config.seed)
    _log(f"[fedmask_tff] --validation_fraction={config.validation_fraction:g}: training on the rest of "
         "each client's training examples and evaluating on the held-out share; test data unused")
  unseen = _unseen_clients(split.client_ids, config.unseen_clients, config.seed)
  training_ids = [c for c in split.client_ids if c not in unseen]
  if config.clients_per_round > len(training_ids):
    raise ConfigError(f"--clients_per_round={config.clients_per_round} but {config.dataset} has "
                      f"only {len(training_ids)} training clients here"
                      + (f" ({len(unseen)} held out by --unseen_clients)" if unseen else ""))
  from fedmask_tff import models
  model_name = models.model_for(config.dataset, config.model)
  prune_last = models.prune_last_layers(model_name, config.prune_last_layers)
  summary = split.summary()
  _log(f"[fedmask_tff] data: {summary}")

  if config.overwrite and os.path.isdir(config.output_dir):
    for name in ("client_states", "results.json", "metrics.csv", "partition.json", "checkpoint.npz",
                 "tensorboard", "global_model.weights.h5", "client_data"):
      target = os.path.join(config.output_dir, name)
      if os.path.isdir(target):
        shutil.rmtree(target)
      elif os.path.exists(target):
        os.remove(target)

  os.makedirs(config.output_dir, exist_ok=True)
  if not resuming:
    partition_file_lib.save_split_partition(partition_path, partition_split, config.dataset)
  if config.workers:
    try:
      addresses = runtime.install_remote_context(config.workers)
    except runtime.WorkerError as e:
      raise ConfigError(str(e)) from e
    _log(f"[fedmask_tff] each round split over {len(addresses)} TFF workers: {', '.join(addresses)}")
  else:
    runtime.install_local_context(max_concurrent_computation_calls=config.max_concurrent_clients,
                                  log_path=os.path.join(config.output_dir, "tff_worker.log"))
  sample_x = next(iter(split.train.create_tf_dataset_for_client(split.client_ids[0])))["x"]
  input_shape = tuple(sample_x.shape.as_list())
  element_spec = split.train.element_type_structure
  batched_spec = type(element_spec)(
      (k, tf.TensorSpec([None] + v.shape.as_list(), v.dtype)) for k, v in element_spec.items())
  learning_rate = (config.learning_rate if config.learning_rate is not None
                   else algorithms.default_learning_rate(config.algorithm))
  context = BuildContext(
      input_shape=input_shape, num_classes=split.num_classes, model=model_name,
      model_width=config.model_width, seed=config.seed, element_spec=batched_spec,
      eval_element_spec=batched_spec, local_epochs=config.local_epochs,
      learning_rate=learning_rate, batch_size=config.batch_size, mask_mode=config.mask_mode,
      score_init=config.score_init)
  try:
    algorithm = algorithms.build_algorithm(
        config.algorithm, context, dataclasses.replace(config, model=model_name,
                                                       prune_last_layers=prune_last))
  except ValueError as e:
    raise ConfigError(str(e)) from e
  # Several workers: rounds as two TFF calls, each split over the workers without recomputation.
  algorithm.split_round = bool(config.workers)
  num_params = algorithm.model_parameters
  dense_bits = 32 * num_params
  store = algorithm.make_store(os.path.join(config.output_dir, "client_states"))

  cfg = dataclasses.asdict(config)
  cfg.update(model_used=model_name, prune_last_layers_used=prune_last, learning_rate_used=learning_rate, algorithm_settings=algorithm.settings,
             algorithm_description=algorithm.description, model_parameters=num_params,
             partition_file_written=partition_path, data=summary)
  if config.algorithm in ("fedmask", "local_masks"):  # Kept at the top level, where earlier results had them.
    cfg.update({k: algorithm.settings[k] for k in
                ("mask_mode_used", "masked_parameters", "pruned_parameters", "masks")})
  checkpoint_path = os.path.join(config.output_dir, "checkpoint.npz")
  rng = np.random.default_rng(config.seed)
  server_state = algorithm.initialize()
  participated: set[str] = set()
  first_round, previous_rows, initialization = 1, [], None
  if resuming:
    from fedmask_tff.simulation import checkpoint
    try:
      ckpt = checkpoint.load(checkpoint_path, server_state)
    except checkpoint.CheckpointError as e:
      raise ConfigError(str(e)) from e
    server_state, participated = ckpt["server_state"], ckpt["participated"]
    rng.bit_generator.state = ckpt["rng_state"]
    if ckpt["encoded_client_states"] is not None:  # Finish the checkpointed round's writes.
      for c, enc in zip(ckpt["round_clients"], ckpt["encoded_client_states"]):
        store.put(c, store.decode(enc, f"{checkpoint_path}[{c}]"))
    first_round = ckpt["round"] + 1
    with open(os.path.join(config.output_dir, "results.json")) as f:
      import json
      previous = json.load(f)
    previous_rows = [r for r in previous["rounds"] if r["round"] <= ckpt["round"]]
    initialization = previous.get("initialization")
    _log(f"[fedmask_tff] resuming {config.output_dir} after round {ckpt['round']}")
  outputs = RunOutputs(config.output_dir, config.algorithm, config.dataset, cfg, rounds=previous_rows)
  client_index = {cid: i for i, cid in enumerate(split.client_ids)}

  def train_dataset(cid, round_num):
    ds = split.train.create_tf_dataset_for_client(cid)
    return ds.shuffle(4096, seed=_client_seed(config.seed, round_num, client_index[cid]),
                      reshuffle_each_iteration=True).batch(config.batch_size)

  client_files_by_id = None
  if config.client_datasets == "workers":
    from fedmask_tff.data import client_files
    files_dir = config.client_data_dir or os.path.join(config.output_dir, "client_data")
    _log(f"[fedmask_tff] writing client training files to {files_dir} (built inside each round's "
         "computation) ...")
    client_files_by_id = client_files.write_client_files(files_dir, split.train, split.client_ids)
    algorithm.dataset_computation = client_files.dataset_computation(
        split.train.element_type_structure, config.batch_size, graph_seed=config.seed,
        repeats=algorithm.dataset_repeats)

  def train_input(cid, round_num):
    """What a round's computation receives for a client: its dataset, or (with
    --client_datasets=workers) the source the computation builds the same dataset from."""
    if client_files_by_id is None:
      return train_dataset(cid, round_num)
    path, examples = client_files_by_id[cid]
    return client_files.source(path, _client_seed(config.seed, round_num, client_index[cid]), examples)

  def evaluate(server_state, client_ids, extra=False):
    """``{kind: {client: (correct, examples, loss_sum)}}`` on each client's own test data.

    kind "personal": each client's personalized model (see the algorithm);
    with ``extra``, also the algorithm's further evaluations (FedMask:
    "after_aggregation"). Each client's state and data are loaded once.
    """
    per_kind: dict[str, dict] = {"personal": {}}
    chunk = 20
    for i in range(0, len(client_ids), chunk):
      ids = client_ids[i:i + chunk]
      tests = [split.test.create_tf_dataset_for_client(c).batch(config.eval_batch_size) for c in ids]
      trains = [train_dataset(c, 0) for c in ids]  # round 0: a fixed order, for adaptation (Per-FedAvg)
      states = [store.get(c) for c in ids] if store is not None else None
      results = {"personal": algorithm.evaluate(server_state, tests, states, trains)}
      if extra:
        results.update(algorithm.evaluate_extra(server_state, tests, states, trains))
      for kind, metrics in results.items():
        for c, m in zip(ids, metrics):
          per_kind.setdefault(kind, {})[c] = (float(m["correct"]), float(m["examples"]),
                                              float(m["loss_sum"]))
    return per_kind

  def summarize(per_client):
    correct = sum(v[0] for v in per_client.values())
    examples = sum(v[1] for v in per_client.values())
    accs = {c: v[0] / v[1] for c, v in per_client.items() if v[1] > 0}
    return {"accuracy": correct / examples if examples else float("nan"),
            "accuracy_client_mean": float(np.mean(list(accs.values()))) if accs else float("nan"),
            "loss": sum(v[2] for v in per_client.values()) / examples if examples else float("nan"),
            "accuracy_per_client": accs, "evaluated_clients": len(accs),
            "test_examples": int(examples)}

  if algorithm.prepares_clients and not resuming:
    initialization = _prepare_clients(algorithm, store, training_ids, lambda c: train_input(c, 0))
  if initialization is not None:
    outputs.results["initialization"] = initialization
    outputs.save()
  totals = {"uplink_bits": sum(r["uplink_bits"] for r in previous_rows),
            "downlink_bits": sum(r["downlink_bits"] for r in previous_rows),
            "train_flops": sum(r["train_flops"] for r in previous_rows)}
  if initialization is not None:
    totals["uplink_bits"] += initialization["uplink_bits"]
    totals["train_flops"] += initialization["train_flops"]
  _log(f"[fedmask_tff] {config.algorithm}: {num_params:,} model parameters, {config.rounds} rounds x "
       f"{config.clients_per_round} clients, learning rate {learning_rate:g}, "
       f"setup {time.perf_counter() - t_start:.1f} s")
  tensorboard = tf.summary.create_file_writer(os.path.join(config.output_dir, "tensorboard"))
  progress = _progress(config.rounds, enabled=config.progress, initial=first_round - 1)
  memory_limit_mb = config.worker_memory_limit_mb or (
      os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 / 2)
  try:
    for round_num in range(first_round, config.rounds + 1):
      t0 = time.perf_counter()
      sampled = sorted(rng.choice(training_ids, size=config.clients_per_round, replace=False).tolist())
      dropped = _dropped_clients(sampled, config.dropout_rate, config.seed, round_num)
      sampled = [c for c in sampled if c not in dropped]
      states = [store.get(c) for c in sampled] if store is not None else None
      datasets = [train_input(c, round_num) for c in sampled]
      server_state, new_states, train = algorithm.next(server_state, datasets, states)
      examples = sum(m["examples"] for m in train)
      loss = sum(m["loss_sum"] for m in train) / examples if examples else float("nan")
      diverged = sum(m.get("diverged", 0) for m in train)
      if not examples and diverged:  # Checked before storing: finished rounds stay intact.
        raise FloatingPointError(f"round {round_num}: every client's training diverged "
                                 f"({diverged} of {len(train)}); lower --learning_rate")
      if not math.isfinite(loss):
        raise FloatingPointError(f"round {round_num}: training loss is {loss}; lower --learning_rate")
      participated.update(sampled)
      # Checkpoint first, then the client files (see fedmask_tff.simulation.checkpoint).
      from fedmask_tff.simulation import checkpoint
      encoded = [store.encode(st, c) for c, st in zip(sampled, new_states)] if store is not None else None
      checkpoint.save(checkpoint_path, round_num, server_state, rng.bit_generator.state, participated,
                      sampled, encoded)
      if store is not None:
        for c, st in zip(sampled, new_states):
          store.put(c, st)
      restarted_now = False
      if not config.workers and runtime.local_worker_rss_mb() > memory_limit_mb:
        # TFF's worker keeps memory from round to round (measured: +400 MB per round with
        # HAR's 1.7M-element masks, OOM-killed at 15.5 GB); the round is saved, so a fresh
        # worker continues with identical results.
        _log(f"[fedmask_tff] round {round_num}: TFF worker at {runtime.local_worker_rss_mb():.0f} MB "
             f"(limit {memory_limit_mb:.0f} MB); restarting it")
        runtime.restart_local_worker()
        restarted_now = True
      wall = time.perf_counter() - t0
      up = [int(m["uplink_bits"]) for m in train]
      down = [int(m["downlink_bits"]) for m in train]
      flops = [float(m["train_flops"]) for m in train]
      row = {"round": round_num, "train_loss": loss,
             "uplink_bits": sum(up), "downlink_bits": sum(down),
             "uplink_bits_per_client": sum(up) / len(up), "downlink_bits_per_client": sum(down) / len(down),
             "train_flops": sum(flops), "train_flops_per_client": sum(flops) / len(flops),
             "clients": len(sampled), "examples": examples, "wall_s": wall, "worker_restarted": restarted_now, "sampled_clients": sampled,
             "dropped_clients": sorted(dropped),
             "rejected_uploads": int(sum(1 - m.get("upload_valid", 1) for m in train)),
             "diverged_clients": int(sum(m.get("diverged", 0) for m in train)),
             "uplink_bits_by_client": dict(zip(sampled, up)),
             "uplink_bits_per_param": sum(up) / len(up) / num_params,
             "downlink_bits_per_param": sum(down) / len(down) / num_params,
             "downlink_bits_by_client": dict(zip(sampled, down))}
      if "uplink_bits_packed" in train[0]:
        row["uplink_bits_packed_per_client"] = sum(m["uplink_bits_packed"] for m in train) / len(train)
      if "pruned" in train[0]:
        row["pruned_clients"] = int(sum(m["pruned"] for m in train))
        row["mask_density"] = (sum(m["mask_ones"] for m in train)
                               / max(1.0, sum(m["mask_kept"] for m in train)))
      if config.eval_every and (round_num % config.eval_every == 0) and round_num != config.rounds:
        row.update({k: v for k, v in summarize(evaluate(server_state, sorted(participated))["personal"]).items()
                    if k in ("accuracy", "accuracy_client_mean", "evaluated_clients")})
      totals["uplink_bits"] += row["uplink_bits"]
      totals["downlink_bits"] += row["downlink_bits"]
      totals["train_flops"] += row["train_flops"]
      outputs.add_round(row)
      _tensorboard_scalars(tensorboard, round_num, row)
      progress.update(round_num, row)
      _check_stop()
  finally:
    progress.close()

  global_model = algorithm.global_model(server_state)
  if global_model is not None:
    model_fn, weights = global_model
    model = model_fn()
    for variable, value in zip(model.trainable_weights + model.non_trainable_weights, weights):
      variable.assign(value)
    model.save_weights(os.path.join(config.output_dir, "global_model.weights.h5"))
  _log("[fedmask_tff] evaluating every client that took part on its own test data ...")
  evaluated = evaluate(server_state, sorted(participated), extra=True)
  final = summarize(evaluated["personal"])
  final["evaluated_on"] = "validation" if config.validation_fraction > 0 else "test"
  final["model"] = algorithm.description
  for kind, per_client in evaluated.items():
    if kind != "personal":
      other = summarize(per_client)
      final[f"accuracy_{kind}"] = other["accuracy"]
      final[f"accuracy_{kind}_client_mean"] = other["accuracy_client_mean"]
  final["never_sampled_clients"] = len(training_ids) - len(participated)
  if config.ldp_epsilon is not None:  # Basic composition over a client's rounds (fedmask_tff.wire.ldp).
    times = {}
    for r in outputs.results["rounds"]:
      for c in r["sampled_clients"]:
        times[c] = times.get(c, 0) + 1
    final["ldp"] = {
        "mechanism": "randomized response on every uploaded mask bit",
        "epsilon_per_element_per_round": config.ldp_epsilon,
        "epsilon_per_element_by_client": {c: n * config.ldp_epsilon for c, n in sorted(times.items())},
        "epsilon_per_element_max": max(times.values(), default=0) * config.ldp_epsilon,
        "note": "basic composition over the rounds a client took part in, per mask element; "
                "correlated bits, the pruning mask and participation are not protected"}
  if unseen:
    _log(f"[fedmask_tff] {len(unseen)} unseen clients join late: one round of local client work "
         "from the server's current view, then evaluation ...")
    per_client = {}
    ids = sorted(unseen)
    for i in range(0, len(ids), 20):
      chunk = ids[i:i + 20]
      trains = [train_dataset(c, config.rounds + 1) for c in chunk]
      states = algorithm.late_joiner_states(server_state, store, len(chunk))
      _, new_states, _ = algorithm.next(
          server_state, [train_input(c, config.rounds + 1) for c in chunk], states)
      tests = [split.test.create_tf_dataset_for_client(c).batch(config.eval_batch_size) for c in chunk]
      for c, m in zip(chunk, algorithm.evaluate(server_state, tests, new_states, trains)):
        per_client[c] = (float(m["correct"]), float(m["examples"]), float(m["loss_sum"]))
    late = summarize(per_client)
    final["accuracy_unseen"] = late["accuracy"]
    final["accuracy_unseen_client_mean"] = late["accuracy_client_mean"]
    final["accuracy_unseen_per_client"] = late["accuracy_per_client"]
    final["unseen_clients"] = ids
  rounds = outputs.results["rounds"]
  outputs.results["final"] = final
  outputs.results["totals"] = {
      "uplink_bits": totals["uplink_bits"], "downlink_bits": totals["downlink_bits"],
      "train_flops": totals["train_flops"],
      "rounds": len(rounds), "wall_s": time.perf_counter() - t_start,
      "train_wall_s": float(sum(r["wall_s"] for r in rounds)),
      "uplink_bits_per_client_round": float(np.mean([r["uplink_bits_per_client"] for r in rounds])),
      "downlink_bits_per_client_round": float(np.mean([r["downlink_bits_per_client"] for r in rounds])),
      "train_flops_per_client_round": float(np.mean([r["train_flops_per_client"] for r in rounds])),
      "uplink_bits_per_param": float(np.mean([r["uplink_bits_per_client"] for r in rounds])) / num_params,
      "downlink_bits_per_param": float(np.mean([r["downlink_bits_per_client"] for r in rounds])) / num_params,
      "dense_fedavg_bits_per_client_round_each_way": dense_bits,
  }
  _tensorboard_scalars(tensorboard, len(rounds), {"final_accuracy": final["accuracy"]})
  tensorboard.close()
  outputs.results["complete"] = True
  outputs.save()
  _print_summary(outputs.results, dense_bits, num_params)
  return outputs.results


TENSORBOARD_SCALARS = ("train_loss", "accuracy", "uplink_bits_per_client", "downlink_bits_per_client",
                      "train_flops_per_client", "final_accuracy")


def _prepare_clients(algorithm, store, client_ids: list, train_input) -> dict:
  """Every client's work before round 1 (``algorithm.prepare_clients``), 20 clients per TFF
  call, states stored; returns its measured cost (bits sent, FLOPs, seconds)."""
  _log(f"[fedmask_tff] before round 1: every client ({len(client_ids)}) trains its pruning epoch "
       "and prunes (--prune_at_init) ...")
  t0 = time.perf_counter()
  up, flops, pruned, diverged = 0, 0.0, 0, 0
  for i in range(0, len(client_ids), 20):
    ids = client_ids[i:i + 20]
    new_states, metrics = algorithm.prepare_clients([train_input(c) for c in ids],
                                                    [store.get(c) for c in ids])
    for c, st in zip(ids, new_states):
      store.put(c, st)
    up += sum(m["uplink_bits"] for m in metrics)
    flops += sum(m["train_flops"] for m in metrics)
    pruned += sum(m["pruned"] for m in metrics)
    diverged += sum(m["diverged"] for m in metrics)
  if diverged:
    raise FloatingPointError(f"--prune_at_init: the pruning epoch diverged for {diverged} of "
                             f"{len(client_ids)} clients; lower --learning_rate")
  return {"clients": len(client_ids), "pruned_clients": pruned, "uplink_bits": up,
          "uplink_bits_per_client": up / max(1, len(client_ids)), "train_flops": flops,
          "wall_s": time.perf_counter() - t0,
          "what": "each client's pruning epoch and one-shot pruning before round 1; its pruning "
                  "masks sent once (counted in totals.uplink_bits)"}


def _tensorboard_scalars(writer, step: int, row: dict) -> None:
  """Per-round scalars under ``<output_dir>/tensorboard`` (``tensorboard --logdir``)."""
  import tensorflow as tf
  with writer.as_default(step=step):
    for key in TENSORBOARD_SCALARS:
      value = row.get(key)
      if isinstance(value, (int, float)) and math.isfinite(value):
        tf.summary.scalar(key, float(value))
  writer.flush()


def _partition_words(cfg) -> str:
  if cfg.get("partition_file"):
    return f"partition {cfg['partition_file']}"
  if cfg["dataset"] == "fashion_mnist":
    return cfg["partition"]
  if cfg["dataset"] == "cifar10":
    return f"{cfg['classes_per_client']} classes per client"
  return "one client per writer/subject/role"


def _print_summary(results, dense_bits, num_params):
  final, totals, cfg = results["final"], results["totals"], results["config"]
  up, down = totals["uplink_bits_per_client_round"], totals["downlink_bits_per_client_round"]
  q = np.percentile(list(final["accuracy_per_client"].values()) or [float("nan")], [0, 10, 50, 100])
  mode = (f", mask_mode={cfg['mask_mode']}" if results["algorithm"] in ("fedmask", "local_masks")
          else "")
  lines = [
      "",
      f"{results['algorithm']} on {results['dataset']} ({_partition_words(cfg)}, "
      f"{cfg['data']['num_clients']} clients, {totals['rounds']} rounds{mode})",
      f"  personalized {final.get('evaluated_on', 'test')} accuracy: {final['accuracy']:.4f} "
      f"(example-weighted over {final['evaluated_clients']} clients, {final['test_examples']} "
      f"{final.get('evaluated_on', 'test')} examples); "
      f"client mean {final['accuracy_client_mean']:.4f}",
      f"  per-client accuracy: min {q[0]:.3f}, 10th percentile {q[1]:.3f}, median {q[2]:.3f}, max {q[3]:.3f}",
  ]
  if "accuracy_after_aggregation" in final:
    lines.append(f"  the same clients with the mask received after the last aggregation (before local "
                 f"training): {final['accuracy_after_aggregation']:.4f}")
  lines += [
      f"  bits per client per round, measured from the payloads:",
      f"    uplink   {up:>14,.0f}  ({up / num_params:.3f} bits/parameter)   "
      f"dense FedAvg would send {dense_bits:,} (32 bits x {num_params:,} float32 weights)",
      f"    downlink {down:>14,.0f}  ({down / num_params:.3f} bits/parameter)   "
      f"dense FedAvg would send {dense_bits:,}",
  ]
  if up > 0:
    lines.append(f"    uplink saving vs dense FedAvg: {dense_bits / up:.1f}x")
  lines += [
      f"  training FLOPs per client per round: {totals['train_flops_per_client_round']:.4g}",
      f"  wall time {totals['wall_s']:.1f} s (training rounds {totals['train_wall_s']:.1f} s)",
      f"  results: {cfg['output_dir']}/results.json, metrics.csv, partition.json",
  ]
  print("\n".join(lines), flush=True)


class _progress:
  """A tqdm bar over rounds with the latest metrics (plain lines when tqdm is off)."""

  def __init__(self, total, enabled=True, initial=0):
    self._bar = None
    if enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc="rounds", unit="round", file=sys.stderr,
                       dynamic_ncols=True, mininterval=0.5)

  def update(self, round_num, row):
    info = {"loss": f"{row['train_loss']:.3f}", "up/client": f"{row['uplink_bits_per_client']:.3g}b",
            "s": f"{row['wall_s']:.1f}"}
    if "accuracy" in row:
      info["acc"] = f"{row['accuracy']:.3f}"
    if self._bar is not None:
      self._bar.set_postfix(info, refresh=False)
      self._bar.update(1)

  def close(self):
    if self._bar is not None:
      self._bar.close()
