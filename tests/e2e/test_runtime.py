"""The TFF worker started by fedmask_tff.runtime never outlives its Python process."""

import os
import signal
import subprocess
import sys
import time

SCRIPT = r"""
import os, sys, numpy as np, tensorflow_federated as tff
from fedmask_tff import runtime
runtime.install_local_context()
@tff.tensorflow.computation(tff.TensorType(np.float32, [2]))
def double(x):
  return x * 2
print(double(np.ones(2, np.float32)).tolist(), runtime._workers[0].pid, flush=True)
if sys.argv[1] == "hang":
  import time; time.sleep(600)
"""


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
    return f.read().split()[2] != "Z"


def _start(mode):
  return subprocess.Popen([sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def _wait_dead(pid, timeout=10):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and _alive(pid):
    time.sleep(0.1)
  return not _alive(pid)


def test_worker_ends_with_a_normal_exit_and_pipe_closes():
  proc = _start("exit")
  out, _ = proc.communicate(timeout=120)  # would hang if the worker kept stdout open
  values, pid = out.strip().rsplit(" ", 1)
  assert values == "[2.0, 2.0]"
  assert proc.returncode == 0
  assert _wait_dead(int(pid))


def test_worker_dies_when_python_is_killed():
  proc = _start("hang")
  line = proc.stdout.readline()
  pid = int(line.strip().rsplit(" ", 1)[1])
  assert _alive(pid)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert _wait_dead(pid)


RUNS_SCRIPT = r"""
import json, sys
import psutil
from fedmask_tff.simulation import run_config, runner
from fedmask_tff import runtime
data_dir, out = sys.argv[1], sys.argv[2]
seen = []
for i in range(2):
  original = runtime.start_worker
  def spy(*args, **kwargs):
    proc, port = original(*args, **kwargs)
    seen.append(proc.pid)
    return proc, port
  runtime.start_worker = spy
  runner.run(run_config.RunConfig(data_dir=data_dir, output_dir=f"{out}/run{i}", model="mlp",
                              model_width=0.25, num_clients=4, clients_per_round=2, rounds=1,
                              local_epochs=1, progress=False))
  runtime.start_worker = original
  alive = [c.pid for c in psutil.Process().children(recursive=True) if c.is_running()
           and c.status() != psutil.STATUS_ZOMBIE]
  print(json.dumps({"seen": seen, "alive": alive, "installed": runtime.context_installed()}),
        flush=True)
"""


def test_runs_one_after_another_each_get_a_fresh_worker(tmp_path):
  """A run stops the worker it started (a study's runs would otherwise pile up in one worker)."""
  from helpers import ROOT, write_learnable_fashion_dir
  data = tmp_path / "data"
  write_learnable_fashion_dir(str(data))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, "-c", RUNS_SCRIPT, str(data), str(tmp_path / "out")],
                        capture_output=True, text=True, timeout=600, env=env,
                        cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json
  first, second = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert len(first["seen"]) == 1 and len(second["seen"]) == 2
  assert second["seen"][0] != second["seen"][1]  # a new worker for the second run
  for after in (first, second):
    assert after["alive"] == [] and after["installed"] is False


def test_worker_restarted_above_its_memory_limit_gives_identical_results(tmp_path, monkeypatch):
  """--worker_memory_limit_mb: a fresh worker after every round (limit 1 MB, below the least a
  user may give, allowed here by the test's environment) changes nothing."""
  monkeypatch.setenv("FEDMASK_TFF_MIN_WORKER_MEMORY_MB", "1")
  import json
  from helpers import run_cli, write_learnable_fashion_dir
  data = tmp_path / "data"
  write_learnable_fashion_dir(str(data))
  common = [f"--data_dir={data}", "--model=mlp", "--model_width=0.25", "--num_clients=6",
            "--clients_per_round=3", "--rounds=3", "--local_epochs=1", "--progress=false"]
  plain, _ = run_cli(common + [f"--output_dir={tmp_path / 'plain'}"])
  assert plain.returncode == 0, plain.stderr[-3000:]
  restarted, _ = run_cli(common + [f"--output_dir={tmp_path / 'restarted'}", "--worker_memory_limit_mb=1"])
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert restarted.stderr.count("restarting it") == 3
  a = json.load(open(tmp_path / "plain" / "results.json"))
  b = json.load(open(tmp_path / "restarted" / "results.json"))
  assert [r["worker_restarted"] for r in a["rounds"]] == [False] * 3
  assert [r["worker_restarted"] for r in b["rounds"]] == [True] * 3
  for key in ("train_loss", "uplink_bits", "downlink_bits", "train_flops", "sampled_clients"):
    assert [r[key] for r in a["rounds"]] == [r[key] for r in b["rounds"]], key
  assert a["final"]["accuracy_per_client"] == b["final"]["accuracy_per_client"]
