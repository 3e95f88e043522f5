"""Progress bars and stage summary lines for every long loop (stages, trainers, evaluation).

A live tqdm bar on a terminal; off a terminal (a log file, a pipe) one plain line per
`QUIET_INTERVAL_S` at most, without the carriage-return redraws that fill logs.
"""
from __future__ import annotations

import sys
from typing import Any, Dict

from tqdm import tqdm

QUIET_INTERVAL_S = 30.0  # seconds between progress lines when the output is not a terminal


def progress_options(stream=None) -> Dict[str, Any]:
  """tqdm options: a live bar on a terminal; otherwise (a log file, a pipe) one line per
  `QUIET_INTERVAL_S` at most, without the carriage-return redraws that fill logs."""
  stream = sys.stderr if stream is None else stream
  try:
    tty = stream.isatty()
  except (AttributeError, ValueError):
    tty = False
  if tty:
    return dict(file=stream, dynamic_ncols=True)
  return dict(
      file=_LineStream(stream), mininterval=QUIET_INTERVAL_S, maxinterval=QUIET_INTERVAL_S,
      ncols=100, ascii=True)


class _LineStream:
  """A file for tqdm off a terminal: each redraw becomes one plain line (no carriage returns, no
  blank clearing frames)."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> None:
    text = text.replace("\r", "").strip()
    if text:
      self.stream.write(text + "\n")

  def flush(self) -> None:
    self.stream.flush()


def bar(total: int, desc: str, initial: int = 0, disable: bool = False, leave: bool = False,
             unit: str = "item"):
  """A progress bar on stderr, quiet off a terminal (`progress_options`)."""
  return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, disable=disable,
              **progress_options())


def summary_line(stage: str, **counts) -> str:
  parts = ", ".join(f"{k}={v}" for k, v in counts.items())
  line = f"[{stage}] {parts}"
  print(line, flush=True)
  return line
