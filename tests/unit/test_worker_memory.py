"""What keeps TFF's worker small: values disposed at once, and its allocator."""

import os

import tensorflow_federated as tff

from fedmask_tff import runtime


def test_remote_executors_dispose_every_value_at_once(monkeypatch):
  made = []

  class Recorder(tff.framework.RemoteExecutor):  # records how the factory makes executors
    def __init__(self, stub, **kwargs):  # pylint: disable=super-init-not-called
      made.append(kwargs)

    def set_cardinalities(self, cardinalities):
      pass

  monkeypatch.setattr(tff.framework, "RemoteExecutor", Recorder)
  runtime._executor_factory(stub=None).create_executor({})  # pylint: disable=protected-access
  assert made == [{"dispose_batch_size": 1}]  # TFF's default, 20, kept ~3 rounds of states


def test_allocator_choice(monkeypatch, tmp_path):
  fake = tmp_path / "libjemalloc.so.2"
  fake.write_bytes(b"")
  monkeypatch.setattr(runtime, "JEMALLOC_PATHS", (str(tmp_path / "missing.so"), str(fake)))
  monkeypatch.delenv("FEDMASK_WORKER_MALLOC", raising=False)
  env = runtime.worker_allocator_env()
  assert env["LD_PRELOAD"] == str(fake) and "background_thread:true" in env["MALLOC_CONF"]
  monkeypatch.setenv("FEDMASK_WORKER_MALLOC", "glibc")
  assert runtime.worker_allocator_env() == {}
  monkeypatch.setenv("FEDMASK_WORKER_MALLOC", str(tmp_path / "nowhere.so"))
  assert runtime.worker_allocator_env() == {"MALLOC_ARENA_MAX": "2"}
  monkeypatch.setenv("FEDMASK_WORKER_MALLOC", "auto")
  monkeypatch.setattr(runtime, "JEMALLOC_PATHS", (str(tmp_path / "missing.so"),))
  assert runtime.worker_allocator_env() == {"MALLOC_ARENA_MAX": "2"}


def test_the_running_worker_got_its_allocator(tff_context):
  pid = runtime.local_worker_pids()[0]
  with open(f"/proc/{pid}/environ", "rb") as f:
    environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
  expected = runtime.worker_allocator_env()
  for key, value in expected.items():
    assert environ.get(key.encode()) == value.encode(), key
  if "LD_PRELOAD" in expected:  # jemalloc installed: it is really mapped into the worker
    with open(f"/proc/{pid}/maps") as f:
      assert "libjemalloc" in f.read()


def test_the_benchmark_passes_the_runs_settings_to_each_cases_process(monkeypatch, tmp_path):
  # A case runs in its own process; settings left out there were silently not measured (the
  # cap on concurrent clients was, at first).
  import json
  import subprocess

  import sys

  from absl import flags

  if "benchmarks.worker_memory" not in sys.modules:
    # Another test of this process may have imported experiments.run, which defines flags of
    # the same names (each CLI is its own process in use).
    for flag in list(flags.FLAGS.flags_by_module_dict().get("experiments.run", [])):
      if flag.name in flags.FLAGS:
        delattr(flags.FLAGS, flag.name)
  from benchmarks import worker_memory
  commands = []

  def fake_run(command, **kwargs):
    commands.append(command)
    out = next(a.split("=", 1)[1] for a in command if a.startswith("--results="))
    with open(out + ".json", "w") as f:
      json.dump({"rows": [{"model": "cnn"}]}, f)

  monkeypatch.setattr(subprocess, "run", fake_run)
  (tmp_path / "benchmarks").mkdir()
  (tmp_path / "benchmarks" / "worker_memory.py").write_text(
      'DEFINE_list("cnn_clients"); DEFINE_list("har_clients")')  # code before the vgg16 case
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["worker_memory", "--max_concurrent_clients=2", "--client_states=messages"])
  try:
    worker_memory._case_in_own_process(str(tmp_path), "cnn", 20, baseline=False)  # pylint: disable=protected-access
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["worker_memory"])
    worker_memory._case_in_own_process(str(tmp_path), "cnn", 20, baseline=True)  # pylint: disable=protected-access
  finally:
    flags.FLAGS.unparse_flags()
  assert "--max_concurrent_clients=2" in commands[0] and "--client_states=messages" in commands[0]
  assert "--cnn_clients=20" in commands[0] and "--har_clients=" in commands[0]
  assert "--vgg16_clients=" not in " ".join(commands[1])  # that code has no such flag
  assert not [a for a in commands[1] if a.startswith(("--max_concurrent", "--client_states"))]
