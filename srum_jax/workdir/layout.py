"""The names and readers of the stages' outputs in a workdir: what one stage writes and the next one reads.

    generate/images/<image_file_name(id)>   generate/metadata[.<process>].jsonl   (`read_metadata`)
    propose/regions[.<process>].jsonl                                           (`read_regions`)
    score/rewards.jsonl, stats.json          train/   eval/<name>/

A reader returns one row per item id (every process's log merged, in the prompt set's order) and counts what
it skipped in a `logs.LogReport`.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import re
from typing import List, Optional

from srum_jax.workdir.logs import LogReport, read_rows


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


def read_metadata(out_dir: str, report: Optional[LogReport] = None) -> List[dict]:
  """Every process's metadata rows, one per image id; rows without `image_file` or `prompt` (or not a
  string) are skipped and counted in `report`."""
  rows = read_rows(out_dir, "metadata", require=("image_file", "prompt"), report=report)
  good = [r for r in rows if isinstance(r["image_file"], str) and isinstance(r["prompt"], str)]
  if report is not None:
    report.missing_field += len(rows) - len(good)
    report.rows -= len(rows) - len(good)
  return good


def _valid_regions(value) -> bool:
  """A `regions` field as this stage writes it: a list of {box: 4 finite numbers, ...}."""
  def number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
  return isinstance(value, list) and all(
      isinstance(r, dict) and isinstance(r.get("box"), list) and len(r["box"]) == 4 and all(map(number, r["box"]))
      for r in value)


def read_regions(out_dir: str, report: Optional[LogReport] = None) -> List[dict]:
  """Every process's region rows, one per image id; a row whose `regions` is not a list of boxes of 4 finite
  numbers is skipped and counted in `report` (its image is then proposed again, or scored without regions)."""
  rows = read_rows(out_dir, "regions", require=("regions",), report=report)
  good = [r for r in rows if _valid_regions(r["regions"])]
  if report is not None:
    report.malformed += len(rows) - len(good)
    report.rows -= len(rows) - len(good)
  return good

