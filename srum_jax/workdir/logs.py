"""Resumable JSONL logs: one row per finished item, readable whatever a crash left behind; and the
one remote-log policy of every log a run writes.

Every stage writes one JSONL line per finished item (after the item's files are on disk), so a
restarted stage reads the ids already done and skips them: each item is done exactly once, whatever
the crash point. Several processes of one run each write their own log (`process_log`); readers
merge them (`read_rows`).

Remote-log policy (a workdir on an object store, e.g. `gs://`, where objects cannot be appended to):
every log is a `JsonlLog`, whose appends there are whole part objects
(`<log>.parts/<n>-<rand>.jsonl`, never a torn line) folded into `<log>` by its one writer. A stage's
resumable log writes one part per append (each row is durable when `append` returns). A log written
every step and read after the fact (training's data log and metrics: `BufferedLog`) appends at once
to a local file; on an object store it keeps its rows in memory and writes them as one part at most
every `BufferedLog.FLUSH_S` seconds and when closed (a crash loses at most that much of it). Files
only a local writer can make (TensorBoard's event files) are written in a local cache folder and
copied to the workdir at those same moments (`BufferedLog(mirror=...)`). Logs have no other remote
write path.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import time
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax

from srum_jax import distributed, paths
from srum_jax.errors import UserValueError


@dataclasses.dataclass
class LogReport:
  """What reading resumable logs skipped: lines that are not UTF-8 (e.g. torn inside a multi-byte
  character by a crash mid-write), not a JSON object with a string `id`, missing a field the reader
  needs, holding a field of the wrong type (`"correct": "false"`, a NaN score), or a second row of
  an id already read."""
  rows: int = 0
  undecodable: int = 0
  malformed: int = 0
  missing_field: int = 0
  wrong_type: int = 0
  duplicate_id: int = 0

  @property
  def skipped(self) -> int:
    return (self.undecodable + self.malformed + self.missing_field + self.wrong_type
            + self.duplicate_id)

  def add(self, other: "LogReport") -> None:
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class JsonlLog:
  """Append-only JSONL keyed by `id`: `done()` gives finished ids; `append` is flushed and fsynced.

  Reading never fails on the content: any bytes are read, and a line that is not UTF-8, not JSON, or not an
  object with a string `id` is skipped and counted (`read`), so a torn or garbled line never blocks a resume.

  On an object store (a remote `path`, e.g. `gs://`), where objects cannot be appended to, each `append` writes
  one part object `<path>.parts/<n>-<random>.jsonl` (all-or-nothing: never a torn line) and readers read the
  parts after `<path>` itself. The log's one writer (`process_log`: one log per process, one command per
  workdir) folds the parts into `<path>` when it opens the log and every `COMPACT_EVERY` appends (rewrite
  `<path>`, then delete the parts it folded in), so a read costs at most `COMPACT_EVERY` + 1 object reads and
  a resume sees every row exactly once. Readers list the parts before reading `<path>` and drop a line equal to
  one read before, so a read during a fold, or after a fold stopped between its two steps, sees each row once."""

  COMPACT_EVERY = 256  # part objects a remote log holds at most before its writer folds them in

  def __init__(self, path: str):
    self.remote = paths.is_remote(path)
    self.path = paths.path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._next_part: Optional[int] = None  # remote: the number of the next part object this writer writes

  @property
  def parts_dir(self):
    """Where a remote log's part objects live."""
    return self.path.parent / (self.path.name + ".parts")

  def _parts(self) -> list:
    """A remote log's part objects in write order (by their number)."""
    if not self.parts_dir.is_dir():
      return []
    return sorted((p for p in self.parts_dir.iterdir() if p.name.endswith(".jsonl")),
                  key=lambda p: (_part_number(p.name), p.name))

  def _remote_bytes(self) -> Tuple[bytes, list]:
    """(the log's lines: `<path>`, then its parts, each line once; the parts read). Parts are listed first:
    a fold between the listing and the read leaves a part missing, whose rows `<path>` then holds."""
    parts, chunks = self._parts(), []
    for p in parts:
      try:
        chunks.append(p.read_bytes())
      except FileNotFoundError:  # folded into <path> meanwhile
        pass
    try:
      chunks.insert(0, self.path.read_bytes())
    except FileNotFoundError:
      pass
    lines, seen = [], set()
    for chunk in chunks:
      for raw in chunk.split(b"\n"):
        if raw.strip() and raw not in seen:
          seen.add(raw)
          lines.append(raw)
    return b"".join(line + b"\n" for line in lines), parts

  def _check_not_folder(self) -> None:
    """A folder where the log file belongs is a user error naming it (not an empty log)."""
    if not self.remote and self.path.is_dir():
      raise UserValueError(f"{self.path} is a folder where a log file is expected: move it "
                           f"away, or use another workdir")

  def read(self) -> Tuple[List[Dict[str, Any]], LogReport]:
    """(well-formed rows in file order, what was skipped)."""
    rep = LogReport()
    self._check_not_folder()
    if self.remote:
      data = self._remote_bytes()[0]
    elif self.path.is_file():
      data = self.path.read_bytes()
    else:
      return [], rep
    out = []
    for raw in data.split(b"\n"):
      if not raw.strip():
        continue
      try:
        row = json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError:
        rep.undecodable += 1
        continue
      except (ValueError, RecursionError):  # json.JSONDecodeError is a ValueError
        rep.malformed += 1
        continue
      if isinstance(row, dict) and isinstance(row.get("id"), str):
        out.append(row)
      else:
        rep.malformed += 1
    rep.rows = len(out)
    return out, rep

  def rows(self) -> List[Dict[str, Any]]:
    """Well-formed rows (`read` without its report)."""
    return self.read()[0]

  def done(self) -> set:
    return {r["id"] for r in self.rows()}

  def append(self, row: Dict[str, Any]) -> None:
    self.extend([row])

  def extend(self, rows: Sequence[Dict[str, Any]]) -> None:
    """`append` of several rows in one write (one fsync; remotely one part object): a stage logs a batch's
    results at the cost of one row's (fsync per row: ~3 ms each, seconds per 1000-image eval). A crash
    mid-write leaves at most a torn last line, which readers skip and a resume redoes."""
    if not rows:
      return
    self._check_not_folder()
    data = b"".join((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8") for row in rows)
    if self.remote:
      self._append_part(data)
      return
    if self.path.is_file() and self.path.stat().st_size:
      with open(self.path, "rb") as f:  # end a torn last line first, so the new row stays a line of its own
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
          data = b"\n" + data
    with open(self.path, "ab") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())

  def _append_part(self, data: bytes) -> None:
    """One remote row: a new part object (numbered after the last one; a random tail so that two writers can
    never overwrite each other's part), folded in every `COMPACT_EVERY` parts."""
    if self._next_part is None:
      self._next_part = max((_part_number(p.name) for p in self._parts()), default=-1) + 1
    self.parts_dir.mkdir(parents=True, exist_ok=True)
    (self.parts_dir / f"{self._next_part:09d}-{uuid.uuid4().hex[:8]}.jsonl").write_bytes(data)
    self._next_part += 1
    if self._next_part % self.COMPACT_EVERY == 0:
      self.compact()

  def compact(self) -> None:
    """Fold a remote log's parts into `<path>` (one rewrite, then the folded parts deleted); only the log's
    writer calls it (two concurrent folds could drop each other's newest rows). A no-op for a local log."""
    if not self.remote:
      return
    data, parts = self._remote_bytes()
    if not parts:
      return
    self.path.write_bytes(data)
    for p in parts:
      p.unlink(missing_ok=True)


class BufferedLog:
  """A log written often and read after the fact (training's data log, metrics; rows need no `id`):
  each row is appended to `log` at once on a local disk; on an object store rows are kept in memory
  and written as one part object at most every `FLUSH_S` seconds and on `close`. `mirror` = (local
  folder, workdir folder): files that a local writer makes (TensorBoard events), copied to a remote
  workdir folder at the same moments."""

  FLUSH_S = 60.0

  def __init__(self, log: JsonlLog, mirror: Optional[Tuple[str, str]] = None):
    self.log, self.mirror, self.rows, self.flushed = log, mirror, [], 0.0

  def append(self, row: Dict[str, Any]) -> None:
    self.rows.append(row)
    self.flush()

  def flush(self, force: bool = False) -> None:
    """Write the rows held and copy the mirror: now when local or `force`, else once `FLUSH_S` has
    passed since the last time."""
    remote = self.log.remote or (self.mirror is not None and paths.is_remote(self.mirror[1]))
    if remote and not force and time.time() - self.flushed < self.FLUSH_S:
      return
    rows, self.rows = self.rows, []
    self.log.extend(rows)
    if self.mirror is not None and paths.is_remote(self.mirror[1]):
      paths.upload_dir(*self.mirror)
    self.flushed = time.time()

  def close(self) -> None:
    self.flush(force=True)

  def __enter__(self) -> "BufferedLog":
    return self

  def __exit__(self, *exc) -> bool:
    self.close()
    return False


def _part_number(name: str) -> int:
  """The write number of a remote log's part object `<n>-<random>.jsonl` (-1 for a foreign name)."""
  head = name.split("-", 1)[0]
  return int(head) if head.isdigit() else -1


def process_log(directory: str, stem: str) -> JsonlLog:
  """This process's resumable log `<stem>.jsonl` in `directory` (`<stem>.<process>.jsonl` when several
  processes share the directory: no two processes ever append to one file). The caller is the log's writer:
  a remote log's parts are folded in now (`JsonlLog.compact`)."""
  suffix = "" if jax.process_count() == 1 else f".{jax.process_index()}"
  log = JsonlLog(paths.join(directory, f"{stem}{suffix}.jsonl"))
  log.compact()
  return log


def log_paths(directory: str, stem: str) -> List[str]:
  """Every process's log of `stem` in `directory`, in name order: `<stem>.jsonl` and `<stem>.<process>.jsonl`
  (a remote log that so far has only part objects, `<name>.parts/`, counts too)."""
  d = paths.path(directory)
  if not d.is_dir():
    return []
  pattern = re.compile(rf"{re.escape(stem)}(\.[0-9]+)?\.jsonl")
  names = set()
  for p in d.iterdir():
    name = p.name[:-len(".parts")] if p.name.endswith(".parts") else p.name
    if pattern.fullmatch(name):
      names.add(name)
  return [paths.join(directory, n) for n in sorted(names)]


@dataclasses.dataclass(frozen=True)
class Field:
  """One field of a row schema: the check its value must pass, and whether a row must have it."""
  check: Callable[[Any], bool]
  required: bool = True


Schema = Mapping[str, Field]


def is_str(v) -> bool:
  return isinstance(v, str)


def is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def is_bool(v) -> bool:
  return isinstance(v, bool)


def is_number(v) -> bool:
  """A finite number (a bool is not one)."""
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def or_none(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
  return lambda v: v is None or check(v)


def row_problem(row: Dict[str, Any], schema: Optional[Schema]) -> Optional[str]:
  """'missing_field' / 'wrong_type' for a row its schema refuses (None: the row is good)."""
  for name, f in (schema or {}).items():
    if name not in row:
      if f.required:
        return "missing_field"
    elif not f.check(row[name]):
      return "wrong_type"
  return None


def read_rows(directory: str, stem: str, *, schema: Optional[Schema] = None,
              report: Optional[LogReport] = None, last: bool = False) -> List[Dict[str, Any]]:
  """The rows of every process's `<stem>*.jsonl` log in `directory` (merged files included), one per
  id (the first good row seen, files in name order; `last`: the last one, for logs that append a
  newer result of an id), in the prompt set's order (`seq`, when every row has one) whatever the
  number of processes that wrote them. Rows `schema` refuses (a required field missing, a field of
  the wrong type) are skipped; every skip is counted in `report` (when given)."""
  by_id: Dict[str, Dict[str, Any]] = {}
  rep = LogReport()
  files = log_paths(directory, stem)
  per_process = any(os.path.basename(p) != f"{stem}.jsonl" for p in files)
  for p in files:
    got, file_rep = JsonlLog(p).read()
    rep.add(file_rep)
    merged = per_process and os.path.basename(p) == f"{stem}.jsonl"  # process 0's copy of every process's rows
    for r in got:
      problem = row_problem(r, schema)
      if problem:
        setattr(rep, problem, getattr(rep, problem) + int(not merged))
      elif r["id"] in by_id and not last:
        rep.duplicate_id += int(not merged)
      else:
        by_id.pop(r["id"], None)
        by_id[r["id"]] = r
  rows = list(by_id.values())
  if rows and all(isinstance(r.get("seq"), int) and not isinstance(r.get("seq"), bool) for r in rows):
    rows.sort(key=lambda r: r["seq"])
  rep.rows = len(rows)
  if report is not None:
    report.add(rep)
  return rows


def merge_process_logs(directory: str, stem: str) -> None:
  """After every process finished its share: process 0 writes `<stem>.jsonl` holding every process's rows
  (one per id); with one process its log is that file already (a remote one gets its parts folded in, so plain
  file readers such as `records.read_records` see every row)."""
  distributed.barrier(f"merge:{directory}:{stem}:ready")
  if jax.process_count() == 1:
    JsonlLog(paths.join(directory, f"{stem}.jsonl")).compact()  # a no-op for a local log
  if jax.process_count() > 1 and jax.process_index() == 0:
    rows = read_rows(directory, stem)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    paths.write_bytes(paths.join(directory, f"{stem}.jsonl"), data)
  distributed.barrier(f"merge:{directory}:{stem}:done")

