"""The paper_table study's table: ours beside Figure 10 and §4.4, from results written here."""

import dataclasses

from experiments import paper_table
from fedmask_tff.simulation.run_config import RunConfig


def _results(accuracy, up_bits, down_bits, budget="equal_epochs"):
  return {"final": {"accuracy_client_mean": accuracy, "accuracy": accuracy - 0.01,
                    "evaluated_clients": 21},
          "totals": {"uplink_bits_per_client_round": up_bits,
                     "downlink_bits_per_client_round": down_bits, "rounds": 50, "wall_s": 9.0},
          "config": {"model_used": "har_mlp", "model_width": 1.0, "standalone_budget": budget}}


def test_rows_put_ours_beside_figure_10_and_section_4_4():
  results = {"fedmask": _results(0.95, 1e6, 3e6), "lg_fedavg": _results(0.97, 40e6, 40e6),
             "standalone": _results(0.90, 0, 0, "every_round"),
             "standalone_equal_epochs": _results(0.85, 0, 0)}
  rows = {r["run"]: r for r in paper_table.task_rows("har_features", results)}
  assert list(rows) == ["fedmask", "lg_fedavg", "standalone", "standalone_equal_epochs"]
  lg = rows["lg_fedavg"]
  assert lg["paper_accuracy"] == 99.1 and round(lg["accuracy"], 6) == 97.0
  assert round(lg["difference_points"], 6) == round(97.0 - 99.1, 6)
  assert round(lg["paper_fedmask_lead"], 6) == 0.4 and round(lg["fedmask_lead"], 6) == -2.0
  assert lg["communication_over_fedmask"] == 20.0 and lg["paper_communication_over_fedmask"] == 25.64
  assert rows["standalone"]["budget"] == "every_round"
  assert rows["standalone_equal_epochs"]["paper_accuracy"] == 91.6  # Figure 10's Standalone
  base = RunConfig(dataset="har_features", model="har_mlp", rounds=50, clients_per_round=20)
  text = paper_table.task_markdown("har_features", base, list(rows.values()), "paper")
  assert "### HAR: `har_features`, model har_mlp (width 1), 21 clients evaluated" in text
  assert "Scaled down from the paper: the subjects in the files" in text
  assert "; 50 rounds (the paper gives none)." in text
  assert "| LG-FedAvg | 99.1 | 97.0 | -2.1 | +0.4 | -2.0 | 10 | 20 | 25.64 |" in text


def test_presets_and_the_extra_standalone_run():
  base = paper_table.task_config("cifar10", "paper", {"rounds": 3})
  assert (base.model, base.model_width, base.rounds, base.clients_per_round) == \
      ("vgg16_paper", 0.125, 3, 20)
  assert base.standalone_budget == "every_round" and base.local_epochs == 5
  runs = [(a, {}, dataclasses.replace(base, algorithm=a, output_dir=f"o/{a}"))
          for a in ("fedmask", "standalone")]
  planned = paper_table.plan_task(runs, base, "o")
  names = [n for n, _, _ in planned]
  assert names == ["fedmask", "standalone", "standalone_equal_epochs"]
  extra = planned[2][2]
  assert extra.standalone_budget == "equal_epochs" and extra.output_dir == "o/standalone_equal_epochs"
  assert planned[1][2].learning_rate == 0.01 == extra.learning_rate  # cifar10's Standalone rate
  assert planned[0][2].learning_rate is None
  small = paper_table.task_config("har_features", "small", {})
  assert small.rounds == 2 and small.model is None
