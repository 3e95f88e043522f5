"""Dense reward maps from judged regions (SRUM's `data/regional_reward_dataset.py`) and their
per-token form for the SRUM loss (docs/bagel.md, "Reward map", "SRUM loss").

Usage (shapes static; `height`/`width` are the transformed image size):

  boxes, scores, valid, g = records_to_arrays(records, max_regions=5)
  # [B, 1024, 1024] in [0, 1]
  maps = reward_map(boxes, scores, valid, g, height=1024, width=1024)
  # [B*32*32] packed token order
  r_tok = token_rewards(maps, [(32, 32)] * len(records))
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["reward_map", "resize_reward_map", "token_rewards"]


def reward_map(boxes, scores, valid, global_scores, *, height: int, width: int,
               signed: bool = False):
  """[B, height, width] float32 reward maps; pure jnp, jit with static height, width (and signed).

  Args:
    boxes: [B, K, 4] (x_min, y_min, x_max, y_max) in pixels. Each coordinate is truncated toward
      zero (Python int(): -0.5 -> 0, 13.7 -> 13); a box whose truncated x_min >= x_max or y_min >=
      y_max is ignored (checked before clamping, as the official code does), and NaN coordinates
      make it ignored. The box then covers the pixels x_min <= x < x_max, y_min <= y < y_max
      clamped to the image.
    scores: [B, K] region scores in [-1, 1].
    valid: [B, K] bool; False entries (padding) are ignored.
    global_scores: [B] global layout scores g in [-1, 1] (use 0.0 for a missing one, as official).
    signed: False (default) = the official map; True = the signed variant below.

  Official map (signed=False), values in [0, 1] for scores in [-1, 1]:
    M = 0.5 everywhere; on each valid box M = max(M, (s + 1) / 2); finally M = M * (g + 1) / 2.
    A region scored <= 0 cannot go below the 0.5 base, so nothing is ever "repelled": a bad image or
    region only gets a smaller positive weight in R * (v - (eps - x_bad))^2.

  Signed map (signed=True, opt-in): M = (r + g) / 2 in [-1, 1], where r is the score of the box
  covering
    the pixel with the largest |s| (the most decided judgement; on a tie the lower score, so equally strong
    good and bad verdicts are not rewarded), and r = 0 where no valid box covers the pixel. Neutral
    scores give 0: no learning signal; negative values make the reward term push the prediction AWAY
    from the sampled flow target, which is what the paper's comments describe. Consequence for the
    loss: per token the quadratic coefficient of v in L_reward + lambda * L_constraint is R + lambda
    (x_gt ~ x_bad), so the total loss is unbounded below wherever R < -lambda (with lambda = 0.5:
    wherever (r + g)/2 < -0.5). Only use it with the constraint term, gradient clipping and few
    steps.
  """
  boxes = jnp.trunc(jnp.asarray(boxes, jnp.float32))
  scores = jnp.asarray(scores, jnp.float32)
  g = jnp.asarray(global_scores, jnp.float32)
  x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
  ok = jnp.asarray(valid, bool) & (x0 < x1) & (y0 < y1)  # NaN compares False -> ignored
  # Clamping to the image: xs >= max(x0, 0) is xs >= x0 for xs >= 0, and xs < min(x1, W) is xs < x1
  # for xs < W, so comparing against the pixel grid clamps implicitly; an out-of-image box covers
  # nothing.
  ys = jnp.arange(height, dtype=jnp.float32)
  xs = jnp.arange(width, dtype=jnp.float32)
  rows = (ys >= y0[..., None]) & (ys < y1[..., None])  # [B, K, H]
  cols = (xs >= x0[..., None]) & (xs < x1[..., None])  # [B, K, W]
  cover = ok[..., None, None] & rows[..., :, None] & cols[..., None, :]  # [B, K, H, W]
  s = scores[..., None, None]
  if not signed:
    w = jnp.where(cover, (s + 1.0) / 2.0, 0.5)
    m = jnp.max(w, axis=1, initial=0.5)
    return m * ((g + 1.0) / 2.0)[:, None, None]
  strength = jnp.max(jnp.where(cover, jnp.abs(s), -1.0), axis=1, initial=-1.0)  # [B, H, W]
  pick = cover & (jnp.abs(s) == strength[:, None])
  r = jnp.min(jnp.where(pick, s, jnp.inf), axis=1, initial=jnp.inf)
  r = jnp.where(jnp.isfinite(r), r, 0.0)
  return (r + g[:, None, None]) / 2.0


@functools.lru_cache(maxsize=64)
def _linear_taps(n_in: int, n_out: int):
  """PyTorch bilinear taps for one axis (align_corners=False, no antialias), in float32 like torch's
  CPU.

  src = max((dst + 0.5) * n_in / n_out - 0.5, 0); i0 = floor(src) (at most n_in - 1); i1 = min(i0 +
  1, n_in - 1); weights (1 - l, l) with l = src - i0.
  """
  scale = np.float32(n_in) / np.float32(n_out)
  src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  l1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
  l0 = (np.float32(1.0) - l1).astype(np.float32)
  return i0, i1, l0, l1


def resize_reward_map(maps, h: int, w: int):
  """[B, H, W] -> [B, h, w]: exactly torch F.interpolate(mode='bilinear', align_corners=False), no
  antialias.

  (jax.image.resize antialiases when downsampling, which torch's default bilinear does not.)
  """
  maps = jnp.asarray(maps, jnp.float32)
  H, W = maps.shape[-2:]
  yi0, yi1, yl0, yl1 = _linear_taps(int(H), int(h))
  xi0, xi1, xl0, xl1 = _linear_taps(int(W), int(w))
  top, bot = jnp.take(maps, yi0, axis=-2), jnp.take(maps, yi1, axis=-2)  # [B, h, W]

  def cols(rows):
    return xl0 * jnp.take(rows, xi0, axis=-1) + xl1 * jnp.take(rows, xi1, axis=-1)

  return yl0[:, None] * cols(top) + yl1[:, None] * cols(bot)


def token_rewards(maps, latent_hw: Sequence[Sequence[int]]):
  """Per-token rewards in packed order: map i resized to its latent token grid (h_i, w_i), flattened
  row-major, concatenated over images -> [sum_i h_i * w_i] (bilinear, align_corners=False).
  `latent_hw` must be concrete (e.g. `patchified_vae_latent_shapes`)."""
  hw = [(int(a), int(b)) for a, b in np.asarray(latent_hw).reshape(-1, 2).tolist()]
  if len(hw) != maps.shape[0]:
    raise ValueError(f"{maps.shape[0]} maps but {len(hw)} latent grids")
  if len(set(hw)) == 1:
    h, w = hw[0]
    return resize_reward_map(maps, h, w).reshape(-1)
  return jnp.concatenate(
      [resize_reward_map(maps[i:i + 1], h, w).reshape(-1) for i, (h, w) in enumerate(hw)])
