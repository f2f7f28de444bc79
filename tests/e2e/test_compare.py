"""`python -m experiments.compare`: algorithms on one partition, one table.

All eight algorithms run through the README's own compare command in
tests/e2e/test_documented_commands.py, which also checks every algorithm's bits; here two of them,
with client dropout, the rerun and the coding table."""

import csv
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, write_learnable_fashion_dir

ALGORITHMS = ["fedmask", "local_masks", "fedavg"]


def _compare(args, timeout=900):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", "experiments.compare", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  data = str(tmp_path_factory.mktemp("fm_compare"))
  write_learnable_fashion_dir(data)
  out = str(tmp_path_factory.mktemp("compare"))
  args = [f"--data_dir={data}", f"--output_dir={out}", "--model=mlp", "--model_width=0.25",
          "--num_clients=6", "--clients_per_round=3", "--rounds=2", "--local_epochs=1",
          "--batch_size=16", "--progress=false", "--dropout_rate=0.34",
          f"--algorithms={','.join(ALGORITHMS)}"]
  proc = _compare(args)
  return proc, out, args


def test_every_algorithm_ran_on_the_same_partition(compared):
  proc, out, _ = compared
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(out, "partition.json")) as f:
    partition = json.load(f)
  for name in ALGORITHMS:
    with open(os.path.join(out, name, "results.json")) as f:
      results = json.load(f)
    assert results["complete"] and results["algorithm"] == name
    assert results["config"]["partition_file"] == os.path.join(out, "partition.json")
    with open(os.path.join(out, name, "partition.json")) as f:
      assert json.load(f)["clients"] == partition["clients"]
    # --dropout_rate=0.34 of 3 sampled clients: one drops every round, the others train.
    for row in results["rounds"]:
      assert len(row["dropped_clients"]) == 1 and row["clients"] == 2
      assert row["train_flops"] > 0
    assert 0.0 <= results["final"]["accuracy"] <= 1.0
    for key in ("uplink_bits", "downlink_bits", "train_flops"):
      assert key in results["totals"]


def test_table_has_every_algorithm_and_measured_ratios(compared):
  proc, out, _ = compared
  with open(os.path.join(out, "comparison.csv")) as f:
    rows = {r["algorithm"]: r for r in csv.DictReader(f)}
  assert list(rows) == ALGORITHMS
  assert float(rows["local_masks"]["uplink_bits_per_client_round"]) == 0.0
  assert float(rows["local_masks"]["downlink_bits_per_client_round"]) == 0.0
  assert float(rows["fedavg"]["uplink_vs_fedavg"]) == 1.0
  with open(os.path.join(out, "fedavg", "results.json")) as f:
    params = json.load(f)["config"]["model_parameters"]
  assert float(rows["fedavg"]["downlink_bits_per_client_round"]) == 32 * params
  assert float(rows["fedmask"]["uplink_bits_per_client_round"]) < 2 * params
  # Per-client spread and bits per parameter (up + down), from the runs' own records.
  # FedAvg: 32 bits per weight each way (its upload also carries the float32 example count).
  assert float(rows["fedavg"]["bits_per_parameter_round"]) == pytest.approx(64.0, abs=0.01)
  for name, row in rows.items():
    with open(os.path.join(out, name, "results.json")) as f:
      per_client = sorted(json.load(f)["final"]["accuracy_per_client"].values())
    assert float(row["client_min"]) == per_client[0]
    assert per_client[0] <= float(row["client_p10"]) <= per_client[-1]
  assert rows["fedmask"]["before_local_training"] != "" and rows["fedavg"]["before_local_training"] == ""
  with open(os.path.join(out, "comparison.md")) as f:
    text = f.read()
  assert all(f"| {name} |" in text for name in ALGORITHMS)
  assert "| client min | client 10th pct |" in text
  assert os.path.exists(os.path.join(out, "fedavg", "global_model.weights.h5"))


def test_rerun_skips_finished_runs(compared):
  _, out, args = compared
  proc = _compare(args, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count("complete, skipped") == len(ALGORITHMS)


def test_one_learning_rate_for_all_is_refused(tmp_path):
  proc = _compare([f"--output_dir={tmp_path}", "--learning_rate=0.1"], timeout=120)
  assert proc.returncode == 2 and "--learning_rates" in proc.stderr


def test_coding_options_table(tmp_path):
  data = str(tmp_path / "fm")
  write_learnable_fashion_dir(data)
  out = str(tmp_path / "coding")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.compare_coding", f"--data_dir={data}", f"--output_dir={out}",
       "--model=mlp", "--model_width=0.25", "--num_clients=6", "--clients_per_round=3", "--rounds=2",
       "--local_epochs=1", "--batch_size=16", "--progress=false", "--ldp_epsilons=2"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(out, "coding.csv")) as f:
    rows = {r["variant"]: r for r in csv.DictReader(f)}
  assert set(rows) == {"plain", "entropy", "entropy_down8", "entropy_down4", "entropy_down4_stochastic",
                       "secure_aggregation", "ldp_eps2", "score_sign_default"}
  up = {k: float(r["uplink_bits_per_param"]) for k, r in rows.items()}
  down = {k: float(r["downlink_bits_per_param"]) for k, r in rows.items()}
  assert up["entropy"] < up["plain"]
  assert down["entropy_down4"] < down["entropy_down8"] < down["plain"]
  # Secure aggregation changes who sees what, not the numbers.
  assert float(rows["secure_aggregation"]["accuracy"]) == float(rows["plain"]["accuracy"])
  assert up["secure_aggregation"] == up["plain"]
  with open(os.path.join(out, "ldp_eps2", "results.json")) as f:
    ldp = json.load(f)["final"]["ldp"]
  assert ldp["epsilon_per_element_per_round"] == 2.0 and ldp["epsilon_per_element_max"] >= 2.0
