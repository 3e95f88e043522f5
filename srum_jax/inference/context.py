"""Inference contexts: a static KV cache per row and the three prefill kinds
(docs/bagel.md, "KV cache and prefill").

A `Context` holds B independent rows: the cache (keys after qk-norm and RoPE), the next free RoPE
position `rope` [B] and the next split id `split` [B]. Every prefill appends one split per row:

* text: the caller's tokens (normally `[bos] + ids + [eos]`) at positions rope.., causal, und
  experts;
  rope += the row's token count.
* ViT image: `[start_of_image] + ViT tokens + [end_of_image]`, all at position rope, full split,
  und;
  rope += 1.
* VAE image: `[start_of_image] + clean latent tokens + [end_of_image]` at rope, full split, markers
  und and
  latents gen (embedding vae2llm(x0) + time_embedder(0) + latent_pos_embed); rope += 1.

Shapes are static budgets (right-padded inputs, per-row lengths); rows with nothing to add (length
0, or an empty image grid) are left untouched, and a row's result never depends on the other rows.
Changing the content within the same budgets never recompiles. The compute dtype is the cache dtype.
The cache must be large enough for everything appended (tokens past its end are dropped).

    ctx = init_context(cfg, batch=2, max_len=256)
    ctx = prefill_vit_image(params, ctx, patches, grid, cfg=cfg)
    ids, lens = pad_ids([wrap_text(p, cfg) for p in prompt_ids])
    ctx = prefill_text(params, ctx, ids, lens, cfg=cfg)
"""
from __future__ import annotations

import collections
import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from srum_jax.models import autoencoder, bagel, embeddings, image_transforms, qwen2_mot, siglip
from srum_jax.models.config import BagelConfig
from srum_jax.models.packing import CAUSAL, FULL, TokenMeta, padding_meta
from srum_jax.models.qwen2_mot import KVCache

# Trace counter of the jitted inference functions (a Python side effect runs once per trace): tests
# use it to check that new content within the same budgets does not recompile.
TRACES: collections.Counter = collections.Counter()


class Context(NamedTuple):
  """B rows of inference state: cache (KVCache), rope [B] next position, split [B] next split id."""
  cache: KVCache
  rope: jax.Array
  split: jax.Array

  @property
  def kv_len(self) -> jax.Array:
    return self.cache.length


def init_context(cfg: BagelConfig, batch: int, max_len: int, dtype=jnp.float32) -> Context:
  """Empty context of `max_len` cache slots per row; `dtype` is the cache and compute dtype."""
  return Context(cache=qwen2_mot.init_cache(cfg.llm, batch, max_len, dtype),
                 rope=jnp.zeros((batch,), jnp.int32), split=jnp.zeros((batch,), jnp.int32))


def shard_rows(tree, mesh, axis_of=None):
  """Place a batch-major pytree (contexts, ids, keys) with its batch rows split over the mesh's data
  axes; the jitted prefill / sampling steps then run data-parallel (XLA propagates the row
  sharding)."""

  def put(x):
    x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
    axis = 1 if (axis_of is not None and axis_of(x)) else 0
    spec = [None] * x.ndim
    spec[axis] = ("data", "fsdp")
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))

  return jax.tree.map(put, tree)


def shard_context(ctx: Context, mesh) -> Context:
  """`shard_rows` for a Context: cache k/v are [L, B, T, Hkv, d] (rows on axis 1), the rest [B,
  ...]."""
  cache = ctx.cache._replace(
      k=shard_rows(ctx.cache.k, mesh, lambda x: True), v=shard_rows(ctx.cache.v, mesh,
                                                                    lambda x: True),
      meta=shard_rows(ctx.cache.meta, mesh), length=shard_rows(ctx.cache.length, mesh))
  return Context(cache=cache, rope=shard_rows(ctx.rope, mesh), split=shard_rows(ctx.split, mesh))


def concat_contexts(contexts: Sequence[Context]) -> Context:
  """Stack contexts along the batch axis (caches padded with empty slots to the longest)."""
  T = max(c.cache.k.shape[2] for c in contexts)

  def pad(c: Context) -> Context:
    n = T - c.cache.k.shape[2]
    if n == 0:
      return c
    B = c.rope.shape[0]
    cache = c.cache
    kv = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, n), (0, 0), (0, 0)))
    empty = TokenMeta(*(jnp.asarray(a) for a in padding_meta(B, n)))
    meta = TokenMeta(
        *(jnp.concatenate([a, b.astype(a.dtype)], axis=1) for a, b in zip(cache.meta, empty)))
    return c._replace(cache=KVCache(k=kv(cache.k), v=kv(cache.v), meta=meta, length=cache.length))

  cs = [pad(c) for c in contexts]
  cat0 = lambda *xs: jnp.concatenate(xs, axis=0)
  meta = TokenMeta(*(cat0(*f) for f in zip(*(c.cache.meta for c in cs))))
  cache = KVCache(k=jnp.concatenate([c.cache.k for c in cs], axis=1),
                  v=jnp.concatenate([c.cache.v for c in cs], axis=1), meta=meta,
                  length=cat0(*(c.cache.length for c in cs)))
  return Context(cache=cache, rope=cat0(*(c.rope for c in cs)), split=cat0(*(c.split for c in cs)))


# ----------------------------------------------------------------------------------------------
# Host-side helpers (NumPy)


def wrap_text(ids: Sequence[int], cfg: BagelConfig) -> list:
  """A text split's tokens: `[bos] + ids + [eos]` (no role template)."""
  return [cfg.tokens.bos, *(int(i) for i in ids), cfg.tokens.eos]


def bucket(n: int, minimum: int = 16) -> int:
  """Budget for n items: the next power of two (at least `minimum`), so few shapes get compiled."""
  b = minimum
  while b < n:
    b *= 2
  return b


def pad_ids(seqs: Sequence[Sequence[int]],
            length: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
  """Right-pad token lists to [B, length] int32 (default: `bucket` of the longest); also the
  lengths."""
  lens = np.array([len(s) for s in seqs], np.int32)
  L = bucket(int(lens.max(initial=1))) if length is None else length
  if lens.max(initial=0) > L:
    raise ValueError(f"a text of {lens.max()} tokens exceeds the budget {L}")
  ids = np.zeros((len(seqs), L), np.int32)
  for b, s in enumerate(seqs):
    ids[b, :len(s)] = s
  return ids, lens


def vit_inputs(images: Sequence[Optional[np.ndarray]], cfg: BagelConfig,
               budget: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
  """HWC images in [-1, 1] (sides multiples of 14; None = no image) -> patches [B, Np, 588], grid
  [B, 2]."""
  ps = cfg.vit.patch_size
  grids = np.zeros((len(images), 2), np.int32)
  for b, im in enumerate(images):
    if im is not None:
      H, W = im.shape[:2]
      if H % ps or W % ps:
        raise ValueError(f"ViT image {b} is {H}x{W}; sides must be multiples of {ps}")
      grids[b] = (H // ps, W // ps)
  n = int(np.prod(grids, axis=1).max(initial=0))
  Np = bucket(max(n, 1)) if budget is None else budget
  if n > Np:
    raise ValueError(f"an image has {n} ViT patches but the budget is {Np}")
  patches = np.zeros((len(images), Np, cfg.vit.patch_dim), np.float32)
  for b, im in enumerate(images):
    if im is not None:
      p = image_transforms.vit_patchify(np.asarray(im, np.float32), ps)
      patches[b, :len(p)] = p
  return patches, grids


def vae_inputs(params_ae, images: Sequence[Optional[np.ndarray]], cfg: BagelConfig,
               budget: Optional[int] = None,
               key: Optional[jax.Array] = None) -> Tuple[np.ndarray, np.ndarray]:
  """HWC images in [-1, 1] (sides multiples of `latent_downsample`; None = no image) -> clean latent
  tokens [B, Nl, p*p*z] and grid [B, 2]. key=None encodes the posterior mean, otherwise a posterior
  sample."""
  f, p = cfg.latent_downsample, cfg.latent_patch_size
  grids = np.zeros((len(images), 2), np.int32)
  toks = []
  for b, im in enumerate(images):
    if im is None:
      toks.append(None)
      continue
    H, W = im.shape[:2]
    if H % f or W % f:
      raise ValueError(f"VAE image {b} is {H}x{W}; sides must be multiples of {f}")
    grids[b] = (H // f, W // f)
    k = None if key is None else jax.random.fold_in(key, b)
    z = _encode(params_ae, jnp.asarray(im, jnp.float32)[None], cfg.ae, k)
    toks.append(np.asarray(embeddings.patchify_latent(z, p))[0])
  n = int(np.prod(grids, axis=1).max(initial=0))
  Nl = bucket(max(n, 1)) if budget is None else budget
  if n > Nl:
    raise ValueError(f"an image has {n} latent tokens but the budget is {Nl}")
  out = np.zeros((len(images), Nl, cfg.patch_latent_dim), np.float32)
  for b, t in enumerate(toks):
    if t is not None:
      out[b, :len(t)] = t
  return out, grids


@functools.partial(jax.jit, static_argnames=("cfg",))
def _encode(params_ae, images, cfg, key):
  return autoencoder.encode(params_ae, images, cfg, key)


# ----------------------------------------------------------------------------------------------
# Jitted prefills


def grid_position_ids(grid: jax.Array, num: int, max_per_side: int) -> Tuple[jax.Array, jax.Array]:
  """Row-major flattened 2-D ids `row * G + col` [B, num] of per-row (h, w) grids, and which of
  the slots are real."""
  k = jnp.arange(num, dtype=jnp.int32)[None, :]
  w = jnp.maximum(grid[:, 1:2], 1)
  pos = (k // w) * max_per_side + k % w
  return pos.astype(jnp.int32), k < grid[:, 0:1] * grid[:, 1:2]


def split_meta(ctx: Context, real: jax.Array, mode: int, position: jax.Array,
               is_gen: jax.Array) -> TokenMeta:
  """Query metadata for one new split per row (sample 0; padding where not `real`)."""
  B, N = real.shape
  return TokenMeta(sample_id=jnp.where(real, 0, -1).astype(jnp.int32),
                   split_id=jnp.broadcast_to(ctx.split[:, None], (B, N)).astype(jnp.int32),
                   mode=jnp.full((B, N), mode, jnp.int32), index=jnp.zeros((B, N), jnp.int32),
                   position=position.astype(jnp.int32), is_gen=is_gen)


def _append(params, ctx: Context, x: jax.Array, meta: TokenMeta, cfg: BagelConfig, und: int,
            gen: int, rope_step: jax.Array, attn_impl: str) -> Context:
  """Run the new split through the decoder, write it to the cache, advance rope and split."""
  _, cache = qwen2_mot.decoder_forward_cached(params["llm"], x, meta, ctx.cache, cfg=cfg.llm,
                                              update_cache=True, und_capacity=und, gen_capacity=gen,
                                              attn_impl=attn_impl)
  return Context(cache=cache, rope=ctx.rope + rope_step.astype(jnp.int32), split=ctx.split + 1)


def frame_image(params, block: jax.Array, cfg: BagelConfig, dtype) -> jax.Array:
  """[B, n, D] -> [B, n+2, D] framed by the start/end-of-image token embeddings."""
  B = block.shape[0]
  ids = jnp.array([cfg.tokens.start_of_image, cfg.tokens.end_of_image], jnp.int32)
  m = jnp.broadcast_to(
      qwen2_mot.embed_text(params["llm"], ids, dtype)[None], (B, 2, block.shape[-1]))
  return jnp.concatenate([m[:, :1], block.astype(dtype), m[:, 1:]], axis=1)


def _image_meta(ctx: Context, real_tokens: jax.Array,
                gen_tokens: bool) -> Tuple[TokenMeta, jax.Array]:
  """Metadata of [SOI] + image tokens + [EOI] at each row's rope (full split); rows without any real
  token get no markers either. Also returns which rows have an image (their rope advances by 1)."""
  has = jnp.any(real_tokens, axis=1, keepdims=True)
  real = jnp.concatenate([has, real_tokens, has], axis=1)
  B, N = real.shape
  is_gen = jnp.zeros((B, N), bool)
  if gen_tokens:
    is_gen = is_gen.at[:, 1:-1].set(True)
  pos = jnp.broadcast_to(ctx.rope[:, None], (B, N))
  return split_meta(ctx, real, FULL, pos, is_gen), has[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "attn_impl"))
def prefill_text(params, ctx: Context, ids: jax.Array, lengths: jax.Array, *, cfg: BagelConfig,
                 attn_impl: str = "dense") -> Context:
  """Append ids [B, L] (right-padded; row b uses its first lengths[b]) as a causal und text
  split."""
  TRACES["prefill_text"] += 1
  B, L = ids.shape
  dtype = ctx.cache.k.dtype
  k = jnp.arange(L, dtype=jnp.int32)[None, :]
  real = k < lengths[:, None]
  meta = split_meta(ctx, real, CAUSAL, ctx.rope[:, None] + k, jnp.zeros((B, L), bool))
  x = qwen2_mot.embed_text(params["llm"], ids, dtype)
  return _append(params, ctx, x, meta, cfg, L, 0, jnp.asarray(lengths), attn_impl)


@functools.partial(jax.jit, static_argnames=("cfg", "attn_impl"))
def prefill_vit_image(params, ctx: Context, patches: jax.Array, grid: jax.Array, *,
                      cfg: BagelConfig, attn_impl: str = "dense") -> Context:
  """Append one ViT image per row: patches [B, Np, 588] (row-major, first h*w real), grid [B, 2] =
  (h, w) in patches; an empty grid leaves the row unchanged."""
  TRACES["prefill_vit_image"] += 1
  B, Np, _ = patches.shape
  dtype = ctx.cache.k.dtype
  pos, real = grid_position_ids(grid, Np, cfg.vit_max_num_patch_per_side)
  seg = jnp.where(real, 0, -1).astype(jnp.int32)
  tokens = siglip.embed_vit_tokens(params, patches.astype(dtype), pos, seg, cfg)
  meta, has = _image_meta(ctx, real, gen_tokens=False)
  return _append(params, ctx, frame_image(params, tokens, cfg, dtype), meta, cfg, Np + 2, 0, has,
                 attn_impl)


@functools.partial(jax.jit, static_argnames=("cfg", "attn_impl"))
def prefill_vae_image(params, ctx: Context, latent_tokens: jax.Array, grid: jax.Array, *,
                      cfg: BagelConfig, attn_impl: str = "dense") -> Context:
  """Append one clean VAE image per row: patchified latents [B, Nl, p*p*z] (first h*w real), grid
  [B, 2] = (h, w) in latent tokens; an empty grid leaves the row unchanged."""
  TRACES["prefill_vae_image"] += 1
  B, Nl, _ = latent_tokens.shape
  dtype = ctx.cache.k.dtype
  pos, real = grid_position_ids(grid, Nl, cfg.max_latent_size)
  tokens = bagel.embed_latents(params, latent_tokens.astype(jnp.float32),
                               jnp.zeros((B, Nl), jnp.float32), pos, cfg, dtype)
  meta, has = _image_meta(ctx, real, gen_tokens=True)
  return _append(params, ctx, frame_image(params, tokens, cfg, dtype), meta, cfg, 2, Nl, has,
                 attn_impl)


# ----------------------------------------------------------------------------------------------
# Convenience: add host-side content to a context


def add_texts(params, ctx: Context, texts: Sequence[Optional[Sequence[int]]], cfg: BagelConfig,
              length: Optional[int] = None) -> Context:
  """Append one text split `[bos] + ids + [eos]` per row (None: nothing for that row)."""
  seqs = [[] if t is None else wrap_text(t, cfg) for t in texts]
  ids, lens = pad_ids(seqs, length)
  return prefill_text(params, ctx, ids, lens, cfg=cfg)


def add_vit_images(params, ctx: Context, images: Sequence[Optional[np.ndarray]], cfg: BagelConfig,
                   budget: Optional[int] = None) -> Context:
  """Append one ViT image per row (HWC in [-1, 1], sides multiples of 14; None: nothing for that
  row)."""
  patches, grid = vit_inputs(images, cfg, budget)
  return prefill_vit_image(params, ctx, patches, grid, cfg=cfg)
