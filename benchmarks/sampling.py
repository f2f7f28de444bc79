"""One run of the runner while a thread samples something (the memory benchmarks' loop)."""

from __future__ import annotations

import threading
from typing import Callable


def run_sampled(config, sample: Callable[[], None], interval_s: float) -> dict:
  """``runner.run(config)`` while a daemon thread calls ``sample()`` every ``interval_s``
  seconds until the run ends; returns the run's results."""
  from fedmask_tff.simulation import runner
  stop = threading.Event()

  def loop():
    while not stop.is_set():
      sample()
      stop.wait(interval_s)

  thread = threading.Thread(target=loop, daemon=True)
  thread.start()
  try:
    return runner.run(config)
  finally:
    stop.set()
    thread.join()
