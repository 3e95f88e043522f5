"""Where training's reward records come from: this project's JSONL, SRUM's formatted JSONL, or a
downloaded folder of SRUM's released training data; which format a file holds, where its images are.

    fmt = detect_format("rewards.jsonl")            # "srum_jax" | "official"
    records, report = read("rewards.jsonl", fmt)    # bad lines skipped, listed in the report
    src = resolve("SRUM_6k_CompBench_Train")        # a folder: its formatted JSONL and image folder
    src.path, src.images_root, src.format

Formats, told apart by the first JSON object of the file:
* `srum_jax`: this project's schema (`records.record_from_dict`: a `schema_version` field);
* `official`: what SRUM's `srum_data_infer/vlm_format_output.py` writes (`bad_image_file`,
  `vlm_rewards`; `records.from_official`), the file SRUM's `data/regional_reward_dataset.py` trains
  on. The raw output of SRUM's scoring script (`srum_data_infer/vlm.py`: `image_file`,
  `global_layout_reward`) is recognised only to say that it needs SRUM's formatting step first.

A folder (SRUM's released CompBench training set as downloaded, or the output folder of SRUM's own
data scripts) is searched down to `SEARCH_DEPTH` levels: it must hold exactly one formatted JSONL;
the images root is the folder below it that holds most of the files the records name (SRUM's layout:
the formatted JSONL beside the folder of generated images, `data/dataset_info.py`'s `comp_data`),
unless given. Images only inside an archive are reported with the archive's name. Every failure is a
`UserError` naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import List, Optional, Tuple

from srum_jax import paths
from srum_jax.errors import UserFileNotFoundError, UserValueError
from srum_jax.rewards import records as records_lib

__all__ = ["RECORD_FORMATS", "RecordSource", "detect_format", "read", "resolve"]

RECORD_FORMATS = ("auto", "srum_jax", "official")  # `train.records_format`
SEARCH_DEPTH = 3  # folder levels searched below a records folder
_PROBE_LINES = 50  # lines read to tell a file's format
_PROBE_IMAGES = 64  # image names looked up to find the images root
_ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.zst")


@dataclasses.dataclass(frozen=True)
class RecordSource:
  """A records file, the folder its image paths are relative to, its format, and how they were
  found."""
  path: str
  images_root: str
  format: str
  found: str = ""


def _first_object(path: str) -> Optional[dict]:
  """The first line of `path` (among the first `_PROBE_LINES`) that decodes to a JSON object, else
  None."""
  with paths.path(path).open("rb") as f:
    for _ in range(_PROBE_LINES):
      raw = f.readline()
      if not raw:
        return None
      try:
        obj = json.loads(raw.decode("utf-8"))
      except (ValueError, RecursionError):  # a torn or garbled line: the readers count it
        continue
      if isinstance(obj, dict):
        return obj
  return None


def _kind(obj: Optional[dict]) -> str:
  """srum_jax | official | raw (SRUM's unformatted scores) | "" (not a records file)."""
  if not obj:
    return ""
  if "schema_version" in obj:
    return "srum_jax"
  if "bad_image_file" in obj and "vlm_rewards" in obj:
    return "official"
  if "image_file" in obj and "vlm_rewards" in obj and "global_layout_reward" in obj:
    return "raw"
  return ""


def _raw_error(path: str) -> UserValueError:
  return UserValueError(
      f"{path} is the raw output of SRUM's srum_data_infer/vlm.py (image_file, "
      f"global_layout_reward); SRUM trains on it after srum_data_infer/vlm_format_output.py "
      f"(as its vlm.sh does): format it and set train.records to the formatted file")


def detect_format(path: str, default: Optional[str] = None) -> str:
  """"srum_jax" or "official" from the file's first JSON object; otherwise `default` when given (a file of
  bad lines is then read, and its lines counted, as that format), else a `UserValueError`."""
  kind = _kind(_first_object(path))
  if kind in ("srum_jax", "official"):
    return kind
  if default is not None:
    return default
  if kind == "raw":
    raise _raw_error(path)
  if not kind:
    raise UserValueError(
        f"train.records {path}: no line of its first {_PROBE_LINES} is a reward record of a known "
        f"format (this project's schema with schema_version, or SRUM's formatted JSONL with "
        f"bad_image_file and vlm_rewards); set train.records_format to read it as one of them")
  return kind


def read(path: str, fmt: str) -> Tuple[list, records_lib.ReadReport]:
  """Every record of `path` read as `fmt` (srum_jax | official); bad lines skipped and listed."""
  if fmt == "official":
    return records_lib.read_official_records(path)
  if fmt == "srum_jax":
    return records_lib.read_records(path)
  raise ValueError(f"records format {fmt!r}; choose srum_jax or official")


def _walk(root: str, depth: int):
  """(folder, [file names]) for `root` and its sub-folders down to `depth` levels (hidden ones
  skipped)."""
  todo = [(paths.path(root), 0)]
  while todo:
    folder, level = todo.pop(0)
    try:
      entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError:
      continue
    yield str(folder), [p.name for p in entries if not p.is_dir()]
    if level < depth:
      todo += [(p, level + 1) for p in entries if p.is_dir() and not p.name.startswith(".")]


def _records_in(folder: str) -> Tuple[List[str], List[str]]:
  """(formatted or own records files, raw score files) under `folder`."""
  found, raw = [], []
  for d, names in _walk(folder, SEARCH_DEPTH):
    for n in names:
      if n.endswith(".jsonl"):
        f = os.path.join(d, n)
        kind = _kind(_first_object(f))
        if kind == "raw":
          raw.append(f)
        elif kind:
          found.append(f)
  return found, raw


def _image_names(path: str, fmt: str) -> List[str]:
  records, _ = read(path, fmt)
  names = []
  for r in records:
    if r.image_file not in names:
      names.append(r.image_file)
    if len(names) >= _PROBE_IMAGES:
      break
  return names


def find_images_root(records_path: str, search_root: str, fmt: str) -> str:
  """The folder under `search_root` (the records' own folder first) holding most of the first image
  files the records name; a `UserFileNotFoundError` when none holds any (naming an archive when one
  is there)."""
  names = _image_names(records_path, fmt)
  if not names:
    return os.path.dirname(records_path)
  folders = [os.path.dirname(records_path)] + [d for d, _ in _walk(search_root, SEARCH_DEPTH)]
  best, hits = "", 0
  for d in folders:
    n = sum(paths.path(os.path.join(d, name)).is_file() for name in names)
    if n > hits:
      best, hits = d, n
  if hits:
    return best
  archives = [os.path.join(d, n) for d, files in _walk(search_root, SEARCH_DEPTH) for n in files
              if n.lower().endswith(_ARCHIVES)]
  if archives:
    raise UserFileNotFoundError(
        f"train.records {records_path}: its images (e.g. {names[0]!r}) are in no folder under "
        f"{search_root}, which holds the archive {archives[0]}: extract it there, or set "
        f"train.images_root")
  raise UserFileNotFoundError(
      f"train.records {records_path}: none of the images it names (e.g. {names[0]!r}) is under "
      f"{search_root} or its sub-folders; set train.images_root to the generated images' folder")


def resolve(records: str, images_root: str = "", records_format: str = "auto") -> RecordSource:
  """The records file, images root and format that `train.records` / `train.images_root` /
  `train.records_format` name (module docstring). A file keeps its own folder as the images root for
  this project's schema; SRUM's formatted files and folders are searched for their images."""
  if records_format not in RECORD_FORMATS:
    raise UserValueError(f"config key train.records_format={records_format!r}: must be one of "
                         f"{', '.join(RECORD_FORMATS)}")
  p = paths.path(records)
  found = "file"
  if p.is_dir():
    candidates, raw = _records_in(records)
    if not candidates:
      if raw:
        raise _raw_error(raw[0])
      raise UserFileNotFoundError(f"config key train.records={records!r}: no reward records JSONL "
                                  f"(SRUM's formatted file or this project's) under this folder")
    if len(candidates) > 1:
      raise UserValueError(f"config key train.records={records!r}: several reward records files "
                           f"under this folder ({', '.join(candidates[:4])}); name one")
    path, search_root, found = candidates[0], records, "folder"
  elif p.is_file():
    path, search_root = records, os.path.dirname(records)
  else:
    raise UserFileNotFoundError(f"config key train.records={records!r}: no such file or folder")
  fmt = detect_format(path) if records_format == "auto" else records_format
  if images_root:
    root = images_root
  elif fmt == "official":
    root = find_images_root(path, search_root, fmt)
  else:
    root = os.path.dirname(paths.abspath(path))
  return RecordSource(path=path, images_root=root, format=fmt, found=found)
