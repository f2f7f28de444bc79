"""Nothing lost, nothing silently wrong: a run's state files are bound to it.

One unfinished tiny run (killed with SIGKILL after a few rounds) and one finished run of
other settings are made once; each test copies the unfinished run, swaps, truncates,
deletes or forges one of its files, reruns the same command, and asserts the refusal (exit 2,
a message naming the file and what does not match) and that no finished round or file changed.
"""

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, run_cli, stderr_tail, learnable_fashion_dir

ROUNDS = 5


def _args(data_dir, out, *extra, rounds=ROUNDS):
  return [f"--data_dir={data_dir}", f"--output_dir={out}", "--model=mlp", "--model_width=0.25",
          "--num_clients=6", "--clients_per_round=3", f"--rounds={rounds}", "--local_epochs=1",
          "--batch_size=16", "--progress=false", *extra]


def _results(out):
  with open(os.path.join(out, "results.json")) as f:
    return json.load(f)


def _rows(out):
  try:
    return len(_results(out)["rounds"])
  except (OSError, ValueError, KeyError):
    return 0


def _meta(path):
  with np.load(path) as f:
    return json.loads(str(f["meta"]))


def _state_hashes(out):
  """SHA-256 of every file that holds finished work (the lock and the worker's log aside)."""
  names = ["results.json", "metrics.csv", "checkpoint.npz", "partition.json"]
  names += sorted(os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "client_states", "*.npz")))
  return {n: hashlib.sha256(open(os.path.join(out, n), "rb").read()).hexdigest()
          for n in names if os.path.exists(os.path.join(out, n))}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return learnable_fashion_dir(tmp_path_factory, "fmnist_state")


@pytest.fixture(scope="module")
def unfinished(data_dir, tmp_path_factory):
  """``(out, older_checkpoint)``: a run killed after >= 3 rounds, and a copy of one of its
  checkpoints of an earlier round."""
  out = str(tmp_path_factory.mktemp("unfinished") / "run")
  older = str(tmp_path_factory.mktemp("older") / "checkpoint.npz")
  child = subprocess.Popen([sys.executable, "-m", "experiments.run", *_args(data_dir, out)],
                           cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           stdin=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  while _rows(out) < 3 and time.monotonic() < deadline and child.poll() is None:
    if _rows(out) == 1 and not os.path.exists(older):
      shutil.copy(os.path.join(out, "checkpoint.npz"), older)
    time.sleep(0.02)
  assert child.poll() is None, "the run ended before it could be killed"
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert 3 <= _rows(out) < ROUNDS and os.path.exists(older)
  return out, older


@pytest.fixture(scope="module")
def other_run(data_dir, tmp_path_factory):
  """A finished 2-round run with another seed."""
  out = str(tmp_path_factory.mktemp("other") / "run")
  proc, _ = run_cli(_args(data_dir, out, "--seed=5", rounds=2))
  assert proc.returncode == 0, stderr_tail(proc.stderr)
  return out


def _copy(unfinished, tmp_path):
  out = str(tmp_path / "run")
  shutil.copytree(unfinished[0], out)
  return out


def _refused(data_dir, out, *needles):
  """Reruns the same command on ``out``: exit 2, every needle in the message, nothing of the
  finished work changed."""
  before = _state_hashes(out)
  proc, _ = run_cli(_args(data_dir, out), timeout=300)
  assert proc.returncode == 2, stderr_tail(proc.stderr)
  message = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(message) == 1 and "Traceback" not in proc.stderr, stderr_tail(proc.stderr)
  for needle in needles:
    assert needle in message[0], message[0]
  assert _state_hashes(out) == before
  return proc.stderr


def _client_file(out, cid):
  return os.path.join(out, "client_states", f"{cid}.npz")


def _settled_clients(out):
  """Clients whose files the checkpoint does not rewrite (not of its own round), oldest first."""
  meta = _meta(os.path.join(out, "checkpoint.npz"))
  return sorted((c for c in meta["last_written"] if c not in meta["round_clients"]),
                key=lambda c: meta["last_written"][c])


# --- checkpoints ------------------------------------------------------------------------------

def test_checkpoint_of_another_run_is_refused(data_dir, unfinished, other_run, tmp_path):
  out = _copy(unfinished, tmp_path)
  shutil.copy(os.path.join(other_run, "checkpoint.npz"), os.path.join(out, "checkpoint.npz"))
  _refused(data_dir, out, "checkpoint.npz", "belongs to another run")


def test_checkpoint_older_than_results_is_refused(data_dir, unfinished, tmp_path):
  out = _copy(unfinished, tmp_path)
  shutil.copy(unfinished[1], os.path.join(out, "checkpoint.npz"))
  _refused(data_dir, out, "checkpoint.npz", "results.json ends with round")


def test_checkpoint_later_than_results_is_refused(data_dir, unfinished, tmp_path):
  out = _copy(unfinished, tmp_path)
  results = _results(out)
  last = _meta(os.path.join(out, "checkpoint.npz"))["round"]
  results["rounds"] = [r for r in results["rounds"] if r["round"] <= last - 2]
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f)
  _refused(data_dir, out, f"is of round {last}", f"ends with round {last - 2}")


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_damaged_checkpoint_or_results_is_refused(data_dir, unfinished, tmp_path, damage):
  out = _copy(unfinished, tmp_path)
  ckpt = os.path.join(out, "checkpoint.npz")
  if damage == "truncated":
    with open(ckpt, "r+b") as f:
      f.truncate(os.path.getsize(ckpt) // 2)
    _refused(data_dir, out, "checkpoint.npz", "unreadable")
    with open(os.path.join(out, "results.json"), "r+b") as f:
      f.truncate(100)
    _refused(data_dir, out, "results.json", "unreadable")
  else:
    os.remove(ckpt)
    _refused(data_dir, out, "results.json", "no checkpoint")


def test_checkpoint_one_round_ahead_restores_the_row_and_totals_sum_invocations(
    data_dir, unfinished, tmp_path):
  """A stop between the checkpoint and results.json: the round's row comes from the
  checkpoint; the run also finds the stale lock of the killed process and says so."""
  out = _copy(unfinished, tmp_path)
  results = _results(out)
  last = _meta(os.path.join(out, "checkpoint.npz"))["round"]
  results["rounds"] = [r for r in results["rounds"] if r["round"] < last]
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f)
  proc, _ = run_cli(_args(data_dir, out), timeout=600)
  assert proc.returncode == 0, stderr_tail(proc.stderr)
  assert f"round {last}'s row restored from the checkpoint" in proc.stderr
  assert "stale lock" in proc.stderr and "taken over" in proc.stderr
  done = _results(out)
  assert done["complete"] and [r["round"] for r in done["rounds"]] == list(range(1, ROUNDS + 1))
  invocations = done["wall_s_invocations"]
  assert len(invocations) == 2 and all(w > 0 for w in invocations)
  assert done["totals"]["wall_s"] == pytest.approx(sum(invocations), rel=0.05)
  assert done["totals"]["wall_s"] >= done["totals"]["train_wall_s"]
  assert open(os.path.join(out, ".lock")).read() == ""  # released


# --- client state files --------------------------------------------------------------------

def test_client_file_of_another_client_is_refused(data_dir, unfinished, tmp_path):
  out = _copy(unfinished, tmp_path)
  a, b = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(out, "client_states", "*.npz")))[:2]
  shutil.copy(_client_file(out, a), _client_file(out, b))
  _refused(data_dir, out, f"{b}.npz", f"is the state of {a}, not of {b}")


def test_client_file_of_another_run_is_refused(data_dir, unfinished, other_run, tmp_path):
  out = _copy(unfinished, tmp_path)
  theirs = {os.path.basename(p) for p in glob.glob(os.path.join(other_run, "client_states", "*.npz"))}
  ours = {os.path.basename(p) for p in glob.glob(os.path.join(out, "client_states", "*.npz"))}
  name = sorted(theirs & ours)[0]
  shutil.copy(os.path.join(other_run, "client_states", name), os.path.join(out, "client_states", name))
  _refused(data_dir, out, name, "written by another run")


@pytest.mark.parametrize("damage", ["truncated", "flipped", "deleted"])
def test_damaged_client_file_is_refused_at_start(data_dir, unfinished, tmp_path, damage):
  """Refused when the run resumes, not when the client is next sampled."""
  out = _copy(unfinished, tmp_path)
  settled = _settled_clients(out)
  if not settled:
    pytest.skip("every client that took part was in the checkpoint's round")
  path = _client_file(out, settled[0])
  data = open(path, "rb").read()
  if damage == "deleted":
    os.remove(path)
    _refused(data_dir, out, f"{settled[0]}.npz", "is missing", "took part")
    return
  if damage == "truncated":
    data = data[:len(data) // 2]
  else:
    data = bytearray(data)
    data[len(data) // 3] ^= 0x01
  open(path, "wb").write(bytes(data))
  stderr = _refused(data_dir, out, f"{settled[0]}.npz")
  assert "unreadable" in stderr or "checksum" in stderr


def test_client_file_of_a_later_round_or_unknown_client_is_refused(data_dir, unfinished, tmp_path):
  from fedmask_tff.wire.client_state import digest
  out = _copy(unfinished, tmp_path)
  meta = _meta(os.path.join(out, "checkpoint.npz"))
  cid = sorted(meta["last_written"])[0]
  path = _client_file(out, cid)
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files}
  arrays.pop("sha256")
  arrays["written_after_round"] = np.asarray(meta["round"] + 3, np.int64)
  arrays["sha256"] = np.array(digest(arrays))
  np.savez(path, **arrays)  # intact, this client's, this run's: but of a later round
  _refused(data_dir, out, f"{cid}.npz", f"written after round {meta['round'] + 3}")
  unseen = sorted({f"client_{i:04d}" for i in range(6)} - set(meta["last_written"]))
  if unseen:
    out = _copy(unfinished, tmp_path / "b")
    shutil.copy(_client_file(out, cid), _client_file(out, unseen[0]))
    _refused(data_dir, out, f"{unseen[0]}.npz", "has no state")


# --- one writer per run -------------------------------------------------------------------

def test_a_second_run_on_a_locked_directory_is_refused_at_once(data_dir, unfinished, tmp_path):
  from fedmask_tff.simulation.run_lock import RunLock
  out = _copy(unfinished, tmp_path)
  with RunLock(out):
    t0 = time.monotonic()
    stderr = _refused(data_dir, out, "is in use by another run", f"process {os.getpid()}")
    assert time.monotonic() - t0 < 60
  assert "loading" not in stderr  # refused before any data is loaded
