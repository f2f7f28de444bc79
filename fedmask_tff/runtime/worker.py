"""Start one TFF worker for ``--workers``: ``python -m fedmask_tff.runtime.worker --port=P``.

The worker is TFF's own C++ ``worker_binary`` (shipped in the pip package), the
same engine that runs every local simulation. A driver started with
``python -m experiments.run --workers=HOST:P,HOST2:P2 ...`` splits each round's
clients over the workers (TFF's mergeable execution context) and merges the
results; see ``docs/workers.md``.

**Reachable only where you say.** ``worker_binary`` always listens on every
interface and has no authentication. So by default this command puts it in a
private network namespace of its own (a Linux user + network namespace, no
privileges needed where the kernel allows unprivileged user namespaces), where
nothing can reach it, and relays to it from a socket bound to ``--address``
(default ``127.0.0.1``: this machine only). Give ``--address`` the private
interface other hosts use; anyone who can reach that address and port can run
computations on this machine, so keep it on a private network or behind an SSH
tunnel. ``--isolation=none`` runs ``worker_binary`` directly (every interface);
it requires ``--address=0.0.0.0`` to say you accept that.

Exit codes: 0 after SIGINT/SIGTERM, 2 for bad flags or a port in use or no way
to isolate the worker, 1 when the worker itself fails. Every process it starts
ends with it (``PR_SET_PDEATHSIG``), even when it is killed.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import time

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_ALL_INTERFACES = ("0.0.0.0", "::")


class WorkerError(RuntimeError):
  """A TFF worker given to ``--workers`` is unreachable or failed during a computation."""


class WorkerStartError(RuntimeError):
  """The worker could not be started as asked (port in use, no isolation, bad flags)."""


def parse_workers(spec: str) -> list[tuple[str, int]]:
  """``"host:port,host2:port2"`` (IPv6 as ``[::1]:port``) -> ``[(host, port), ...]``.

  Raises ``ValueError`` naming the first malformed entry or a repeated one.
  """
  workers = []
  for item in (spec or "").split(","):
    item = item.strip()
    host, sep, port = item.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    # ASCII digits only ("²".isdigit() is true); an IPv6 host must be bracketed, else
    # "::1:5" would silently mean host "::1".
    if (not sep or not host or not (port.isascii() and port.isdigit())
        or not 1 <= int(port) <= 65535 or "[" in host or "]" in host
        or (":" in host and not bracketed)):
      raise ValueError(f"--workers entry {item!r} is not HOST:PORT (port in 1..65535; IPv6 as "
                       "[ADDRESS]:PORT)")
    if (host, int(port)) in workers:
      raise ValueError(f"--workers lists {item} twice")
    workers.append((host, int(port)))
  return workers


def _worker_binary_path() -> str:
  import importlib.util
  spec = importlib.util.find_spec("tensorflow_federated")
  if spec is None or not spec.submodule_search_locations:
    raise WorkerStartError("tensorflow_federated is not installed in this Python")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "worker_binary")
  if not os.path.isfile(path):
    raise WorkerStartError(f"TFF's worker_binary is missing at {path}; reinstall tensorflow-federated")
  return path


def _libc():
  """libc, loaded in the parent: code run between fork and exec must not ``dlopen`` (another
  thread of a multi-threaded parent, e.g. TensorFlow's, may hold the loader's lock at the fork,
  and the child would then hang forever)."""
  global _LIBC
  if _LIBC is None:
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
  return _LIBC


_LIBC = None


def _enter_private_network(uid: int, gid: int):
  """Returns the function run in the relay's process between fork and exec: die with the
  parent, then enter a new network namespace (and a user namespace when not root)."""
  libc = _libc()

  def enter():
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    flags = _CLONE_NEWNET if uid == 0 else _CLONE_NEWNET | _CLONE_NEWUSER
    if libc.unshare(flags) != 0:
      e = ctypes.get_errno()
      raise OSError(e, f"unshare: {os.strerror(e)}")
    if uid != 0:  # Map ourselves to root of the new user namespace (CAP_NET_ADMIN there only).
      with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
      with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
      with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")
  return enter


def listen_socket(address: str, port: int) -> socket.socket:
  """A listening TCP socket on ``address:port`` (IPv4 or IPv6), or :class:`WorkerStartError`."""
  try:
    infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
  except socket.gaierror as e:
    raise WorkerStartError(f"--address {address!r} is not an address of this machine: {e}") from e
  family, _, _, _, sockaddr = infos[0]
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind(sockaddr)
  except OSError as e:
    sock.close()
    reason = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
    raise WorkerStartError(f"{address}:{port} {reason}") from e
  sock.listen(128)
  sock.set_inheritable(True)
  return sock


def start(port: int, address: str = "127.0.0.1", isolation: str = "netns",
          max_concurrent_computation_calls: int = -1, log_file: str | None = None,
          ready_timeout_s: float = 60.0) -> subprocess.Popen:
  """Starts the worker and returns once it accepts connections at ``address:port``.

  Returns the process to wait on (the relay, or ``worker_binary`` itself with
  ``isolation="none"``); stopping it with SIGTERM stops everything it started.
  """
  if not 1 <= port <= 65535:
    raise WorkerStartError(f"--port must be in [1, 65535], got {port}")
  if isolation not in ("netns", "none"):
    raise WorkerStartError(f"--isolation must be 'netns' or 'none', got {isolation!r}")
  binary = _worker_binary_path()
  out = open(log_file, "ab") if log_file else subprocess.DEVNULL
  try:
    if isolation == "none":
      if address not in _ALL_INTERFACES:
        raise WorkerStartError(
            "--isolation=none runs TFF's worker_binary directly, and it listens on every interface: "
            "pass --address=0.0.0.0 to accept that, or keep the default isolation")
      listen_socket(address, port).close()  # A clear error when the port is taken.
      _libc()
      proc = subprocess.Popen([binary, f"--port={port}",
                               f"--max_concurrent_computation_calls={max_concurrent_computation_calls}"],
                              stdin=subprocess.DEVNULL, stdout=out, stderr=out, close_fds=True,
                              preexec_fn=_enter_private_network_none)
      # worker_binary listens on [::] (dual stack) or, where IPv6 is off, on 0.0.0.0: either
      # way 127.0.0.1 reaches it (::1 would not in the second case, for "--address=::").
      _wait_port(proc, "127.0.0.1", port, ready_timeout_s)
      return proc
    sock = listen_socket(address, port)
    relay = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker_relay.py")
    args = [sys.executable, "-I", relay, f"--listen_fd={sock.fileno()}", f"--worker_binary={binary}",
            f"--max_concurrent_computation_calls={max_concurrent_computation_calls}"]
    if log_file:
      args.append(f"--log_file={log_file}")
    try:
      proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=out,
                              pass_fds=[sock.fileno()],
                              preexec_fn=_enter_private_network(os.getuid(), os.getgid()))
    except (OSError, subprocess.SubprocessError) as e:
      sock.close()
      raise WorkerStartError(
          f"could not put the worker in a private network namespace ({e}); this needs Linux with "
          "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1) or root. "
          "Otherwise run it with --isolation=none --address=0.0.0.0 on a host whose port is "
          "reachable only from your private network") from e
    sock.close()  # The relay holds its own copy.
    line = _read_ready(proc, ready_timeout_s)
    if line != "ready":
      proc.kill()
      proc.wait()
      proc.stdout.close()
      raise WorkerStartError(f"the worker did not start (relay said {line!r})"
                             + (f"; see {log_file}" if log_file else ""))
    return proc
  finally:
    if log_file:
      out.close()


def _enter_private_network_none():  # Between fork and exec: see _libc.
  _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _read_ready(proc: subprocess.Popen, timeout_s: float) -> str:
  import selectors
  with selectors.DefaultSelector() as sel:
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout_s):
      return f"nothing within {timeout_s:.0f} s"
  return proc.stdout.readline().decode(errors="replace").strip() or f"exit code {proc.wait()}"


def _wait_port(proc, host, port, timeout_s):
  deadline = time.monotonic() + timeout_s
  while True:
    if proc.poll() is not None:
      raise WorkerStartError(f"worker_binary exited with code {proc.returncode} at start-up")
    try:
      socket.create_connection((host, port), timeout=1).close()
      return
    except OSError:
      if time.monotonic() > deadline:
        proc.kill()
        raise WorkerStartError(f"worker_binary did not accept connections within {timeout_s:.0f} s")
      time.sleep(0.05)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fedmask_tff.runtime.worker",
                                   description="Start one TFF worker for --workers.")
  parser.add_argument("--port", type=int, required=True, help="TCP port to listen on.")
  parser.add_argument("--address", default="127.0.0.1",
                      help="Address to listen on (default 127.0.0.1: this machine only).")
  parser.add_argument("--isolation", default="netns", choices=("netns", "none"),
                      help="netns (default): worker reachable only through --address; none: run "
                      "worker_binary directly on every interface (needs --address=0.0.0.0).")
  parser.add_argument("--max_concurrent_computation_calls", type=int, default=-1,
                      help="Cap on client computations this worker runs at once (-1: none).")
  parser.add_argument("--log_file", default=None, help="Append the worker's own log here.")
  args = parser.parse_args(argv)
  try:
    proc = start(args.port, args.address, args.isolation, args.max_concurrent_computation_calls,
                 args.log_file)
  except WorkerStartError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"TFF worker listening on {args.address}:{args.port} (isolation={args.isolation}); "
        "stop it with Ctrl-C", flush=True)

  def stop(signum, frame):
    proc.terminate()

  signal.signal(signal.SIGTERM, stop)
  signal.signal(signal.SIGINT, stop)
  code = proc.wait()
  if code in (0, -signal.SIGTERM, -signal.SIGINT):
    return 0
  print(f"error: the worker stopped with code {code}"
        + (f"; see {args.log_file}" if args.log_file else ""), file=sys.stderr)
  return 1


if __name__ == "__main__":
  sys.exit(main())
