"""One command at a time per workdir: the lock file `<workdir>/.srum_lock.json` and its protocol."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import sys
import time
from typing import Any, Callable, Dict, Optional

import jax

from srum_jax import distributed, paths

LOCK_NAME = ".srum_lock.json"


class WorkdirBusy(RuntimeError):
  """Another live command holds the workdir's lock."""


def _process_start(pid: int) -> Optional[str]:
  """The kernel's start time of process `pid` (Linux /proc; None where unknown): a pid reused by
  another process after the holder died has a different one."""
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
  """The lock file's holder, {} for an unreadable (torn or empty) file, None when there is no lock
  file; a folder in its place raises `WorkdirBusy` saying so (nothing can lock the workdir while it
  is there)."""
  if path.is_dir():
    raise WorkdirBusy(f"{path} is a folder, not a lock file: remove it (no command can hold the "
                      f"workdir's lock while it is there)")
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
# An unreadable (empty, torn) lock file older than this was left by a process that died between
# creating it and writing it (the two are microseconds apart): it is stale.
UNREADABLE_STALE_S = 60.0


def _age(path) -> float:
  """Seconds since `path` was last modified (0 when unknown)."""
  try:
    st = path.stat()
    mtime = st.mtime if paths.is_remote(path) else st.st_mtime
    return max(0.0, time.time() - float(mtime))
  except (OSError, AttributeError, TypeError, ValueError):
    return 0.0


def _create_exclusive(path, data: bytes) -> bool:
  """Create `path` holding `data` unless it exists (O_EXCL: atomic among processes); whether it was
  created. A remote `path` takes `_create_if_absent_remote` (best effort)."""
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
  if-generation-match precondition is not reachable through it), so: absent? write, wait
  `REMOTE_SETTLE_S`, read back. Of two commands racing within that window the later write wins and
  the other backs off; both run only when one's write lands more than `REMOTE_SETTLE_S` after the
  other's first read (a slow write)."""
  if path.exists():
    return False
  path.write_bytes(data)
  time.sleep(REMOTE_SETTLE_S)
  try:
    return path.read_bytes() == data
  except FileNotFoundError:
    return False


class WorkdirLock:
  """One command at a time on a workdir: `<workdir>/.srum_lock.json` names the holder (host, pid,
  start time, command). Taken by creating the file exclusively; a lock left by a dead process on
  this host (its pid gone, or reused by a newer process) is taken over under a second exclusive
  file, so two commands taking over the same stale lock cannot both win. A live holder, or one on
  another host (which cannot be checked from here), makes `acquire` raise `WorkdirBusy` naming it.
  Several processes of one multi-host run share the workdir: only process 0 takes the lock
  (`workdir_lock`).

  On a remote workdir (`gs://`) the same protocol runs on objects, but the create is only best
  effort (`_create_if_absent_remote`: read, write, read back; a warning says so): it stops a second
  command started later, not two started within seconds of each other."""

  def __init__(self, workdir: str, command: str = ""):
    self.dir = paths.path(workdir)
    self.path = self.dir / LOCK_NAME
    self.takeover = self.dir / (LOCK_NAME + ".takeover")
    self.me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "proc_start": _process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command
    }
    self.held = False
    self.took_over: Optional[Dict[str, Any]] = None

  def _describe(self, holder: Dict[str, Any]) -> str:
    if not holder:
      stale = f"{UNREADABLE_STALE_S:.0f} s"
      return (f"workdir {self.dir} is locked by an unreadable lock file {self.path} (being written "
              f"right now, or left by a crash: it counts as stale {stale} after it was made); if "
              f"no command runs on this workdir, delete {self.path}")
    return (
        f"workdir {self.dir} is in use by {holder.get('command') or 'a command'} on host "
        f"{holder.get('host')} (pid {holder.get('pid')}, started {holder.get('started')}); wait "
        f"for it to "
        f"finish, or, if that process is gone, delete {self.path}")

  def _stale(self, holder: Dict[str, Any], path=None) -> bool:
    if not holder:  # unreadable: a creator that died before writing it, once it is old enough
      return _age(self.path if path is None else path) > UNREADABLE_STALE_S
    return holder.get("host") == self.me["host"] and not _alive(holder)

  def acquire(self) -> "WorkdirLock":
    self.dir.mkdir(parents=True, exist_ok=True)
    if paths.is_remote(self.dir):
      print(
          f"[lock] {self.dir} is on an object store: the workdir lock is best effort (no "
          f"exclusive create); "
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
    """Replace the stale lock `stale`, holding the takeover file (itself taken over when its
    maker died)."""
    if not _create_exclusive(self.takeover, data):
      other = _read_holder(self.takeover)
      if (other is None or not self._stale(other, self.takeover)
              or not _create_exclusive_replacing(self.takeover, other, data)):
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
  """The workdir's lock for this run: a `WorkdirLock` on process 0, nothing on the other processes
  of a multi-process run (they share process 0's workdir and its lock)."""
  return WorkdirLock(workdir, command) if jax.process_index() == 0 else _NoLock()


def run_locked(workdir: str, command: str, fn: Callable[[], int]) -> int:
  """`fn()` holding the workdir's lock (after jax.distributed is up: only process 0 takes it, and
  every process of the run stops when it cannot); exit code 2 and one line naming the holder when
  another command holds it."""
  distributed.maybe_initialize()
  lock, busy = workdir_lock(workdir, command), None
  try:
    lock.acquire()
  except WorkdirBusy as e:
    busy = str(e)
  if distributed.any_process(busy is not None):
    print(f"error: {busy or f'workdir {workdir} is in use (process 0 could not take its lock)'}",
          file=sys.stderr, flush=True)
    return 2
  try:
    code = fn()
    # every process leaves together: one that ends first waits in JAX's shutdown barrier, whose
    # deadline a slower process 0 (the report, the last checkpoint) must not pass
    distributed.barrier(f"done:{workdir}")
    return code
  finally:
    lock.release()
