"""Inside a private network namespace: TFF's ``worker_binary`` plus a TCP relay to it.

Run by :mod:`fedmask_tff.runtime.worker` as a separate program (``python worker_relay.py``,
standard library only, so it starts fast and imports neither TensorFlow nor the
package), already inside a fresh network namespace whose only interface is its
own loopback. It

1. brings that loopback up;
2. starts ``worker_binary --port=INNER`` there (it binds ``[::]:INNER`` of the
   namespace, which nothing outside the namespace can reach);
3. accepts connections on the listening socket it inherited from its parent
   (``--listen_fd``), which was bound in the host's namespace to the address the
   user chose, and relays bytes both ways to ``127.0.0.1:INNER``.

So the worker is reachable only at the address the user asked for. It prints
``ready`` on stdout once the worker accepts connections, and exits when the
worker does (with its exit code) or on SIGTERM/SIGINT (stopping the worker).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import signal
import socket
import struct
import subprocess
import sys
import time

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_PR_SET_PDEATHSIG = 1
_CHUNK = 1 << 20


def loopback_up() -> None:
  """``ip link set lo up`` with one ioctl (needs CAP_NET_ADMIN in this namespace)."""
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    request = struct.pack("16sH14x", b"lo", 0)
    flags = struct.unpack("16sH14x", fcntl.ioctl(s, _SIOCGIFFLAGS, request))[1]
    fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def _die_with_parent():
  libc = ctypes.CDLL("libc.so.6", use_errno=True)
  libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
  try:
    while True:
      data = await reader.read(_CHUNK)
      if not data:
        break
      writer.write(data)
      await writer.drain()
  except (ConnectionError, OSError):
    pass
  finally:
    try:
      writer.close()
    except (ConnectionError, OSError):
      pass


async def _serve(listen_sock: socket.socket, inner_port: int, worker: subprocess.Popen) -> int:
  async def handle(client_reader, client_writer):
    try:
      worker_reader, worker_writer = await asyncio.open_connection("127.0.0.1", inner_port)
    except OSError:
      client_writer.close()
      return
    await asyncio.gather(_pump(client_reader, worker_writer), _pump(worker_reader, client_writer))

  server = await asyncio.start_server(handle, sock=listen_sock)
  stop = asyncio.Event()
  loop = asyncio.get_running_loop()
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, stop.set)
  async with server:
    while not stop.is_set() and worker.poll() is None:
      try:
        await asyncio.wait_for(stop.wait(), timeout=0.5)
      except asyncio.TimeoutError:
        pass
  return worker.poll()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--listen_fd", type=int, required=True)
  parser.add_argument("--worker_binary", required=True)
  parser.add_argument("--inner_port", type=int, default=10000)
  parser.add_argument("--max_concurrent_computation_calls", type=int, default=-1)
  parser.add_argument("--log_file", default=None)
  args = parser.parse_args(argv)

  loopback_up()
  out = open(args.log_file, "ab") if args.log_file else subprocess.DEVNULL
  worker = subprocess.Popen(
      [args.worker_binary, f"--port={args.inner_port}",
       f"--max_concurrent_computation_calls={args.max_concurrent_computation_calls}"],
      stdin=subprocess.DEVNULL, stdout=out, stderr=out, preexec_fn=_die_with_parent, close_fds=True)
  deadline = time.monotonic() + 60
  while True:
    if worker.poll() is not None:
      print(f"worker_binary exited with code {worker.returncode} at start-up", file=sys.stderr)
      return 1
    try:
      socket.create_connection(("127.0.0.1", args.inner_port), timeout=1).close()
      break
    except OSError:
      if time.monotonic() > deadline:
        worker.kill()
        print("worker_binary did not accept connections within 60 s", file=sys.stderr)
        return 1
      time.sleep(0.05)
  listen_sock = socket.socket(fileno=args.listen_fd)
  listen_sock.setblocking(False)
  print("ready", flush=True)
  try:
    code = asyncio.run(_serve(listen_sock, args.inner_port, worker))
  finally:
    if worker.poll() is None:
      worker.send_signal(signal.SIGINT)
      try:
        worker.wait(timeout=5)
      except subprocess.TimeoutExpired:
        worker.kill()
  if code is not None:  # The worker ended on its own: report it.
    print(f"worker_binary exited with code {code}", file=sys.stderr)
    return 1 if code == 0 else code
  return 0


if __name__ == "__main__":
  sys.exit(main())
