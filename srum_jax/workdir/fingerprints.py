"""What made a workdir's outputs: each output records it, and a command that would make it
differently stops before any work instead of mixing two runs in one folder.

An output unit is a stage's log and the files it lists (generate: `metadata` + `images/`; propose:
`regions`; score: `rewards`; eval: `metadata` + `images/`, `judgments`, `metrics/<metric>`), or a
whole folder (train). Its record `<dir>/<stem>.made_by.json` holds what made it and the fingerprint
(SHA-256) of that:

    {"fingerprint": "9f2c...", "outputs": ["images", "stats*.json"],
     "made_by": {"stage": "generate", "model": "<identity>", "seed": 42, "settings": {...},
                 "inputs": {"prompts": "<digest>"}}}

`claim(units, workdir, discard_stale=...)` runs before any work: a unit without outputs gets its
record (written again when it changed); a unit whose record is the same resumes; a unit whose
outputs were made by another configuration (or hold no record at all) stops the command with
`StaleOutputs` (exit 2), naming the keys that differ and the two ways out: a new workdir, or
`--config.discard_stale=True`, which deletes the unit's outputs and every output of the workdir made
from them (their records name its fingerprint), then proceeds.

Identities are cheap (`dir_identity`: names, sizes, modification times, small files whole,
safetensors headers), so a check costs file listings, never a read of the weights.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax

from srum_jax import distributed, files, paths
from srum_jax.errors import UserValueError
from srum_jax.workdir import logs

MADE_BY = ".made_by.json"  # <dir>/<stem>.made_by.json
DISCARD_HINT = "--config.discard_stale=True"


class StaleOutputs(UserValueError):
  """Outputs in the workdir that another configuration made (one line: what differs, the ways
  out)."""


def digest(obj: Any) -> str:
  """The SHA-256 of `obj` as canonical JSON (sorted keys): the fingerprint of a record."""
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dir_identity(directory, small: int = 1 << 20, recursive: bool = False) -> str:
  """A SHA-256 identifying a directory's files without reading large ones: every file's name
  (relative to `directory`), size and modification time, the whole of small files (json, tokenizer)
  and each safetensors file's header (its tensor names, dtypes, shapes and offsets). A 29 GB
  checkpoint costs a few kilobytes of reads. `recursive`: files in sub-folders too (an orbax
  `params/`). Local (pathlib, nanosecond mtimes) or remote (epath: the object store's size and
  mtime)."""
  h = hashlib.sha256()
  remote = paths.is_remote(directory)
  root = paths.path(directory)
  found = root.rglob("*") if recursive else root.iterdir()
  entries = sorted(((str(p.relative_to(root)) if recursive else p.name, p)
                    for p in found if p.is_file()), key=lambda e: e[0])
  for name, f in entries:
    st = f.stat()
    size, mtime = (st.length, st.mtime) if remote else (st.st_size, st.st_mtime_ns)
    h.update(f"{name}\0{size}\0{mtime}\n".encode())
    with f.open("rb") as fh:
      if size <= small:
        h.update(fh.read())
      elif f.suffix == ".safetensors":
        n = int.from_bytes(fh.read(8), "little")
        h.update(fh.read(min(n, 1 << 26)))
  return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Unit:
  """One output unit: its folder, log stem, what made it, and its outputs besides the logs (paths or
  glob patterns relative to the folder; a trailing "/": a folder; "." the folder itself) that a
  discard deletes with them."""
  directory: str
  stem: str
  made_by: Dict[str, Any]
  what: str
  outputs: Tuple[str, ...] = ()

  @property
  def record_path(self) -> str:
    return paths.join(self.directory, self.stem + MADE_BY)

  @property
  def fingerprint(self) -> str:
    return digest(self.made_by)

  def record(self) -> Dict[str, Any]:
    return {"fingerprint": self.fingerprint, "made_by": self.made_by, "outputs": list(self.outputs),
            "stem": self.stem}

  def has_outputs(self) -> bool:
    """Whether anything of the unit is on disk (its logs, its outputs; for a whole-folder unit, any
    entry of the folder besides its record); a file where one of its folders belongs raises
    `NotADirectoryError` naming it."""
    d = paths.path(self.directory)
    folders = [paths.join(self.directory, o) for o in self.outputs if o.endswith("/")]
    for folder in [self.directory] + folders:
      f = paths.path(folder.rstrip("/"))
      if f.exists() and not f.is_dir():  # a file where the unit's folder belongs
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(f))
    if logs.log_paths(self.directory, self.stem):
      return True
    if "." in self.outputs:
      return d.is_dir() and any(p.name != self.stem + MADE_BY for p in d.iterdir())
    return d.is_dir() and any(any(True for _ in d.glob(o.rstrip("/"))) for o in self.outputs)


def read_record(path: str) -> Optional[Dict[str, Any]]:
  """A unit's record, None when absent; an unreadable one reads as {} (it then differs from any)."""
  p = paths.path(path)
  if not p.exists():
    return None
  try:
    rec = files.read_json(path, "output record")
  except UserValueError:
    return {}
  return rec if isinstance(rec, dict) else {}


def _flat(obj: Any, prefix: str = "") -> Dict[str, Any]:
  if isinstance(obj, dict):
    out: Dict[str, Any] = {}
    for k, v in obj.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: obj}


def _shown(v: Any) -> str:
  text = json.dumps(v, default=str) if not isinstance(v, str) else v
  if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
    text = v[:12]  # an identity / a fingerprint
  return text if len(text) <= 40 else text[:37] + "..."


def differences(old: Dict[str, Any], new: Dict[str, Any], limit: int = 6) -> str:
  """'seed: 42 -> 7, settings.num_timesteps: 16 -> 4': the keys whose values differ (at most
  `limit` of them)."""
  a, b = _flat(old), _flat(json.loads(json.dumps(new, default=str)))  # as stored: tuples are lists
  keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
  parts = [f"{k}: {_shown(a.get(k, '<absent>'))} -> {_shown(b.get(k, '<absent>'))}"
           for k in keys[:limit]]
  if len(keys) > limit:
    parts.append(f"and {len(keys) - limit} more")
  return ", ".join(parts)


def _message(unit: Unit, stored: Optional[Dict[str, Any]]) -> str:
  if stored is None:
    why = ("hold no record of what made them (made before records existed, or the record was "
           "deleted)")
  elif not stored.get("made_by"):
    why = f"have an unreadable record {unit.record_path}"
  else:
    why = f"were made by another configuration ({differences(stored['made_by'], unit.made_by)})"
  return (f"{unit.what} outputs in {unit.directory} {why}; this command would mix them with its "
          f"own: use a new workdir (or the earlier settings), or rerun with {DISCARD_HINT} to "
          f"delete them and what was made from them")


def _delete(directory: str, stem: str, outputs: Sequence[str]) -> None:
  """A unit's logs, outputs and record."""
  d = paths.path(directory)
  if "." in outputs:
    if d.exists():
      paths.rmtree(directory)
    return
  for p in logs.log_paths(directory, stem):
    q = paths.path(p)
    parts = paths.path(p + ".parts")
    if parts.is_dir():
      paths.rmtree(parts)
    if q.is_dir():
      paths.rmtree(q)
    elif q.exists():
      q.unlink()
  for pattern in outputs:
    for q in list(d.glob(pattern.rstrip("/"))) if d.is_dir() else []:
      paths.rmtree(q) if q.is_dir() else q.unlink()
  paths.path(paths.join(directory, stem + MADE_BY)).unlink(missing_ok=True)


def _records(workdir: str) -> List[Tuple[str, Dict[str, Any]]]:
  """(record path, record) of every unit under `workdir`."""
  root = paths.path(workdir)
  if not root.is_dir():
    return []
  return [(str(p), rec) for p in sorted(root.rglob("*" + MADE_BY), key=str)
          if (rec := read_record(str(p)))]


def discard(unit: Unit, stored: Optional[Dict[str, Any]], workdir: str) -> List[str]:
  """Delete `unit`'s outputs and, transitively, every unit under `workdir` whose record names a
  deleted fingerprint (made from them); the folders emptied. Process 0 only."""
  todo = [(unit.directory, unit.stem, unit.outputs, (stored or {}).get("fingerprint"))]
  gone, deleted = set(), []
  while todo:
    directory, stem, outputs, fp = todo.pop()
    _delete(directory, stem, outputs)
    deleted.append(paths.join(directory, stem))
    if not fp or fp in gone:
      continue
    gone.add(fp)
    for path, rec in _records(workdir):
      if fp in json.dumps(rec.get("made_by", {})) and rec.get("fingerprint") not in gone:
        todo.append((path.rsplit("/", 1)[0], str(rec.get("stem", "")),
                     tuple(rec.get("outputs", ())), rec.get("fingerprint")))
  return deleted


def claim(units: Sequence[Unit], workdir: str, *, discard_stale: bool = False) -> None:
  """Before any work: every unit's outputs were made by its record's configuration, or it has none
  (its record is written). A unit made by another configuration raises `StaleOutputs` (every
  process), unless `discard_stale`: then it and what was made from it are deleted (process 0) and
  its new record written."""
  stale = []
  for unit in units:
    stored = read_record(unit.record_path)
    if stored is not None and stored.get("fingerprint") == unit.fingerprint:
      continue
    if unit.has_outputs():
      if not discard_stale:
        raise StaleOutputs(_message(unit, stored))
      stale.append((unit, stored))
  if jax.process_index() == 0:
    for unit, stored in stale:
      for d in discard(unit, stored, workdir):
        print(f"[workdir] discarded stale outputs {d}* ({DISCARD_HINT})", flush=True)
    for unit in units:
      if (read_record(unit.record_path) or {}).get("fingerprint") != unit.fingerprint:
        files.write_json(unit.record_path, unit.record())
  distributed.barrier(f"claim:{workdir}")


def fingerprint_of(directory: str, stem: str) -> Optional[str]:
  """The fingerprint recorded for `<directory>/<stem>` (None: no record): an input of the unit made
  from it."""
  rec = read_record(paths.join(directory, stem + MADE_BY))
  return None if not rec else rec.get("fingerprint")
