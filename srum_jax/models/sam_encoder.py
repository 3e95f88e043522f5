"""SAM's ViT image encoder as pure functions over `sam_schema.image_encoder_schema` (channels last).

    pixels = normalize_pixels(cfg, images_u8, height, width)   # [B, S, S, 3] padded model input
    embeddings = encode_images(params["image_encoder"], cfg, pixels)   # [B, G, G, D]

Images enter as uint8 [B, S, S, 3] already resized so the longer side is S (the model's image size)
and zero-padded at the bottom / right; `normalize_pixels` scales to [0, 1], applies the ImageNet
statistics and keeps the padding at exactly 0 (the released models' preprocessing: normalise, then
pad). Blocks: pre-LN attention with decomposed relative positions (MViTv2: a learned table per axis,
the query's dot product with the table entry of each query-key offset added to the logits), inside
non-overlapping windows (the grid zero-padded to a multiple of the window) or over the whole grid in
the global blocks, then a GELU MLP. The neck maps to D channels: 1x1 conv, LayerNorm over channels,
3x3 conv, LayerNorm. Matmuls run in the activations' dtype; norms and softmax in fp32.
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from srum_jax.models import layers
from srum_jax.models.sam_config import SamConfig

NECK_LN_EPS = 1e-6  # the neck's channel LayerNorms (both weight sources)


def normalize_pixels(cfg: SamConfig, images: jax.Array, height: int, width: int,
                     dtype=jnp.float32) -> jax.Array:
  """uint8 [B, S, S, 3] (image in the top-left `height` x `width`, S = cfg.image_size) -> the model
  input: (x / 255 - mean) / std inside the image, 0 in the padding."""
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(cfg.pixel_mean, jnp.float32)) / jnp.asarray(cfg.pixel_std, jnp.float32)
  s = cfg.image_size
  inside = (np.arange(s)[:, None] < height) & (np.arange(s)[None, :] < width)
  return jnp.where(jnp.asarray(inside)[None, :, :, None], x, 0.0).astype(dtype)


def relative_table(rel_pos: jax.Array, size: int) -> jax.Array:
  """[2 * size - 1, d] learned offsets -> [size (query), size (key), d]: entry (q, k) is
  rel_pos[q - k + size - 1] (query and key grids of the same side, as in every SAM block)."""
  if rel_pos.shape[0] != 2 * size - 1:
    raise ValueError(f"relative position table of {rel_pos.shape[0]} rows for a side of {size}")
  offsets = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
  return rel_pos[offsets]


def attention(p, x: jax.Array, num_heads: int) -> jax.Array:
  """Self-attention over each [h, w] grid of x [N, h, w, C] with decomposed relative positions."""
  n, h, w, c = x.shape
  d = c // num_heads
  qkv = layers.dense(p["qkv"], x).reshape(n, h * w, 3, num_heads, d)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, hw, heads, d]
  logits = jnp.einsum("nqhd,nkhd->nhqk", q * (d ** -0.5), k, preferred_element_type=jnp.float32)
  rq = q.reshape(n, h, w, num_heads, d)
  table_h = relative_table(p["rel_pos_h"], h).astype(x.dtype)
  table_w = relative_table(p["rel_pos_w"], w).astype(x.dtype)
  rel_h = jnp.einsum("nywhd,yid->nhywi", rq, table_h, preferred_element_type=jnp.float32)
  rel_w = jnp.einsum("nywhd,wjd->nhywj", rq, table_w, preferred_element_type=jnp.float32)
  logits = logits.reshape(n, num_heads, h, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :]
  probs = jax.nn.softmax(logits.reshape(n, num_heads, h * w, h * w), axis=-1)
  out = jnp.einsum("nhqk,nkhd->nqhd", probs.astype(x.dtype), v)
  return layers.dense(p["proj"], out.reshape(n, h, w, c))


def window_partition(x: jax.Array, window: int) -> Tuple[jax.Array, Tuple[int, int]]:
  """[B, H, W, C] -> ([B * nh * nw, window, window, C], padded (Hp, Wp)); zero padding at the
  bottom / right up to a multiple of `window`; windows in row-major order per image."""
  b, h, w, c = x.shape
  hp, wp = -(-h // window) * window, -(-w // window) * window
  x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
  x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: jax.Array, window: int, padded: Tuple[int, int],
                       size: Tuple[int, int]) -> jax.Array:
  """Inverse of `window_partition`, padding removed: -> [B, H, W, C]."""
  (hp, wp), (h, w) = padded, size
  c = windows.shape[-1]
  b = windows.shape[0] // ((hp // window) * (wp // window))
  x = windows.reshape(b, hp // window, wp // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hp, wp, c)[:, :h, :w]


def block(p, x: jax.Array, cfg: SamConfig, window: int) -> jax.Array:
  """One pre-LN ViT block on [B, G, G, C]; `window` 0 = global attention."""
  e = cfg.encoder
  h = layers.layer_norm(p["norm1"], x, e.layer_norm_eps)
  if window:
    windows, padded = window_partition(h, window)
    h = window_unpartition(attention(p, windows, e.num_heads), window, padded, x.shape[1:3])
  else:
    h = attention(p, h, e.num_heads)
  x = x + h
  h = layers.layer_norm(p["norm2"], x, e.layer_norm_eps)
  h = jax.nn.gelu(layers.dense(p["mlp_in"], h), approximate=False)
  return x + layers.dense(p["mlp_out"], h)


def patch_embed(p, pixels: jax.Array, patch: int) -> jax.Array:
  """[B, S, S, 3] -> [B, S/p, S/p, C]: the p x p stride-p convolution as one matmul per patch."""
  b, s, _, ch = pixels.shape
  g = s // patch
  x = pixels.reshape(b, g, patch, g, patch, ch).transpose(0, 1, 3, 2, 4, 5)
  y = jnp.einsum("bijpqc,pqco->bijo", x, p["kernel"].astype(x.dtype),
                 preferred_element_type=jnp.float32 if x.dtype == jnp.float32 else None)
  return (y + p["bias"].astype(y.dtype)).astype(pixels.dtype)


def _conv_no_bias(kernel: jax.Array, x: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(1, 1), padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=jnp.float32 if x.dtype == jnp.float32 else None).astype(x.dtype)


def neck(p, x: jax.Array) -> jax.Array:
  """[B, G, G, C] -> [B, G, G, D]: 1x1 conv, channel LayerNorm, 3x3 conv (zero pad), LayerNorm."""
  x = _conv_no_bias(p["conv1"]["kernel"], x)
  x = layers.layer_norm(p["norm1"], x, NECK_LN_EPS)
  x = _conv_no_bias(p["conv2"]["kernel"], x)
  return layers.layer_norm(p["norm2"], x, NECK_LN_EPS)


def encode_images(p, cfg: SamConfig, pixels: jax.Array) -> jax.Array:
  """Model input [B, S, S, 3] (`normalize_pixels`) -> image embeddings [B, G, G, D] in its dtype.

  Groups of blocks run under `lax.scan` (windowed blocks under an inner scan, then the group's
  global block), so the program's size does not grow with the depth.
  """
  e = cfg.encoder
  x = patch_embed(p["patch_embed"], pixels, e.patch_size)
  x = x + p["pos_embed"].astype(x.dtype)

  def windowed(x, bp):
    return block(bp, x, cfg, e.window_size), None

  def group(x, gp):
    x, _ = jax.lax.scan(windowed, x, gp["windowed"])
    return block(gp["global"], x, cfg, 0), None

  x, _ = jax.lax.scan(group, x, {"windowed": p["windowed"], "global": p["global"]})
  return neck(p["neck"], x)
