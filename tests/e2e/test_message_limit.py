"""A round whose clients' states cannot travel to TFF's worker in one message is refused before
any training, with a message that says what to change (vgg16 at width 1 with 20
clients a round needed 3.7 GB in one request when masks travelled as float32; protobuf stops
at 2 GiB. Packed, a state is 64 MB and 20 clients fit; 29 do not). That applies when states
travel in TFF's messages (``--client_states=messages``, the default with ``--workers``); by
default with the local worker they travel as files and a round's size is no limit."""

import pytest

from fedmask_tff import runtime
from fedmask_tff.simulation import runner
from fedmask_tff.simulation.run_config import ConfigError, RunConfig
from helpers import write_learnable_fashion_dir

# mlp at width 0.25: 42,200 mask elements in weights of 39,200, 2,500 and 500. A FedMask client
# state travels as float32 scores, keep and personal bit-packed (ceil(n/8) bytes per weight:
# 4,900 + 313 + 63 = 5,276 each) and the int32 round: 4 * 42,200 + 2 * 5,276 + 4 = 179,356 bytes.
STATE_BYTES = 4 * 42_200 + 2 * 5_276 + 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("fm_limit")
  write_learnable_fashion_dir(str(directory), n_train=200, n_test=40)
  return str(directory)


def _config(data_dir, tmp_path, **overrides):
  # The score-threshold process, whose states can travel as files (sampled masks' travel in
  # messages).
  settings = dict(upload="score_sign", model="mlp", model_width=0.25, num_clients=10, clients_per_round=6, rounds=1,
                  local_epochs=1, data_dir=data_dir, output_dir=str(tmp_path / "run"),
                  progress=False)
  settings.update(overrides)
  return RunConfig(**settings)


def test_too_many_clients_for_one_message_are_refused_before_training(data_dir, tmp_path,
                                                                      monkeypatch):
  # A message that holds the states of 4 clients (with the runner's headroom), not 6.
  monkeypatch.setattr(runtime, "MAX_MESSAGE_BYTES", int(4.5 * STATE_BYTES / runner.MESSAGE_HEADROOM))
  with pytest.raises(ConfigError) as error:
    runner.run(_config(data_dir, tmp_path, client_states="messages"))
  message = str(error.value)
  assert "--clients_per_round=6: each client's state is 0.179 MB (mlp at --model_width=0.25)" in message
  assert "use at most 4 clients per round" in message and "--model_width" in message
  assert not (tmp_path / "run" / "results.json").exists()  # nothing trained, nothing written


def test_a_round_that_fits_runs_to_the_end(data_dir, tmp_path, monkeypatch):
  # 3 clients a round fit; evaluation of the 6 that took part goes 3 per call.
  monkeypatch.setattr(runtime, "MAX_MESSAGE_BYTES", int(3.5 * STATE_BYTES / runner.MESSAGE_HEADROOM))
  results = runner.run(_config(data_dir, tmp_path, clients_per_round=3, rounds=2,
                               client_states="messages"))
  assert results["complete"] and 3 <= results["final"]["evaluated_clients"] <= 6


def test_states_as_files_are_no_limit_on_clients_per_round(data_dir, tmp_path, monkeypatch):
  # The default with the local worker: each state in TFF's messages is a path, so the 6 clients
  # that the message above refuses run; the record keeps both sizes.
  monkeypatch.setattr(runtime, "MAX_MESSAGE_BYTES", int(4.5 * STATE_BYTES / runner.MESSAGE_HEADROOM))
  results = runner.run(_config(data_dir, tmp_path))
  config = results["config"]
  assert results["complete"] and config["algorithm_settings"]["client_states_used"] == "files"
  assert config["client_state_bytes"] == STATE_BYTES
  assert 0 < config["client_state_message_bytes"] < 1000
