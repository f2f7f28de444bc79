"""Run outputs: ``results.json`` and ``metrics.csv`` in the run's output directory.

``results.json`` is rewritten atomically after every round (with
``"complete": false`` until the run ends), so a crash or a kill loses no
finished round. ``metrics.csv`` gets one row per round, flushed as it is written.
``results.json["wall_s_invocations"]`` holds the wall time (seconds) of every invocation of
the run, the current one up to its last save: a resumed run's ``totals.wall_s`` is their sum.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Any, Optional

from fedmask_tff.wire.client_state import write_file_atomic

ROUND_FIELDS = ("round", "train_loss", "uplink_bits", "downlink_bits", "uplink_bits_per_client",
                "downlink_bits_per_client", "train_flops", "train_flops_per_client", "clients",
                "examples", "pruned_clients", "mask_density", "rejected_uploads", "diverged_clients",
                "accuracy", "wall_s")


def _json_safe(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if hasattr(value, "item") and callable(value.item):  # numpy scalars
    return _json_safe(value.item())
  return value


def write_json_atomic(path: str, payload: Any) -> None:
  """Writes ``payload`` as JSON to ``path`` whole or not at all (a failed write leaves the old
  file and no temporary one)."""
  text = json.dumps(_json_safe(payload), indent=2, sort_keys=False, allow_nan=False) + "\n"
  write_file_atomic(f"{path}.tmp", path, text.encode())


class RunOutputs:
  """Writes one run's results; ``results`` is the dict that becomes results.json."""

  def __init__(self, output_dir: str, algorithm: str, dataset: str, config: dict,
               rounds: Optional[list] = None, started: Optional[float] = None,
               previous_wall_s: Optional[list] = None):
    """``rounds``: rows of finished rounds to start from (a resumed run); ``started``: when
    this invocation started (``time.perf_counter()``; default now); ``previous_wall_s``: the
    wall times (s) of the run's earlier invocations."""
    self.output_dir = output_dir
    self.started = time.perf_counter() if started is None else started
    self.previous_wall_s = [float(w) for w in previous_wall_s or []]
    os.makedirs(output_dir, exist_ok=True)
    self.results_path = os.path.join(output_dir, "results.json")
    self.csv_path = os.path.join(output_dir, "metrics.csv")
    self.results: dict[str, Any] = {
        "algorithm": algorithm, "dataset": dataset, "config": config,
        "complete": False, "rounds": list(rounds or []), "final": None, "totals": None}
    with open(self.csv_path, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(ROUND_FIELDS)
      for row in self.results["rounds"]:
        writer.writerow([row.get(k, "") for k in ROUND_FIELDS])
    self.save()

  def add_round(self, row: dict) -> None:
    self.results["rounds"].append(row)
    with open(self.csv_path, "a", newline="") as f:
      csv.writer(f).writerow([row.get(k, "") for k in ROUND_FIELDS])
    self.save()

  def wall_s_total(self) -> float:
    """Seconds of every invocation of the run so far, this one until now."""
    return sum(self.previous_wall_s) + time.perf_counter() - self.started

  def save(self) -> None:
    self.results["wall_s_invocations"] = self.previous_wall_s + [
        time.perf_counter() - self.started]
    write_json_atomic(self.results_path, self.results)
