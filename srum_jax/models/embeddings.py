"""Fixed and learned embeddings around the LLM: 2-D sin-cos tables, timestep embedder, latent
patches.

See docs/bagel.md, "Position tables and 2-D ids" and "Latent tokens and timestep embedder".
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from srum_jax.models import layers


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """[len(pos), dim]: sin of pos * w_k for the first half, cos for the second (w_k =
  10000^(-k/(dim/2)))."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.outer(pos.astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@functools.lru_cache(maxsize=16)
def sincos_2d_table(grid: int, dim: int) -> np.ndarray:
  """Fixed [grid*grid, dim] table; row `r*grid + c` is [E(c), E(r)] (column half first)."""
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  emb = np.concatenate(
      [_sincos_1d(dim // 2, cols.reshape(-1)),
       _sincos_1d(dim // 2, rows.reshape(-1))], axis=1)
  emb = emb.astype(np.float32)
  emb.setflags(write=False)
  return emb


def timestep_features(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features [..., dim] of flow time t in [0, 1] (not scaled by 1000), cos first."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  a = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(a), jnp.sin(a)], axis=-1)


def timestep_embed(p, t: jax.Array, dtype=jnp.float32) -> jax.Array:
  """time_embedder: Linear(256 -> D) -> SiLU -> Linear(D -> D)."""
  f = timestep_features(t, p["fc1"]["kernel"].shape[0]).astype(dtype)
  return layers.dense(p["fc2"], layers.silu(layers.dense(p["fc1"], f)))


def patchify_latent(latent: jax.Array, p: int) -> jax.Array:
  """NHWC latent [..., p*h, p*w, z] -> tokens [..., h*w, p*p*z], features (row, col, channel),
  channel fastest."""
  *lead, H, W, z = latent.shape
  h, w = H // p, W // p
  x = latent.reshape(*lead, h, p, w, p, z)
  x = jnp.moveaxis(x, -4, -3)  # [..., h, w, p(row), p(col), z]
  return x.reshape(*lead, h * w, p * p * z)


def unpatchify_latent(tokens: jax.Array, h: int, w: int, p: int) -> jax.Array:
  """Inverse of `patchify_latent`: [..., h*w, p*p*z] -> NHWC [..., p*h, p*w, z]."""
  *lead, n, f = tokens.shape
  z = f // (p * p)
  x = tokens.reshape(*lead, h, w, p, p, z)
  x = jnp.moveaxis(x, -3, -4)  # [..., h, p, w, p, z]
  return x.reshape(*lead, h * p, w * p, z)
