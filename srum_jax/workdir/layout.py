"""The names, row schemas and readers of the stages' outputs in a workdir: what one stage writes and
the next one reads.

    generate/images/<image_file_name(id)>   generate/metadata[.<process>].jsonl   (`read_metadata`)
    propose/regions[.<process>].jsonl                                           (`read_regions`)
    score/rewards.jsonl, stats.json          train/   eval/<name>/ (judgments, metrics/<metric>)

A reader returns one row per item id (every process's log merged, in the prompt set's order) and
counts what it skipped in a `logs.LogReport`: a row whose fields do not have the types of its schema
(`"correct": "false"`, a NaN score, an id that is not a string) is skipped like a garbled line, and
its item is made again.
"""
from __future__ import annotations

import hashlib
import re
from typing import Dict, List, Optional

from srum_jax import paths
from srum_jax.workdir.logs import (Field, LogReport, Schema, is_bool, is_int, is_number, is_str,
                                   or_none, read_rows)


def stable_int(text: str, bits: int = 31) -> int:
  """A platform-independent integer from a string (per-item seeds)."""
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % (1 << bits)


def image_file_name(item_id: str, suffix: str = ".png") -> str:
  """The file name of an item's image: a readable prefix of the id (characters outside [A-Za-z0-9._-] become
  '_', at most 80 of them) and the first 16 hex digits of the SHA-256 of the whole id, so ids that differ
  only in replaced characters or after the prefix get distinct files. A pure function of the id: a restarted
  stage finds its files again."""
  prefix = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id)[:80].lstrip(".") or "item"
  return f"{prefix}-{hashlib.sha256(item_id.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}{suffix}"


def _boxes(value) -> bool:
  """A `regions` field as the propose stage writes it: a list of {box: 4 finite numbers, ...}."""
  return isinstance(value, list) and all(
      isinstance(r, dict) and isinstance(r.get("box"), list) and len(r["box"]) == 4
      and all(map(is_number, r["box"])) for r in value)


def _score(v) -> bool:
  return is_number(v) and -1.0 <= v <= 1.0


def _scored_regions(value) -> bool:
  """A reward record's `regions`: a list of {box: 4 finite numbers, score in [-1, 1], object: str or
  None}."""
  return _boxes(value) and all(_score(r.get("score")) and or_none(is_str)(r.get("object"))
                               for r in value)


_OPTIONAL_STR = Field(or_none(is_str), required=False)

# Row schemas, one per log (the `id` field, a string, is checked by every read).
METADATA: Schema = {"prompt": Field(is_str), "image_file": Field(is_str),
                    "seq": Field(is_int, False), "prompt_id": Field(is_str, False),
                    "category": _OPTIONAL_STR,
                    "seed": Field(is_int, False), "think": _OPTIONAL_STR}
REGIONS: Schema = {"regions": Field(_boxes), "image_file": Field(is_str, False)}
REWARDS: Schema = {"image_file": Field(is_str), "prompt": Field(is_str),
                   "global_score": Field(or_none(_score)), "regions": Field(_scored_regions),
                   "seq": Field(or_none(is_int), False)}
JUDGMENTS: Schema = {"correct": Field(is_bool), "prompt": Field(is_str), "category": _OPTIONAL_STR,
                     "judge": Field(is_str, False)}
_METRIC: Dict[str, Field] = {"prompt": Field(is_str), "score": Field(or_none(is_number)),
                             "category": _OPTIONAL_STR, "skipped": Field(is_str, False)}
METRICS: Dict[str, Schema] = {  # eval.metrics: the fields each metric's rows are read by
    "compbench": dict(_METRIC, metric=Field(is_str)),
    "mllm": dict(_METRIC),
    "geneval": dict(_METRIC, correct=Field(is_bool, False)),
    "reasonbench": dict(_METRIC, quality=Field(or_none(is_number), False)),
}


def read_metadata(out_dir: str, report: Optional[LogReport] = None) -> List[dict]:
  """Every process's metadata rows, one per image id (the latest: an image made again after its file
  went missing is logged again); rows `METADATA` refuses are skipped and counted."""
  return read_rows(out_dir, "metadata", schema=METADATA, report=report, last=True)


def read_regions(out_dir: str, report: Optional[LogReport] = None) -> List[dict]:
  """Every process's region rows, one per image id; a row whose `regions` is not a list of boxes of 4 finite
  numbers is skipped and counted in `report` (its image is then proposed again, or scored without regions)."""
  return read_rows(out_dir, "regions", schema=REGIONS, report=report)


def read_rewards(out_dir: str, report: Optional[LogReport] = None) -> List[dict]:
  """Every process's reward rows (the score stage's records with their ids), one per image id."""
  return read_rows(out_dir, "rewards", schema=REWARDS, report=report)


def read_judgments(out_dir: str, report: Optional[LogReport] = None) -> List[dict]:
  """Every process's judge verdicts, one per image id (`correct` a bool: `"false"` is skipped, not
  true)."""
  return read_rows(out_dir, "judgments", schema=JUDGMENTS, report=report)


def read_metric(directory: str, metric: str, report: Optional[LogReport] = None) -> List[dict]:
  """The latest row of every image id of one metric's logs (a skipped image is tried again by a
  rerun, which appends its newer row); a metric not in `METRICS` is read by the common fields."""
  return read_rows(directory, metric, schema=METRICS.get(metric, _METRIC), report=report, last=True)


def present_files(directory: str) -> Optional[set]:
  """The names of the files in `directory` (one listing; None when it does not exist); a file where
  the folder belongs raises `NotADirectoryError` naming it."""
  d = paths.path(directory)
  if not d.exists():
    return None
  if not d.is_dir():
    raise NotADirectoryError(20, "Not a directory", str(directory))
  return {p.name for p in d.iterdir()}
