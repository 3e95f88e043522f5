"""Flow matching, one definition of each formula: timestep shift, training times from raw draws,
interpolation, target velocity, and SRUM's reward-weighted loss (the plain flow loss is its R = 1,
lambda = 0 case), and the anchor to a frozen reference model's velocity. Training
(`train_step.srum_loss`) and sampling (`inference.sampling`) both call these.

Conventions: x_t = (1 - t) x0 + t eps, target velocity v* = eps - x0 (data -> noise). Losses are
computed in float32 (float64 inputs stay float64) over packed latent tokens [N, C] (or [B, N, C])
with a token mask; the mean runs over valid tokens and channels, and an all-False mask gives 0 (not
NaN), with zero gradients.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["shift_timesteps", "timesteps_from_raw", "interpolate", "flow_target", "srum_flow_loss",
           "anchor_velocity_loss"]


def shift_timesteps(t, shift: float):
  """t' = shift * t / (1 + (shift - 1) * t); shift 1 is the identity, t = 0 and 1 are fixed
  points."""
  t = jnp.asarray(t, jnp.float32)
  return shift * t / (1.0 + (shift - 1.0) * t)


def timesteps_from_raw(raw, shift: float):
  """Training flow times from raw N(0, 1) draws (logit-normal, then shifted): shift(sigmoid(raw)),
  as BAGEL's training loop; raw = -inf gives t = 0 (a clean conditioning image)."""
  return shift_timesteps(jax.nn.sigmoid(jnp.asarray(raw, jnp.float32)), shift)


def interpolate(x0, noise, t):
  """x_t = (1 - t) x0 + t eps; `t` broadcasts against the leading axes (e.g. [N] or [N, 1] for
  [N, C])."""
  t = jnp.asarray(t, x0.dtype)
  if t.ndim == x0.ndim - 1:
    t = t[..., None]
  return (1 - t) * x0 + t * noise


def flow_target(x0, noise):
  """Target velocity eps - x0."""
  return noise - x0


def _f32(x):
  """At least float32 (bf16 -> f32; f64 stays f64, which lets tests check gradients in float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _masked_sq_err(v_pred, target, token_mask):
  """([..., N] per-token sum over channels of (v - target)^2 with masked tokens zeroed, bool
  mask, C)."""
  v = _f32(v_pred)
  if token_mask is None:
    token_mask = jnp.ones(v.shape[:-1], bool)
  m = jnp.asarray(token_mask, bool)
  err = jnp.where(m[..., None], v - target, 0.0)  # where, not *: NaN-safe padding
  return jnp.sum(err * err, axis=-1), m, v.shape[-1]


def _mean(per_token, m, c):
  count = jnp.sum(m.astype(per_token.dtype)) * c
  return jnp.where(count > 0, jnp.sum(per_token) / jnp.maximum(count, 1.0), 0.0)


def srum_flow_loss(v_pred, noise, x_bad, x_gt, token_rewards,
                   token_mask: Optional[jax.Array] = None, lambda_constraint: float = 0.5):
  """SRUM loss L = mean(R (v - (eps - x_bad))^2) + lambda * mean((v - (eps - x_gt))^2), as SRUM's
  `modeling/bagel/bagel.py`; R = 1 and lambda = 0 is BAGEL's plain flow-matching loss.

  v_pred, noise, x_bad, x_gt: [..., N, C] packed latent tokens (x_bad is the noised latent);
  token_rewards: [..., N] (`token_rewards` of the reward maps); token_mask: [..., N] bool (None =
  all valid). Means are over valid tokens and channels, in float32 (at least). Returns (loss,
  {"loss_reward", "loss_constraint"}).
  """
  noise, r = _f32(noise), _f32(token_rewards)
  per_bad, m, c = _masked_sq_err(v_pred, flow_target(_f32(x_bad), noise), token_mask)
  per_gt, _, _ = _masked_sq_err(v_pred, flow_target(_f32(x_gt), noise), token_mask)
  loss_reward = _mean(jnp.where(m, r, 0.0) * per_bad, m, c)
  loss_constraint = _mean(per_gt, m, c)
  loss = loss_reward + lambda_constraint * loss_constraint
  return loss, {"loss_reward": loss_reward, "loss_constraint": loss_constraint}


def anchor_velocity_loss(v_pred, v_ref, token_mask: Optional[jax.Array] = None):
  """mean((v - v_ref)^2) over valid tokens and channels: the distance of the trained model's
  velocity to a frozen reference model's at the same (x_t, t, condition); v_ref carries no
  gradient."""
  per, m, c = _masked_sq_err(v_pred, jax.lax.stop_gradient(_f32(v_ref)), token_mask)
  return _mean(per, m, c)
