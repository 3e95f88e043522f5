"""Several processes (hosts) on one run: start-up, barriers, shared flags and the split of work.

Start-up: `maybe_initialize` calls `jax.distributed.initialize()` exactly once when running on
several hosts. TPU pods: every host runs the same command (launch/tpu.sh --worker=all) and JAX
discovers its peers itself. GPU clusters: launch/gpu.sh exports SRUM_COORDINATOR /
SRUM_NUM_PROCESSES / SRUM_PROCESS_ID (several CPU processes on one machine, as the multi-host test
runs them, use the same variables).

Every process runs the same command on one shared workdir (a shared file system or a `gs://`
bucket). Inference stages split their items round-robin by process (`process_shard`) and write
per-process logs; a barrier after each stage makes the next one see every process's output. With one
process the barriers and flags are no-ops.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

_initialized = False


def maybe_initialize() -> bool:
  """Initialise jax.distributed when the environment says this is one of several processes."""
  global _initialized
  if _initialized:
    return True
  num = int(os.environ.get("SRUM_NUM_PROCESSES", "1") or 1)
  if num > 1:
    # CPU processes (tests, CPU clusters) talk through gloo
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ["SRUM_COORDINATOR"],
                               num_processes=num, process_id=int(os.environ["SRUM_PROCESS_ID"]))
    _initialized = True
  elif os.environ.get("TPU_WORKER_HOSTNAMES",
                      "").count(",") > 0 or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()  # multi-host TPU slice: peers come from the TPU metadata
    _initialized = True
  return _initialized


def is_main() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Wait until every process reached the barrier `name` (the same name, in the same order,
  everywhere)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True when `flag` is set on any process (so every process takes the same branch, e.g. stops
  together)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def sum_over_processes(counts: dict) -> dict:
  """{name: int} summed over every process (the same names everywhere, e.g. a stage's report)."""
  if jax.process_count() == 1:
    return dict(counts)
  names = sorted(counts)
  total = np.asarray(
      multihost_utils.process_allgather(np.asarray([int(counts[k]) for k in names], np.int64)))
  return dict(zip(names, (int(v) for v in total.reshape(-1, len(names)).sum(0))))


def process_shard(items: Sequence) -> Sequence:
  """This host's share of the items (round robin by jax process index)."""
  return items[jax.process_index()::jax.process_count()]


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
  """`items` in consecutive chunks of `size` (the last one shorter)."""
  for i in range(0, len(items), size):
    yield items[i:i + size]
