"""TFF execution context whose worker process never outlives ours.

TFF's default local context starts ``worker_binary`` lazily, hands it our
stdout/stderr and does not stop it reliably: the worker can survive Python and
hold a pipe open (a CI step piped through ``tee`` then hangs). Here we start
the worker ourselves, from the main thread, with

* stdout/stderr sent to a log file (or ``/dev/null``), never to our pipes;
* ``PR_SET_PDEATHSIG = SIGKILL``, so the kernel kills it when we die, even by
  ``SIGKILL``;
* an ``atexit`` hook and SIGTERM handling that stop it on a normal exit.

Call :func:`install_local_context` once before running computations.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import time
from typing import Optional

import grpc
import portpicker
import tensorflow_federated as tff

_GRPC_OPTIONS = [
    ("grpc.max_message_length", 2_000_000_000),
    ("grpc.max_receive_message_length", 2_000_000_000),
    ("grpc.max_send_message_length", 2_000_000_000),
]
_PR_SET_PDEATHSIG = 1

_workers: list[subprocess.Popen] = []


def worker_binary_path() -> str:
  path = os.path.join(os.path.dirname(tff.__file__), "data", "worker_binary")
  if not os.path.isfile(path):
    raise RuntimeError(f"TFF's worker_binary is missing at {path}; reinstall tensorflow-federated.")
  return path


def _die_with_parent():  # Runs in the child between fork and exec.
  try:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
  except OSError:
    pass


def start_worker(port: Optional[int] = None, max_concurrent_computation_calls: int = -1,
                 log_path: Optional[str] = None, address: Optional[str] = None) -> tuple[subprocess.Popen, int]:
  """Starts one ``worker_binary`` tied to this process; returns ``(process, port)``."""
  port = port or portpicker.pick_unused_port()
  args = [worker_binary_path(), f"--port={port}",
          f"--max_concurrent_computation_calls={max_concurrent_computation_calls}"]
  out = open(log_path, "ab") if log_path else subprocess.DEVNULL
  try:
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                            preexec_fn=_die_with_parent, close_fds=True)
  finally:
    if log_path:
      out.close()
  _workers.append(proc)
  return proc, port


def stop_workers(timeout_s: float = 5.0) -> None:
  """Stops every worker this process started (SIGINT, then SIGKILL)."""
  while _workers:
    proc = _workers.pop()
    if proc.poll() is None:
      proc.send_signal(signal.SIGINT)
      try:
        proc.wait(timeout=timeout_s)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


atexit.register(stop_workers)


def _on_sigterm(signum, frame):
  stop_workers()
  # Re-raise as the default action would, so callers see a normal termination.
  signal.signal(signum, signal.SIG_DFL)
  os.kill(os.getpid(), signum)


_installed = False


def _compile(comp):
  """TFF's native compilation, after replacing secure-sum intrinsics by their simulation.

  The local C++ worker does not implement secure aggregation; TFF's own test
  compiler (``tff.backends.test``) lowers ``federated_secure_sum_bitwidth`` and
  friends to plain TensorFlow sums, which is what a simulation can do. The
  computation's structure (the server only receives sums) is unchanged.
  """
  from tensorflow_federated.python.core.backends.test import compiler as test_compiler
  comp = test_compiler.replace_secure_intrinsics_with_bodies(comp)
  return tff.backends.native.desugar_and_transform_to_native(comp)


def install_local_context(max_concurrent_computation_calls: int = -1,
                          log_path: Optional[str] = None, ready_timeout_s: float = 60.0) -> None:
  """Installs a TFF sync context on one local worker started by this process.

  ``max_concurrent_computation_calls`` caps how many client computations run
  in parallel (-1: no cap). Idempotent: a second call keeps the first context.
  """
  global _installed
  if _installed:
    return
  proc, port = start_worker(max_concurrent_computation_calls=max_concurrent_computation_calls,
                            log_path=log_path)
  channel = grpc.insecure_channel(f"localhost:{port}", _GRPC_OPTIONS)
  stub = tff.framework.RemoteExecutorGrpcStub(channel)
  deadline = time.monotonic() + ready_timeout_s
  while not stub.is_ready:
    if proc.poll() is not None:
      raise RuntimeError(f"TFF worker_binary exited with code {proc.returncode} at start-up"
                         + (f"; see {log_path}" if log_path else ""))
    if time.monotonic() > deadline:
      stop_workers()
      raise RuntimeError(f"TFF worker_binary did not become ready in {ready_timeout_s} s")
    time.sleep(0.05)

  def stack_fn(cardinalities):
    if proc.poll() is not None:
      raise RuntimeError(f"TFF worker_binary (pid {proc.pid}) died with code {proc.returncode}"
                         + (f"; see {log_path}" if log_path else ""))
    cardinalities = dict(cardinalities)
    cardinalities.setdefault(tff.CLIENTS, 0)
    executor = tff.framework.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor

  context = tff.framework.SyncExecutionContext(
      executor_fn=tff.framework.ResourceManagingExecutorFactory(stack_fn),
      compiler_fn=_compile,
      transform_args=tff.tensorflow.transform_args,
      transform_result=tff.tensorflow.transform_result)
  tff.framework.set_default_context(context)
  if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
    signal.signal(signal.SIGTERM, _on_sigterm)
  _installed = True
