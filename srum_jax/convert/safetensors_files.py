"""safetensors files read without trusting them: the header checked against the file's size
(`read_header`: every tensor's bytes inside the file), block reads of one tensor's slice
(`SafetensorsReader`), the dtype names the converters accept, and the errors a user's damaged or
mismatched checkpoint raises (one line first, then every problem).
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Dict, List, Sequence, Tuple

import jax.numpy as jnp
import ml_dtypes  # registers bfloat16 with numpy, which safetensors' numpy reader needs
import numpy as np
from safetensors import safe_open

from srum_jax.errors import UserValueError

ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
ST_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1
}
DTYPE_NAMES = {
    "bf16": jnp.bfloat16,
    "bfloat16": jnp.bfloat16,
    "fp32": jnp.float32,
    "f32": jnp.float32,
    "float32": jnp.float32,
    "fp16": jnp.float16,
    "f16": jnp.float16,
    "float16": jnp.float16
}


class CheckpointMismatchError(UserValueError):
  """The official files do not match the layout the configuration implies (its first line says what;
  the lines after it list every problem)."""


class DamagedFileError(CheckpointMismatchError):
  """A safetensors file whose header or byte ranges do not hold together: 'file damaged: <path>:
  <why>'."""


class NonFiniteWeightsError(UserValueError):
  """Official tensors holding NaN or inf: converting them would hand every later stage broken
  weights."""


def parse_dtype(dtype) -> np.dtype:
  if isinstance(dtype, str):
    if dtype.lower() not in DTYPE_NAMES:
      raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_NAMES)}")
    dtype = DTYPE_NAMES[dtype.lower()]
  return np.dtype(dtype)


def problem_listing(title: str, lines: Sequence[str]) -> str:
  """'title:' and one indented line per item: one problem of a `CheckpointMismatchError`."""
  return "\n".join([title + ":"] + [f"    {x}" for x in lines])


def read_header(path: str) -> Tuple[Dict[str, Tuple[str, Tuple[int, ...]]], List[str]]:
  """({key: (dtype, shape)}, problems) from a safetensors header, checking every tensor lies in the
  file.

  A truncated file keeps its header, so the tensors whose bytes run past the end are named one by
  one.
  """
  size = os.path.getsize(path)
  name = os.path.basename(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      return {}, [f"{name}: file too short ({size} bytes) to be safetensors"]
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
      return {}, [
          f"{name}: header of {n} bytes runs past the end of the file ({size} bytes): truncated"
      ]
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      return {}, [f"{name}: unreadable safetensors header ({e})"]
  data_size = size - 8 - n
  out, truncated, corrupt = {}, [], []
  for key, info in header.items():
    if key == "__metadata__":
      continue
    dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    out[key] = (dtype, shape)
    if end > data_size:
      truncated.append(key)
    elif end - begin != math.prod(shape) * ST_ITEMSIZE.get(dtype, 0):
      corrupt.append(f"{key} ({dtype} {list(shape)} but {end - begin} bytes)")
  problems = []
  if truncated:
    problems.append(
        problem_listing(
            f"{name}: {len(truncated)} truncated keys (data past the end of the "
            f"{size}-byte file)", sorted(truncated)))
  if corrupt:
    problems.append(
        problem_listing(f"{name}: {len(corrupt)} keys whose byte range does not match their shape",
                 sorted(corrupt)))
  return out, problems


def raise_damaged(path: str, problems: Sequence[str]) -> None:
  """`DamagedFileError` for `read_header`'s problems of the file at `path` (each starts with its
  name)."""
  if problems:
    text = "\n".join(problems)
    raise DamagedFileError(f"file damaged: {path}: {text[len(os.path.basename(path)) + 2:]}")


class SafetensorsReader:
  """Reads blocks of named tensors from one safetensors file (memory-mapped; only the block is
  copied)."""

  def __init__(self, path: str):
    self.path = path
    self._file = None

  def __enter__(self):
    self._ctx = safe_open(self.path, framework="np")
    self._file = self._ctx.__enter__()
    return self

  def __exit__(self, *exc):
    self._file = None
    return self._ctx.__exit__(*exc)

  def read(self, key: str, index: Tuple[slice, ...]) -> np.ndarray:
    """The block `tensor[index]` of tensor `key` (official layout)."""
    return self._file.get_slice(key)[tuple(index)]

  def read_all(self, key: str) -> np.ndarray:
    return self._file.get_tensor(key)
