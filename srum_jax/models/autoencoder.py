"""FLUX autoencoder in NHWC (docs/bagel.md, "FLUX autoencoder"): pixels in [-1, 1] <-> scaled
latents [B, H/8, W/8, z].

Pure functions over the `params.ae_schema` tree. Convolutions use HWIO kernels; compute dtype is the
dtype of the activations passed in; GroupNorm statistics and attention softmax run in fp32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from srum_jax.models.config import AEConfig

GROUPS = 32
GN_EPS = 1e-6


def conv(p, x: jax.Array, stride: int = 1, padding="SAME") -> jax.Array:
  """2-D convolution, NHWC input, HWIO kernel, plus bias."""
  y = jax.lax.conv_general_dilated(
      x, p["kernel"].astype(x.dtype), window_strides=(stride, stride), padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=jnp.float32 if x.dtype == jnp.float32 else None)
  return (y + p["bias"].astype(y.dtype)).astype(x.dtype)


def group_norm(p, x: jax.Array, groups: int = GROUPS, eps: float = GN_EPS) -> jax.Array:
  """GroupNorm over (H, W, channels of the group) with per-channel affine; statistics in fp32."""
  b, h, w, c = x.shape
  xf = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
  mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)
  y = ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
  y = y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
  return y.astype(x.dtype)


def swish(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(x)


def resnet_block(p, x: jax.Array) -> jax.Array:
  """shortcut(x) + conv2(swish(norm2(conv1(swish(norm1(x)))))); 1x1 `nin_shortcut` when channels
  change."""
  h = conv(p["conv1"], swish(group_norm(p["norm1"], x)))
  h = conv(p["conv2"], swish(group_norm(p["norm2"], h)))
  if "nin_shortcut" in p:
    x = conv(p["nin_shortcut"], x)
  return x + h


def attn_block(p, x: jax.Array) -> jax.Array:
  """Single-head self-attention over the h*w positions (scale 1/sqrt(C)), 1x1 projections,
  residual."""
  b, hh, ww, c = x.shape
  h = group_norm(p["norm"], x)
  q, k, v = (conv(p[name], h).reshape(b, hh * ww, c) for name in ("q", "k", "v"))
  logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(c)
  probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
  out = jnp.einsum("bqk,bkc->bqc", probs, v).reshape(b, hh, ww, c)
  return x + conv(p["proj_out"], out)


def downsample(p, x: jax.Array) -> jax.Array:
  """Zero-pad right and bottom by one pixel, then a 3x3 stride-2 convolution without padding."""
  x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  return conv(p["conv"], x, stride=2, padding="VALID")


def upsample(p, x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2, then a 3x3 convolution (pad 1)."""
  x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return conv(p["conv"], x)


def _mid(p, x: jax.Array) -> jax.Array:
  return resnet_block(p["block_2"], attn_block(p["attn_1"], resnet_block(p["block_1"], x)))


def encoder(p, x: jax.Array, cfg: AEConfig) -> jax.Array:
  """Images [B, H, W, 3] -> moments [B, H/f, W/f, 2z] (mean channels first, then log-variance)."""
  h = conv(p["conv_in"], x)
  for i in range(len(cfg.ch_mult)):
    level = p["down"][str(i)]
    for j in range(cfg.num_res_blocks):
      h = resnet_block(level["block"][str(j)], h)
    if i < len(cfg.ch_mult) - 1:
      h = downsample(level["downsample"], h)
  h = _mid(p["mid"], h)
  return conv(p["conv_out"], swish(group_norm(p["norm_out"], h)))


def decoder(p, z: jax.Array, cfg: AEConfig) -> jax.Array:
  """Unscaled latents [B, h, w, z] -> images [B, h*f, w*f, 3]; `up.i` is resolution level i (0 =
  full)."""
  h = _mid(p["mid"], conv(p["conv_in"], z))
  for i in reversed(range(len(cfg.ch_mult))):
    level = p["up"][str(i)]
    for j in range(cfg.num_res_blocks + 1):
      h = resnet_block(level["block"][str(j)], h)
    if i > 0:
      h = upsample(level["upsample"], h)
  return conv(p["conv_out"], swish(group_norm(p["norm_out"], h)))


def encode_moments(params_ae, images: jax.Array, cfg: AEConfig) -> Tuple[jax.Array, jax.Array]:
  """Posterior (mean, logvar), each [B, H/f, W/f, z], of NHWC images in [-1, 1]."""
  moments = encoder(params_ae["encoder"], images, cfg)
  return moments[..., :cfg.z_channels], moments[..., cfg.z_channels:]


def encode(params_ae, images: jax.Array, cfg: AEConfig,
           key: Optional[jax.Array] = None) -> jax.Array:
  """Scaled latents `scale * (sample - shift)`.

  With `key`, sample = mean + exp(logvar / 2) * N(0, 1) (what the official encode does by default);
  with key=None the posterior mean is used (deterministic; what the fixtures pin down).
  """
  return latents_from_moments(*encode_moments(params_ae, images, cfg), cfg, key)


def latents_from_moments(mean: jax.Array, logvar: jax.Array, cfg: AEConfig,
                         key: Optional[jax.Array] = None):
  """Scaled latents from posterior moments: one encoder pass serves any number of posterior
  samples."""
  sample = mean
  if key is not None:
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    sample = (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps).astype(
        mean.dtype)
  return cfg.scale_factor * (sample - cfg.shift_factor)


def decode(params_ae, z: jax.Array, cfg: AEConfig) -> jax.Array:
  """Scaled latents [B, h, w, z] -> NHWC images (nominally in [-1, 1]): decoder(z / scale +
  shift)."""
  return decoder(params_ae["decoder"], z / cfg.scale_factor + cfg.shift_factor, cfg)


def to_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] images -> uint8 by truncating clamp(x * 0.5 + 0.5, 0, 1) * 255 (the inferencer's
  mapping)."""
  x = jnp.clip(images.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0) * 255.0
  return jnp.floor(x).astype(jnp.uint8)
