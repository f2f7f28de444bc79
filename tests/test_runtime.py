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
