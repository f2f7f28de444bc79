"""``python -m experiments.studies --study=paper_table``: HAR features written here, two rounds."""

import json
import os
import subprocess
import sys

import numpy as np

from helpers import ROOT


def _studies(args, timeout=400):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", "experiments.studies", "--study=paper_table", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                        stdin=subprocess.DEVNULL)


def _har_features(directory, subjects=(1, 2, 3, 4), rows=30):
  """Per-subject feature files whose label is readable from three features."""
  rng = np.random.default_rng(0)
  os.makedirs(directory)
  for s in subjects:
    y = np.arange(rows) % 6
    x = rng.uniform(-1, 1, (rows, 561)).astype(np.float32) * 0.1
    x[np.arange(rows), y] = 1.0
    np.savez(os.path.join(directory, f"subject_{s:02d}.npz"), x=x, y=y)


def test_dry_run_plans_every_task_with_both_standalone_budgets(tmp_path):
  proc = _studies(["--preset=paper", "--dry_run", f"--output_dir={tmp_path}/t"], timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  from fedmask_tff.algorithms import ALGORITHMS
  for task in ("har_features", "cifar10", "femnist_leaf", "shakespeare_leaf"):
    assert f"paper_table {task}: {len(ALGORITHMS) + 1} runs" in proc.stdout
  assert "standalone, fedavg" in proc.stdout and "standalone_equal_epochs" in proc.stdout
  assert '"model": "vgg16_paper", "model_width": 0.125' in proc.stdout


def test_small_preset_writes_the_table(tmp_path):
  data = str(tmp_path / "har_features")
  _har_features(data)
  out = str(tmp_path / "study")
  proc = _studies(["--preset=small", "--dataset=har_features", f"--data_dir={data}",
                   "--algorithms=fedmask,standalone", "--num_clients=4", f"--output_dir={out}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, "study.json")) as f:
    rows = {r["run"]: r for r in json.load(f)["rows"]}
  assert list(rows) == ["fedmask", "standalone", "standalone_equal_epochs"]
  assert rows["standalone"]["budget"] == "every_round"
  assert rows["standalone_equal_epochs"]["budget"] == "equal_epochs"
  assert rows["fedmask"]["paper_accuracy"] == 99.5 and rows["fedmask"]["rounds"] == 2
  with open(os.path.join(out, "har_features", "standalone", "results.json")) as f:
    final = json.load(f)["final"]
  assert final["standalone_budget"] == "every_round"
  with open(os.path.join(out, "table.md")) as f:
    text = f.read()
  assert "| FedMask | 99.5 |" in text and "Standalone (paper's budget)" in text
