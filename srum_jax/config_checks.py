"""Value checks of config keys, for `config_validation`: each returns the checked value or raises
one `UserValueError` / `UserFileNotFoundError` line naming the key and what would work.

    check_int(config, "train.steps", lo=1); check_enum(config, "score.mode", ("generate", "logits"))
"""
from __future__ import annotations

import difflib
import math
import os
from typing import Any, Optional, Sequence

from srum_jax import paths
from srum_jax.errors import UserFileNotFoundError, UserValueError


def fail(key: str, value: Any, why: str) -> None:
  raise UserValueError(f"config key {key}={value!r}: {why}")


def config_value(config, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def check_int(config, key: str, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
  v = config_value(config, key)
  if isinstance(v, bool) or not isinstance(v, int):
    fail(key, v, f"must be an integer, not {type(v).__name__}")
  if lo is not None and v < lo:
    fail(key, v, f"must be >= {lo}")
  if hi is not None and v > hi:
    fail(key, v, f"must be <= {hi}")
  return v


def check_float(config, key: str, lo: Optional[float] = None, hi: Optional[float] = None, *,
           lo_open: bool = False, hi_open: bool = False) -> float:
  v = config_value(config, key)
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    fail(key, v, f"must be a number, not {type(v).__name__}")
  v = float(v)
  if not math.isfinite(v):
    fail(key, v, "must be finite")
  if lo is not None and (v <= lo if lo_open else v < lo):
    fail(key, v, f"must be {'>' if lo_open else '>='} {lo}")
  if hi is not None and (v >= hi if hi_open else v > hi):
    fail(key, v, f"must be {'<' if hi_open else '<='} {hi}")
  return v


def check_bool(config, key: str) -> bool:
  v = config_value(config, key)
  if not isinstance(v, bool):
    fail(key, v, "must be True or False")
  return v


def check_enum(config, key: str, choices: Sequence[str]) -> str:
  return check_value_in(key, config_value(config, key), choices)


def check_value_in(key: str, v: Any, choices: Sequence[str]) -> str:
  """`v` (the value of `key`) is a string among `choices`."""
  if not isinstance(v, str) or v not in choices:
    hint = difflib.get_close_matches(str(v), [c for c in choices if c], n=1)
    fail(key, v, f"must be one of {', '.join(repr(c) for c in choices)}"
          + (f" (did you mean {hint[0]!r}?)" if hint else ""))
  return v


def check_subset(config, key: str, choices: Sequence[str]) -> tuple:
  """A tuple of names, each one of `choices`."""
  v = config_value(config, key)
  if isinstance(v, str) or not isinstance(v, Sequence):
    fail(key, v, f"must be a tuple of names from {', '.join(choices)}, e.g. ('vit','ae')")
  for name in v:
    if name not in choices:
      hint = difflib.get_close_matches(str(name), choices, n=1)
      fail(key, tuple(v), f"{name!r} is not one of {', '.join(choices)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else ""))
  return tuple(v)


def check_pair(config, key: str, kind=float) -> tuple:
  v = config_value(config, key)
  if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != 2:
    fail(key, v, f"must be a pair of {'integers' if kind is int else 'numbers'}, e.g. "
          + ("--config." + key + "=(32,32)" if kind is int else "(0.4,1.0)"))
  for x in v:
    if isinstance(x, bool) or not isinstance(x, (int,) if kind is int else (int, float)):
      fail(key, v, f"must be a pair of {'integers' if kind is int else 'numbers'}")
  return tuple(kind(x) for x in v)


def existing_file(key: str, path: str, what: str):
  if not isinstance(path, str):
    fail(key, path, f"must be the path of the {what} (a string)")
  p = paths.path(os.path.expanduser(path))  # pathlib.Path, or etils.epath.Path for gs://
  if not p.is_file():
    why = "is a folder, not a file" if p.exists() else "does not exist"
    raise UserFileNotFoundError(f"config key {key}: {what} {path!r} {why}")
  return p


def existing_dir(key: str, path: str, what: str):
  if not isinstance(path, str):
    fail(key, path, f"must be the path of the {what} (a string)")
  p = paths.path(os.path.expanduser(path))  # pathlib.Path, or etils.epath.Path for gs://
  if not p.is_dir():
    why = "is a file, not a directory" if p.exists() else "does not exist"
    raise UserFileNotFoundError(f"config key {key}: {what} {path!r} {why}")
  return p
