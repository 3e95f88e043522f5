"""Parsers for the judge's answers (the official `srum_data_infer/vlm.py` rules, with fixes). Pure
Python; they never raise, whatever they are given.

Rules shared by all parsers:

* Only the text after the LAST ``</think>`` counts (case-insensitive); without one, the whole text.
* A score is a ``Score`` label, optional markdown (``**Score:** 0.8``, ``**Score**: 0.8``), a colon
  or
  ``=``, then a number: optional ``+``/``-`` sign, decimals, optional exponent. Labels not followed
  by a number (``Score: N/A``) are skipped, as the official regex does.
* ``a/b`` answers: the value is ``a / b`` (``0.8/1`` -> 0.8, ``-1/1`` -> -1.0, ``8/10`` -> 0.8). Our
  choice:
  a judge writing a denominator states its scale's maximum, so dividing maps it into our range. (The
  official regex reads ``8/10`` as 8.) ``b == 0`` is garbage.
* The value is clamped to [-1, 1]; every clamp is counted. NaN, infinities (written or from overflow
  such
  as ``1e999``) and ``x/0`` are garbage: the score is None (a region with such a score is dropped).

Regions: the official parser splits the answer on blank lines and reads one region id and the first
score per block, so regions written without blank lines between them collapse into a single block
and all but the first are lost. We fix this: a block starts at every ``Region ID:`` occurrence and
runs to the next one. Within a block the first score wins, and for a region id the first block with
a score wins (a garbage score drops the region; later blocks of that id are ignored); ids outside
1..num_regions are ignored (and counted).
"""
from __future__ import annotations

import dataclasses
import math
import operator
import re
from typing import Optional

__all__ = [
  "ParseStats", "RegionAnswer", "strip_think", "parse_global_answer", "parse_global_score",
  "parse_region_answers", "parse_region_scores",
]

_MAX_ID_DIGITS = 9  # longer ids are ignored (and int() of huge digit strings is slow or raises)

_THINK_END = re.compile(r"</think\s*>", re.IGNORECASE)
_DECO = r"[ \t*_`]*"  # spaces and markdown emphasis around labels and values
_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_VALUE = rf"(?P<num>{_NUMBER}|[+-]?(?:nan|inf(?:inity)?)\b)(?:[ \t]*/[ \t]*(?P<den>{_NUMBER}))?"
_SCORE = re.compile(rf"\bscore{_DECO}[:=]{_DECO}{_VALUE}", re.IGNORECASE)
_REGION_ID = re.compile(rf"\bregion[ \t_-]*id{_DECO}(?:[:=#]{_DECO})?(?P<id>[0-9]+)", re.IGNORECASE)
_OBJECT = re.compile(rf"\bidentified[ \t_-]*object{_DECO}:{_DECO}(?P<text>[^\n]*)", re.IGNORECASE)
_REASON = re.compile(rf"\breason{_DECO}:{_DECO}", re.IGNORECASE)


@dataclasses.dataclass
class ParseStats:
  """Counters a caller may pass to the parsers; every call adds to them.

  texts: answers seen; scores: scores accepted; clamped: scores outside [-1, 1] clamped; fractions:
  `a/b` answers divided; garbage: scores that were NaN/inf/x/0 (dropped); missing: global answers
  without any score plus expected regions without an accepted score; ignored_ids: region blocks with
  an id outside 1..num_regions; duplicates: later blocks repeating an id (ignored).
  """
  texts: int = 0
  scores: int = 0
  clamped: int = 0
  fractions: int = 0
  garbage: int = 0
  missing: int = 0
  ignored_ids: int = 0
  duplicates: int = 0

  def merge(self, other: "ParseStats") -> "ParseStats":
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
    return self


@dataclasses.dataclass(frozen=True)
class RegionAnswer:
  score: float
  object: Optional[str] = None
  reason: Optional[str] = None


def strip_think(text: str) -> str:
  """The text after the last ``</think>`` (the whole text when there is none)."""
  last = None
  for last in _THINK_END.finditer(text):
    pass
  return text if last is None else text[last.end():]


def _to_float(s: str) -> float:
  try:
    return float(s)
  except (ValueError, OverflowError):
    return math.nan


def _score(m: re.Match, stats: ParseStats) -> Optional[float]:
  """Value of one `_SCORE` match, clamped, or None for garbage."""
  x = _to_float(m.group("num"))
  den = m.group("den")
  if den is not None:
    stats.fractions += 1
    d = _to_float(den)
    x = x / d if (d != 0.0 and math.isfinite(d)) else math.nan
  if not math.isfinite(x):
    stats.garbage += 1
    return None
  if x < -1.0 or x > 1.0:
    stats.clamped += 1
    x = min(1.0, max(-1.0, x))
  stats.scores += 1
  return x


def _line_text(s: str) -> Optional[str]:
  s = s.strip().strip("*_` \t").strip()
  return s or None


def parse_global_answer(
    text, stats: Optional[ParseStats] = None) -> Optional[tuple[float, Optional[str]]]:
  """(score, reason) from a global-layout or sample-level answer; None when there is no usable
  score.

  The first ``Score:`` with a number decides. The reason is the text after a ``Reason:`` label (up
  to a following ``Score:`` label), else the text after the score; None when empty.
  """
  stats = ParseStats() if stats is None else stats
  if not isinstance(text, str):
    return None
  stats.texts += 1
  text = strip_think(text)
  m = _SCORE.search(text)
  if m is None:
    stats.missing += 1
    return None
  score = _score(m, stats)
  if score is None:
    stats.missing += 1
    return None
  r = _REASON.search(text)
  if r is not None:
    nxt = _SCORE.search(text, r.end())
    reason = text[r.end():nxt.start() if nxt is not None else len(text)]
  else:
    reason = text[m.end():]
  return score, _line_text(reason)


def parse_global_score(text, stats: Optional[ParseStats] = None) -> Optional[float]:
  """Score of a global-layout answer in [-1, 1], or None."""
  ans = parse_global_answer(text, stats)
  return None if ans is None else ans[0]


def parse_region_answers(text, num_regions,
                         stats: Optional[ParseStats] = None) -> dict[int, RegionAnswer]:
  """{region id: RegionAnswer} for ids 1..num_regions that have a usable score (see module
  docstring)."""
  stats = ParseStats() if stats is None else stats
  try:
    num_regions = operator.index(num_regions)
  except TypeError:
    return {}
  if not isinstance(text, str) or num_regions < 0:
    return {}
  stats.texts += 1
  text = strip_think(text)
  heads = list(_REGION_ID.finditer(text))
  out: dict[int, RegionAnswer] = {}
  decided: set[int] = set()  # ids whose first score (possibly garbage) was read
  for i, head in enumerate(heads):
    digits = head.group("id").lstrip("0") or "0"
    rid = int(digits) if len(digits) <= _MAX_ID_DIGITS else -1
    if not 1 <= rid <= num_regions:
      stats.ignored_ids += 1
      continue
    if rid in decided:
      stats.duplicates += 1
      continue
    block = text[head.end():heads[i + 1].start() if i + 1 < len(heads) else len(text)]
    m = _SCORE.search(block)
    if m is None:  # no score here: a later block of this id may still give one
      continue
    decided.add(rid)
    score = _score(m, stats)
    if score is None:
      continue
    obj = _OBJECT.search(block)
    reason = _REASON.search(block)
    out[rid] = RegionAnswer(
      score=score,
      object=None if obj is None else _line_text(obj.group("text")),
      reason=None if reason is None else _line_text(block[reason.end():].split("\n", 1)[0]),
    )
  stats.missing += num_regions - len(out)
  return out


def parse_region_scores(text, num_regions, stats: Optional[ParseStats] = None) -> dict[int, float]:
  """{region id: score in [-1, 1]} (see `parse_region_answers`)."""
  return {k: a.score for k, a in parse_region_answers(text, num_regions, stats).items()}
