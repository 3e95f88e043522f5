"""Image generation: Euler flow sampling with classifier-free guidance over KV-cache contexts
(docs/bagel.md, "Flow sampler and CFG", "Think mode").

Each row's query block `[start_of_image] + h*w latent tokens + [end_of_image]` sits at its context's own
`rope` position as a new full split (markers und, latents gen) and attends to the cached context and to
itself; the cache is never updated. The three CFG branches (gen, cfg_text, cfg_img contexts) are folded
into the batch dimension and run as one forward; branches whose scale makes them unused are skipped
statically, and outside the CFG interval only the conditional branch runs (`lax.cond`).

    x0 = initial_noise(keys, cfg, height, width)
    tokens = sample_latents(params, (gen, cfg_text, cfg_img), x0, cfg=cfg, grid=(h, w), ...)
    images = decode_latents(params_ae, tokens, cfg=cfg, grid=(h, w))            # uint8 NHWC
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from srum_jax import losses
from srum_jax.inference import context, decoding
from srum_jax.inference.context import Context
from srum_jax.models import autoencoder, bagel, embeddings, qwen2_mot
from srum_jax.models.config import BagelConfig
from srum_jax.models.packing import FULL

RENORM_TYPES = ("global", "channel", "text_channel")


def shifted_timesteps(num_timesteps: int, shift: float) -> jax.Array:
  """The sampler's times: `losses.shift_timesteps` of u = linspace(1, 0, T) (fp32), noise to data."""
  return losses.shift_timesteps(jnp.linspace(1.0, 0.0, num_timesteps, dtype=jnp.float32), shift)


def latent_grid(height: int, width: int, cfg: BagelConfig) -> Tuple[int, int]:
  """(h, w) latent tokens of an H x W image (sides multiples of `latent_downsample`)."""
  f = cfg.latent_downsample
  if height % f or width % f:
    raise ValueError(f"image size {height}x{width} must be a multiple of {f}")
  return height // f, width // f


def initial_noise(keys: jax.Array, cfg: BagelConfig, grid: Tuple[int, int]) -> jax.Array:
  """x0 ~ N(0, I) [B, h*w, p*p*z], row b drawn from keys[b] alone (independent of the batch)."""
  shape = (grid[0] * grid[1], cfg.patch_latent_dim)
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def prompt_keys(seeds: Union[int, Sequence[int]], ids: Sequence[int]) -> jax.Array:
  """Per-image keys fold_in(PRNGKey(seed), id): reproducible whatever else is in the batch."""
  seeds = [int(seeds)] * len(ids) if np.ndim(seeds) == 0 else [int(s) for s in seeds]
  if len(seeds) != len(ids):
    raise ValueError(f"{len(seeds)} seeds for {len(ids)} images")
  if all(0 <= v < 2 ** 31 for v in (*seeds, *(int(i) for i in ids))):  # one jitted call, not 2 dispatches a key
    return _fold_keys(np.asarray(seeds, np.int32), np.asarray([int(i) for i in ids], np.int32))
  return jnp.stack([jax.random.fold_in(jax.random.PRNGKey(s), int(i)) for s, i in zip(seeds, ids)])


@jax.jit
def _fold_keys(seeds: jax.Array, ids: jax.Array) -> jax.Array:
  return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seeds, ids)


# ----------------------------------------------------------------------------------------------
# Velocity of the query block


def velocity(params, ctx: Context, x: jax.Array, t: jax.Array, *, cfg: BagelConfig, grid: Tuple[int, int],
             attn_impl: str = "dense") -> jax.Array:
  """Predicted velocity [B, N, p*p*z] (fp32) of latent tokens x [B, N, p*p*z] at flow time t (scalar or [B])
  for the query block placed after each row's context. Compute dtype: the cache dtype."""
  B, N, _ = x.shape
  dtype = ctx.cache.k.dtype
  k = jnp.arange(N, dtype=jnp.int32)
  pos = jnp.broadcast_to((k // grid[1]) * cfg.max_latent_size + k % grid[1], (B, N))
  tt = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1, 1), (B, N))
  lat = bagel.embed_latents(params, x.astype(jnp.float32), tt, pos, cfg, dtype)
  xq = context.frame_image(params, lat, cfg, dtype)
  is_gen = jnp.zeros((B, N + 2), bool).at[:, 1:-1].set(True)
  meta = context.split_meta(ctx, jnp.ones((B, N + 2), bool), FULL, jnp.broadcast_to(ctx.rope[:, None], (B, N + 2)),
                       is_gen)
  h, _ = qwen2_mot.decoder_forward_cached(params["llm"], xq, meta, ctx.cache, cfg=cfg.llm, update_cache=False,
                                          und_capacity=2, gen_capacity=N, attn_impl=attn_impl)
  return bagel.velocity_head(params, h[:, 1:-1])


def _norm(v: jax.Array, per_token: bool) -> jax.Array:
  """L2 norm per image [B, 1, 1] (global) or per token [B, N, 1] (channel)."""
  if per_token:
    return jnp.linalg.norm(v, axis=-1, keepdims=True)
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=(-2, -1), keepdims=True))


def cfg_combine(v_cond: jax.Array, v_text: Optional[jax.Array], v_img: Optional[jax.Array], *,
                cfg_text_scale: float, cfg_img_scale: float, cfg_renorm_type: str = "global",
                cfg_renorm_min: float = 0.0) -> jax.Array:
  """Guided velocity from the branch velocities [B, N, C]; norms are per image (global) or per token.

  No guidance at all when cfg_text_scale <= 1; the image branch only when cfg_img_scale > 1.
  """
  if cfg_renorm_type not in RENORM_TYPES:
    raise ValueError(f"unknown cfg_renorm_type {cfg_renorm_type!r}; choose one of {RENORM_TYPES}")
  if cfg_text_scale <= 1.0:
    return v_cond
  a = v_text + cfg_text_scale * (v_cond - v_text)
  if cfg_renorm_type == "text_channel":
    scale = jnp.clip(_norm(v_cond, True) / (_norm(a, True) + 1e-8), cfg_renorm_min, 1.0)
    a = a * scale
    return v_img + cfg_img_scale * (a - v_img) if cfg_img_scale > 1.0 else a
  b = v_img + cfg_img_scale * (a - v_img) if cfg_img_scale > 1.0 else a
  per_token = cfg_renorm_type == "channel"
  scale = jnp.clip(_norm(v_cond, per_token) / (_norm(b, per_token) + 1e-8), cfg_renorm_min, 1.0)
  return b * scale


def _branches(cfg_text_scale: float, cfg_img_scale: float) -> int:
  """How many contexts the guidance needs: 1 (gen), 2 (+ cfg_text) or 3 (+ cfg_img)."""
  if cfg_text_scale <= 1.0:
    return 1
  return 3 if cfg_img_scale > 1.0 else 2


def branch_velocities(params, contexts: Sequence[Context], x: jax.Array, t, *, cfg: BagelConfig,
                      grid: Tuple[int, int], attn_impl: str = "dense") -> Tuple[jax.Array, ...]:
  """Velocities of x [B, N, C] under each context (same B rows each), folded into one forward."""
  n, B = len(contexts), x.shape[0]
  folded = contexts[0] if n == 1 else context.concat_contexts(contexts)
  xs = jnp.concatenate([x] * n, axis=0)
  v = velocity(params, folded, xs, t, cfg=cfg, grid=grid, attn_impl=attn_impl)
  return tuple(v[i * B:(i + 1) * B] for i in range(n))


def guided_velocity(params, contexts: Sequence[Context], x: jax.Array, t: jax.Array, *, cfg: BagelConfig,
                    grid: Tuple[int, int], cfg_text_scale: float, cfg_img_scale: float, cfg_interval,
                    cfg_renorm_type: str, cfg_renorm_min: float, attn_impl: str = "dense") -> jax.Array:
  """v(x, t) with CFG inside cfg_interval (lo < t <= hi) and the conditional velocity elsewhere."""
  n = _branches(cfg_text_scale, cfg_img_scale)
  cond_only = lambda: velocity(params, contexts[0], x, t, cfg=cfg, grid=grid, attn_impl=attn_impl)
  if n == 1:
    return cond_only()

  def guided():
    vs = branch_velocities(params, contexts[:n], x, t, cfg=cfg, grid=grid, attn_impl=attn_impl)
    return cfg_combine(vs[0], vs[1], vs[2] if n == 3 else None, cfg_text_scale=cfg_text_scale,
                       cfg_img_scale=cfg_img_scale, cfg_renorm_type=cfg_renorm_type, cfg_renorm_min=cfg_renorm_min)

  inside = (t > cfg_interval[0]) & (t <= cfg_interval[1])
  return jax.lax.cond(inside, guided, cond_only)


@functools.partial(jax.jit, static_argnames=("cfg", "grid", "num_timesteps", "cfg_text_scale", "cfg_img_scale",
                                             "cfg_renorm_type", "attn_impl"))
def _sample_latents(params, contexts, x0, timestep_shift, cfg_interval, cfg_renorm_min, *, cfg, grid,
                    num_timesteps, cfg_text_scale, cfg_img_scale, cfg_renorm_type, attn_impl):
  context.TRACES["sample_latents"] += 1
  ts = shifted_timesteps(num_timesteps, timestep_shift)

  def step(i, x):
    v = guided_velocity(params, contexts, x, ts[i], cfg=cfg, grid=grid, cfg_text_scale=cfg_text_scale,
                        cfg_img_scale=cfg_img_scale, cfg_interval=cfg_interval, cfg_renorm_type=cfg_renorm_type,
                        cfg_renorm_min=cfg_renorm_min, attn_impl=attn_impl)
    return x - v * (ts[i] - ts[i + 1])

  return jax.lax.fori_loop(0, num_timesteps - 1, step, x0.astype(jnp.float32))


def sample_latents(params, contexts: Sequence[Optional[Context]], x0: jax.Array, *, cfg: BagelConfig,
                   grid: Tuple[int, int], num_timesteps: int = 50, timestep_shift: float = 3.0,
                   cfg_text_scale: float = 4.0, cfg_img_scale: float = 1.0,
                   cfg_interval: Tuple[float, float] = (0.4, 1.0), cfg_renorm_type: str = "global",
                   cfg_renorm_min: float = 0.0, attn_impl: str = "dense") -> jax.Array:
  """Euler integration x <- x - v(x, t_i) * (t_i - t_{i+1}) for i < T-1 from x0 [B, h*w, p*p*z] at t = 1.

  contexts: (gen, cfg_text, cfg_img), each B rows; those the scales leave unused may be None. Jitted; the
  shift, interval and renorm minimum are traced (new values do not recompile), the scales are static
  (they decide which branches run).
  """
  if cfg_renorm_type not in RENORM_TYPES:
    raise ValueError(f"unknown cfg_renorm_type {cfg_renorm_type!r}; choose one of {RENORM_TYPES}")
  n = _branches(cfg_text_scale, cfg_img_scale)
  ctxs = tuple(contexts[:n])
  if len(ctxs) < n or any(c is None for c in ctxs):
    raise ValueError(f"these CFG scales need {n} contexts (gen, cfg_text, cfg_img)")
  return _sample_latents(params, ctxs, x0, np.float32(timestep_shift), np.asarray(cfg_interval, np.float32),
                         np.float32(cfg_renorm_min), cfg=cfg, grid=tuple(grid), num_timesteps=int(num_timesteps),
                         cfg_text_scale=float(cfg_text_scale), cfg_img_scale=float(cfg_img_scale),
                         cfg_renorm_type=cfg_renorm_type, attn_impl=attn_impl)


@functools.partial(jax.jit, static_argnames=("cfg", "grid"))
def decode_latents(params_ae, tokens: jax.Array, *, cfg: BagelConfig, grid: Tuple[int, int]) -> jax.Array:
  """Latent tokens [B, h*w, p*p*z] -> VAE-decoded NHWC images [B, H, W, 3] (nominally [-1, 1])."""
  z = embeddings.unpatchify_latent(tokens, grid[0], grid[1], cfg.latent_patch_size)
  return autoencoder.decode(params_ae, z, cfg.ae)


def sample_images(params, params_ae, cfg: BagelConfig, contexts: Sequence[Optional[Context]], *, height: int,
                  width: int, keys: Optional[jax.Array] = None, x0: Optional[jax.Array] = None,
                  num_timesteps: int = 50, timestep_shift: float = 3.0, cfg_text_scale: float = 4.0,
                  cfg_img_scale: float = 1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type: str = "global",
                  cfg_renorm_min: float = 0.0, attn_impl: str = "dense", return_latents: bool = False):
  """uint8 NHWC images [B, height, width, 3] sampled from the (gen, cfg_text, cfg_img) contexts (and the
  sampled latent tokens, with `return_latents`).

  The initial noise is x0 if given, else drawn per row from keys [B] (`initial_noise`).
  """
  grid = latent_grid(height, width, cfg)
  if x0 is None:
    if keys is None:
      raise ValueError("give keys (one per image) or x0")
    x0 = initial_noise(keys, cfg, grid)
  tokens = sample_latents(params, contexts, x0, cfg=cfg, grid=grid, num_timesteps=num_timesteps,
                          timestep_shift=timestep_shift, cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale,
                          cfg_interval=cfg_interval, cfg_renorm_type=cfg_renorm_type, cfg_renorm_min=cfg_renorm_min,
                          attn_impl=attn_impl)
  images = autoencoder.to_uint8(decode_latents(params_ae, tokens, cfg=cfg, grid=grid))
  return (images, tokens) if return_latents else images


# ----------------------------------------------------------------------------------------------
# Think mode and text to image (the official contexts)


def add_plans(params, tokenizer, gen: Context, *, cfg: BagelConfig, max_think_tokens: int,
              plans: Optional[Sequence[str]] = None,
              attn_impl: str = "dense") -> Tuple[Context, list]:
  """Think mode's plan step: greedily decode each row's plan from `gen` (up to `max_think_tokens`),
  or take `plans`, then append it to `gen` as a text split `[bos] + plan + [eos]` (the official
  inferencer's `gen_text` then `update_context_text`). `gen` needs `bucket(max_think_tokens + 2)`
  free cache slots. Returns (the context with the plans, the plan texts)."""
  think_budget = context.bucket(max_think_tokens + 2)
  if plans is None:
    out = decoding.generate_text(params, gen, cfg, max_new_tokens=max_think_tokens,
                                 attn_impl=attn_impl)
    plans = [tokenizer.decode(t) for t in decoding.generated_ids(out)]
  seqs = [context.wrap_text(tokenizer.encode(t)[:think_budget - 2], cfg) for t in plans]
  ids, lens = context.pad_ids(seqs, think_budget)
  return context.prefill_text(params, gen, ids, lens, cfg=cfg, attn_impl=attn_impl), list(plans)


class T2IResult(NamedTuple):
  images: np.ndarray  # uint8 [B, H, W, 3]
  think_texts: Optional[list]  # the decoded plans (think mode) or None
  latents: jax.Array  # the sampled latent tokens [B, h*w, p*p*z] (fp32), before the VAE decode


def text_to_image(params, params_ae, tokenizer, prompts: Sequence[str], *, cfg: BagelConfig, think: bool = False,
                  seeds: Union[int, Sequence[int]] = 42, image_ids: Optional[Sequence[int]] = None,
                  height: int = 1024, width: int = 1024, num_timesteps: int = 50, timestep_shift: float = 3.0,
                  cfg_text_scale: float = 4.0, cfg_img_scale: float = 1.0, cfg_interval=(0.4, 1.0),
                  cfg_renorm_type: str = "global", cfg_renorm_min: float = 0.0, max_think_tokens: int = 1000,
                  system_prompt: Optional[str] = None, dtype=jnp.float32, text_budget: Optional[int] = None,
                  attn_impl: str = "dense", mesh=None, plans: Optional[Sequence[str]] = None) -> T2IResult:
  """Generate one image per prompt with the official contexts.

  mesh: split the batch rows over the mesh's ('data', 'fsdp') axes (the parameters keep their own shardings,
  e.g. fsdp / tensor over the same mesh); the batch size must divide by that many devices.

  gen: [system prompt] + prompt (+ the decoded plan in think mode); cfg_text: empty (system prompt only in
  think mode); cfg_img: [system prompt] + prompt. think=True needs `system_prompt` (the generation think
  system prompt, `texts.gen_think_system`) and greedily decodes the plan first; `plans` (think mode) gives the plans instead of
  decoding them (a diagnostic: drawing from known-good plans). Image i starts from noise keyed by
  fold_in(PRNGKey(seed_i), image_ids[i]) (default ids 0..B-1): the same (seed, id) gives the same image
  in any batch.
  """
  B = len(prompts)
  if think and system_prompt is None:
    raise ValueError("think mode needs the generation think system prompt (system_prompt=texts.gen_think_system)")
  ids = list(range(B)) if image_ids is None else list(image_ids)
  keys = prompt_keys(seeds, ids)
  sys_ids = None if system_prompt is None else context.wrap_text(tokenizer.encode(system_prompt), cfg)
  prompt_ids, prompt_lens = context.pad_ids([context.wrap_text(tokenizer.encode(p), cfg) for p in prompts], text_budget)
  sys_len = 0 if sys_ids is None else context.bucket(len(sys_ids))
  think_budget = context.bucket(max_think_tokens + 2) if think else 0
  T = context.bucket(sys_len + prompt_ids.shape[1] + think_budget)

  base = context.init_context(cfg, B, T, dtype)
  if mesh is not None:
    base = context.shard_context(base, mesh)
    prompt_ids, prompt_lens, keys = context.shard_rows((prompt_ids, prompt_lens, keys), mesh)
  if sys_ids is not None:
    ids_, lens_ = context.pad_ids([sys_ids] * B, sys_len)
    base = context.prefill_text(params, base, ids_, lens_, cfg=cfg, attn_impl=attn_impl)
  cfg_text = base
  gen = context.prefill_text(params, base, prompt_ids, prompt_lens, cfg=cfg, attn_impl=attn_impl)
  cfg_img = gen
  think_texts = None
  if plans is not None and (not think or len(plans) != B):
    raise ValueError(f"plans need think=True and one plan per prompt ({B}), got {len(plans)}")
  if think:
    gen, think_texts = add_plans(params, tokenizer, gen, cfg=cfg, max_think_tokens=max_think_tokens,
                                 plans=plans, attn_impl=attn_impl)
  images, tokens = sample_images(params, params_ae, cfg, (gen, cfg_text, cfg_img), height=height, width=width,
                                 keys=keys, num_timesteps=num_timesteps, timestep_shift=timestep_shift,
                                 cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale, cfg_interval=cfg_interval,
                                 cfg_renorm_type=cfg_renorm_type, cfg_renorm_min=cfg_renorm_min, attn_impl=attn_impl,
                                 return_latents=True)
  return T2IResult(images=np.asarray(images), think_texts=think_texts, latents=tokens)
