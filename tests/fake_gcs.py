"""A fake `gs://` for tests: an fsspec file system registered under the `gs` / `gcs` protocols (the ones
`etils.epath` asks fsspec for) that stores objects under a local folder and, like an object store, refuses
appends and exclusive creates, so a test on it proves the object-store code paths are the ones taken."""
from __future__ import annotations

import contextlib
import os
import posixpath

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import stringify_path


class FakeGCS(LocalFileSystem):
  """`gs://bucket/key` -> `<root>/bucket/key`; open modes with 'a', 'x' or '+' raise; `opened` counts modes."""
  protocol = ("gs", "gcs")
  root = "/nonexistent"  # set by `fake_gcs`
  opened: dict = {}

  @classmethod
  def _strip_protocol(cls, path):
    path = stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    if path.startswith(cls.root + "/") or path == cls.root:
      return path.rstrip("/")
    return posixpath.join(cls.root, path.lstrip("/")).rstrip("/")

  def unstrip(self, local: str) -> str:
    """`<root>/bucket/key` -> `bucket/key` (the way gcsfs names objects)."""
    return local[len(self.root) + 1:] if local.startswith(self.root + "/") else local

  def glob(self, path, **kwargs):
    return [self.unstrip(p) for p in super().glob(path, **kwargs)]

  def _open(self, path, mode="rb", **kwargs):
    if any(c in mode for c in "ax+"):
      raise ValueError(f"an object store cannot open {path!r} in mode {mode!r}")
    FakeGCS.opened[mode] = FakeGCS.opened.get(mode, 0) + 1
    if "w" in mode:
      os.makedirs(os.path.dirname(self._strip_protocol(path)), exist_ok=True)  # objects need no folders
    return super()._open(path, mode=mode, **kwargs)


@contextlib.contextmanager
def fake_gcs(root: str):
  """`gs://` served from `root` for the duration (fsspec registry and epath's cached file system restored)."""
  from etils.epath import backend
  from fsspec.registry import _registry
  old = {p: fsspec.registry.get(p) for p in ("gs", "gcs")}
  FakeGCS.root, FakeGCS.opened = os.path.abspath(root), {}
  os.makedirs(FakeGCS.root, exist_ok=True)
  for p in ("gs", "gcs"):
    fsspec.register_implementation(p, FakeGCS, clobber=True)
  FakeGCS.clear_instance_cache()
  backend.fsspec_backend._get_filesystem.cache_clear()
  try:
    yield FakeGCS
  finally:
    backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.clear_instance_cache()
    for p, cls in old.items():
      if cls is None:
        _registry.pop(p, None)
      else:
        fsspec.register_implementation(p, cls, clobber=True)
