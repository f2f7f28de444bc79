"""Standalone's two training budgets: ``equal_epochs`` (FedMask's epochs) and ``every_round``
(every client trains in every round; missed rounds caught up when sampled and at evaluation)."""

import numpy as np
import pytest

from fedmask_tff.simulation.run_config import ConfigError, RunConfig, differing_settings
from test_baselines_core import client_data, context


def test_every_round_trains_every_round_sampled_or_not(tff_context):
  from fedmask_tff.algorithms.standalone import build_standalone
  alg = build_standalone(context(local_epochs=2), budget="every_round")
  assert alg.settings["budget"] == "every_round"
  server = alg.initialize()
  a, b = client_data(10, 0), client_data(6, 1)
  # Round 1: client a only: 2 epochs + 1 (FedMask's pruning epoch) of its 10 examples.
  server, (state_a,), m1 = alg.next(server, [a], [alg.initial_client_state()])
  assert m1[0]["examples"] == 30.0 and int(state_a["rounds"]) == 1
  # Round 2: a and b; b was not sampled in round 1, so it trains rounds 1 and 2: 2 x 2 + 1.
  server, (state_a, state_b), m2 = alg.next(server, [a, b], [state_a, alg.initial_client_state()])
  assert [m["examples"] for m in m2] == [20.0, 30.0]
  # Round 3: b only; a catches up on round 3 before it is evaluated.
  server, (state_b,), m3 = alg.next(server, [b], [state_b])
  assert m3[0]["examples"] == 12.0 and int(server) == 3
  before = np.array(state_a["weights"][0])
  alg.evaluate(server, [a, b], [state_a, state_b], [a, b])
  extras = alg.final_extras([{}, {}, {}])
  assert extras["standalone_budget"] == "every_round"
  assert extras["standalone_catch_up_epochs"] == 2 and extras["standalone_catch_up_examples"] == 20.0
  # Total epochs per client: 3 rounds x 2 + 1, the same for both although sampled 2 times each.
  assert (30 + 20 + 20) / 10 == (30 + 12) / 6 == 7
  assert np.array_equal(before, state_a["weights"][0])  # the stored state is not changed
  late = alg.late_joiner_states(server, None, 1)[0]
  assert int(late["rounds"]) == 3  # late joiners are not trained at evaluation


def test_equal_epochs_is_the_default_and_reports_no_catch_up(tff_context):
  from fedmask_tff.algorithms.standalone import build_standalone
  alg = build_standalone(context(local_epochs=1))
  server = alg.initialize()
  server, _, m = alg.next(server, [client_data(10, 0)], [alg.initial_client_state()])
  assert m[0]["examples"] == 20.0
  assert alg.final_extras([{}]) == {"standalone_budget": "equal_epochs"}
  with pytest.raises(ValueError, match="unknown standalone budget"):
    build_standalone(context(), budget="forever")


def test_the_budget_is_a_setting_of_standalone_runs_only():
  with pytest.raises(ConfigError, match="--standalone_budget"):
    RunConfig(standalone_budget="forever").validate()
  stored = {"algorithm": "standalone", "standalone_budget": "equal_epochs"}
  config = RunConfig(algorithm="standalone", standalone_budget="every_round")
  assert "standalone_budget" in differing_settings(dict(vars(RunConfig(algorithm="standalone")),
                                                        **stored), config)
  fedavg = RunConfig(algorithm="fedavg", standalone_budget="every_round")
  assert differing_settings(dict(vars(RunConfig(algorithm="fedavg"))), fedavg) == []
