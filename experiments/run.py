"""Command line: ``python -m experiments.run --algorithm=fedmask --output_dir=DIR ...``.

Runs one configuration and writes ``DIR/results.json`` and ``DIR/metrics.csv``.
Every flag is validated before any data is loaded or any training starts; a bad
value ends the program with a message naming it and exit code 2. A TFF worker
of ``--workers`` that fails mid-run ends it with exit code 3; the finished
rounds are saved and rerunning the same command resumes. Every failure a user can cause ends
with one line, no traceback (exit codes: docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import app, flags

from fedmask_tff.masks.vote_rules import RESTART_RULES
from fedmask_tff.algorithms import ALGORITHMS
from fedmask_tff.simulation.run_config import (DATASETS, MODELS, PARTITIONS, STANDALONE_BUDGETS,
                                               RunConfig)
from fedmask_tff.simulation.failures import failure_message
from fedmask_tff.simulation.runner import run

_D = RunConfig()
FLAGS = flags.FLAGS
flags.DEFINE_enum("algorithm", _D.algorithm, list(ALGORITHMS), "Algorithm to run.")
flags.DEFINE_enum("dataset", _D.dataset, list(DATASETS), "Data set: fashion_mnist (the embedded "
                  "default), emnist and shakespeare (TFF SQLite), femnist_leaf and shakespeare_leaf "
                  "(LEAF JSON), shakespeare_h5 (TFF's HDF5), har (UCI-HAR), cifar10.")
flags.DEFINE_string("data_dir", None, "Folder with the data set's files (default: searched; see "
                    "fedmask_tff.data.registry; Fashion-MNIST: /usr/share/datasets/fashion-mnist).")
flags.DEFINE_enum("partition", _D.partition, list(PARTITIONS), "How examples are split into clients.")
flags.DEFINE_integer("classes_per_client", _D.classes_per_client, "k classes per client (pathological).")
flags.DEFINE_float("dirichlet_alpha", _D.dirichlet_alpha, "Concentration alpha (dirichlet).")
flags.DEFINE_integer("num_clients", _D.num_clients, "Total number of clients.")
flags.DEFINE_integer("clients_per_round", _D.clients_per_round, "Clients sampled per round.")
flags.DEFINE_integer("rounds", _D.rounds, "Communication rounds.")
flags.DEFINE_integer("local_epochs", _D.local_epochs, "Local epochs per round (after the pruning epoch "
                     "of a client's first round).")
flags.DEFINE_integer("batch_size", _D.batch_size, "Local batch size.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Local SGD learning rate (FedMask: on the mask "
                   "scores). Default: the algorithm's documented default (fedmask 30, fedavg 0.05, ...).")
flags.DEFINE_float("server_learning_rate", _D.server_learning_rate, "Server step on the averaged update "
                   "(fedavg, topk; 1.0 = plain averaging).")
flags.DEFINE_float("topk_fraction", _D.topk_fraction, "topk: fraction k of the update's elements sent.")
flags.DEFINE_bool("error_feedback", _D.error_feedback, "topk: keep the unsent part of the update "
                  "on the client and add it next round.")
flags.DEFINE_enum("per_fedavg_variant", _D.per_fedavg_variant, ["fo", "hf"], "per_fedavg: first-order "
                  "or Hessian-free.")
flags.DEFINE_float("per_fedavg_alpha", _D.per_fedavg_alpha, "per_fedavg: inner (adaptation) step size "
                   "alpha (default: the module's).")
flags.DEFINE_float("per_fedavg_beta", _D.per_fedavg_beta, "per_fedavg: outer step size beta "
                   "(default: the module's).")
flags.DEFINE_integer("lg_global_layers", _D.lg_global_layers, "lg_fedavg: how many top weight layers "
                     "are global (averaged); the rest stay local.")
flags.DEFINE_enum("standalone_budget", _D.standalone_budget, list(STANDALONE_BUDGETS),
                  "standalone: equal_epochs (a client trains when sampled, as many epochs as "
                  "under FedMask) or every_round (every client trains local_epochs in every "
                  "round: the paper's \"same total training time as FedMask\").")
flags.DEFINE_float("dropout_rate", _D.dropout_rate, "Share of each round's sampled clients that "
                   "fail (drop out) before training, in [0, 1).")
flags.DEFINE_bool("secure_aggregation", _D.secure_aggregation, "fedmask: aggregate the two "
                  "per-element counts with TFF's secure sum (the server sees only sums).")
flags.DEFINE_float("unseen_clients", _D.unseen_clients, "Share of clients held out of training; "
                   "they join after the last round, personalize with one round of client work, and "
                   "are reported as final.accuracy_unseen.")
flags.DEFINE_enum("uplink_coding", _D.uplink_coding, ["auto", "none", "entropy"], "fedmask, fedpm: "
                  "'entropy' codes each upload exactly (adaptive range coder; bits counted from "
                  "the coded stream): sampled bits against the theta the client received, "
                  "--upload=mask against the client's previous upload. 'auto' (default): entropy "
                  "for sampled masks (lossless: the same run, fewer bits), none otherwise.")
flags.DEFINE_integer("downlink_bits", _D.downlink_bits, "fedmask, fedpm: bits per element on the "
                     "downlink. Sampled masks: theta in 1, 2, 4, 8 or 32 bits (0 = the default: "
                     "fedmask 2, fedpm 32). Score-threshold uploads: 0 = float32, 2..16 = quantized.")
flags.DEFINE_enum("downlink_coding", _D.downlink_coding, ["auto", "none", "entropy"], "fedmask, "
                  "fedpm with sampled masks: 'entropy' codes the quantized theta sent down exactly "
                  "(bit planes through the same range coder; bits counted from the coded "
                  "stream). 'auto' (default): entropy where theta goes down in 1-8 bits, none "
                  "otherwise (float32 theta, score-threshold uploads).")
flags.DEFINE_bool("downlink_stochastic", _D.downlink_stochastic, "fedmask: stochastic rounding "
                  "of the quantized downlink.")
flags.DEFINE_float("ldp_epsilon", _D.ldp_epsilon, "fedmask: epsilon of randomized response on the "
                   "uploaded mask bits (unset = off).")
flags.DEFINE_string("partition_file", _D.partition_file, "Reuse a saved partition (a run's "
                    "partition.json): the same clients and train/test examples.")
flags.DEFINE_float("prune_rate", _D.prune_rate, "Fraction p_r of elements one-shot pruning keeps in "
                   "the last layers, in (0, 1] (default: 0.5 for masks trained as probabilities, "
                   "FedMask's default recipe, chosen on validation data; 0.2, the paper's, for "
                   "--upload=mask/score_sign).")
flags.DEFINE_integer("prune_last_layers", _D.prune_last_layers, "How many last masked layers are "
                     "pruned (default: the model's; the paper prunes VGG-16's last 8, others' last 2).")
flags.DEFINE_float("group_lasso", _D.group_lasso, "FedMask: weight of the paper's structured-sparsity "
                   "(group lasso) term on the masks; 0 = off.")
flags.DEFINE_integer("examples_per_client", _D.examples_per_client, "cifar10: cap on each client's "
                     "examples (the paper: about 25); 0 = no cap.")
flags.DEFINE_enum("mask_mode", _D.mask_mode, ["ste", "soft"], "Score-threshold uploads: training "
                  "forward mask: 'ste' (binary forward, sigmoid' backward) or 'soft' (sigmoid(m_r) "
                  "forward). Sampled masks always sample.")
flags.DEFINE_float("score_init", _D.score_init, "Initial value of every mask score m_r.")
flags.DEFINE_float("score_init_noise", _D.score_init_noise, "fedmask: add uniform noise in [-a, a] "
                   "(seeded, the same for every client) to score_init: a random initial mask "
                   "around the threshold instead of all ones.")
flags.DEFINE_enum("score_restart", _D.score_restart, list(RESTART_RULES), "How the aggregated "
                  "vote moves a client's scores m_r: scaled_logit/linear overwrite them; vote_shift, "
                  "disagree_shift, disagree_restart keep them between rounds and move them "
                  "(fedmask_tff.masks.masking.apply_vote).")
flags.DEFINE_float("restart_scale", _D.restart_scale, "Scale of the rule (restart scale or shift "
                   "step; default: the rule's own, fedmask_tff.masks.vote_rules).")
flags.DEFINE_enum("upload", _D.upload, ["sampled", "mask", "bernoulli", "score_sign"], "fedmask: what the 1 "
                  "bit per element says: 'sampled' (default: masks trained as probabilities; a "
                  "Bernoulli sample of each kept element; the server's Beta-Bernoulli theta is what "
                  "the feature layers start from every round, the pruned head stays the device's own), "
                  "'mask' (the paper: the binary mask, averaged by the server), "
                  "'bernoulli' (a sample of Bernoulli(sigmoid(m_r)), after FedPM) or "
                  "'score_sign' (the server keeps real-valued global scores G; a client starts from G "
                  "where it keeps the element and sends the direction its score moved; the server "
                  "steps G by --server_score_step times the majority).")
flags.DEFINE_enum("optimizer", _D.optimizer, ["adam", "sgd"], "Sampled masks (fedpm, "
                  "--upload=sampled): TFF's Adam (default, lr 0.1) or SGD on the scores.")
flags.DEFINE_enum("training_forward", _D.training_forward, ["sampled", "threshold"], "Sampled "
                  "masks: the training forward pass, a fresh Bernoulli sample (default) or the "
                  "thresholded mask with sigmoid' backward (the ablation).")
flags.DEFINE_float("score_init_mean", _D.score_init_mean, "Sampled masks: scores start from "
                   "N(mean, std^2) (FedPM: N(0, 1); logit(p0) with a small std starts near p0).")
flags.DEFINE_float("score_init_std", _D.score_init_std, "Sampled masks: see --score_init_mean.")
flags.DEFINE_enum("head_start", _D.head_start, ["own", "theta"], "fedmask, --upload=sampled: the "
                  "pruned head starts each round from the device's own scores (default) or from the "
                  "server's theta at its kept positions (Algorithm 1, line 13 read literally).")
flags.DEFINE_integer("personal_layers", _D.personal_layers, "fedmask, --upload=sampled: how many "
                     "of the pruned (last) layers keep the device's own scores between rounds (-1: "
                     "all); the other pruned layers start from theta at the device's kept positions.")
flags.DEFINE_bool("choose_personal", _D.choose_personal, "fedmask, --upload=sampled: each device "
                  "picks every round how many of its masked layers (from the input) start from "
                  "theta, the rest from its own scores, by accuracy on --choice_fraction of its "
                  "training examples, held out of its training (--personal_layers: the tie-break).")
flags.DEFINE_float("choice_fraction", _D.choice_fraction, "fedmask, --choose_personal: the share "
                   "of each device's training examples held out for the choice (by a hash of "
                   "each example's content).")
flags.DEFINE_float("personal_offset", _D.personal_offset, "fedmask, --upload=sampled: lambda in "
                   "[0, 1]: a device starts each unpruned layer at logit(theta) plus lambda times "
                   "its deviation from its theta start at the end of its last round (0: from "
                   "theta); it uploads samples of its progress from theta.")
flags.DEFINE_float("evidence_decay", _D.evidence_decay, "Sampled masks: share of earlier rounds' "
                   "evidence the server's Beta belief keeps (0: reset every round, FedPM's).")
flags.DEFINE_integer("evidence_reset_every", _D.evidence_reset_every, "Sampled masks: reset the "
                     "server's evidence every K rounds anyway (0: never).")
flags.DEFINE_float("server_score_step", _D.server_score_step, "fedmask, --upload=score_sign: the "
                   "server's step on its global scores per round.")
flags.DEFINE_float("global_weight", _D.global_weight, "fedmask, --upload=score_sign: a client starts "
                   "from w*G + (1-w)*(its own scores) at its kept positions, w in (0, 1].")
flags.DEFINE_bool("personal_head", _D.personal_head, "fedmask, --upload=score_sign: start from the "
                  "server's scores in the unpruned layers only; the pruned (last) layers keep the "
                  "client's own scores between rounds (default; --nopersonal_head mixes them too).")
flags.DEFINE_bool("global_mask", _D.global_mask, "fedmask, --upload=mask or bernoulli: Algorithm 1 "
                  "read literally: the server keeps the binary global mask m^T of the last "
                  "aggregation and a selected client starts from m^T at its kept positions (its "
                  "scores moved by --score_restart), instead of applying the vote after its own round.")
flags.DEFINE_bool("prune_at_init", _D.prune_at_init, "fedmask, local_masks: every client trains "
                  "its pruning epoch and prunes before round 1 (Algorithm 1 lines 4-6), instead of "
                  "at its first round; its cost is reported as results.json's 'initialization'.")
flags.DEFINE_enum("model", _D.model, list(MODELS), "Model architecture (default: the data set's: "
                  "cnn for images, vgg16 for cifar10, har_mlp for har, shakespeare_lstm for text).")
flags.DEFINE_float("model_width", _D.model_width, "Width multiplier of the model's hidden layers.")
flags.DEFINE_float("test_fraction", _D.test_fraction, "Share of each client's examples held out for its test.")
flags.DEFINE_float("validation_fraction", _D.validation_fraction, "Share of each client's training "
                   "examples held out and evaluated instead of its test data (for tuning; 0 = off).")
flags.DEFINE_integer("seed", _D.seed, "Seed of W, the partition, sampling and shuffling.")
flags.DEFINE_string("output_dir", _D.output_dir, "Where results.json, metrics.csv and client states go.")
flags.DEFINE_integer("eval_every", _D.eval_every, "Also evaluate every N rounds (0: only at the end).")
flags.DEFINE_integer("eval_batch_size", _D.eval_batch_size, "Batch size of evaluation.")
flags.DEFINE_integer("max_concurrent_clients", _D.max_concurrent_clients,
                     "Cap on client computations run in parallel (-1: no cap).")
flags.DEFINE_string("workers", None, "HOST:PORT,... of TFF workers started with `python -m "
                    "fedmask_tff.runtime.worker --port=PORT`: each round's clients are split over them "
                    "(default: one local worker). See docs/workers.md.")
flags.DEFINE_enum("client_datasets", _D.client_datasets, ["driver", "workers"],
                  "Where each round's client datasets are built: driver (serialized into the "
                  "request) or workers (inside the computation, from files written once; same "
                  "results). See docs/workers.md.")
flags.DEFINE_string("client_data_dir", None, "With --client_datasets=workers: where the client "
                    "files go (default OUTPUT_DIR/client_data; on several hosts a path every "
                    "worker can read).")
flags.DEFINE_enum("client_states", _D.client_states, ["auto", "messages", "files"],
                  "How FedMask's client states reach TFF's worker: files (the worker reads and "
                  "writes each state under OUTPUT_DIR/client_states/.exchange; its memory no "
                  "longer grows with the states of a round), messages (inside TFF's requests), "
                  "or auto: files with the local worker, messages with --workers. Same results. "
                  "See docs/workers.md.")
flags.DEFINE_float("worker_memory_limit_mb", _D.worker_memory_limit_mb,
                   "Restart the local TFF worker after a round when its resident memory exceeds "
                   "this (MB; 0: half the machine's memory). Results are unchanged.")
flags.DEFINE_bool("overwrite", _D.overwrite, "Replace the results in an existing --output_dir.")
flags.DEFINE_bool("progress", _D.progress, "Show a progress bar over rounds.")
flags.DEFINE_bool("dry_run", False, "Check every flag and print the settings (for compare and "
                  "the studies: every planned run's), load no data, run nothing.")
flags.DEFINE_bool("verbose", False, "Show TensorFlow's C++ log lines (silenced by default; see "
                  "experiments/__init__.py).")


def config_from_flags() -> RunConfig:
  return RunConfig(**{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(RunConfig)})


def main(argv):
  if len(argv) > 1:
    _exit(2, f"error: unexpected arguments: {argv[1:]} (pass --help for the flags)")
  import signal
  from fedmask_tff.simulation import runner
  sys.unraisablehook = _quiet_channel_teardown
  signal.signal(signal.SIGINT, runner.request_stop)
  signal.signal(signal.SIGTERM, runner.request_stop)
  try:
    config = config_from_flags().validate()
    if FLAGS.dry_run:
      import json
      print(json.dumps(dataclasses.asdict(config), indent=1))
      return
    run(config)
  except BaseException as e:  # pylint: disable=broad-except  (each a sentence; bugs re-raised)
    code, message = failure_message(e, FLAGS.output_dir, runner.stop_signal())
    if code is None:
      raise
    _exit(code, message)


def _quiet_channel_teardown(unraisable) -> None:
  """Drops what TFF's value finalizers raise once this process has closed its gRPC channel (they
  try to dispose of values on the worker, which is gone), and a Ctrl-C or SIGTERM that landed
  where Python ignores exceptions (the runner remembers it and stops after the round); everything
  else is printed as usual."""
  if isinstance(unraisable.exc_value, ValueError) and "closed channel" in str(unraisable.exc_value):
    return
  if isinstance(unraisable.exc_value, KeyboardInterrupt):  # the stop, remembered by the runner
    return
  sys.__unraisablehook__(unraisable)


def _exit(code: int, message: str) -> None:
  """Prints ``message`` and ends the process with ``code`` at once, after stopping this
  process's TFF worker: gRPC's threads, torn down by a normal interpreter exit after an
  interrupt, print stack traces or abort."""
  print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  if "fedmask_tff.runtime" in sys.modules:
    from fedmask_tff import runtime
    runtime.close_channels()
    runtime.stop_workers()
  os._exit(code)


def parse_flags(argv):
  """absl's flag parsing, with its errors (an unknown flag, a value of the wrong type) as one
  line and exit code 2, like every other bad setting."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _exit(2, f"error: {e} (pass --help for the flags)")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
