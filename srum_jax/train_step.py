"""The SRUM train step: frozen VAE encode -> reward maps -> packed MoT forward -> SRUM loss -> AdamW.

Functional core of post-training. `make_train_step` returns a pure `step(state, batch, key)`; the
imperative shell (`srum_jax.pipeline.train`) feeds it. With a mesh, `shard_train_step` jits it with
parameter / optimizer-state shardings from the logical-axis rules (FSDP over `embed`, tensor over
heads/mlp/vocab) and the batch split over ('data', 'fsdp').

Faithful to the official recipe (spec E.1, E.6): the "bad" and "good" latents are two independent
posterior samples of the same image; one raw timestep ~ N(0, 1) per image; the text condition is dropped
with probability `text_cond_dropout` (CFG training); AdamW with linear warm-up then constant lr, global
grad-norm clip over the trainable parameters; frozen groups get no optimizer state.
A non-finite loss or gradient skips the update (parameters and optimizer state unchanged) and is counted.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from srum_jax import losses, objective, sharding
from srum_jax.models import autoencoder, bagel, embeddings, params as P
from srum_jax.models.bagel import GenBatch
from srum_jax.models.config import BagelConfig
from srum_jax.models.packing import CAUSAL


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Static options of the step (hashable: changing one recompiles, nothing else does)."""
  image_hw: Tuple[int, int]
  samples_per_row: int
  lambda_constraint: float = 0.5
  signed_rewards: bool = False
  use_local: bool = True
  use_global: bool = True
  uniform_rewards: bool = False  # SFT baseline: R == 1 (use with lambda_constraint = 0)
  timestep_shift: float = 1.0
  text_cond_dropout: float = 0.1
  sample_posterior: bool = True  # official AE.encode samples; False = posterior mean
  compute_dtype: Any = jnp.bfloat16
  attn_impl: str = "dense"
  remat: bool = False
  ema_decay: float = 0.0
  scan_unroll: Any = 1  # True: unrolled layers (exact XLA FLOP counts in benchmarks)


class SrumBatch(NamedTuple):
  """gen: packed layout (T2I: per sample a text split + one noise image of `image_hw`; latent slots in
  sample order, x_bad / x_gt / raw_t / token_rewards are filled on device). images [B, S, H, W, 3] in
  [-1, 1]; rewards: RegionRewards with leading dims [B, S]."""
  gen: GenBatch
  images: jax.Array
  rewards: objective.RegionRewards


class TrainState(NamedTuple):
  step: jax.Array
  params: Any  # {'bagel': ..., 'ae': ...}
  opt_state: Any
  ema: Any  # EMA of params['bagel'] or None
  skipped: jax.Array  # non-finite updates skipped so far


# ----------------------------------------------------------------------------------------------
# Optimizer


def param_labels(params, freeze: Sequence[str]) -> Any:
  """'train' / 'frozen' per leaf. `freeze` names top-level bagel groups ('vit', 'connector'), 'ae', or
  'und' (the understanding expert: llm.layers.und and llm.norm; embeddings stay trainable)."""
  freeze = set(freeze)

  def label(path, _):
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if keys[0] == "ae":
      return "frozen" if "ae" in freeze else "train"
    sub = keys[1:]
    if sub and sub[0] in freeze:
      return "frozen"
    if "und" in freeze and sub[:3] == ["llm", "layers", "und"] or ("und" in freeze and sub[:2] == ["llm", "norm"]):
      return "frozen"
    return "train"

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(tcfg, labels) -> optax.GradientTransformation:
  """AdamW (official defaults: lr 2e-5, betas 0.9/0.95, eps 1e-15, wd 0), linear warm-up then constant,
  global-norm clip over the trainable leaves; frozen leaves are zeroed and keep no state."""
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, tcfg.lr, max(int(tcfg.warmup_steps), 1)), optax.constant_schedule(tcfg.lr)],
      [max(int(tcfg.warmup_steps), 1)])
  train = optax.chain(optax.clip_by_global_norm(tcfg.grad_clip),
                      optax.adamw(schedule, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps, weight_decay=tcfg.weight_decay))
  return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def init_state(params, tx: optax.GradientTransformation, ema_decay: float = 0.0) -> TrainState:
  ema = jax.tree.map(jnp.array, params["bagel"]) if ema_decay > 0 else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema=ema,
                    skipped=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------------------
# Loss


def _latent_tokens(params_ae, images, cfg: BagelConfig, keys, sample: bool):
  """[B, S, H, W, 3] -> one [B, S*h*w, p*p*z] token array per key (frozen: no gradient).

  The encoder runs once; each key draws its own posterior sample from the shared moments, which is
  the same distribution as the official two independent `encode` calls at half the encoder cost.
  """
  B, S, H, W, _ = images.shape
  mean, logvar = autoencoder.encode_moments(jax.lax.stop_gradient(params_ae), images.reshape(B * S, H, W, 3), cfg.ae)
  out = []
  for key in keys:
    z = autoencoder.latents_from_moments(mean, logvar, cfg.ae, key if sample else None)
    tok = embeddings.patchify_latent(z, cfg.latent_patch_size)
    out.append(jax.lax.stop_gradient(tok.reshape(B, S * tok.shape[1], tok.shape[2]).astype(jnp.float32)))
  return out


def drop_text_condition(meta, key, p: float):
  """Hide each sample's causal text split with probability p (sample_id -> -1: invisible to the image).

  Equivalent to the official removal of the split: the image tokens share one RoPE position, so their
  attention among themselves does not depend on where the block sits.
  """
  if p <= 0:
    return meta
  n = meta.sample_id.size  # upper bound on sample ids
  drop = jax.random.bernoulli(key, p, (n,))
  hide = (meta.mode == CAUSAL) & (meta.sample_id >= 0) & drop[jnp.maximum(meta.sample_id, 0)]
  return meta._replace(sample_id=jnp.where(hide, -1, meta.sample_id))


def srum_loss(params, batch: SrumBatch, key, *, cfg: BagelConfig, opts: StepOptions):
  """Scalar SRUM loss and metrics for one packed batch."""
  k_bad, k_gt, k_t, k_noise, k_drop = jax.random.split(key, 5)
  gen = batch.gen
  B, S = batch.images.shape[:2]
  x_bad, x_gt = _latent_tokens(params["ae"], batch.images, cfg, (k_bad, k_gt), opts.sample_posterior)
  n_tok = x_bad.shape[1] // S
  if gen.latent_index.shape[1] != x_bad.shape[1]:
    raise ValueError(f"latent capacity {gen.latent_index.shape[1]} != samples_per_row * tokens = {x_bad.shape[1]}")
  h, w = opts.image_hw[0] // cfg.latent_downsample, opts.image_hw[1] // cfg.latent_downsample
  flat = jax.tree.map(lambda a: a.reshape((B * S,) + a.shape[2:]), batch.rewards)
  if opts.uniform_rewards:
    r_tok = jnp.ones((B, S * n_tok), jnp.float32)
  else:
    r_tok = objective.per_token_rewards(flat, image_hw=opts.image_hw, latent_hw=(h, w), signed=opts.signed_rewards,
                                        use_local=opts.use_local, use_global=opts.use_global).reshape(B, S * n_tok)
  raw_t = jnp.repeat(jax.random.normal(k_t, (B, S)), n_tok, axis=1)
  gen = gen._replace(x_bad=x_bad, x_gt=x_gt, raw_t=raw_t, token_rewards=r_tok,
                     meta=drop_text_condition(gen.meta, k_drop, opts.text_cond_dropout))
  noise = jax.random.normal(k_noise, x_bad.shape, jnp.float32)
  out = bagel.forward_gen(params["bagel"], gen, noise, cfg=cfg, timestep_shift=opts.timestep_shift,
                          dtype=opts.compute_dtype, attn_impl=opts.attn_impl, remat=opts.remat,
                          scan_unroll=opts.scan_unroll)
  loss, aux = losses.srum_flow_loss(out.v_pred, out.noise, out.x_bad, out.x_gt, out.token_rewards, out.loss_mask,
                                    opts.lambda_constraint)
  m = out.loss_mask.astype(jnp.float32)
  aux = dict(aux, reward_mean=jnp.sum(r_tok * m) / jnp.maximum(jnp.sum(m), 1.0), t_mean=jnp.mean(out.t))
  return loss, aux


def make_train_step(cfg: BagelConfig, opts: StepOptions, tx: optax.GradientTransformation):
  """Pure step(state, batch, key) -> (state, metrics)."""

  def step(state: TrainState, batch: SrumBatch, key):
    (loss, aux), grads = jax.value_and_grad(srum_loss, has_aux=True)(state.params, batch, key, cfg=cfg, opts=opts)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_params, new_opt = keep(new_params, state.params), keep(new_opt, state.opt_state)
    ema = state.ema
    if ema is not None:
      d = opts.ema_decay
      ema = jax.tree.map(lambda e, p: jnp.where(finite, d * e + (1 - d) * p.astype(e.dtype), e), ema,
                         new_params["bagel"])
    metrics = dict(aux, loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32))
    return TrainState(state.step + 1, new_params, new_opt, ema, state.skipped + (~finite)), metrics

  return step


# ----------------------------------------------------------------------------------------------
# Sharding


def model_schema(cfg: BagelConfig):
  return {"bagel": P.bagel_schema(cfg), "ae": P.ae_schema(cfg.ae)}


def param_shardings(cfg: BagelConfig, mesh, rules=sharding.DEFAULT_RULES):
  schema = model_schema(cfg)
  return sharding.logical_to_sharding(P.logical_axes(schema), mesh, rules, shapes=P.abstract_params(schema))


def _key_names(path):
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(cfg: BagelConfig, tx, abstract_state: TrainState, mesh, rules=sharding.DEFAULT_RULES):
  """Shardings for a TrainState: every optimizer leaf whose key path ends with a parameter's path (Adam
  moments, EMA) follows that parameter; everything else (counts, step) is replicated."""
  ps = param_shardings(cfg, mesh, rules)
  rep = sharding.replicated(mesh)
  by_path = {_key_names(path): s for path, s in jax.tree_util.tree_flatten_with_path(
      ps, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]}
  depth = max(len(k) for k in by_path)

  def follow(path, leaf):
    names = _key_names(path)
    for n in range(min(depth, len(names)), 0, -1):
      s = by_path.get(names[-n:])
      if s is not None and len(s.spec) <= len(leaf.shape):
        return s
    return rep

  opt = jax.tree_util.tree_map_with_path(follow, abstract_state.opt_state)
  ema = None if abstract_state.ema is None else ps["bagel"]
  return TrainState(step=rep, params=ps, opt_state=opt, ema=ema, skipped=rep)


def batch_shardings(batch, mesh, rules=sharding.DEFAULT_RULES):
  return jax.tree.map(lambda x: sharding.batch_sharding(mesh, np.ndim(x), rules), batch)


def shard_train_step(step_fn, state_sh, batch_sh, mesh):
  """jit with explicit in/out shardings (today's pjit); the state buffers are donated."""
  rep = sharding.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
                 donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------
# Host-side batch layout


def t2i_layout(cfg: BagelConfig, prompts_ids: Sequence[Sequence[Sequence[int]]], *, image_hw: Tuple[int, int],
               num_tokens: int, text_capacity: int) -> GenBatch:
  """Packed layout for rows of T2I samples: [BOS + ids + EOS] then one noise image of `image_hw` pixels.

  `prompts_ids[b]` lists the (already BOS/EOS-wrapped) prompt ids of row b's samples; every row must
  hold the same number of samples S, and latent_capacity = S * h * w exactly (the loss relies on it).
  """
  h, w = image_hw[0] // cfg.latent_downsample, image_hw[1] // cfg.latent_downsample
  S = len(prompts_ids[0])
  if any(len(r) != S for r in prompts_ids):
    raise ValueError("every row needs the same number of samples")
  placeholder = np.zeros((h * w, cfg.patch_latent_dim), np.float32)
  rows = [[[list(ids), bagel.ImageTokens("vae_noise", (h, w), x_bad=placeholder)] for ids in row]
          for row in prompts_ids]
  return bagel.build_gen_batch(cfg, rows, num_tokens=num_tokens, text_capacity=text_capacity,
                               latent_capacity=S * h * w)
