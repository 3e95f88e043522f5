"""The package's floors: every import (function-local ones included) points down, never up or sideways.

Floors, lowest first; a unit is a module or a package of `srum_jax`. A module may import its own unit and the
units of lower floors; units on the same floor are siblings that never import each other. WORKSPACE.md draws
the same table. Function-local imports are kept for heavy optional dependencies only (`OPTIONAL`).
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "srum_jax"

FLOORS = (
    ("ground", ("errors", "paths", "distributed", "progress", "config_utils", "losses", "metrics", "worlds")),
    ("file formats", ("files",)),
    ("models", ("models",)),
    ("base", ("sharding", "tokenizer", "rewards", "viz", "flops", "workdir", "data", "config_checks")),
    ("core", ("training", "inference", "convert")),
    ("engine", ("engine", "evaluation")),
    ("stages", ("pipeline", "pretrain")),
    ("apps", ("config_validation", "defaults", "aot")),
    ("command line", ("cli",)),
    ("entry point", ("__main__",)),
)
FLOOR = {unit: i for i, (_, units) in enumerate(FLOORS) for unit in units}

# Modules a function may import where it needs them: heavy dependencies that most commands never touch.
OPTIONAL = ("torch", "torchvision", "transformers", "spacy", "tokamax", "jax.experimental.pallas.ops.tpu")


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    yield ".".join(parts), path


def _imports(name: str, path: pathlib.Path):
  """(line, imported module, inside a function) for every import statement of the module."""
  tree = ast.parse(path.read_text())
  local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
           for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
  package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name, id(node) in local
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
      for alias in node.names:
        yield node.lineno, f"{base}.{alias.name}" if base == "srum_jax" else base, id(node) in local


def _unit(module: str) -> str:
  return module.split(".")[1] if module.count(".") else module


def test_every_unit_has_a_floor():
  units = {_unit(name) for name, _ in _modules() if name != "srum_jax"}
  assert units <= set(FLOOR), f"units without a floor: {sorted(units - set(FLOOR))}"


def test_imports_point_down():
  bad = []
  for name, path in _modules():
    if name == "srum_jax":
      continue
    mine = _unit(name)
    for line, target, _ in _imports(name, path):
      if not target.startswith("srum_jax.") or _unit(target) == mine:
        continue
      theirs = _unit(target)
      if FLOOR[theirs] >= FLOOR[mine]:
        way = "sideways" if FLOOR[theirs] == FLOOR[mine] else "up"
        bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {mine} -> {theirs} ({way})")
  assert not bad, "imports that do not point down:\n" + "\n".join(bad)


def test_function_local_imports_are_optional_dependencies_only():
  bad = []
  for name, path in _modules():
    for line, target, local in _imports(name, path):
      if local and not any(target == m or target.startswith(m + ".") for m in OPTIONAL):
        bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {target}")
  assert not bad, "function-local imports of non-optional modules:\n" + "\n".join(bad)


def test_module_names_do_not_clash_and_modules_stay_short():
  seen, long = {}, []
  for name, path in _modules():
    stem = path.stem if path.name != "__init__.py" else None
    if stem and stem != "__main__":
      seen.setdefault(stem, []).append(name)
    lines = len(path.read_text().splitlines())
    if lines > 600:
      long.append(f"{name}: {lines} lines")
  clashes = {k: v for k, v in seen.items() if len(v) > 1}
  packages = {p.name for p in PACKAGE.rglob("*") if p.is_dir() and (p / "__init__.py").exists()}
  clashes.update({k: v for k, v in seen.items() if k in packages})
  assert not clashes, f"module names used twice: {clashes}"
  assert not long, f"modules over 600 lines: {long}"


@pytest.mark.parametrize("folder", ["srum_jax", "experiments", "benchmarks"])
def test_lines_fit_100_columns(folder):
  root = PACKAGE.parent / folder
  bad = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in sorted(root.rglob("*.py"))
         for i, line in enumerate(p.read_text().splitlines(), 1)
         if len(line) > 100 and "http" not in line and "|" not in line]
  assert not bad, f"{len(bad)} lines over 100 columns, e.g. {bad[:10]}"
