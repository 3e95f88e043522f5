"""SAM's prompt encoder and mask decoder as pure functions over `sam_schema` (channels last).

    sparse = embed_points(params["prompt_encoder"], cfg, points, labels)   # [..., n + 1, D]
    masks, iou = predict_masks(params, cfg, embeddings, sparse)  # [..., T, 4G, 4G], [..., T]
    masks, iou = decode(params, cfg, embeddings, points, labels)  # the multimask outputs

Prompts: a point is encoded by random Fourier features of its position (`pe_gaussian`: sin and cos
of 2 pi (2 c - 1) @ B, c = (pixel + 0.5) / S in model-input pixels) plus a learned embedding of its
label (0 negative, 1 positive); label -1 marks a padding point, whose embedding is
`not_a_point_embed` alone. Point prompts without a box get one padding point appended (as in the
released models). Without a mask prompt every image position gets `no_mask_embed` (`embed_masks`
encodes a mask prompt instead).

Mask decoder: output tokens (one IoU token, T = multimask outputs + 1 mask tokens) followed by the
prompt tokens attend in a two-way transformer to the image embedding (plus the dense prompt) with
the image positional encoding. Per layer: token self-attention (its positional terms skipped in the
first layer), tokens -> image cross-attention, a ReLU MLP on the tokens, image -> tokens
cross-attention (the cross-attentions at half width), each followed by a LayerNorm; then a final
tokens -> image attention. The image side is upscaled 4x by two 2x2 stride-2 transposed
convolutions (LayerNorm and GELU between, GELU after); mask t's logits are the dot product of every
upscaled pixel with the output of mask token t's 3-layer hypernetwork MLP. A 3-layer MLP on the IoU
token predicts each mask's IoU. Multimask output keeps masks 1..T-1, single-mask output mask 0.

Leading dimensions broadcast: image embeddings [B, 1, G, G, D] decode prompts [B, P, n, D] (each
prompt keeps its own copy of the image tokens through the two-way transformer). Matmuls run in the
embeddings' dtype; LayerNorms, softmax, positional encodings and the mask logits in fp32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from srum_jax.models import layers
from srum_jax.models.sam_config import SamConfig

UPSCALE_LN_EPS = 1e-6  # channel LayerNorms of the upscaling and the mask prompt (both sources)


# ----------------------------------------------------------------------------------------------
# Prompt encoder

def fourier_features(gaussian: jax.Array, coords: jax.Array) -> jax.Array:
  """Coordinates [..., 2] in [0, 1] (x, y) -> [..., D]: concat(sin, cos) of 2 pi (2 c - 1) @ B, in
  fp32."""
  c = 2.0 * coords.astype(jnp.float32) - 1.0
  c = 2.0 * np.pi * jnp.einsum("...i,ij->...j", c, gaussian.astype(jnp.float32),
                               precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([jnp.sin(c), jnp.cos(c)], axis=-1)


def image_positional_encoding(p, cfg: SamConfig) -> jax.Array:
  """[G, G, D] Fourier features of the embedding grid's cell centres ((i + 0.5) / G)."""
  g = cfg.encoder.grid
  centres = (np.arange(g, dtype=np.float32) + 0.5) / g
  xy = np.stack(np.meshgrid(centres, centres, indexing="xy"), axis=-1)  # [y, x, (x, y)]
  return fourier_features(p["pe_gaussian"], jnp.asarray(xy))


def embed_points(p, cfg: SamConfig, points: jax.Array, labels: jax.Array,
                 pad: bool = True) -> jax.Array:
  """Points [..., n, 2] (x, y in model-input pixels) and labels [..., n] (1 positive, 0 negative,
  -1 padding) -> sparse prompt embeddings [..., n (+ 1 padding point when `pad`), D] in fp32."""
  points = points.astype(jnp.float32) + 0.5  # pixel centres
  labels = labels.astype(jnp.int32)
  if pad:
    points = jnp.concatenate([points, jnp.zeros(points.shape[:-2] + (1, 2), jnp.float32)], axis=-2)
    labels = jnp.concatenate([labels, -jnp.ones(labels.shape[:-1] + (1,), jnp.int32)], axis=-1)
  emb = fourier_features(p["pe_gaussian"], points / cfg.image_size)
  table = p["point_embed"]["embedding"].astype(jnp.float32)
  lab = labels[..., None]
  emb = jnp.where(lab == -1, p["not_a_point_embed"]["embedding"].astype(jnp.float32), emb)
  emb = emb + jnp.where(lab == 0, table[0], 0.0) + jnp.where(lab == 1, table[1], 0.0)
  return emb


def embed_boxes(p, cfg: SamConfig, boxes: jax.Array) -> jax.Array:
  """Boxes [..., 4] (x0, y0, x1, y1 in model-input pixels) -> [..., 2, D] corner embeddings."""
  corners = boxes.astype(jnp.float32).reshape(boxes.shape[:-1] + (2, 2)) + 0.5
  emb = fourier_features(p["pe_gaussian"], corners / cfg.image_size)
  return emb + p["point_embed"]["embedding"][2:4].astype(jnp.float32)


def _conv(p, x: jax.Array, stride: int) -> jax.Array:
  y = jax.lax.conv_general_dilated(
      x, p["kernel"].astype(x.dtype), window_strides=(stride, stride), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=jnp.float32 if x.dtype == jnp.float32 else None)
  return (y + p["bias"].astype(y.dtype)).astype(x.dtype)


def embed_masks(p, masks: jax.Array) -> jax.Array:
  """Mask prompts [B, 4G, 4G] (logits at the low resolution) -> dense embeddings [B, G, G, D]:
  two 2x2 stride-2 convolutions (channel LayerNorm and GELU after each), then a 1x1 convolution."""
  m = p["mask_embed"]
  x = masks[..., None]
  x = jax.nn.gelu(layers.layer_norm(m["norm1"], _conv(m["conv1"], x, 2), UPSCALE_LN_EPS),
                  approximate=False)
  x = jax.nn.gelu(layers.layer_norm(m["norm2"], _conv(m["conv2"], x, 2), UPSCALE_LN_EPS),
                  approximate=False)
  return _conv(m["conv3"], x, 1)


def no_mask_embedding(p, cfg: SamConfig) -> jax.Array:
  """[G, G, D] dense prompt when no mask is given: `no_mask_embed` at every position."""
  g = cfg.encoder.grid
  e = p["no_mask_embed"]["embedding"]
  return jnp.broadcast_to(e, (g, g, e.shape[-1]))


# ----------------------------------------------------------------------------------------------
# Mask decoder

def attention(p, q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int) -> jax.Array:
  """Multi-head attention [..., Nq, D] x [..., Nk, D] -> [..., Nq, D]; projections to the layer's
  internal width (D or D / downsample), softmax in fp32."""
  q, k, v = (layers.dense(p[name], t) for name, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)))
  d = q.shape[-1] // num_heads
  split = lambda t: t.reshape(t.shape[:-1] + (num_heads, d))
  logits = jnp.einsum("...qhd,...khd->...hqk", split(q), split(k),
                      preferred_element_type=jnp.float32) / np.sqrt(d)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("...hqk,...khd->...qhd", probs, split(v))
  return layers.dense(p["out_proj"], out.reshape(out.shape[:-2] + (num_heads * d,)))


def two_way_layer(p, queries: jax.Array, keys: jax.Array, query_pe: jax.Array, key_pe: jax.Array,
                  cfg: SamConfig, skip_first_pe: bool) -> Tuple[jax.Array, jax.Array]:
  """One two-way block: (queries [..., Nt, D], keys [..., Ni, D]) -> updated (queries, keys)."""
  d = cfg.decoder
  ln = lambda name, x: layers.layer_norm(p[name], x, d.block_norm_eps)
  if skip_first_pe:
    queries = attention(p["self_attn"], queries, queries, queries, d.num_heads)
  else:
    q = queries + query_pe
    queries = queries + attention(p["self_attn"], q, q, queries, d.num_heads)
  queries = ln("norm1", queries)
  q, k = queries + query_pe, keys + key_pe
  queries = ln("norm2", queries + attention(p["cross_token_to_image"], q, k, keys, d.num_heads))
  mlp = layers.dense(p["mlp_out"], jax.nn.relu(layers.dense(p["mlp_in"], queries)))
  queries = ln("norm3", queries + mlp)
  q, k = queries + query_pe, keys + key_pe
  keys = ln("norm4", keys + attention(p["cross_image_to_token"], k, q, queries, d.num_heads))
  return queries, keys


def two_way_transformer(p, cfg: SamConfig, image: jax.Array, image_pe: jax.Array,
                        tokens: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """tokens [..., Nt, D] and image tokens [..., Ni, D] (positional encoding [Ni, D]) -> (tokens,
  image tokens) after the layers and the final tokens -> image attention."""
  d = cfg.decoder
  queries, keys = tokens, image
  key_pe = image_pe.astype(image.dtype)
  for i in range(d.num_layers):  # two layers in the released models; the first skips its query PE
    lp = jax.tree.map(lambda a, i=i: a[i], p["layers"])
    queries, keys = two_way_layer(lp, queries, keys, tokens, key_pe, cfg, skip_first_pe=i == 0)
  q, k = queries + tokens, keys + key_pe
  queries = queries + attention(p["final_attn"], q, k, keys, d.num_heads)
  return layers.layer_norm(p["final_norm"], queries, d.final_norm_eps), keys


def upscale_2x(p, x: jax.Array) -> jax.Array:
  """2x2 stride-2 transposed convolution [..., H, W, C] -> [..., 2H, 2W, O] (kernel [2, 2, C, O]):
  every input pixel writes its own 2x2 output block."""
  y = jnp.einsum("...ijc,abco->...iajbo", x, p["kernel"].astype(x.dtype),
                 preferred_element_type=jnp.float32 if x.dtype == jnp.float32 else None)
  h, w = x.shape[-3], x.shape[-2]
  y = y.reshape(x.shape[:-3] + (2 * h, 2 * w, y.shape[-1]))
  return (y + p["bias"].astype(y.dtype)).astype(x.dtype)


def _mlp(stack_params, x: jax.Array, names) -> jax.Array:
  """ReLU MLP over layers `names` of `stack_params` (no activation after the last)."""
  for i, name in enumerate(names):
    x = layers.dense(stack_params[name], x)
    if i < len(names) - 1:
      x = jax.nn.relu(x)
  return x


def predict_masks(p, cfg: SamConfig, embeddings: jax.Array, sparse: jax.Array,
                  dense_prompt: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
  """All T mask logits [..., T, 4G, 4G] (fp32) and IoU predictions [..., T] (fp32).

  embeddings [..., G, G, D] broadcast against sparse prompts [..., n, D]; `dense_prompt`
  [..., G, G, D] defaults to `no_mask_embedding`. Computation runs in the embeddings' dtype.
  """
  d = cfg.decoder
  md = p["mask_decoder"]
  dtype = embeddings.dtype
  if dense_prompt is None:
    dense_prompt = no_mask_embedding(p["prompt_encoder"], cfg)
  g, h = cfg.encoder.grid, d.hidden_size
  lead = jnp.broadcast_shapes(embeddings.shape[:-3], sparse.shape[:-2], dense_prompt.shape[:-3])
  out_tokens = jnp.concatenate([md["iou_token"]["embedding"][None], md["mask_tokens"]["embedding"]])
  tokens = jnp.concatenate([jnp.broadcast_to(out_tokens.astype(dtype), lead + out_tokens.shape),
                            jnp.broadcast_to(sparse.astype(dtype), lead + sparse.shape[-2:])],
                           axis=-2)
  image = jnp.broadcast_to(embeddings + dense_prompt.astype(dtype), lead + (g, g, h)).reshape(
      lead + (g * g, h))
  image_pe = image_positional_encoding(p["prompt_encoder"], cfg).reshape(g * g, h)
  hs, image = two_way_transformer(md, cfg, image, image_pe, tokens)
  iou_out, mask_out = hs[..., 0, :], hs[..., 1:1 + d.num_mask_tokens, :]

  up = image.reshape(lead + (g, g, h))
  up = jax.nn.gelu(layers.layer_norm(md["upscale_norm"], upscale_2x(md["upscale1"], up),
                                     UPSCALE_LN_EPS), approximate=False)
  up = jax.nn.gelu(upscale_2x(md["upscale2"], up), approximate=False)  # [..., 4G, 4G, D/8]

  hyper = md["hyper_mlp"]
  x = mask_out  # [..., T, D]: token t through MLP t
  for i, name in enumerate(("fc1", "fc2", "fc3")):
    x = jnp.einsum("...td,tdo->...to", x, hyper[name]["kernel"].astype(x.dtype),
                   preferred_element_type=jnp.float32 if x.dtype == jnp.float32 else None)
    x = (x + hyper[name]["bias"].astype(x.dtype)).astype(dtype)
    if i < 2:
      x = jax.nn.relu(x)
  masks = jnp.einsum("...tc,...ywc->...tyw", x, up, preferred_element_type=jnp.float32)
  iou = _mlp(md["iou_head"], iou_out, [str(i) for i in range(d.iou_head_depth)])
  return masks, iou.astype(jnp.float32)


def decode(p, cfg: SamConfig, embeddings: jax.Array, points: jax.Array, labels: jax.Array,
           multimask: bool = True) -> Tuple[jax.Array, jax.Array]:
  """Point prompts -> (low-resolution mask logits [..., M, 4G, 4G], IoU predictions [..., M]).

  embeddings [..., G, G, D] (e.g. [B, 1, G, G, D]); points [..., n, 2] in model-input pixels, labels
  [..., n] (e.g. [B, P, 1, 2] and [B, P, 1]); M = 3 (masks 1..3) with `multimask`, else 1 (mask 0).
  """
  sparse = embed_points(p["prompt_encoder"], cfg, points, labels, pad=True)
  masks, iou = predict_masks(p, cfg, embeddings, sparse.astype(embeddings.dtype))
  keep = slice(1, None) if multimask else slice(0, 1)
  return masks[..., keep, :, :], iou[..., keep]
