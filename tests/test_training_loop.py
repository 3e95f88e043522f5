"""The one training loop (`training.loop`) on a tiny quadratic problem: cadences, stops by flag and
by deadline, periodic / final saves and the training's total seconds, resume == uninterrupted bit
for bit (data iterator included), damaged checkpoints given up, the metrics sink's rows, a local
`BufferedLog`."""
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from srum_jax.training import checkpointing, loop, optimizer, preemption, update
from srum_jax.training.metrics_sink import MetricsSink
from srum_jax.training.preemption import PreemptionFlag
from srum_jax.workdir import logs

from helpers import StopAfter

TOTAL = 6


def test_every_fires_on_its_steps_offsets_last_step_and_seconds():
  fired = lambda e, total=10: [s for s in range(1, total + 1) if e.due(s, total, 0.0)]  # noqa: E731
  assert fired(loop.Every(steps=3)) == [3, 6, 9]
  assert fired(loop.Every(steps=3, last=True)) == [3, 6, 9, 10]
  assert fired(loop.Every(steps=3, offset=1)) == [1, 4, 7, 10]  # the first step of each window
  assert fired(loop.Every(steps=1, offset=1)) == list(range(1, 11))
  assert fired(loop.Every(last=True)) == [10] and fired(loop.Every()) == []
  assert loop.Every(seconds=5.0).due(1, 10, 5.0) and not loop.Every(seconds=5.0).due(1, 10, 4.9)


class _Data:
  """A data iterator with state: the batch of step i is a function of its position."""

  def __init__(self):
    self.position = 0

  def next(self):
    self.position += 1
    return jnp.full((3,), 0.1 * self.position, jnp.float32)

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]



def _run(directory, *, stop=None, deadline=None, at_end=True, hooks=(), log_every=2):
  """The quadratic trained by the loop in `directory` (resumed from its checkpoints); (result,
  restored, rows of metrics.jsonl)."""
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  cfg = ml_collections.ConfigDict(dict(lr=0.1, lr_decay="cosine", min_lr_ratio=0.1, warmup_steps=1,
                                       b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0))
  tx = optimizer.make_optimizer(cfg, None, total_steps=TOTAL)
  step = jax.jit(update.make_step(lambda p, b, k: (jnp.sum((p["w"] - b) ** 2), {}), tx))
  data = _Data()
  rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  key_data = jax.device_put(jax.random.key_data(jax.random.key(0)), rep)
  abstract = jax.eval_shape(lambda p: update.init_state(p, tx), params)
  abstract = checkpointing.abstract_with_shardings(abstract, jax.tree.map(lambda _: rep, abstract))
  with checkpointing.Checkpointer(os.path.join(directory, "ckpt"), max_to_keep=None,
                                  async_save=False) as ckpt, MetricsSink(directory) as sink:
    trainer = loop.TrainLoop(
        "test", TOTAL, stop=stop, deadline=deadline, hooks=hooks,
        checkpoints=loop.Checkpoints(ckpt, every=loop.Every(steps=2), key_data=key_data, data=data,
                                     meta=lambda info: {"at": None if info is None else info.step},
                                     at_end=at_end),
        metrics=loop.LogMetrics(sink, "train", loop.Every(steps=log_every, last=True), mean=True,
                                keys=("loss", "grad_norm", "missing"),
                                extra=lambda info: {"skipped": int(info.state.skipped)}))
    restored = trainer.restore_or_init(abstract, lambda: update.init_state(params, tx))
    result = trainer.run(restored.state, lambda s, n: step(s, data.next(), jax.random.key(n)),
                         start=int(restored.state.step))
  path = pathlib.Path(directory) / "metrics.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
  return result, restored, rows


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))]


def test_stop_save_resume_equals_uninterrupted_and_seconds_carry_over(tmp_path):
  full, _, rows = _run(str(tmp_path / "full"))
  assert full.step == TOTAL and not full.preempted and not full.out_of_time
  assert [r["step"] for r in rows] == [2, 4, 6] and all(np.isnan(r["missing"]) for r in rows)
  part, _, _ = _run(str(tmp_path / "part"), stop=StopAfter(3))
  assert part.preempted and part.step == 3
  with checkpointing.Checkpointer(str(tmp_path / "part" / "ckpt")) as ckpt:
    assert ckpt.all_steps() == [2, 3]  # the periodic save and the one on stop
    meta = ckpt.restore_meta(3)
  assert meta["at"] == 3 and meta["seconds"] == part.seconds  # the summary's total is the saved one
  done, restored, rows = _run(str(tmp_path / "part"))
  assert restored.step == 3 and restored.meta["seconds"] == part.seconds and done.start == 3
  assert done.step == TOTAL and done.seconds > part.seconds
  for a, b in zip(_leaves(full.state), _leaves(done.state)):
    np.testing.assert_array_equal(a, b)  # the data position came back with the checkpoint
  assert [r["step"] for r in rows] == [2, 4, 6]  # steps 1-3 before the stop (row 2), 4-6 after
  again, restored, _ = _run(str(tmp_path / "part"))  # nothing left to do: the total is kept
  assert restored.step == TOTAL and again.step == TOTAL and again.metrics is None
  assert again.seconds == done.seconds


def test_metrics_rows_are_window_means(tmp_path):
  """log every 4 steps (and the last): rows at 4 and 6 hold the means of steps 1-4 and 5-6."""
  seen = []
  full, _, rows = _run(str(tmp_path / "m"), log_every=4, hooks=[loop.Hook(
      lambda info: seen.append(float(info.metrics["loss"])))])
  assert [r["step"] for r in rows] == [4, 6] and rows[0]["stage"] == "train"
  np.testing.assert_allclose([rows[0]["loss"], rows[1]["loss"]],
                             [np.mean(seen[:4]), np.mean(seen[4:])], rtol=1e-6)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "m" / "tb"))


def test_deadline_ends_like_a_finished_run(tmp_path):
  """A passed deadline: no step, no save without `at_end`; with `at_end` the end state is saved."""
  late, _, _ = _run(str(tmp_path / "a"), deadline=0.0, at_end=False)
  assert late.out_of_time and not late.preempted and late.step == 0 and late.seconds == 0.0
  assert checkpointing.finished_steps(str(tmp_path / "a" / "ckpt")) == []
  stopper = []
  hook = loop.Hook(lambda info: stopper.append(info.step))
  r, _, _ = _run(str(tmp_path / "b"), deadline=float("inf"), hooks=[hook])
  assert stopper == list(range(1, TOTAL + 1)) and r.step == TOTAL
  assert checkpointing.finished_steps(str(tmp_path / "b" / "ckpt")) == [2, 4, 6]


def test_damaged_checkpoint_falls_back_and_training_goes_on(tmp_path):
  full, _, _ = _run(str(tmp_path / "full"))
  _run(str(tmp_path / "d"), stop=StopAfter(4))  # saves at 2, 4
  step_dir = tmp_path / "d" / "ckpt" / "4" / "state"
  for root, _, names in os.walk(step_dir):
    for n in names:
      with open(os.path.join(root, n), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(root, n)) // 2)
  done, restored, _ = _run(str(tmp_path / "d"))
  assert restored.step == 2 and [g[0] for g in restored.given_up] == [4]
  for a, b in zip(_leaves(full.state), _leaves(done.state)):
    np.testing.assert_array_equal(a, b)


def test_required_restore_raises_without_a_checkpoint(tmp_path):
  with checkpointing.Checkpointer(str(tmp_path / "none")) as ckpt:
    trainer = loop.TrainLoop("x", 1, checkpoints=loop.Checkpoints(ckpt))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      trainer.restore_or_init({"a": jax.ShapeDtypeStruct((1,), jnp.float32)}, None, required=True)


def test_buffered_log_writes_locally_at_once(tmp_path):
  with logs.BufferedLog(logs.JsonlLog(str(tmp_path / "data_log.jsonl"))) as log:
    log.append({"step": 0, "indices": [1, 2]})
    assert (tmp_path / "data_log.jsonl").read_text() == '{"step": 0, "indices": [1, 2]}\n'


def test_flag_or_installed_keeps_a_callers_flag():
  mine = PreemptionFlag(signals=())
  with preemption.flag_or_installed(mine) as got:
    assert got is mine
  with preemption.flag_or_installed(None) as got:
    assert isinstance(got, PreemptionFlag) and got is not mine and not got.is_set()
