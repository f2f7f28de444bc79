"""What a CLI run prints and exits with when it fails for a reason its user can fix.

:func:`failure_message` maps an exception to ``(exit code, one line)``: 2 for bad settings or
data, 3 for a lost TFF worker, 1 for a full disk, a read-only file system, memory or diverged
training, 130/143 for Ctrl-C/SIGTERM (every finished round saved; rerunning resumes), and
``(None, None)`` for a bug (which keeps its traceback). Kept apart from ``experiments.run`` (which
defines absl flags on import) so that anything can import it.
"""

from __future__ import annotations

from fedmask_tff.runtime.worker import WorkerError
from fedmask_tff.simulation.run_config import ConfigError


def failure_message(e: BaseException, output_dir: str, stop_signal=None):
  """``(exit code, one line)`` for a failure a user can cause; ``(None, None)`` for a bug."""
  from fedmask_tff.data import DataError
  saved = f"every finished round is saved in {output_dir}"
  if isinstance(e, KeyboardInterrupt):
    name = "SIGTERM" if stop_signal == 15 else "Ctrl-C"
    return (143 if stop_signal == 15 else 130), (
        f"interrupted ({name}): {saved}; rerun the same command to resume")
  if isinstance(e, (ConfigError, DataError)):
    return 2, f"error: {e}"
  if isinstance(e, WorkerError):
    return 3, f"error: {e}; {saved}; restart the worker and rerun the same command to resume"
  if isinstance(e, FloatingPointError):  # Diverged training; results.json keeps the finished rounds.
    return 1, f"error: {e}"
  text = str(e)
  for why in ("No space left on device", "Disk quota exceeded", "Read-only file system",
              "Permission denied"):
    if why in text or (isinstance(e, OSError) and e.strerror == why):
      where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
      return 1, (f"error: cannot write the run's files: {why}{where}; {saved} (files are "
                 "replaced whole, never half-written): make room or fix the permissions and "
                 "rerun the same command to resume")
  if isinstance(e, MemoryError) or type(e).__name__ == "ResourceExhaustedError":
    return 1, (f"error: out of memory ({type(e).__name__}); {saved}: use a smaller "
               "--model_width, --batch_size or --clients_per_round")
  return None, None
