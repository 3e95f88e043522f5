"""Qwen2 decoder with Mixture-of-Transformers layers over packed rows (docs/bagel.md, "Qwen2 MoT
decoder", "Packed sequence layout and attention mask", "KV cache and prefill").

Each token is handled by the expert of its type (`is_gen`: latent tokens -> gen, everything else ->
und) for every per-token weight (norms, q/k/v/o projections, qk-norm, MLP); the attention itself is
shared by all tokens of a sample. Routing keeps the FLOPs of a single expert: per row, the und and
the gen tokens are gathered into dense groups of static capacities, projected by their own expert,
and scattered back to the row for the attention (and again for o_proj + MLP). `routing="naive"` runs
both experts on every token and selects per token; it is the reference for the routed path.

Parameters follow `params.llm_schema`; the layers are stacked and run with `lax.scan`. LoRA adapters
(`cfg.lora`) are applied where the parameters hold them; `lora_key` (training) draws their input
dropout, independently per layer, expert and projection. Dtype policy (layers.py): matmuls in the
dtype of the activations, norms / RoPE / softmax in fp32.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from srum_jax.models import layers
from srum_jax.models.attention import attention
from srum_jax.models.config import LORA_EXPERTS, LORA_TARGETS, LLMConfig
from srum_jax.models.packing import TokenMeta, padding_meta
from srum_jax.models.rope import apply_rope, rope_cos_sin

Policy = Union[None, str, Callable]


def embed_text(params_llm, ids: jax.Array, dtype=None) -> jax.Array:
  """Token embeddings [..., D] of ids [...] (in `dtype`, default the parameter dtype)."""
  x = jnp.take(params_llm["embed_tokens"]["embedding"], ids, axis=0)
  return x if dtype is None else x.astype(dtype)


def lm_logits(params_llm, h: jax.Array) -> jax.Array:
  """Text logits [..., V] from final hidden states (after the und final norm)."""
  return layers.dense(params_llm["lm_head"], h)


# ----------------------------------------------------------------------------------------------
# Routing: dense per-expert groups with static capacities


class Routing(NamedTuple):
  """Slots [B, C] of each expert's tokens in row order; unused entries hold N (out of range)."""
  und_index: jax.Array
  gen_index: jax.Array


def _select_slots(sel: jax.Array, capacity: int) -> jax.Array:
  """[B, capacity] slots where `sel` [B, N] is True, in order; unused entries N; extra tokens
  dropped."""
  B, N = sel.shape
  dest = jnp.where(sel, jnp.cumsum(sel, axis=1) - 1, capacity)
  slots = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N))
  out = jnp.full((B, capacity), N, jnp.int32)
  return jax.vmap(lambda o, d, s: o.at[d].set(s, mode="drop"))(out, dest, slots)


def route(meta: TokenMeta, und_capacity: int, gen_capacity: int) -> Routing:
  """Group the real (non-padding) tokens of each row by expert.

  Capacities are static; they must be >= the per-row counts (`Packed.num_und` / `num_gen`), tokens
  past a capacity would be skipped. Padding tokens go to no expert.
  """
  real = meta.sample_id >= 0
  return Routing(und_index=_select_slots(real & ~meta.is_gen, und_capacity),
                 gen_index=_select_slots(real & meta.is_gen, gen_capacity))


# ----------------------------------------------------------------------------------------------
# One MoT layer


def _lora_run(cfg: LLMConfig, key: Optional[jax.Array], name: str) -> Optional[layers.LoraRun]:
  """The LoraRun of projection `name` (None without LoRA); its dropout key folds in the
  projection."""
  if cfg.lora is None:
    return None
  drop = None if key is None or cfg.lora.dropout == 0 else jax.random.fold_in(
      key, LORA_TARGETS.index(name))
  return layers.LoraRun(cfg.lora.scale, float(cfg.lora.dropout), drop)


def _proj(p, name: str, x: jax.Array, cfg: LLMConfig, key: Optional[jax.Array]) -> jax.Array:
  return layers.dense(p[name], x, _lora_run(cfg, key, name))


def _qkv(p, x: jax.Array, cfg: LLMConfig, key: Optional[jax.Array] = None):
  """Expert e: RMSNorm_e, q/k/v projections, per-head qk-norm (before RoPE)."""
  d = cfg.head_dim
  h = layers.rms_norm(p["input_norm"], x, cfg.rms_norm_eps)
  q = _proj(p, "q_proj", h, cfg, key).reshape(*x.shape[:-1], cfg.num_attention_heads, d)
  k = _proj(p, "k_proj", h, cfg, key).reshape(*x.shape[:-1], cfg.num_key_value_heads, d)
  v = _proj(p, "v_proj", h, cfg, key).reshape(*x.shape[:-1], cfg.num_key_value_heads, d)
  if cfg.qk_norm:
    q = layers.rms_norm(p["q_norm"], q, cfg.rms_norm_eps)
    k = layers.rms_norm(p["k_norm"], k, cfg.rms_norm_eps)
  return q, k, v


def _out_mlp(p, x: jax.Array, attn: jax.Array, cfg: LLMConfig,
             key: Optional[jax.Array] = None) -> jax.Array:
  """Expert e: X + Wo_e(attn), then X + down(silu(gate(H)) * up(H)) with H = RMSNorm_post_e(X)."""
  x = x + _proj(p, "o_proj", attn, cfg, key)
  h = layers.rms_norm(p["post_norm"], x, cfg.rms_norm_eps)
  m = p["mlp"]
  gate = layers.silu(_proj(m, "gate_proj", h, cfg, key))
  return x + _proj(m, "down_proj", gate * _proj(m, "up_proj", h, cfg, key), cfg, key)


def mot_layer(
    p, x: jax.Array, meta: TokenMeta, cos: jax.Array, sin: jax.Array, routing: Optional[Routing],
    cfg: LLMConfig, attend: Callable,
    lora_key: Optional[jax.Array] = None) -> Tuple[jax.Array, Tuple[jax.Array, jax.Array]]:
  """One decoder layer on x [B, N, D]; returns (new x, (k, v) after qk-norm and RoPE).

  `routing=None` is the naive reference (both experts on all tokens). `attend(q, k, v)` runs the
  shared attention (plain, or over a KV cache). Padding tokens pass through unchanged. `lora_key`:
  this layer's key for the adapters' dropout (None: no dropout).
  """
  key = {e: None if lora_key is None else jax.random.fold_in(lora_key, LORA_EXPERTS.index(e))
         for e in ("und", "gen")}
  experts = []
  if routing is not None:
    experts = [(e, idx)
               for e, idx in (("und", routing.und_index), ("gen", routing.gen_index))
               if idx.shape[1] > 0]
  B, N, _ = x.shape
  is_gen = meta.is_gen[..., None, None]

  if routing is None:
    qu, ku, vu = _qkv(p["und"], x, cfg, key["und"])
    qg, kg, vg = _qkv(p["gen"], x, cfg, key["gen"])
    q, k, v = jnp.where(is_gen, qg, qu), jnp.where(is_gen, kg, ku), jnp.where(is_gen, vg, vu)
  else:
    d = cfg.head_dim
    q = jnp.zeros((B, N, cfg.num_attention_heads, d), x.dtype)
    k = jnp.zeros((B, N, cfg.num_key_value_heads, d), x.dtype)
    v = jnp.zeros_like(k)
    for e, idx in experts:
      qe, ke, ve = _qkv(p[e], layers.gather_rows(x, idx), cfg, key[e])
      q, k, v = layers.scatter_rows(q, idx, qe), layers.scatter_rows(k, idx,
                                                                     ke), layers.scatter_rows(
                                                                         v, idx, ve)

  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  attn = attend(q, k, v).reshape(B, N, -1)

  if routing is None:
    y = jnp.where(meta.is_gen[..., None], _out_mlp(p["gen"], x, attn, cfg, key["gen"]),
                  _out_mlp(p["und"], x, attn, cfg, key["und"]))
    y = jnp.where((meta.sample_id >= 0)[..., None], y, x)
  else:
    y = x
    for e, idx in experts:
      out = _out_mlp(p[e], layers.gather_rows(x, idx), layers.gather_rows(attn, idx), cfg, key[e])
      y = layers.scatter_rows(y, idx, out)
  return y, (k, v)


def final_norm(params_llm, x: jax.Array, meta: TokenMeta, eps: float) -> jax.Array:
  """`norm` for und tokens, `norm_gen` for gen tokens; 0 at padding."""
  h = jnp.where(meta.is_gen[..., None], layers.rms_norm(params_llm["norm_gen"], x, eps),
                layers.rms_norm(params_llm["norm"], x, eps))
  return jnp.where((meta.sample_id >= 0)[..., None], h, 0).astype(x.dtype)


def _remat_policy(policy: Policy):
  if policy is None or callable(policy):
    return policy
  return getattr(jax.checkpoint_policies, policy)


def decoder_forward(params_llm, x: jax.Array, meta: TokenMeta, *, cfg: LLMConfig, und_capacity: int,
                    gen_capacity: int, attn_impl: str = "dense", remat: bool = False,
                    remat_policy: Policy = None, routing: str = "routed", block_q: int = 512,
                    scan_unroll: int | bool = 1, lora_key: Optional[jax.Array] = None,
                    attn_window: int = 0) -> jax.Array:
  """Packed rows x [B, N, D] -> final hidden [B, N, D] (after the per-expert final norm; 0 at
  padding).

  und/gen_capacity: static per-row group sizes for routing (ignored by `routing="naive"`).
  scan_unroll: `lax.scan` unroll factor (True = no loop; used to count FLOPs exactly, since XLA's
  cost analysis counts a loop body once). remat: wrap the layer body in `jax.checkpoint` (policy:
  None = save nothing, a name from `jax.checkpoint_policies`, or a policy callable). lora_key: key
  of the LoRA dropout (training; None: none), folded with the layer index. attn_window: see
  `attention.attention(window=)` (the caller packed every sample inside one such window).
  """
  cos, sin = rope_cos_sin(meta.position, cfg.head_dim, cfg.rope_theta)
  rt = _routing(meta, routing, und_capacity, gen_capacity)

  def attend(q, k, v):
    return attention(q, k, v, meta, meta, impl=attn_impl, block_q=block_q, window=attn_window)

  def body(h, xs):
    p, i = xs
    key = None if lora_key is None else jax.random.fold_in(lora_key, i)
    h, _ = mot_layer(p, h, meta, cos, sin, rt, cfg, attend, key)
    return h, None

  if remat:
    body = jax.checkpoint(body, policy=_remat_policy(remat_policy))
  n_layers = jax.tree.leaves(params_llm["layers"])[0].shape[0]
  xs = (params_llm["layers"], jnp.arange(n_layers, dtype=jnp.int32))
  h, _ = jax.lax.scan(body, x, xs, unroll=scan_unroll)
  return final_norm(params_llm, h, meta, cfg.rms_norm_eps)


def _routing(meta: TokenMeta, routing: str, und_capacity: int,
             gen_capacity: int) -> Optional[Routing]:
  if routing == "naive":
    return None
  if routing == "routed":
    return route(meta, und_capacity, gen_capacity)
  raise ValueError(f"unknown routing {routing!r}; choose 'routed' or 'naive'")


# ----------------------------------------------------------------------------------------------
# KV cache (inference: prefill, decoding, image-generation query blocks)


class KVCache(NamedTuple):
  """k, v [L, B, T, Hkv, d] (keys after qk-norm and RoPE); meta: the cached keys' TokenMeta [B, T]
  (`index` = slot); length [B]: filled slots per row (rows fill independently)."""
  k: jax.Array
  v: jax.Array
  meta: TokenMeta
  length: jax.Array


def init_cache(cfg: LLMConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
  """Empty cache of `max_len` slots per row: every slot is padding (invisible)."""
  shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
  meta = TokenMeta(*(jnp.asarray(a) for a in padding_meta(batch, max_len)))
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), meta=meta,
                 length=jnp.zeros((batch,), jnp.int32))


def decoder_forward_cached(params_llm, x: jax.Array, q_meta: TokenMeta, cache: KVCache, *,
                           cfg: LLMConfig, update_cache: bool, und_capacity: int, gen_capacity: int,
                           attn_impl: str = "dense",
                           block_q: int = 512) -> Tuple[jax.Array, KVCache]:
  """New tokens x [B, Nq, D] attend to the cache ++ themselves under the packed mask rule; returns
  (h, cache).

  The new tokens' `index` is set to their cache slot (`length[b]` + rank among the row's real
  tokens), so a causal split may continue across calls (chunked prefill, decoding). The caller sets
  sample_id, split_id (later than the cached splits for a new split), mode and position (its `rope`
  counter). With `update_cache`, real tokens' k/v/meta are written at their slots and `length`
  advances by their count; padding (sample_id -1) is neither written nor counted. Slots past T are
  dropped (size T for the whole context). Without it (the image-generation query block) the cache is
  returned unchanged.
  """
  real = q_meta.sample_id >= 0
  T = cache.k.shape[2]
  slot = cache.length[:, None] + jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1
  q_meta = q_meta._replace(index=slot.astype(jnp.int32))
  dest = jnp.where(real, slot, T)
  k_meta = TokenMeta(
      *(jnp.concatenate([c, n.astype(c.dtype)], axis=1) for c, n in zip(cache.meta, q_meta)))
  cos, sin = rope_cos_sin(q_meta.position, cfg.head_dim, cfg.rope_theta)
  rt = route(q_meta, und_capacity, gen_capacity)

  def body(h, xs):
    p, ck, cv = xs

    def attend(q, k, v):
      kk = jnp.concatenate([ck.astype(k.dtype), k], axis=1)
      vv = jnp.concatenate([cv.astype(v.dtype), v], axis=1)
      return attention(q, kk, vv, q_meta, k_meta, impl=attn_impl, block_q=block_q)

    h, (k, v) = mot_layer(p, h, q_meta, cos, sin, rt, cfg, attend)
    if not update_cache:
      return h, None
    return h, (layers.scatter_rows(ck, dest, k), layers.scatter_rows(cv, dest, v))

  h, kv = jax.lax.scan(body, x, (params_llm["layers"], cache.k, cache.v))
  h = final_norm(params_llm, h, q_meta, cfg.rms_norm_eps)
  if not update_cache:
    return h, cache
  meta = TokenMeta(*(layers.scatter_rows(c, dest, n) for c, n in zip(cache.meta, q_meta)))
  length = cache.length + jnp.sum(real, axis=1, dtype=jnp.int32)
  return h, KVCache(k=kv[0], v=kv[1], meta=meta, length=length)
