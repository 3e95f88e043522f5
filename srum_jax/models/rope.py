"""Qwen2 "default" rotary position embedding at arbitrary per-token positions.

`inv_freq[i] = theta^(-2i/d)`; angles `pos * inv_freq` repeated for both halves of the head dim
(half-split layout, not interleaved); `rot(x) = x*cos + rotate_half(x)*sin`, `rotate_half([a, b]) =
[-b, a]`. Everything is computed in float32 and cast back to the input dtype.
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> Tuple[jax.Array, jax.Array]:
  """cos, sin tables [..., d] (fp32) for integer positions [...]."""
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: jax.Array) -> jax.Array:
  a, b = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-b, a], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate x [B, N, H, d] with per-token tables cos/sin [B, N, d] (shared by all heads)."""
  xf = x.astype(jnp.float32)
  cos, sin = cos[..., None, :], sin[..., None, :]
  return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)
