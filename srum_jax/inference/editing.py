"""Image editing: an input image and an instruction -> a new image (BAGEL's `interleave_inference`
for the inputs [image, instruction]; docs/bagel.md, "Flow sampler and CFG").

Per row, the three contexts the official inferencer builds for an image followed by an instruction:

    gen      = [system] + VAE image + ViT image + instruction (+ the plan, think mode)
    cfg_text = [system] + VAE image + ViT image    (no instruction: the text guidance branch)
    cfg_img  = [system] + instruction              (no image: the image guidance branch)

[system] (the generation think system prompt) is there in think mode only. The image enters twice:
as clean VAE latents (generation experts, t = 0) at one RoPE position, then as ViT tokens at the
next; the edited image has the input's size after the VAE resize. Guidance is `sampling.cfg_combine`
(text scale, then image scale, then the renorm of `cfg_renorm_type`; BAGEL's editing recipe uses
text_channel over the whole flow).

    vae, vit = input_views(pil_image, VAE_TRANSFORM, VIT_TRANSFORM)
    out = edit_images(params, params_ae, tok, [(vae, vit)], ["make the ball red"], cfg=cfg, seeds=0)
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from srum_jax.inference import context, sampling
from srum_jax.inference.context import Context
from srum_jax.models import image_transforms
from srum_jax.models.config import BagelConfig


def input_views(image, vae_transform: Sequence[int],
                vit_transform: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
  """A PIL image -> (VAE view, ViT view), HWC float32 in [-1, 1]: the image resized by
  `vae_transform` ((max_size, min_size, stride) of the official ImageTransform), and that resized
  image put through `vit_transform` (the official order: the ViT sees the VAE-resized image)."""
  resized = image_transforms.resize_image(image.convert("RGB"), *vae_transform)
  return (image_transforms.to_model_range(np.asarray(resized)),
          image_transforms.transform_image(resized, *vit_transform))


def edit_contexts(params, base: Context, latents: jax.Array, latent_grid: jax.Array,
                  patches: jax.Array, vit_grid: jax.Array, prompt_ids: jax.Array,
                  prompt_lens: jax.Array, system_ids: Optional[jax.Array] = None,
                  system_lens: Optional[jax.Array] = None, *, cfg: BagelConfig,
                  attn_impl: str = "dense") -> Tuple[Context, Context, Context]:
  """(gen, cfg_text, cfg_img) from the empty contexts `base` and padded device inputs: clean latent
  tokens [B, Nl, p*p*z] with their grid [B, 2], ViT patches [B, Np, 588] with their grid, the
  instruction `[bos] + ids + [eos]` [B, L] with lengths [B], and optionally the system prompt (same
  layout)."""
  head = base
  if system_ids is not None:
    head = context.prefill_text(params, base, system_ids, system_lens, cfg=cfg, attn_impl=attn_impl)
  image = context.prefill_vae_image(params, head, latents, latent_grid, cfg=cfg,
                                    attn_impl=attn_impl)
  image = context.prefill_vit_image(params, image, patches, vit_grid, cfg=cfg, attn_impl=attn_impl)
  gen = context.prefill_text(params, image, prompt_ids, prompt_lens, cfg=cfg, attn_impl=attn_impl)
  cfg_img = context.prefill_text(params, head, prompt_ids, prompt_lens, cfg=cfg,
                                 attn_impl=attn_impl)
  return gen, image, cfg_img


def encode_images(params_ae, images: Sequence[np.ndarray], cfg: BagelConfig,
                  keys: Optional[jax.Array] = None) -> Tuple[np.ndarray, np.ndarray]:
  """VAE views (HWC in [-1, 1]) -> clean latent tokens [B, Nl, p*p*z] and grids [B, 2]. keys None:
  the posterior mean; else row b is a posterior sample keyed by fold_in(keys[b], 1) alone (the
  official encoder samples), so a row's latents do not depend on the rest of the batch."""
  f = cfg.latent_downsample
  n = max((im.shape[0] // f) * (im.shape[1] // f) for im in images)
  budget = context.bucket(n)
  rows = [
      context.vae_inputs(params_ae, [im], cfg, budget,
                         None if keys is None else jax.random.fold_in(keys[b], 1))
      for b, im in enumerate(images)
  ]
  return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])


def check_vit_grid(grid: np.ndarray, cfg: BagelConfig) -> None:
  """ViT views must fit the model's position table (`vit_max_num_patch_per_side` a side)."""
  side = int(np.max(grid, initial=0))
  if side > cfg.vit_max_num_patch_per_side:
    raise ValueError(f"a ViT view is {side} patches on a side; this model's position table has "
                     f"{cfg.vit_max_num_patch_per_side} (use a smaller ViT transform max_size)")


def edit_images(params, params_ae, tokenizer, views: Sequence[Tuple[np.ndarray, np.ndarray]],
                prompts: Sequence[str], *, cfg: BagelConfig, think: bool = False,
                system_prompt: Optional[str] = None, seeds: Union[int, Sequence[int]] = 0,
                image_ids: Optional[Sequence[int]] = None, num_timesteps: int = 50,
                timestep_shift: float = 3.0, cfg_text_scale: float = 4.0,
                cfg_img_scale: float = 2.0, cfg_interval=(0.0, 1.0),
                cfg_renorm_type: str = "text_channel", cfg_renorm_min: float = 0.0,
                max_think_tokens: int = 1000, sample_posterior: bool = True, dtype=jnp.float32,
                text_budget: Optional[int] = None, attn_impl: str = "dense",
                mesh=None) -> sampling.T2IResult:
  """Edit one image per instruction: views[b] = `input_views` of row b's image (every row of a batch
  the same VAE size: the output size), prompts[b] its instruction. think=True needs `system_prompt`
  (the generation think system prompt) and decodes a plan first (`sampling.add_plans`). Row b's
  noise (and posterior sample) is keyed by fold_in(PRNGKey(seed_b), image_ids[b]) as in
  `sampling.text_to_image`. mesh: split the rows over its ('data', 'fsdp') axes (B must divide by
  that many devices)."""
  B = len(prompts)
  if len(views) != B:
    raise ValueError(f"{len(views)} images for {B} instructions")
  sizes = sorted({tuple(v[0].shape[:2]) for v in views})
  if len(sizes) != 1:
    raise ValueError(f"one batch edits images of one size (after the VAE resize), got {sizes}")
  if think and system_prompt is None:
    raise ValueError("think mode needs the generation think system prompt (system_prompt)")
  height, width = sizes[0]
  keys = sampling.prompt_keys(seeds, list(range(B)) if image_ids is None else list(image_ids))
  latents, latent_grid = encode_images(params_ae, [v[0] for v in views], cfg,
                                       keys if sample_posterior else None)
  patches, vit_grid = context.vit_inputs([v[1] for v in views], cfg)
  check_vit_grid(vit_grid, cfg)
  prompt_ids, prompt_lens = context.pad_ids(
      [context.wrap_text(tokenizer.encode(p), cfg) for p in prompts], text_budget)
  system = None
  if think:
    sys_ids = context.wrap_text(tokenizer.encode(system_prompt), cfg)
    system = context.pad_ids([sys_ids] * B, context.bucket(len(sys_ids)))
  think_budget = context.bucket(max_think_tokens + 2) if think else 0
  T = context.bucket((0 if system is None else system[0].shape[1]) + latents.shape[1] +
                     patches.shape[1] + 4 + prompt_ids.shape[1] + think_budget)
  base = context.init_context(cfg, B, T, dtype)
  rows = (latents, latent_grid, patches, vit_grid, prompt_ids, prompt_lens) + (
      system or (None, None))
  if mesh is not None:
    base = context.shard_context(base, mesh)
    rows, keys = context.shard_rows(rows, mesh), context.shard_rows(keys, mesh)
  gen, cfg_text, cfg_img = edit_contexts(params, base, *rows, cfg=cfg, attn_impl=attn_impl)
  plans = None
  if think:
    gen, plans = sampling.add_plans(params, tokenizer, gen, cfg=cfg,
                                    max_think_tokens=max_think_tokens, attn_impl=attn_impl)
  images, tokens = sampling.sample_images(
      params, params_ae, cfg, (gen, cfg_text, cfg_img), height=height, width=width, keys=keys,
      num_timesteps=num_timesteps, timestep_shift=timestep_shift, cfg_text_scale=cfg_text_scale,
      cfg_img_scale=cfg_img_scale, cfg_interval=cfg_interval, cfg_renorm_type=cfg_renorm_type,
      cfg_renorm_min=cfg_renorm_min, attn_impl=attn_impl, return_latents=True)
  return sampling.T2IResult(images=np.asarray(images), think_texts=plans, latents=tokens)
