"""Names of the rules by which the aggregated vote moves a client's mask scores (no TensorFlow
import, so the command line can check them before loading anything). The maths is
:func:`fedmask_tff.masks.masking.apply_vote`."""

# Rules that overwrite the score of every averaged element (the client's evidence below the
# threshold is lost) ...
OVERWRITE_RULES = ("scaled_logit", "linear")
# ... and rules under which a client's scores persist between rounds and the vote only moves them.
PERSISTENT_RULES = ("vote_shift", "disagree_shift", "disagree_restart")
RESTART_RULES = OVERWRITE_RULES + PERSISTENT_RULES
# The scale each rule uses when --restart_scale is not given.
# The shifts were chosen on UCI-HAR validation data (README, "FedMask: choosing the defaults").
DEFAULT_RULE_SCALE = {"scaled_logit": 0.1, "linear": 0.1, "vote_shift": 0.02,
                      "disagree_shift": 0.05, "disagree_restart": 0.1}


def rule_scale(rule: str, scale=None) -> float:
  """``scale``, or the rule's default when it is None."""
  if rule not in RESTART_RULES:
    raise ValueError(f"score restart rule must be one of {RESTART_RULES}, got {rule!r}")
  return float(DEFAULT_RULE_SCALE[rule] if scale is None else scale)
