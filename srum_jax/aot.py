"""The programs of a config, built on abstract values for ahead-of-time lowering and compiling.

Nothing is allocated: parameters, optimizer state, caches and batches are ShapeDtypeStructs carrying
the shardings a real run would use, on any device list (simulated CPU devices, or the abstract TPU
devices of `jax.experimental.topologies`). What a benchmark or a test lowers is exactly what `run`
executes:

    prog = train_step_program(config, devices)   # the SRUM step of `pipeline.train` on config.mesh
    compiled = prog.jitted.lower(*prog.args).compile()
    prog = sampler_step_program(config, devices)  # one Euler step with CFG on config.inference_mesh
    prog = prefill_program(config, devices)       # the prompt's prefill into a context
    # the judge: ViT image + prompt prefill, then score logits
    prog = judge_program(config, devices)

Inference programs use one process's worth of devices (`local_devices`: the inference mesh of a
host). `model.attn_impl` is resolved for the devices' platform (`auto` on TPU devices: splash, even
when this machine's backend is the CPU), and every program is traced under its mesh (the attention
kernels run per shard).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from srum_jax import sharding
from srum_jax.inference import context, decoding, sampling
from srum_jax.models import attention, lora as lora_lib, params as params_lib
from srum_jax.models.config import BagelConfig, get_preset, with_lora
from srum_jax.pipeline import train as train_stage
from srum_jax.training import objective, optimizer, train_step, update

__all__ = [
    "Program", "train_step_program", "sampler_step_program", "prefill_program", "judge_program",
    "model_config"
]


@dataclasses.dataclass
class Program:
  """A jitted function, the abstract arguments to lower it with, its mesh, and a few facts for
  reports."""
  name: str
  jitted: Any
  args: Tuple
  mesh: Any
  info: Dict[str, Any]


def model_config(config, cfg: Optional[BagelConfig] = None) -> BagelConfig:
  """The preset `model.preset` with the adapters `model.lora` asks for (rank 0: none), or `cfg` when
  given (benchmarks compile cut-down variants, e.g. fewer layers)."""
  if cfg is not None:
    return cfg
  return with_lora(get_preset(config.model.preset), lora_lib.lora_config(config.model.lora))


def attn_impl(config, devices: Sequence) -> str:
  """`model.attn_impl` resolved for the platform of `devices` (not this machine's backend)."""
  return attention.resolve_impl(str(config.model.attn_impl), list(devices)[0].platform)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree,
                      shardings)


def _params(cfg: BagelConfig, mesh, rules, dtype):
  schema = params_lib.model_schema(cfg)
  return _abstract(
      params_lib.abstract_params(schema, jnp.dtype(dtype)),
      sharding.schema_shardings(schema, mesh, rules))


def _rows(mesh, ndim: int, axis: int = 0, extra: Dict[int, str] = None) -> NamedSharding:
  """Rows (dim `axis`) over the mesh's batch axes; `extra` maps other dims to mesh axes."""
  spec = [None] * ndim
  spec[axis] = ("data", "fsdp")
  for dim, name in (extra or {}).items():
    spec[dim] = name
  return NamedSharding(mesh, PartitionSpec(*spec))


def _fit(s: NamedSharding, shape) -> NamedSharding:
  return NamedSharding(s.mesh, sharding._fit(s.spec, tuple(shape), s.mesh))


def _context(cfg: BagelConfig, rows: int, length: int, dtype, mesh):
  """An abstract inference context: rows over the batch axes, the cache's kv heads over 'tensor'."""
  ctx = jax.eval_shape(lambda: context.init_context(cfg, rows, length, dtype))

  def place(path, x):
    names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
    if names[-1] in ("k", "v"):  # [L, B, T, Hkv, d]
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_fit(
          _rows(mesh, 5, 1, {3: "tensor"}), x.shape))
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_fit(_rows(mesh, x.ndim), x.shape))

  return jax.tree_util.tree_map_with_path(place, ctx)


def _local_mesh(config, devices: Sequence):
  """The inference mesh over the first process's devices (one host)."""
  local = [
      d for d in devices
      if getattr(d, "process_index", 0) == getattr(devices[0], "process_index", 0)
  ]
  return sharding.make_mesh(dict(config.inference_mesh), local)


# --------------------------------------------------------------------------------------------------
# Training


def _abstract_batch(cfg: BagelConfig, config, rows: int, mesh, rules):
  t = config.train
  H, W = (int(v) for v in t.image_hw)
  S = int(t.samples_per_row)
  # prompt ids that fit next to BOS/EOS and the image markers
  per_sample = int(t.text_capacity) // S - 4
  ids = [[[cfg.tokens.bos] + [7] * per_sample + [cfg.tokens.eos] for _ in range(S)]]
  inputs = train_step.t2i_layout(cfg, ids, image_hw=(H, W), num_tokens=int(t.num_tokens),
                                 text_capacity=int(t.text_capacity),
                                 sample_stride=train_step.sample_window(t.num_tokens, S))
  K = int(t.max_regions)
  f32 = np.float32
  # the batch carries the stored posterior moments, not the images
  cached = t.vae_moments == "cached"
  # the encoder's grid (before latent patching)
  h, w = H // cfg.ae.downsample, W // cfg.ae.downsample
  host = train_step.SrumBatch(
      inputs=jax.tree.map(lambda x: np.zeros((rows,) + np.shape(x)[1:],
                                             np.asarray(x).dtype), inputs),
      images=None if cached else np.zeros((rows, S, H, W, 3), f32),
      moments=np.zeros(
          (rows, S, h, w, 2 * cfg.ae.z_channels), jnp.dtype(t.moments_dtype)) if cached else None,
      rewards=objective.RegionRewards(
          np.zeros((rows, S, K, 4), f32), np.zeros((rows, S, K), f32), np.zeros((rows, S, K), bool),
          np.zeros((rows, S), f32)),
      # images of their own aspect on the canvas (`train.image_resize` official): slot -> canvas
      # token
      latent_src=(np.zeros(
          (rows, S * (H // cfg.latent_downsample) *
           (W // cfg.latent_downsample)), np.int32) if t.image_resize == "official" else None))
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
  return _abstract(shapes, train_step.batch_shardings(host, mesh, rules))


def train_step_program(config, devices: Sequence, cfg: Optional[BagelConfig] = None) -> Program:
  """The SRUM train step exactly as `pipeline.train` builds it for `config` on these devices (`cfg`:
  another model config than the preset's, e.g. fewer layers)."""
  cfg, t = model_config(config, cfg), config.train
  rows = int(t.batch_size)
  mesh = sharding.mesh_from_config(config.mesh, list(devices), batch_rows=rows)
  rules = sharding.rules_from_config(config.sharding_rules)
  layout = train_stage.batch_layout(config, mesh)
  opts = dataclasses.replace(
      train_stage.step_options(config, platform=list(devices)[0].platform), **layout)
  lora = cfg.llm.lora
  params = params_lib.abstract_params(
      params_lib.model_schema(cfg), jnp.dtype(config.model.param_dtype),
      jnp.dtype(config.model.lora.dtype))
  labels = optimizer.param_labels(params, tuple(t.freeze), adapters_only=lora is not None)
  tx = optimizer.make_optimizer(t, labels, total_steps=int(t.steps))
  abstract_state = jax.eval_shape(lambda p: update.init_state(p, tx, opts.ema_decay, labels),
                                  params)
  state_sh = train_step.state_shardings(cfg, abstract_state, mesh, rules)
  batch = _abstract_batch(cfg, config, rows, mesh, rules)
  options = train_step.compiler_options(list(devices)[0].platform, bool(t.tpu_collective_matmul))
  step = train_step.shard_train_step(train_step.make_train_step(cfg, opts, tx, labels), state_sh,
                                     jax.tree.map(lambda x: x.sharding, batch), mesh,
                                     options=options)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  trainable = update.trainable_part(params, labels)
  info = dict(
      mesh=dict(mesh.shape), rows=rows, samples_per_row=int(t.samples_per_row), **layout,
      attn_impl=opts.attn_impl, params=params_lib.count_params(params),
      trainable=params_lib.count_params(trainable), param_dtype=str(config.model.param_dtype),
      remat=opts.remat, remat_policy=opts.remat_policy, xla_options=options,
      lora=None if lora is None else dict(rank=lora.rank, alpha=lora.alpha, experts=list(
          lora.experts), dtype=str(config.model.lora.dtype)))
  return Program("train_step", step, (_abstract(abstract_state, state_sh), batch, key), mesh, info)


# --------------------------------------------------------------------------------------------------
# Inference


def _inference_setup(config, devices, cfg: Optional[BagelConfig] = None):
  cfg = model_config(config, cfg)
  mesh = _local_mesh(config, devices)
  rules = sharding.rules_from_config(config.sharding_rules)
  dtype = config.model.inference_dtype or config.model.param_dtype
  return cfg, mesh, _params(cfg, mesh, rules, dtype), jnp.dtype(config.model.compute_dtype)


def _context_length(config, cfg: BagelConfig) -> int:
  """Cache slots of a generation context: system prompt + prompt (+ the plan in think mode),
  bucketed as `sampling.text_to_image` does (a 256-token system prompt and `generate.text_budget` or
  128 prompt tokens)."""
  g = config.generate
  think = context.bucket(int(g.max_think_tokens) + 2) if g.think else 0
  return context.bucket(256 + (int(g.text_budget) or 128) + think)


def sampler_step_program(config, devices: Sequence, cfg: Optional[BagelConfig] = None,
                         guided: bool = False) -> Program:
  """One Euler step of `sampling` at `generate.height` x `generate.width` with the configured CFG,
  over the generation batch (`generate.batch_size` rows per host). `guided`: the step inside
  `cfg_interval` only (the guided branch of `sampling.guided_velocity`'s cond, without the cond: one
  program per step kind)."""
  cfg, mesh, params, dtype = _inference_setup(config, devices, cfg)
  g = config.generate
  rows = int(g.batch_size)
  attn = attn_impl(config, devices)
  grid = sampling.latent_grid(int(g.height), int(g.width), cfg)
  n = sampling._branches(float(g.cfg_text_scale), float(g.cfg_img_scale))
  length = _context_length(config, cfg)
  contexts = tuple(_context(cfg, rows, length, dtype, mesh) for _ in range(n))
  x = jax.ShapeDtypeStruct((rows, grid[0] * grid[1], cfg.patch_latent_dim), jnp.float32,
                           sharding=_fit(_rows(mesh, 3), (rows, 1, 1)))
  t = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))

  scales = dict(cfg_text_scale=float(g.cfg_text_scale), cfg_img_scale=float(g.cfg_img_scale))
  renorm = dict(cfg_renorm_type=str(g.cfg_renorm_type), cfg_renorm_min=float(g.cfg_renorm_min))

  def step(params, contexts, x, t):
    if guided:
      vs = sampling.branch_velocities(params["bagel"], contexts[:n], x, t, cfg=cfg, grid=grid,
                                      attn_impl=attn)
      v = sampling.cfg_combine(vs[0], vs[1] if n > 1 else None, vs[2] if n > 2 else None, **scales,
                               **renorm)
    else:
      v = sampling.guided_velocity(params["bagel"], contexts, x, t, cfg=cfg, grid=grid, **scales,
                                   cfg_interval=tuple(g.cfg_interval), **renorm, attn_impl=attn)
    return x - v * 0.02

  info = dict(mesh=dict(mesh.shape), rows=rows, branches=n, image=f"{g.height}x{g.width}",
              latent_tokens=grid[0] * grid[1], context_slots=length, attn_impl=attn)
  return Program("sampler_step", jax.jit(sharding.under_mesh(step, mesh)), (params, contexts, x, t),
                 mesh, info)


def prefill_program(config, devices: Sequence, cfg: Optional[BagelConfig] = None) -> Program:
  """The prompt's prefill (`context.prefill_text`) into an empty generation context."""
  cfg, mesh, params, dtype = _inference_setup(config, devices, cfg)
  rows, length = int(config.generate.batch_size), _context_length(config, cfg)
  ids_len = int(config.generate.text_budget) or 128
  ctx = _context(cfg, rows, length, dtype, mesh)
  ids = jax.ShapeDtypeStruct((rows, ids_len), jnp.int32, sharding=_fit(_rows(mesh, 2), (rows, 1)))
  lens = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=_fit(_rows(mesh, 1), (rows,)))
  attn = attn_impl(config, devices)
  fn = jax.jit(
      sharding.under_mesh(
          lambda p, c, i, n: context.prefill_text(p["bagel"], c, i, n, cfg=cfg, attn_impl=attn),
          mesh))
  return Program(
      "prefill", fn, (params, ctx, ids, lens), mesh,
      dict(
          mesh=dict(mesh.shape), rows=rows, prompt_tokens=ids_len, context_slots=length,
          attn_impl=attn))


def judge_program(config, devices: Sequence, cfg: Optional[BagelConfig] = None, *,
                  prompt_tokens: int = 512) -> Program:
  """The judge's forward: a ViT image at the official transform's largest size and a region prompt
  prefilled into a context, then the logits after the answer prefix ("Score:" etc.)."""
  cfg, mesh, params, dtype = _inference_setup(config, devices, cfg)
  rows = int(config.score.batch_size)
  side = cfg.vit_max_num_patch_per_side
  patches = side * side
  length = context.bucket(patches + 2 + prompt_tokens + 16)
  ctx = _context(cfg, rows, length, dtype, mesh)
  arg = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=_fit(
      _rows(mesh, len(shape)), shape))  # noqa
  attn = attn_impl(config, devices)

  def forward(p, c, patch, grid, ids, lens, pre_ids, pre_lens):
    c = context.prefill_vit_image(p["bagel"], c, patch, grid, cfg=cfg, attn_impl=attn)
    c = context.prefill_text(p["bagel"], c, ids, lens, cfg=cfg, attn_impl=attn)
    return decoding._prefix_logits(p["bagel"], c, pre_ids, pre_lens, cfg=cfg, attn_impl=attn)

  args = (params, ctx, arg(
      (rows, patches, cfg.vit.patch_dim), jnp.float32), arg(
          (rows, 2), jnp.int32), arg((rows, prompt_tokens), jnp.int32), arg(
              (rows,), jnp.int32), arg((rows, 16), jnp.int32), arg((rows,), jnp.int32))
  info = dict(
      mesh=dict(mesh.shape), rows=rows, vit_patches=patches, prompt_tokens=prompt_tokens,
      context_slots=length, attn_impl=attn)
  return Program("judge", jax.jit(sharding.under_mesh(forward, mesh)), args, mesh, info)
