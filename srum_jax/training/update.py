"""The guarded update every trainer uses: gradients -> (NaN/inf skip) -> optimizer -> EMA.

    state = init_state(params, tx, ema_decay=0.0)
    step = make_step(loss_fn, tx, ema_decay=0.0)  # loss_fn(params, batch, key, *consts)
    state, metrics = step(state, batch, key)       # pure: jit / shard it from the outside
    state, metrics = step(state, batch, key, ref)  # consts the loss reads, never trains (frozen)

With `microbatches` k > 1 the batch's rows are cut into k microbatches, the gradients of their
losses are averaged (a `lax.scan`, one microbatch in memory at a time; microbatch j draws its
randomness from fold_in(key, j)) and applied once: the global batch of an update does not depend on
how many devices share it. `batch_ways`: how many shards the rows are split over on the mesh; each
microbatch takes the same number of rows from every shard, so cutting never moves rows between
devices.

A non-finite loss or gradient norm skips the update: parameters, optimizer state and EMA stay as
they were, the step counter still advances and `skipped` counts it. The EMA, when used, tracks every
parameter leaf (e <- e + (1 - decay) (p - e) after each applied update).

With `labels` ('train' / 'frozen' per leaf, `optimizer.param_labels`) only the trainable leaves are
differentiated (the frozen ones are constants of the loss: no weight gradients, no gradient buffers
for them), the gradient norm covers the trainable leaves, the frozen leaves pass through the step
untouched, and the EMA holds the trainable leaves only (None at frozen ones; `ema_params` fills them
in). The optimizer (`optimizer.make_optimizer(.., labels)`) keeps no state for frozen leaves. LoRA
training is this with every leaf but the adapters frozen.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "TrainState", "init_state", "guarded_update", "make_step", "trainable_part", "with_trainable",
    "ema_params", "trainable_state", "with_frozen", "state_donation"
]


class TrainState(NamedTuple):
  step: jax.Array  # updates tried so far (skipped ones included)
  params: Any
  opt_state: Any
  ema: Any  # EMA of `params`, or None
  skipped: jax.Array  # non-finite updates skipped so far


def state_donation(platform: Optional[str] = None) -> Tuple[int, ...]:
  """`donate_argnums` of a jitted step(state, ...) on `platform` (default: JAX's backend).

  Accelerators donate the state: a large model's parameters and optimizer moments do not fit twice.
  The CPU does not: there XLA updates the parameters and the moments in separate fusions that both
  read the old moments, so it copies every donated moment buffer first, and those copies cost more
  than fresh output buffers.
  """
  return () if (platform or jax.default_backend()) == "cpu" else (0,)


def trainable_part(tree, labels):
  """`tree` (parameters, or anything shaped like them) with None at the leaves `labels` marks
  'frozen' (labels None: `tree` itself)."""
  if labels is None:
    return tree
  return jax.tree.map(lambda label, x: x if label == "train" else None, labels, tree)


def with_trainable(tree, part, labels):
  """`tree` with its trainable leaves taken from `part` (a `trainable_part`-shaped tree)."""
  if labels is None:
    return part
  return jax.tree.map(lambda label, x, p: p if label == "train" else x, labels, tree, part)


def ema_params(state: TrainState):
  """The parameters to keep from a run: the EMA where it is tracked (every trainable leaf), the
  parameters elsewhere; the parameters themselves without an EMA."""
  if state.ema is None:
    return state.params
  return jax.tree.map(lambda p, e: p if e is None else e, state.params, state.ema)


def trainable_state(state: TrainState, labels) -> TrainState:
  """`state` without its frozen parameters (None there): what an adapters-only checkpoint holds (the
  frozen base is the model directory's). The optimizer state and EMA already hold trainable leaves
  only."""
  return state._replace(params=trainable_part(state.params, labels))


def with_frozen(state: TrainState, params, labels) -> TrainState:
  """Inverse of `trainable_state`: the frozen leaves taken from `params` (e.g. the base model)."""
  return state._replace(params=with_trainable(params, state.params, labels))


def init_state(params, tx: optax.GradientTransformation, ema_decay: float = 0.0,
               labels=None) -> TrainState:
  """A fresh state; `labels`: see the module docstring (the EMA then copies the trainable leaves
  only)."""
  ema = jax.tree.map(jnp.array, trainable_part(params, labels)) if ema_decay > 0 else None
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema=ema,
      skipped=jnp.zeros((), jnp.int32))


def guarded_update(state: TrainState, grads, loss, tx: optax.GradientTransformation,
                   ema_decay: float = 0.0, labels=None):
  """(new state, {'grad_norm', 'skipped'}) after one update with `grads`, or none when not finite.

  With `labels`, `grads` is `trainable_part`-shaped (None at frozen leaves) and frozen leaves stay
  as they are.
  """
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
  # the optimizer sees the whole tree; frozen leaves' updates are zero and unused
  if labels is not None:
    grads = with_trainable(jax.tree.map(jnp.zeros_like, state.params), grads, labels)
  updates, new_opt = tx.update(grads, state.opt_state, state.params)
  trained = trainable_part(state.params, labels)
  new_trained = optax.apply_updates(trained, trainable_part(updates, labels))
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
  new_trained, new_opt = keep(new_trained, trained), keep(new_opt, state.opt_state)
  new_params = with_trainable(state.params, new_trained, labels)
  ema = state.ema
  if ema is not None:
    d = ema_decay
    # e + (1 - d)(p - e): a leaf that never changes (a frozen one) keeps its EMA bit for bit
    ema = jax.tree.map(lambda e, p: jnp.where(finite, e + (1 - d) * (p.astype(e.dtype) - e), e),
                       ema, new_trained)
  skipped = (~finite).astype(jnp.int32)
  new_state = TrainState(state.step + 1, new_params, new_opt, ema, state.skipped + skipped)
  return new_state, {"grad_norm": grad_norm, "skipped": skipped}


def split_microbatches(batch, microbatches: int, batch_ways: int = 1):
  """Every leaf [rows, ...] -> [microbatches, rows / microbatches, ...]; microbatch j holds, from
  each of the `batch_ways` contiguous row shards, that shard's j-th run of rows."""
  def cut(x):
    rows = x.shape[0]
    if rows % (microbatches * batch_ways):
      raise ValueError(
          f"{rows} rows do not split into {microbatches} microbatches x {batch_ways} shards")
    m = rows // (microbatches * batch_ways)
    x = x.reshape((batch_ways, microbatches, m) + x.shape[1:]).swapaxes(0, 1)
    return x.reshape((microbatches, batch_ways * m) + x.shape[3:])
  return jax.tree.map(cut, batch)


def accumulated_grads(loss_fn: Callable, params, batch, key, microbatches: int, batch_ways: int = 1,
                      consts: tuple = ()):
  """((mean loss, mean aux), mean gradients) over the microbatches of `batch` (see the module
  docstring); `consts` are passed to every call of the loss after the key, without gradients."""
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
  grad_fn = lambda p, b, k: value_and_grad(p, b, k, *consts)  # noqa: E731
  if microbatches == 1:
    return grad_fn(params, batch, key)
  micro = split_microbatches(batch, microbatches, batch_ways)
  first = jax.tree.map(lambda x: x[0], micro)
  (loss0, aux0), grads0 = jax.eval_shape(grad_fn, params, first, key)
  zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), tree)  # noqa: E731

  def body(carry, xs):
    mb, j = xs
    (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(key, j))
    # noqa: E731
    add = lambda acc, new: jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, new)
    return (add(carry[0], loss), add(carry[1], aux), add(carry[2], grads)), None

  (loss, aux, grads), _ = jax.lax.scan(body, (zeros(loss0), zeros(aux0), zeros(grads0)),
                                       (micro, jnp.arange(microbatches)))
  mean = lambda tree, like: jax.tree.map(lambda a, b:
                                         (a / microbatches).astype(b.dtype), tree, like)  # noqa
  return (mean(loss, loss0), mean(aux, aux0)), mean(grads, grads0)


def make_step(loss_fn: Callable, tx: optax.GradientTransformation, ema_decay: float = 0.0, *,
              microbatches: int = 1, batch_ways: int = 1, labels=None) -> Callable:
  """Pure step(state, batch, key, *consts) -> (state, metrics) for `loss_fn(params, batch, key,
  *consts) -> (loss, aux)`; metrics = aux + loss, grad_norm, skipped. `labels`: differentiate and
  update the trainable leaves only. `consts` (e.g. a frozen reference model's parameters) reach the
  loss as arguments, so a jitted step takes them as inputs, not as baked-in constants."""

  def step(state: TrainState, batch, key, *consts):
    frozen = state.params

    def loss_of_trainable(trained, b, k, *c):
      return loss_fn(with_trainable(frozen, trained, labels), b, k, *c)

    (loss, aux), grads = accumulated_grads(loss_of_trainable, trainable_part(state.params, labels),
                                           batch, key, microbatches, batch_ways, consts)
    state, info = guarded_update(state, grads, loss, tx, ema_decay, labels)
    return state, dict(aux, loss=loss, **info)

  return step
