"""The settings of a run, validated once: :class:`RunConfig` and :class:`ConfigError`.

No TensorFlow import here, so that the command line reports a bad flag at once. Which
settings may change between a run and its resumption, and which cannot change a given
algorithm's results, live here too.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

from fedmask_tff.algorithms import ALGORITHMS, downlink_coding_used, uplink_coding_used
from fedmask_tff.data.registry import DATASETS


class ConfigError(ValueError):
  """An impossible or inconsistent run configuration (reported before training)."""


PARTITIONS = ("pathological", "dirichlet")
# Standalone's training budget (fedmask_tff.algorithms.standalone.BUDGETS).
STANDALONE_BUDGETS = ("equal_epochs", "every_round")
MODELS = ("cnn", "mlp", "vgg16", "vgg16_paper", "har_mlp", "shakespeare_lstm")
# Datasets whose partition file indexes a pooled source (and can be reused with --partition_file).
POOLED_DATASETS = ("fashion_mnist",)
# Data sets federated by nature: one client per writer, role or subject (no partitioning).
NATURAL_CLIENTS = {"emnist": "writer", "femnist_leaf": "writer", "shakespeare": "role",
                   "shakespeare_leaf": "role", "shakespeare_h5": "role", "har": "subject",
                   "har_features": "subject"}


def _need(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _checked_by(check, *args, flag: str = "") -> None:
  """Runs the library's own check of a setting; its ValueError becomes a ConfigError."""
  try:
    check(*args)
  except ValueError as e:
    raise ConfigError(f"{flag}{e}") from None


def _positive(value) -> bool:
  return value is not None and math.isfinite(value) and value > 0


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
  prune_rate: Optional[float] = None  # None: the recipe's (sampled masks 0.5, score threshold 0.2)
  prune_last_layers: Optional[int] = None  # None: the model's (paper: VGG-16 8, others 2)
  mask_mode: str = "ste"
  score_init: float = 0.05
  score_init_noise: float = 0.0  # fedmask: uniform noise in [-a, a] around score_init
  upload: str = "sampled"  # fedmask: "sampled" (masks as probabilities) or a score-threshold upload
  optimizer: str = "adam"  # sampled masks: "adam" or "sgd" on the scores
  training_forward: str = "sampled"  # sampled masks: "sampled" or "threshold" (the ablation)
  score_init_mean: float = 0.0  # sampled masks: scores start N(mean, std^2)
  score_init_std: float = 1.0
  head_start: str = "own"  # sampled fedmask: the pruned head starts from "own" scores or "theta"
  personal_layers: int = -1  # sampled fedmask: how many pruned layers stay personal (-1: all)
  evidence_decay: float = 0.0  # sampled masks: share of earlier rounds' evidence the server keeps
  evidence_reset_every: int = 0  # sampled masks: > 0 resets the server's evidence every K rounds
  server_score_step: float = 0.03  # fedmask, upload=score_sign: the server's step on its scores
  personal_head: bool = True  # fedmask, upload=score_sign: pruned layers keep the client's scores
  choose_personal: bool = False  # fedmask, sampled: each device picks how much of theta to take
  choice_fraction: float = 0.1  # ... on this share of its training examples, held out of training
  personal_offset: float = 0.0  # fedmask, sampled: share of its deviation from theta a device keeps
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
  standalone_budget: str = "equal_epochs"  # standalone: STANDALONE_BUDGETS
  dropout_rate: float = 0.0
  group_lasso: float = 0.0
  examples_per_client: int = 0
  secure_aggregation: bool = False
  unseen_clients: float = 0.0
  uplink_coding: str = "auto"  # UPLINK_CODINGS; auto: entropy for sampled masks, else none
  downlink_bits: int = 0
  downlink_coding: str = "auto"  # auto: entropy where sampled masks send quantized theta, else none
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
  client_states: str = "auto"  # FedMask: "files" (the worker reads and writes them), "messages"
  overwrite: bool = False
  progress: bool = True
  def client_states_used(self) -> str:
    """How FedMask's client states reach TFF's worker: ``--client_states``, where ``auto`` is
    ``files`` with the local worker and ``messages`` with ``--workers`` (other hosts may not
    see the output directory)."""
    if self.client_states != "auto":
      return self.client_states
    return "messages" if self.workers else "files"

  def validate(self) -> "RunConfig":
    """Raises :class:`ConfigError` naming the first impossible setting."""
    for check in (_check_choices, _check_data, _check_training, _check_baselines,
                  _check_fedmask, _check_fedmask_communication, _check_execution, _check_output):
      check(self)
    return self


def _check_choices(c: RunConfig) -> None:
  _need(c.algorithm in ALGORITHMS, f"--algorithm must be one of {ALGORITHMS}, got {c.algorithm!r}")
  _need(c.dataset in DATASETS, f"--dataset must be one of {DATASETS}, got {c.dataset!r}")
  _need(c.partition in PARTITIONS, f"--partition must be one of {PARTITIONS}, got {c.partition!r}")
  _need(c.model is None or c.model in MODELS, f"--model must be one of {MODELS}, got {c.model!r}")


def _check_data(c: RunConfig) -> None:
  _need(0.0 <= c.unseen_clients < 1.0, f"--unseen_clients must be in [0, 1), got {c.unseen_clients}")
  _need(c.examples_per_client >= 0, f"--examples_per_client must be >= 0, got {c.examples_per_client}")
  _need(c.partition_file is None or c.dataset in POOLED_DATASETS,
        f"--partition_file is supported for {POOLED_DATASETS}; {c.dataset}'s split is fixed by "
        "the data files, the seed and the flags (its partition.json records it)")
  _need(c.num_clients >= 2, f"--num_clients must be >= 2, got {c.num_clients}")
  _need(1 <= c.clients_per_round <= c.num_clients,
        f"--clients_per_round must be in [1, num_clients={c.num_clients}], got {c.clients_per_round}")
  if c.partition_file is not None:
    _need(os.path.isfile(c.partition_file), f"--partition_file {c.partition_file!r} does not exist")
  _need(c.partition != "pathological" or c.classes_per_client >= 1,
        f"--classes_per_client must be >= 1, got {c.classes_per_client}")
  _need(c.partition != "dirichlet" or _positive(c.dirichlet_alpha),
        f"--dirichlet_alpha must be a finite number > 0, got {c.dirichlet_alpha}")
  _need(0.0 < c.test_fraction < 1.0, f"--test_fraction must be in (0, 1), got {c.test_fraction}")
  _need(0.0 <= c.validation_fraction < 1.0 and not math.isnan(c.validation_fraction),
        f"--validation_fraction must be in [0, 1), got {c.validation_fraction}")
  if c.data_dir is not None:
    _need(os.path.isdir(c.data_dir), f"--data_dir {c.data_dir!r} is not a directory")


def _check_training(c: RunConfig) -> None:
  from fedmask_tff.simulation import limits
  _need(1 <= c.rounds <= limits.MAX_ROUNDS,
        f"--rounds must be in [1, {limits.MAX_ROUNDS}], got {c.rounds}")
  _need(c.local_epochs >= 1, f"--local_epochs must be >= 1, got {c.local_epochs}")
  _need(1 <= c.batch_size <= limits.MAX_BATCH_SIZE,
        f"--batch_size must be in [1, {limits.MAX_BATCH_SIZE}], got {c.batch_size}")
  _need(0 <= c.seed <= limits.MAX_SEED, f"--seed must be in [0, {limits.MAX_SEED}], got {c.seed}")
  _need(c.learning_rate is None or _positive(c.learning_rate),
        f"--learning_rate must be a finite number > 0, got {c.learning_rate}")
  _need(0.0 <= c.dropout_rate < 1.0, f"--dropout_rate must be in [0, 1), got {c.dropout_rate}")
  _need(math.isfinite(c.model_width) and c.model_width > 0,
        f"--model_width must be > 0, got {c.model_width}")
  _checked_by(limits.check_model_fits, c.model, c.model_width)
  _need(c.eval_every >= 0, f"--eval_every must be >= 0, got {c.eval_every}")
  _need(c.eval_batch_size >= 1, f"--eval_batch_size must be >= 1, got {c.eval_batch_size}")


def _check_baselines(c: RunConfig) -> None:
  _need(_positive(c.server_learning_rate),
        f"--server_learning_rate must be a finite number > 0, got {c.server_learning_rate}")
  _need(0.0 < c.topk_fraction <= 1.0, f"--topk_fraction must be in (0, 1], got {c.topk_fraction}")
  _need(c.per_fedavg_variant in ("fo", "hf"),
        f"--per_fedavg_variant must be 'fo' or 'hf', got {c.per_fedavg_variant!r}")
  for name in ("per_fedavg_alpha", "per_fedavg_beta"):
    value = getattr(c, name)
    _need(value is None or _positive(value), f"--{name} must be a finite number > 0, got {value}")
  _need(c.lg_global_layers >= 1, f"--lg_global_layers must be >= 1, got {c.lg_global_layers}")
  _need(c.standalone_budget in STANDALONE_BUDGETS,
        f"--standalone_budget must be one of {STANDALONE_BUDGETS}, got {c.standalone_budget!r}")


def _check_fedmask(c: RunConfig) -> None:
  from fedmask_tff.masks.pruning import check_prune_rate
  from fedmask_tff.masks.vote_rules import RESTART_RULES
  _need(math.isfinite(c.group_lasso) and c.group_lasso >= 0,
        f"--group_lasso must be a finite number >= 0, got {c.group_lasso}")
  if c.prune_rate is not None:
    _checked_by(check_prune_rate, c.prune_rate, flag="--")
  _need(c.prune_last_layers is None or c.prune_last_layers >= 0,
        f"--prune_last_layers must be >= 0, got {c.prune_last_layers}")
  _need(c.mask_mode in ("ste", "soft"), f"--mask_mode must be 'ste' or 'soft', got {c.mask_mode!r}")
  _need(math.isfinite(c.score_init), f"--score_init must be finite, got {c.score_init}")
  _need(c.upload in ("sampled", "mask", "bernoulli", "score_sign"),
        f"--upload must be 'sampled', 'mask', 'bernoulli' or 'score_sign', got {c.upload!r}")
  _check_sampled(c)
  _need(_positive(c.server_score_step),
        f"--server_score_step must be a finite number > 0, got {c.server_score_step}")
  _need(not (c.global_mask and c.upload == "score_sign"),
        "--global_mask keeps the binary global mask m^T of --upload=mask or bernoulli; "
        "--upload=score_sign already starts clients from the server's scores")
  _need(0.0 < c.global_weight <= 1.0 and not math.isnan(c.global_weight),
        f"--global_weight must be in (0, 1], got {c.global_weight}")
  _need(math.isfinite(c.score_init_noise) and c.score_init_noise >= 0,
        f"--score_init_noise must be a finite number >= 0, got {c.score_init_noise}")
  _need(c.score_restart in RESTART_RULES,
        f"--score_restart must be one of {RESTART_RULES}, got {c.score_restart!r}")
  _need(c.restart_scale is None or _positive(c.restart_scale),
        f"--restart_scale must be a finite number > 0, got {c.restart_scale}")


def _check_sampled(c: RunConfig) -> None:
  """The sampled-mask recipe's flags (fedpm, and fedmask / local_masks with --upload=sampled)."""
  _need(c.optimizer in ("adam", "sgd"), f"--optimizer must be 'adam' or 'sgd', got {c.optimizer!r}")
  _need(c.training_forward in ("sampled", "threshold"),
        f"--training_forward must be 'sampled' or 'threshold', got {c.training_forward!r}")
  _need(math.isfinite(c.score_init_mean), f"--score_init_mean must be finite, got {c.score_init_mean}")
  _need(math.isfinite(c.score_init_std) and c.score_init_std >= 0,
        f"--score_init_std must be a finite number >= 0, got {c.score_init_std}")
  _need(c.personal_layers >= -1, f"--personal_layers must be >= -1, got {c.personal_layers}")
  _need(c.head_start in ("own", "theta"), f"--head_start must be 'own' or 'theta', got {c.head_start!r}")
  _need(0.0 <= c.personal_offset <= 1.0, f"--personal_offset must be in [0, 1], got {c.personal_offset}")
  _need(not (c.choose_personal and c.personal_offset > 0),
        "--choose_personal and --personal_offset are two answers to one question (how much of "
        "theta a device takes): use one")
  _need(0.0 < c.choice_fraction < 1.0 and not math.isnan(c.choice_fraction),
        f"--choice_fraction must be in (0, 1), got {c.choice_fraction}")
  _need(0.0 <= c.evidence_decay <= 1.0, f"--evidence_decay must be in [0, 1], got {c.evidence_decay}")
  _need(c.evidence_reset_every >= 0, f"--evidence_reset_every must be >= 0, got {c.evidence_reset_every}")
  sampled = c.algorithm == "fedpm" or (c.algorithm in ("fedmask", "local_masks") and c.upload == "sampled")
  if sampled:
    _need(c.downlink_bits in (0, 1, 2, 4, 8, 32),
          f"--downlink_bits with sampled masks is theta's bits per element: 1, 2, 4, 8 or 32 "
          f"(0: the algorithm's default, fedmask 2, fedpm 32), got {c.downlink_bits}")
    unsupported = [name for name, on in (("secure_aggregation", c.secure_aggregation),
                                         ("downlink_stochastic", c.downlink_stochastic),
                                         ("ldp_epsilon", c.ldp_epsilon is not None),
                                         ("global_mask", c.global_mask),
                                         ("prune_at_init", c.prune_at_init),
                                         ("group_lasso", c.group_lasso > 0)) if on]
    _need(not unsupported, f"--{', --'.join(unsupported)} apply to the score-threshold uploads "
          "(--upload=score_sign, mask or bernoulli), not to sampled masks (--upload=sampled, fedpm)")


def _check_fedmask_communication(c: RunConfig) -> None:
  from fedmask_tff.wire.coding import check_uplink_coding
  _need(not c.secure_aggregation or c.algorithm == "fedmask",
        "--secure_aggregation is implemented for --algorithm=fedmask (its rule needs only two sums)")
  _need(c.uplink_coding in ("auto", "none", "entropy"),
        f"--uplink_coding must be 'auto', 'none' or 'entropy', got {c.uplink_coding!r}")
  _need(c.downlink_coding in ("auto", "none", "entropy"),
        f"--downlink_coding must be 'auto', 'none' or 'entropy', got {c.downlink_coding!r}")
  fedmask_only = [name for name, on in (("uplink_coding", c.uplink_coding == "entropy"),
                                        ("downlink_coding", c.downlink_coding == "entropy"),
                                        ("downlink_bits", c.downlink_bits != 0),
                                        ("downlink_stochastic", c.downlink_stochastic),
                                        ("ldp_epsilon", c.ldp_epsilon is not None)) if on]
  _need(not fedmask_only or c.algorithm in ("fedmask", "fedpm"),
        f"--{', --'.join(fedmask_only)} apply to --algorithm=fedmask only")
  _need(0 <= c.downlink_bits <= 16 or c.upload == "sampled" or c.algorithm == "fedpm",
        f"--downlink_bits must be 0 (float32), 1 (the vote's decision) or in [2, 16], got {c.downlink_bits}")
  _need(not c.downlink_stochastic or c.downlink_bits >= 2,
        "--downlink_stochastic needs --downlink_bits >= 2")
  _need(c.ldp_epsilon is None or (c.ldp_epsilon > 0 and not math.isnan(c.ldp_epsilon)),
        f"--ldp_epsilon must be > 0 (leave it unset for no LDP), got {c.ldp_epsilon}")
  _need(not (c.upload == "score_sign" and c.downlink_bits == 1),
        "--downlink_bits=1 sends the vote's decision of --upload=mask; with --upload=score_sign "
        "the server's real-valued scores go down: use 0 (float32) or 2..16 bits")
  if c.algorithm in ("fedmask", "fedpm"):
    _checked_by(check_uplink_coding, uplink_coding_used(c.algorithm, c.upload, c.uplink_coding),
                "sampled" if c.algorithm == "fedpm" else c.upload, c.ldp_epsilon)
  if c.downlink_coding == "entropy":
    sampled = c.algorithm == "fedpm" or c.upload == "sampled"
    _need(sampled, "--downlink_coding=entropy codes the quantized theta of sampled masks "
          "(--upload=sampled, fedpm); the score-threshold uploads' downlink is not coded")
    _need(downlink_coding_used(c.algorithm, c.upload, "auto", c.downlink_bits) == "entropy",
          "--downlink_coding=entropy codes quantized theta: set --downlink_bits to 1, 2, 4 or 8 "
          f"(got {c.downlink_bits or 'the default, 32 for fedpm'})")
  _need(not (c.global_mask and c.downlink_bits >= 2),
        f"--global_mask sends m^T down as 1 bit per kept element; --downlink_bits="
        f"{c.downlink_bits} does not apply (use 0 or 1)")


def _check_execution(c: RunConfig) -> None:
  from fedmask_tff.simulation.limits import MIN_WORKER_MEMORY_MB
  _need(c.worker_memory_limit_mb == 0 or (math.isfinite(c.worker_memory_limit_mb)
                                          and c.worker_memory_limit_mb >= MIN_WORKER_MEMORY_MB),
        f"--worker_memory_limit_mb must be 0 (half the machine's memory) or >= "
        f"{MIN_WORKER_MEMORY_MB} (a TFF worker needs more to start), "
        f"got {c.worker_memory_limit_mb}")
  _need(c.client_datasets in ("driver", "workers"),
        f"--client_datasets must be 'driver' or 'workers', got {c.client_datasets!r}")
  _need(c.client_data_dir is None or c.client_datasets == "workers",
        "--client_data_dir is where --client_datasets=workers writes client files; it needs that flag")
  _need(c.client_states in ("auto", "messages", "files"),
        f"--client_states must be 'auto', 'messages' or 'files', got {c.client_states!r}")
  if c.workers is not None:
    from fedmask_tff.runtime.worker import parse_workers
    try:
      parse_workers(c.workers)
    except ValueError as e:
      raise ConfigError(str(e)) from e
    _need(c.max_concurrent_clients == -1,
          "--max_concurrent_clients caps the local worker; with --workers give each worker "
          "--max_concurrent_computation_calls instead")


def _check_output(c: RunConfig) -> None:
  _need(bool(c.output_dir), "--output_dir must be set")
  if not c.overwrite:
    state = resume_state(c)
    if state == "complete":
      raise ConfigError(_complete_run_words(c))
    unreadable = os.path.exists(os.path.join(c.output_dir, "checkpoint.npz"))
    _need(state != "no_checkpoint", f"{os.path.join(c.output_dir, 'results.json')} exists but "
          + ("is unreadable (truncated or edited?): restore it" if unreadable else
             "there is no checkpoint to resume from")
          + ", choose another --output_dir, or pass --overwrite to start again")


def _complete_run_words(c: RunConfig) -> str:
  """Why a finished run in ``c.output_dir`` is not replaced, and how to replace it."""
  import json
  path = os.path.join(c.output_dir, "results.json")
  with open(path) as f:
    differ = differing_settings(json.load(f).get("config", {}), c)
  if differ:
    return (f"{c.output_dir} holds a finished run with other settings "
            f"({', '.join('--' + d for d in differ)}): it is kept; pass --overwrite to replace it "
            "(its results are deleted), or choose another --output_dir")
  return (f"{c.output_dir} holds this run, finished (results in {path}): it is kept; pass "
          "--overwrite to run it again from scratch, or choose another --output_dir")


# Settings that may differ between a run and its resumption (they do not change results).
RESUME_FREE = ("overwrite", "progress", "max_concurrent_clients", "output_dir", "workers",
               "worker_memory_limit_mb",
               "client_datasets", "client_data_dir", "client_states")


# FedMask's own settings: they change nothing for the other algorithms.
FEDMASK_SETTINGS = ("prune_rate", "score_restart", "restart_scale", "score_init_noise", "upload",
                    "server_score_step", "personal_head", "global_weight", "global_mask",
                    "prune_at_init", "optimizer", "training_forward", "score_init_mean", "score_init_std",
                    "head_start", "personal_layers", "evidence_decay", "evidence_reset_every",
                    "choose_personal", "choice_fraction", "personal_offset")
# The sampled-mask recipe's own settings (and those of the score-threshold uploads).
SAMPLED_SETTINGS = ("optimizer", "training_forward", "score_init_mean", "score_init_std",
                    "personal_layers", "head_start", "choose_personal", "choice_fraction",
                    "personal_offset",
                    "evidence_decay", "evidence_reset_every")


# FedMask's communication and privacy options (validate() refuses them for other algorithms).
FEDMASK_COMMUNICATION = ("uplink_coding", "downlink_bits", "downlink_coding", "downlink_stochastic",
                         "secure_aggregation", "ldp_epsilon")


def unused_settings(config: RunConfig) -> set[str]:
  """Settings that cannot change ``config``'s results: ``standalone_budget`` but for
  ``standalone``, and :func:`unused_fedmask_settings`."""
  unused = unused_fedmask_settings(config)
  return unused if config.algorithm == "standalone" else unused | {"standalone_budget"}


def unused_fedmask_settings(config: RunConfig) -> set[str]:
  """FedMask settings that cannot change ``config``'s results (other algorithms; the vote rule
  under ``score_sign``; the server-score settings under the mask uploads; all but the initial
  scores for ``local_masks``)."""
  everything = set(FEDMASK_SETTINGS + FEDMASK_COMMUNICATION)
  threshold_only = (everything - set(SAMPLED_SETTINGS)
                    - {"upload", "downlink_bits", "personal_head", "prune_rate"})
  if config.algorithm == "fedpm":  # nothing pruned
    return (threshold_only - {"uplink_coding", "downlink_coding"}) | {"personal_head", "personal_layers", "head_start",
                                                   "upload", "prune_rate", "choose_personal",
                                                   "choice_fraction", "personal_offset"}
  if config.algorithm in ("fedmask", "local_masks") and config.upload == "sampled":
    if config.algorithm == "local_masks":
      return threshold_only | {"head_start", "personal_layers", "evidence_decay", "evidence_reset_every",
                               "downlink_bits", "personal_head", "choose_personal",
                               "choice_fraction", "personal_offset"}
    return ((threshold_only - {"uplink_coding", "downlink_coding"})
            | (set() if config.choose_personal else {"choice_fraction"}))
  if config.algorithm == "local_masks":  # no aggregation: only the initial scores and pruning
    return ((everything - {"score_init_noise", "prune_at_init", "upload", "prune_rate"})
            | set(SAMPLED_SETTINGS))
  if config.algorithm != "fedmask":
    return everything
  sampled_only = set(SAMPLED_SETTINGS) | {"downlink_coding"}
  if config.upload == "score_sign":
    return {"score_restart", "restart_scale", "global_mask"} | sampled_only
  return {"server_score_step", "personal_head", "global_weight"} | sampled_only


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
  """``"fresh"``, ``"resume"``, ``"restart"`` (a run stopped before its first round finished:
  nothing to keep, it starts again), ``"complete"`` or ``"no_checkpoint"`` for ``config.output_dir``.

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
    return "restart" if not results.get("rounds") else "no_checkpoint"
  differ = differing_settings(results.get("config", {}), config)
  if differ:
    raise ConfigError(f"{config.output_dir} holds an unfinished run with other settings "
                      f"({', '.join('--' + d for d in differ)}): rerun with the same flags to "
                      "resume it, or pass --overwrite to start again")
  return "resume"
