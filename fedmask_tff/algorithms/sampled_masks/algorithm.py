"""FedPM, FedMask's default recipe and ``local_masks`` on sampled masks, under the shared
algorithm interface (:class:`fedmask_tff.algorithms.base.FederatedAlgorithm`).

* :class:`FedPM` (Isik et al., ICLR 2023): one global mask; every weight starts each round from
  the server's theta; nothing pruned; evaluated like FedAvg (the server's thresholded theta on
  each client's test data).
* :class:`SampledFedMask`: FedMask (Li et al. 2021) on the same machinery: the unpruned (feature)
  layers start every round from theta (m^T, Algorithm 1 line 13), the pruned last layers keep
  each device's own heterogeneous mask (its scores persist), the server updates each element
  from the devices that keep it where at least ``min_shared`` do; the personalized model is the
  device's mask after its local training.
* :class:`SampledLocalMasks`: the same client work with every weight personal and nothing sent
  (the ablation: what aggregation adds).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedmask_tff.algorithms import triad
from fedmask_tff.algorithms.base import BuildContext, FederatedAlgorithm
from fedmask_tff.algorithms.sampled_masks import downlink_coding, upload_coding
from fedmask_tff.algorithms.sampled_masks import process as sm_process
from fedmask_tff.algorithms.sampled_masks.config import SampledMaskConfig
from fedmask_tff.masks import probability
from fedmask_tff.wire import bitpack, payloads


class _Process:
  """The round's computations under the names the runner calls (``next``, ``client_work``,
  ``aggregate``, ``initialize``)."""

  def __init__(self, comps: sm_process.Computations):
    self.initialize = comps.initialize
    self.next = comps.round.next
    self.client_work = comps.round.client_work
    self.aggregate = comps.round.aggregate
    self.aggregate_uploads = comps.round.aggregate_uploads
    self.evaluate = comps.evaluate


class SampledMaskAlgorithm(FederatedAlgorithm):
  """Shared by the three algorithms: model, plan, computations, metrics and evaluation."""
  round_in_two_steps = True
  stateful = True
  everything_personal = False

  def __init__(self, context: BuildContext, config: SampledMaskConfig, uplink_coding: str = "none",
               downlink_coding: str = "none"):
    from fedmask_tff import models
    from fedmask_tff.masks import layers as masked_layers_lib
    for name, value in (("uplink_coding", uplink_coding), ("downlink_coding", downlink_coding)):
      if value not in ("none", "entropy"):
        raise ValueError(f"{name} must be 'none' or 'entropy', got {value!r}")
    if downlink_coding == "entropy" and config.downlink_bits == 32:
      raise ValueError("downlink_coding='entropy' codes quantized theta; downlink_bits=32 sends "
                       "float32 (use 1, 2, 4 or 8)")
    self.uplink_coding = uplink_coding
    self.downlink_coding = downlink_coding
    from fedmask_tff.models import costs
    builder = models.masked_builder(context.model)
    mask_mode = "sampled" if config.forward == "sampled" else "ste"

    def model_fn():
      return builder(input_shape=context.input_shape, num_classes=context.num_classes,
                     width=context.model_width, seed=context.seed, mask_mode=mask_mode,
                     score_init=0.0)

    probe = model_fn()
    self.config = config.validate(len(masked_layers_lib.masked_layers(probe)))
    self.model_fn = model_fn
    self.plan = sm_process.weight_plan(probe, self.config, self.everything_personal)
    self._weight_costs = costs.weight_costs(probe)
    comps = sm_process.build_computations(model_fn, self.plan, self.config, context.element_spec,
                                          context.eval_element_spec, stateful=self.stateful)
    self.computations = comps
    self.process = _Process(comps)
    self.model_parameters = sum(spec.size for spec in self.plan)
    self.settings = dict(dataclasses.asdict(self.config), recipe="sampled",
                         mask_mode_used=mask_mode, masked_parameters=self.model_parameters,
                         pruned_parameters=sum(s.size for s in self.plan if s.prunable),
                         personal_parameters=sum(s.size for s in self.plan if s.personal),
                         masks=[{"name": s.name, "shape": list(s.shape), "prunable": s.prunable,
                                 "personal": s.personal} for s in self.plan],
                         # States travel in TFF's messages (--client_states=files applies to the
                         # score-threshold process).
                         client_states_used="messages" if self.stateful else "none",
                         uplink_coding=uplink_coding, downlink_coding=downlink_coding)

  def results_settings(self):
    return {k: self.settings[k] for k in ("mask_mode_used", "masked_parameters",
                                          "pruned_parameters", "masks")}

  def initial_client_state(self):
    if not self.stateful:
      return None
    return sm_process.initial_client_state(self.plan, self.config)

  def _metrics(self, metrics):
    from fedmask_tff.models import costs
    out = []
    for m in metrics:
      d = payloads.to_python(m)
      d["train_flops"] = float(costs.train_flops(self._weight_costs, int(round(d["trained_examples"]))))
      d.setdefault("upload_valid", 1)
      out.append(d)
    return out

  def next(self, server_state, train_datasets, client_states):
    if "entropy" in (self.uplink_coding, self.downlink_coding):
      return self._next_coded(server_state, train_datasets, client_states)
    if self.stateful:
      server_state, new_states, metrics = self.run_round(server_state, list(train_datasets),
                                                         list(client_states))
      return server_state, list(new_states), self._metrics(metrics)
    server_state, metrics = self.run_round(server_state, list(train_datasets))
    return server_state, None, self._metrics(metrics)

  def _next_coded(self, server_state, train_datasets, client_states):
    """The round in its two steps, its payloads entropy-coded in between: ``uplink_bits``
    counts the coded upload streams (plus the pruning mask a client sends once; the packed bits
    TFF carried in ``uplink_bits_packed``), ``downlink_bits`` the coded theta
    (:mod:`.downlink_coding`; TFF's packed codes in ``downlink_bits_packed``)."""
    clients = [list(train_datasets)] + ([list(client_states)] if self.stateful else [])
    outputs = self._with_datasets("client_work")(server_state, *clients)
    if self.stateful:  # the new states stay here: only uploads and metrics go to the server
      server_state_next, metrics = self.process.aggregate_uploads(server_state, outputs[0],
                                                                  outputs[2])
      new_states = list(outputs[1])
    else:
      server_state_next, metrics = self.process.aggregate(server_state, *outputs)
      new_states = None
    metrics = self._metrics(metrics)
    check = int(server_state["round"]) % upload_coding.CHECK_EVERY == 0
    if self.uplink_coding == "entropy":
      self._code_uplink(server_state, outputs[0], new_states, metrics, check)
    if self.downlink_coding == "entropy":
      keeps = [s["keep"] for s in client_states] if self.stateful else [self._all_kept()] * len(metrics)
      coded = downlink_coding.downlink_bits_many(self.plan, self.config, server_state["theta"],
                                                 keeps, check=check)
      for m, bits in zip(metrics, coded):
        m["downlink_bits_packed"], m["downlink_bits"] = m["downlink_bits"], bits
    return server_state_next, new_states, metrics

  def _all_kept(self):
    return tuple(bitpack.pack_bits_np(np.ones(spec.size, np.uint8)) for spec in self.plan)

  def _code_uplink(self, server_state, uploads, new_states, metrics, check: bool) -> None:
    """Each valid upload coded against theta as it went down (:mod:`.upload_coding`)."""
    decisions = upload_coding.theta_decisions(self.plan, self.config, server_state["theta"])
    valid = [i for i, m in enumerate(metrics) if m["upload_valid"]]
    all_kept = None if self.stateful else self._all_kept()  # once a round, not per client
    refs = [upload_coding.references(self.plan, self.config, server_state["theta"],
                                     server_state["defined"],
                                     new_states[i]["keep"] if self.stateful else all_kept,
                                     decisions)
            for i in valid]
    coded = upload_coding.coded_bits_many([uploads[i][0] for i in valid], refs,
                                          check=0 if valid and check else None)
    for m in metrics:
      m["uplink_bits_packed"] = m["uplink_bits"]
    for i, bits in zip(valid, coded):
      packed = sum(8 * np.asarray(b).size for b in uploads[i][0])
      metrics[i]["uplink_bits"] = metrics[i]["uplink_bits"] - packed + bits

  def round_extras(self, client_metrics):
    n = max(1, len(client_metrics))
    extras = {"pruned_clients": int(sum(m["pruned"] for m in client_metrics)),
              "mask_density": (sum(m["mask_ones"] for m in client_metrics)
                               / max(1.0, sum(m["mask_kept"] for m in client_metrics))),
              # masked weights (from the input) the round's clients started from theta, mean
              "theta_layers_mean": sum(m["theta_layers"] for m in client_metrics) / n}
    if self.config.choose_personal:
      extras["held_out_examples_per_client"] = (
          sum(m["held_out_examples"] for m in client_metrics) / n)
    for way in ("uplink", "downlink"):  # --uplink_coding, --downlink_coding=entropy
      if client_metrics and f"{way}_bits_packed" in client_metrics[0]:
        extras[f"{way}_bits_packed_per_client"] = (
            sum(m[f"{way}_bits_packed"] for m in client_metrics) / len(client_metrics))
    return extras

  def _evaluate(self, test_datasets, scores, keeps):
    return payloads.eval_dicts(self.process.evaluate(list(test_datasets), scores, keeps))

  def server_scores(self, server_state, client_state=None):
    """``(scores, packed keep)`` of the server's mask as a client sees it before local training:
    ``logit(theta)`` at every shared weight; in a pruned weight, theta at the client's kept
    positions where the server has a value (``defined``), the client's own scores elsewhere."""
    scores, keeps = [], []
    for i, spec in enumerate(self.plan):
      theta = np.asarray(server_state["theta"][i])
      s = probability.start_scores(theta, self.config.eps).astype(np.float32)
      keep = np.asarray(client_state["keep"][i]) if client_state is not None else \
          bitpack.pack_bits_np(np.ones(spec.size, np.uint8))
      if spec.prunable and client_state is not None:
        own = np.asarray(client_state["scores"][i])
        s = np.where(np.asarray(server_state["defined"][i]), s, own).astype(np.float32)
      scores.append(s)
      keeps.append(keep)
    return tuple(scores), tuple(keeps)


class FedPM(SampledMaskAlgorithm):
  name = "fedpm"
  stateful = False

  def __init__(self, context: BuildContext, config: SampledMaskConfig, uplink_coding: str = "none",
               downlink_coding: str = "none"):
    super().__init__(context, dataclasses.replace(config, prune_last_layers=0, personal_head=False,
                                                  min_shared=1, choose_personal=False,
                                                  personal_offset=0.0),
                     uplink_coding, downlink_coding)
    self.description = ("W frozen; one global mask, trained as probabilities (Bernoulli-sampled "
                        "forward, Adam); 1 sampled bit per element up, theta down; evaluated "
                        "with the server's thresholded mask")

  def evaluate(self, server_state, test_datasets, client_states, train_datasets):
    scores, keeps = self.server_scores(server_state)
    n = len(test_datasets)
    return self._evaluate(test_datasets, [scores] * n, [keeps] * n)


class SampledFedMask(SampledMaskAlgorithm):
  name = "fedmask"

  def __init__(self, context: BuildContext, config: SampledMaskConfig, uplink_coding: str = "none",
               downlink_coding: str = "none"):
    super().__init__(context, config, uplink_coding, downlink_coding)
    self.description = ("W frozen; feature layers' masks start every round from the server's "
                        "theta (m^T), the pruned last layers stay each device's own; masks "
                        "trained as probabilities; 1 sampled bit per kept element up")

  def evaluate(self, server_state, test_datasets, client_states, train_datasets):
    return self._evaluate(test_datasets, [s["scores"] for s in client_states],
                          [s["keep"] for s in client_states])

  def evaluate_extra(self, server_state, test_datasets, client_states, train_datasets):
    """``after_aggregation``: the server's mask as each client sees it before local training."""
    pairs = [self.server_scores(server_state, s) for s in client_states]
    return {"after_aggregation": self._evaluate(test_datasets, [p[0] for p in pairs],
                                                [p[1] for p in pairs])}


class SampledLocalMasks(SampledFedMask):
  """The same client work, every weight personal, nothing sent or aggregated."""
  name = "local_masks"
  everything_personal = True
  round_in_two_steps = False

  def __init__(self, context: BuildContext, config: SampledMaskConfig, uplink_coding: str = "none",
               downlink_coding: str = "none"):
    # Nothing is sent; every weight is personal, so there is nothing to choose.
    super().__init__(context, dataclasses.replace(config, choose_personal=False, personal_offset=0.0),
                     "none", "none")
    self.settings["aggregation"] = "none (local_masks: each client trains its own mask alone)"
    self.description = "W frozen; each client trains its own sampled mask alone; 0 bits"

  def run_round(self, server_state, *clients_args):
    _, new_states, metrics = self.process.client_work(server_state, *clients_args)
    return server_state, new_states, metrics

  def next(self, server_state, train_datasets, client_states):
    server_state, new_states, metrics = super().next(server_state, train_datasets, client_states)
    for m in metrics:
      m["uplink_bits"] = 0
      m["downlink_bits"] = 0
    return server_state, new_states, metrics

  def evaluate_extra(self, server_state, test_datasets, client_states, train_datasets):
    return {}
