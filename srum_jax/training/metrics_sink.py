"""The one metrics sink of every trainer: a JSONL row per logged step, its scalars in TensorBoard.

    with MetricsSink(workdir, "metrics.jsonl", main=jax.process_index() == 0) as sink:
      sink.write("train", step, {"loss": 0.51, "lr": 1e-3})

A row is {"stage", "step", "time" (seconds since the sink opened), scalars...} appended to
`<dir>/<name>`; the scalars also go to TensorBoard (`<dir>/tb`, tag `<stage>/<name>`) and to
`history` (this invocation's (step, value) pairs per tag, e.g. for a loss curve). On an object store
both follow the remote-log policy of `workdir.logs` (`BufferedLog`): rows written as part objects at
most every minute, TensorBoard's event files written in a local cache folder and copied to
`<dir>/tb` at the same moments. Only the main process writes; elsewhere the sink does nothing.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Tuple

from tensorboardX import SummaryWriter

from srum_jax import paths
from srum_jax.workdir import logs

__all__ = ["MetricsSink"]


class MetricsSink:
  """JSONL rows + TensorBoard scalars of one run directory (see the module docstring). `fresh`: drop
  the rows and events an earlier run left there (a run that starts over rather than resumes)."""

  def __init__(self, directory: str, name: str = "metrics.jsonl", *, main: bool = True,
               fresh: bool = False):
    self.main, self.t0 = main, time.time()
    self.history: Dict[str, List[Tuple[int, float]]] = {}
    self.rows = self.writer = None
    if not main:
      return
    tb = paths.join(directory, "tb")
    if fresh:
      paths.path(paths.join(directory, name)).unlink(missing_ok=True)
      if paths.path(tb).exists():
        paths.rmtree(tb)
    local_tb = paths.local_cache_dir(tb)
    os.makedirs(local_tb, exist_ok=True)
    self.writer = SummaryWriter(local_tb)
    self.rows = logs.BufferedLog(logs.JsonlLog(paths.join(directory, name)), mirror=(local_tb, tb))

  def write(self, stage: str, step: int, scalars: Dict[str, float]) -> None:
    """One row of `stage` at `step` (host numbers: floats, ints)."""
    if not self.main:
      return
    values = {k: v if isinstance(v, int) else float(v) for k, v in scalars.items()}
    for k, v in values.items():
      self.history.setdefault(f"{stage}/{k}", []).append((step, v))
      self.writer.add_scalar(f"{stage}/{k}", v, step)
    self.writer.flush()
    self.rows.append(dict(stage=stage, step=int(step), time=time.time() - self.t0, **values))

  def close(self) -> None:
    """Close the TensorBoard writer, then write what is held and copy the events (remote)."""
    if self.main:
      self.writer.close()
      self.rows.close()

  def __enter__(self) -> "MetricsSink":
    return self

  def __exit__(self, *exc) -> bool:
    self.close()
    return False
