"""The one rerun policy of comparisons and studies (``runner.plan_run``), on run folders written
by hand: skip a complete run of the same settings, resume an unfinished one, start a fresh one,
and replace a run of other settings only with ``--overwrite``."""

import dataclasses
import json
import os

import pytest

from fedmask_tff.simulation import runner
from fedmask_tff.simulation.run_config import ConfigError, RunConfig


def _write_run(directory, config, complete, checkpoint=False, rounds=()):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "results.json"), "w") as f:
    json.dump({"config": dataclasses.asdict(config), "complete": complete,
               "rounds": [{"round": r} for r in rounds]}, f)
  if checkpoint:
    open(os.path.join(directory, "checkpoint.npz"), "wb").close()


def test_fresh_folder_starts(tmp_path):
  plan = runner.plan_run(RunConfig(output_dir=str(tmp_path / "run")), replace=False)
  assert plan.action == "start" and not plan.config.overwrite and plan.results is None


def test_complete_run_with_the_same_settings_is_skipped(tmp_path):
  config = RunConfig(output_dir=str(tmp_path / "run"), rounds=3)
  _write_run(config.output_dir, config, complete=True)
  plan = runner.plan_run(config, replace=True)  # skipped even with --overwrite
  assert plan.action == "skip" and plan.results["complete"] is True


def test_unfinished_run_resumes(tmp_path):
  config = RunConfig(output_dir=str(tmp_path / "run"), rounds=3)
  _write_run(config.output_dir, config, complete=False, checkpoint=True)
  assert runner.plan_run(config, replace=False).action == "resume"


@pytest.mark.parametrize("complete", [True, False])
def test_other_settings_are_replaced_only_with_overwrite(tmp_path, complete):
  stored = RunConfig(output_dir=str(tmp_path / "run"), rounds=3)
  _write_run(stored.output_dir, stored, complete=complete, checkpoint=not complete)
  wanted = dataclasses.replace(stored, rounds=5)
  with pytest.raises(ConfigError, match="--rounds"):
    runner.plan_run(wanted, replace=False)
  plan = runner.plan_run(wanted, replace=True)
  assert plan.action == "replace" and plan.config.overwrite and plan.config.rounds == 5


def test_unresumable_run_is_refused_without_overwrite(tmp_path):
  config = RunConfig(output_dir=str(tmp_path / "run"), rounds=3)
  _write_run(config.output_dir, config, complete=False, checkpoint=False, rounds=[1])
  with pytest.raises(ConfigError, match="unreadable or unresumable run: pass --overwrite"):
    runner.plan_run(config, replace=False)
  assert runner.plan_run(config, replace=True).action == "replace"
  _write_run(config.output_dir, config, complete=False, checkpoint=False)  # no round finished
  plan = runner.plan_run(config, replace=False)
  assert plan.action == "start" and plan.config.overwrite
