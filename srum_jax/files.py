"""Whole files in the formats the project writes and reads: JSON, PNG, RGB images; local or remote (`paths`).

Every write goes through `paths.write_bytes` (the one atomic-write mechanism: a temporary name then a rename
locally, one whole object remotely), so a crash never leaves a torn file under its final name. Every JSON
read goes through `read_json`, whose failures name the file (a `UserValueError`, not a traceback).
"""
from __future__ import annotations

import io
import json
import pathlib
from typing import Any, Optional, Tuple

import numpy as np
from PIL import Image

from srum_jax import paths
from srum_jax.errors import UserValueError


def read_json(path, what: str = "JSON file") -> Any:
  """A JSON file's content; a file that is not UTF-8 JSON raises a `UserValueError` naming the file."""
  try:
    return json.loads(paths.path(path).read_bytes().decode("utf-8"))  # local or remote (gs://)
  except UnicodeDecodeError as e:
    raise UserValueError(f"{what} {path}: not UTF-8 text (byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise UserValueError(f"{what} {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def read_json_if_present(path, what: str = "JSON file") -> Optional[Any]:
  """`read_json`, or None when `path` does not exist."""
  return read_json(path, what) if paths.path(path).exists() else None


def write_json(path, obj: Any) -> None:
  """`obj` as indented JSON, written atomically (`paths.write_bytes`)."""
  paths.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=float).encode("utf-8"))


def save_png(path, image) -> str:
  """A PIL image or a uint8 array as PNG, written atomically (`paths.write_bytes`); returns `path`."""
  if not isinstance(image, Image.Image):
    image = Image.fromarray(np.asarray(image, np.uint8))
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  paths.write_bytes(path, buf.getvalue())
  return str(path)


def load_rgb(path) -> Tuple[Optional[np.ndarray], Optional[str]]:
  """(uint8 HWC image, None) or (None, reason) for a missing or corrupt file."""
  try:
    with Image.open(paths.readable(path)) as im:
      return np.asarray(im.convert("RGB")), None
  except FileNotFoundError:
    return None, "missing"
  except Exception as e:  # corrupt / truncated / not an image
    return None, f"corrupt ({type(e).__name__})"


def image_problem(path) -> Optional[str]:
  """None when `path` is an image file that reads whole, else why not ('missing', 'corrupt (...)'):
  PIL's `verify` (PNG: every chunk's checksum, no decoding: about a millisecond for a 2 MB file)."""
  try:
    with Image.open(paths.readable(path)) as im:
      im.verify()
    return None
  except FileNotFoundError:
    return "missing"
  except Exception as e:  # corrupt / truncated / not an image / a folder
    return f"corrupt ({type(e).__name__})"


def dir_size(path) -> int:
  """Bytes of every file under a local folder."""
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())
