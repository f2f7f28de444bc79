"""One writer per run: an exclusive lock on a run's output directory.

``<output_dir>/.lock`` is locked with ``fcntl.flock`` for the run's lifetime. The kernel
releases such a lock when its holder exits in any way (an exception, Ctrl-C, ``kill -9``, a
crash), so a lock can never outlive its process. The file holds the holder's process id, host
and start time (UTC, ISO 8601): a second run on the same directory is refused at once naming
them, and a lock file left by a process that no longer runs (it could not remove the file) is
reported as stale and taken over.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Callable, Optional

LOCK_NAME = ".lock"


class RunLockError(RuntimeError):
  """The output directory is locked by another live run, or cannot hold a lock file."""


def _holder_words(text: str) -> str:
  try:
    holder = json.loads(text)
    return (f"process {holder['pid']} on {holder['host']}, started {holder['started']}")
  except (ValueError, KeyError, TypeError):
    return "a process that left no readable record"


class RunLock:
  """Holds ``<directory>/.lock`` exclusively until :meth:`release` (or the process ends).

  Args:
    directory: the run's output directory (created if missing).
    log: called with one line when a stale lock of a dead process is taken over.

  Raises:
    RunLockError: another live process holds the lock (the message names it).
    OSError: the directory cannot be created or written (read-only, full, no permission).
  """

  def __init__(self, directory: str, log: Optional[Callable[[str], None]] = None):
    os.makedirs(directory, exist_ok=True)
    self.path = os.path.join(directory, LOCK_NAME)
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      text = os.pread(self._fd, 4096, 0).decode(errors="replace")
      os.close(self._fd)
      self._fd = None
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise RunLockError(f"{directory} is in use by another run ({_holder_words(text)}): wait "
                           "for it to end, or choose another --output_dir") from None
      raise
    previous = os.pread(self._fd, 4096, 0).decode(errors="replace").strip()
    if previous and log is not None:
      log(f"[fedmask_tff] {self.path}: a stale lock of {_holder_words(previous)}, no longer "
          "running, was found and taken over")
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": datetime.datetime.now(datetime.timezone.utc)
                         .isoformat(timespec="seconds")}).encode()
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, record, 0)

  def release(self) -> None:
    """Empties the record and unlocks (idempotent). The empty file stays: removing it could let
    a run that opened it just before lock a file no longer on disk."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    except OSError:
      pass
    os.close(self._fd)  # closing the last descriptor releases the flock
    self._fd = None

  def __enter__(self) -> "RunLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()
