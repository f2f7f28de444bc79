"""Mask maths of FedMask, independent of Keras layers and of TFF.

A mask element has a real-valued score ``m_r``. Its binary value is
``m = 1[sigmoid(m_r) >= tau]`` (tau = 0.5 by default, i.e. ``m_r >= 0``).

Three training modes (the mode a run used is recorded in its config):

* ``"ste"``: the forward pass uses the binary mask; the backward pass goes
  through the sigmoid: ``dL/dm_r = dL/dm * sigmoid'(m_r)`` (the paper's
  "sigmoid threshold gradient trick").
* ``"soft"``: the forward pass uses ``sigmoid(m_r)`` itself (the paper's
  eqs. 6-8); the gradient is the ordinary one.
* ``"sampled"``: the forward pass uses a fresh sample ``m ~ Bernoulli(sigmoid(m_r))``
  (Zhou et al. 2019; FedPM, Isik et al. 2023); the backward pass is straight through
  the sample, then through the sigmoid: ``dL/dm_r = dL/dm * sigmoid'(m_r)``. So
  ``sigmoid(m_r)`` is trained as the probability that the element is on.

Inference and upload always use the binary mask.

All functions take and return tensors of any shape; masks are float32 0/1.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

MASK_MODES = ("ste", "soft", "sampled")
DEFAULT_THRESHOLD = 0.5


def check_mask_mode(mode: str) -> str:
  if mode not in MASK_MODES:
    raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mode!r}")
  return mode


def check_threshold(threshold: float) -> float:
  threshold = float(threshold)
  if not 0.0 < threshold < 1.0 or math.isnan(threshold):
    raise ValueError(f"threshold tau must be in (0, 1), got {threshold}")
  return threshold


def binary_mask(scores: tf.Tensor, threshold: float = DEFAULT_THRESHOLD) -> tf.Tensor:
  """``1[sigmoid(scores) >= threshold]`` as float32 (no gradient)."""
  return tf.cast(tf.sigmoid(scores) >= threshold, tf.float32)


def ste_mask(scores: tf.Tensor, threshold: float = DEFAULT_THRESHOLD) -> tf.Tensor:
  """Binary mask forward, ``sigmoid'(scores)`` backward (straight-through)."""

  @tf.custom_gradient
  def _forward(s):
    soft = tf.sigmoid(s)
    hard = tf.cast(soft >= threshold, s.dtype)

    def _grad(upstream):
      return upstream * soft * (1.0 - soft)

    return hard, _grad

  # A tensor, not the variable: Keras 3 variables would make custom_gradient ask for
  # the gradient of the variable itself.
  return _forward(tf.convert_to_tensor(scores))


def soft_mask(scores: tf.Tensor) -> tf.Tensor:
  """``sigmoid(scores)``: the soft mask of the paper's eqs. 6-8."""
  return tf.sigmoid(scores)


def sampled_mask(scores: tf.Tensor, seed=None) -> tf.Tensor:
  """A sample ``m ~ Bernoulli(sigmoid(scores))`` forward (float32 0/1), ``sigmoid'(scores)`` backward.

  ``seed``: a shape-[2] integer tensor for ``tf.random.stateless_uniform`` (reproducible), or
  None for TF's stateful generator. The element is on where ``u < sigmoid(scores)``, ``u`` uniform
  in [0, 1).
  """
  scores = tf.convert_to_tensor(scores)
  if seed is None:
    u = tf.random.uniform(tf.shape(scores), dtype=scores.dtype)
  else:
    u = tf.random.stateless_uniform(tf.shape(scores), seed=seed, dtype=scores.dtype)

  @tf.custom_gradient
  def _forward(s):
    soft = tf.sigmoid(s)
    sample = tf.cast(u < soft, s.dtype)

    def _grad(upstream):
      return upstream * soft * (1.0 - soft)

    return sample, _grad

  return _forward(scores)


def expected_mask(scores: tf.Tensor) -> tf.Tensor:
  """``E[m] = sigmoid(scores)`` (an inference option of the sampled mode: the expected mask)."""
  return tf.sigmoid(scores)


def training_mask(scores: tf.Tensor, mode: str, threshold: float = DEFAULT_THRESHOLD,
                  seed=None) -> tf.Tensor:
  """The mask used in a training forward pass for ``mode`` (see :data:`MASK_MODES`);
  ``seed`` is the sampled mode's (see :func:`sampled_mask`)."""
  if mode == "ste":
    return ste_mask(scores, threshold)
  if mode == "soft":
    return soft_mask(scores)
  if mode == "sampled":
    return sampled_mask(scores, seed)
  raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mode!r}")


# --- Moving a client's scores by the aggregated vote ------------------------------

from fedmask_tff.masks.vote_rules import OVERWRITE_RULES, RESTART_RULES  # noqa: E402


def check_rule(rule: str, scale: float = 0.1, eps: float = 0.01) -> None:
  if rule not in RESTART_RULES:
    raise ValueError(f"score restart rule must be one of {RESTART_RULES}, got {rule!r}")
  if not (scale > 0 and math.isfinite(scale)):
    raise ValueError(f"restart scale must be a finite number > 0, got {scale}")
  if not 0 < eps < 0.5:
    raise ValueError(f"restart eps must be in (0, 0.5), got {eps}")


def scores_from_mask_values(values, rule: str = "scaled_logit", scale: float = 0.1,
                            eps: float = 0.01, threshold: float = DEFAULT_THRESHOLD):
  """Maps aggregated mask values ``v`` in [0, 1] to restart scores ``m_r`` (overwrite rules).

  The paper leaves open how ``m_r`` is set from a fractional value. Both rules
  keep the decision of the average: ``v >= threshold`` gives ``m = 1``, and both
  put the restarted scores near the threshold, where local training can still
  flip them (scores far from it barely move: their gradient carries
  ``sigmoid'(m_r)``).

  * ``"scaled_logit"``: ``m_r = logit(tau) + scale * (logit(clip(v, eps, 1 - eps)) - logit(tau))``.
    With tau = 0.5, ``scale = 0.1`` and ``eps = 0.01``, a unanimous 1 restarts
    at ``m_r = 0.46`` (sigmoid 0.61), a 3-of-4 vote at ``0.11``. ``scale = 1``
    restarts at the vote's own logit (the probability reading of FedPM).
  * ``"linear"``: ``m_r = logit(tau) + scale * 4 * (v - tau)``: proportional to
    the vote margin (4 = 1/sigmoid'(0) makes the two rules agree near tau).

  The persistent rules (:func:`apply_vote`) use ``scaled_logit`` where they
  restart. Works on numpy arrays or tensors; returns the same kind.
  """
  check_rule(rule, scale, eps)
  lib = tf.math if isinstance(values, (tf.Tensor, tf.Variable)) else np
  t0 = math.log(threshold / (1.0 - threshold))
  if rule == "linear":
    return t0 + scale * 4.0 * (values - threshold)
  v = lib.minimum(lib.maximum(values, eps), 1.0 - eps)
  logit = lib.log(v) - lib.log(1.0 - v)
  return t0 + scale * (logit - t0)


def apply_vote(scores, received, rule: str = "scaled_logit", scale: float = 0.1,
               eps: float = 0.01, threshold: float = DEFAULT_THRESHOLD):
  """A client's new scores from its scores and the vote it received.

  Args:
    scores: the client's real-valued scores ``m_r`` after its local training, any shape.
    received: same shape: the per-element vote ``v`` in [0, 1] (the share of
      the clients keeping the element whose binary mask is 1) where the element
      was averaged, and any negative value where it was not ("keep yours").
    rule: one of :data:`RESTART_RULES`:

      * ``"scaled_logit"``, ``"linear"`` (overwrite): every averaged element
        restarts from :func:`scores_from_mask_values` of ``v``.
      * ``"vote_shift"`` (persistent): ``m_r + scale * (2v - 1)``: every
        averaged element moves toward the vote's side by at most ``scale``; a
        vote equal to the client's own bit still moves it (it reinforces).
      * ``"disagree_shift"`` (persistent): ``m_r + scale * (2v - 1)`` only where
        the vote's decision ``1[v >= tau]`` differs from the client's own bit
        ``1[sigmoid(m_r) >= tau]``; elsewhere the scores are unchanged.
      * ``"disagree_restart"`` (persistent): where the decisions differ, restart
        from ``scaled_logit`` of ``v`` with ``scale`` (so the element takes the
        vote's decision near the threshold); elsewhere unchanged.

    scale, eps, threshold: the rule's step, the logit clip and tau.

  Returns the new scores (numpy or tensor, like ``scores``). Elements not
  averaged always keep the client's scores.
  """
  check_rule(rule, scale, eps)
  is_tf = isinstance(scores, (tf.Tensor, tf.Variable)) or isinstance(received, (tf.Tensor, tf.Variable))
  where = tf.where if is_tf else np.where
  averaged = received >= 0.0
  v = tf.clip_by_value(received, 0.0, 1.0) if is_tf else np.clip(received, 0.0, 1.0)
  if rule in OVERWRITE_RULES:
    return where(averaged, scores_from_mask_values(v, rule, scale, eps, threshold), scores)
  t0 = math.log(threshold / (1.0 - threshold))
  own = scores >= t0
  disagree = (v >= threshold) != own if not is_tf else tf.not_equal(v >= threshold, own)
  if rule == "vote_shift":
    return where(averaged, scores + scale * (2.0 * v - 1.0), scores)
  moved = averaged & disagree if not is_tf else tf.logical_and(averaged, disagree)
  if rule == "disagree_shift":
    return where(moved, scores + scale * (2.0 * v - 1.0), scores)
  return where(moved, scores_from_mask_values(v, "scaled_logit", scale, eps, threshold), scores)
