"""The SRUM objective on device: judged regions -> reward maps -> per-token rewards -> reward-weighted loss.

Pure and jit-able with static image/latent sizes; shard the batch dim over the mesh's data axes and the
result equals the single-device one (the means are global over the batch, XLA inserts the reductions).

    rewards = RegionRewards(boxes, scores, valid, global_scores)        # [B, K, 4], [B, K], [B, K], [B]
    r_tok = per_token_rewards(rewards, image_hw=(H, W), latent_hw=(h, w))   # [B, h*w]
    loss, aux = srum_flow_loss(v_pred, noise, x_bad, x_gt, r_tok, mask, lambda_constraint)
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp

from srum_jax import losses
from srum_jax.rewards import reward_map, resize_reward_map


class RegionRewards(NamedTuple):
  """Judged regions of B images: boxes [B, K, 4] pixels, scores [B, K], valid [B, K], global_scores [B]."""
  boxes: jax.Array
  scores: jax.Array
  valid: jax.Array
  global_scores: jax.Array


def per_token_rewards(r: RegionRewards, *, image_hw: Tuple[int, int], latent_hw: Tuple[int, int],
                      signed: bool = False, use_local: bool = True, use_global: bool = True) -> jax.Array:
  """[B, h*w] rewards: the dense map at image resolution, bilinearly resized to the latent token grid.

  use_local=False drops the region terms (global-only map), use_global=False sets g = 1 (region-only
  map, (g+1)/2 = 1): the two ablation levers of the paper.
  """
  valid = r.valid if use_local else jnp.zeros_like(r.valid)
  g = r.global_scores if use_global else jnp.ones_like(r.global_scores)
  maps = reward_map(r.boxes, r.scores, valid, g, height=image_hw[0], width=image_hw[1], signed=signed)
  h, w = latent_hw
  return resize_reward_map(maps, h, w).reshape(maps.shape[0], h * w)


def srum_objective(r: RegionRewards, v_pred, noise, x_bad, x_gt, token_mask, *, image_hw, latent_hw,
                   lambda_constraint: float, signed: bool = False, use_local: bool = True,
                   use_global: bool = True):
  """Loss for one image per row: tokens [B, h*w, C]. Returns (loss, aux with the two terms and mean R)."""
  r_tok = per_token_rewards(r, image_hw=image_hw, latent_hw=latent_hw, signed=signed, use_local=use_local,
                            use_global=use_global)
  loss, aux = losses.srum_flow_loss(v_pred, noise, x_bad, x_gt, r_tok, token_mask, lambda_constraint)
  m = token_mask.astype(jnp.float32)
  aux = dict(aux, reward_mean=jnp.sum(r_tok * m) / jnp.maximum(jnp.sum(m), 1.0))
  return loss, aux
