"""The one training loop of every trainer (the SRUM train stage, pretraining's stages A and B).

    loop = TrainLoop("train", total, stop=flag,
                     checkpoints=Checkpoints(ckpt, every=Every(steps=100), meta=...),
                     metrics=LogMetrics(sink, "train", Every(steps=10, last=True), mean=True),
                     hooks=[Hook(write_samples, Every(steps=100))])
    restored = loop.restore_or_init(abstract_state, init)  # the newest good checkpoint, or init()
    result = loop.run(restored.state, advance, start=restored.step or 0)

`advance(state, index) -> (state, metrics)` takes the update of 0-based `index`: the trainer fetches
its batch and calls its jitted step (data, noise and learning rate are functions of the index, so a
resumed run reproduces the uninterrupted one bit for bit). Everything around it is the loop's, the
same for all:
  * stop conditions, checked before every step and once after the last: the preemption flag (SIGTERM
    / SIGINT, `preemption.PreemptionFlag`; every process agrees) ends the loop `preempted`, after a
    forced save; the wall-clock `deadline` (absolute: a cap over restarts is the caller's deadline
    less the time its checkpoint says was used) ends it like a finished run (`out_of_time`);
  * after each step, in this order: the progress bar; the metrics (`LogMetrics`: the step's values
    or their mean since the last row, to the one `MetricsSink`); a periodic checkpoint
    (`Checkpoints.every`, by steps and / or wall clock, then its `snapshot`); the hooks (`Hook`),
    each when its `Every` says;
  * checkpoints: the state, the PRNG key data, the data iterator's state and the trainer's meta,
    plus `seconds`, the training's total time over every invocation; a forced save when the flag
    stops the loop (a step saved already is not saved again) and, with `at_end`, whenever it ends;
    restoring falls back over damaged steps (`Checkpointer.restore_latest_good`).
`LoopResult.seconds` is the total that the final state's checkpoint records (so a resume with
nothing left to do reports the same number); without such a save, the carried total plus this
invocation's time if it took a step.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from srum_jax import distributed, progress
from srum_jax.training.checkpointing import Checkpointer
from srum_jax.training.metrics_sink import MetricsSink
from srum_jax.training.preemption import PreemptionFlag

__all__ = ["Every", "StepInfo", "Hook", "LogMetrics", "Checkpoints", "Restored", "LoopResult",
           "TrainLoop"]


@dataclasses.dataclass(frozen=True)
class Every:
  """A cadence, asked after step `step` (steps done, from 1) of `total`: every `steps` steps (the
  steps congruent to `offset` modulo `steps`; offset 1 fires on the first step of each window: 1,
  n + 1, ...), every `seconds` of wall clock since it last fired (or since the loop started), and /
  or on the `last` step. All zero / False: never."""
  steps: int = 0
  seconds: float = 0.0
  offset: int = 0
  last: bool = False

  def due(self, step: int, total: int, since: float) -> bool:
    """Whether to fire after `step`, `since` seconds after it last fired."""
    n = int(self.steps)
    return bool((n > 0 and step % n == self.offset % n)
                or (self.seconds > 0 and since >= self.seconds) or (self.last and step == total))


class _Clock:
  """An `Every` and the time it last fired."""

  def __init__(self, every: Every, now: float):
    self.every, self.since = every, now

  def due(self, step: int, total: int, now: float) -> bool:
    if not self.every.due(step, total, now - self.since):
      return False
    self.since = now
    return True


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """What hooks see after a step: `step` steps done of `total`, the new state, its metrics."""
  step: int
  total: int
  state: Any
  metrics: Dict[str, Any]

  @property
  def index(self) -> int:
    """The 0-based index of the update just taken."""
    return self.step - 1


@dataclasses.dataclass
class Hook:
  """`fn(info)` after the steps `every` names (default: every step)."""
  fn: Callable[[StepInfo], None]
  every: Every = Every(steps=1)


@dataclasses.dataclass
class LogMetrics:
  """The loop's rows for `sink`: when `every` says, this step's metrics (`mean`: their mean over the
  steps since the last row) as host floats, restricted to `keys` (missing ones NaN; None: all),
  updated with `extra(info)` (e.g. the learning rate), written as `stage` at `label(info)` (default:
  the steps done); `postfix(values)` goes on the progress bar."""
  sink: MetricsSink
  stage: str
  every: Every
  mean: bool = False
  keys: Optional[Sequence[str]] = None
  extra: Optional[Callable[[StepInfo], Dict[str, Any]]] = None
  label: Optional[Callable[[StepInfo], int]] = None
  postfix: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None

  def __post_init__(self):
    self._acc, self._n = None, 0

  def add(self, info: StepInfo, due: bool, bar) -> None:
    """Count this step's metrics (summed on device when `mean`); write a row when `due`."""
    if self.mean:
      acc = self._acc
      self._acc = info.metrics if acc is None else jax.tree.map(jnp.add, acc, info.metrics)
      self._n += 1
    if not due:
      return
    got = jax.device_get(self._acc if self.mean else info.metrics)
    vals = {k: float(v) / self._n if self.mean else float(v) for k, v in got.items()}
    self._acc, self._n = None, 0
    if self.extra is not None:
      vals.update(self.extra(info))
    if self.keys is not None:
      vals = {k: vals.get(k, float("nan")) for k in self.keys}
    self.sink.write(self.stage, info.step if self.label is None else self.label(info), vals)
    if self.postfix is not None:
      bar.set_postfix(**self.postfix(vals), refresh=False)


@dataclasses.dataclass
class Checkpoints:
  """The loop's checkpoints in `ckpt`: periodic saves when `every` says, each followed by
  `snapshot(info)` (when given); a forced save when a stop signal ends the loop and, with `at_end`,
  whenever it ends. A save holds the state, `key_data`, `data.get_state()` (a data iterator:
  restored into it by `restore_or_init`) and `meta(info)` (info: the last step's; None before any)
  plus `seconds`."""
  ckpt: Checkpointer
  every: Every = Every()
  meta: Callable[[Optional[StepInfo]], Dict[str, Any]] = lambda info: {}
  key_data: Any = None
  data: Any = None
  at_end: bool = True
  snapshot: Optional[Callable[[StepInfo], None]] = None


@dataclasses.dataclass
class Restored:
  """What `restore_or_init` found: the state, the step resumed from (None: a fresh start), the PRNG
  key data, the checkpoint's meta ({} on a fresh start) and the damaged steps given up
  [(step, why)]."""
  state: Any
  step: Optional[int]
  key_data: Any
  meta: Dict[str, Any]
  given_up: list


@dataclasses.dataclass
class LoopResult:
  """How `run` ended: the state at `step` (from `start`), stopped by the flag (`preempted`) or by
  the deadline (`out_of_time`), the training's total `seconds` (see the module docstring) and the
  last step's metrics (None when this invocation took no step)."""
  state: Any
  step: int
  start: int
  preempted: bool
  out_of_time: bool
  seconds: float
  metrics: Optional[Dict[str, Any]]


class TrainLoop:
  """One trainer's loop (see the module docstring). `name`: the progress bar's label; `total`: the
  step to reach; `stop`: the flag to poll (None: never stopped by a signal); `deadline`: absolute
  `time.time()` (None: none); `t0`: when this invocation started (its time counts into `seconds`;
  default: now); `main`: this process shows the bar."""

  def __init__(self, name: str, total: int, *, stop: Optional[PreemptionFlag] = None,
               deadline: Optional[float] = None, checkpoints: Optional[Checkpoints] = None,
               metrics: Optional[LogMetrics] = None, hooks: Sequence[Hook] = (),
               t0: Optional[float] = None, main: bool = True):
    self.name, self.total, self.stop, self.deadline = name, int(total), stop, deadline
    self.checkpoints, self.metrics, self.hooks = checkpoints, metrics, list(hooks)
    self.t0 = time.time() if t0 is None else float(t0)
    self.main = main
    self.carried = 0.0  # seconds of the earlier invocations (from the checkpoint restored)
    self._saved: Optional[Tuple[int, float]] = None  # (step, seconds): this invocation's last save

  def restore_or_init(self, abstract, init: Optional[Callable[[], Any]], *,
                      required: bool = False) -> Restored:
    """The newest checkpoint that restores onto `abstract` (ShapeDtypeStructs with shardings), with
    the data iterator's state when `Checkpoints.data` is set; else `init()` (`required`: raise
    instead)."""
    c = self.checkpoints
    key = c.key_data
    key_abstract = None if key is None else jax.ShapeDtypeStruct(key.shape, key.dtype,
                                                                 sharding=key.sharding)
    step, got, given_up = c.ckpt.restore_latest_good(abstract, key_abstract,
                                                     require_data=c.data is not None)
    if step is None:
      if required:
        raise FileNotFoundError(f"no checkpoint in {c.ckpt.directory} restores "
                                f"({len(given_up)} given up)")
      if given_up:
        print(f"[checkpoint] no checkpoint restores ({len(given_up)} given up): training starts "
              "afresh", flush=True)
      return Restored(init(), None, key, {}, given_up)
    state, key_data, data_state, meta = got
    if c.data is not None:
      c.data.set_state(data_state)
    if key_data is not None:
      c.key_data = key_data
    self.carried = float(meta.get("seconds") or 0.0)
    return Restored(state, step, c.key_data, meta, given_up)

  def _stopping(self) -> Tuple[bool, bool]:
    """(the flag is raised, the deadline has passed), as every process agrees."""
    flag = self.stop is not None and distributed.any_process(self.stop.is_set())
    late = self.deadline is not None and distributed.any_process(time.time() > self.deadline)
    return flag, late

  def _save(self, step: int, state, info: Optional[StepInfo]) -> None:
    c = self.checkpoints
    seconds = self.carried + time.time() - self.t0
    data_state = None if c.data is None else c.data.get_state()
    if c.ckpt.save(step, state, key_data=c.key_data, data_state=data_state,
                   meta=dict(c.meta(info), seconds=seconds), force=True):
      self._saved = (step, seconds)

  def _after_step(self, info: StepInfo, clocks, bar) -> None:
    """The bar, the metrics, a periodic checkpoint, the hooks (in this order)."""
    bar.update(1)
    now, c = time.time(), self.checkpoints
    if self.metrics is not None:
      self.metrics.add(info, clocks["metrics"].due(info.step, self.total, now), bar)
    if c is not None and clocks["save"].due(info.step, self.total, now):
      self._save(info.step, info.state, info)
      if c.snapshot is not None:
        c.snapshot(info)
    for hook, clock in zip(self.hooks, clocks["hooks"]):
      if clock.due(info.step, self.total, now):
        hook.fn(info)

  def run(self, state, advance: Callable[[Any, int], Tuple[Any, Any]], *,
          start: int = 0) -> LoopResult:
    """Steps from `start` (the state's step) to `total`, a stop signal or the deadline."""
    step, now, c = int(start), time.time(), self.checkpoints
    clocks = {"metrics": _Clock(self.metrics.every if self.metrics else Every(), now),
              "save": _Clock(c.every if c else Every(), now),
              "hooks": [_Clock(h.every, now) for h in self.hooks]}
    bar = progress.bar(self.total, self.name, initial=min(step, self.total), disable=not self.main,
                       leave=True, unit="step")
    info, preempted, out_of_time = None, False, False
    try:
      while True:
        preempted, late = self._stopping()
        if preempted or step >= self.total:
          break
        if late:
          out_of_time = True
          break
        state, metrics = advance(state, step)
        step += 1
        info = StepInfo(step, self.total, state, metrics)
        self._after_step(info, clocks, bar)
      if c is not None and (preempted or c.at_end):
        self._save(step, state, info)
    finally:
      bar.close()
    if self._saved is not None and self._saved[0] == step:
      seconds = self._saved[1]
    else:
      seconds = self.carried + (time.time() - self.t0 if step > start else 0.0)
    return LoopResult(state, step, int(start), preempted, out_of_time, seconds,
                      None if info is None else info.metrics)
