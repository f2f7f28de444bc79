"""Every failure a user can cause ends with one sentence and the documented exit code, and
never costs finished work: absl's flag errors, out-of-range values, a model that cannot fit
memory (refused before data loads), paths with spaces and non-ASCII letters with every
``--client_states`` mode, a full or read-only disk (root only: a small tmpfs), scripts/demo.sh
beside a finished run, and exported models that are corrupt, swapped or beyond float tolerance.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, run_cli, stderr_tail, learnable_fashion_dir

TINY = ["--model=mlp", "--model_width=0.25", "--num_clients=6", "--clients_per_round=3",
        "--local_epochs=1", "--batch_size=16", "--progress=false"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return learnable_fashion_dir(tmp_path_factory, "fmnist_failures")


def _one_error_line(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.startswith(("error: ", "interrupted"))]
  assert len(lines) == 1 and "Traceback" not in stderr, stderr_tail(stderr)
  return lines[0]


def _digest(out: str) -> dict:
  return {name: hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest()
          for name in ("results.json", "checkpoint.npz", "metrics.csv") if os.path.exists(os.path.join(out, name))}


@pytest.mark.parametrize("flag, message", [
    ("--rounds=abc", "flag --rounds=abc"),  # absl's own parser error
    ("--nosuchflag", "Unknown command line flag 'nosuchflag'"),
    ("--seed=-1", "--seed must be in [0, 4294967295]"),
    ("--model_width=1e9", "the mlp model would hold at least"),
])
def test_flag_errors_exit_2_with_one_line_before_data_loads(data_dir, tmp_path, flag, message):
  proc, _ = run_cli([f"--data_dir={data_dir}", f"--output_dir={tmp_path / 'run'}", *TINY, flag],
                    timeout=120)
  assert proc.returncode == 2
  assert message in _one_error_line(proc.stderr)
  assert "loading" not in proc.stderr and not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("mode", ["files", "messages"])
def test_output_dir_with_spaces_and_non_ascii_letters(data_dir, tmp_path, mode):
  out = str(tmp_path / "my runs é ü 日本" / f"a [b] {mode}")
  proc, _ = run_cli([f"--data_dir={data_dir}", f"--output_dir={out}", *TINY, "--rounds=1",
                     f"--client_states={mode}"], timeout=600)
  assert proc.returncode == 0, stderr_tail(proc.stderr)
  with open(os.path.join(out, "results.json")) as f:
    assert json.load(f)["complete"]


def _mount_tmpfs(path: str, size: str) -> bool:
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0 or not shutil.which("mount"):
    return False
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                        capture_output=True).returncode == 0


def test_full_then_read_only_disk_keeps_finished_rounds_and_resumes(data_dir, tmp_path):
  mnt = str(tmp_path / "mnt")
  if not _mount_tmpfs(mnt, "1200k"):
    pytest.skip("needs root and tmpfs to make a small disk")
  try:
    out = os.path.join(mnt, "run")
    args = [f"--data_dir={data_dir}", f"--output_dir={out}", *TINY, "--rounds=3"]
    proc, _ = run_cli(args, timeout=600)
    assert proc.returncode == 1, stderr_tail(proc.stderr)
    line = _one_error_line(proc.stderr)
    assert "No space left on device" in line and "rerun the same command to resume" in line
    assert not [n for n in os.listdir(os.path.join(out, "client_states")) if n.endswith(".tmp")]
    before = _digest(out)
    subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
    proc, _ = run_cli(args, timeout=300)
    assert proc.returncode == 2 and "Read-only file system" in _one_error_line(proc.stderr)
    assert _digest(out) == before
    subprocess.run(["mount", "-o", "remount,rw,size=40m", mnt], check=True)
    proc, _ = run_cli(args, timeout=600)
    assert proc.returncode == 0, stderr_tail(proc.stderr)
    with open(os.path.join(out, "results.json")) as f:
      done = json.load(f)
    assert done["complete"] and [r["round"] for r in done["rounds"]] == [1, 2, 3]
  finally:
    subprocess.run(["umount", "-l", mnt], capture_output=True)


def test_demo_keeps_a_finished_run_and_says_how_to_replace_it(data_dir, tmp_path):
  script = open(os.path.join(ROOT, "scripts", "demo.sh")).read()
  assert "--overwrite" not in script.split("exec ", 1)[1]  # an unfinished runs/demo resumes
  out = str(tmp_path / "demo")
  proc, _ = run_cli([f"--data_dir={data_dir}", f"--output_dir={out}", *TINY, "--rounds=1"],
                    timeout=600)
  assert proc.returncode == 0, stderr_tail(proc.stderr)
  before = _digest(out)
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  proc = subprocess.run(["bash", "scripts/demo.sh", f"--data_dir={data_dir}", f"--output_dir={out}",
                         *TINY, "--rounds=2"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600, stdin=subprocess.DEVNULL)
  assert proc.returncode == 2
  line = _one_error_line(proc.stderr)
  assert "finished run with other settings (--rounds" in line and "pass --overwrite" in line
  assert _digest(out) == before


# --- exported models --------------------------------------------------------------------------

LITERT = os.path.join(ROOT, ".venv-litert", "bin", "python")


@pytest.fixture(scope="module")
def exported(data_dir, tmp_path_factory):
  if not os.path.exists(LITERT):
    pytest.skip("no .venv-litert (scripts/install.sh makes it)")
  out = str(tmp_path_factory.mktemp("exported") / "run")
  proc, _ = run_cli([f"--data_dir={data_dir}", f"--output_dir={out}", *TINY, "--rounds=1"],
                    timeout=600)
  assert proc.returncode == 0, stderr_tail(proc.stderr)
  proc = subprocess.run([sys.executable, "-m", "tflite.evaluate", f"--run_dir={out}", "--runs=2",
                         "--warmup=0", "--threads=1", "--skip_memory", "--max_test_examples=20",
                         "--calibration_examples=10"], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, stderr_tail(proc.stderr)
  return out


def _check_runtime(run_dir):
  return subprocess.run([LITERT, "-m", "tflite.check_runtime", f"--run_dir={run_dir}", "--runs=2",
                         "--warmup=0"], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _damage(client_dir, how):
  """Damages one artifact; returns the file the refusal must name."""
  if how == "int8_over_float32":
    shutil.copy(os.path.join(client_dir, "compacted_int8.tflite"),
                os.path.join(client_dir, "compacted_float32.tflite"))
    return "compacted_float32.tflite"
  if how == "flipped_byte":
    path = os.path.join(client_dir, "folded_float32.tflite")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    return "folded_float32.tflite"
  if how == "truncated_reference":
    path = os.path.join(client_dir, "reference.npz")
    open(path, "r+b").truncate(100)
    return "reference.npz"
  os.remove(os.path.join(client_dir, "packed_runtime.tflite.sha256.json"))  # "deleted_checksum"
  return "packed_runtime.tflite"


def test_check_runtime_passes_an_intact_export(exported):
  proc = _check_runtime(exported)
  assert proc.returncode == 0, stderr_tail(proc.stderr + proc.stdout)


@pytest.mark.parametrize("how", ["int8_over_float32", "flipped_byte", "truncated_reference",
                                 "deleted_checksum"])
def test_check_runtime_refuses_corrupt_or_swapped_artifacts(exported, tmp_path, how):
  run_dir = str(tmp_path / "run")
  shutil.copytree(exported, run_dir)
  client = next(d for d in sorted(os.listdir(os.path.join(run_dir, "tflite"))) if d.startswith("client_"))
  name = _damage(os.path.join(run_dir, "tflite", client), how)
  proc = _check_runtime(run_dir)
  assert proc.returncode == 2, stderr_tail(proc.stderr + proc.stdout)
  line = _one_error_line(proc.stderr)
  assert name in line and "yes" not in proc.stdout


def test_float_variant_beyond_float_tolerance_is_a_mismatch(exported, tmp_path):
  from tflite import artifacts
  run_dir = str(tmp_path / "run")
  shutil.copytree(exported, run_dir)
  client = next(d for d in sorted(os.listdir(os.path.join(run_dir, "tflite"))) if d.startswith("client_"))
  path = os.path.join(run_dir, "tflite", client, "reference.npz")
  with np.load(path) as f:
    ref = {k: f[k] for k in f.files}
  logits = ref["keras_logits"]
  top = logits.argmax(-1)
  logits[np.arange(len(top)), top] += 0.05 * max(1.0, float(np.abs(logits).max()))  # same class
  np.savez_compressed(path, **ref)
  artifacts.seal(path, "reference")
  proc = _check_runtime(run_dir)
  assert proc.returncode == 1, stderr_tail(proc.stderr + proc.stdout)
  assert "**NO**" in proc.stdout and "differ from Keras'" in proc.stderr
