"""FedMask's settings: :class:`FedMaskConfig` (validated at build time) and the upload kinds."""

from __future__ import annotations

import dataclasses
import math

from fedmask_tff.masks import aggregation, masking, pruning
from fedmask_tff.wire import ldp, quantization

UPLOADS = ("mask", "bernoulli", "score_sign")


@dataclasses.dataclass(frozen=True)
class FedMaskConfig:
  """Hyper-parameters of FedMask's client work and aggregation.

  Attributes:
    local_epochs: epochs of local training per round (after the pruning epoch
      at a client's first round).
    learning_rate: SGD step size on the scores. Score gradients carry W
      (about ``1/sqrt(fan_in)``) and ``sigmoid'(m_r) <= 1/4``, so useful values
      are far larger than for weight training.
    prune_rate: fraction of elements one-shot pruning keeps, in (0, 1].
    prune_last_layers: how many of the last masked layers are pruned.
    score_restart: how the vote moves a client's scores (``masking.apply_vote``):
      ``"scaled_logit"`` or ``"linear"`` overwrite every averaged element's
      score; ``"vote_shift"``, ``"disagree_shift"`` and ``"disagree_restart"``
      keep the client's scores between rounds and only move them.
    restart_scale, restart_eps: the rule's scale (restart scale, or shift step)
      and logit clip.
    min_shared: clients that must keep an element for it to be averaged.
    group_lasso: weight λ of the paper's structured-sparsity term added to the
      client loss: ``λ * regularizers.structured_penalty(model, normalize=True)``
      (group lasso over filters / rows / columns of σ(m_r) · keep); 0 = off.
    secure_aggregation: sum the two per-element counts (``mask * keep`` and
      ``keep``, integers) with ``tff.federated_secure_sum_bitwidth``, so the
      server learns only the sums; each client applies the rule itself.
    secure_bitwidth: bits of the secure sums (they count clients: 2^bits - 1
      must exceed the clients per round).
    downlink_bits: 0 sends one float32 per kept element; 1 sends the vote's
      decision ``1[v >= tau]`` (the client's own bit where not averaged), as the
      paper's "updated binary masks"; ``b`` in [2, 16] quantizes each to ``b`` bits (:mod:`fedmask_tff.wire.quantization`: levels
      ``i / (2^b - 2)``, the top code means "keep yours").
    downlink_stochastic: stochastic (unbiased) instead of nearest rounding.
    ldp_epsilon: > 0 turns on randomized response on the uploaded mask bits
      (:mod:`fedmask_tff.wire.ldp`; each bit kept with probability
      e^eps / (1 + e^eps)); the server debiases the sums. 0 = off. The
      client's own (personalized) mask is not randomized.
    score_init_noise: > 0 adds uniform noise in [-a, a] (seeded by ``seed``, the
      same for every client) to the layers' constant ``score_init``, so that the
      initial mask is random around the threshold instead of all ones.
    upload: what the 1 bit per element says. ``"mask"`` (the paper): the
      client's binary mask ``1[sigmoid(m_r) >= tau] * keep``; the server averages
      it and each client moves its scores by the vote (``score_restart``).
      ``"bernoulli"`` (after FedPM, Isik et al. 2023): a sample
      ``m ~ Bernoulli(sigmoid(m_r)) * keep``, so the server's mean estimates the
      clients' mean probability (restart with ``scaled_logit``, scale 1, to read
      it as a probability); the personal mask stays the thresholded one.
      ``"score_sign"`` (beyond the paper; Algorithm 1 with a real-valued global
      mask): the server holds global scores ``G`` (its m^T), a selected client
      starts from ``G`` at the positions it keeps (line 11: m^T ⊙ m_k), trains,
      and uploads ``1[m_r(after) > m_r(start)]``, the direction its evidence
      moved; the server steps ``G += server_score_step * (2v - 1)`` where at
      least ``min_shared`` clients keep the element (a majority-vote sign step).
      The downlink is ``G`` at the client's kept positions: float32, or with
      ``downlink_bits=b`` (2..16) ``b`` bits each between the tensor's min and
      max (sent as two float32).
    server_score_step: the server's step on ``G`` per round (``score_sign``).
    global_weight: ``score_sign`` only: a selected client starts from
      ``global_weight * G + (1 - global_weight) * own`` at its kept positions
      (1: from ``G`` itself; below 1 the client's own evidence from its earlier
      rounds is kept in part).
    personal_head: ``score_sign`` only (ignored otherwise): a client starts
      from ``G`` in the unpruned layers only and keeps its own scores in the
      pruned (last) layers between rounds, so its classifier stays personal
      while the feature layers are learned by everyone. The pruned layers'
      directions are still uploaded and ``G`` keeps them (for newcomers).
    global_mask: ``upload="mask"`` or ``"bernoulli"`` only: Algorithm 1 read
      literally (lines 9-11). The server keeps the binary global mask m^T,
      ``1[v >= tau]`` per element from the last aggregation in which at least
      ``min_shared`` clients kept it (an element never shared has none); a
      selected client starts its round from m^T at the positions it keeps (its
      scores moved by ``score_restart``, so ``scaled_logit`` restarts them from
      m^T ⊙ m_k), trains, and uploads; no vote is applied after its round. The
      downlink is m^T's bit per kept element (plus one "defined" bit per kept
      element while some are undefined), counted from the packed message.
    prune_at_init: every client trains its one pruning epoch and prunes before
      round 1 (Algorithm 1 lines 4-6), sending its pruning mask then, instead of
      at its first participation (see :meth:`FedMaskProcess.prepare_clients`).
    seed: the run's seed, from which per-client, per-round seeds of the
      stochastic rounding and randomized response are derived (together with
      the round and the client's pruning mask).
  """
  local_epochs: int = 2
  learning_rate: float = 30.0
  prune_rate: float = 0.2
  prune_last_layers: int = 2
  score_restart: str = "scaled_logit"
  restart_scale: float = 0.1
  restart_eps: float = 0.01
  min_shared: int = aggregation.MIN_SHARED_CLIENTS
  group_lasso: float = 0.0
  secure_aggregation: bool = False
  secure_bitwidth: int = 16
  downlink_bits: int = 0
  downlink_stochastic: bool = False
  ldp_epsilon: float = 0.0
  score_init_noise: float = 0.0
  upload: str = "score_sign"
  server_score_step: float = 0.03
  personal_head: bool = True
  global_weight: float = 0.5
  global_mask: bool = False
  prune_at_init: bool = False
  seed: int = 0

  def validate(self, num_masked_layers: int | None = None) -> "FedMaskConfig":
    if int(self.local_epochs) < 1:
      raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
    pruning.check_prune_rate(self.prune_rate)
    if int(self.prune_last_layers) < 0:
      raise ValueError(f"prune_last_layers must be >= 0, got {self.prune_last_layers}")
    if num_masked_layers is not None and self.prune_last_layers > num_masked_layers:
      raise ValueError(f"prune_last_layers={self.prune_last_layers} but the model has only "
                       f"{num_masked_layers} masked layers")
    masking.check_rule(self.score_restart, self.restart_scale, self.restart_eps)
    if not (math.isfinite(self.group_lasso) and self.group_lasso >= 0):
      raise ValueError(f"group_lasso must be a finite number >= 0, got {self.group_lasso}")
    if int(self.downlink_bits) == 1 and self.downlink_stochastic:
      raise ValueError("downlink_stochastic applies to downlink_bits >= 2 (the 1-bit downlink "
                       "sends the vote's decision)")
    if int(self.downlink_bits) not in (0, 1):
      quantization.check_bits(self.downlink_bits)
    if self.ldp_epsilon != 0:
      ldp.check_epsilon(self.ldp_epsilon)
    if not 2 <= int(self.secure_bitwidth) <= 31:
      raise ValueError(f"secure_bitwidth must be in [2, 31], got {self.secure_bitwidth}")
    if not (math.isfinite(self.score_init_noise) and self.score_init_noise >= 0):
      raise ValueError(f"score_init_noise must be a finite number >= 0, got {self.score_init_noise}")
    if self.upload not in UPLOADS:
      raise ValueError(f"upload must be one of {UPLOADS}, got {self.upload!r}")
    if not (math.isfinite(self.server_score_step) and self.server_score_step > 0):
      raise ValueError(f"server_score_step must be a finite number > 0, got {self.server_score_step}")
    if self.upload == "score_sign" and int(self.downlink_bits) == 1:
      raise ValueError("upload='score_sign' sends the server's real-valued scores down: "
                       "downlink_bits=1 (a vote's decision) applies to upload='mask'; use 0 "
                       "(float32) or 2..16 bits")
    if not (0.0 < self.global_weight <= 1.0):
      raise ValueError(f"global_weight must be in (0, 1], got {self.global_weight}")
    if self.global_mask and self.upload == "score_sign":
      raise ValueError("global_mask keeps the binary global mask m^T of upload='mask' or "
                       "'bernoulli'; upload='score_sign' already starts clients from the server's scores")
    if self.global_mask and int(self.downlink_bits) >= 2:
      raise ValueError("global_mask sends m^T down as 1 bit per kept element; downlink_bits "
                       f"{self.downlink_bits} does not apply (use 0 or 1)")
    if int(self.min_shared) < 1:
      raise ValueError(f"min_shared must be >= 1, got {self.min_shared}")
    return self
