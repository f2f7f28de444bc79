"""Every algorithm of the paper under one interface (:class:`base.FederatedAlgorithm`).

``ALGORITHMS`` lists the ``--algorithm`` names; :func:`build_algorithm` builds
one from the runner's :class:`base.BuildContext` and the run's settings. Each
algorithm lives in its own short module with a ``build_<name>`` function.
"""

from __future__ import annotations

ALGORITHMS = ("fedmask", "local_masks", "fedpm", "standalone", "fedavg", "topk", "bnn_fedavg",
              "per_fedavg", "lg_fedavg")
# FedMask's uploads: "sampled" (the default) runs the sampled-mask recipe
# (:mod:`fedmask_tff.algorithms.sampled_masks`); the others the score-threshold process.
SAMPLED_UPLOAD = "sampled"
SAMPLED_LEARNING_RATE = 0.1  # Adam on the scores (FedPM's)


def uses_sampled_masks(name: str, upload: str) -> bool:
  """Whether ``--algorithm=name --upload=upload`` runs the sampled-mask recipe."""
  return name == "fedpm" or (name in ("fedmask", "local_masks") and upload == SAMPLED_UPLOAD)


def uplink_coding_used(name: str, upload: str, uplink_coding: str) -> str:
  """``--uplink_coding`` as a run applies it: ``auto`` is ``entropy`` for the sampled uploads of
  fedmask and fedpm (lossless: the same run, fewer bits counted), ``none`` elsewhere."""
  if uplink_coding != "auto":
    return uplink_coding
  return "entropy" if name in ("fedmask", "fedpm") and uses_sampled_masks(name, upload) else "none"


def downlink_coding_used(name: str, upload: str, downlink_coding: str, downlink_bits: int) -> str:
  """``--downlink_coding`` as a run applies it: ``auto`` is ``entropy`` where sampled masks send
  quantized theta down (fedmask and fedpm; ``downlink_bits`` as the run applies it, 0 for the
  algorithm's default: fedmask 2, fedpm 32 = float32, not coded), ``none`` elsewhere."""
  if downlink_coding != "auto":
    return downlink_coding
  bits = downlink_bits or (32 if name == "fedpm" else 2)
  sampled = name in ("fedmask", "fedpm") and uses_sampled_masks(name, upload)
  return "entropy" if sampled and bits != 32 else "none"


def default_learning_rate(name: str, upload: str = SAMPLED_UPLOAD) -> float:
  """The documented default local learning rate of ``name`` (see each module)."""
  import importlib
  if uses_sampled_masks(name, upload):
    return SAMPLED_LEARNING_RATE
  if name in ("fedmask", "local_masks"):
    return 30.0
  module = importlib.import_module(f"fedmask_tff.algorithms.{name}")
  return float(module.DEFAULT_LEARNING_RATE)


def build_algorithm(name: str, context, config):
  """Builds algorithm ``name``; ``config`` is the runner's RunConfig (its algorithm flags are read).
  The context's execution settings (``split_round``, ``dataset_computation``) are applied."""
  algorithm = _build(name, context, config)
  algorithm.split_round = bool(context.split_round)
  if context.dataset_computation is not None:
    algorithm.dataset_computation = context.dataset_computation(algorithm.dataset_repeats)
  return algorithm


# One-shot pruning's p_r when --prune_rate is not given: the paper's 0.2 for the score-threshold
# uploads; 0.5 for masks trained as probabilities (FedMask's default recipe and local_masks),
# chosen on validation data (docs/sampled-masks.md, "Choosing p_r").
PAPER_PRUNE_RATE = 0.2
SAMPLED_PRUNE_RATE = 0.5


def prune_rate_used(config) -> float:
  """``--prune_rate`` as a run applies it: the RunConfig's, or, when unset (None), the recipe's
  (:data:`SAMPLED_PRUNE_RATE` for sampled masks, :data:`PAPER_PRUNE_RATE` otherwise)."""
  if config.prune_rate is not None:
    return float(config.prune_rate)
  return SAMPLED_PRUNE_RATE if uses_sampled_masks(config.algorithm, config.upload) else PAPER_PRUNE_RATE



def _build_sampled(name: str, context, config):
  from fedmask_tff import models
  from fedmask_tff.algorithms.sampled_masks import algorithm as sampled
  from fedmask_tff.algorithms.sampled_masks.config import SampledMaskConfig
  default_bits = 32 if name == "fedpm" else 2
  settings = SampledMaskConfig(
      local_epochs=config.local_epochs, learning_rate=context.learning_rate,
      optimizer=config.optimizer, forward=config.training_forward, score_init_mean=config.score_init_mean,
      score_init_std=config.score_init_std, prune_rate=prune_rate_used(config),
      prune_last_layers=models.prune_last_layers(context.model, config.prune_last_layers),
      personal_head=config.personal_head, personal_layers=config.personal_layers,
      head_start=config.head_start, choose_personal=config.choose_personal,
      choice_fraction=config.choice_fraction, personal_offset=config.personal_offset,
      downlink_bits=config.downlink_bits or default_bits, evidence_decay=config.evidence_decay,
      reset_every=config.evidence_reset_every, seed=config.seed)
  cls = {"fedpm": sampled.FedPM, "fedmask": sampled.SampledFedMask,
         "local_masks": sampled.SampledLocalMasks}[name]
  return cls(context, settings, uplink_coding_used(name, config.upload, config.uplink_coding),
             downlink_coding_used(name, config.upload, config.downlink_coding, config.downlink_bits))


def _build(name: str, context, config):
  if uses_sampled_masks(name, config.upload):
    return _build_sampled(name, context, config)
  if name in ("fedmask", "local_masks"):
    from fedmask_tff.algorithms.fedmask import process as fedmask_process
    from fedmask_tff.masks import vote_rules
    from fedmask_tff.algorithms.fedmask.algorithm import build_fedmask, build_local_masks
    fedmask_config = fedmask_process.FedMaskConfig(
        local_epochs=config.local_epochs, learning_rate=context.learning_rate,
        prune_rate=prune_rate_used(config), prune_last_layers=config.prune_last_layers,
        score_restart=config.score_restart,
        restart_scale=vote_rules.rule_scale(config.score_restart, config.restart_scale),
        group_lasso=config.group_lasso, secure_aggregation=config.secure_aggregation,
        downlink_bits=config.downlink_bits, downlink_stochastic=config.downlink_stochastic,
        ldp_epsilon=config.ldp_epsilon or 0.0, score_init_noise=config.score_init_noise,
        upload=config.upload, server_score_step=config.server_score_step,
        personal_head=config.personal_head, global_weight=config.global_weight,
        global_mask=config.global_mask, prune_at_init=config.prune_at_init, seed=config.seed)
    if name == "local_masks":
      return build_local_masks(context, fedmask_config)
    return build_fedmask(context, fedmask_config,
                         uplink_coding=uplink_coding_used(name, config.upload, config.uplink_coding))
  if name == "standalone":
    from fedmask_tff.algorithms.standalone import build_standalone
    return build_standalone(context, learning_rate=context.learning_rate,
                            budget=config.standalone_budget)
  if name == "fedavg":
    from fedmask_tff.algorithms.fedavg import build_fedavg
    return build_fedavg(context, learning_rate=context.learning_rate,
                        server_learning_rate=config.server_learning_rate)
  if name == "topk":
    from fedmask_tff.algorithms.topk import build_topk
    return build_topk(context, fraction=config.topk_fraction, error_feedback=config.error_feedback,
                      server_learning_rate=config.server_learning_rate,
                      learning_rate=context.learning_rate)
  if name == "bnn_fedavg":
    from fedmask_tff.algorithms.bnn_fedavg import build_bnn_fedavg
    return build_bnn_fedavg(context, learning_rate=context.learning_rate)
  if name == "per_fedavg":
    from fedmask_tff.algorithms import per_fedavg
    kwargs = {"variant": config.per_fedavg_variant}
    if config.per_fedavg_alpha is not None:
      kwargs["alpha"] = config.per_fedavg_alpha
    # beta is the outer step: --per_fedavg_beta, else --learning_rate, else the module default.
    kwargs["beta"] = config.per_fedavg_beta if config.per_fedavg_beta is not None else context.learning_rate
    return per_fedavg.build_per_fedavg(context, **kwargs)
  if name == "lg_fedavg":
    from fedmask_tff.algorithms.lg_fedavg import build_lg_fedavg
    return build_lg_fedavg(context, global_layers=config.lg_global_layers,
                           learning_rate=context.learning_rate)
  raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(ALGORITHMS)}")
