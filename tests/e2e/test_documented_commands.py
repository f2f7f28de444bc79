"""Every command in README.md and docs/*.md, as a user types it.

The commands are read from the documents' fenced ``bash`` blocks (continuation lines joined,
comments and a trailing ``&`` dropped, ``NAME="..."`` variables of the block expanded) and from
the inline ``python -m ...`` code spans of their prose. A command with ``[...]`` options, ``a|b``
choices or a capitalized placeholder (``--run_dir=DIR``) is a synopsis, not checked; a ``...``
token means "your other flags" and is dropped; other programs' commands (adb, on a phone) are
not run. Two checks, so that a changed or broken documented command fails CI:

1. **Every command's flags and values are valid**: each is run with ``--dry_run`` added (the
   CLIs check every flag and every planned run's settings, then stop), or, for the worker and the
   TFLite tools, run for real below.
2. **The workflows run end to end** with their default flags left as they are and only size flags
   added (fewer rounds and clients, a narrower model, fewer timing runs) plus the synthetic
   Fashion-MNIST folder of the tests (``--data_dir``; CI has no data set): the README's main
   command, its compare command, ``scripts/demo.sh``, the plot command over those runs, and
   docs/tflite.md's run, export, evaluation and LiteRT check. Commands on data sets that live in
   ``../shared/data`` (HAR, FEMNIST, CIFAR-10) get check 1 only. Sized down, the commands of
   several results records are the same runs (one round, ten clients, width 0.25): a run an
   earlier command made on the same settings is not made again (a compare keeps only its
   algorithms not yet run; a command with none left is listed as covered).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, write_learnable_fashion_dir

DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
PYTHONS = (".venv/bin/python", ".venv-litert/bin/python", "python")
# Size flags: the most a documented value is allowed to be in the test (lower values stay).
SIZE_CAPS = {"rounds": 1, "num_clients": 10, "clients_per_round": 5, "local_epochs": 1,
             "examples_per_client": 25}
SIZE_ADD = {"experiments.run": ["--model_width=0.25", "--progress=false"],
            "experiments.compare": ["--model_width=0.25", "--progress=false"],
            "tflite.evaluate": ["--runs=3", "--warmup=1", "--threads=1", "--skip_memory",
                                "--max_test_examples=20"],
            "tflite.check_runtime": ["--runs=3"]}


def _blocks(text):
  for m in re.finditer(r"```bash\n(.*?)```", text, re.S):
    yield m.start(), m.group(1)


def _synopsis(words) -> bool:
  """``[--opt]``, ``a|b`` or a capitalized placeholder (``--run_dir=DIR``, ``RUN_DIR``)."""
  return any("[" in w or "|" in w or re.search(r"(^|=)[A-Z][A-Z_]*(\.[a-z]+)?$", w) for w in words)


def documented_commands(kind: str = "command") -> list[tuple[str, list[str]]]:
  """``(where, argv)`` for every command line of the documents' bash blocks and every inline
  ``python -m ...`` code span of their prose with arguments (``kind="command"``), or every
  inline span without arguments, a module named in prose (``kind="reference"``)."""
  found = []
  for path in DOCS:
    with open(path) as f:
      text = f.read()
    for m in re.finditer(r"`((?:\.venv/bin/)?python -m [^`]+)`", text):
      words = [w for w in shlex.split(m.group(1).replace("\n", " ")) if w != "..."]
      is_reference = len(module_of(words)[1]) == 0
      if not _synopsis(words) and is_reference == (kind == "reference"):
        found.append((f"{os.path.relpath(path, ROOT)}:{text[:m.start()].count(chr(10)) + 1}", words))
    if kind == "reference":
      continue
    for offset, block in _blocks(text):
      line_no = text[:offset].count("\n") + 2
      variables = {}
      for raw in block.replace("\\\n", " ").splitlines():
        where = f"{os.path.relpath(path, ROOT)}:{line_no}"
        line_no += 1 + raw.count("\\\n")
        words = shlex.split(raw, comments=True)
        if not words:
          continue
        assign = re.fullmatch(r"([A-Z_]+)=(.*)", words[0])
        if len(words) == 1 and assign:
          variables[assign.group(1)] = assign.group(2)
          continue
        words = [w for x in words for w in (shlex.split(variables[x[1:]]) if x[1:] in variables
                                            and x.startswith("$") else [x])]
        if words[-1] == "&":
          words = words[:-1]
        if _synopsis(words):  # not a command
          continue
        if module_of(words)[0] is not None:  # ours; not adb & co. (they run on a phone)
          found.append((where, [w for w in words if w != "..."]))
  # In reading order (a later command may use an earlier one's output).
  return sorted(found, key=lambda c: (DOCS.index(os.path.join(ROOT, c[0].split(":")[0])),
                                      int(c[0].split(":")[1])))


def module_of(argv):
  if argv[0] in PYTHONS and argv[1:2] == ["-m"]:
    return argv[2], argv[3:]
  if argv[0] == "bash" and len(argv) > 1 and argv[1].startswith("scripts/"):
    return argv[1], argv[2:]
  return None, argv


def test_the_documents_have_the_commands_this_file_runs():
  commands = [module_of(a)[0] for _, a in documented_commands()]
  for expected in ("scripts/demo.sh", "scripts/test.sh", "experiments.run", "experiments.compare",
                   "experiments.plot", "experiments.studies", "tflite.evaluate", "tflite.export",
                   "tflite.check_runtime", "fedmask_tff.runtime.worker"):
    assert expected in commands, expected


DRY_RUN = ("experiments.run", "experiments.compare", "experiments.studies")
HELP_ONLY = ("experiments.compare_coding", "benchmarks.run", "benchmarks.workers",
             "benchmarks.long_run_memory", "benchmarks.worker_memory",
             "experiments.results_table")  # its own test: tests/unit/test_results_table.py

# One process per module checks all of its documented commands (a TensorFlow import each, not
# one per command): absl modules re-parse their flags per command and, with --dry_run, run main.
_CHECKER = """
import contextlib, importlib, io, json, sys
from absl import flags
module, dry_run, commands = sys.argv[1], sys.argv[2] == "1", json.loads(sys.argv[3])
m = importlib.import_module(module)
results = []
for args in commands:
  err = io.StringIO()
  code = 0
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
      if hasattr(m, "FLAGS"):  # absl
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["prog", *args] + (["--dry_run"] if dry_run else []))
        if dry_run:
          m.main(["prog"])
      else:  # argparse: parse only (a module named without arguments: its --help)
        args = args or ["--help"]
        import argparse
        original = argparse.ArgumentParser.parse_args
        def parse_only(self, a=None, n=None):
          original(self, a, n)
          raise SystemExit(0)
        argparse.ArgumentParser.parse_args = parse_only
        try:
          m.main(args)
        finally:
          argparse.ArgumentParser.parse_args = original
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except Exception as e:  # an unknown flag, a bad value
    code, err = 1, io.StringIO(f"{type(e).__name__}: {e}")
  results.append([code, err.getvalue()[-1500:]])
print("RESULTS" + json.dumps(results))
"""


def _check_module(module, commands, dry_run):
  import json as json_lib
  proc = subprocess.run([sys.executable, "-c", _CHECKER, module, "1" if dry_run else "0",
                         json_lib.dumps([args for _, args in commands])], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
  assert "RESULTS" in proc.stdout, proc.stderr[-3000:]
  results = json_lib.loads(proc.stdout.split("RESULTS", 1)[1])
  failed = [f"{where}: {module} {' '.join(args)}\n{err}"
            for (where, args), (code, err) in zip(commands, results) if code != 0]
  assert not failed, "\n".join(failed)


def _by_module(commands, modules):
  grouped = {}
  for where, argv in commands:
    module, args = module_of(argv)
    if module in modules:
      grouped.setdefault(module, []).append((where, args))
  return grouped


@pytest.mark.parametrize("module", DRY_RUN)
def test_every_documented_command_has_valid_flags(module, tmp_path):
  """Each command with --dry_run added: every flag and every planned run's settings checked.
  The output folder is moved into tmp_path, so that nothing in the checkout is touched."""
  commands = [(w, [a for a in args if not a.startswith("--output_dir=")]
               + [f"--output_dir={tmp_path}/out{i}"])
              for i, (w, args) in enumerate(_by_module(documented_commands(), DRY_RUN).get(module, []))]
  assert commands, module
  _check_module(module, commands, True)


def test_long_documented_commands_exist_and_know_their_flags():
  """Benchmarks, the coding comparison and the worker run for minutes or serve until stopped,
  and modules named in prose have no arguments: each module must import and accept the
  documented flags (parsed, not run)."""
  commands = documented_commands("reference") + [
      c for c in documented_commands() if module_of(c[1])[0] in HELP_ONLY + ("fedmask_tff.runtime.worker",)]
  for where, argv in commands:
    if module_of(argv)[0].startswith("scripts/"):
      assert os.path.isfile(os.path.join(ROOT, module_of(argv)[0])), where
  grouped = _by_module(commands, set(module_of(a)[0] for _, a in commands) - {None})
  grouped = {m: c for m, c in grouped.items() if not m.startswith("scripts/")}
  assert "fedmask_tff.runtime.worker" in grouped and "benchmarks.run" in grouped
  for module, module_commands in grouped.items():
    _check_module(module, module_commands, False)


def test_every_documented_module_is_checked_somewhere():
  checked = set(DRY_RUN + HELP_ONLY) | {"fedmask_tff.runtime.worker", "experiments.plot", "tflite.evaluate",
                                        "tflite.export", "tflite.check_runtime", "scripts/demo.sh",
                                        "scripts/test.sh"}
  assert {module_of(a)[0] for _, a in documented_commands()} <= checked
  assert len(documented_commands("reference")) >= 3


def _sized(module, args, data_dir):
  out = []
  for a in args:
    name, eq, value = a[2:].partition("=")
    if a.startswith("--") and eq and name in SIZE_CAPS and value.isdigit():
      a = f"--{name}={min(int(value), SIZE_CAPS[name])}"
    out.append(a)
  if module in ("experiments.run", "experiments.compare", "scripts/demo.sh"):
    out += [f"--{k}={v}" for k, v in SIZE_CAPS.items()
            if k in ("rounds", "local_epochs") and not any(x.startswith(f"--{k}=") for x in args)]
    out.append(f"--data_dir={data_dir}")
  return out + SIZE_ADD.get(module, [])


@pytest.fixture(scope="module")
def workflows(tmp_path_factory):
  """Runs the fashion_mnist workflows of the documents in order, in a scratch folder that
  stands for the checkout (relative paths as documented; /tmp/... moved inside it)."""
  work = tmp_path_factory.mktemp("docs")
  data_dir = str(work / "fmnist")
  write_learnable_fashion_dir(data_dir)
  for venv in (".venv", ".venv-litert"):
    os.symlink(os.path.join(ROOT, venv), work / venv)
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  env["PYTHONPATH"] = ROOT  # experiments/ and tflite/ run from a checkout
  done, covered, runs_made = [], [], set()
  for where, argv in documented_commands():
    module, args = module_of(argv)
    text = " ".join(argv)
    if module in ("scripts/test.sh", "fedmask_tff.runtime.worker", "experiments.studies") + HELP_ONLY \
        or "--workers=" in text or "--dataset=" in text and "--dataset=fashion_mnist" not in text:
      continue  # the suite itself; a server; studies (dry-run above); long runs; data not in CI
    args = _sized(module, [re.sub(r"(^|=)/tmp/", rf"\g<1>{work}/tmp/", a) for a in args], data_dir)
    args = _not_run_yet(module, args, runs_made)
    if args is None:  # every run it makes was made, on the same settings, by an earlier command
      covered.append(where)
      continue
    if module == "scripts/demo.sh":  # it cds to the checkout: its output goes to the scratch folder
      cmd = ["bash", os.path.join(ROOT, module), *args, f"--output_dir={work}/runs/demo"]
    else:
      cmd = [argv[0], "-m", module, *args]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    done.append((where, cmd, proc))
  return work, done, covered


def _not_run_yet(module, args, runs_made):
  """``args`` of a run or compare less the runs an earlier documented command already made on
  the same settings (the sized commands of several results records are the same runs: one
  round, ten clients), or None when none is left; other modules' ``args`` as they are.
  ``runs_made`` collects ``(module, algorithm, settings)`` of the runs kept."""
  if module not in ("experiments.run", "experiments.compare"):
    return args
  from fedmask_tff.algorithms import ALGORITHMS
  from fedmask_tff.simulation.run_config import FEDMASK_COMMUNICATION, FEDMASK_SETTINGS
  settings = {}
  for a in args:  # the last value of a flag is the one that counts
    name, _, value = a.partition("=")
    if name not in ("--algorithm", "--algorithms", "--output_dir", "--progress"):
      settings[name] = value
  # FedMask's own flags change no other algorithm's run (the CLI leaves them unused there).
  mask_flags = {f"--{n}" for n in FEDMASK_SETTINGS + FEDMASK_COMMUNICATION}
  def key(algorithm):
    own = algorithm in ("fedmask", "local_masks", "fedpm")
    return (module, algorithm, tuple(sorted((n, v) for n, v in settings.items()
                                            if own or n not in mask_flags)))
  named = [a.partition("=")[2] for a in args if a.startswith(("--algorithm=", "--algorithms="))]
  algorithms = named[-1].split(",") if named else (
      ["fedmask"] if module == "experiments.run" else list(ALGORITHMS))
  left = [a for a in algorithms if key(a) not in runs_made]
  runs_made.update(key(a) for a in left)
  if not left:
    return None
  if left == algorithms:
    return args
  return [a for a in args if not a.startswith("--algorithms=")] + [f"--algorithms={','.join(left)}"]


def test_documented_workflows_run_end_to_end(workflows):
  work, done, covered = workflows
  # A command whose every run an earlier one made (same sized settings) is not run again.
  assert len(done) > len(covered) and "README.md:36" not in covered, covered
  ran = {module_of(cmd[2:] if cmd[0] == "bash" else cmd)[0] or cmd[1] for _, cmd, _ in done}
  for where, cmd, proc in done:
    assert proc.returncode == 0, f"{where}: {' '.join(cmd)}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    assert "tensorflow/" not in proc.stderr, f"{where}: TensorFlow's C++ log in the console"
  assert {"experiments.run", "experiments.compare", "experiments.plot", "tflite.evaluate",
          "tflite.export", "tflite.check_runtime"} <= ran, ran
  assert any(c[0] == "bash" and c[1].endswith("scripts/demo.sh") for _, c, _ in done)
  assert os.path.isfile(work / "runs" / "figs" / "compare.png")
  check_compare_of_all_algorithms(work / "runs" / "compare")
  assert os.path.isfile(work / "tmp" / "tfl_run" / "tflite" / "runtime_check.json")
  with open(work / "tmp" / "tfl_run" / "tflite" / "report.json") as f:
    report = json.load(f)
  assert all(r["latency_runtime"].startswith("tf.lite.Interpreter") for r in report
             if r.get("latency_ms_median") is not None)
  check_litert_runtime(str(work / "tmp" / "tfl_run"))


LITERT_PYTHON = os.path.join(ROOT, ".venv-litert", "bin", "python")


def check_litert_runtime(run_dir):
  """docs/tflite.md's third command: LiteRT, in its own environment without TensorFlow, runs
  every exported model through its named signature and agrees with Keras."""
  assert os.path.exists(LITERT_PYTHON), "no .venv-litert: scripts/install.sh makes it"
  no_tf = subprocess.run([LITERT_PYTHON, "-c", "import tensorflow"], capture_output=True)
  assert no_tf.returncode != 0  # the phone's runtime alone
  cmd = [LITERT_PYTHON, "-m", "tflite.check_runtime", f"--run_dir={run_dir}", "--runs=3"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  with open(os.path.join(run_dir, "tflite", "runtime_check.json")) as f:
    check = json.load(f)
  assert check["runtime"].startswith("LiteRT (ai-edge-litert ")
  rows = {r["variant"]: r for r in check["rows"]}
  for variant in ("folded_float32", "packed_runtime", "compacted_float32"):
    assert rows[variant]["same_class_as_keras"] == 1.0 and rows[variant]["max_abs_diff_vs_keras"] < 1e-3
  assert 0.0 <= rows["compacted_int8"]["same_class_as_keras"] <= 1.0
  assert all(r["latency_ms_median"] > 0 for r in check["rows"])
  client = next(d for d in os.listdir(os.path.join(run_dir, "tflite")) if d.startswith("client"))
  with open(os.path.join(run_dir, "tflite", client, "model_info.json")) as f:
    info = json.load(f)
  assert (info["input"]["name"], info["output"]["name"]) == ("image", "logits")
  assert len(info["labels"]) == 10 and info["input"]["scale"] == pytest.approx(1 / 255)
  # A float model that is not the client's, copied over it: refused (its checksum), naming it.
  folder = os.path.join(run_dir, "tflite")
  shutil.copyfile(os.path.join(folder, "baselines", "bnn.tflite"),
                  os.path.join(folder, client, "compacted_float32.tflite"))
  bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "compacted_float32" in bad.stderr


def check_compare_of_all_algorithms(out):
  """The README's compare command: every algorithm on one partition, bits as each algorithm sends them."""
  import csv
  from fedmask_tff.algorithms import ALGORITHMS
  with open(out / "partition.json") as f:
    partition = json.load(f)["clients"]
  with open(out / "comparison.csv") as f:
    rows = {r["algorithm"]: r for r in csv.DictReader(f)}
  assert list(rows) == list(ALGORITHMS)
  assert {"fedmask", "local_masks", "standalone", "fedavg", "topk", "bnn_fedavg", "per_fedavg",
          "lg_fedavg"} <= set(rows)
  for name in rows:
    with open(out / name / "results.json") as f:
      results = json.load(f)
    assert results["complete"] and results["algorithm"] == name
    with open(out / name / "partition.json") as f:
      assert json.load(f)["clients"] == partition
  for name in ("standalone", "local_masks"):
    assert float(rows[name]["uplink_bits_per_client_round"]) == 0.0
    assert float(rows[name]["downlink_bits_per_client_round"]) == 0.0
  with open(out / "fedavg" / "results.json") as f:
    params = json.load(f)["config"]["model_parameters"]
  assert float(rows["fedavg"]["downlink_bits_per_client_round"]) == 32 * params
  # BNN: 1 bit per weight, padded to whole bytes; Top-k (10 %): k float32 values + k int32 indices.
  assert float(rows["bnn_fedavg"]["uplink_bits_per_client_round"]) == 8 * -(-params // 8)
  assert float(rows["topk"]["uplink_bits_per_client_round"]) == 64 * max(1, round(0.1 * params))
  assert float(rows["fedmask"]["uplink_bits_per_client_round"]) < 2 * params
