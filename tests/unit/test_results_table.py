"""experiments.results_table: the README's results table made from run folders (small fake ones,
shaped like experiments.compare's and experiments.run's outputs) and recorded rows."""

import json
import os

from experiments import results_table as rt


def _results(algorithm, per_client, up, down, params=1000, complete=True, **config):
  cfg = {"algorithm": algorithm, "dataset": config.pop("dataset", "fashion_mnist"),
         "rounds": 3, "num_clients": 6, "clients_per_round": 3, "local_epochs": 1,
         "model": "mlp", "model_width": 0.25, "learning_rate": None, "output_dir": "x",
         "partition_file": "x/partition.json", "progress": False, "model_parameters": params,
         "learning_rate_used": 30.0, "data": {"num_clients": 6}, **config}
  return {"algorithm": algorithm, "dataset": cfg["dataset"], "config": cfg, "complete": complete,
          "rounds": [{"round": 1}],
          "final": {"accuracy": sum(per_client.values()) / len(per_client),
                    "accuracy_client_mean": sum(per_client.values()) / len(per_client),
                    "accuracy_per_client": per_client, "evaluated_clients": len(per_client)},
          "totals": {"uplink_bits_per_client_round": up * params,
                     "downlink_bits_per_client_round": down * params,
                     "uplink_bits_per_param": up, "downlink_bits_per_param": down, "rounds": 3}}


def _write(folder, results):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "results.json"), "w") as f:
    json.dump(results, f)


def _compare_folder(root):
  """An experiments.compare output: partition.json, comparison.json, one run per algorithm."""
  os.makedirs(root)
  for name in ("partition.json", "comparison.json"):
    with open(os.path.join(root, name), "w") as f:
      json.dump([], f)
  clients = {f"c{i}": a for i, a in enumerate([0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])}
  _write(os.path.join(root, "fedmask"), _results("fedmask", clients, 1.1, 9.5))
  _write(os.path.join(root, "standalone"), _results("standalone", {"c0": 0.9, "c1": 1.0}, 0, 0,
                                                    learning_rate=0.01))
  _write(os.path.join(root, "fedavg"), _results("fedavg", {"c0": 0.7, "c1": 0.8}, 32, 32, complete=False))


def test_compare_folder_rows_statistics_and_command(tmp_path, capsys):
  _compare_folder(str(tmp_path / "cmp"))
  rows = rt.rows_from_runs([str(tmp_path)])
  assert [r.algorithm for r in rows] == ["fedmask", "standalone"]  # the unfinished fedavg left out
  assert "not complete" in capsys.readouterr().err
  fedmask = rows[0]
  assert fedmask.client_min == 0.5 and abs(fedmask.client_p10 - 0.6) < 1e-9  # numpy's percentile
  assert (fedmask.up, fedmask.down) == (1.1, 9.5)
  assert fedmask.command == rows[1].command
  assert fedmask.command.startswith(
      f".venv/bin/python -m experiments.compare --algorithms=fedmask,standalone --output_dir={tmp_path}/cmp ")
  for flag in ("--num_clients=6", "--clients_per_round=3", "--rounds=3", "--local_epochs=1",
               "--model=mlp", "--model_width=0.25", "--learning_rates=standalone=0.01"):
    assert flag in fedmask.command.split(), flag
  assert "--output_dir=x" not in fedmask.command and "--progress" not in fedmask.command
  assert len(fedmask.date) == 10 and fedmask.date.startswith("20")


def test_a_single_run_folder_has_its_run_command(tmp_path):
  _write(str(tmp_path / "one"), _results("fedmask", {"a": 1.0}, 1.0, 8.0, upload="mask"))
  (row,) = rt.rows_from_runs([str(tmp_path / "one")])
  assert row.command.startswith(f".venv/bin/python -m experiments.run --algorithm=fedmask --output_dir={tmp_path}/one")
  assert "--upload=mask" in row.command.split()
  assert rt.algorithm_label(row) == "fedmask (--upload=mask)"


def test_table_runs_replace_recorded_rows_and_show_the_paper(tmp_path):
  record = {"groups": [{"command": "python -m experiments.compare --dataset=har", "date": "2026-11-30",
                        "commit": "abc1234", "settings": {"dataset": "har", "num_clients": 6,
                                                          "clients_per_round": 3, "rounds": 3,
                                                          "local_epochs": 1, "model": "mlp",
                                                          "model_width": 0.25},
                        "rows": [{"algorithm": "fedmask", "accuracy": "0.70", "up": "1.05", "down": "9.9"},
                                 {"algorithm": "local_masks", "accuracy": "0.60", "up": "0", "down": "0"}]}]}
  path = tmp_path / "recorded.json"
  path.write_text(json.dumps(record))
  _write(str(tmp_path / "runs" / "har"), _results("fedmask", {"a": 0.8, "b": 1.0}, 1.0, 8.0, dataset="har"))
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{rt.BEGIN}\nold table\n{rt.END}\nafter\n")
  code = rt.main([f"--runs={tmp_path / 'runs'}", f"--recorded={path}", f"--readme={readme}"])
  assert code == 0
  text = readme.read_text()
  assert text.startswith("intro\n") and text.endswith(f"{rt.END}\nafter\n") and "old table" not in text
  lines = [line for line in text.splitlines() if line.startswith("| ")]
  fedmask, local = lines[1], lines[2]
  assert "UCI-HAR" in fedmask and "| 0.9000 | 0.9000 | 0.800 | 0.820 | 1.00 / 8.00 | 0.995 (HAR) |" in fedmask
  assert "| local_masks | 0.60 | n/r | n/r | n/r | 0 / 0 | – | 2026-11-30 | (b) |" in local
  assert "(b) `python -m experiments.compare --dataset=har` (commit abc1234)" in text


def test_errors_name_the_problem(tmp_path, capsys):
  assert rt.main([f"--runs={tmp_path / 'missing'}"]) == 2
  assert "not a folder" in capsys.readouterr().err
  readme = tmp_path / "README.md"
  readme.write_text("no markers\n")
  _write(str(tmp_path / "r"), _results("fedmask", {"a": 1.0}, 1.0, 8.0))
  assert rt.main([f"--runs={tmp_path / 'r'}", f"--readme={readme}"]) == 2
  assert "results-table:begin" in capsys.readouterr().err


def test_two_commands_writing_one_output_folder_are_refused(tmp_path, capsys):
  """A user who runs the table's commands in order must not hit "holds a run with other
  settings" (CI's documented-commands test runs them): two different commands of the table
  may not share an --output_dir."""
  record = {"groups": [{"command": f"python -m experiments.compare --output_dir=runs/x{extra}",
                        "date": "2026-11-30", "commit": "abc1234", "settings": {"rounds": rounds},
                        "rows": [{"algorithm": "fedmask", "accuracy": "0.70", "up": "1", "down": "1"}]}
                       for extra, rounds in (("", 3), (" --upload=mask", 4))]}
  path = tmp_path / "recorded.json"
  path.write_text(json.dumps(record))
  assert rt.main([f"--recorded={path}"]) == 2
  assert "commands (a) and (b) both write --output_dir=runs/x" in capsys.readouterr().err
  record["groups"][1]["command"] = "python -m experiments.compare --output_dir=runs/y --upload=mask"
  path.write_text(json.dumps(record))
  assert rt.main([f"--recorded={path}"]) == 0
