"""The training core every trainer shares: the one lr schedule, the optimizer's freezing, the guarded update
(NaN skip, EMA), the preemption flag and checkpoints without a PRNG key."""
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from srum_jax.training import checkpointing, optimizer, update
from srum_jax.training.preemption import PreemptionFlag


def _ocfg(**kw):
  c = ml_collections.ConfigDict(dict(lr=1e-2, lr_decay="constant", min_lr_ratio=0.1, warmup_steps=4, b1=0.9, b2=0.95,
                                     eps=1e-8, weight_decay=0.0, grad_clip=1.0))
  c.update(kw)
  return c


def test_lr_schedule_constant_and_cosine_are_functions_of_the_step():
  const = optimizer.lr_schedule(_ocfg())
  np.testing.assert_allclose([float(const(n)) for n in (0, 1, 2, 4, 100)], [0, 2.5e-3, 5e-3, 1e-2, 1e-2], rtol=1e-6)
  cos = optimizer.lr_schedule(_ocfg(lr_decay="cosine"), total_steps=24)
  for n in (4, 9, 14, 19, 24, 40):
    k = min(n - 4, 20) / 20  # cosine over the 20 steps after warm-up, to min_lr_ratio * lr
    want = 1e-2 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * k)))
    np.testing.assert_allclose(float(cos(n)), want, rtol=1e-5)
  with pytest.raises(ValueError, match="total_steps"):
    optimizer.lr_schedule(_ocfg(lr_decay="cosine"))
  with pytest.raises(ValueError, match="lr_decay"):
    optimizer.lr_schedule(_ocfg(lr_decay="linear"))


def _quadratic():
  params = {"bagel": {"w": jnp.array([1.0, -2.0, 3.0]), "vit": {"k": jnp.array([0.5, 0.5])}},
            "ae": {"k": jnp.array([4.0])}}
  loss_fn = lambda p, batch, key: (jnp.sum((p["bagel"]["w"] - batch) ** 2) + jnp.sum(p["ae"]["k"] ** 2)  # noqa
                                   + jnp.sum(p["bagel"]["vit"]["k"] ** 2), {"aux": jnp.float32(1.0)})
  return params, loss_fn


def test_guarded_update_freezes_skips_nonfinite_and_tracks_the_ema():
  params, loss_fn = _quadratic()
  labels = optimizer.param_labels(params, ("vit", "ae"))
  assert labels == {"bagel": {"w": "train", "vit": {"k": "frozen"}}, "ae": {"k": "frozen"}}
  tx = optimizer.make_optimizer(_ocfg(warmup_steps=1), labels)
  step = jax.jit(update.make_step(loss_fn, tx, ema_decay=0.5))
  state = update.init_state(params, tx, ema_decay=0.5)
  target = jnp.zeros(3)
  s0, _ = step(state, target, jax.random.key(0))  # update 0 of the warm-up has lr 0
  np.testing.assert_array_equal(s0.params["bagel"]["w"], params["bagel"]["w"])
  s1, m1 = step(s0, target, jax.random.key(0))
  assert int(s1.step) == 2 and int(s1.skipped) == 0 and int(m1["skipped"]) == 0 and float(m1["aux"]) == 1.0
  assert not np.allclose(s1.params["bagel"]["w"], params["bagel"]["w"])
  for frozen in (("ae", "k"), ("bagel", "vit", "k")):  # frozen: same value, and the same EMA bit for bit
    get = lambda t: t[frozen[0]][frozen[1]] if len(frozen) == 2 else t[frozen[0]][frozen[1]][frozen[2]]  # noqa
    np.testing.assert_array_equal(get(s1.params), get(params))
    np.testing.assert_array_equal(get(s1.ema), get(params))
  np.testing.assert_allclose(s1.ema["bagel"]["w"], 0.5 * params["bagel"]["w"] + 0.5 * s1.params["bagel"]["w"],
                             rtol=1e-6)
  # a NaN batch: nothing moves (parameters, optimizer state, EMA), the step and the skip counter advance
  s2, m2 = step(s1, jnp.array([np.nan, 0.0, 0.0]), jax.random.key(1))
  assert int(s2.step) == 3 and int(s2.skipped) == 1 and int(m2["skipped"]) == 1
  for a, b in zip(jax.tree.leaves((s2.params, s2.opt_state, s2.ema)), jax.tree.leaves((s1.params, s1.opt_state,
                                                                                         s1.ema))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # frozen leaves keep no optimizer state
  sizes = sum(np.size(x) for x in jax.tree.leaves(s2.opt_state))
  assert sizes == 2 * 3 + 2  # Adam mu and nu of "w", plus the two step counts


def test_preemption_flag_catches_sigterm_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionFlag() as stop:
    assert not stop.is_set()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.is_set()
  assert signal.getsignal(signal.SIGTERM) == before


def test_checkpoint_round_trip_without_a_key(tmp_path):
  params, _ = _quadratic()
  tx = optimizer.make_optimizer(_ocfg(), None)
  state = update.init_state(params, tx)
  state = state._replace(step=jnp.array(7, jnp.int32))
  with checkpointing.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=1) as ckpt:
    ckpt.save(7, state, meta={"elapsed": 12.5}, force=True)
  abstract = jax.eval_shape(lambda p: update.init_state(p, tx), params)
  rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = checkpointing.abstract_with_shardings(abstract, jax.tree.map(lambda _: rep, abstract))
  with checkpointing.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    assert ckpt.latest_step() == 7
    got, key, data_state, meta = ckpt.restore(None, abstract)
  assert key is None and data_state is None and meta["elapsed"] == 12.5 and int(got.step) == 7
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradient_accumulation_averages_microbatch_gradients():
  """k microbatches: the mean of the microbatches' losses and gradients (microbatch j keyed fold_in(key, j)),
  each cut taking the same rows from every one of the batch's row shards; one update with that gradient."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)

  def loss_fn(p, batch, key):
    noise = jax.random.normal(key, batch.shape)
    err = batch @ p["w"] + 0.1 * noise.sum(-1)
    return jnp.mean(err ** 2), {"rows": jnp.float32(batch.shape[0])}

  params = {"w": jnp.asarray([0.5, -1.0, 2.0])}
  key = jax.random.key(3)
  (loss, aux), grads = update.accumulated_grads(loss_fn, params, x, key, microbatches=2, batch_ways=2)
  # rows 0..3 on shard 0, 4..7 on shard 1: microbatch 0 = rows 0, 1, 4, 5; microbatch 1 = rows 2, 3, 6, 7
  parts = [(x[jnp.array([0, 1, 4, 5])], jax.random.fold_in(key, 0)), (x[jnp.array([2, 3, 6, 7])],
                                                                      jax.random.fold_in(key, 1))]
  want = [jax.value_and_grad(loss_fn, has_aux=True)(params, b, k) for b, k in parts]
  np.testing.assert_allclose(loss, np.mean([w[0][0] for w in want]), rtol=1e-6)
  np.testing.assert_allclose(grads["w"], np.mean([w[1]["w"] for w in want], axis=0), rtol=1e-6)
  assert float(aux["rows"]) == 4.0
  np.testing.assert_array_equal(update.split_microbatches(jnp.arange(8), 2, 2), [[0, 1, 4, 5], [2, 3, 6, 7]])
  # one microbatch is the plain gradient of the whole batch
  (l1, _), g1 = update.accumulated_grads(loss_fn, params, x, key, microbatches=1)
  (l2, _), g2 = jax.value_and_grad(loss_fn, has_aux=True)(params, x, key)
  np.testing.assert_array_equal(g1["w"], g2["w"])


def test_step_passes_constants_to_the_loss_without_gradients():
  """make_step(loss_fn)(state, batch, key, *consts): the consts reach every microbatch's loss call
  as arguments (a frozen reference model), never differentiated: the update equals the one with the
  consts baked in."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
  ref = {"w": jnp.asarray([1.0, 0.0, -1.0])}
  loss_fn = lambda p, b, k, r: (jnp.mean((b @ p["w"] - b @ r["w"]) ** 2), {})  # noqa: E731
  params = {"w": jnp.asarray([0.5, -1.0, 2.0])}
  tx = optimizer.make_optimizer(_ocfg(), None)
  for micro in (1, 2):
    step = jax.jit(update.make_step(loss_fn, tx, microbatches=micro))
    got, m = step(update.init_state(params, tx), x, jax.random.key(0), ref)
    baked = update.make_step(lambda p, b, k: loss_fn(p, b, k, ref), tx, microbatches=micro)
    want, mw = baked(update.init_state(params, tx), x, jax.random.key(0))
    np.testing.assert_allclose(got.params["w"], want.params["w"], rtol=1e-6)
    np.testing.assert_allclose(m["loss"], mw["loss"], rtol=1e-6)


def _saved_steps(directory, steps, data=True):
  """A Checkpointer directory holding the tiny state at `steps` (step value = step number), with a data-iterator
  state when `data`; returns (abstract state with shardings, the states saved)."""
  params, _ = _quadratic()
  tx = optimizer.make_optimizer(_ocfg(), None)
  states = {s: update.init_state(jax.tree.map(lambda x: x + s, params), tx)._replace(step=jnp.array(s, jnp.int32))
            for s in steps}
  with checkpointing.Checkpointer(directory, max_to_keep=None, async_save=False) as ckpt:
    for s in steps:
      ckpt.save(s, states[s], data_state={"position": s} if data else None, force=True)
  abstract = jax.eval_shape(lambda p: update.init_state(p, tx), params)
  rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return checkpointing.abstract_with_shardings(abstract, jax.tree.map(lambda _: rep, abstract)), states


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, capsys):
  """The latest step's array data truncated: restore gives it up (printed, counted, moved aside) and resumes
  from the step before; a later save of that step number is not refused."""
  d = str(tmp_path / "ckpt")
  abstract, states = _saved_steps(d, [2, 4])
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(d, "4", "state")) for f in fs]
  for f in files:  # truncate every file of the step's state: the array data and its manifests
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)
  with checkpointing.Checkpointer(d) as ckpt:
    step, got, given_up = ckpt.restore_latest_good(abstract)
    assert step == 2 and [g[0] for g in given_up] == [4] and ckpt.all_steps() == [2]
    state, _, data_state, _ = got
    assert data_state == {"position": 2} and int(state.step) == 2
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(states[2].params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ckpt.save(4, states[4], data_state={"position": 4}, force=True)
  assert "step 4" in capsys.readouterr().out
  assert os.path.isdir(str(tmp_path / "ckpt_invalid" / "4"))


def test_checkpoint_without_iterator_state_is_not_accepted(tmp_path):
  """A latest step missing its data-iterator state would reset the data order: given up for the step before;
  with no good step left, nothing is restored (the caller starts afresh, or says so)."""
  d = str(tmp_path / "ckpt")
  abstract, _ = _saved_steps(d, [2, 4])
  import shutil
  shutil.rmtree(os.path.join(d, "4", "data"))
  with checkpointing.Checkpointer(d) as ckpt:
    step, got, given_up = ckpt.restore_latest_good(abstract)
    assert step == 2 and got[2] == {"position": 2}
    assert given_up[0][0] == 4 and "data-iterator" in given_up[0][1]
  abstract, _ = _saved_steps(str(tmp_path / "a"), [3], data=False)
  with checkpointing.Checkpointer(str(tmp_path / "a")) as ckpt:
    assert ckpt.restore_latest_good(abstract) == (None, None, [(3, given_up[0][1])])
  _saved_steps(str(tmp_path / "b"), [3], data=False)
  with checkpointing.Checkpointer(str(tmp_path / "b")) as ckpt:  # a trainer without a data iterator
    assert ckpt.restore_latest_good(abstract, require_data=False)[0] == 3
