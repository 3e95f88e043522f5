"""The BAGEL wrapper: packed sequence assembly and the training forwards of both paths.

Packed inputs (`PackedInputs`) are B rows of N packed token slots (`packing.pack`) plus dense,
statically sized side arrays: text ids at their slots, ViT patches at theirs, and latent tokens
(patchified VAE latents) at theirs. `forward_gen` embeds each kind, runs the MoT decoder once over
the packed rows and returns the predicted velocities at the latent slots; `forward_und` returns text
logits at chosen slots. A model call returns model outputs only: noise, flow times and targets
belong to the loss (`losses`, `train_step`).

    inputs, slots = build_packed_inputs(cfg, samples, num_tokens=..., ...)   # host, NumPy
    t = losses.timesteps_from_raw(slots.raw_t, shift)
    x_t = losses.interpolate(slots.x_bad, noise, t)
    v = forward_gen(params, inputs, x_t, t, cfg=cfg, ...)                      # device, jit
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from srum_jax.models import embeddings, layers, packing, qwen2_mot, siglip
from srum_jax.models.config import BagelConfig
from srum_jax.models.packing import TokenMeta


class PackedInputs(NamedTuple):
  """The packed rows a forward reads (generation and understanding paths alike). B rows, N slots, Ct
  text / Cv ViT / Cl latent capacity.

  meta: TokenMeta [B, N].
  text_ids, text_index [B, Ct]: ids (incl. BOS/EOS and image markers) and their slots (N = unused).
  vit_patches [B, Cv, 3*14*14], vit_index, vit_pos, vit_segment [B, Cv] (segment -1 = unused).
  latent_index, latent_pos [B, Cl]: slots and `latent_pos_embed` rows of the latent tokens (N =
  unused).
  """
  meta: TokenMeta
  text_ids: jax.Array
  text_index: jax.Array
  vit_patches: jax.Array
  vit_index: jax.Array
  vit_pos: jax.Array
  vit_segment: jax.Array
  latent_index: jax.Array
  latent_pos: jax.Array


class LatentSlots(NamedTuple):
  """Per latent slot [B, Cl] of a host-packed batch (`build_packed_inputs`): what the loss needs,
  never the model. x_bad [B, Cl, p*p*z]: the latents that are noised (SRUM's "bad" = the model's own
  sample; clean conditioning images too); x_gt: the constraint target; raw_t: raw timestep (standard
  normal, repeated per image; -inf = clean condition); loss_mask: tokens of noise splits; rewards:
  per-token reward (1 unused)."""
  x_bad: np.ndarray
  x_gt: np.ndarray
  raw_t: np.ndarray
  loss_mask: np.ndarray
  rewards: np.ndarray


def capacities(inputs: PackedInputs):
  """Static MoT group sizes: text + ViT tokens go to und, latent tokens to gen."""
  return inputs.text_ids.shape[1] + inputs.vit_patches.shape[1], inputs.latent_index.shape[1]


def embed_latents(params, x_t: jax.Array, t: jax.Array, pos: jax.Array, cfg: BagelConfig,
                  dtype=jnp.float32) -> jax.Array:
  """Latent token embedding: vae2llm(x_t) + time_embedder(t) + latent_pos_embed[pos]."""
  table = jnp.asarray(embeddings.sincos_2d_table(cfg.max_latent_size, cfg.llm.hidden_size))
  e = layers.dense(params["vae2llm"], x_t.astype(dtype))
  e = e + embeddings.timestep_embed(params["time_embedder"], t, dtype)
  return e + jnp.take(table, pos, axis=0, mode="clip").astype(dtype)


def velocity_head(params, h: jax.Array) -> jax.Array:
  """llm2vae: final hidden -> predicted velocity per latent patch (fp32)."""
  return layers.dense(params["llm2vae"], h).astype(jnp.float32)


def embed_packed(params, inputs: PackedInputs, x_t: jax.Array, t: jax.Array, cfg: BagelConfig,
                 dtype) -> jax.Array:
  """Assemble the packed input sequence [B, N, D] from text, ViT and latent embeddings."""
  B, N = inputs.meta.sample_id.shape
  x = jnp.zeros((B, N, cfg.llm.hidden_size), dtype)
  x = layers.scatter_rows(x, inputs.text_index,
                          qwen2_mot.embed_text(params["llm"], inputs.text_ids, dtype))
  if inputs.vit_patches.shape[1] > 0:
    vit = siglip.embed_vit_tokens(params, inputs.vit_patches.astype(dtype), inputs.vit_pos,
                                  inputs.vit_segment, cfg)
    x = layers.scatter_rows(x, inputs.vit_index, vit)
  if inputs.latent_index.shape[1] > 0:
    x = layers.scatter_rows(x, inputs.latent_index,
                            embed_latents(params, x_t, t, inputs.latent_pos, cfg, dtype))
  return x


def forward_gen(params, inputs: PackedInputs, x_t: jax.Array, t: jax.Array, *, cfg: BagelConfig,
                dtype=jnp.float32, attn_impl: str = "dense", remat: bool = False, remat_policy=None,
                routing: str = "routed", scan_unroll: int | bool = 1, lora_key=None,
                attn_window: int = 0) -> jax.Array:
  """Generation-path forward: latents x_t [B, Cl, p*p*z] at flow times t [B, Cl] (0 for clean
  conditioning images) -> predicted velocities [B, Cl, p*p*z] (fp32) at the latent slots.
  `lora_key`: the LoRA dropout's key in training (None: no dropout). `attn_window` > 0: the rows
  were packed with `sample_stride` = attn_window, and attention runs per window."""
  x = embed_packed(params, inputs, x_t, t, cfg, dtype)
  und_cap, gen_cap = capacities(inputs)
  h = qwen2_mot.decoder_forward(params["llm"], x, inputs.meta, cfg=cfg.llm, und_capacity=und_cap,
                                gen_capacity=gen_cap, attn_impl=attn_impl, remat=remat,
                                remat_policy=remat_policy, routing=routing, scan_unroll=scan_unroll,
                                lora_key=lora_key, attn_window=attn_window)
  return velocity_head(params, layers.gather_rows(h, inputs.latent_index))


# ----------------------------------------------------------------------------------------------
# Host-side batch building


@dataclasses.dataclass
class ImageTokens:
  """One image's contribution to a sample: `kind` vit | vae_clean | vae_noise.

  vit: `patches` [hp*wp, 588] on an (hp, wp) grid. vae_*: `x_bad` / `x_gt` [h*w, p*p*z] on an (h, w)
  grid, `raw_t` the raw timestep (ignored for vae_clean), `rewards` [h*w] per-token reward (noise
  only).
  """
  kind: str
  grid: tuple
  patches: Optional[np.ndarray] = None
  x_bad: Optional[np.ndarray] = None
  x_gt: Optional[np.ndarray] = None
  raw_t: float = 0.0
  rewards: Optional[np.ndarray] = None


def build_packed_inputs(cfg: BagelConfig, rows: Sequence[Sequence[Sequence]], *, num_tokens: int,
                        text_capacity: int, vit_capacity: int = 0, latent_capacity: int = 0,
                        sample_stride: int = 0) -> Tuple[PackedInputs, LatentSlots]:
  """Pack rows of samples; a sample is a list of items, each a list of text ids or an `ImageTokens`.

  Text items are given complete (BOS ... EOS). Shapes depend only on the budgets, never on content.
  `sample_stride`: see `packing.pack`. Returns the model's inputs and, per latent slot, the images'
  latents, timesteps and rewards.
  """
  def split_of(item):
    if isinstance(item, ImageTokens):
      return packing.Split(item.kind, int(np.prod(item.grid)))
    return packing.text(item)

  packed = packing.pack([[[split_of(it) for it in smp] for smp in row] for row in rows], num_tokens,
                        text_capacity=text_capacity, vit_capacity=vit_capacity,
                        latent_capacity=latent_capacity, start_of_image=cfg.tokens.start_of_image,
                        end_of_image=cfg.tokens.end_of_image, sample_stride=sample_stride)
  B = len(rows)
  C = cfg.patch_latent_dim
  images = {"vit": [], "latent": []}
  for row in rows:
    for smp in row:
      for it in smp:
        if isinstance(it, ImageTokens):
          images["vit" if it.kind == "vit" else "latent"].append(it)

  vit_patches = np.zeros(
      (B, vit_capacity, cfg.vit.patch_dim if cfg.vit is not None else 3 * 14 * 14), np.float32)
  vit_pos = np.zeros((B, vit_capacity), np.int32)
  vit_segment = np.full((B, vit_capacity), -1, np.int32)
  x_bad = np.zeros((B, latent_capacity, C), np.float32)
  x_gt = np.zeros((B, latent_capacity, C), np.float32)
  raw_t = np.full((B, latent_capacity), -np.inf, np.float32)
  loss_mask = np.zeros((B, latent_capacity), bool)
  rewards = np.ones((B, latent_capacity), np.float32)
  latent_pos = np.zeros((B, latent_capacity), np.int32)
  G_vit, G_lat = cfg.vit_max_num_patch_per_side, cfg.max_latent_size
  for b in range(B):
    for j in np.nonzero(packed.vit_valid[b])[0]:
      it, k = images["vit"][packed.vit_image[b, j]], packed.vit_offset[b, j]
      w = it.grid[1]
      vit_patches[b, j] = it.patches[k]
      vit_pos[b, j] = (k // w) * G_vit + k % w
      vit_segment[b, j] = packed.vit_image[b, j]
    for j in np.nonzero(packed.latent_valid[b])[0]:
      it, k = images["latent"][packed.latent_image[b, j]], packed.latent_offset[b, j]
      w = it.grid[1]
      latent_pos[b, j] = (k // w) * G_lat + k % w
      # (a layout alone, e.g. the training step's, leaves the latents to the loss)
      if it.x_bad is not None:
        x_bad[b, j] = it.x_bad[k]
        x_gt[b, j] = (it.x_gt if it.x_gt is not None else it.x_bad)[k]
      if it.kind == "vae_noise":
        raw_t[b, j] = it.raw_t
        loss_mask[b, j] = True
        if it.rewards is not None:
          rewards[b, j] = it.rewards[k]
  inputs = PackedInputs(meta=packed.meta, text_ids=packed.text_ids, text_index=packed.text_index,
                        vit_patches=vit_patches, vit_index=packed.vit_index, vit_pos=vit_pos,
                        vit_segment=vit_segment, latent_index=packed.latent_index,
                        latent_pos=latent_pos)
  return inputs, LatentSlots(x_bad=x_bad, x_gt=x_gt, raw_t=raw_t, loss_mask=loss_mask,
                             rewards=rewards)


# ----------------------------------------------------------------------------------------------
# Understanding path (text answers)


def forward_und(params, inputs: PackedInputs, logit_index: jax.Array, *, cfg: BagelConfig,
                dtype=jnp.float32, attn_impl: str = "dense", remat: bool = False,
                routing: str = "routed", lora_key=None) -> jax.Array:
  """Training forward of the understanding path: text logits [B, A, V] (fp32) at the slots
  `logit_index` [B, A] (out-of-range entries give the logits of a zero hidden state; mask them in
  the loss). `lora_key`: as in `forward_gen`.

  The packed rows hold ViT images and text splits (no latents); the slot of token k of a causal
  answer split predicts token k+1, as in decoding: lm_head(norm(h)) over the und expert.
  """
  B = inputs.meta.sample_id.shape[0]
  empty = jnp.zeros((B, 0, cfg.patch_latent_dim), jnp.float32)
  x = embed_packed(params, inputs, empty, jnp.zeros((B, 0), jnp.float32), cfg, dtype)
  und_cap, gen_cap = capacities(inputs)
  h = qwen2_mot.decoder_forward(params["llm"], x, inputs.meta, cfg=cfg.llm, und_capacity=und_cap,
                                gen_capacity=gen_cap, attn_impl=attn_impl, remat=remat,
                                routing=routing, lora_key=lora_key)
  return qwen2_mot.lm_logits(params["llm"], layers.gather_rows(h, logit_index)).astype(jnp.float32)
