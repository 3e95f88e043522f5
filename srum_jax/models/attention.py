"""Grouped-query attention over packed sequences, masked from token metadata (BAGEL's packed-sequence mask rule,
docs/bagel.md "Packed sequence layout and attention mask").

Query head h uses kv head h // (Hq / Hkv) (consecutive query heads share a kv head); scale 1/sqrt(d);
scores and softmax in fp32; no dropout. A query with no visible key (padding) returns 0, never NaN.

Two implementations of the same function:
* `dense`: one [B, H, Nq, Nk] score tensor; simplest, for short sequences and as the reference.
* `chunked`: query blocks through `lax.map`, each block's mask built from metadata, so memory is
  O(block * Nk) instead of O(Nq * Nk); each block is rematerialised in the backward pass so gradients do
  not store the scores of all blocks either.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from srum_jax.models.packing import TokenMeta, attention_mask

_NEG = -1e30  # finite "minus infinity": keeps fully-masked rows NaN-free


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """q [B, Nq, Hq, d], k/v [B, Nk, Hkv, d], mask bool [B, Nq, Nk] -> [B, Nq, Hq, d] in q's dtype."""
  B, Nq, Hq, d = q.shape
  Hkv = k.shape[2]
  if Hq % Hkv:
    raise ValueError(f"query heads {Hq} not a multiple of kv heads {Hkv}")
  qg = q.reshape(B, Nq, Hkv, Hq // Hkv, d)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
  s = s.astype(jnp.float32) * (1.0 / math.sqrt(d))
  m = mask[:, None, None, :, :]
  s = jnp.where(m, s, _NEG)
  e = jnp.where(m, jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), 0.0)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  p = e / jnp.where(denom > 0, denom, 1.0)
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o.reshape(B, Nq, Hq, d).astype(q.dtype)


def _pad_meta(meta: TokenMeta, n: int) -> TokenMeta:
  """Append n padding slots (sample_id -1) along the token axis."""
  def pad(x, value):
    return jnp.pad(x, ((0, 0), (0, n)), constant_values=value)
  return TokenMeta(sample_id=pad(meta.sample_id, -1), split_id=pad(meta.split_id, 0), mode=pad(meta.mode, 0),
                   index=pad(meta.index, 0), position=pad(meta.position, 0), is_gen=pad(meta.is_gen, False))


def _chunked(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, block_q: int) -> jax.Array:
  B, Nq, Hq, d = q.shape
  nb = -(-Nq // block_q)
  pad = nb * block_q - Nq
  if pad:
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_meta = _pad_meta(q_meta, pad)

  def blocks(x):  # [B, nb*bq, ...] -> [nb, B, bq, ...]
    return jnp.moveaxis(x.reshape(B, nb, block_q, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def one_block(args):
    qb, mb = args
    return masked_attention(qb, k, v, attention_mask(mb, k_meta))

  out = jax.lax.map(one_block, (blocks(q), jax.tree.map(blocks, q_meta)))
  out = jnp.moveaxis(out, 0, 1).reshape(B, nb * block_q, Hq, d)
  return out[:, :Nq]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_meta: TokenMeta, k_meta: TokenMeta, *,
              impl: str = "dense", block_q: int = 512) -> jax.Array:
  """GQA attention of q [B, Nq, Hq, d] over k/v [B, Nk, Hkv, d] with the packed-sequence mask from metadata.

  impl: "dense" (materialise the scores) or "chunked" (query blocks of `block_q`, same result).
  """
  if impl == "dense":
    return masked_attention(q, k, v, attention_mask(q_meta, k_meta))
  if impl == "chunked":
    if q.shape[1] <= block_q:
      return masked_attention(q, k, v, attention_mask(q_meta, k_meta))
    return _chunked(q, k, v, q_meta, k_meta, block_q)
  raise ValueError(f"unknown attention impl {impl!r}; choose 'dense' or 'chunked'")
