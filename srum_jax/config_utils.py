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


class ConfigFileError(ValueError):
  """A config file that cannot be used: it does not import, or its `get_config` / `get_sweep` is
  missing, raises or returns the wrong type. The message is one line naming the file and the error.
  """


def _describe(e: BaseException) -> str:
  """'SyntaxError: expected ':' (line 3)' / 'KeyError: 'x'': an exception in one line."""
  if isinstance(e, SyntaxError):
    return f"{type(e).__name__}: {e.msg} (line {e.lineno})"
  text = " ".join(str(e).split("\n", 1)[0].split())
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_config_module(path: str):
  """The config file as a module; a file that is missing, does not import, or defines no
  `get_config` raises (`FileNotFoundError`, `ConfigFileError`)."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"config file not found: {path}")
  name = f"srum_config_{p.stem}_{abs(hash(str(p.resolve())))}"
  spec = importlib.util.spec_from_file_location(name, p)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # any error of the user's file: SyntaxError, ImportError, NameError, ...
    raise ConfigFileError(f"config file {path} does not import: {_describe(e)}") from e
  if not callable(getattr(module, "get_config", None)):
    raise ConfigFileError(f"config file {path} defines no get_config(arg=None)")
  return module


def _call_with_arg(fn, arg):
  return fn(arg) if arg is not None else fn()


def _call(module, fn_name: str, path: str, arg: Optional[str]):
  """`module.<fn_name>(arg)`; whatever it raises becomes a `ConfigFileError` naming the file."""
  try:
    return _call_with_arg(getattr(module, fn_name), arg)
  except Exception as e:
    shown = "" if arg is None else repr(arg)
    raise ConfigFileError(f"config file {path}: {fn_name}({shown}) raised {_describe(e)}") from e


def config_from_module(module, path: str, arg: Optional[str]) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a loaded config file, checked to be a ConfigDict."""
  cfg = _call(module, "get_config", path, arg)
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigFileError(f"config file {path}: get_config returned {type(cfg).__name__}, not an "
                          f"ml_collections.ConfigDict (start from srum_jax.defaults.base_config())")
  return cfg


def load_config(spec: str, overrides: Optional[Dict[str, Any]] = None) -> ml_collections.ConfigDict:
  """Load a config file (with optional ':arg') and apply dotted-key overrides; unknown keys are errors."""
  path, arg = split_config_spec(spec)
  cfg = config_from_module(load_config_module(path), path, arg)
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
  """The points of the config file's `get_sweep(arg)`: a non-empty list of {dotted key: value},
  every key one the config has and every value one its field takes (else a `ConfigFileError` naming
  the point)."""
  path, arg = split_config_spec(spec)
  module = load_config_module(path)
  if not callable(getattr(module, "get_sweep", None)):
    raise ConfigFileError(f"config file {path} defines no get_sweep(arg=None): there is nothing to "
                          f"sweep (run the command itself instead)")
  points = _call(module, "get_sweep", path, arg)
  if (not isinstance(points, (list, tuple)) or not points
          or not all(isinstance(p, dict) for p in points)):
    raise ConfigFileError(f"config file {path}: get_sweep must return a non-empty list of dicts "
                          f"{{dotted key: value}}, not {type(points).__name__} {str(points)[:80]}")
  base = config_from_module(module, path, arg)
  for i, point in enumerate(points):  # every point before anything runs
    for key, value in point.items():
      try:
        if not isinstance(key, str):
          raise KeyError(f"key {key!r} is not a dotted string")
        set_dotted(base.copy_and_resolve_references(), key, value)
      except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigFileError(f"config file {path}: sweep point {i + 1} {point}: "
                              f"{_describe(e)}") from None
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
  base = workdir or load_config(spec).workdir
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
