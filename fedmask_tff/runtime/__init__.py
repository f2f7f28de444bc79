"""TFF execution context whose worker process never outlives ours.

TFF's default local context starts ``worker_binary`` lazily, hands it our
stdout/stderr and does not stop it reliably: the worker can survive Python and
hold a pipe open (a CI step piped through ``tee`` then hangs). Here we start
the worker ourselves, from the main thread, with

* stdout/stderr sent to a log file (or ``/dev/null``), never to our pipes;
* ``PR_SET_PDEATHSIG = SIGKILL``, so the kernel kills it when we die, even by
  ``SIGKILL``;
* an ``atexit`` hook and SIGTERM handling that stop it on a normal exit.

Call :func:`install_local_context` once before running computations, or
:func:`install_remote_context` to run them on TFF workers started elsewhere
(``python -m fedmask_tff.runtime.worker``), each round split over the workers by TFF's
mergeable execution context.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import subprocess
import time
from typing import Optional

import grpc
import portpicker
import tensorflow_federated as tff

from fedmask_tff.runtime.worker import WorkerError, parse_workers  # noqa: F401  (re-exported)

# The largest message between the driver and a worker (bytes): protobuf cannot go beyond 2 GiB,
# and TFF sends all clients' values of a call in one request (and their results in one response).
MAX_MESSAGE_BYTES = 2_000_000_000
_GRPC_OPTIONS = [
    ("grpc.max_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
_PR_SET_PDEATHSIG = 1

_workers: list[subprocess.Popen] = []
# The gRPC channels of the installed context. Each has a connectivity subscription (TFF's
# RemoteExecutorGrpcStub), i.e. a gRPC polling thread that never ends while the channel is open;
# left open, it is still inside gRPC's C core when the interpreter finalizes and the C++ static
# destructors run at exit (SIGSEGV at exit, seen under CPU load). Closed before the worker stops.
_channels: list = []


def worker_binary_path() -> str:
  path = os.path.join(os.path.dirname(tff.__file__), "data", "worker_binary")
  if not os.path.isfile(path):
    raise RuntimeError(f"TFF's worker_binary is missing at {path}; reinstall tensorflow-federated.")
  return path


def _load_libc():
  try:
    return ctypes.CDLL("libc.so.6", use_errno=True)
  except OSError:
    return None


# Loaded here, not in the child: code between fork and exec must not dlopen (a thread of this
# multi-threaded process may hold the loader's lock at the fork, and the child would hang).
_LIBC = _load_libc()


# util-linux's setpriv starts the worker with PDEATHSIG set. A Python preexec_fn (the fallback)
# runs in the child between fork and exec, which can deadlock when the parent has other threads
# (TFF's gRPC threads hold locks mid-run): seen when a worker was restarted after a round.
_SETPRIV = shutil.which("setpriv")


def _die_with_parent():  # Runs in the child between fork and exec.
  if _LIBC is not None:
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# The worker's allocator. Under glibc's malloc the worker keeps memory it has freed (measured,
# HAR har_mlp, 10 clients a round, values disposed at once: 1.47 GB after round 1, 2.3 GB after
# round 12); under jemalloc it stays flat (1.25-1.38 GB). jemalloc is used when installed
# (Debian: libjemalloc2; scripts/install.sh adds it when run as root); otherwise fewer glibc
# arenas. FEDMASK_WORKER_MALLOC=glibc keeps glibc's defaults, =/path/to/libjemalloc.so picks one.
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
                  "/usr/local/lib/libjemalloc.so.2")


def worker_allocator_env() -> dict:
  """Environment entries that choose the TFF worker's memory allocator (see above)."""
  choice = os.environ.get("FEDMASK_WORKER_MALLOC", "auto")
  if choice == "glibc":
    return {}
  for path in (JEMALLOC_PATHS if choice == "auto" else (choice,)):
    if os.path.isfile(path):
      # background_thread: freed pages go back to the system without waiting for an allocation.
      return {"LD_PRELOAD": path, "MALLOC_CONF": os.environ.get(
          "FEDMASK_WORKER_MALLOC_CONF",
          "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0")}
  return {"MALLOC_ARENA_MAX": "2"}


def start_worker(port: Optional[int] = None, max_concurrent_computation_calls: int = -1,
                 log_path: Optional[str] = None, address: Optional[str] = None) -> tuple[subprocess.Popen, int]:
  """Starts one ``worker_binary`` tied to this process; returns ``(process, port)``."""
  port = port or portpicker.pick_unused_port()
  args = [worker_binary_path(), f"--port={port}",
          f"--max_concurrent_computation_calls={max_concurrent_computation_calls}"]
  preexec = _die_with_parent
  if _SETPRIV:  # PDEATHSIG set by setpriv, then exec: no Python code between fork and exec
    args, preexec = [_SETPRIV, "--pdeathsig", "KILL", "--", *args], None
  out = open(log_path, "ab") if log_path else subprocess.DEVNULL
  env = dict(os.environ)
  env.update(worker_allocator_env())
  if log_path:  # The log file keeps the worker's warnings and errors, however quiet the console.
    env["TF_CPP_MIN_LOG_LEVEL"] = "0" if env.get("TF_CPP_MIN_LOG_LEVEL", "0") == "0" else "1"
  try:
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                            preexec_fn=preexec, close_fds=True, env=env)
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


def close_channels() -> None:
  """Closes the gRPC channels of the installed context (ends gRPC's polling thread)."""
  while _channels:
    channel = _channels.pop()
    try:
      channel.close()
    except Exception:  # pylint: disable=broad-except  (best effort, also at exit)
      pass


def _shutdown() -> None:
  close_channels()
  stop_workers()


atexit.register(_shutdown)


def _on_sigterm(signum, frame):
  stop_workers()
  # Re-raise as the default action would, so callers see a normal termination.
  signal.signal(signum, signal.SIG_DFL)
  os.kill(os.getpid(), signum)


_installed = False


def _executor_factory(stub, check_alive=None):
  """TFF's executor factory for one worker reached through ``stub``: a ``RemoteExecutor``
  per call, with the call's cardinalities (no CLIENTS value: 0 clients). ``check_alive``,
  when given, runs first and raises if the worker is gone."""
  def stack_fn(cardinalities):
    if check_alive is not None:
      check_alive()
    cardinalities = dict(cardinalities)
    cardinalities.setdefault(tff.CLIENTS, 0)
    # dispose_batch_size=1: TFF's default (20) tells the worker to drop values only after 20 are
    # released, so it kept the arguments and results of the last ~3 rounds, every client's state
    # twice (measured, HAR, 20 clients a round: 2.9 GB after round 1, 8.6 GB after round 6;
    # disposed at once, with jemalloc: flat at 1.9 GB over 15 rounds).
    executor = tff.framework.RemoteExecutor(stub, dispose_batch_size=1)
    executor.set_cardinalities(cardinalities)
    return executor
  return tff.framework.ResourceManagingExecutorFactory(stack_fn)


def async_remote_context(stub):
  """An asynchronous TFF context running computations on the worker behind ``stub``."""
  from tensorflow_federated.python.core.impl.execution_contexts import async_execution_context
  return async_execution_context.AsyncExecutionContext(
      executor_fn=_executor_factory(stub), compiler_fn=_compile,
      transform_args=tff.tensorflow.transform_args,
      transform_result=tff.tensorflow.transform_result)


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


def local_worker_pids() -> list[int]:
  """Process ids of the TFF workers this process started (empty when there is none)."""
  return [proc.pid for proc in _workers]


def process_rss_mb(pid: int) -> float:
  """Resident memory (MB of 2^20 bytes, /proc's VmRSS) of process ``pid``; 0 when it is gone."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024.0
  except (OSError, ValueError):
    pass
  return 0.0


def local_worker_rss_mb() -> float:
  """Resident memory (MB) of this process's local TFF worker; 0 when there is none."""
  return sum(process_rss_mb(proc.pid) for proc in _workers)


def restart_local_worker() -> None:
  """Replaces this process's local worker by a fresh one (same settings); the TFF
  computations need nothing else, since every value lives in the driver between calls."""
  settings = dict(_local_settings)
  reset_local_context()
  install_local_context(**settings)


_local_settings: dict = {}


def context_installed() -> bool:
  """Whether :func:`install_local_context` or :func:`install_remote_context` has run (and not
  been undone by :func:`reset_local_context`)."""
  return _installed


def reset_local_context() -> None:
  """Stops this process's local worker (if any) and forgets the installed context, so the next
  :func:`install_local_context` starts a fresh worker with none of the old one's memory."""
  global _installed
  close_channels()
  stop_workers()
  _installed = False


def install_local_context(max_concurrent_computation_calls: int = -1,
                          log_path: Optional[str] = None, ready_timeout_s: float = 60.0) -> None:
  """Installs a TFF sync context on one local worker started by this process.

  ``max_concurrent_computation_calls`` caps how many client computations run
  in parallel (-1: no cap). Idempotent: a second call keeps the first context.
  """
  global _installed
  if _installed:
    return
  _local_settings.update(max_concurrent_computation_calls=max_concurrent_computation_calls,
                         log_path=log_path, ready_timeout_s=ready_timeout_s)
  proc, port = start_worker(max_concurrent_computation_calls=max_concurrent_computation_calls,
                            log_path=log_path)
  channel = grpc.insecure_channel(f"localhost:{port}", _GRPC_OPTIONS)
  _channels.append(channel)
  stub = tff.framework.RemoteExecutorGrpcStub(channel)
  deadline = time.monotonic() + ready_timeout_s
  while not stub.is_ready:
    if proc.poll() is not None:
      raise RuntimeError(f"TFF worker_binary exited with code {proc.returncode} at start-up"
                         + (f"; see {log_path}" if log_path else ""))
    if time.monotonic() > deadline:
      close_channels()
      stop_workers()
      raise RuntimeError(f"TFF worker_binary did not become ready in {ready_timeout_s} s")
    time.sleep(0.05)

  def check_alive():
    if proc.poll() is not None:
      raise RuntimeError(f"TFF worker_binary (pid {proc.pid}) died with code {proc.returncode}"
                         + (f"; see {log_path}" if log_path else ""))

  context = tff.framework.SyncExecutionContext(
      executor_fn=_executor_factory(stub, check_alive),
      compiler_fn=_compile,
      transform_args=tff.tensorflow.transform_args,
      transform_result=tff.tensorflow.transform_result)
  tff.framework.set_default_context(context)
  if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
    signal.signal(signal.SIGTERM, _on_sigterm)
  _installed = True


def _fail_fast_stub(stub, address: str):
  """Wraps a ``RemoteExecutorGrpcStub`` so that a gRPC failure raises :class:`WorkerError`.

  TFF retries "retryable" gRPC errors (UNAVAILABLE, ...) forever, which turns a dead
  worker into a hung run. Values created on a worker are lost with it, so a retry
  cannot succeed anyway: fail the round with a clear error instead (finished rounds
  are checkpointed; rerunning resumes).
  """
  from tensorflow_federated.python.core.impl.executors import executors_errors

  class FailFast:
    def __getattr__(self, name):
      attr = getattr(stub, name)
      if not callable(attr):
        return attr

      def call(*args, **kwargs):
        try:
          return attr(*args, **kwargs)
        except (executors_errors.RetryableError, grpc.RpcError) as e:
          cause = e.__cause__ or e.__context__ or e
          detail = f"{cause.code().name}: {cause.details()}" if isinstance(cause, grpc.Call) else str(e)
          raise WorkerError(f"TFF worker {address} failed during a computation ({detail})") from e
      return call

  return FailFast()


def _ordered_mergeable_context_class():
  """TFF's ``MergeableCompExecutionContext`` with results kept in client order.

  TFF 0.87's context collects the subrounds' results in the order the workers
  *finish* (``asyncio.wait(FIRST_COMPLETED)``) and concatenates CLIENTS-placed
  results in that order, so when a later worker finishes first, per-client
  outputs come back permuted (we measured it: client 0 got client 2's metrics),
  and partial aggregates are merged in a varying order. This subclass keeps TFF's
  compiler, argument splitting and remote executors, and only orders the work:
  ``up_to_merge`` on every subround in parallel, ``merge`` of the partial results
  in subround order (deterministic), then ``after_merge`` per subround in
  parallel, concatenated in subround order.
  """
  import asyncio

  from tensorflow_federated.python.common_libs import structure
  from tensorflow_federated.python.core.impl.execution_contexts import (
      mergeable_comp_execution_context as mc)
  from tensorflow_federated.python.core.impl.types import (computation_types, placements,
                                                            type_analysis, type_conversions)

  def only_all_equal(type_spec):
    return (not isinstance(type_spec, computation_types.FederatedType)) or type_spec.all_equal

  async def run(comp, args, contexts):
    partials = await asyncio.gather(*[ctx.invoke(comp.up_to_merge, a)
                                      for a, ctx in zip(args, contexts)])
    merged = partials[0]
    for partial in partials[1:]:
      merged = await contexts[0].invoke(comp.merge, structure.Struct.unnamed(merged, partial))

    def after_arg(a):
      return merged if a is None else structure.Struct.unnamed(a, merged)

    result_type = comp.after_merge.type_signature.result
    if type_analysis.contains_only(result_type, only_all_equal):
      return await contexts[0].invoke(comp.after_merge, after_arg(args[0]))
    results = await asyncio.gather(*[ctx.invoke(comp.after_merge, after_arg(a))
                                     for a, ctx in zip(args, contexts)])
    return mc._repackage_partitioned_values(list(results), result_type)  # pylint: disable=protected-access

  class OrderedMergeableContext(mc.MergeableCompExecutionContext):
    __doc__ = _ordered_mergeable_context_class.__doc__

    def invoke(self, comp, arg=None):
      contexts = self._async_execution_contexts
      if not isinstance(comp, mc.MergeableCompForm) and not any(
          isinstance(t, computation_types.FederatedType) and t.placement is placements.CLIENTS
          and not t.all_equal for t in _leaf_types(comp.type_signature.parameter)):
        # No per-client argument (initialize, reading weights out of a state): one worker
        # runs the computation as it is.
        return self._async_runner.run_coro_and_return_result(contexts[0].invoke(comp, arg))
      result_type = comp.type_signature.result
      if not isinstance(comp, mc.MergeableCompForm):
        comp = self._compiler_pipeline.compile(comp)
      args = mc.MergeableCompExecutionContextValue(
          arg, comp.up_to_merge.type_signature.parameter, len(contexts)).value()
      result = self._async_runner.run_coro_and_return_result(run(comp, args, contexts))
      # The compiled parts return plain containers: rebuild the computation's own
      # (e.g. `LearnedProcessOutput`, `LearningAlgorithmState`).
      result = type_conversions.type_to_py_container(_as_struct(result, result_type), result_type)
      return self._transform_result(result) if self._transform_result is not None else result

  def _as_struct(value, type_spec):
    """Python containers -> ``structure.Struct`` following ``type_spec`` (CLIENTS values stay lists)."""
    if isinstance(type_spec, computation_types.FederatedType):
      if type_spec.placement is placements.CLIENTS and not type_spec.all_equal:
        return [_as_struct(v, type_spec.member) for v in value]
      return _as_struct(value, type_spec.member)
    if isinstance(type_spec, computation_types.StructType):
      values = [v for _, v in structure.iter_elements(structure.from_container(value))]
      return structure.Struct([(name, _as_struct(v, t)) for (name, t), v in
                               zip(structure.iter_elements(type_spec), values)])
    return value

  return OrderedMergeableContext


def _leaf_types(type_spec):
  from tensorflow_federated.python.core.impl.types import computation_types
  if isinstance(type_spec, computation_types.StructType):
    for t in type_spec:
      yield from _leaf_types(t)
  elif type_spec is not None:
    yield type_spec


def install_remote_context(workers: str | list, ready_timeout_s: float = 30.0) -> list[str]:
  """Runs every TFF computation of this process on the given workers.

  ``workers`` is ``"host:port,..."`` or a list of ``(host, port)``. Each worker is
  wrapped in its own asynchronous TFF context (the same remote executor the local
  context uses), and TFF's ``MergeableCompExecutionContext`` splits the CLIENTS-placed
  arguments of each call over them, runs the part before the aggregation on each,
  merges the partial aggregates, and runs the rest. A computation must therefore have
  at most one aggregation (see ``fedmask_tff.algorithms.base``). Returns the addresses.

  Raises :class:`WorkerError` when a worker does not answer within ``ready_timeout_s``.
  """
  global _installed
  from tensorflow_federated.python.core.backends.native import mergeable_comp_compiler
  from tensorflow_federated.python.core.backends.test import compiler as test_compiler

  pairs = parse_workers(workers) if isinstance(workers, str) else list(workers)
  addresses = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in pairs]
  OrderedMergeableContext = _ordered_mergeable_context_class()
  contexts = []
  for address in addresses:
    channel = grpc.insecure_channel(address, _GRPC_OPTIONS)
    _channels.append(channel)
    try:
      grpc.channel_ready_future(channel).result(timeout=ready_timeout_s)
    except grpc.FutureTimeoutError:
      channel.close()
      raise WorkerError(f"no TFF worker answers at {address} within {ready_timeout_s:.0f} s; start "
                        f"one there with `python -m fedmask_tff.runtime.worker --port={address.rsplit(':', 1)[1]}`")
    contexts.append(async_remote_context(
        _fail_fast_stub(tff.framework.RemoteExecutorGrpcStub(channel), address)))

  def to_mergeable_form(comp):
    comp = test_compiler.replace_secure_intrinsics_with_bodies(comp)
    return mergeable_comp_compiler.compile_to_mergeable_comp_form(comp)

  context = OrderedMergeableContext(
      contexts, compiler_fn=to_mergeable_form,
      transform_args=tff.tensorflow.transform_args,
      transform_result=tff.tensorflow.transform_result)
  tff.framework.set_default_context(context)
  _installed = True
  return addresses
