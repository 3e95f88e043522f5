"""Experiment configs: load `experiments/<name>.py[:arg]`, apply overrides, expand sweeps.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict` and may define
`get_sweep(arg=None) -> list[dict]` (each dict maps dotted config keys to values), big_vision style.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import re
import shlex
import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple

import ml_collections


def split_config_spec(spec: str) -> Tuple[str, Optional[str]]:
  """'experiments/x.py:arg' -> ('experiments/x.py', 'arg')."""
  path, sep, arg = spec.partition(":")
  return path, (arg if sep else None)


def load_config_module(path: str):
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"config file not found: {path}")
  name = f"srum_config_{p.stem}_{abs(hash(str(p.resolve())))}"
  spec = importlib.util.spec_from_file_location(name, p)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"{path} defines no get_config(arg=None)")
  return module


def _call_with_arg(fn, arg):
  return fn(arg) if arg is not None else fn()


def load_config(spec: str, overrides: Optional[Dict[str, Any]] = None) -> ml_collections.ConfigDict:
  """Load a config file (with optional ':arg') and apply dotted-key overrides; unknown keys are errors."""
  path, arg = split_config_spec(spec)
  cfg = _call_with_arg(load_config_module(path).get_config, arg)
  for key, value in (overrides or {}).items():
    set_dotted(cfg, key, value)
  return cfg


def literal(text: str) -> Any:
  """A command-line value: a Python literal when it parses as one ("1e-4", "True", "(0, 1)"), else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_overrides(pairs: Iterable[str]) -> Dict[str, Any]:
  """["a.b=v", ...] (scripts' `--set` flags) -> {"a.b": literal(v)}; raises ValueError on a pair without '='."""
  out = {}
  for kv in pairs:
    key, sep, value = kv.partition("=")
    if not sep or not key:
      raise ValueError(f"override {kv!r} is not key=value")
    out[key] = literal(value)
  return out


def set_dotted(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """cfg['a.b.c'] = value, failing clearly on keys the config does not have."""
  *parents, leaf = key.split(".")
  node = cfg
  for i, part in enumerate(parents):
    if part not in node:
      raise KeyError(f"config has no key {'.'.join(parents[:i + 1])!r} (while setting {key!r})")
    node = node[part]
  if leaf not in node:
    raise KeyError(f"config has no key {key!r}")
  with node.unlocked() if hasattr(node, "unlocked") else _nullcontext():
    node[leaf] = value


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def get_sweep(spec: str) -> List[Dict[str, Any]]:
  path, arg = split_config_spec(spec)
  module = load_config_module(path)
  if not hasattr(module, "get_sweep"):
    raise AttributeError(f"{path} defines no get_sweep()")
  points = list(_call_with_arg(module.get_sweep, arg))
  base = _call_with_arg(module.get_config, arg)
  for point in points:  # validate every point before anything runs
    for key, value in point.items():
      set_dotted(base.copy_and_resolve_references(), key, value)
  return points


def format_override(key: str, value: Any) -> str:
  if isinstance(value, (list, tuple)):
    value = "(" + ",".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return f"--config.{key}={value}"


def point_name(index: int, point: Dict[str, Any]) -> str:
  """A readable, file-name-safe name of a sweep point: its index and its key=value pairs."""
  pairs = ",".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
  return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9._=,+-]+", "_", pairs)[:100]


def sweep_commands(spec: str, subcommand: str, extra: Iterable[str] = (), workdir: Optional[str] = None,
                   overrides: Iterable[str] = ()) -> List[List[str]]:
  """One argv per sweep point: python -m srum_jax <subcommand> --config=<spec> <overrides> --config.k=v ...
  --config.workdir=<workdir>/<point name> <extra> (default workdir: the config's), so points never share
  outputs; a point's values win over `overrides` (given first)."""
  path, arg = split_config_spec(spec)
  base = workdir or _call_with_arg(load_config_module(path).get_config, arg).workdir
  cmds = []
  for i, point in enumerate(get_sweep(spec)):
    argv = [sys.executable, "-m", "srum_jax", subcommand, f"--config={spec}", *overrides]
    argv += [format_override(k, v) for k, v in point.items() if k != "workdir"]
    argv += [f"--config.workdir={os.path.join(base, point_name(i, point))}"]
    argv += list(extra)
    cmds.append(argv)
  return cmds


def shell_line(argv: List[str]) -> str:
  return " ".join(shlex.quote(a) for a in argv)
