"""Do two runs give the same numbers? ``python -m experiments.diff_results DIR_A DIR_B``.

Compares every ``results.json`` under ``DIR_A`` with the one at the same relative path under
``DIR_B`` (a single run directory or a comparison's folder of runs): every number, string and
list must be equal, except what is expected to differ between two runs of the same settings:
times (keys ending in ``wall_s``, ``wall_s_invocations``), paths (``output_dir``, ``data_dir``,
``partition_file``, ``partition_file_written``), whether a worker was restarted, and the run's
identity (``run_id``, random; ``fingerprint``, which covers ``data_dir``). Prints each difference with its
path in the JSON; exit code 0 when the runs agree, 1 when they differ, 2 on bad input.

Used to show that a change of code keeps behaviour (e.g. the redesign of the round loop into short steps): run the same
commands with a fixed seed before and after, then diff the two folders.
"""

from __future__ import annotations

import json
import math
import os
import sys

IGNORED_KEYS = ("output_dir", "data_dir", "partition_file", "partition_file_written",
                "worker_restarted", "wall_s_invocations", "run_id", "fingerprint")


def _ignored(key: str) -> bool:
  return key in IGNORED_KEYS or key.endswith("wall_s")


def differences(a, b, path: str = "") -> list[str]:
  """Human-readable differences between two JSON values (empty when they agree)."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for key in sorted(set(a) | set(b)):
      if _ignored(key):
        continue
      if key not in a or key not in b:
        out.append(f"{path}/{key}: only in {'B' if key not in a else 'A'}")
        continue
      out.extend(differences(a[key], b[key], f"{path}/{key}"))
    return out
  if isinstance(a, list) and isinstance(b, list):
    if len(a) != len(b):
      return [f"{path}: {len(a)} vs {len(b)} entries"]
    return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return []
  return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} vs {b!r}"]


def result_files(root: str) -> list[str]:
  """Relative paths of the results.json files under ``root`` (sorted)."""
  found = []
  for directory, _, files in os.walk(root):
    if "results.json" in files:
      found.append(os.path.relpath(os.path.join(directory, "results.json"), root))
  return sorted(found)


def main(argv) -> int:
  if len(argv) != 3:
    print(__doc__.strip().splitlines()[0], file=sys.stderr)
    return 2
  root_a, root_b = argv[1], argv[2]
  files_a, files_b = result_files(root_a), result_files(root_b)
  if not files_a:
    print(f"error: no results.json under {root_a}", file=sys.stderr)
    return 2
  status = 0
  for rel in sorted(set(files_a) | set(files_b)):
    if rel not in files_a or rel not in files_b:
      print(f"{rel}: only under {root_a if rel in files_a else root_b}")
      status = 1
      continue
    with open(os.path.join(root_a, rel)) as fa, open(os.path.join(root_b, rel)) as fb:
      diffs = differences(json.load(fa), json.load(fb))
    print(f"{rel}: {'same' if not diffs else f'{len(diffs)} differences'}")
    for d in diffs[:20]:
      print(f"  {d}")
    status = status or (1 if diffs else 0)
  return status


if __name__ == "__main__":
  sys.exit(main(sys.argv))
