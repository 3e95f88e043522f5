"""The SRUM objective on device: judged regions -> reward maps -> per-token rewards -> reward-weighted loss.

Pure and jit-able with static image/latent sizes; shard the batch dim over the mesh's data axes and the
result equals the single-device one (the means are global over the batch, XLA inserts the reductions).

    rewards = RegionRewards(boxes, scores, valid, global_scores)   # [..., K, 4], [..., K], [..., K], [...]
    levers = RewardLevers()                                         # the official map; ablations flip fields
    maps = reward_maps(rewards, image_hw=(H, W), levers=levers)     # [..., H, W]: what the loss weighs (and the
                                                                    # training pictures show)
    loss, aux = srum_objective(rewards, v_pred, noise, x_bad, x_gt, token_mask, image_hw=(H, W),
                               latent_hw=(h, w), lambda_constraint=0.5, levers=levers)

Images smaller than the static canvas (the official aspect-preserving training transform, padded to
`image_hw`): every per-token array is built on the canvas token grid and `gather_tokens` takes each packed
latent slot's token from it (`token_index`, -1 for unused slots); the maps are resized on the canvas, which
for a canvas and an image both 16x their token grid gives each real token exactly the value of its own
image's map resized to its own grid (the bilinear taps never leave the image).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp

from srum_jax import losses
from srum_jax.rewards import resize_reward_map, reward_map


class RegionRewards(NamedTuple):
  """Judged regions of images with leading dims [...]: boxes [..., K, 4] pixels, scores [..., K],
  valid [..., K] (False = padding), global_scores [...]."""
  boxes: jax.Array
  scores: jax.Array
  valid: jax.Array
  global_scores: jax.Array


@dataclasses.dataclass(frozen=True)
class RewardLevers:
  """How judged regions become the reward R (static: part of the compiled step).

  use_local=False drops the region terms (global-only map); use_global=False sets g = 1 (region-only map,
  (g+1)/2 = 1): the paper's two ablations. signed: the signed map variant (`rewards.reward_map`).
  uniform: R == 1 everywhere (the SFT control; pair it with lambda_constraint = 0).
  """
  use_local: bool = True
  use_global: bool = True
  signed: bool = False
  uniform: bool = False


def reward_maps(r: RegionRewards, *, image_hw: Tuple[int, int], levers: RewardLevers = RewardLevers()) -> jax.Array:
  """[..., H, W] reward maps at image resolution under `levers`."""
  lead = r.global_scores.shape
  if levers.uniform:
    return jnp.ones(lead + tuple(image_hw), jnp.float32)
  flat = jax.tree.map(lambda a: jnp.reshape(a, (-1,) + jnp.shape(a)[len(lead):]), r)
  valid = flat.valid if levers.use_local else jnp.zeros_like(flat.valid)
  g = flat.global_scores if levers.use_global else jnp.ones_like(flat.global_scores)
  maps = reward_map(flat.boxes, flat.scores, valid, g, height=image_hw[0], width=image_hw[1], signed=levers.signed)
  return maps.reshape(lead + tuple(image_hw))


def per_token_rewards(r: RegionRewards, *, image_hw: Tuple[int, int], latent_hw: Tuple[int, int],
                      levers: RewardLevers = RewardLevers()) -> jax.Array:
  """[B, S*h*w] rewards for rewards with leading dims [B] (S = 1) or [B, S]: each image's map bilinearly
  resized to its latent token grid, images of a row in order."""
  B = r.global_scores.shape[0]
  h, w = latent_hw
  if levers.uniform:  # exactly 1 (a resized constant map could be 1 +- an ulp)
    return jnp.ones((B, r.global_scores.size // B * h * w), jnp.float32)
  maps = reward_maps(r, image_hw=image_hw, levers=levers)
  maps = maps.reshape((-1,) + tuple(image_hw))
  return resize_reward_map(maps, h, w).reshape(B, -1)


def gather_tokens(a: jax.Array, token_index: jax.Array) -> jax.Array:
  """Per-slot values from canvas-ordered ones: a [B, N, ...] (N canvas tokens per row), token_index [B, L]
  (canvas token of each slot, -1 unused) -> [B, L, ...], zero at unused slots."""
  idx = jnp.asarray(token_index)
  safe = jnp.maximum(idx, 0).reshape(idx.shape + (1,) * (a.ndim - 2))
  got = jnp.take_along_axis(a, safe, axis=1)
  return jnp.where((idx >= 0).reshape(safe.shape), got, jnp.zeros((), got.dtype))


def srum_objective(r: RegionRewards, v_pred, noise, x_bad, x_gt, token_mask, *, image_hw, latent_hw,
                   lambda_constraint: float, levers: RewardLevers = RewardLevers(),
                   token_index=None):
  """SRUM loss for rows of images: tokens [B, S*h*w, C] (S images of one latent grid per row, in order),
  rewards with leading dims [B] or [B, S]. With `token_index` [B, L] the tokens are packed slots and the
  rewards are taken from the canvas grid at those indices (`gather_tokens`; module docstring). Returns
  (loss, aux: the two terms and the mean reward R)."""
  r_tok = per_token_rewards(r, image_hw=image_hw, latent_hw=latent_hw, levers=levers)
  if token_index is not None:
    r_tok = gather_tokens(r_tok, token_index)
  loss, aux = losses.srum_flow_loss(v_pred, noise, x_bad, x_gt, r_tok, token_mask, lambda_constraint)
  m = jnp.ones(r_tok.shape, jnp.float32) if token_mask is None else jnp.asarray(token_mask, jnp.float32)
  aux = dict(aux, reward_mean=jnp.sum(r_tok * m) / jnp.maximum(jnp.sum(m), 1.0))
  return loss, aux
