"""``python -m experiments.diff_results``: runs agree when only times and paths differ."""

import json
import os

from experiments import diff_results


def _write(root, name, results):
  os.makedirs(os.path.join(root, name), exist_ok=True)
  with open(os.path.join(root, name, "results.json"), "w") as f:
    json.dump(results, f)


RESULTS = {"config": {"seed": 3, "output_dir": "a", "run_id": "1f", "fingerprint": "ab"},
           "rounds": [{"round": 1, "wall_s": 2.5, "uplink_bits": 96}],
           "final": {"accuracy": 0.75}, "totals": {"wall_s": 9.0, "train_wall_s": 3.0},
           "wall_s_invocations": [9.0]}


def test_same_numbers_with_other_times_and_paths(tmp_path, capsys):
  _write(tmp_path / "a", "fedmask", RESULTS)
  other = json.loads(json.dumps(RESULTS))
  other["config"]["output_dir"], other["rounds"][0]["wall_s"], other["totals"]["wall_s"] = "b", 7.0, 1.0
  other["config"]["run_id"], other["config"]["fingerprint"] = "2e", "cd"  # random; covers data_dir
  other["wall_s_invocations"] = [0.5, 0.5]
  _write(tmp_path / "b", "fedmask", other)
  assert diff_results.main(["diff_results", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
  assert "fedmask/results.json: same" in capsys.readouterr().out


def test_a_changed_number_or_a_missing_run_is_reported(tmp_path, capsys):
  _write(tmp_path / "a", "fedmask", RESULTS)
  _write(tmp_path / "a", "fedavg", RESULTS)
  other = json.loads(json.dumps(RESULTS))
  other["rounds"][0]["uplink_bits"] = 97
  _write(tmp_path / "b", "fedmask", other)
  assert diff_results.main(["diff_results", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
  out = capsys.readouterr().out
  assert "/rounds[0]/uplink_bits: 96 vs 97" in out and "fedavg/results.json: only under" in out


def test_no_results_is_an_input_error(tmp_path):
  assert diff_results.main(["diff_results", str(tmp_path), str(tmp_path)]) == 2
