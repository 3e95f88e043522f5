"""Shared plumbing of the pipeline stages: model loading, resumable JSONL logs, images, summaries.

Every stage writes one JSONL line per finished item (after the item's files are on disk), so a restarted
stage reads the ids already done and skips them: each item is done exactly once, whatever the crash point.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
import socket
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from srum_jax import paths


# ----------------------------------------------------------------------------------------------
# Model


def attn_impl(config, platform: Optional[str] = None) -> str:
  """The attention implementation every stage runs: `model.attn_impl` resolved for `platform` (default: JAX's
  backend; `models.attention.resolve_impl`: `auto` by platform, an explicit choice checked against it)."""
  from srum_jax.models import attention
  return attention.resolve_impl(str(config.model.attn_impl), platform)


def on_mesh(model, fn):
  """`fn` run with the model's mesh as the ambient mesh (`jax.set_mesh`), so the attention kernels run per shard
  of it (`models.attention`); `fn` itself without a mesh."""
  if model.mesh is None:
    return fn

  def run(*args, **kwargs):
    import jax
    with jax.set_mesh(model.mesh):
      return fn(*args, **kwargs)
  return run


@dataclasses.dataclass
class Model:
  """A loaded UMM: config, parameters {'bagel': ..., 'ae': ...}, tokenizer, where it came from, and the mesh
  its parameters are sharded over (None: one device). Inference stages split batch rows over that mesh's
  batch axes and let the parameters' shardings (fsdp / tensor, from the logical-axis rules) do the rest."""
  cfg: Any
  params: Any
  tokenizer: Any
  path: str
  mesh: Any = None
  rules: Any = None  # the logical-axis rules the parameters were placed by
  dtype: Optional[str] = None  # the parameters' dtype as loaded (None: as stored)


def check_model_dir(path: str) -> None:
  """Fail before any work starts when a model directory is missing or incomplete (a `UserError`)."""
  from srum_jax.errors import UserFileNotFoundError
  p = paths.path(path or ".")
  if not path or not p.is_dir():
    raise UserFileNotFoundError(f"model directory {path!r} does not exist (set --config.model.dir to the "
                                f"output of `python -m srum_jax convert`)")
  for need in ("model_config.json", "tokenizer.json", "params/_METADATA"):
    if not (p / need).is_file():
      raise UserFileNotFoundError(f"model directory {path} lacks {need} (convert or save the model again)")


def dir_identity(directory, small: int = 1 << 20) -> str:
  """A SHA-256 identifying a checkpoint directory's files without reading the weights: every file's name, size
  and modification time, the whole of small files (json, tokenizer) and each safetensors file's header (its
  tensor names, dtypes, shapes and offsets). A 29 GB checkpoint costs a few kilobytes of reads. `directory`:
  local (pathlib, nanosecond mtimes) or remote (epath: the object store's size and mtime)."""
  digest = hashlib.sha256()
  remote = paths.is_remote(directory)
  directory = paths.path(directory)
  for f in sorted((p for p in directory.iterdir() if p.is_file()), key=lambda p: p.name):
    st = f.stat()
    size, mtime = (st.length, st.mtime) if remote else (st.st_size, st.st_mtime_ns)
    digest.update(f"{f.name}\0{size}\0{mtime}\n".encode())
    with f.open("rb") as fh:
      if size <= small:
        digest.update(fh.read())
      elif f.suffix == ".safetensors":
        n = int.from_bytes(fh.read(8), "little")
        digest.update(fh.read(min(n, 1 << 26)))
  return digest.hexdigest()


def resolve_model_dir(config) -> str:
  """The model directory the stages load: `config.model.dir`, or, when `config.model.official_dir` is set,
  that official checkpoint (safetensors + json, as `python -m srum_jax export` writes it or BAGEL ships it)
  converted by the converter into `<workdir>/converted_model` (redone only when the official files change:
  their `dir_identity` is stamped next to the result). The config is not changed. Either may be remote
  (`gs://`): a remote official dir is copied into the local cache first (the converter memory-maps
  safetensors)."""
  official = config.model.official_dir
  if not official:
    return config.model.dir
  from srum_jax.convert import hf_to_flax
  src = paths.path(official)
  if not src.is_dir():
    raise FileNotFoundError(f"model.official_dir {official!r} is not a directory")
  dst = paths.path(paths.join(config.workdir, "converted_model"))
  stamp = dst / "converted_from.json"
  want = {"official_dir": official if paths.is_remote(official) else str(pathlib.Path(official).resolve()),
          "identity": dir_identity(official)}
  import jax

  from srum_jax.pipeline import multihost
  if jax.process_index() == 0 and not (stamp.is_file() and json.loads(stamp.read_text()) == want):
    if dst.exists():
      paths.rmtree(dst)
    hf_to_flax.convert(paths.local_copy_dir(official), str(dst), dtype=config.model.param_dtype)
    stamp.write_text(json.dumps(want, indent=2))
    print(f"[model] converted {src} -> {dst}", flush=True)
  multihost.barrier(f"resolve_model_dir:{dst}")  # the other processes wait for process 0's conversion
  return str(dst)


def load_model(path: str, *, dtype: Optional[str] = None, mesh=None, rules=None) -> Model:
  """A model directory's config, tokenizer and parameters, restored straight onto `mesh` (sharded by the
  logical-axis `rules`; None: one device) and cast to `dtype` (None: as stored)."""
  import jax.numpy as jnp

  from srum_jax.convert import checkpoint
  from srum_jax.tokenizer import load_tokenizer
  check_model_dir(path)
  cfg, params = checkpoint.load_model_dir(path, mesh=mesh, dtype=None if dtype is None else jnp.dtype(dtype),
                                          rules=rules)
  tok = load_tokenizer(path)
  tok.check(cfg.tokens)
  return Model(cfg=cfg, params=params, tokenizer=tok, path=path, mesh=mesh, rules=rules, dtype=dtype)


def inference_mesh(config):
  """The mesh inference runs on: this process's devices shaped by `config.inference_mesh` (each host
  generates and scores its own share of the items, so nothing waits on another host); a shape these devices
  cannot take is a `UserError` naming the key."""
  import jax

  from srum_jax import sharding
  from srum_jax.errors import UserValueError
  try:
    return sharding.make_mesh(dict(config.inference_mesh), jax.local_devices())
  except ValueError as e:  # e.g. the 7B recipe's tensor axis of 4 on a 1-device machine
    raise UserValueError(f"config key inference_mesh={dict(config.inference_mesh)}: {e} (this process has "
                         f"{jax.local_device_count()} devices)") from None


def load_inference_model(config, path: str) -> Model:
  """`load_model` onto `inference_mesh(config)` in `model.inference_dtype` (default `model.param_dtype`), by
  the config's sharding rules."""
  from srum_jax import sharding
  return load_model(path, dtype=config.model.inference_dtype or config.model.param_dtype,
                    mesh=inference_mesh(config), rules=sharding.rules_from_config(config.sharding_rules))


def batch_ways(model: Model) -> int:
  """How many ways batch rows split over the model's mesh (its 'data' x 'fsdp' axes; 1 without a mesh)."""
  if model.mesh is None:
    return 1
  return int(np.prod([model.mesh.shape[a] for a in ("data", "fsdp")]))


def batch_rows_mesh(model: Model, rows: int):
  """The model's mesh when `rows` split over its batch axes (they then run data-parallel), else None (rows
  replicated on every device; the parameters stay sharded)."""
  ways = batch_ways(model)
  return model.mesh if ways > 1 and rows % ways == 0 else None


def pad_rows(items: Sequence, multiple: int) -> List:
  """`items` with its last item repeated up to a multiple of `multiple` (the caller keeps the first len)."""
  items = list(items)
  return items + items[-1:] * (-len(items) % multiple) if items else items


def write_model_dir(path: str, cfg, params, source_dir: str) -> str:
  """`params` as a model directory (orbax + model_config.json) with the tokenizer and json files of the model
  dir it was trained from (`python -m srum_jax export` turns it into official safetensors). Every process
  takes part in the orbax save (its shards); process 0 copies the files. Local or remote (`gs://`) alike."""
  import jax

  from srum_jax.convert import checkpoint
  from srum_jax.pipeline import multihost
  dst = paths.path(path)
  if jax.process_index() == 0 and dst.exists():
    paths.rmtree(dst)
  multihost.barrier(f"write_model_dir:{dst}:clean")
  checkpoint.save_model_dir(str(dst), cfg, params)
  if jax.process_index() == 0:
    for f in paths.path(source_dir).iterdir():
      if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "llm_config", "vit_config", "vocab",
                                            "merges")):
        paths.copy_file(f, dst / f.name)
  multihost.barrier(f"write_model_dir:{dst}:done")
  return str(dst)


def save_model(path: str, model: Model, params) -> Model:
  """`write_model_dir`, then the written model loaded like `model` (same mesh, rules and dtype): trained
  parameters live on the training mesh, which spans every host, while inference runs on each host's own."""
  write_model_dir(path, model.cfg, params, model.path)
  return load_model(path, dtype=model.dtype, mesh=model.mesh, rules=model.rules)


# ----------------------------------------------------------------------------------------------
# Resumable logs


def stable_int(text: str, bits: int = 31) -> int:
  """A platform-independent integer from a string (per-item seeds)."""
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % (1 << bits)


@dataclasses.dataclass
class LogReport:
  """What reading resumable logs skipped: lines that are not UTF-8 (e.g. torn inside a multi-byte character
  by a crash mid-write), not a JSON object with a string `id`, missing a field the reader needs, or a second
  row of an id already read."""
  rows: int = 0
  undecodable: int = 0
  malformed: int = 0
  missing_field: int = 0
  duplicate_id: int = 0

  @property
  def skipped(self) -> int:
    return self.undecodable + self.malformed + self.missing_field + self.duplicate_id

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

  def read(self) -> Tuple[List[Dict[str, Any]], LogReport]:
    """(well-formed rows in file order, what was skipped)."""
    rep = LogReport()
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
    import uuid
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


def _part_number(name: str) -> int:
  """The write number of a remote log's part object `<n>-<random>.jsonl` (-1 for a foreign name)."""
  head = name.split("-", 1)[0]
  return int(head) if head.isdigit() else -1


def process_log(directory: str, stem: str) -> JsonlLog:
  """This process's resumable log `<stem>.jsonl` in `directory` (`<stem>.<process>.jsonl` when several
  processes share the directory: no two processes ever append to one file). The caller is the log's writer:
  a remote log's parts are folded in now (`JsonlLog.compact`)."""
  import jax
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


def read_rows(directory: str, stem: str, *, require: Sequence[str] = (), report: Optional[LogReport] = None
              ) -> List[Dict[str, Any]]:
  """The rows of every process's `<stem>*.jsonl` log in `directory` (merged files included), one per id (the
  first seen, files in name order), in the prompt set's order (`seq`, when every row has one) whatever the
  number of processes that wrote them. Rows lacking a field of `require` are skipped; every skip is counted
  in `report` (when given)."""
  rows, seen, rep = [], set(), LogReport()
  files = log_paths(directory, stem)
  per_process = any(os.path.basename(p) != f"{stem}.jsonl" for p in files)
  for p in files:
    got, file_rep = JsonlLog(p).read()
    rep.add(file_rep)
    merged = per_process and os.path.basename(p) == f"{stem}.jsonl"  # process 0's copy of every process's rows
    for r in got:
      if any(k not in r for k in require):
        rep.missing_field += int(not merged)
      elif r["id"] in seen:
        rep.duplicate_id += int(not merged)
      else:
        seen.add(r["id"])
        rows.append(r)
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
  import jax

  from srum_jax.pipeline import multihost
  multihost.barrier(f"merge:{directory}:{stem}:ready")
  if jax.process_count() == 1:
    JsonlLog(paths.join(directory, f"{stem}.jsonl")).compact()  # a no-op for a local log
  if jax.process_count() > 1 and jax.process_index() == 0:
    rows = read_rows(directory, stem)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    paths.write_bytes(paths.join(directory, f"{stem}.jsonl"), data)
  multihost.barrier(f"merge:{directory}:{stem}:done")


def save_png(path: str, image: np.ndarray) -> None:
  """Atomic PNG write (`paths.write_bytes`): a crash never leaves a half-written image under the final name."""
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  paths.write_bytes(path, buf.getvalue())


def load_rgb(path: str) -> Tuple[Optional[np.ndarray], Optional[str]]:
  """(uint8 HWC image, None) or (None, reason) for a missing or corrupt file."""
  from PIL import Image
  try:
    with Image.open(paths.readable(path)) as im:
      return np.asarray(im.convert("RGB")), None
  except FileNotFoundError:
    return None, "missing"
  except Exception as e:  # corrupt / truncated / not an image
    return None, f"corrupt ({type(e).__name__})"


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
  for i in range(0, len(items), size):
    yield items[i:i + size]


def image_file_name(item_id: str, suffix: str = ".png") -> str:
  """The file name of an item's image: a readable prefix of the id (characters outside [A-Za-z0-9._-] become
  '_', at most 80 of them) and the first 16 hex digits of the SHA-256 of the whole id, so ids that differ
  only in replaced characters or after the prefix get distinct files. A pure function of the id: a restarted
  stage finds its files again."""
  prefix = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id)[:80].lstrip(".") or "item"
  return f"{prefix}-{hashlib.sha256(item_id.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}{suffix}"


QUIET_INTERVAL_S = 30.0  # seconds between progress lines when the output is not a terminal


def progress_options(stream=None) -> Dict[str, Any]:
  """tqdm options: a live bar on a terminal; otherwise (a log file, a pipe) one line per `QUIET_INTERVAL_S`
  at most, without the carriage-return redraws that fill logs."""
  stream = sys.stderr if stream is None else stream
  try:
    tty = stream.isatty()
  except (AttributeError, ValueError):
    tty = False
  if tty:
    return dict(file=stream, dynamic_ncols=True)
  return dict(file=_LineStream(stream), mininterval=QUIET_INTERVAL_S, maxinterval=QUIET_INTERVAL_S, ncols=100,
              ascii=True)


class _LineStream:
  """A file for tqdm off a terminal: each redraw becomes one plain line (no carriage returns, no blank
  clearing frames)."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> None:
    text = text.replace("\r", "").strip()
    if text:
      self.stream.write(text + "\n")

  def flush(self) -> None:
    self.stream.flush()


def progress(total: int, desc: str, initial: int = 0, disable: bool = False, leave: bool = False,
             unit: str = "item"):
  """A progress bar on stderr, quiet off a terminal (`progress_options`)."""
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, disable=disable,
              **progress_options())


def process_shard(items: Sequence) -> Sequence:
  """This host's share of the items (round robin by jax process index)."""
  import jax
  return items[jax.process_index()::jax.process_count()]


def write_json(path: str, obj: Any) -> None:
  """`obj` as indented JSON, written atomically (`paths.write_bytes`)."""
  paths.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=float).encode("utf-8"))


def summary_line(stage: str, **counts) -> str:
  parts = ", ".join(f"{k}={v}" for k, v in counts.items())
  line = f"[{stage}] {parts}"
  print(line, flush=True)
  return line


# ----------------------------------------------------------------------------------------------
# Workdir lock


LOCK_NAME = ".srum_lock.json"


class WorkdirBusy(RuntimeError):
  """Another live command holds the workdir's lock."""


def _process_start(pid: int) -> Optional[str]:
  """The kernel's start time of process `pid` (Linux /proc; None where unknown): a pid reused by another
  process after the holder died has a different one."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      return f.read().rsplit(b")", 1)[1].split()[19].decode()
  except (OSError, IndexError):
    return None


def _alive(holder: Dict[str, Any]) -> bool:
  """Whether a lock holder on this host still runs (the same pid with the same start time)."""
  pid = holder.get("pid")
  if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # alive, owned by another user
  start = holder.get("proc_start")
  return start is None or _process_start(pid) in (None, start)


def _read_holder(path: pathlib.Path) -> Optional[Dict[str, Any]]:
  """The lock file's holder, {} for an unreadable (torn) file, None when there is no lock file."""
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    return None
  try:
    holder = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, ValueError):
    return {}
  return holder if isinstance(holder, dict) else {}


REMOTE_SETTLE_S = 2.0  # remote lock: seconds between writing the lock object and reading it back


def _create_exclusive(path, data: bytes) -> bool:
  """Create `path` holding `data` unless it exists (O_EXCL: atomic among processes); whether it was created.
  A remote `path` takes `_create_if_absent_remote` (best effort)."""
  if paths.is_remote(path):
    return _create_if_absent_remote(path, data)
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  try:
    os.write(fd, data)
    os.fsync(fd)
  finally:
    os.close(fd)
  return True


def _create_if_absent_remote(path, data: bytes) -> bool:
  """`_create_exclusive` on an object store, best effort: epath offers no exclusive create (GCS's
  if-generation-match precondition is not reachable through it), so: absent? write, wait `REMOTE_SETTLE_S`,
  read back. Of two commands racing within that window the later write wins and the other backs off; both
  run only when one's write lands more than `REMOTE_SETTLE_S` after the other's first read (a slow write)."""
  if path.exists():
    return False
  path.write_bytes(data)
  time.sleep(REMOTE_SETTLE_S)
  try:
    return path.read_bytes() == data
  except FileNotFoundError:
    return False


class WorkdirLock:
  """One command at a time on a workdir: `<workdir>/.srum_lock.json` names the holder (host, pid, start time,
  command). Taken by creating the file exclusively; a lock left by a dead process on this host (its pid gone,
  or reused by a newer process) is taken over under a second exclusive file, so two commands taking over the
  same stale lock cannot both win. A live holder, or one on another host (which cannot be checked from here),
  makes `acquire` raise `WorkdirBusy` naming it. Several processes of one multi-host run share the workdir:
  only process 0 takes the lock (`workdir_lock`).

  On a remote workdir (`gs://`) the same protocol runs on objects, but the create is only best effort
  (`_create_if_absent_remote`: read, write, read back; a warning says so): it stops a second command started
  later, not two started within seconds of each other."""

  def __init__(self, workdir: str, command: str = ""):
    self.dir = paths.path(workdir)
    self.path = self.dir / LOCK_NAME
    self.takeover = self.dir / (LOCK_NAME + ".takeover")
    self.me = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _process_start(os.getpid()),
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command}
    self.held = False
    self.took_over: Optional[Dict[str, Any]] = None

  def _describe(self, holder: Dict[str, Any]) -> str:
    if not holder:
      return f"workdir {self.dir} is locked by an unreadable lock file {self.path}"
    return (f"workdir {self.dir} is in use by {holder.get('command') or 'a command'} on host "
            f"{holder.get('host')} (pid {holder.get('pid')}, started {holder.get('started')}); wait for it to "
            f"finish, or, if that process is gone, delete {self.path}")

  def _stale(self, holder: Dict[str, Any]) -> bool:
    return bool(holder) and holder.get("host") == self.me["host"] and not _alive(holder)

  def acquire(self) -> "WorkdirLock":
    self.dir.mkdir(parents=True, exist_ok=True)
    if paths.is_remote(self.dir):
      print(f"[lock] {self.dir} is on an object store: the workdir lock is best effort (no exclusive create); "
            f"do not start two commands on it at once", flush=True)
    data = json.dumps(self.me).encode()
    for _ in range(3):
      if _create_exclusive(self.path, data):
        self.held = True
        return self
      holder = _read_holder(self.path)
      if holder is None:  # released meanwhile
        continue
      if not self._stale(holder):
        raise WorkdirBusy(self._describe(holder))
      self._take_over(holder, data)
      if self.held:
        return self
    raise WorkdirBusy(self._describe(_read_holder(self.path) or {}))

  def _take_over(self, stale: Dict[str, Any], data: bytes) -> None:
    """Replace the stale lock `stale`, holding the takeover file (itself taken over when its maker died)."""
    if not _create_exclusive(self.takeover, data):
      other = _read_holder(self.takeover)
      if other is None or not self._stale(other) or not _create_exclusive_replacing(self.takeover, other, data):
        return
    try:
      if _read_holder(self.path) == stale:  # nobody replaced it meanwhile
        self.path.unlink()
        if _create_exclusive(self.path, data):
          self.held, self.took_over = True, stale
          print(f"[lock] took over the lock of a process that is gone: {stale}", flush=True)
    finally:
      self.takeover.unlink(missing_ok=True)

  def release(self) -> None:
    if self.held and _read_holder(self.path) == self.me:
      self.path.unlink(missing_ok=True)
    self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False


def _create_exclusive_replacing(path: pathlib.Path, stale: Dict[str, Any], data: bytes) -> bool:
  """Replace the stale takeover file `path` (left by a process that died inside `_take_over`)."""
  if _read_holder(path) != stale:
    return False
  path.unlink(missing_ok=True)
  return _create_exclusive(path, data)


class _NoLock:
  """The lock of a process other than 0 (process 0 holds the run's lock)."""
  held = False

  def acquire(self) -> "_NoLock":
    return self

  def release(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def workdir_lock(workdir: str, command: str = ""):
  """The workdir's lock for this run: a `WorkdirLock` on process 0, nothing on the other processes of a
  multi-process run (they share process 0's workdir and its lock)."""
  import jax
  return WorkdirLock(workdir, command) if jax.process_index() == 0 else _NoLock()
