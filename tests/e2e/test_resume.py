"""Stop and resume: a run killed with SIGKILL mid-round and rerun finishes exactly like an
uninterrupted one; a corrupt checkpoint or changed flags are refused."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, run_cli, stderr_tail, write_learnable_fashion_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("fmnist_resume")
  write_learnable_fashion_dir(str(d))
  return str(d)


def _args(data_dir, out, algorithm):
  return [f"--data_dir={data_dir}", f"--output_dir={out}", f"--algorithm={algorithm}", "--model=mlp",
          "--model_width=0.25", "--num_clients=6", "--clients_per_round=3", "--rounds=4",
          "--local_epochs=1", "--batch_size=16", "--progress=false"]


def _rounds_done(out):
  try:
    with open(os.path.join(out, "results.json")) as f:
      return len(json.load(f)["rounds"])
  except (OSError, ValueError, KeyError):
    return 0


def _comparable(results):
  rows = [{k: r[k] for k in ("round", "train_loss", "uplink_bits", "downlink_bits", "train_flops",
                             "sampled_clients")} for r in results["rounds"]]
  return rows, results["final"]["accuracy_per_client"], results["final"]["accuracy"]


@pytest.mark.parametrize("algorithm", ["fedmask", "fedavg"])
def test_sigkill_mid_round_then_resume_matches_uninterrupted(data_dir, tmp_path, algorithm):
  straight = str(tmp_path / "straight")
  proc, _ = run_cli(_args(data_dir, straight, algorithm))
  assert proc.returncode == 0, stderr_tail(proc.stderr)

  out = str(tmp_path / "killed")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  child = subprocess.Popen([sys.executable, "-m", "experiments.run", *_args(data_dir, out, algorithm)],
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           stdin=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  while _rounds_done(out) < 2 and time.monotonic() < deadline and child.poll() is None:
    time.sleep(0.05)
  assert child.poll() is None, "the run ended before it could be killed"
  child.send_signal(signal.SIGKILL)
  child.wait()
  done = _rounds_done(out)
  assert 2 <= done < 4
  proc, _ = run_cli(_args(data_dir, out, algorithm))  # the same command resumes
  assert proc.returncode == 0, stderr_tail(proc.stderr)
  assert "resuming" in proc.stderr
  with open(os.path.join(straight, "results.json")) as f:
    a = json.load(f)
  with open(os.path.join(out, "results.json")) as f:
    b = json.load(f)
  assert b["complete"] and len(b["rounds"]) == 4
  rows_a, acc_a, overall_a = _comparable(a)
  rows_b, acc_b, overall_b = _comparable(b)
  assert rows_a == rows_b
  assert acc_a == acc_b and overall_a == overall_b
  with open(os.path.join(out, "metrics.csv")) as f:
    assert len(f.read().strip().splitlines()) == 1 + 4


def test_changed_flags_and_corrupt_checkpoint_are_refused(data_dir, tmp_path):
  out = str(tmp_path / "run")
  args = _args(data_dir, out, "fedmask")
  args[args.index("--rounds=4")] = "--rounds=6"
  child = subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=ROOT,
                           env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  while _rounds_done(out) < 1 and time.monotonic() < deadline and child.poll() is None:
    time.sleep(0.05)
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert _rounds_done(out) >= 1
  other = [a if not a.startswith("--local_epochs") else "--local_epochs=3" for a in args]
  proc, _ = run_cli(other, timeout=120)
  assert proc.returncode == 2 and "--local_epochs" in proc.stderr and "--overwrite" in proc.stderr
  path = os.path.join(out, "checkpoint.npz")
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files}
  arrays["server_0"] = arrays["server_0"] + 1
  np.savez(path, **arrays)
  proc, _ = run_cli(args, timeout=300)
  assert proc.returncode == 2 and "checksum" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_stop_cleanly(data_dir, tmp_path, sig, code):
  from helpers import tff_workers
  out = str(tmp_path / "run")
  before = tff_workers()
  child = subprocess.Popen([sys.executable, "-m", "experiments.run", *_args(data_dir, out, "fedmask")],
                           cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                           text=True)
  deadline = time.monotonic() + 300
  while _rounds_done(out) < 1 and time.monotonic() < deadline and child.poll() is None:
    time.sleep(0.05)
  own = subprocess.run(["pgrep", "-P", str(child.pid), "-f", "worker_binary"], capture_output=True,
                       text=True).stdout.split()
  assert own, "the run's TFF worker was not found"
  child.send_signal(sig)
  _, err = child.communicate(timeout=120)
  assert child.returncode == code, err[-2000:]
  assert "Traceback" not in err and "Fatal Python error" not in err, err[-2000:]
  stop_lines = [line for line in err.splitlines() if line.startswith("interrupted")]
  assert len(stop_lines) == 1 and "rerun the same command to resume" in stop_lines[0]
  assert ("SIGTERM" if sig == signal.SIGTERM else "Ctrl-C") in stop_lines[0]
  time.sleep(0.5)
  assert not set(own) & tff_workers()  # the run's worker did not outlive it
  assert os.path.exists(os.path.join(out, "checkpoint.npz")) and _rounds_done(out) >= 1
