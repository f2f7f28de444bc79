"""The pieces behind "nothing lost, nothing silently wrong", in-process and fast: the output
directory's lock, client files that say whose they are, artifact checksums, flag bounds and
the one-line failure messages. The command-line behaviour is in tests/e2e/test_run_state.py
and tests/e2e/test_failures.py."""

import errno
import json
import os
import signal

import numpy as np
import pytest

from fedmask_tff.simulation import limits
from fedmask_tff.simulation.run_config import ConfigError, RunConfig
from fedmask_tff.simulation.run_lock import RunLock, RunLockError
from fedmask_tff.wire.client_state import ClientStateError, ClientStateStore
from tflite import artifacts


# --- the lock -------------------------------------------------------------------------------

def test_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
  with RunLock(str(tmp_path)):
    with pytest.raises(RunLockError, match=f"in use by another run \\(process {os.getpid()} on"):
      RunLock(str(tmp_path))
  with RunLock(str(tmp_path)):  # released on exit
    pass
  assert open(tmp_path / ".lock").read() == ""


def test_stale_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path):
  (tmp_path / ".lock").write_text(json.dumps({"pid": 999999, "host": "h", "started": "then"}))
  lines = []
  lock = RunLock(str(tmp_path), log=lines.append)
  assert len(lines) == 1 and "stale lock of process 999999" in lines[0] and "taken over" in lines[0]
  assert json.loads(open(tmp_path / ".lock").read())["pid"] == os.getpid()
  lock.release()


# --- client files say whose they are -------------------------------------------------------

def _state(n=20, seed=0):
  rng = np.random.default_rng(seed)
  keep = (rng.random(n) < 0.5).astype(np.float32)
  scores = rng.standard_normal(n).astype(np.float32)
  return dict(scores=(scores,), keep=(keep,), personal=((scores > 0) * keep,), rounds=1)


def test_client_file_records_client_run_and_round_inside_the_checksum(tmp_path):
  store = ClientStateStore(str(tmp_path), [(20,)], lambda: None)
  store.owner, store.round_num = "run-a", 7
  store.put("c1", _state())
  store.put("c2", _state(seed=1))
  assert store.read_identity("c1") == {"client_id": "c1", "run_id": "run-a", "written_after_round": 7}
  os.replace(store.path("c2"), store.path("c1"))  # another client's file
  with pytest.raises(ClientStateError, match="c1.npz is the state of c2, not of c1"):
    store.get("c1")
  store.put("c1", _state())
  other = ClientStateStore(str(tmp_path), [(20,)], lambda: None)
  other.owner = "run-b"
  with pytest.raises(ClientStateError, match="written by another run \\(run id run-a; this run is run-b\\)"):
    other.get("c1")
  reader = ClientStateStore(str(tmp_path), [(20,)], lambda: None)  # owner None: a finished run's reader
  reader.get("c1")
  with np.load(store.path("c1")) as f:  # editing the identity breaks the checksum
    arrays = {k: f[k] for k in f.files}
  arrays["written_after_round"] = np.asarray(1, np.int64)
  np.savez(store.path("c1"), **arrays)
  with pytest.raises(ClientStateError, match="fails its checksum"):
    store.get("c1")


# --- exported artifacts ----------------------------------------------------------------------

def test_artifact_sidecar_refuses_flipped_truncated_swapped_and_unsealed_files(tmp_path):
  a, b = str(tmp_path / "folded_float32.tflite"), str(tmp_path / "compacted_int8.tflite")
  open(a, "wb").write(b"float model bytes" * 10)
  open(b, "wb").write(b"int8 model bytes" * 10)
  artifacts.seal(a, "folded_float32", [28, 28, 1], [10])
  artifacts.seal(b, "compacted_int8", [28, 28, 1], [10])
  record = artifacts.verify(a, "folded_float32")
  assert record["weights"] == "float32" and record["input"]["shape"] == [-1, 28, 28, 1]
  assert artifacts.verify(b)["weights"] == "int8"
  with pytest.raises(artifacts.ArtifactMismatch, match="recorded as variant 'folded_float32'"):
    artifacts.verify(a, "compacted_float32")
  original = open(a, "rb").read()
  for damaged in (original[:-1] + bytes([original[-1] ^ 1]), original[:40], open(b, "rb").read()):
    open(a, "wb").write(damaged)
    with pytest.raises(artifacts.ArtifactMismatch, match="folded_float32.tflite does not match its recorded SHA-256"):
      artifacts.verify(a, "folded_float32")
  open(a, "wb").write(original)
  os.replace(b + artifacts.SUFFIX, a + artifacts.SUFFIX)  # the int8 sidecar beside the float file
  with pytest.raises(artifacts.ArtifactMismatch, match="checksum file of 'compacted_int8.tflite'"):
    artifacts.verify(a, "folded_float32")
  os.remove(a + artifacts.SUFFIX)
  with pytest.raises(artifacts.ArtifactMismatch, match="has no checksum file"):
    artifacts.verify(a, "folded_float32")


@pytest.mark.parametrize("argv, message", [
    (["--runs=0"], "--runs must be >= 1"),
    (["--structured_fraction=5"], "--structured_fraction must be in [0, 1)"),
    (["--structured_fraction=-0.1"], "--structured_fraction"),
    (["--threads=0"], "--threads"),
    (["--warmup=-1"], "--warmup"),
    (["--calibration_examples=0"], "--calibration_examples"),
])
def test_tflite_evaluate_flags_are_checked_for_meaning(tmp_path, capsys, argv, message):
  from tflite import evaluate
  assert evaluate.main(["--run_dir", str(tmp_path / "nope"), *argv]) == 2
  assert message in capsys.readouterr().err


# --- flags that mean nothing, and failures as sentences ---------------------------------------

@pytest.mark.parametrize("setting, flag", [
    (dict(seed=-1), "--seed"), (dict(seed=2**32), "--seed"),
    (dict(rounds=10**20), "--rounds"), (dict(batch_size=10**11), "--batch_size"),
    (dict(worker_memory_limit_mb=1), "--worker_memory_limit_mb"),
    (dict(worker_memory_limit_mb=float("nan")), "--worker_memory_limit_mb"),
    (dict(model_width=1e9), "--model_width=1e+09: the data set's model would hold at least"),
    (dict(model="mlp", model_width=1e9), "the mlp model would hold at least"),
])
def test_meaningless_settings_are_refused(tmp_path, setting, flag):
  with pytest.raises(ConfigError, match=flag.replace("+", "\\+")):
    RunConfig(output_dir=str(tmp_path / "run"), **setting).validate()
  RunConfig(output_dir=str(tmp_path / "run"), seed=2**32 - 1, worker_memory_limit_mb=0).validate()


def test_model_size_table_is_a_lower_bound():
  from fedmask_tff import models
  shapes = {"mlp": ((28, 28, 1), 10), "cnn": ((28, 28, 1), 10), "har_mlp": ((561,), 6),
            "shakespeare_lstm": ((80,), 86)}  # vgg16 (45.7 M at width 1) is too big to build here
  for name, (shape, classes) in shapes.items():
    built = models.masked_builder(name)(shape, classes, width=1.0).count_params()
    assert built >= limits.MIN_PARAMETERS_AT_WIDTH_1[name] * 0.95, name
    wider = models.masked_builder(name)(shape, classes, width=2.0).count_params()
    assert wider >= 2 * limits.MIN_PARAMETERS_AT_WIDTH_1[name] * 0.95, name


def test_user_caused_failures_are_one_line_with_the_documented_exit_code():
  from fedmask_tff.simulation.failures import failure_message  # no flags: any test order
  from fedmask_tff.runtime.worker import WorkerError
  full = OSError(errno.ENOSPC, "No space left on device", "/x/checkpoint.npz.tmp")
  code, line = failure_message(full, "/x")
  assert code == 1 and "No space left on device (/x/checkpoint.npz.tmp)" in line
  assert "rerun the same command to resume" in line
  assert failure_message(OSError(errno.EROFS, "Read-only file system"), "/x")[0] == 1
  assert failure_message(KeyboardInterrupt(), "/x", signal.SIGTERM) == (
      143, "interrupted (SIGTERM): every finished round is saved in /x; rerun the same command to resume")
  assert failure_message(KeyboardInterrupt(), "/x")[0] == 130
  assert failure_message(ConfigError("bad"), "/x") == (2, "error: bad")
  assert failure_message(WorkerError("gone"), "/x")[0] == 3
  assert failure_message(type("ResourceExhaustedError", (Exception,), {})("oom"), "/x")[0] == 1
  assert failure_message(ValueError("a bug"), "/x") == (None, None)  # bugs keep their traceback


def test_a_run_stopped_before_its_first_round_starts_again(tmp_path):
  """Its interrupted message says "rerun the same command to resume": nothing finished, so
  the rerun starts it again instead of refusing it."""
  from fedmask_tff.simulation.run_config import resume_state
  out = tmp_path / "run"
  out.mkdir()
  config = RunConfig(output_dir=str(out))
  (out / "results.json").write_text(json.dumps({"complete": False, "rounds": [], "config": {}}))
  assert resume_state(config) == "restart"
  config.validate()
  (out / "results.json").write_text(json.dumps({"complete": False, "rounds": [{"round": 1}]}))
  assert resume_state(config) == "no_checkpoint"  # a finished round and no checkpoint: refused
  with pytest.raises(ConfigError, match="no checkpoint to resume from"):
    config.validate()
