"""Multi-host start-up: call `jax.distributed.initialize()` exactly once when running on several hosts.

TPU pods: every host runs the same command (launch/tpu.sh --worker=all) and JAX discovers its peers itself.
GPU clusters: launch/gpu.sh exports SRUM_COORDINATOR / SRUM_NUM_PROCESSES / SRUM_PROCESS_ID (several CPU
processes on one machine, as the multi-host test runs them, use the same variables).
"""
from __future__ import annotations

import os

_initialized = False


def maybe_initialize() -> bool:
  """Initialise jax.distributed when the environment says this is one of several processes."""
  global _initialized
  if _initialized:
    return True
  import jax
  num = int(os.environ.get("SRUM_NUM_PROCESSES", "1") or 1)
  if num > 1:
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU processes (tests, CPU clusters) talk through gloo
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ["SRUM_COORDINATOR"], num_processes=num,
                               process_id=int(os.environ["SRUM_PROCESS_ID"]))
    _initialized = True
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0 or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()  # multi-host TPU slice: peers come from the TPU metadata
    _initialized = True
  return _initialized
