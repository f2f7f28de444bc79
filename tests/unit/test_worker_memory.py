"""What keeps TFF's worker small (issue 17): values disposed at once, and its allocator."""

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
