"""What the stages need from a multi-process (multi-host) run: barriers and shared flags.

Every process runs the same command on one shared workdir (a shared file system or a `gs://` bucket).
Inference stages split their items round-robin by process and write per-process logs; a barrier after each
stage makes the next one see every process's output. With one process everything here is a no-op.
"""
from __future__ import annotations

import jax
import numpy as np

__all__ = ["barrier", "any_process", "is_main", "sum_over_processes"]


def is_main() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Wait until every process reached the barrier `name` (the same name, in the same order, everywhere)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True when `flag` is set on any process (so every process takes the same branch, e.g. stops together)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def sum_over_processes(counts: dict) -> dict:
  """{name: int} summed over every process (the same names everywhere, e.g. a stage's report)."""
  if jax.process_count() == 1:
    return dict(counts)
  from jax.experimental import multihost_utils
  names = sorted(counts)
  total = np.asarray(multihost_utils.process_allgather(np.asarray([int(counts[k]) for k in names], np.int64)))
  return dict(zip(names, (int(v) for v in total.reshape(-1, len(names)).sum(0))))
