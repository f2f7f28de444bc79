"""FedMask under the shared algorithm interface (the process is :mod:`fedmask_tff.algorithms.fedmask.process`)."""

from __future__ import annotations

import contextlib
import dataclasses

from fedmask_tff.algorithms.fedmask import process as fedmask_process
from fedmask_tff.wire import payloads
from fedmask_tff.algorithms.base import BuildContext, FederatedAlgorithm


class FedMask(FederatedAlgorithm):
  """Binary masks over a frozen random model; 1-bit uploads; personalized by pruning."""
  name = "fedmask"
  round_in_two_steps = True

  def __init__(self, context: BuildContext, config: fedmask_process.FedMaskConfig,
               uplink_coding: str = "none"):
    from fedmask_tff import models
    builder = models.masked_builder(context.model)

    def model_fn():
      return builder(input_shape=context.input_shape, num_classes=context.num_classes,
                     width=context.model_width, seed=context.seed, mask_mode=context.mask_mode,
                     score_init=context.score_init)

    self.model_fn = model_fn
    files = context.client_states_dir is not None
    self.process = fedmask_process.build_fedmask_process(
        model_fn, context.element_spec, config, eval_element_spec=context.eval_element_spec,
        client_states="files" if files else "messages")
    self.exchange = None
    if files:  # States as files the worker reads and writes (its memory per client).
      from fedmask_tff.wire.state_files import StateExchange
      self.exchange = StateExchange(context.client_states_dir, self.initial_client_state())
    self.specs = self.process.specs
    self.model_parameters = sum(s.size for s in self.specs)
    self.settings = dict(dataclasses.asdict(config), mask_mode_used=context.mask_mode,
                         masked_parameters=self.model_parameters,
                         pruned_parameters=sum(s.size for s in self.specs if s.prunable),
                         masks=[{"name": s.name, "shape": list(s.shape), "prunable": s.prunable}
                                for s in self.specs],
                         client_states_used=self.process.client_states)
    from fedmask_tff.wire.coding import check_uplink_coding
    self.uplink_coding = check_uplink_coding(uplink_coding, config.upload, config.ldp_epsilon)
    self.settings["uplink_coding"] = uplink_coding
    self._packed_mask_bits = sum(8 * ((s.size + 7) // 8) for s in self.specs)
    self.description = ("W frozen; each client trains binary masks (mask_mode="
                        f"{context.mask_mode}); personalized model = its mask after local training")

  def results_settings(self):
    """Kept at the top level of ``results.json["config"]``, where earlier results had them."""
    return {k: self.settings[k] for k in ("mask_mode_used", "masked_parameters",
                                          "pruned_parameters", "masks")}

  def round_extras(self, client_metrics):
    extras = {}
    if "uplink_bits_packed" in client_metrics[0]:
      extras["uplink_bits_packed_per_client"] = (sum(m["uplink_bits_packed"] for m in client_metrics)
                                                 / len(client_metrics))
    extras["pruned_clients"] = int(sum(m["pruned"] for m in client_metrics))
    extras["mask_density"] = (sum(m["mask_ones"] for m in client_metrics)
                              / max(1.0, sum(m["mask_kept"] for m in client_metrics)))
    return extras

  def final_extras(self, rounds):
    """With randomized response: the privacy spent, by basic composition over the rounds a
    client took part in (:mod:`fedmask_tff.wire.ldp`)."""
    epsilon = self.process.config.ldp_epsilon
    if not epsilon > 0:
      return {}
    times = {}
    for r in rounds:
      for c in r["sampled_clients"]:
        times[c] = times.get(c, 0) + 1
    return {"ldp": {
        "mechanism": "randomized response on every uploaded mask bit",
        "epsilon_per_element_per_round": epsilon,
        "epsilon_per_element_by_client": {c: n * epsilon for c, n in sorted(times.items())},
        "epsilon_per_element_max": max(times.values(), default=0) * epsilon,
        "note": "basic composition over the rounds a client took part in, per mask element; "
                "correlated bits, the pruning mask and participation are not protected"}}

  @property
  def prepares_clients(self):
    return bool(self.process.config.prune_at_init)

  def prepare_clients(self, train_datasets, client_states):
    """Algorithm 1 lines 4-6: each client's pruning epoch and one-shot pruning, before round 1."""
    with self._carried(client_states) as (carried, read):
      new_states, metrics = self._with_datasets("prepare")(train_datasets, carried)
      new_states = read(new_states)
    return new_states, [{"uplink_bits": int(m["uplink_bits"]), "train_flops": float(m["train_flops"]),
                               "examples": float(m["examples"]), "pruned": int(m["pruned"]),
                               "diverged": int(m["diverged"])} for m in metrics]

  def initial_client_state(self):
    """A new client's state in the process's wire form (masks bit-packed): FedMask's states
    stay packed in the driver too (:class:`~fedmask_tff.wire.client_state.PackedStateStore`);
    ``process.unpack_state`` gives the full-size arrays."""
    return self.process.pack_state(self.process.initial_client_state())

  @contextlib.contextmanager
  def _carried(self, client_states):
    """``(states as the process takes them, read)``: the wire-form states themselves, or with
    files the paths of the files they are written to; ``read(returned)`` gives the wire-form
    states a computation returned. A call's files are removed when the block ends."""
    if self.exchange is None:
      yield client_states, list
    else:
      with self.exchange.call(client_states) as carried:
        yield carried

  def client_state_message_bytes(self) -> int:
    """With files, a state in TFF's messages is its path (at most this many bytes)."""
    if self.exchange is not None:
      return len(self.exchange.directory.encode()) + 64
    return super().client_state_message_bytes()

  def make_store(self, directory):
    from fedmask_tff.wire.client_state import PackedStateStore
    return PackedStateStore(directory, [s.shape for s in self.specs], self.initial_client_state)

  def late_joiner_states(self, server_state, store, count):
    """The server's view for a newcomer: per element, the mean of the personal masks of the
    clients (with a stored state) that keep it, where with the newcomer at least ``min_shared``
    do (FedMask's rule, :mod:`fedmask_tff.masks.aggregation`); the newcomer restarts its scores from
    it with the run's rule (``masking.apply_vote``), keeps everything, and prunes at its first round."""
    import numpy as np
    from fedmask_tff.masks import aggregation, masking
    if self.process.global_scores or self.process.config.global_mask:
      # A newcomer starts from the server's scores (or m^T), like anyone.
      return [self.initial_client_state() for _ in range(count)]
    totals = [np.zeros(s.shape, np.float64) for s in self.specs]
    counts = [np.zeros(s.shape, np.float64) for s in self.specs]
    for cid in store.client_ids():
      state = self.process.unpack_state(store.get(cid))
      for i in range(len(self.specs)):
        totals[i] += state["personal"][i] * state["keep"][i]
        counts[i] += state["keep"][i]
    config = self.process.config
    scores = []
    init = self.process.initial_client_state()
    for i, (t, c) in enumerate(zip(totals, counts)):
      # The newcomer keeps every element and counts as one of the clients sharing it.
      received = np.asarray(aggregation.received(np.ones_like(c), t, c, max(1, config.min_shared - 1)))
      scores.append(np.asarray(masking.apply_vote(
          np.asarray(init["scores"][i], np.float32), received.astype(np.float32), config.score_restart,
          config.restart_scale, config.restart_eps), np.float32))
    state = dict(init)
    state["scores"] = tuple(scores)
    state["personal"] = tuple((s >= 0).astype(np.float32) for s in scores)
    return [self.process.pack_state(state) for _ in range(count)]

  def next(self, server_state, train_datasets, client_states):
    with self._carried(client_states) as (carried, read):
      server_state, new_states, metrics = self.run_round(server_state, train_datasets, carried)
      new_states = read(new_states)
    out = []
    for m in metrics:
      t = m["train"]
      out.append({"loss_sum": float(t["loss_sum"]), "examples": float(t["examples"]),
                  "uplink_bits": int(t["uplink_bits"]), "downlink_bits": int(m["downlink_bits"]),
                  "train_flops": float(t["train_flops"]), "pruned": int(t["pruned"]),
                  "mask_ones": float(t["mask_ones"]), "mask_kept": float(t["mask_kept"]),
                  "diverged": int(t["diverged"]), "upload_valid": int(m["upload_valid"])})
    if self.uplink_coding == "entropy":
      for old, new, m in zip(client_states, new_states, out):
        self._code_upload(old, new, m)
    return server_state, new_states, out

  def _code_upload(self, old_state, new_state, metrics):
    """Uplink coding, measured exactly: the client's mask at its kept positions, entropy-coded
    against its previous upload (which the server has), encoded and decoded here in the driver.

    TFF still carries the packed mask (what the server computation decodes); the bits reported
    as ``uplink_bits`` are those of the coded stream, plus the packed pruning masks a client
    sends once at its first round. ``uplink_bits_packed`` keeps the uncoded figure.
    """
    import numpy as np
    from fedmask_tff.wire import coding
    metrics["uplink_bits_packed"] = metrics["uplink_bits"]
    if not metrics["upload_valid"]:
      return
    from fedmask_tff.wire import bitpack
    sizes = [(s.size,) for s in self.specs]
    keeps = [bitpack.unpack_bits_np(np.asarray(k), n, bool) for k, n in zip(new_state["keep"], sizes)]

    def kept_bits(state):  # the personal mask at the kept positions, uint8
      return np.concatenate([bitpack.unpack_bits_np(np.asarray(p), n, np.uint8)[k]
                             for p, k, n in zip(state["personal"], keeps, sizes)])
    bits, ref = kept_bits(new_state), kept_bits(old_state)
    stream = coding.encode_mask(bits, ref)
    if not np.array_equal(coding.decode_mask(stream, ref, bits.size), bits):
      raise RuntimeError("uplink coding did not decode exactly")  # never expected
    keep_bits = metrics["uplink_bits"] - self._packed_mask_bits
    metrics["uplink_bits"] = 8 * len(stream) + keep_bits

  def _evaluate(self, test_datasets, packed_masks):
    return payloads.eval_dicts(self.process.evaluate(test_datasets, packed_masks))

  def evaluate(self, server_state, test_datasets, client_states, train_datasets):
    return self._evaluate(test_datasets, [s["personal"] for s in client_states])

  def evaluate_extra(self, server_state, test_datasets, client_states, train_datasets):
    """``after_aggregation``: each client with the mask it restarted from after the last aggregation."""
    process = self.process
    masks = [process.pack_masks(process.start_masks(server_state, process.unpack_state(s)))
             for s in client_states]
    return {"after_aggregation": self._evaluate(test_datasets, masks)}


def build_fedmask(context: BuildContext, config: fedmask_process.FedMaskConfig,
                  uplink_coding: str = "none") -> FedMask:
  return FedMask(context, config, uplink_coding)


class LocalMasks(FedMask):
  """FedMask with no aggregation (the ablation): the same model, pruning, masks and local
  training; each client's scores persist between its rounds; nothing is sent (0 bits).

  Comparing ``fedmask`` with ``local_masks`` on one partition shows what aggregation adds."""
  name = "local_masks"
  round_in_two_steps = False

  def __init__(self, context: BuildContext, config: fedmask_process.FedMaskConfig):
    # Nothing is aggregated, so nothing global exists to start from: the client work is the
    # paper's (upload=mask), whose scores persist when no vote ever moves them.
    super().__init__(context, dataclasses.replace(config, upload="mask", personal_head=False,
                                                  downlink_bits=0, downlink_stochastic=False,
                                                  ldp_epsilon=0.0, secure_aggregation=False))
    self.settings["aggregation"] = "none (local_masks: each client trains its own mask alone)"
    self.description = ("W frozen; each client trains its binary mask alone (no aggregation, "
                        f"mask_mode={context.mask_mode}); personalized model = its mask")

  def run_round(self, server_state, *clients_args):
    """Only the client work of a FedMask round: train, no upload, no aggregate."""
    trained, _, metrics = self._with_datasets("client_work")(server_state, *clients_args)
    return server_state, trained, [{"train": m, "downlink_bits": 0, "upload_valid": 1}
                                   for m in metrics]

  def next(self, server_state, train_datasets, client_states):
    server_state, new_states, out = super().next(server_state, train_datasets, client_states)
    for m in out:
      m["uplink_bits"] = 0
    return server_state, new_states, out

  def evaluate_extra(self, server_state, test_datasets, client_states, train_datasets):
    return {}  # no aggregation: nothing "after aggregation" to evaluate


def build_local_masks(context: BuildContext, config: fedmask_process.FedMaskConfig) -> LocalMasks:
  return LocalMasks(context, config)
