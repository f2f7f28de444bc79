"""The library's shape, as docs/architecture.md states it: layers that import only the layers
before them, no import cycles, no function over 80 lines, no private helper used from another
package. Read from the source (ast), nothing imported."""

from __future__ import annotations

import ast
import os

from helpers import ROOT

# docs/architecture.md: each layer may import the layers before it; runtime and data only the
# harness imports.
LAYERS = ("wire", "masks", "models", "algorithms", "simulation")
BESIDE = ("runtime", "data")
MAX_FUNCTION_LINES = 80
PACKAGES = ("fedmask_tff", "experiments", "tflite", "benchmarks")


def _modules() -> dict[str, str]:
  """Dotted module name -> path, for every module of the library and its tools."""
  found = {}
  for package in PACKAGES:
    for directory, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(directory, name)
          dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          found[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
  return found


MODULES = _modules()
TREES = {name: ast.parse(open(path).read()) for name, path in MODULES.items()}


def _imports(module: str) -> list[tuple[str, str]]:
  """``(imported module, imported name)`` pairs of ``module`` (library modules only)."""
  out = []
  for node in ast.walk(TREES[module]):
    if isinstance(node, ast.Import):
      out += [(a.name, "") for a in node.names if a.name in MODULES]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        if full in MODULES:
          out.append((full, ""))
        elif node.module in MODULES:
          out.append((node.module, alias.name))
  return out


def _layer(module: str) -> str:
  parts = module.split(".")
  return parts[1] if parts[0] == "fedmask_tff" and len(parts) > 1 else parts[0]


def test_layers_import_only_the_layers_before_them():
  wrong = []
  for module in MODULES:
    if not module.startswith("fedmask_tff.") or _layer(module) not in LAYERS + BESIDE:
      continue
    own = _layer(module)
    allowed = set(LAYERS[:LAYERS.index(own) + 1]) if own in LAYERS else {own}
    if own == "simulation":
      allowed |= set(BESIDE)
    for target, _ in _imports(module):
      if target.startswith("fedmask_tff.") and _layer(target) not in allowed:
        wrong.append(f"{module} imports {target}")
  assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
  graph = {m: {t for t, _ in _imports(m)
               if not (t in m.split(".")[:-1] or m.startswith(t + "."))}  # a package's own __init__
           for m in MODULES}
  seen, on_path, cycles = set(), [], []

  def visit(node):
    if node in on_path:
      cycles.append(on_path[on_path.index(node):] + [node])
      return
    if node in seen:
      return
    seen.add(node)
    on_path.append(node)
    for nxt in sorted(graph.get(node, ())):
      visit(nxt)
    on_path.pop()

  for module in sorted(graph):
    visit(module)
  assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_function_over_80_lines():
  long = [f"{module}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
          for module, tree in TREES.items() for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long, "\n".join(long)


def _module_aliases(module: str) -> dict[str, str]:
  """Local names bound to library modules in ``module`` (``from a import b [as c]``)."""
  aliases = {}
  for node in ast.walk(TREES[module]):
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        if f"{node.module}.{alias.name}" in MODULES:
          aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.asname and alias.name in MODULES:
          aliases[alias.asname] = alias.name
  return aliases


def test_no_private_helper_used_from_another_package():
  wrong = []
  for module in MODULES:
    package = module.rsplit(".", 1)[0]
    for target, name in _imports(module):
      if name.startswith("_") and not target.startswith(package):
        wrong.append(f"{module} imports {target}.{name}")
    aliases = _module_aliases(module)
    for node in ast.walk(TREES[module]):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.attr.startswith("_") and not node.attr.startswith("__")
          and node.value.id in aliases and not aliases[node.value.id].startswith(package)):
        wrong.append(f"{module} uses {aliases[node.value.id]}.{node.attr}")
  assert not wrong, "\n".join(sorted(set(wrong)))


def test_the_checks_can_fail():
  """The checks above see what they look for (so that passing them means something)."""
  assert len(MODULES) > 50 and "fedmask_tff.simulation.runner" in MODULES
  assert "fedmask_tff.simulation.reporting" in {t for t, _ in _imports("fedmask_tff.simulation.runner")}
  assert _module_aliases("fedmask_tff.simulation.runner")["reporting"] == "fedmask_tff.simulation.reporting"
  assert _layer("fedmask_tff.masks.layers") == "masks" and _layer("tflite.export") == "tflite"
