"""The package's import graph: every module on a floor, no import from a lower floor up to a
higher one, no cycle. A small AST check of mmpg_jax's own imports (function-local ones too).

A new module gets a floor in FLOORS (the first matching prefix wins); WORKSPACE.md's layout
diagram shows the same floors.
"""
import ast
import pathlib

import pytest
from conftest import ROOT

PACKAGE = pathlib.Path(ROOT) / "mmpg_jax"

# (module prefix, floor), most specific first. A module may import its own floor or below.
FLOORS = (
    # 0 foundations: no knowledge of tasks, models or methods
    ("mmpg_jax.core", 0),
    ("mmpg_jax.reporting.formats", 0), ("mmpg_jax.reporting.stats", 0),
    ("mmpg_jax.reporting.comparisons", 0), ("mmpg_jax.reporting.frontier", 0),
    ("mmpg_jax.reporting.tables", 0), ("mmpg_jax.reporting.plots", 0),
    # 1 data, models and the device primitives every method uses
    ("mmpg_jax.data", 1), ("mmpg_jax.models", 1),
    # 2 tasks, and device costs measured on a task's model
    ("mmpg_jax.tasks", 2), ("mmpg_jax.ondevice.costs", 2),
    ("mmpg_jax.ondevice", 1),            # device, adr
    # 3 what every method and stage is written against
    ("mmpg_jax.training", 3),
    # 4 hypernetwork libraries shared by several method families; the deployment studies run
    # on any family's methods (written against Method and the evaluator, never a family)
    ("mmpg_jax.fda", 4), ("mmpg_jax.deploy", 4),
    # 5 method families (a family never imports another: see test below)
    ("mmpg_jax.adapt", 5),
    # 6 run level: the report, tables over runs, the entry points
    ("mmpg_jax.reporting.report", 6), ("mmpg_jax.reporting.results", 6),
    ("mmpg_jax.reporting.sections", 6), ("mmpg_jax.reporting.deploy_sections", 6),
    ("mmpg_jax.reporting.aggregate", 6), ("mmpg_jax.reporting.aggregate_deploy", 6),
    ("mmpg_jax.main", 6), ("mmpg_jax.generate", 6), ("mmpg_jax.bench", 6),
    ("mmpg_jax.bench_timing", 6),
    ("mmpg_jax.reporting", 0),           # the reporting package's own __init__ (imports nothing)
    ("mmpg_jax", 0),                     # the package's own __init__
)
# Method families: modules under adapt/ (a package counts as one family).
FAMILIES = {"baselines": ("baselines",), "global_meta": ("global_meta",), "tta": ("tta",),
            "cdc_mmpg": ("cdc_mmpg", "cdc_mmpg_report"),
            "cdc_robust": ("cdc_robust",), "persona": ("persona",)}


def module_name(path: pathlib.Path, package=PACKAGE) -> str:
  parts = path.relative_to(package.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package=PACKAGE) -> dict:
  return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def imports(path: pathlib.Path, known, package=PACKAGE) -> set:
  """The package modules `path` imports (an imported name that is a module counts as that
  module, `from mmpg_jax import x` as mmpg_jax.x)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
    for n in names:
      while n and n not in known:
        n = n.rpartition(".")[0]
      if n.startswith("mmpg_jax") and n != "mmpg_jax":
        out.add(n)
  return out - {module_name(path, package)}


def floor(module: str) -> int:
  for prefix, f in FLOORS:
    if module == prefix or module.startswith(prefix + "."):
      return f
  raise KeyError(module)


def family(module: str):
  parts = module.split(".")
  if len(parts) < 3 or parts[1] != "adapt":
    return None
  return next((f for f, mods in FAMILIES.items() if parts[2] in mods), parts[2])


def problems(package=PACKAGE) -> list:
  """Every layering fault of the package: unplaced modules, upward imports, imports between
  method families, cycles."""
  mods = modules(package)
  graph = {m: imports(p, mods, package) for m, p in mods.items()}
  out = []
  for m, deps in sorted(graph.items()):
    try:
      fm = floor(m)
    except KeyError:
      out.append(f"{m} has no floor: add it to FLOORS in tests/test_layers.py")
      continue
    for d in sorted(deps):
      if floor(d) > fm:
        out.append(f"{m} (floor {fm}) imports {d} (floor {floor(d)}): an upward import")
      if family(m) and family(d) and family(m) != family(d):
        out.append(f"{m} imports {d}: method families never import each other")
  # cycles: depth-first search with colours
  state, stack = {}, []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == 1:
        out.append("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)
  return out


def test_the_package_has_no_upward_import_and_no_cycle():
  assert problems() == []


def _copy_package(tmp_path):
  import shutil
  dst = tmp_path / "mmpg_jax"
  shutil.copytree(PACKAGE, dst, ignore=shutil.ignore_patterns("__pycache__"))
  return dst


@pytest.mark.parametrize("module,line,expect", [
    ("core/params.py", "from mmpg_jax import tasks", "an upward import"),        # floor 0 -> 2
    ("tasks/base.py", "from mmpg_jax.training import config_checks", "an upward import"),
    ("adapt/cdc_robust/variants.py", "from mmpg_jax.adapt import cdc_mmpg",
     "never import each other"),
    ("fda/model.py", "from mmpg_jax.fda import stage", "import cycle"),
])
def test_a_planted_fault_is_found(tmp_path, module, line, expect):
  """The check's positive control: an upward import, a family reaching into another, and a
  cycle planted in a copy of the package are each reported."""
  pkg = _copy_package(tmp_path)
  path = pkg / module
  path.write_text(line + "\n" + path.read_text())
  found = problems(pkg)
  assert any(expect in p for p in found), found
