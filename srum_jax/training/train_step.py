"""The SRUM train step: VAE posterior -> reward maps -> packed MoT forward -> SRUM loss -> guarded
AdamW.

Functional core of post-training. `make_train_step` returns a pure `step(state, batch, key)` (the
update itself is the shared `training.update.make_step`); the imperative shell
(`srum_jax.pipeline.train`) feeds it. With a mesh, `shard_train_step` jits it with parameter /
optimizer-state shardings from the logical-axis rules (FSDP over `embed`, tensor over
heads/mlp/vocab) and the batch split over ('data', 'fsdp').

Faithful to the official recipe (SRUM's `modeling/bagel/bagel.py` and BAGEL's training loop): the
"bad" and "good" latents are two independent posterior samples of the same image; one raw timestep ~
N(0, 1) per image, squashed by a sigmoid and shifted; the text condition is dropped with probability
`text_cond_dropout` (CFG training).

The posterior comes either from the batch (`SrumBatch.moments`: encoded once per round by the data
pipeline, `pipeline.train_data.prepare_moments`; SRUM's training images are fixed within a round, so
the frozen encoder need not run every step) or from the frozen encoder run inside the step on
`SrumBatch.images`. Both feed the same sampling rule (`_latent_tokens_from_moments`), so given equal
moments and key the loss is the same.

The anchor (`StepOptions.anchor_weight` > 0; not in the official recipe): a label-free constraint
toward a frozen reference model (the model training started from) on prompts outside the candidate
set. The batch's `anchor_inputs` is the same packed layout with other prompts
(`pipeline.train_data`); at the batch's own noised latents and times the step adds anchor_weight *
mean((v(x_t, t | anchor prompt) - v_ref(...))^2), with the reference's parameters passed to the step
as an input (`make_train_step`: step(state, batch, key, reference))."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from srum_jax import losses, sharding
from srum_jax.models import autoencoder, bagel, embeddings, params as param_schema
from srum_jax.models.bagel import PackedInputs
from srum_jax.models.config import BagelConfig
from srum_jax.models.packing import CAUSAL
from srum_jax.training import objective, update
from srum_jax.training.update import TrainState


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Static options of the step (hashable: changing one recompiles, nothing else does)."""
  image_hw: Tuple[int, int]
  samples_per_row: int
  lambda_constraint: float = 0.5
  levers: objective.RewardLevers = objective.RewardLevers()
  timestep_shift: float = 1.0
  text_cond_dropout: float = 0.1
  sample_posterior: bool = True  # official AE.encode samples; False = posterior mean
  compute_dtype: Any = jnp.bfloat16
  attn_impl: str = "dense"
  remat: bool = False
  # with remat: a `jax.checkpoint_policies` name (None: save nothing)
  remat_policy: Optional[str] = None
  ema_decay: float = 0.0
  anchor_weight: float = 0.0  # > 0: the anchor term (batch: anchor_inputs; step: a reference)
  scan_unroll: Any = 1  # True: unrolled layers (exact XLA FLOP counts in benchmarks)
  microbatches: int = 1  # gradient accumulation over this many cuts of the batch's rows
  batch_ways: int = 1  # the batch's row shards on the mesh (microbatches cut within each shard)
  # > 0: the batch's layouts were built with `t2i_layout(sample_stride=sample_window)` (one window
  # per sample) and attention runs per window (`sample_window(num_tokens, samples_per_row)`)
  sample_window: int = 0


# fold_in index of the LoRA dropout's key (the step's other draws split the key in 5)
LORA_DROPOUT_STREAM = 5
ANCHOR_DROP_STREAM = 6  # fold_in index of the anchor prompts' text-dropout key


class SrumBatch(NamedTuple):
  """inputs: packed T2I layout (per sample a text split + one noise image of `image_hw`; latent
  slots in sample order, `t2i_layout`). Exactly one of images [B, S, H, W, 3] in [-1, 1] (encoded in
  the step) or moments [B, S, h, w, 2z] (the encoder's output: posterior mean channels, then
  log-variance; fp32 or bf16) is set, the other is None. rewards: RegionRewards, leading dims [B,
  S].

  latent_src [B, L] int32 (L = the latent capacity, S * canvas tokens): for images smaller than the
  canvas `image_hw` (top-left, zero padding; `t2i_layout(grids=...)`), the canvas token of each
  packed latent slot, -1 for unused slots (`latent_sources`); None when every image fills the canvas
  (slot = canvas order). anchor_inputs: the layout of `inputs` with anchor prompts in place of the
  candidates' (same latent slots; None without the anchor)."""
  inputs: PackedInputs
  images: Optional[jax.Array]
  rewards: objective.RegionRewards
  moments: Optional[jax.Array] = None
  latent_src: Optional[jax.Array] = None
  anchor_inputs: Optional[PackedInputs] = None


# ----------------------------------------------------------------------------------------------
# Loss


def _latent_tokens_from_moments(moments, cfg: BagelConfig, keys, sample: bool):
  """Posterior moments [B, S, h, w, 2z] -> one [B, S*h*w, p*p*z] fp32 token array per key (no
  gradient).

  Each key draws its own posterior sample from the shared moments, which is the same distribution as
  the official two independent `encode` calls at the cost of one encoder pass (or none, with stored
  moments).
  """
  B, S = moments.shape[:2]
  z_ch = cfg.ae.z_channels
  m = jax.lax.stop_gradient(moments.astype(jnp.float32)).reshape((B * S,) + moments.shape[2:])
  mean, logvar = m[..., :z_ch], m[..., z_ch:]
  out = []
  for key in keys:
    z = autoencoder.latents_from_moments(mean, logvar, cfg.ae, key if sample else None)
    tok = embeddings.patchify_latent(z, cfg.latent_patch_size)
    out.append(tok.reshape(B, S * tok.shape[1], tok.shape[2]))
  return out


def batch_moments(params_ae, batch: "SrumBatch", cfg: BagelConfig) -> jax.Array:
  """The batch's posterior moments [B, S, h, w, 2z]: stored ones, else the frozen encoder on its
  images."""
  if batch.moments is not None:
    return batch.moments
  B, S, H, W, _ = batch.images.shape
  m = autoencoder.encoder(
      jax.lax.stop_gradient(params_ae)["encoder"], batch.images.reshape(B * S, H, W, 3), cfg.ae)
  return m.reshape((B, S) + m.shape[1:])


def drop_text_condition(meta, key, p: float):
  """Hide each sample's causal text split with probability p (sample_id -> -1: invisible to the
  image).

  Equivalent to the official removal of the split: the image tokens share one RoPE position, so
  their attention among themselves does not depend on where the block sits.
  """
  if p <= 0:
    return meta
  n = meta.sample_id.size  # upper bound on sample ids
  drop = jax.random.bernoulli(key, p, (n,))
  hide = (meta.mode == CAUSAL) & (meta.sample_id >= 0) & drop[jnp.maximum(meta.sample_id, 0)]
  return meta._replace(sample_id=jnp.where(hide, -1, meta.sample_id))


def srum_loss(params, batch: SrumBatch, key, reference=None, *, cfg: BagelConfig,
              opts: StepOptions):
  """Scalar SRUM loss and metrics for one packed batch: the targets, noise and times are drawn here.
  `reference`: the frozen model's {'bagel', ...} parameters the anchor term pulls toward (anchor
  only)."""
  k_bad, k_gt, k_t, k_noise, k_drop = jax.random.split(key, 5)
  inputs = batch.inputs
  moments = batch_moments(params["ae"], batch, cfg)
  B, S = moments.shape[:2]
  x_bad, x_gt = _latent_tokens_from_moments(moments, cfg, (k_bad, k_gt), opts.sample_posterior)
  n_tok = x_bad.shape[1] // S
  if inputs.latent_index.shape[1] != x_bad.shape[1]:
    raise ValueError(
        f"latent capacity {inputs.latent_index.shape[1]} != samples_per_row * tokens = "
        f"{x_bad.shape[1]}"
    )
  t = losses.timesteps_from_raw(
      jnp.repeat(jax.random.normal(k_t, (B, S)), n_tok, axis=1), opts.timestep_shift)
  token_mask = jnp.ones(t.shape, bool)
  if batch.latent_src is not None:  # images below the canvas: canvas tokens -> the packed slots
    x_bad, x_gt, t = (objective.gather_tokens(a, batch.latent_src) for a in (x_bad, x_gt, t))
    token_mask = batch.latent_src >= 0
  noise = jax.random.normal(k_noise, x_bad.shape, jnp.float32)
  inputs = inputs._replace(meta=drop_text_condition(inputs.meta, k_drop, opts.text_cond_dropout))
  lora = cfg.llm.lora
  lora_key = jax.random.fold_in(
      key, LORA_DROPOUT_STREAM) if lora is not None and lora.dropout > 0 else None
  forward = functools.partial(bagel.forward_gen, cfg=cfg, dtype=opts.compute_dtype,
                              attn_impl=opts.attn_impl, remat=opts.remat,
                              remat_policy=opts.remat_policy, scan_unroll=opts.scan_unroll,
                              attn_window=opts.sample_window)
  x_t = losses.interpolate(x_bad, noise, t)
  v_pred = forward(params["bagel"], inputs, x_t, t, lora_key=lora_key)
  latent_hw = (opts.image_hw[0] // cfg.latent_downsample, opts.image_hw[1] // cfg.latent_downsample)
  loss, aux = objective.srum_objective(batch.rewards, v_pred, noise, x_bad, x_gt, token_mask,
                                       image_hw=opts.image_hw, latent_hw=latent_hw,
                                       lambda_constraint=opts.lambda_constraint, levers=opts.levers,
                                       token_index=batch.latent_src)
  if opts.anchor_weight > 0:
    if batch.anchor_inputs is None or reference is None:
      raise ValueError(
          "anchor_weight > 0 needs the batch's anchor_inputs and the reference parameters")
    a_inputs = batch.anchor_inputs
    a_inputs = a_inputs._replace(meta=drop_text_condition(
        a_inputs.meta, jax.random.fold_in(key, ANCHOR_DROP_STREAM), opts.text_cond_dropout))
    v_ref = forward(jax.lax.stop_gradient(reference["bagel"]), a_inputs, x_t, t)
    v_anchor = forward(params["bagel"], a_inputs, x_t, t, lora_key=lora_key)
    loss_anchor = losses.anchor_velocity_loss(v_anchor, v_ref, token_mask)
    loss = loss + opts.anchor_weight * loss_anchor
    aux = dict(aux, loss_anchor=loss_anchor)
  return loss, dict(aux, t_mean=jnp.mean(t))


def make_train_step(cfg: BagelConfig, opts: StepOptions, tx: optax.GradientTransformation,
                    labels=None):
  """Pure step(state, batch, key) -> (state, metrics); with the anchor step(state, batch, key,
  reference). `labels`: only the leaves labelled 'train' are differentiated and updated
  (`training.update`; LoRA: the adapters)."""
  return update.make_step(functools.partial(srum_loss, cfg=cfg, opts=opts), tx, opts.ema_decay,
                          microbatches=opts.microbatches, batch_ways=opts.batch_ways, labels=labels)


# ----------------------------------------------------------------------------------------------
# Sharding


def _key_names(path):
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(cfg: BagelConfig, abstract_state: TrainState, mesh,
                    rules=sharding.DEFAULT_RULES):
  """Shardings for a TrainState: every optimizer leaf whose key path ends with a parameter's path
  (Adam moments) follows that parameter, the EMA follows the parameters; everything else (counts,
  step) is replicated."""
  ps = sharding.schema_shardings(param_schema.model_schema(cfg), mesh, rules)
  rep = sharding.replicated(mesh)
  by_path = {_key_names(path): s for path, s in jax.tree_util.tree_flatten_with_path(
      ps, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]}
  depth = max(len(k) for k in by_path)

  def follow(path, leaf):
    names = _key_names(path)
    for n in range(min(depth, len(names)), 0, -1):
      s = by_path.get(names[-n:])
      if s is not None and len(s.spec) <= len(leaf.shape):
        return s
    return rep

  opt = jax.tree_util.tree_map_with_path(follow, abstract_state.opt_state)
  # the EMA follows the parameters; with labels it holds the trainable leaves only (None elsewhere)
  ema = None if abstract_state.ema is None else jax.tree.map(lambda s, e: None if e is None else s,
                                                             ps, abstract_state.ema)
  return TrainState(step=rep, params=ps, opt_state=opt, ema=ema, skipped=rep)


def batch_shardings(batch, mesh, rules=sharding.DEFAULT_RULES):
  return jax.tree.map(lambda x: sharding.batch_sharding(mesh, np.ndim(x), rules), batch)


# XLA TPU options of the step without collective matmuls (windowed einsum): FSDP weights are
# all-gathered whole before their matmuls and gradients reduce-scattered after them, instead of in
# per-shard pieces inside a loop whose every iteration re-reads and re-writes the whole output.
TPU_NO_COLLECTIVE_MATMUL = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                            "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def compiler_options(platform: str, collective_matmul: bool = True) -> dict:
  """XLA options of the train step's compile on `platform` (`train.tpu_collective_matmul`); {} =
  XLA's defaults (collective matmuls are a TPU pass: other platforms take no option)."""
  return {} if platform != "tpu" or collective_matmul else dict(TPU_NO_COLLECTIVE_MATMUL)


def shard_train_step(step_fn, state_sh, batch_sh, mesh, const_sh: tuple = (),
                     options: Optional[dict] = None):
  """jit with explicit in/out shardings (today's pjit); the state buffers are donated on
  accelerators (`update.state_donation` of the mesh's platform); traced under the mesh (attention
  kernels run per shard). `const_sh`: shardings of the step's trailing constant
  inputs (the anchor's reference parameters: `state_sh.params`); `options`: XLA compiler options
  (`compiler_options`)."""
  rep = sharding.replicated(mesh)
  return jax.jit(sharding.under_mesh(step_fn, mesh),
                 in_shardings=(state_sh, batch_sh, rep) + tuple(const_sh),
                 out_shardings=(state_sh, rep),
                 donate_argnums=update.state_donation(mesh.devices.flat[0].platform),
                 compiler_options=options or None)


# ----------------------------------------------------------------------------------------------
# Host-side batch layout


def sample_window(num_tokens: int, samples_per_row: int) -> int:
  """The window each T2I sample of a row gets (`t2i_layout(sample_stride=)`,
  `StepOptions.sample_window`): the row's slots split evenly over its samples; 0 (no windows) for
  one sample per row or a budget the samples do not divide."""
  S, N = int(samples_per_row), int(num_tokens)
  return N // S if S > 1 and N % S == 0 else 0


def t2i_layout(cfg: BagelConfig, prompts_ids: Sequence[Sequence[Sequence[int]]], *,
               image_hw: Tuple[int, int], num_tokens: int, text_capacity: int,
               grids: Optional[Sequence[Sequence[Tuple[int, int]]]] = None,
               sample_stride: int = 0) -> PackedInputs:
  """Packed layout for rows of T2I samples: [BOS + ids + EOS] then one noise image of `image_hw`
  pixels. `sample_stride` > 0: sample s of a row starts at slot s * sample_stride (`packing.pack`).

  `prompts_ids[b]` lists the (already BOS/EOS-wrapped) prompt ids of row b's samples; every row must
  hold the same number of samples S, and latent_capacity = S * h * w exactly (the loss relies on
  it). `grids[b][s]`: that sample's own latent grid (h_s, w_s) <= the canvas grid, for images
  smaller than `image_hw`: only its h_s * w_s tokens are packed (positions as BAGEL numbers an image
  of that grid), the rest of the capacity stays unused (`latent_sources` maps the slots to the
  canvas tokens).
  """
  h, w = image_hw[0] // cfg.latent_downsample, image_hw[1] // cfg.latent_downsample
  S = len(prompts_ids[0])
  if any(len(r) != S for r in prompts_ids):
    raise ValueError("every row needs the same number of samples")
  if grids is None:
    grids = [[(h, w)] * S for _ in prompts_ids]
  if any(not (0 < gh <= h and 0 < gw <= w) for row in grids for gh, gw in row):
    raise ValueError(f"sample latent grids {grids} must fit the canvas grid {(h, w)}")
  rows = [[[list(ids), bagel.ImageTokens("vae_noise", tuple(g))] for ids, g in zip(row, grow)]
          for row, grow in zip(prompts_ids, grids)]
  inputs, _ = bagel.build_packed_inputs(cfg, rows, num_tokens=num_tokens,
                                        text_capacity=text_capacity, latent_capacity=S * h * w,
                                        sample_stride=sample_stride)
  return inputs


def latent_sources(grids: Sequence[Sequence[Tuple[int, int]]], canvas_grid: Tuple[int, int]
                   ) -> np.ndarray:
  """`SrumBatch.latent_src` [B, S * hc * wc] int32 for rows of samples with latent grids
  `grids[b][s]` on a canvas grid (hc, wc): slot by slot (samples in order, each grid row-major, as
  `t2i_layout` packs them) the canvas token s * hc * wc + r * wc + c of the sample's token (r, c);
  -1 after the row's last token."""
  hc, wc = (int(v) for v in canvas_grid)
  S = len(grids[0])
  out = np.full((len(grids), S * hc * wc), -1, np.int32)
  for b, row in enumerate(grids):
    src = [s * hc * wc + r * wc + np.arange(int(gw))
           for s, (gh, gw) in enumerate(row) for r in range(int(gh))]
    flat = np.concatenate(src) if src else np.zeros((0,), np.int32)
    out[b, :flat.size] = flat
  return out
