"""The package's layering, read from the source: commands sit above the library, the demo above
curation, and no two subpackages import each other (function-local imports included, since a cycle
hidden inside a function is still a cycle)."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mrm_jax"


def _modules() -> dict[str, Path]:
  mods = {}
  for f in sorted(PACKAGE.rglob("*.py")):
    parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
    mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
  return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The project module an import statement loads (`mrm_jax.io.write_json` -> `mrm_jax.io`)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(path: Path) -> list[tuple[str, bool]]:
  """(imported project module, at module top level) for every import statement of a file."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  top = {id(node) for node in tree.body}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      target = _resolve(name) if name.startswith("mrm_jax") else None
      if target:
        found.append((target, id(node) in top))
  return found


GRAPH = {m: _imports(f) for m, f in MODULES.items()}


def _unit(module: str) -> str:
  """Subpackage (`mrm_jax.curate`) or top-level module (`mrm_jax.io`) a module belongs to."""
  return ".".join(module.split(".")[:2])


def _importers_of(prefix: str) -> set[str]:
  return {
    m for m, deps in GRAPH.items() for d, _ in deps if d == prefix or d.startswith(prefix + ".")
  }


def test_the_graph_is_read():
  assert len(MODULES) > 40
  assert ("mrm_jax.commands.score", True) not in GRAPH[
    "mrm_jax.cli"
  ]  # cli.py loads commands by name
  assert ("mrm_jax.train.loop", True) in GRAPH["mrm_jax.loading"]


def test_only_the_command_layer_imports_commands():
  bad = {
    m
    for m in _importers_of("mrm_jax.commands") | _importers_of("mrm_jax.cli")
    if not (m == "mrm_jax.cli" or m.startswith("mrm_jax.commands"))
  }
  assert not bad, f"library modules importing the command layer: {sorted(bad)}"


def test_only_commands_import_the_demo():
  bad = {
    m
    for m in _importers_of("mrm_jax.demo")
    if not (m.startswith("mrm_jax.demo") or m.startswith("mrm_jax.commands"))
  }
  assert not bad, f"library modules importing mrm_jax.demo: {sorted(bad)}"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one member (Tarjan)."""
  index, low, stack, on, cycles = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        cycles.append(sorted(comp))

  for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
    if v not in index:
      visit(v)
  return cycles


def test_cycle_finder_finds_cycles():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_two_subpackages_import_each_other():
  units = collections.defaultdict(set)
  for m, deps in GRAPH.items():
    for d, _ in deps:
      if _unit(d) != _unit(m):
        units[_unit(m)].add(_unit(d))
  cycles = _cycles(units)
  detail = [
    [
      f"{m} -> {d}"
      for m, deps in GRAPH.items()
      for d, _ in deps
      if _unit(m) in c and _unit(d) in c and _unit(m) != _unit(d)
    ]
    for c in cycles
  ]
  assert not cycles, f"import cycles between parts of the package: {detail}"


def test_no_module_imports_itself_back_at_import_time():
  edges = {m: {d for d, top in deps if top} for m, deps in GRAPH.items()}
  assert not _cycles(edges), f"import-time cycles: {_cycles(edges)}"
