"""Settings of the sampled-mask algorithms (FedPM, FedMask's default recipe, ``local_masks``):
:class:`SampledMaskConfig` (validated at build time) and the per-weight :class:`WeightPlan`."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from fedmask_tff.masks import probability, pruning

OPTIMIZERS = ("adam", "sgd")
FORWARDS = ("sampled", "threshold")
HEAD_STARTS = ("own", "theta")
# Below this many local steps a round (median client), masks trained as probabilities learn
# slowly in federation: FEMNIST LEAF (~150 examples a writer), FedPM's global mask after 30
# rounds of 20 clients, 2 epochs x batch 32 (~10 steps) 0.205; 5 epochs x batch 16 (~45 steps)
# at the level of the mask's central capacity (docs/sampled-masks.md, "Local steps").
FEW_LOCAL_STEPS = 20


class WeightPlan(NamedTuple):
  """One masked weight: its ``name``, ``shape`` and ``size`` (elements); ``prunable``: one-shot
  pruning keeps ``prune_rate`` of it at the client's first round; ``personal``: the client keeps
  its own scores for it between rounds (else it starts every round from the server's theta)."""
  name: str
  shape: tuple
  size: int
  prunable: bool
  personal: bool


def receives_theta(spec: WeightPlan, config) -> bool:
  """Whether theta goes down for ``spec``: a shared weight, a personal pruned one under
  ``head_start="theta"``, and every weight under ``choose_personal`` (the device then picks
  which to start from it)."""
  if config.choose_personal:
    return True
  return not (spec.personal and not (spec.prunable and config.head_start == "theta"))


def fixed_theta_layers(plan) -> int:
  """How many masked weights, counted from the input, start from theta under the fixed
  setting (the plan's ``personal`` flags: the weights before the first personal one)."""
  return next((i for i, spec in enumerate(plan) if spec.personal), len(plan))


@dataclasses.dataclass(frozen=True)
class SampledMaskConfig:
  """Hyper-parameters of sampled-mask training and of the server's Beta-Bernoulli estimate.

  Attributes:
    local_epochs: epochs of local training per round (plus the pruning epoch at a client's
      first round when the model is pruned).
    learning_rate: the optimizer's step on the scores (Adam: 0.1, FedPM's).
    forward: the training forward pass: ``"sampled"`` (a fresh Bernoulli(sigmoid(m_r)) sample)
      or ``"threshold"`` (the binary mask with sigmoid' backward, the ablation).
    optimizer: ``"adam"`` (TFF's ``build_adam`` arithmetic in TF's fused kernel,
      :func:`.client.adam_step`, its state started afresh every round) or
      ``"sgd"`` (``build_sgdm`` without momentum).
    score_init_mean, score_init_std: the scores' start, N(mean, std^2) (FedPM: N(0, 1)); the same
      draw (from ``seed``) for every client and the server's first theta = sigmoid of it.
    prune_rate, prune_last_layers: one-shot pruning (FedMask: 20 % of the last 2 layers'
      elements kept; 0 layers: no pruning, FedPM).
    personal_head: the last ``personal_layers`` pruned layers keep each client's own scores
      between rounds (its heterogeneous mask); the other layers start every round from the
      server's theta (a pruned one at the client's kept positions, where the server has a value).
    personal_layers: how many of the pruned layers are personal (-1: all of them).
    head_start: ``"own"`` (the head starts from the client's own scores) or ``"theta"``
      (Algorithm 1, line 13 read literally: from theta at its kept positions where at least
      ``min_shared`` clients kept the element once, else its own).
    choose_personal: each device picks, every round, how many of its masked weights (from the
      input) start from theta and which from its own scores, by accuracy on ``choice_fraction``
      of its training examples, held out of its training (:mod:`.start_choice`); the plan's
      ``personal`` flags are then only the tie-break. Theta goes down for every weight.
    personal_offset: lambda in [0, 1]: a device starts each unpruned weight it takes from theta
      at ``logit(theta) + o``, ``o`` = lambda x (its scores - that start) at the end of its last
      round (0: from theta, FedMask's default; 1: its whole deviation kept); it uploads samples
      of ``sigmoid(m_r - o)`` (:mod:`.client`).
    downlink_bits: theta goes down in 1, 2, 4, 8 bits per element or as float32 (32).
    evidence_decay: the share of earlier rounds' evidence the server keeps (0: the Beta prior
      is reset every round, FedPM's default); ``reset_every``: > 0 resets it every that many
      rounds anyway.
    prior: the Beta(prior, prior) prior.
    min_shared: clients that must send an element in a round for the server to update it.
    eps: theta is clipped to [eps, 1 - eps] before its logit.
    seed: the run's seed (score init, mask samples, uploads).
  """
  local_epochs: int = 2
  learning_rate: float = 0.1
  optimizer: str = "adam"
  forward: str = "sampled"
  score_init_mean: float = 0.0
  score_init_std: float = 1.0
  prune_rate: float = 0.2
  prune_last_layers: int = 2
  personal_head: bool = True
  personal_layers: int = -1
  head_start: str = "own"
  choose_personal: bool = False
  choice_fraction: float = 0.1
  personal_offset: float = 0.0
  downlink_bits: int = 2
  evidence_decay: float = 0.0
  reset_every: int = 0
  prior: float = 1.0
  min_shared: int = 2
  eps: float = probability.DEFAULT_EPS
  seed: int = 0

  def validate(self, num_masked_layers: int) -> "SampledMaskConfig":
    if int(self.local_epochs) < 1:
      raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
    if self.forward not in FORWARDS:
      raise ValueError(f"forward must be one of {FORWARDS}, got {self.forward!r}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
    if not (math.isfinite(self.score_init_mean) and math.isfinite(self.score_init_std)
            and self.score_init_std >= 0):
      raise ValueError("score_init_mean must be finite and score_init_std a finite number >= 0")
    pruning.check_prune_rate(self.prune_rate)
    if not 0 <= int(self.prune_last_layers) <= num_masked_layers:
      raise ValueError(f"prune_last_layers must be in [0, {num_masked_layers}], got "
                       f"{self.prune_last_layers}")
    if int(self.personal_layers) < -1:
      raise ValueError(f"personal_layers must be >= -1 (-1: every pruned layer), got {self.personal_layers}")
    if self.head_start not in HEAD_STARTS:
      raise ValueError(f"head_start must be one of {HEAD_STARTS}, got {self.head_start!r}")
    if not 0.0 < self.choice_fraction < 1.0:
      raise ValueError(f"choice_fraction must be in (0, 1), got {self.choice_fraction}")
    if not 0.0 <= self.personal_offset <= 1.0:
      raise ValueError(f"personal_offset must be in [0, 1], got {self.personal_offset}")
    if self.choose_personal and self.personal_offset > 0:
      raise ValueError("choose_personal and personal_offset are two answers to one question "
                       "(how much of theta a device takes): use one")
    probability.check_downlink_bits(self.downlink_bits)
    probability.check_decay(self.evidence_decay)
    if int(self.reset_every) < 0:
      raise ValueError(f"reset_every must be >= 0, got {self.reset_every}")
    if not (self.prior > 0 and math.isfinite(self.prior)):
      raise ValueError(f"prior must be a finite number > 0, got {self.prior}")
    if int(self.min_shared) < 1:
      raise ValueError(f"min_shared must be >= 1, got {self.min_shared}")
    if not 0 < self.eps < 0.5:
      raise ValueError(f"eps must be in (0, 0.5), got {self.eps}")
    return self


def local_steps(examples: float, local_epochs: int, batch_size: int) -> int:
  """Optimizer steps a client with ``examples`` training examples takes in one round."""
  return int(local_epochs) * int(math.ceil(float(examples) / int(batch_size)))


def few_local_steps_warning(median_examples: float, local_epochs: int, batch_size: int):
  """A one-line warning when the median client takes fewer than :data:`FEW_LOCAL_STEPS` steps a
  round (masks trained as probabilities then barely move between rounds), else ``None``."""
  steps = local_steps(median_examples, local_epochs, batch_size)
  if steps >= FEW_LOCAL_STEPS:
    return None
  return (f"the median client takes {steps} local steps a round ({median_examples:g} examples, "
          f"--local_epochs={local_epochs}, --batch_size={batch_size}); masks trained as "
          f"probabilities learn slowly below {FEW_LOCAL_STEPS} (docs/sampled-masks.md, "
          f"\"Local steps\"): more local epochs or a smaller batch")
