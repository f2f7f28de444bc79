"""The round loop: data, client sampling, client states, evaluation and outputs.

``run(RunConfig)`` is what ``python -m experiments.run`` calls. It validates the
whole configuration before any training, builds the federated data and the
process, runs the rounds (writing ``results.json`` and ``metrics.csv`` after
each), evaluates every client that took part on its own held-out test data, and
returns the results dict. The loop knows algorithms only through
:class:`fedmask_tff.algorithms.base.FederatedAlgorithm`; what an algorithm adds to the
records comes from it (``results_settings``, ``round_extras``, ``final_extras``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Optional

import numpy as np

from fedmask_tff.simulation import reporting
from fedmask_tff.simulation.run_config import NATURAL_CLIENTS, POOLED_DATASETS, ConfigError, RunConfig
from fedmask_tff.simulation.run_config import differing_settings, resume_state

# Files of a run directory that --overwrite removes.
RUN_FILES = ("client_states", "results.json", "metrics.csv", "partition.json", "checkpoint.npz",
             "tensorboard", "global_model.weights.h5", "client_data")
EVAL_CHUNK = 20  # clients per evaluation call (bounds the TFF worker's memory)
MESSAGE_HEADROOM = 0.9  # share of a TFF message the client states may fill (data, metrics too)


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
_STOP_SIGNAL = None


def request_stop(signum=None, *_) -> None:
  """SIGINT and SIGTERM handler (``experiments.run``): raises KeyboardInterrupt now and
  remembers it, so that an interrupt swallowed where Python ignores exceptions (a ``__del__`` or
  a garbage-collector callback) still stops the run after the round in progress is saved."""
  global _STOP_REQUESTED, _STOP_SIGNAL
  _STOP_REQUESTED, _STOP_SIGNAL = True, signum
  raise KeyboardInterrupt


def stop_signal():
  """The signal number that stopped the run (``None``: none, or Python's own Ctrl-C)."""
  return _STOP_SIGNAL


def _check_stop() -> None:
  if _STOP_REQUESTED:
    raise KeyboardInterrupt


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _client_seed(seed: int, round_num: int, client_index: int) -> int:
  return int(np.random.SeedSequence([seed, round_num, client_index]).generate_state(1)[0] >> 1)



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


@dataclasses.dataclass
class RunPlan:
  """What to do with one configuration of a study or comparison: ``action`` is ``"skip"``
  (complete with the same settings: ``results`` read back), ``"resume"``, ``"start"`` or
  ``"replace"``; ``config`` is the one to pass to :func:`run`."""
  action: str
  config: RunConfig
  results: Optional[dict] = None


def finished_results(config: RunConfig) -> Optional[dict]:
  """The results in ``config.output_dir`` if that run is complete with ``config``'s settings
  (those that change results), else ``None``."""
  path = os.path.join(config.output_dir, "results.json")
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, ValueError):
    return None
  if not results.get("complete") or differing_settings(results.get("config", {}), config):
    return None
  return results


def plan_run(config: RunConfig, replace: bool) -> RunPlan:
  """The one rerun policy of every tool that runs many configurations: a complete run with the
  same settings is skipped, an unfinished one resumes, and a run with other settings (or one
  that cannot resume) is replaced only when ``replace`` (``--overwrite``) is set; otherwise
  :class:`ConfigError` names the settings that differ."""
  config = dataclasses.replace(config, overwrite=False)
  done = finished_results(config)
  if done is not None:
    return RunPlan("skip", config, done)
  try:
    state = resume_state(config)
  except ConfigError:
    if not replace:
      raise
    state = "replace"
  if state == "restart":
    return RunPlan("start", dataclasses.replace(config, overwrite=True))
  if state in ("complete", "no_checkpoint"):
    if not replace:
      raise ConfigError(f"{config.output_dir} holds {_stored_run_words(config)}: pass "
                        "--overwrite to replace it, or choose another --output_dir")
    state = "replace"
  if state == "replace":
    return RunPlan("replace", dataclasses.replace(config, overwrite=True))
  return RunPlan("resume" if state == "resume" else "start", config)


def _stored_run_words(config: RunConfig) -> str:
  try:
    with open(os.path.join(config.output_dir, "results.json")) as f:
      differ = differing_settings(json.load(f).get("config", {}), config)
  except (OSError, ValueError):
    differ = []
  if differ:
    return f"a run with other settings ({', '.join('--' + d for d in differ)})"
  return "an unreadable or unresumable run"


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
  from fedmask_tff.simulation.run_lock import RunLock, RunLockError
  try:
    lock = RunLock(config.output_dir, _log)
  except RunLockError as e:
    raise ConfigError(str(e)) from None
  except OSError as e:
    raise ConfigError(f"--output_dir {config.output_dir} cannot be written: "
                      f"{e.strerror or e}") from None
  with lock:
    session = _Run(config)
    session.prepare()
    session.train()
    return session.finish()


class _Run:
  """One run, in the order its methods are called: ``prepare`` (data, TFF context, algorithm,
  store, resume), ``train`` (the rounds), ``finish`` (final evaluation, totals, summary)."""

  def __init__(self, config: RunConfig):
    self.config = config
    self.t_start = time.perf_counter()
    state = "fresh" if config.overwrite else resume_state(config)
    self.resuming, self.restarting = state == "resume", state == "restart"
    self.partition_path = os.path.join(config.output_dir, "partition.json")
    self.checkpoint_path = os.path.join(config.output_dir, "checkpoint.npz")
    self.client_files = None  # --client_datasets=workers: {client: (path, examples)}

  # --- set-up ------------------------------------------------------------------
  def prepare(self) -> None:
    import tensorflow as tf
    tf.keras.utils.set_random_seed(self.config.seed)
    _log(f"[fedmask_tff] {_loading_words(self.config)} ...")
    self._load_data()
    self._identify()
    self._clear_outputs()
    self._check_saved_state()
    os.makedirs(self.config.output_dir, exist_ok=True)
    if not self.resuming:
      from fedmask_tff.data import partition_file as partition_file_lib
      partition_file_lib.save_split_partition(self.partition_path, self.partition_split,
                                              self.config.dataset)
    _install_context(self.config)
    self._write_client_files()
    self._build_algorithm()
    self._restore()

  def _load_data(self) -> None:
    config = self.config
    reuse = self.resuming and config.dataset in POOLED_DATASETS
    split = load_split(dataclasses.replace(config, partition_file=self.partition_path) if reuse
                       else config)
    self.partition_split = split  # partition.json records the clients' real train/test split
    if config.validation_fraction > 0:
      from fedmask_tff.data.validation import holdout_validation
      split = holdout_validation(split, config.validation_fraction, config.seed)
      _log(f"[fedmask_tff] --validation_fraction={config.validation_fraction:g}: training on the "
           "rest of each client's training examples and evaluating on the held-out share; test "
           "data unused")
    self.split = split
    self.unseen = _unseen_clients(split.client_ids, config.unseen_clients, config.seed)
    self.training_ids = [c for c in split.client_ids if c not in self.unseen]
    if config.clients_per_round > len(self.training_ids):
      raise ConfigError(f"--clients_per_round={config.clients_per_round} but {config.dataset} has "
                        f"only {len(self.training_ids)} training clients here"
                        + (f" ({len(self.unseen)} held out by --unseen_clients)" if self.unseen else ""))
    self.summary = split.summary()
    _log(f"[fedmask_tff] data: {self.summary}")
    self._warn_few_local_steps()
    self.client_index = {cid: i for i, cid in enumerate(split.client_ids)}

  def _warn_few_local_steps(self) -> None:
    config = self.config
    from fedmask_tff import algorithms
    median = self.summary.get("median_train_examples_per_client")
    if median is None or not algorithms.uses_sampled_masks(config.algorithm, config.upload):
      return
    from fedmask_tff.algorithms.sampled_masks.config import few_local_steps_warning
    warning = few_local_steps_warning(median, config.local_epochs, config.batch_size)
    if warning:
      _log(f"[fedmask_tff] warning: {config.algorithm}: {warning}")

  def _identify(self) -> None:
    """The run's identity: its fingerprint, and its id (kept in ``results.json`` when it
    resumes; see :mod:`fedmask_tff.simulation.run_identity`)."""
    from fedmask_tff.simulation import run_identity
    self.fingerprint = run_identity.fingerprint(self.config, self.partition_split)
    self.run_id = run_identity.new_run_id()
    if self.resuming:
      results_path = os.path.join(self.config.output_dir, "results.json")
      with open(results_path) as f:
        stored = json.load(f)
      self.run_id = stored.get("config", {}).get("run_id")
      self.previous_wall_s = list(stored.get("wall_s_invocations") or [])
      if not self.run_id:
        raise ConfigError(f"{results_path} records no run identity (written by an older "
                          "version of fedmask_tff): rerun with --overwrite to start again")
    else:
      self.previous_wall_s = []

  def _clear_outputs(self) -> None:
    if self.restarting:
      _log(f"[fedmask_tff] {self.config.output_dir}: its run stopped before its first round "
           "finished; starting it again")
    if (self.config.overwrite or self.restarting) and os.path.isdir(self.config.output_dir):
      for name in RUN_FILES:
        target = os.path.join(self.config.output_dir, name)
        if os.path.isdir(target):
          shutil.rmtree(target)
        elif os.path.exists(target):
          os.remove(target)

  def _write_client_files(self) -> None:
    if self.config.client_datasets != "workers":
      return
    from fedmask_tff.data import client_files
    files_dir = self.config.client_data_dir or os.path.join(self.config.output_dir, "client_data")
    _log(f"[fedmask_tff] writing client training files to {files_dir} (built inside each round's "
         "computation) ...")
    self.client_files = client_files.write_client_files(files_dir, self.split.train,
                                                        self.split.client_ids)

  def _build_algorithm(self) -> None:
    from fedmask_tff import algorithms, models
    config, split = self.config, self.split
    self.model_name = models.model_for(config.dataset, config.model)
    self.prune_last = models.prune_last_layers(self.model_name, config.prune_last_layers)
    self.learning_rate = (config.learning_rate if config.learning_rate is not None
                          else algorithms.default_learning_rate(config.algorithm, config.upload))
    context = _build_context(config, split, self.model_name, self.learning_rate)
    try:
      self.algorithm = algorithms.build_algorithm(
          config.algorithm, context, dataclasses.replace(config, model=self.model_name,
                                                         prune_last_layers=self.prune_last))
    except ValueError as e:
      raise ConfigError(str(e)) from e
    self.num_params = self.algorithm.model_parameters
    self.store = self.algorithm.make_store(os.path.join(config.output_dir, "client_states"))
    if self.store is not None:
      self.store.owner = self.run_id
    self.chunk = self._clients_per_call()

  def _clients_per_call(self) -> int:
    """Clients per evaluation or preparation call, after refusing a round whose clients'
    states cannot travel to a TFF worker: TFF sends them in one request and gets the new ones
    back in one response, and a message holds at most ``runtime.MAX_MESSAGE_BYTES``."""
    from fedmask_tff import runtime
    config = self.config
    self.client_state_bytes = self.algorithm.client_state_bytes()
    state_bytes = self.client_state_message_bytes = self.algorithm.client_state_message_bytes()
    if not state_bytes:
      return EVAL_CHUNK
    fits = max(1, int(runtime.MAX_MESSAGE_BYTES * MESSAGE_HEADROOM // state_bytes))
    workers = len(config.workers.split(",")) if config.workers else 1
    per_call = math.ceil(config.clients_per_round / workers)
    if per_call > fits:
      raise ConfigError(
          f"--clients_per_round={config.clients_per_round}: each client's state is "
          f"{state_bytes / 1e6:.3g} MB ({self.model_name} at --model_width={config.model_width:g}), "
          f"so a round would send {per_call * state_bytes / 1e9:.2f} GB to "
          f"{'each' if workers > 1 else 'the'} TFF worker in one message, above the "
          f"{runtime.MAX_MESSAGE_BYTES / 1e9:.1f} GB limit of a message: use at most "
          f"{fits * workers} clients per round, more --workers, or a smaller --model_width")
    return min(EVAL_CHUNK, fits)

  def _settings_record(self) -> dict:
    """``results.json["config"]``: every flag, what was used, the algorithm's own settings."""
    cfg = dataclasses.asdict(self.config)
    cfg.update(model_used=self.model_name, prune_last_layers_used=self.prune_last,
               learning_rate_used=self.learning_rate, algorithm_settings=self.algorithm.settings,
               algorithm_description=self.algorithm.description,
               model_parameters=self.num_params, partition_file_written=self.partition_path,
               client_state_bytes=self.client_state_bytes,
               client_state_message_bytes=self.client_state_message_bytes, data=self.summary,
               run_id=self.run_id, fingerprint=self.fingerprint)
    cfg.update(self.algorithm.results_settings())
    return cfg

  def _restore(self) -> None:
    """The server state, sampling RNG and records: fresh, or from the checkpoint."""
    from fedmask_tff.simulation.outputs import RunOutputs
    config = self.config
    self.rng = np.random.default_rng(config.seed)
    self.server_state = self.algorithm.initialize()
    self.participated: set[str] = set()
    self.last_written: dict[str, int] = {}  # client -> round after which its file was written
    self.first_round, previous_rows, initialization = 1, [], None
    if self.resuming:
      previous_rows, initialization = self._resume()
    self.outputs = RunOutputs(config.output_dir, config.algorithm, config.dataset,
                              self._settings_record(), rounds=previous_rows,
                              started=self.t_start, previous_wall_s=self.previous_wall_s)
    if self.algorithm.prepares_clients and not self.resuming:
      self.store.round_num = 0
      initialization = _prepare_clients(self.algorithm, self.store, self.training_ids,
                                        lambda c: self.train_input(c, 0), self.chunk)
      self.last_written.update({c: 0 for c in self.training_ids})
    if initialization is not None:
      self.outputs.results["initialization"] = initialization
      self.outputs.save()
    self.totals = {key: sum(r[key] for r in previous_rows)
                   for key in ("uplink_bits", "downlink_bits", "train_flops")}
    if initialization is not None:
      self.totals["uplink_bits"] += initialization["uplink_bits"]
      self.totals["train_flops"] += initialization["train_flops"]

  def _check_saved_state(self) -> None:
    """Before any TFF work: a resumed run's checkpoint is this run's and of the last round of
    ``results.json`` (or the one after it), and every client file is the one the checkpoint
    records; a fresh run finds no client file. :class:`ConfigError` names what does not match."""
    from fedmask_tff.simulation import checkpoint, run_identity
    results_path = os.path.join(self.config.output_dir, "results.json")
    try:
      meta = {"last_written": {}, "round": 0, "round_clients": [], "has_client_states": False}
      if self.resuming:
        with open(results_path) as f:
          rows = json.load(f).get("rounds") or []
        meta = checkpoint.read_meta(self.checkpoint_path)
        checkpoint.check_belongs(meta, self.checkpoint_path,
                                 {"run_id": self.run_id, "fingerprint": self.fingerprint},
                                 results_path, rows)
      pending = set(meta["round_clients"]) if meta["has_client_states"] else set()
      run_identity.verify_client_files(
          os.path.join(self.config.output_dir, "client_states"), self.run_id,
          meta["last_written"], pending, self.checkpoint_path if self.resuming else None,
          meta["round"])
    except (checkpoint.CheckpointError, run_identity.StateMismatch) as e:
      raise ConfigError(str(e)) from None

  def _resume(self):
    """Loads and checks the checkpoint (this run's, of the last round of ``results.json`` or
    the one after it) and every client file against it, then finishes the checkpointed round's
    writes; returns the finished rounds' rows and the initialization record."""
    from fedmask_tff.simulation import checkpoint
    from fedmask_tff.wire.client_state import ClientStateError
    results_path = os.path.join(self.config.output_dir, "results.json")
    with open(results_path) as f:
      previous = json.load(f)
    rows = list(previous.get("rounds") or [])
    try:
      ckpt = checkpoint.load(self.checkpoint_path, self.server_state)
      checkpoint.check_belongs(ckpt, self.checkpoint_path,
                               {"run_id": self.run_id, "fingerprint": self.fingerprint},
                               results_path, rows)
    except checkpoint.CheckpointError as e:
      raise ConfigError(str(e)) from e
    self.server_state, self.participated = ckpt["server_state"], ckpt["participated"]
    self.rng.bit_generator.state = ckpt["rng_state"]
    self.last_written = {c: int(r) for c, r in ckpt["last_written"].items()}
    encoded = ckpt["encoded_client_states"]
    if self.store is not None:  # Every file was checked by _check_saved_state.
      pending = list(zip(ckpt["round_clients"], encoded or []))
      try:
        for c, enc in pending:
          self.store.identity(enc, c, f"{self.checkpoint_path}[{c}]")
      except ClientStateError as e:
        raise ConfigError(str(e)) from None
      for c, enc in pending:  # Finish the checkpointed round's writes.
        self.store.put_encoded(c, enc)
    self.first_round = ckpt["round"] + 1
    _log(f"[fedmask_tff] resuming {self.config.output_dir} after round {ckpt['round']}")
    if not rows or rows[-1]["round"] < ckpt["round"]:
      _log(f"[fedmask_tff] round {ckpt['round']}'s row restored from the checkpoint (the run "
           "stopped before it reached results.json)")
      rows.append(self._finish_row(dict(ckpt["row"]), ckpt["round"]))
    return rows, previous.get("initialization")

  # --- client inputs and evaluation ----------------------------------------------
  def train_dataset(self, cid: str, round_num: int):
    ds = self.split.train.create_tf_dataset_for_client(cid)
    seed = _client_seed(self.config.seed, round_num, self.client_index[cid])
    return ds.shuffle(4096, seed=seed, reshuffle_each_iteration=True).batch(self.config.batch_size)

  def train_input(self, cid: str, round_num: int):
    """What a round's computation receives for a client: its dataset, or (with
    --client_datasets=workers) the source the computation builds the same dataset from."""
    if self.client_files is None:
      return self.train_dataset(cid, round_num)
    from fedmask_tff.data import client_files
    path, examples = self.client_files[cid]
    return client_files.source(path, _client_seed(self.config.seed, round_num,
                                                  self.client_index[cid]), examples)

  def test_datasets(self, client_ids: list) -> list:
    return [self.split.test.create_tf_dataset_for_client(c).batch(self.config.eval_batch_size)
            for c in client_ids]

  def evaluate(self, client_ids: list, extra: bool = False) -> dict:
    """``{kind: {client: (correct, examples, loss_sum)}}`` on each client's own test data.

    kind "personal": each client's personalized model (see the algorithm); with ``extra``,
    also the algorithm's further evaluations (FedMask: "after_aggregation"). Each client's
    state and data are loaded once.
    """
    per_kind: dict[str, dict] = {"personal": {}}
    for i in range(0, len(client_ids), self.chunk):
      ids = client_ids[i:i + self.chunk]
      tests = self.test_datasets(ids)
      trains = [self.train_dataset(c, 0) for c in ids]  # a fixed order, for adaptation (Per-FedAvg)
      states = [self.store.get(c) for c in ids] if self.store is not None else None
      results = {"personal": self.algorithm.evaluate(self.server_state, tests, states, trains)}
      if extra:
        results.update(self.algorithm.evaluate_extra(self.server_state, tests, states, trains))
      for kind, metrics in results.items():
        for c, m in zip(ids, metrics):
          per_kind.setdefault(kind, {})[c] = _triple(m)
    return per_kind

  # --- the rounds ---------------------------------------------------------------------
  def train(self) -> None:
    config = self.config
    _log(f"[fedmask_tff] {config.algorithm}: {self.num_params:,} model parameters, {config.rounds} "
         f"rounds x {config.clients_per_round} clients, learning rate {self.learning_rate:g}, "
         f"setup {time.perf_counter() - self.t_start:.1f} s")
    import tensorflow as tf
    self.tensorboard = tf.summary.create_file_writer(os.path.join(config.output_dir, "tensorboard"))
    progress = reporting.Progress(config.rounds, enabled=config.progress,
                                  initial=self.first_round - 1)
    self.memory_limit_mb = config.worker_memory_limit_mb or (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 / 2)
    try:
      for round_num in range(self.first_round, config.rounds + 1):
        row = self.one_round(round_num)
        for key in self.totals:
          self.totals[key] += row[key]
        self.outputs.add_round(row)
        reporting.tensorboard_scalars(self.tensorboard, round_num, row)
        progress.update(round_num, row)
        _check_stop()
    finally:
      progress.close()

  def one_round(self, round_num: int) -> dict:
    """Samples, trains, checks, saves (checkpoint first, then client states); returns the row."""
    config, store, t0 = self.config, self.store, time.perf_counter()
    sampled = sorted(self.rng.choice(self.training_ids, size=config.clients_per_round,
                                     replace=False).tolist())
    dropped = _dropped_clients(sampled, config.dropout_rate, config.seed, round_num)
    sampled = [c for c in sampled if c not in dropped]
    states = [store.get(c) for c in sampled] if store is not None else None
    datasets = [self.train_input(c, round_num) for c in sampled]
    self.server_state, new_states, train = self.algorithm.next(self.server_state, datasets, states)
    row = reporting.round_row(round_num, sampled, dropped, train, self.num_params)
    _check_training(round_num, train)
    self.participated.update(sampled)
    row.update(self.algorithm.round_extras(train))
    row["worker_restarted"], row["wall_s"] = False, time.perf_counter() - t0
    from fedmask_tff.simulation import checkpoint
    encoded = None
    if store is not None:
      store.round_num = round_num
      encoded = [store.encode(st, c) for c, st in zip(sampled, new_states)]
      self.last_written.update({c: round_num for c in sampled})
    checkpoint.save(self.checkpoint_path, round_num, self.server_state, self.rng.bit_generator.state,
                    self.participated, sampled, encoded, last_written=self.last_written, row=row,
                    run={"run_id": self.run_id, "fingerprint": self.fingerprint})
    for c, enc in zip(sampled, encoded or []):
      store.put_encoded(c, enc)
    row["worker_restarted"] = self._restart_worker_if_big(round_num)
    row["wall_s"] = time.perf_counter() - t0
    return self._finish_row(row, round_num)

  def _finish_row(self, row: dict, round_num: int) -> dict:
    """Adds the evaluation of an ``--eval_every`` round (of the stored states) to ``row``."""
    config = self.config
    if config.eval_every and round_num % config.eval_every == 0 and round_num != config.rounds:
      accuracy = reporting.summarize(self.evaluate(sorted(self.participated))["personal"])
      row.update({k: v for k, v in accuracy.items()
                  if k in ("accuracy", "accuracy_client_mean", "evaluated_clients")})
    return row

  def _restart_worker_if_big(self, round_num: int) -> bool:
    """TFF's worker keeps memory from round to round (measured: +400 MB per round with HAR's
    1.7M-element masks, OOM-killed at 15.5 GB); the round is saved, so a fresh worker
    continues with identical results."""
    from fedmask_tff import runtime
    if self.config.workers or runtime.local_worker_rss_mb() <= self.memory_limit_mb:
      return False
    _log(f"[fedmask_tff] round {round_num}: TFF worker at {runtime.local_worker_rss_mb():.0f} MB "
         f"(limit {self.memory_limit_mb:.0f} MB); restarting it")
    runtime.restart_local_worker()
    return True

  # --- the end --------------------------------------------------------------------------
  def finish(self) -> dict:
    self._save_global_model()
    _log("[fedmask_tff] evaluating every client that took part on its own test data ...")
    final = self._final_evaluation()
    rounds = self.outputs.results["rounds"]
    final.update(self.algorithm.final_extras(rounds))
    if self.unseen:
      final.update(self._late_joiners())
    self.outputs.results["final"] = final
    self.outputs.results["totals"] = reporting.run_totals(
        self.totals, rounds, self.outputs.wall_s_total(), self.num_params)
    reporting.tensorboard_scalars(self.tensorboard, len(rounds), {"final_accuracy": final["accuracy"]})
    self.tensorboard.close()
    self.outputs.results["complete"] = True
    self.outputs.save()
    reporting.print_summary(self.outputs.results, self.num_params)
    return self.outputs.results

  def _save_global_model(self) -> None:
    global_model = self.algorithm.global_model(self.server_state)
    if global_model is None:
      return
    model_fn, weights = global_model
    model = model_fn()
    for variable, value in zip(model.trainable_weights + model.non_trainable_weights, weights):
      variable.assign(value)
    model.save_weights(os.path.join(self.config.output_dir, "global_model.weights.h5"))

  def _final_evaluation(self) -> dict:
    evaluated = self.evaluate(sorted(self.participated), extra=True)
    final = reporting.summarize(evaluated["personal"])
    final["evaluated_on"] = "validation" if self.config.validation_fraction > 0 else "test"
    final["model"] = self.algorithm.description
    for kind, per_client in evaluated.items():
      if kind != "personal":
        other = reporting.summarize(per_client)
        final[f"accuracy_{kind}"] = other["accuracy"]
        final[f"accuracy_{kind}_client_mean"] = other["accuracy_client_mean"]
    final["never_sampled_clients"] = len(self.training_ids) - len(self.participated)
    return final

  def _late_joiners(self) -> dict:
    """``--unseen_clients``: one round of client work from the server's current view each,
    then evaluation."""
    _log(f"[fedmask_tff] {len(self.unseen)} unseen clients join late: one round of local client "
         "work from the server's current view, then evaluation ...")
    per_client, ids, late_round = {}, sorted(self.unseen), self.config.rounds + 1
    for i in range(0, len(ids), self.chunk):
      chunk = ids[i:i + self.chunk]
      trains = [self.train_dataset(c, late_round) for c in chunk]
      states = self.algorithm.late_joiner_states(self.server_state, self.store, len(chunk))
      _, new_states, _ = self.algorithm.next(
          self.server_state, [self.train_input(c, late_round) for c in chunk], states)
      metrics = self.algorithm.evaluate(self.server_state, self.test_datasets(chunk), new_states, trains)
      for c, m in zip(chunk, metrics):
        per_client[c] = _triple(m)
    late = reporting.summarize(per_client)
    return {"accuracy_unseen": late["accuracy"], "accuracy_unseen_client_mean": late["accuracy_client_mean"],
            "accuracy_unseen_per_client": late["accuracy_per_client"], "unseen_clients": ids}


def _triple(metrics) -> tuple:
  return float(metrics["correct"]), float(metrics["examples"]), float(metrics["loss_sum"])


def _check_training(round_num: int, train: list) -> None:
  """Refuses a round whose training diverged, before anything of it is stored."""
  examples = sum(m["examples"] for m in train)
  loss = sum(m["loss_sum"] for m in train) / examples if examples else float("nan")
  diverged = sum(m.get("diverged", 0) for m in train)
  if not examples and diverged:
    raise FloatingPointError(f"round {round_num}: every client's training diverged "
                             f"({diverged} of {len(train)}); lower --learning_rate")
  if not math.isfinite(loss):
    raise FloatingPointError(f"round {round_num}: training loss is {loss}; lower --learning_rate")


def _install_context(config: RunConfig) -> None:
  from fedmask_tff import runtime
  if config.workers:
    try:
      addresses = runtime.install_remote_context(config.workers)
    except runtime.WorkerError as e:
      raise ConfigError(str(e)) from e
    _log(f"[fedmask_tff] each round split over {len(addresses)} TFF workers: {', '.join(addresses)}")
  else:
    runtime.install_local_context(max_concurrent_computation_calls=config.max_concurrent_clients,
                                  log_path=os.path.join(config.output_dir, "tff_worker.log"))


def _build_context(config: RunConfig, split, model_name: str, learning_rate: float):
  """What the algorithm is built from: data specs, model, local training, execution."""
  import tensorflow as tf
  from fedmask_tff.algorithms.base import BuildContext
  sample_x = next(iter(split.train.create_tf_dataset_for_client(split.client_ids[0])))["x"]
  element_spec = split.train.element_type_structure
  batched_spec = type(element_spec)(
      (k, tf.TensorSpec([None] + v.shape.as_list(), v.dtype)) for k, v in element_spec.items())
  dataset_computation, client_states_dir = None, None
  if config.client_states_used() == "files":
    client_states_dir = os.path.abspath(os.path.join(config.output_dir, "client_states", ".exchange"))
  if config.client_datasets == "workers":
    from fedmask_tff.data import client_files
    dataset_computation = lambda repeats: client_files.dataset_computation(  # noqa: E731
        element_spec, config.batch_size, graph_seed=config.seed, repeats=repeats)
  return BuildContext(
      input_shape=tuple(sample_x.shape.as_list()), num_classes=split.num_classes, model=model_name,
      model_width=config.model_width, seed=config.seed, element_spec=batched_spec,
      eval_element_spec=batched_spec, local_epochs=config.local_epochs,
      learning_rate=learning_rate, batch_size=config.batch_size, mask_mode=config.mask_mode,
      score_init=config.score_init,
      # Several workers: rounds as two TFF calls, each split over the workers without recomputation.
      split_round=bool(config.workers), dataset_computation=dataset_computation,
      client_states_dir=client_states_dir)


def _prepare_clients(algorithm, store, client_ids: list, train_input, chunk: int = EVAL_CHUNK) -> dict:
  """Every client's work before round 1 (``algorithm.prepare_clients``), ``chunk`` clients per
  TFF call, states stored; returns its measured cost (bits sent, FLOPs, seconds)."""
  _log(f"[fedmask_tff] before round 1: every client ({len(client_ids)}) trains its pruning epoch "
       "and prunes (--prune_at_init) ...")
  t0 = time.perf_counter()
  up, flops, pruned, diverged = 0, 0.0, 0, 0
  for i in range(0, len(client_ids), chunk):
    ids = client_ids[i:i + chunk]
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
