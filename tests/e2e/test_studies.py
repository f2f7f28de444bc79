"""`python -m experiments.studies`: one command per study of the paper (tiny settings here)."""

import csv
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, orphan_workers, tff_workers, write_learnable_fashion_dir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _studies(args, timeout=300):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", "experiments.studies", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == PNG_SIGNATURE


@pytest.fixture(scope="module")
def model_size(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("model_size"))
  return _studies(["--study=model_size", f"--output_dir={out}"], timeout=300), out


def test_model_size_counts_equal_the_models(model_size):
  proc, out = model_size
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("table.md", "study.json", "study.csv", "figure.png"):
    assert os.path.exists(os.path.join(out, name)), name
  assert _is_png(os.path.join(out, "figure.png"))
  with open(os.path.join(out, "study.json")) as f:
    study = json.load(f)
  rows = {r["model"]: r for r in study["models"]}
  assert study["width"] == 1.0 and study["prune_rate"] == 0.2
  # The masked-element counts of fedmask_tff.models.paper (asserted in test_paper_models.py too).
  assert rows["vgg16 (CIFAR-10)"]["mask_parameters"] == 15_239_872
  assert rows["har_mlp (HAR)"]["mask_parameters"] == 1_707_008
  assert rows["shakespeare_lstm (Shakespeare)"]["mask_parameters"] == 904_448
  # LSTM: + 720 embedding weights + 2 x 4 x 256 frozen LSTM biases outside the masks.
  assert rows["shakespeare_lstm (Shakespeare)"]["parameters"] == 904_448 + 720 + 2 * 4 * 256
  assert rows["cnn (Fashion-MNIST)"]["mask_parameters"] == 421_408  # models.build_cnn's docstring
  # The paper's Table 5: its Baseline MB are 4 bytes x the parameters of the networks we name.
  paper = {r["task"]: r for r in study["paper_table5"]}
  assert set(paper) == {"IC-CIFAR10", "IC-EMNIST", "HAR", "NCP"}
  for task in ("IC-CIFAR10", "IC-EMNIST", "HAR"):
    assert round(paper[task]["baseline_network_float32_mb"], 2) == paper[task]["baseline_mb"], task
  # And against the models themselves, built here (the small ones; no TFF).
  import tensorflow as tf
  from fedmask_tff import models
  from fedmask_tff.masks.layers import mask_variables
  from fedmask_tff.masks.pruning import kept_count
  for label, name, shape, classes in (("har_mlp (HAR)", "har_mlp", (128, 9), 6),
                                      ("cnn (Fashion-MNIST)", "cnn", (28, 28, 1), 10)):
    model = models.masked_builder(name)(shape, classes, width=1.0, seed=0)
    kernels = mask_variables(model)[0]  # the frozen W of each masked layer, in order
    row = rows[label]
    assert row["parameters"] == sum(int(tf.size(w)) for w in kernels)  # no biases in these
    assert row["float32_mb"] == pytest.approx(4 * row["parameters"] / 1e6)
    assert row["mask_mb"] == pytest.approx(sum((int(tf.size(w)) + 7) // 8 for w in kernels) / 1e6)
    last2 = [int(tf.size(w)) for w in kernels[-2:]]  # pruned: the last two layers
    assert row["removed_parameters"] == sum(n - kept_count(n, 0.2) for n in last2)
    assert row["pruning_mask_mb_once"] == pytest.approx(sum((n + 7) // 8 for n in last2) / 1e6)
  vgg = rows["vgg16 (CIFAR-10)"]
  assert vgg["pruned_layers"].split(",") == ["conv9", "conv10", "conv11", "conv12", "conv13",
                                             "fc1", "fc2", "fc3"]
  assert vgg["pruned_mask_mb"] < vgg["mask_mb"] < vgg["pruned_float32_mb"] < vgg["float32_mb"]
  with open(os.path.join(out, "study.csv")) as f:
    assert len(list(csv.DictReader(f))) == len(rows)
  with open(os.path.join(out, "table.md")) as f:
    text = f.read()
  assert "| vgg16 (CIFAR-10) |" in text and "15,239,872" in text
  assert "| IC-CIFAR10 | 365.30 | 537.21 | 16.78 |" in text  # quoted from the paper
  # The paper's VGG-16 and HAR MLP, built: Table 5's Baseline sizes to the printed digit.
  assert rows["vgg16_paper (CIFAR-10)"]["parameters"] == 134_301_514
  assert rows["vgg16_paper (64 classes)"]["parameters"] == 134_522_752
  assert "| IC-CIFAR10 | vgg16_paper (CIFAR-10), 32×32×3 | 537.21 | 537.21 |" in text
  assert "| IC-EMNIST | vgg16_paper (64 classes), 32×32×3 | 538.09 | 538.09 |" in text
  assert "| HAR | har_mlp (HAR features), 561 | 4.41 | 4.41 |" in text


@pytest.fixture(scope="module")
def devices(tmp_path_factory):
  data = str(tmp_path_factory.mktemp("fm_studies"))
  write_learnable_fashion_dir(data)
  out = str(tmp_path_factory.mktemp("devices"))
  args = ["--study=devices", f"--data_dir={data}", f"--output_dir={out}", "--algorithms=fedmask",
          "--devices=2,3", "--num_clients=6", "--rounds=2", "--eval_every=1", "--model=mlp",
          "--model_width=0.25", "--batch_size=16", "--progress=false"]
  before = tff_workers()
  return _studies(args), out, args, before


def test_training_study_end_to_end(devices):
  proc, out, _, before = devices
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "run 1/2 fedmask_devices2" in proc.stderr and "run 2/2 fedmask_devices3" in proc.stderr
  assert not (orphan_workers() - before)  # no TFF worker outlives the command
  for name in ("table.md", "study.json", "study.csv", "figure.png", "partition.json"):
    assert os.path.exists(os.path.join(out, name)), name
  assert _is_png(os.path.join(out, "figure.png"))
  with open(os.path.join(out, "study.json")) as f:
    study = json.load(f)
  assert study["study"] == "devices" and [r["run"] for r in study["runs"]] == [
      "fedmask_devices2", "fedmask_devices3"]
  partition = os.path.join(out, "partition.json")
  for rec, devices_per_round in zip(study["runs"], (2, 3)):
    with open(os.path.join(out, rec["run"], "results.json")) as f:
      results = json.load(f)
    assert results["complete"] and results["config"]["partition_file"] == partition
    assert results["config"]["clients_per_round"] == devices_per_round == rec["clients_per_round"]
    assert rec["accuracy"] == results["final"]["accuracy"]
    # Per-round accuracy: round 1 from --eval_every, the last round from the final evaluation.
    assert [s["round"] for s in rec["series"]] == [1, 2]
    assert all(s["accuracy"] is not None for s in rec["series"])
    assert rec["series"][-1]["accuracy"] == results["final"]["accuracy"]
    bits = sum(r["uplink_bits_per_client"] + r["downlink_bits_per_client"] for r in results["rounds"])
    assert rec["cumulative_bits_per_client"] == pytest.approx(bits)
  with open(os.path.join(out, "study.csv")) as f:
    assert len(list(csv.DictReader(f))) == 4  # 2 runs x 2 rounds
  with open(os.path.join(out, "table.md")) as f:
    text = f.read()
  assert "| fedmask | 2 |" in text and "| fedmask | 3 |" in text


def test_rerun_skips_finished_runs(devices):
  proc0, out, args, _ = devices
  assert proc0.returncode == 0
  os.remove(os.path.join(out, "figure.png"))
  proc = _studies(args, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count("complete, skipped") == 2
  assert "starting" not in proc.stderr
  assert _is_png(os.path.join(out, "figure.png"))  # outputs written again from the results


def test_changed_settings_are_refused_not_mixed(devices):
  proc0, out, args, _ = devices
  assert proc0.returncode == 0
  proc = _studies([a if not a.startswith("--num_clients") else "--num_clients=7" for a in args],
                  timeout=120)
  assert proc.returncode == 2
  assert "error:" in proc.stderr and "--num_clients" in proc.stderr and "--overwrite" in proc.stderr


@pytest.mark.parametrize("flags,message", [
    (["--study=nonsense"], "--study must be one of"),
    ([], "--study must be one of"),
    (["--study=epochs", "--preset=huge"], "--preset must be one of"),
    (["--study=devices", "--devices=2,x"], "--devices"),
    (["--study=devices", "--clients_per_round=4"], "--devices"),
    (["--study=devices", "--num_clients=4", "--devices=5"], "--devices"),
])
def test_bad_study_or_preset_exits_2(tmp_path, flags, message):
  proc = _studies([f"--output_dir={tmp_path}/out", *flags], timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error:" in proc.stderr and message in proc.stderr
  assert not os.path.exists(f"{tmp_path}/out/partition.json")


def test_fedmask_ablation_plans_every_variant_on_one_partition(tmp_path):
  proc = _studies(["--study=fedmask_ablation", "--dry_run", f"--output_dir={tmp_path}/abl"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = proc.stdout
  assert "26 runs" in text
  # FedMask's own default p_r (unset), not the small preset's 0.2: a variant differs from the
  # default only in what it names
  assert '"prune_rate": null' in next(l for l in text.splitlines() if l.startswith("shared settings"))
  for name, wanted in (("local_masks", '"algorithm": "local_masks"'),
                       ("fedpm", '"algorithm": "fedpm"'),
                       ("sampled_threshold_forward", '"training_forward": "threshold"'),
                       ("sampled_allones_init", '"score_init_std": 0.0'),
                       ("sampled_sgd", '"optimizer": "sgd"'),
                       ("sampled_head_from_theta", '"head_start": "theta"'),
                       ("sampled_evidence_kept", '"evidence_decay": 0.5'),
                       ("sampled_all_from_theta_prune05", '"personal_layers": 0, "prune_rate": 0.5'),
                       ("sampled_prune02", '"prune_rate": 0.2'),
                       ("sampled_float_down", '"downlink_bits": 32'),
                       ("score_sign_previous_default", '"upload": "score_sign"'),
                       ("mask_scaled_logit", '"upload": "mask"'),
                       ("paper_algorithm1", '"global_mask": true, "prune_at_init": true'),
                       ("mask_disagree_shift_1bit_down", '"downlink_bits": 1'),
                       ("sampled_8bit_down", '"downlink_bits": 8'),
                       ("bernoulli_fedpm", '"upload": "bernoulli"'),
                       ("score_sign_shared_head", '"personal_head": false'),
                       ("fedmask_default", '"algorithm": "fedmask"')):
    line = next(l for l in text.splitlines() if l.strip().startswith(name + ":"))
    assert wanted in line, line
  refused = _studies(["--study=fedmask_ablation", "--dry_run", "--algorithms=fedmask",
                      f"--output_dir={tmp_path}/abl2"])
  assert refused.returncode != 0 and "--algorithms does not apply" in refused.stderr


def test_fedmask_ablation_runs_the_variants_asked_for_in_their_order(tmp_path):
  proc = _studies(["--study=fedmask_ablation", "--dry_run", "--variants=fedavg,sampled_prune05",
                   f"--output_dir={tmp_path}/abl"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 runs" in proc.stdout
  names = [l.strip().split(":")[0] for l in proc.stdout.splitlines()
           if l.strip().startswith(("fedavg:", "sampled_prune05:"))]
  assert names == ["fedavg", "sampled_prune05"], proc.stdout
  unknown = _studies(["--study=fedmask_ablation", "--dry_run", "--variants=fedavg,nonsense",
                      f"--output_dir={tmp_path}/abl2"])
  assert unknown.returncode == 2 and "--variants" in unknown.stderr and "nonsense" in unknown.stderr
  other = _studies(["--study=devices", "--dry_run", "--variants=fedavg", f"--output_dir={tmp_path}/d"])
  assert other.returncode == 2 and "does not apply" in other.stderr


def test_mask_capacity_trains_the_mask_and_the_dense_network(tmp_path):
  from helpers import write_learnable_fashion_dir
  data = tmp_path / "fmnist"
  write_learnable_fashion_dir(str(data), n_train=300, n_test=60)
  out = tmp_path / "cap"
  proc = _studies(["--study=mask_capacity", f"--data_dir={data}", f"--output_dir={out}",
                   "--model=mlp", "--model_width=0.25", "--num_clients=6", "--epochs=2"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "study.json") as f:
    study = json.load(f)
  nets = study["results"]
  assert set(nets) == {"masked (scores trained, W frozen)", "dense (weights trained)"}
  for r in nets.values():
    assert [e["epoch"] for e in r["epochs"]] == [1, 2]
    assert r["epochs"][-1]["accuracy"] > 0.3  # 10 classes: chance is 0.1; the data is learnable
  assert nets["masked (scores trained, W frozen)"]["learning_rate"] == 30.0
  assert _is_png(str(out / "figure.png")) and "epoch 2" in (out / "table.md").read_text()
