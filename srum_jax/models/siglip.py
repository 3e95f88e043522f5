"""SigLIP NaViT vision encoder and the MLP connector into the LLM (docs/bagel.md, "SigLIP encoder
and connector").

Images arrive as rows of flattened 14x14 patches (`image_transforms.vit_patchify`). Several images
may be packed into one row: `segment_ids` says which image a patch belongs to, attention is full
inside a segment and absent across segments (the official code's `cu_seqlens` variable-length
attention). Segment -1 marks padding; padding attends nowhere and produces finite values that the
caller ignores.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from srum_jax.models import embeddings, layers
from srum_jax.models.config import BagelConfig, ViTConfig


def vit_position_ids(h_patches: int, w_patches: int, max_per_side: int) -> np.ndarray:
  """Flattened ids `row * max_per_side + col` of an h x w patch grid, row-major (NaViT
  "extrapolate": a small image uses the table's top-left corner, no interpolation)."""
  rows, cols = np.meshgrid(np.arange(h_patches), np.arange(w_patches), indexing="ij")
  return (rows * max_per_side + cols).reshape(-1).astype(np.int32)


def segment_attention_mask(segment_ids: jax.Array) -> jax.Array:
  """[B, 1, Nq, Nk] bool: query and key in the same image, padding (segment < 0) on neither side."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  valid = (segment_ids >= 0)[:, :, None] & (segment_ids >= 0)[:, None, :]
  return (same & valid)[:, None]


def _attention(p, x: jax.Array, mask: jax.Array, num_heads: int) -> jax.Array:
  """Multi-head self-attention with biased projections; logits and softmax in fp32."""
  b, n, c = x.shape
  d = c // num_heads
  split = lambda t: t.reshape(b, n, num_heads, d)
  q, k, v = (split(layers.dense(p[name], x)) for name in ("q_proj", "k_proj", "v_proj"))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(d)
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(mask, probs, 0.0)  # rows with no visible key (padding) become all-zero, not NaN
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(x.dtype), v)
  return layers.dense(p["out_proj"], out.reshape(b, n, c))


def _encoder_layer(p, x: jax.Array, mask: jax.Array, cfg: ViTConfig) -> jax.Array:
  """Pre-LN block: x + attn(LN1 x), then x + fc2(gelu_tanh(fc1(LN2 x)))."""
  h = layers.layer_norm(p["layer_norm1"], x, cfg.layer_norm_eps)
  x = x + _attention(p, h, mask, cfg.num_attention_heads)
  h = layers.layer_norm(p["layer_norm2"], x, cfg.layer_norm_eps)
  return x + layers.dense(p["fc2"], layers.gelu_tanh(layers.dense(p["fc1"], h)))


def vit_forward(params_vit, patches: jax.Array, position_ids: jax.Array, segment_ids: jax.Array, *,
                cfg: ViTConfig) -> jax.Array:
  """[B, Np, 3*14*14] patches -> [B, Np, C] features (post_layernorm applied; compute dtype =
  patches')."""
  x = layers.dense(params_vit["patch_embedding"], patches)
  table = params_vit["position_embedding"]["embedding"]
  x = x + jnp.take(table, position_ids, axis=0, mode="clip").astype(x.dtype)
  mask = segment_attention_mask(segment_ids)

  def body(h, p_layer):
    return _encoder_layer(p_layer, h, mask, cfg), None

  x, _ = jax.lax.scan(body, x, params_vit["layers"])
  return layers.layer_norm(params_vit["post_layernorm"], x, cfg.layer_norm_eps)


def connector_forward(params_connector, x: jax.Array) -> jax.Array:
  """MLPconnector: fc1 (ViT width -> D), gelu_tanh, fc2 (D -> D)."""
  return layers.dense(params_connector["fc2"],
                      layers.gelu_tanh(layers.dense(params_connector["fc1"], x)))


def embed_vit_tokens(params, patches: jax.Array, position_ids: jax.Array, segment_ids: jax.Array,
                     cfg: BagelConfig) -> jax.Array:
  """What the LLM receives at ViT slots: connector(vit(patches)) + fixed sin-cos
  `vit_pos_embed`[ids]."""
  feats = vit_forward(params["vit"], patches, position_ids, segment_ids, cfg=cfg.vit)
  h = connector_forward(params["connector"], feats)
  table = jnp.asarray(
      embeddings.sincos_2d_table(cfg.vit_max_num_patch_per_side, cfg.llm.hidden_size))
  return h + jnp.take(table, position_ids, axis=0, mode="clip").astype(h.dtype)
