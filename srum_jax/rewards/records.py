"""Reward records: a typed, versioned JSONL schema, the official SRUM format, the formatting filter
(official `srum_data_infer/vlm_format_output.py`).

One record = one generated image scored by the judge:

  {"schema_version": 1, "image_file": "00001.png", "prompt": "...", "global_score": 0.6,
   "global_reason": "...", "image_size": [1024, 1024],
   "regions": [{"box": [x0, y0, x1, y1], "score": 0.8, "object": "a dog"}, ...], "metadata": {...}}

Scores are finite and in [-1, 1] (the parsers clamp); `global_score` is null when global scoring
failed. Readers never crash on a bad line: it is skipped and reported with its 1-based line number.

The official format (what `srum_data_infer/vlm_format_output.py` writes) is
  {"bad_image_file", "good_image_file", "prompt",
   "vlm_rewards": [{"object": "global_layout_reward", "bbox", "score", "reason"}, {"object", "bbox",
   "score"}, ...]}
`from_official` / `to_official` convert one record each way.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from srum_jax import paths

__all__ = [
    "SCHEMA_VERSION",
    "GLOBAL_OBJECT",
    "RegionReward",
    "RewardRecord",
    "ReadReport",
    "FilterReport",
    "ArrayStats",
    "record_from_dict",
    "write_records",
    "append_record",
    "read_records",
    "from_official",
    "to_official",
    "read_official_records",
    "write_official_records",
    "formatting_filter",
    "records_to_arrays",
]

SCHEMA_VERSION = 1
_BOX_LIMIT = 2.0 ** 30
GLOBAL_OBJECT = "global_layout_reward"


@dataclasses.dataclass(frozen=True)
class RegionReward:
  box: tuple[float, float, float, float]  # [x_min, y_min, x_max, y_max] in original-image pixels
  score: float
  object: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class RewardRecord:
  image_file: str
  prompt: str
  global_score: Optional[float]
  regions: tuple[RegionReward, ...] = ()
  global_reason: Optional[str] = None
  image_size: Optional[tuple[int, int]] = None  # (width, height) when known
  metadata: dict = dataclasses.field(default_factory=dict)
  schema_version: int = SCHEMA_VERSION

  def to_dict(self) -> dict:
    return {
      "schema_version": self.schema_version, "image_file": self.image_file, "prompt": self.prompt,
      "global_score": self.global_score, "global_reason": self.global_reason,
      "image_size": None if self.image_size is None else list(self.image_size),
      "regions": [{"box": list(r.box), "score": r.score, "object": r.object} for r in self.regions],
      "metadata": dict(self.metadata),
    }


@dataclasses.dataclass
class ReadReport:
  """What a reader saw: non-blank lines, records accepted, and (line number, why) for each
  skipped line."""
  lines: int = 0
  records: int = 0
  skipped: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class FilterReport:
  total: int = 0
  kept: int = 0
  dropped_zero_global: int = 0
  dropped_missing_global: int = 0
  dropped_empty: int = 0


@dataclasses.dataclass
class ArrayStats:
  """Counters for `records_to_arrays`: globals replaced by 0.0, regions beyond `max_regions`
  dropped."""
  missing_global: int = 0
  dropped_regions: int = 0


# --- validation -----------------------------------------------------------------------------------

def _number(x, what: str) -> float:
  if isinstance(x, bool) or not isinstance(x, numbers.Real):
    raise ValueError(f"{what} is not a number: {x!r}")
  try:
    x = float(x)
  except OverflowError:
    raise ValueError(f"{what} is too large: {x!r}") from None
  if not math.isfinite(x):
    raise ValueError(f"{what} is not finite: {x!r}")
  return x


def _score(x, what: str) -> float:
  x = _number(x, what)
  if not -1.0 <= x <= 1.0:
    raise ValueError(f"{what} outside [-1, 1]: {x!r}")
  return x


def valid_score(x) -> Optional[float]:
  """`x` as a float when it is a finite number in [-1, 1] (what a record may hold), else None."""
  try:
    return _score(x, "score")
  except ValueError:
    return None


def _box(b, what: str) -> tuple[float, float, float, float]:
  if not isinstance(b, (list, tuple)) or len(b) != 4:
    raise ValueError(f"{what} is not a 4-element list: {b!r}")
  return tuple(_number(v, what) for v in b)


def _opt_str(x, what: str) -> Optional[str]:
  if x is not None and not isinstance(x, str):
    raise ValueError(f"{what} is not a string: {x!r}")
  return x


def _str(d: dict, key: str) -> str:
  if key not in d:
    raise ValueError(f"missing field {key!r}")
  if not isinstance(d[key], str):
    raise ValueError(f"{key} is not a string: {d[key]!r}")
  return d[key]


def _image_size(x) -> Optional[tuple[int, int]]:
  if x is None:
    return None
  if not isinstance(x, (list, tuple)) or len(x) != 2:
    raise ValueError(f"image_size is not [width, height]: {x!r}")
  w, h = (_number(v, "image_size") for v in x)
  if not (w.is_integer() and h.is_integer() and w > 0 and h > 0):
    raise ValueError(f"image_size is not positive integers: {x!r}")
  return int(w), int(h)


def record_from_dict(d: Any) -> RewardRecord:
  """Validates one decoded JSON object of our schema; raises ValueError saying what is wrong."""
  if not isinstance(d, dict):
    raise ValueError("line is not a JSON object")
  version = d.get("schema_version")
  if version != SCHEMA_VERSION or isinstance(version, bool):
    raise ValueError(f"unsupported schema_version {version!r} (expected {SCHEMA_VERSION})")
  if "global_score" not in d:
    raise ValueError("missing field 'global_score'")
  g = d["global_score"]
  regions = d.get("regions")
  if not isinstance(regions, list):
    raise ValueError("missing field 'regions' or not a list")
  out = []
  for i, r in enumerate(regions):
    if not isinstance(r, dict):
      raise ValueError(f"regions[{i}] is not an object")
    if "box" not in r or "score" not in r:
      raise ValueError(f"regions[{i}] lacks 'box' or 'score'")
    out.append(
        RegionReward(
            _box(r["box"], f"regions[{i}].box"), _score(r["score"], f"regions[{i}].score"),
            _opt_str(r.get("object"), f"regions[{i}].object")))
  meta = d.get("metadata", {})
  if meta is None:
    meta = {}
  if not isinstance(meta, dict):
    raise ValueError("metadata is not an object")
  return RewardRecord(
    image_file=_str(d, "image_file"), prompt=_str(d, "prompt"),
    global_score=None if g is None else _score(g, "global_score"),
    regions=tuple(out), global_reason=_opt_str(d.get("global_reason"), "global_reason"),
    image_size=_image_size(d.get("image_size")), metadata=meta)


# --- JSONL I/O ------------------------------------------------------------------------------------

def _dumps(d: dict) -> str:
  return json.dumps(d, ensure_ascii=False, allow_nan=False)


def _write_lines(path: str | os.PathLike, lines: list) -> int:
  """`lines` as a UTF-8 JSONL file (overwriting; a remote path, e.g. gs://, as one object); how
  many."""
  data = "".join(line + "\n" for line in lines)
  if paths.is_remote(path):
    paths.path(path).write_bytes(data.encode("utf-8"))
  else:
    with open(path, "w", encoding="utf-8") as f:
      f.write(data)
  return len(lines)


def write_records(path: str | os.PathLike, records: Iterable[RewardRecord]) -> int:
  """Writes records as JSONL (overwriting); returns how many."""
  return _write_lines(path, [_dumps(r.to_dict()) for r in records])


def append_record(path: str | os.PathLike, record: RewardRecord) -> None:
  """One record appended to a local JSONL file (object stores cannot append: use
  `write_records`)."""
  with open(path, "a", encoding="utf-8") as f:
    f.write(_dumps(record.to_dict()) + "\n")


def _reject_constant(name: str):
  raise ValueError(f"non-finite number {name}")


def _read(path, convert) -> tuple[list, ReadReport]:
  """Any bytes: lines are split on b"\\n" and decoded one by one, so a line that is not UTF-8 (e.g.
  torn inside a multi-byte character) is one skipped line (UnicodeDecodeError is a ValueError),
  never a failed read."""
  report, records = ReadReport(), []
  if paths.is_remote(path):  # gs://...: through etils.epath
    data = paths.path(path).read_bytes()
  else:
    with open(path, "rb") as f:
      data = f.read()
  for line_no, raw in enumerate(data.split(b"\n"), start=1):
    if not raw.strip():
      continue
    report.lines += 1
    try:
      rec = convert(json.loads(raw.decode("utf-8"), parse_constant=_reject_constant))
    # JSONDecodeError and UnicodeDecodeError are ValueErrors
    except (ValueError, RecursionError) as e:
      report.skipped.append((line_no, f"{type(e).__name__}: {e}"[:300]))
      continue
    records.append(rec)
    report.records += 1
  return records, report


def read_records(path: str | os.PathLike) -> tuple[list[RewardRecord], ReadReport]:
  """Reads our JSONL; malformed lines are skipped and listed in the report with their line
  numbers."""
  return _read(path, record_from_dict)


# --- official format ------------------------------------------------------------------------------

def from_official(d: Any) -> RewardRecord:
  """One official record -> RewardRecord.

  The first `global_layout_reward` entry gives the global score (None when absent or without a
  score) and `image_size` when its bbox is [0, 0, W, H]. Regional entries without a 4-element
  numeric bbox or without a score are dropped: the official reward map ignores both (a missing score
  means weight 0.5 = the base). A non-numeric or non-finite score, or a missing file/prompt, raises
  ValueError.
  """
  if not isinstance(d, dict):
    raise ValueError("record is not a JSON object")
  rewards = d.get("vlm_rewards")
  if not isinstance(rewards, list):
    raise ValueError("missing field 'vlm_rewards' or not a list")
  g, reason, size, regions, seen_global = None, None, None, [], False
  for i, e in enumerate(rewards):
    if not isinstance(e, dict):
      raise ValueError(f"vlm_rewards[{i}] is not an object")
    if e.get("object") == GLOBAL_OBJECT:
      if seen_global:
        continue
      seen_global = True
      g = None if e.get("score") is None else _score(e["score"], "global score")
      reason = _opt_str(e.get("reason"), "global reason")
      try:
        x0, y0, x1, y1 = _box(e.get("bbox"), "global bbox")
        if x0 == 0 and y0 == 0 and x1 > 0 and y1 > 0 and x1.is_integer() and y1.is_integer():
          size = (int(x1), int(y1))
      except ValueError:
        pass
      continue
    if "score" not in e:
      continue
    try:
      box = _box(e.get("bbox"), f"vlm_rewards[{i}].bbox")
    except ValueError:
      continue
    obj = e.get("object")
    regions.append(RegionReward(box, _score(e["score"], f"vlm_rewards[{i}].score"),
                                obj if isinstance(obj, str) else None))
  image_file = _str(d, "bad_image_file")
  meta = {}
  good = d.get("good_image_file")
  if isinstance(good, str) and good != image_file:
    meta["good_image_file"] = good
  return RewardRecord(image_file=image_file, prompt=_str(d, "prompt"), global_score=g,
                      regions=tuple(regions), global_reason=reason, image_size=size, metadata=meta)


def _num_out(x: float):
  return int(x) if float(x).is_integer() else float(x)


def to_official(r: RewardRecord) -> dict:
  """RewardRecord -> official dict (global entry first, bbox [0, 0, W, H] when the size is known;
  kept with a null score when there is no global score but a reason or size to carry)."""
  rewards = []
  if r.global_score is not None or r.global_reason is not None or r.image_size is not None:
    # a null score reads as missing (0.0) in the official dataset, exactly like an absent entry
    bbox = None if r.image_size is None else [0, 0, r.image_size[0], r.image_size[1]]
    rewards.append({
        "object": GLOBAL_OBJECT,
        "bbox": bbox,
        "score": r.global_score,
        "reason": r.global_reason
    })
  for reg in r.regions:
    rewards.append({
        "object": reg.object,
        "bbox": [_num_out(v) for v in reg.box],
        "score": reg.score
    })
  return {
      "bad_image_file": r.image_file,
      "good_image_file": r.metadata.get("good_image_file", r.image_file),
      "prompt": r.prompt,
      "vlm_rewards": rewards
  }


def read_official_records(path: str | os.PathLike) -> tuple[list[RewardRecord], ReadReport]:
  return _read(path, from_official)


def write_official_records(path: str | os.PathLike, records: Iterable[RewardRecord]) -> int:
  return _write_lines(path, [_dumps(to_official(r)) for r in records])


# --- filter and arrays ----------------------------------------------------------------------------

def formatting_filter(records: Iterable[RewardRecord], drop_zero_global: bool = True
                      ) -> tuple[list[RewardRecord], FilterReport]:
  """The official formatting filter (`srum_data_infer/vlm_format_output.py`).

  With `drop_zero_global`, records whose global score is exactly 0.0 are dropped, and so are records
  without one (official scoring writes 0.0 on failure, which this rule then drops). Records with
  neither a global score nor regions are always dropped.
  """
  rep, kept = FilterReport(), []
  for r in records:
    rep.total += 1
    if drop_zero_global and r.global_score is None:
      rep.dropped_missing_global += 1
    elif drop_zero_global and r.global_score == 0.0:
      rep.dropped_zero_global += 1
    elif r.global_score is None and not r.regions:
      rep.dropped_empty += 1
    else:
      kept.append(r)
  rep.kept = len(kept)
  return kept, rep


def pad_regions(boxes: Sequence[Sequence[float]], scores: Sequence[float], max_regions: int):
  """One image's regions as the fixed-size inputs of `reward_map`: (boxes [K, 4] f32, scores [K]
  f32, valid [K] bool, regions dropped beyond K = max_regions). Regions keep their order. Box
  coordinates are truncated toward zero here in float64 (so 13.99999999 stays 13 as with the
  official int(), instead of rounding to 14.0 in float32) and limited to +-2^30; `reward_map`
  validates them."""
  k = int(max_regions)
  out_boxes = np.zeros((k, 4), np.float32)
  out_scores = np.zeros((k,), np.float32)
  valid = np.zeros((k,), bool)
  n = min(len(boxes), k)
  if n:
    out_boxes[:n] = np.clip(np.trunc(np.asarray(boxes[:n], np.float64)), -_BOX_LIMIT, _BOX_LIMIT)
    out_scores[:n] = scores[:n]
    valid[:n] = True
  return out_boxes, out_scores, valid, len(boxes) - n


def records_to_arrays(records: Sequence[RewardRecord], max_regions: int,
                      stats: Optional[ArrayStats] = None):
  """Padded inputs of `reward_map` for a list of records: (boxes [B,K,4] f32, scores [B,K] f32,
  valid [B,K] bool, global [B] f32), each record's regions by `pad_regions`. A missing global score
  becomes 0.0 as in the official dataset; it and the dropped regions are counted in `stats`."""
  stats = ArrayStats() if stats is None else stats
  padded = [
      pad_regions([reg.box
                   for reg in r.regions], [reg.score
                                           for reg in r.regions], max_regions)
      for r in records
  ]
  stats.dropped_regions += sum(p[3] for p in padded)
  stats.missing_global += sum(r.global_score is None for r in records)
  glob = np.asarray([0.0 if r.global_score is None else r.global_score for r in records],
                    np.float32)
  k = int(max_regions)
  if not padded:
    return np.zeros((0, k, 4), np.float32), np.zeros((0, k), np.float32), np.zeros((0, k),
                                                                                   bool), glob
  return (np.stack([p[0] for p in padded]), np.stack(
      [p[1] for p in padded]), np.stack([p[2] for p in padded]), glob)
