"""The BAGEL wrapper: packed sequence assembly and the generation-path training forward (spec A.0, A.6, A.9, A.13).

A training batch (`GenBatch`) is B rows of N packed token slots (`packing.pack`) plus dense, statically
sized side arrays: text ids at their slots, ViT patches at theirs, and latent tokens (patchified VAE latents)
at theirs. `forward_gen` embeds each kind, runs the MoT decoder once over the packed rows, and returns
the predicted velocities at the latent slots together with everything `losses.srum_flow_loss` needs.

    batch = build_gen_batch(cfg, samples, num_tokens=..., ...)       # host, NumPy
    out = forward_gen(params, batch, noise, cfg=cfg, ...)            # device, jit
    loss, aux = losses.srum_flow_loss(out.v_pred, out.noise, out.x_bad, out.x_gt, out.token_rewards,
                                      out.loss_mask, lambda_constraint)
"""
from __future__ import annotations

import dataclasses
from typing import List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from srum_jax.models import embeddings, layers, packing, qwen2_mot, siglip
from srum_jax.models.config import BagelConfig
from srum_jax.models.packing import TokenMeta


class GenBatch(NamedTuple):
  """Device batch for the generation path. Shapes: B rows, N slots, Ct text / Cv ViT / Cl latent capacity.

  meta: TokenMeta [B, N].
  text_ids, text_index [B, Ct]: ids (incl. BOS/EOS and image markers) and their slots (N = unused).
  vit_patches [B, Cv, 3*14*14], vit_index, vit_pos, vit_segment [B, Cv] (segment -1 = unused).
  latent_index, latent_pos [B, Cl]: slots and `latent_pos_embed` rows of the latent tokens.
  x_bad [B, Cl, p*p*z]: the latents that are noised (SRUM's "bad" = the model's own sample; clean
    conditioning images too). x_gt [B, Cl, p*p*z]: the constraint target (the same image re-encoded).
  raw_t [B, Cl]: raw timestep per token (standard normal, repeated per image; -inf = clean condition).
  loss_mask [B, Cl]: tokens of noise splits. token_rewards [B, Cl]: per-token reward R (1 when unused).
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
  x_bad: jax.Array
  x_gt: jax.Array
  raw_t: jax.Array
  loss_mask: jax.Array
  token_rewards: jax.Array


class GenOutput(NamedTuple):
  v_pred: jax.Array  # [B, Cl, C] predicted velocity at latent slots
  noise: jax.Array  # [B, Cl, C]
  x_bad: jax.Array
  x_gt: jax.Array
  t: jax.Array  # [B, Cl] effective (shifted) flow time
  token_rewards: jax.Array
  loss_mask: jax.Array


def capacities(batch: GenBatch):
  """Static MoT group sizes: text + ViT tokens go to und, latent tokens to gen."""
  return batch.text_ids.shape[1] + batch.vit_patches.shape[1], batch.latent_index.shape[1]


def shifted_time(raw_t: jax.Array, shift: float) -> jax.Array:
  """t = shift*s / (1 + (shift-1)*s) with s = sigmoid(raw) (A.13); raw -inf -> t = 0 (clean)."""
  s = jax.nn.sigmoid(raw_t.astype(jnp.float32))
  return shift * s / (1.0 + (shift - 1.0) * s)


def _scatter_rows(base: jax.Array, index: jax.Array, values: jax.Array) -> jax.Array:
  return jax.vmap(lambda b, i, v: b.at[i].set(v.astype(b.dtype), mode="drop"))(base, index, values)


def _gather_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  return jax.vmap(lambda r, i: r.at[i].get(mode="fill", fill_value=0))(x, index)


def embed_latents(params, x_t: jax.Array, t: jax.Array, pos: jax.Array, cfg: BagelConfig,
                  dtype=jnp.float32) -> jax.Array:
  """Latent token embedding (A.6): vae2llm(x_t) + time_embedder(t) + latent_pos_embed[pos]."""
  table = jnp.asarray(embeddings.sincos_2d_table(cfg.max_latent_size, cfg.llm.hidden_size))
  e = layers.dense(params["vae2llm"], x_t.astype(dtype))
  e = e + embeddings.timestep_embed(params["time_embedder"], t, dtype)
  return e + jnp.take(table, pos, axis=0, mode="clip").astype(dtype)


def velocity_head(params, h: jax.Array) -> jax.Array:
  """llm2vae: final hidden -> predicted velocity per latent patch (fp32)."""
  return layers.dense(params["llm2vae"], h).astype(jnp.float32)


def embed_packed(params, batch: GenBatch, x_t: jax.Array, t: jax.Array, cfg: BagelConfig, dtype) -> jax.Array:
  """Assemble the packed input sequence [B, N, D] from text, ViT and latent embeddings."""
  B, N = batch.meta.sample_id.shape
  x = jnp.zeros((B, N, cfg.llm.hidden_size), dtype)
  x = _scatter_rows(x, batch.text_index, qwen2_mot.embed_text(params["llm"], batch.text_ids, dtype))
  if batch.vit_patches.shape[1] > 0:
    vit = siglip.embed_vit_tokens(params, batch.vit_patches.astype(dtype), batch.vit_pos, batch.vit_segment, cfg)
    x = _scatter_rows(x, batch.vit_index, vit)
  if batch.latent_index.shape[1] > 0:
    x = _scatter_rows(x, batch.latent_index, embed_latents(params, x_t, t, batch.latent_pos, cfg, dtype))
  return x


def forward_gen(params, batch: GenBatch, noise: jax.Array, *, cfg: BagelConfig, timestep_shift: float,
                dtype=jnp.float32, attn_impl: str = "dense", remat: bool = False, remat_policy=None,
                routing: str = "routed", scan_unroll: int | bool = 1) -> GenOutput:
  """Training forward of the generation path: noise the latents, run the packed MoT, predict velocities.

  x_t = (1 - t) * x_bad + t * noise at every latent slot (t = 0 for clean conditioning images).
  """
  t = shifted_time(batch.raw_t, timestep_shift)
  x_t = (1.0 - t[..., None]) * batch.x_bad.astype(jnp.float32) + t[..., None] * noise.astype(jnp.float32)
  x = embed_packed(params, batch, x_t, t, cfg, dtype)
  und_cap, gen_cap = capacities(batch)
  h = qwen2_mot.decoder_forward(params["llm"], x, batch.meta, cfg=cfg.llm, und_capacity=und_cap,
                                gen_capacity=gen_cap, attn_impl=attn_impl, remat=remat,
                                remat_policy=remat_policy, routing=routing, scan_unroll=scan_unroll)
  v = velocity_head(params, _gather_rows(h, batch.latent_index))
  return GenOutput(v_pred=v, noise=noise.astype(jnp.float32), x_bad=batch.x_bad.astype(jnp.float32),
                   x_gt=batch.x_gt.astype(jnp.float32), t=t, token_rewards=batch.token_rewards,
                   loss_mask=batch.loss_mask)


# ----------------------------------------------------------------------------------------------
# Host-side batch building


@dataclasses.dataclass
class ImageTokens:
  """One image's contribution to a sample: `kind` vit | vae_clean | vae_noise.

  vit: `patches` [hp*wp, 588] on an (hp, wp) grid. vae_*: `x_bad` / `x_gt` [h*w, p*p*z] on an (h, w) grid,
  `raw_t` the raw timestep (ignored for vae_clean), `rewards` [h*w] per-token reward (noise only).
  """
  kind: str
  grid: tuple
  patches: Optional[np.ndarray] = None
  x_bad: Optional[np.ndarray] = None
  x_gt: Optional[np.ndarray] = None
  raw_t: float = 0.0
  rewards: Optional[np.ndarray] = None


def build_gen_batch(cfg: BagelConfig, rows: Sequence[Sequence[Sequence]], *, num_tokens: int, text_capacity: int,
                    vit_capacity: int = 0, latent_capacity: int = 0) -> GenBatch:
  """Pack rows of samples; a sample is a list of items, each a list of text ids or an `ImageTokens`.

  Text items are given complete (BOS ... EOS). Shapes depend only on the budgets, never on content.
  """
  def split_of(item):
    if isinstance(item, ImageTokens):
      return packing.Split(item.kind, int(np.prod(item.grid)))
    return packing.text(item)

  packed = packing.pack([[[split_of(it) for it in smp] for smp in row] for row in rows], num_tokens,
                        text_capacity=text_capacity, vit_capacity=vit_capacity, latent_capacity=latent_capacity,
                        start_of_image=cfg.tokens.start_of_image, end_of_image=cfg.tokens.end_of_image)
  B = len(rows)
  C = cfg.patch_latent_dim
  images = {"vit": [], "latent": []}
  for row in rows:
    for smp in row:
      for it in smp:
        if isinstance(it, ImageTokens):
          images["vit" if it.kind == "vit" else "latent"].append(it)

  vit_patches = np.zeros((B, vit_capacity, cfg.vit.patch_dim if cfg.vit is not None else 3 * 14 * 14), np.float32)
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
      x_bad[b, j] = it.x_bad[k]
      x_gt[b, j] = (it.x_gt if it.x_gt is not None else it.x_bad)[k]
      if it.kind == "vae_noise":
        raw_t[b, j] = it.raw_t
        loss_mask[b, j] = True
        if it.rewards is not None:
          rewards[b, j] = it.rewards[k]
  return GenBatch(meta=packed.meta, text_ids=packed.text_ids, text_index=packed.text_index,
                  vit_patches=vit_patches, vit_index=packed.vit_index, vit_pos=vit_pos, vit_segment=vit_segment,
                  latent_index=packed.latent_index, latent_pos=latent_pos, x_bad=x_bad, x_gt=x_gt, raw_t=raw_t,
                  loss_mask=loss_mask, token_rewards=rewards)


# ----------------------------------------------------------------------------------------------
# Understanding path (text answers)


def forward_und(params, batch: GenBatch, logit_index: jax.Array, *, cfg: BagelConfig, dtype=jnp.float32,
                attn_impl: str = "dense", remat: bool = False, routing: str = "routed") -> jax.Array:
  """Training forward of the understanding path: text logits [B, A, V] (fp32) at the slots `logit_index`
  [B, A] (out-of-range entries give the logits of a zero hidden state; mask them in the loss).

  The packed rows hold ViT images and text splits (no latents); the slot of token k of a causal answer
  split predicts token k+1, as in decoding (C.1): lm_head(norm(h)) over the und expert.
  """
  B = batch.meta.sample_id.shape[0]
  C = cfg.patch_latent_dim
  empty = jnp.zeros((B, 0, C), jnp.float32)
  x = embed_packed(params, batch, empty, jnp.zeros((B, 0), jnp.float32), cfg, dtype)
  und_cap, gen_cap = capacities(batch)
  h = qwen2_mot.decoder_forward(params["llm"], x, batch.meta, cfg=cfg.llm, und_capacity=und_cap,
                                gen_capacity=gen_cap, attn_impl=attn_impl, remat=remat, routing=routing)
  return qwen2_mot.lm_logits(params["llm"], _gather_rows(h, logit_index)).astype(jnp.float32)
