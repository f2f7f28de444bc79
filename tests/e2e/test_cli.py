"""End to end: `python -m experiments.run` on small IDX files written here (no real data).

Checks the results.json schema, that the bits it reports are those of the
payloads, that the run learns, that bad flags fail before training, and that
no TFF worker outlives the command.
"""

import csv
import json
import os
import subprocess
import sys

from helpers import ROOT, orphan_workers, run_cli, write_learnable_fashion_dir

import numpy as np
import pytest



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("fmnist")
  write_learnable_fashion_dir(str(d))
  return str(d)


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("run"))
  proc, workers_before = run_cli([
      f"--data_dir={data_dir}", f"--output_dir={out}", "--model=mlp", "--model_width=0.25",
      "--num_clients=6", "--clients_per_round=3", "--rounds=3", "--local_epochs=2",
      "--batch_size=16", "--progress=false", "--eval_every=2"])
  return proc, out, workers_before


def test_run_succeeds_and_prints_summary(finished_run):
  proc, _, _ = finished_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "personalized test accuracy" in proc.stdout
  assert "dense FedAvg would send" in proc.stdout


def test_no_worker_outlives_the_command(finished_run):
  proc, _, before = finished_run
  assert proc.returncode == 0
  assert not (orphan_workers() - before)


def test_results_json_schema_and_values(finished_run):
  proc, out, _ = finished_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, "results.json")) as f:
    r = json.load(f)
  assert r["algorithm"] == "fedmask" and r["dataset"] == "fashion_mnist"
  assert r["complete"] is True
  for flag in ("partition", "classes_per_client", "dirichlet_alpha", "num_clients",
               "clients_per_round", "rounds", "local_epochs", "batch_size", "learning_rate",
               "prune_rate", "seed", "output_dir", "data_dir", "mask_mode"):
    assert flag in r["config"], flag
  assert r["config"]["mask_mode_used"] == "sampled"  # the default recipe samples its masks
  assert [x["round"] for x in r["rounds"]] == [1, 2, 3]
  for row in r["rounds"]:
    for key in ("train_loss", "uplink_bits", "downlink_bits", "wall_s"):
      assert key in row
    assert row["wall_s"] > 0 and np.isfinite(row["train_loss"])
  assert "accuracy" in r["rounds"][1]  # --eval_every=2
  final = r["final"]
  assert 0.0 <= final["accuracy"] <= 1.0
  assert set(final["accuracy_per_client"]) and len(final["accuracy_per_client"]) == final["evaluated_clients"]
  # The client mean is the mean of the per-client accuracies; the example-weighted accuracy
  # weights them by test examples (unequal here: 6 clients share 10 classes two by two), so it
  # lies between the smallest and the largest.
  per_client = list(final["accuracy_per_client"].values())
  assert final["accuracy_client_mean"] == pytest.approx(sum(per_client) / len(per_client), abs=1e-9)
  assert min(per_client) - 1e-9 <= final["accuracy"] <= max(per_client) + 1e-9
  assert final["accuracy"] > 0.5  # the row-band classes are easy: it must learn something
  totals = r["totals"]
  assert totals["rounds"] == 3
  assert totals["uplink_bits"] == sum(x["uplink_bits"] for x in r["rounds"])
  assert totals["downlink_bits"] == sum(x["downlink_bits"] for x in r["rounds"])
  assert totals["wall_s"] > 0


def test_bits_match_the_payload_layout(finished_run):
  proc, out, _ = finished_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, "results.json")) as f:
    r = json.load(f)
  masks = r["config"]["masks"]
  mask_bits = sum(8 * ((int(np.prod(m["shape"])) + 7) // 8) for m in masks)
  keep_bits = sum(8 * ((int(np.prod(m["shape"])) + 7) // 8) for m in masks if m["prunable"])
  seen = set()
  # The default (--upload=sampled): 1 bit up per element of every unpruned weight and per kept
  # element of a pruned one (p_r = 0.5 of it by default), each weight packed to whole bytes, plus the packed
  # pruning masks in the round the client prunes (its first); down, theta in 2 bits per element
  # of every unpruned weight (the pruned head starts from the client's own scores). The uploads
  # are entropy-coded by default (--uplink_coding=auto): each client's coded bits are at most its
  # packed bits plus the byte saying which it sent; the round keeps the packed mean beside them.
  # The 2-bit theta is entropy-coded too (--downlink_coding=auto): at most the packed codes + 8.
  assert r["config"]["upload"] == "sampled" and r["config"]["uplink_coding"] == "auto"
  assert r["config"]["downlink_coding"] == "auto"
  sizes = [(int(np.prod(m["shape"])), m["prunable"]) for m in masks]
  assert r["config"]["prune_rate"] is None  # unset: the recipe's, 0.5 for sampled masks
  up = sum(8 * (((max(1, round(0.5 * n)) if p else n) + 7) // 8) for n, p in sizes)
  down = sum(8 * ((2 * n + 7) // 8) for n, p in sizes if not p)
  for row in r["rounds"]:
    packed = []
    for cid, bits in row["uplink_bits_by_client"].items():
      first = cid not in seen
      packed.append(up + (keep_bits if first else 0))  # pruning masks once
      assert keep_bits * first < bits <= packed[-1] + 8, (row["round"], cid)
      assert 0 < row["downlink_bits_by_client"][cid] <= down + 8, (row["round"], cid)
      seen.add(cid)
    assert row["uplink_bits_packed_per_client"] == pytest.approx(sum(packed) / len(packed))
    assert row["downlink_bits_packed_per_client"] == down
  del mask_bits


def test_metrics_csv_has_a_row_per_round(finished_run):
  _, out, _ = finished_run
  with open(os.path.join(out, "metrics.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [int(x["round"]) for x in rows] == [1, 2, 3]
  assert all(int(x["uplink_bits"]) > 0 for x in rows)


def test_existing_results_are_not_overwritten(finished_run, data_dir):
  _, out, _ = finished_run
  proc, _ = run_cli([f"--data_dir={data_dir}", f"--output_dir={out}", "--rounds=1"], timeout=120)
  assert proc.returncode == 2
  assert "finished run with other settings (" in proc.stderr and "--rounds" in proc.stderr
  assert "pass --overwrite" in proc.stderr


@pytest.mark.parametrize("flags,message", [
    (["--num_clients=4", "--clients_per_round=5"], "--clients_per_round"),
    (["--prune_rate=0"], "--prune_rate"),
    (["--prune_rate=1.5"], "--prune_rate"),
    (["--learning_rate=nan"], "--learning_rate"),
    (["--rounds=0"], "--rounds"),
    (["--data_dir=/nonexistent/fmnist"], "--data_dir"),
    (["--partition=dirichlet", "--dirichlet_alpha=-1"], "--dirichlet_alpha"),
])
def test_bad_flags_fail_before_training(tmp_path, flags, message):
  proc, _ = run_cli([f"--output_dir={tmp_path}/out", *flags], timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert message in proc.stderr
  assert not os.path.exists(f"{tmp_path}/out/results.json")


def test_impossible_partition_is_reported(data_dir, tmp_path):
  # 10 classes, 60 train+test examples per class over 600 clients: cannot give each 2 classes.
  proc, _ = run_cli([f"--data_dir={data_dir}", f"--output_dir={tmp_path}/out",
                     "--num_clients=600", "--clients_per_round=2"], timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error:" in proc.stderr


def test_tensorboard_scalars_per_round(finished_run):
  import glob
  import tensorflow as tf
  _, out, _ = finished_run
  files = glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))
  assert files
  seen = {}
  for path in files:
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        seen.setdefault(value.tag, set()).add(event.step)
  assert seen["train_loss"] == {1, 2, 3}
  assert seen["uplink_bits_per_client"] == {1, 2, 3} and seen["train_flops_per_client"] == {1, 2, 3}
  assert seen["accuracy"] == {2}  # --eval_every=2 of 3 rounds
  assert "final_accuracy" in seen


@pytest.mark.parametrize("algorithm", ["fedmask", "lg_fedavg"])
def test_unseen_clients_join_late_and_are_reported_apart(data_dir, tmp_path, algorithm):
  out = str(tmp_path / "run")
  proc, _ = run_cli([f"--data_dir={data_dir}", f"--output_dir={out}", f"--algorithm={algorithm}",
                     "--model=mlp", "--model_width=0.25", "--num_clients=6", "--clients_per_round=2",
                     "--rounds=3", "--local_epochs=1", "--batch_size=16", "--progress=false",
                     "--unseen_clients=0.34"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, "results.json")) as f:
    results = json.load(f)
  unseen = results["final"]["unseen_clients"]
  assert len(unseen) == 2
  sampled = {c for r in results["rounds"] for c in r["sampled_clients"]}
  assert not sampled & set(unseen)  # never trained
  assert set(results["final"]["accuracy_unseen_per_client"]) == set(unseen)
  assert 0.0 <= results["final"]["accuracy_unseen"] <= 1.0
  assert not set(results["final"]["accuracy_per_client"]) & set(unseen)


def test_local_masks_and_validation_split_end_to_end(data_dir, tmp_path):
  """--algorithm=local_masks sends nothing; --validation_fraction evaluates on examples held out
  of each client's training set (never its test examples) and says so."""
  out = str(tmp_path / "local")
  proc, _ = run_cli([f"--data_dir={data_dir}", f"--output_dir={out}", "--algorithm=local_masks",
                     "--model=mlp", "--model_width=0.25", "--num_clients=6", "--clients_per_round=3",
                     "--rounds=2", "--local_epochs=1", "--batch_size=16", "--progress=false",
                     "--validation_fraction=0.25"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, "results.json")) as f:
    r = json.load(f)
  assert r["algorithm"] == "local_masks" and r["final"]["evaluated_on"] == "validation"
  assert all(row["uplink_bits"] == 0 and row["downlink_bits"] == 0 for row in r["rounds"])
  # Nothing is aggregated: every weight is the client's own (the sampled recipe's client work).
  assert r["config"]["algorithm_settings"]["recipe"] == "sampled"
  assert all(m["personal"] for m in r["config"]["algorithm_settings"]["masks"])
  assert "accuracy_after_aggregation" not in r["final"]
  assert "personalized validation accuracy" in proc.stdout
  with open(os.path.join(out, "partition.json")) as f:
    part = json.load(f)["clients"]
  # Validation examples come from the training examples: the client's test examples are unused.
  assert all(len(c["test"]) > 0 for c in part.values()) and r["config"]["data"]["total_test_examples"] > 0
  total_train = sum(len(c["train"]) for c in part.values())
  assert r["config"]["data"]["total_train_examples"] + r["config"]["data"]["total_test_examples"] \
      == total_train


def test_bad_validation_fraction_fails_before_training(data_dir, tmp_path):
  proc, _ = run_cli([f"--data_dir={data_dir}", f"--output_dir={tmp_path}/v",
                     "--validation_fraction=1.5"])
  assert proc.returncode == 2 and "--validation_fraction" in proc.stderr


def test_algorithm1_literally_end_to_end(data_dir, tmp_path):
  """--upload=mask --global_mask --prune_at_init: every client prunes before round 1 (its
  pruning masks counted once in the totals), no client prunes in a round, and the downlink is
  m^T's bits."""
  out = str(tmp_path / "alg1")
  args = [f"--data_dir={data_dir}", f"--output_dir={out}", "--upload=mask", "--global_mask",
          "--prune_at_init", "--model=mlp", "--model_width=0.25", "--num_clients=6",
          "--clients_per_round=3", "--rounds=2", "--local_epochs=1", "--batch_size=16",
          "--progress=false"]
  proc, _ = run_cli(args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, "results.json")) as f:
    r = json.load(f)
  init = r["initialization"]
  assert init["clients"] == 6 and init["pruned_clients"] == 6 and init["uplink_bits"] > 0
  assert all(row["pruned_clients"] == 0 for row in r["rounds"])
  assert r["totals"]["uplink_bits"] == init["uplink_bits"] + sum(row["uplink_bits"] for row in r["rounds"])
  masked = r["config"]["masked_parameters"]
  # Downlink: at most 2 bits per element (m^T's bit and a "defined" bit), never float32.
  assert all(0 < row["downlink_bits_per_client"] <= 2 * masked + 64 for row in r["rounds"])
  assert r["config"]["algorithm_settings"]["global_mask"] is True
  assert 0.0 <= r["final"]["accuracy_after_aggregation"] <= 1.0
  proc, _ = run_cli(args[:1] + [f"--output_dir={tmp_path}/bad", "--global_mask"])
  assert proc.returncode == 2 and "--global_mask" in proc.stderr


def test_console_is_quiet_and_says_what_loading_does(finished_run):
  """No TensorFlow C++ log lines between our lines by default (--verbose shows them); the
  loading line says how clients are made."""
  proc, out, _ = finished_run
  assert "tensorflow/" not in proc.stderr and "Starting new session" not in proc.stderr
  assert "partitioning it into 6 clients (pathological, 2 classes per client)" in proc.stderr + proc.stdout
  verbose, _ = run_cli(["--verbose", "--validation_fraction=1.5", f"--output_dir={out}/v"])
  assert verbose.returncode == 2 and "tensorflow/" in verbose.stderr


def test_loading_words_for_data_federated_by_nature():
  from fedmask_tff.simulation.run_config import RunConfig
  from fedmask_tff.simulation.runner import _loading_words
  assert "one client per subject" in _loading_words(RunConfig(dataset="har", num_clients=30))
  assert "partitioning" not in _loading_words(RunConfig(dataset="femnist_leaf"))
  assert "dirichlet, alpha 0.1" in _loading_words(RunConfig(partition="dirichlet", dirichlet_alpha=0.1))


def test_plot_command_draws_accuracy_against_rounds_and_bits(finished_run, tmp_path):
  _, out, _ = finished_run
  png = str(tmp_path / "figs" / "runs.png")
  proc = subprocess.run([sys.executable, "-m", "experiments.plot", out, out, f"--output={png}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(out, "results.json")) as f:
    r = json.load(f)
  with open(png[:-4] + ".csv") as f:
    rows = list(csv.DictReader(f))
  # eval_every=2 over 3 rounds: round 2 and the final evaluation, once per listed run.
  assert [int(x["round"]) for x in rows] == [2, 3, 2, 3]
  assert float(rows[1]["accuracy"]) == pytest.approx(r["final"]["accuracy"])
  bits = sum(x["uplink_bits_per_client"] + x["downlink_bits_per_client"] for x in r["rounds"])
  assert float(rows[1]["cumulative_mb_per_client"]) == pytest.approx(bits / 8 / 1e6)
  assert rows[0]["label"].startswith("fedmask")
  bad = subprocess.run([sys.executable, "-m", "experiments.plot", str(tmp_path / "nope"),
                        f"--output={png}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "nope is not a directory" in bad.stderr
