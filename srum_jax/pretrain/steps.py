"""Pretraining losses and steps (device). The update itself is the shared guarded update
(`training.update.make_step`): the same optimizer, NaN skip and schedule as SRUM post-training.

    step = jax.jit(make_umm_step(cfg, opts, tx, und_weight=1.0, score_weight=3.0))
    state, metrics = step(state, (gen_batch, und_batch), key)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from srum_jax.models import autoencoder, bagel
from srum_jax.training import train_step, update


def ae_loss(params_ae, images, key, *, cfg_ae, kl_weight: float):
  """L1 + L2 reconstruction of a posterior sample, plus kl_weight * KL(q || N(0, I)) per latent element."""
  mean, logvar = autoencoder.encode_moments(params_ae, images, cfg_ae)
  logvar = jnp.clip(logvar, -30.0, 20.0)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
  rec = autoencoder.decoder(params_ae["decoder"], z, cfg_ae)
  err = rec - images
  l1, l2 = jnp.mean(jnp.abs(err)), jnp.mean(err * err)
  kl = 0.5 * jnp.mean(mean * mean + jnp.exp(logvar) - 1.0 - logvar)
  return l1 + l2 + kl_weight * kl, dict(l1=l1, l2=l2, kl=kl, post_std=jnp.mean(
      jnp.exp(0.5 * logvar)))


def make_ae_step(cfg_ae, tx: optax.GradientTransformation, kl_weight: float):
  """Pure step(state, images, key) of stage A (state.params: the AE)."""
  return update.make_step(
      lambda p, images, key: ae_loss(p, images, key, cfg_ae=cfg_ae, kl_weight=kl_weight), tx)


def und_loss(logits, targets, mask, score_mask, score_weight: float = 1.0):
  """Masked next-token cross-entropy (score-value tokens weighted `score_weight`, mean over the
  weights), token accuracy and score-token accuracy."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  m = mask.astype(jnp.float32)
  wt = m * jnp.where(score_mask, score_weight, 1.0)
  ce = jnp.sum(nll * wt) / jnp.maximum(jnp.sum(wt), 1.0)
  hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  sm = score_mask.astype(jnp.float32)
  return ce, dict(acc=jnp.sum(hit * m) / jnp.maximum(jnp.sum(m), 1.0),
                  score_acc=jnp.sum(hit * sm) / jnp.maximum(jnp.sum(sm), 1.0))


def umm_loss(params, batches, key, *, cfg, opts: train_step.StepOptions, und_weight: float,
             score_weight: float):
  """Stage B: the SRUM step's flow loss on (prompt, scene) pairs (opts: uniform rewards, lambda 0)
  plus und_weight * the judge answers' cross-entropy."""
  gen, und = batches
  flow, faux = train_step.srum_loss(params, gen, key, cfg=cfg, opts=opts)
  logits = bagel.forward_und(params["bagel"], und.inputs, und.logit_index, cfg=cfg,
                             dtype=opts.compute_dtype, attn_impl=opts.attn_impl)
  ce, uaux = und_loss(logits, und.targets, und.mask, und.score_mask, score_weight)
  return flow + und_weight * ce, dict(uaux, flow=flow, ce=ce, t_mean=faux["t_mean"])


def make_umm_step(cfg, opts: train_step.StepOptions, tx: optax.GradientTransformation, *,
                  und_weight: float, score_weight: float):
  """Pure step(state, (gen: SrumBatch, und: UndBatch), key) of stage B."""
  return update.make_step(
      lambda p, batches, key: umm_loss(p, batches, key, cfg=cfg, opts=opts, und_weight=und_weight,
                                       score_weight=score_weight), tx)
