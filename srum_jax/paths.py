"""Workdir paths that may live on an object store (`gs://bucket/run`, any `etils.epath` scheme).

A path with a scheme (`gs://`, `s3://`, ...) is *remote*: it goes through `etils.epath` (fsspec / gfile), and
its writes are single whole-object writes (an object appears complete or not at all, so no temporary name and
rename is needed). A local path keeps the plain os / pathlib calls it always used (tmp + `os.replace`,
appends, `O_EXCL`). What an object store cannot do (append, exclusive create, memory-map) is handled where it
is needed: resumable logs as part objects (`workdir.logs.JsonlLog`), a best-effort workdir lock
(`workdir.locking.WorkdirLock`), and files that must be local (ArrayRecord, memory-mapped moments, the
tokenizer file) in a per-URL local cache (`local_cache_dir`, `local_copy`).

    paths.is_remote("gs://b/run")                  # True
    paths.join("gs://b/run", "generate", "x.png")  # "gs://b/run/generate/x.png" (pathlib would eat a slash)
    paths.write_bytes("gs://b/run/report.json", data)
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import pathlib
import posixpath
import re
import shutil
import tempfile
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]

CACHE_ENV = "SRUM_JAX_LOCAL_CACHE"  # where remote files that must be local are copied (default: tmp dir)


def is_remote(path: PathLike) -> bool:
  """Whether `path` names an object store location (`scheme://...`), not a local file."""
  return "://" in os.fspath(path)


def path(p: PathLike):
  """A path object for `p`: `etils.epath.Path` when remote (its `/` joins keep `gs://`), `pathlib.Path` when
  local (the calls local paths always made). Both have exists / is_file / is_dir / iterdir / glob / mkdir /
  read_bytes / write_bytes / unlink; use `rmtree` and `copy_file` here for the rest."""
  if is_remote(p):
    return epath.Path(p)
  return pathlib.Path(p)


def rmtree(p: PathLike) -> None:
  """Delete the folder `p` and everything under it (local: `shutil.rmtree`)."""
  if is_remote(p):
    path(p).rmtree()
  else:
    shutil.rmtree(p)


def join(base: PathLike, *parts: str) -> str:
  """`base/parts...` as a string for local and remote paths alike."""
  base = os.fspath(base)
  return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def abspath(p: PathLike) -> str:
  """The absolute form of a local path; a remote path as it is (`os.path.abspath` would mangle `gs://`)."""
  p = os.fspath(p)
  return p if is_remote(p) else os.path.abspath(p)


def readable(p: PathLike):
  """Something `PIL.Image.open` / `numpy.load` read: the local path itself, or a remote object's bytes in
  memory (a missing object raises FileNotFoundError, like a missing file)."""
  return io.BytesIO(path(p).read_bytes()) if is_remote(p) else os.fspath(p)


def write_bytes(p: PathLike, data: bytes) -> None:
  """Write `p` whole: locally under a temporary name then renamed (a crash never leaves a torn file
  under the final name); remotely one object write (objects are all-or-nothing). Parent folders are
  made; a folder at `p`, or a file where a parent folder belongs, raises the `OSError` naming it."""
  if is_remote(p):
    q = path(p)
    q.parent.mkdir(parents=True, exist_ok=True)
    q.write_bytes(data)
    return
  p = os.fspath(p)
  os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)  # a file in the way: raises
  if os.path.isdir(p):  # never a rename onto a folder (its error would name the temporary file)
    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), p)
  tmp = f"{p}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, p)
  except BaseException:  # a full disk, a signal: no torn temporary file left behind either
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def local_cache_dir(p: PathLike) -> str:
  """A local folder standing for the remote folder `p` (a local `p` is itself): `$SRUM_JAX_LOCAL_CACHE` (default
  `<tmp>/srum_jax_cache`) / a readable tail of the URL + a hash of the whole URL. For data that must be a local
  file (ArrayRecord, memory maps); its contents are caches keyed by their inputs, so a fresh host rebuilds them."""
  p = os.fspath(p)
  if not is_remote(p):
    return p
  root = os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "srum_jax_cache")
  tail = re.sub(r"[^A-Za-z0-9._-]+", "_", p.split("://", 1)[1])[-60:].strip("_.") or "root"
  d = os.path.join(root, f"{tail}-{hashlib.sha256(p.encode()).hexdigest()[:12]}")
  os.makedirs(d, exist_ok=True)
  return d


def local_copy(p: PathLike) -> str:
  """A local file with `p`'s content (a local `p` is itself): a remote object is copied into
  `local_cache_dir(its folder)` when absent or of another size. For readers that only take file names (e.g.
  `tokenizer_file=`)."""
  p = os.fspath(p)
  if not is_remote(p):
    return p
  src = path(p)  # an epath.Path (remote)
  dst = os.path.join(local_cache_dir(os.fspath(src.parent)), src.name)
  size = src.stat().length
  if not (os.path.isfile(dst) and os.path.getsize(dst) == size):
    write_bytes(dst, src.read_bytes())
  return dst


def local_copy_dir(p: PathLike) -> str:
  """A local folder with the files (top level) of folder `p` (a local `p` is itself), via `local_copy`."""
  p = os.fspath(p)
  if not is_remote(p):
    return p
  for f in path(p).iterdir():
    if f.is_file():
      local_copy(os.fspath(f))
  return local_cache_dir(p)


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Copy one file; `shutil.copy2` between local paths (metadata kept, as before), epath otherwise."""
  if is_remote(src) or is_remote(dst):
    path(src).copy(path(dst), overwrite=True)
  else:
    shutil.copy2(src, dst)


def upload_dir(local: str, remote: PathLike) -> None:
  """Copy the files of the local folder `local` (top level) to the folder `remote`, each as one object."""
  for name in sorted(os.listdir(local)):
    src = os.path.join(local, name)
    if os.path.isfile(src):
      with open(src, "rb") as f:
        write_bytes(join(remote, name), f.read())


def move_tree(src: PathLike, dst: PathLike) -> None:
  """Move the folder `src` to `dst`: `os.replace` locally; on an object store (no folder rename) every object is
  copied, then `src` deleted."""
  if not (is_remote(src) or is_remote(dst)):
    os.replace(src, dst)
    return

  def copy_tree(a, b):
    for p in path(a).iterdir():
      if p.is_dir():
        copy_tree(os.fspath(p), join(b, p.name))
      else:
        copy_file(p, join(b, p.name))
  copy_tree(os.fspath(src), os.fspath(dst))
  rmtree(src)
