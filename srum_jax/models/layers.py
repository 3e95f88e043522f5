"""Primitive layers as pure functions over parameter dicts, with the dtype policy in one place.

Policy: parameters are stored in `param_dtype` (fp32 or bf16); matmuls run in the compute dtype of their
input (bf16 for real runs, fp32 in conformance tests); norms, softmax and RoPE run in fp32. LoRA adapters
(`lora_a`, `lora_b` next to a kernel) run in the same compute dtype, whatever dtype they are stored in.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class LoraRun(NamedTuple):
  """How `dense` applies the adapters it finds in its parameters: `scale` = alpha / rank; `rate` = dropout on
  the adapters' input, applied only when `key` is set (training)."""
  scale: float
  rate: float = 0.0
  key: Optional[jax.Array] = None


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x @ w in x's dtype (w cast to it; fp32 accumulation where the backend does it)."""
  return jnp.einsum("...i,io->...o", x, w.astype(x.dtype),
                    preferred_element_type=jnp.float32 if x.dtype == jnp.float32 else None)


def lora_delta(p, x: jax.Array, lora: LoraRun) -> jax.Array:
  """The low-rank update (dropout(x) @ lora_a) @ lora_b * scale, in PEFT's order, in x's dtype."""
  if lora.key is not None and lora.rate > 0:
    keep = jax.random.bernoulli(lora.key, 1.0 - lora.rate, x.shape)
    x = jnp.where(keep, x / (1.0 - lora.rate), 0).astype(x.dtype)
  h = _matmul(x, p["lora_a"]).astype(x.dtype)
  return (_matmul(h, p["lora_b"]) * lora.scale).astype(x.dtype)


def dense(p, x: jax.Array, lora: Optional[LoraRun] = None) -> jax.Array:
  """y = x @ kernel + bias (+ the LoRA update when `p` holds adapters), computed in x's dtype."""
  y = _matmul(x, p["kernel"])
  if "bias" in p:
    y = y + p["bias"].astype(y.dtype)
  if "lora_a" in p:
    if lora is None:
      raise ValueError("these parameters hold LoRA adapters: pass `lora` (a LoraRun with the scale)")
    y = y + lora_delta(p, x, lora).astype(y.dtype)
  return y.astype(x.dtype)


def rms_norm(p, x: jax.Array, eps: float) -> jax.Array:
  """Qwen2 RMSNorm: normalise in fp32, cast back to the input dtype, then scale (eps 1e-6 in BAGEL)."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype) * p["scale"].astype(x.dtype)


def layer_norm(p, x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm with scale and bias, statistics in fp32."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps)
  y = y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
  return y.astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
  """PyTorch `gelu_pytorch_tanh` (tanh approximation)."""
  return jax.nn.gelu(x, approximate=True)


def silu(x: jax.Array) -> jax.Array:
  return jax.nn.silu(x)


def gather_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """Per row b: x[b, index[b]] for x [B, N, ...] and index [B, C] -> [B, C, ...]; out-of-range entries
  (index >= N, the packing's "unused" marker) give 0."""
  return jax.vmap(lambda xr, ir: xr.at[ir].get(mode="fill", fill_value=0))(x, index)


def scatter_rows(base: jax.Array, index: jax.Array, values: jax.Array) -> jax.Array:
  """Per row b: base[b, index[b]] = values[b] (cast to base's dtype); out-of-range entries are skipped."""
  return jax.vmap(lambda br, ir, vr: br.at[ir].set(vr.astype(br.dtype), mode="drop"))(base, index, values)
