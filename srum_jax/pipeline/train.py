"""The `train` stage: the imperative shell around `train_step` (data, checkpoints, logging, stops).

    summary = train(config, cfg=cfg, params=params, tokenizer=tok, records_path="records.jsonl",
                    images_root="images/", workdir="outputs/run")
    params = summary["params"]            # or later: final_params("outputs/run")

One jitted, sharded step (static shapes: the data pipeline packs every batch to the same budgets) is
called with the state, the batch and the base PRNG key; the step folds in `state.step`, so step i
always draws the same randomness and a resumed run reproduces the uninterrupted one bit for bit. The
hot loop never waits on the device except every `log_every` steps (metrics) and when saving. The
loop around the step is the shared one (`training.loop`): stop signal, checkpoints every
`save_every` steps and on stop / at the end, metrics, sample grids.

workdir layout: checkpoints/<step>/ (orbax: state, data-iterator state, meta; with LoRA the state
is the adapters' alone), data/ (validated ArrayRecord cache), metrics.jsonl + tb/ (the metrics
sink: JSONL rows, TensorBoard), samples/step_<step>.png (training images with reward overlays),
data_log.jsonl (per step: the record indices consumed; data_log.<process>.jsonl with several
processes), loss_curve.png, summary.json. The workdir may be remote (gs://, through etils.epath;
orbax writes checkpoints there directly): the data/ cache then lives in a local cache folder per
host (`paths.local_cache_dir`) and the logs follow the remote-log policy of `workdir.logs`. A
workdir holding checkpoints is resumed from its latest one. SIGTERM finishes the current step,
saves and returns with `preempted=True`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from srum_jax import distributed, files, paths, sharding, tokenizer as tok, viz
from srum_jax.convert import checkpoint
from srum_jax.data.prompt_sources import load_prompts, require_prompts
from srum_jax.engine import loaded_model
from srum_jax.errors import UserValueError
from srum_jax.models import autoencoder, lora as lora_lib, params as params_lib
from srum_jax.pipeline import train_data, train_records
from srum_jax.training import (checkpointing, loop, objective, optimizer, preemption,
                               train_step as ts, update)
from srum_jax.training.metrics_sink import MetricsSink
from srum_jax.training.preemption import PreemptionFlag
from srum_jax.workdir import logs

__all__ = ["OBJECTIVES", "step_options", "train", "final_params", "default_load_model", "main"]

OBJECTIVES = ("srum", "sft")  # `train.objective`: SRUM, or the SFT control on the same data

LOGGED = ("loss", "loss_reward", "loss_constraint", "reward_mean", "grad_norm", "lr", "skipped")


def logged_keys(config) -> tuple:
  """`LOGGED`, plus the anchor term's loss when the anchor is on (`srum.anchor_weight` > 0)."""
  return LOGGED + (("loss_anchor",) if float(config.srum.anchor_weight) > 0 else ())


def step_options(config, objective_name: Optional[str] = None,
                 platform: Optional[str] = None) -> ts.StepOptions:
  """StepOptions from `srum.*`, `train.*` and `model.*`; `objective_name` (default
  `train.objective`): "srum", or "sft" (the control: R == 1 and lambda = 0, plain flow matching on
  the same data; the anchor to the starting model, `srum.anchor_weight`, is part of the fine-tuning
  recipe and stays); `platform`: the one the attention is resolved for (default: JAX's backend)."""
  t, s, m = config.train, config.srum, config.model
  name = t.objective if objective_name is None else objective_name
  sft = name == "sft"
  levers = objective.RewardLevers(use_local=bool(s.use_local), use_global=bool(s.use_global),
                                  signed=bool(s.signed_rewards), uniform=sft)
  return ts.StepOptions(
      image_hw=tuple(int(v) for v in t.image_hw), samples_per_row=int(t.samples_per_row),
      lambda_constraint=0.0 if sft else float(s.lambda_constraint), levers=levers,
      timestep_shift=float(t.timestep_shift), text_cond_dropout=float(t.text_cond_dropout),
      sample_posterior=bool(t.sample_posterior), compute_dtype=jnp.dtype(m.compute_dtype),
      attn_impl=loaded_model.attn_impl(config, platform), remat=bool(m.remat),
      remat_policy=m.remat_policy or None, ema_decay=float(t.ema_decay),
      anchor_weight=float(s.anchor_weight),
      sample_window=ts.sample_window(t.num_tokens, t.samples_per_row))


def _to_device(tree, shardings, process_count: int):
  """Host batch -> global arrays: device_put (one process) or per-host pieces (several
  processes)."""
  if process_count == 1:
    return jax.device_put(tree, shardings)
  return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), tree,
                      shardings)


def _write_samples(path: str, hb: train_data.HostBatch, opts: ts.StepOptions, images_root: str,
                   resize=None) -> None:
  """Grid of a batch's training images with their reward maps (the loss's maps,
  `objective.reward_maps`); `resize`: the data's `DataSpec.resize` (images on their canvas)."""
  b = hb.batch
  H, W = opts.image_hw
  if b.images is not None:
    pixels = np.asarray(b.images).reshape(-1, H, W, 3)
  else:  # the batch carries stored moments: read the images back for the picture
    pixels = np.stack([_load_or_blank(os.path.join(images_root, f), (H, W), resize)
                       for f in hb.image_files])
  images = viz.to_uint8(pixels)
  r = jax.tree.map(lambda a: np.asarray(a).reshape((images.shape[0],) + np.shape(a)[2:]), b.rewards)
  maps = np.asarray(objective.reward_maps(r, image_hw=(H, W), levers=opts.levers))
  shown = r.valid & opts.levers.use_local
  tiles = [
      viz.overlay_reward_map(images[i], maps[i], boxes=r.boxes[i][shown[i]],
                             scores=r.scores[i][shown[i]], signed=opts.levers.signed)
      for i in range(images.shape[0])
  ]
  idx = np.asarray(hb.indices).reshape(-1)
  captions = [
      f"#{idx[i]} g={r.global_scores[i]:+.2f} {hb.prompts[i]}" for i in range(images.shape[0])
  ]
  ncols = max(1, int(np.ceil(np.sqrt(images.shape[0]))))
  files.save_png(path, viz.image_grid(np.stack(tiles), ncols=ncols, pad=2, captions=captions))


def _load_or_blank(path: str, image_hw, resize=None) -> np.ndarray:
  try:
    if resize is not None:
      return train_data.load_canvas(path, image_hw, resize)[0]
    return train_data.load_image(path, image_hw)[0]
  except Exception:  # a picture is not worth a crash; the tile stays grey
    return np.zeros(tuple(image_hw) + (3,), np.float32)


def train(config, *, cfg, params, tokenizer, records_path: str, images_root: str, workdir: str,
          mesh=None, max_steps: Optional[int] = None,
          step_hook: Optional[Callable[[int], None]] = None, objective_name: Optional[str] = None,
          stop: Optional[PreemptionFlag] = None) -> Dict[str, Any]:
  """Run (or resume) SRUM post-training to `max_steps` (default `config.train.steps`); returns a
  summary.

  params: {'bagel', 'ae'} trees (NumPy or jax arrays; placed onto the mesh here). tokenizer: any
  object with `encode(str) -> list[int]`. step_hook(step) runs on the host after every step (tests,
  custom monitoring; it must not block for long). objective_name: see `step_options`. stop: a
  `PreemptionFlag` to poll (default: one installed here for SIGTERM / SIGINT). The summary holds
  steps, final_loss, skipped (non-finite updates), data (the DataReport as a dict), preempted,
  resumed_from, the final `state` and `params` (the EMA of the weights when `train.ema_decay` > 0,
  as BAGEL releases its EMA) and the `cfg` they belong to.

  LoRA (`model.lora.rank` > 0; `_with_lora`): only the adapters train (in `model.lora.dtype`; the
  frozen base in `model.param_dtype`), and the checkpoints hold the adapters, their optimizer state
  and EMA only: a resume takes the frozen base from `params` (the same model, or it is not the same
  training).
  """
  with preemption.flag_or_installed(stop) as flag:
    return _train(flag, config, cfg=cfg, params=params, tokenizer=tokenizer,
                  records_path=records_path, images_root=images_root, workdir=workdir, mesh=mesh,
                  max_steps=max_steps, step_hook=step_hook, opts=step_options(
                      config, objective_name))


def train_mesh(config):
  """Training's mesh: every device of every process, shaped by `config.mesh` for `train.batch_size`
  rows (a shape these devices cannot take is a `UserError` naming the key)."""
  try:
    return sharding.mesh_from_config(config.mesh, batch_rows=int(config.train.batch_size))
  except ValueError as e:
    raise UserValueError(
        f"config key mesh={dict(config.mesh)}: {e} ({jax.device_count()} devices in all)") from None


def batch_layout(config, mesh) -> Dict[str, int]:
  """{'batch_ways', 'microbatches'} of `train.batch_size` global rows on `mesh`: rows split over its
  data x fsdp axes, then each shard's rows over microbatches of `train.microbatch_rows` (0: one
  microbatch)."""
  t = config.train
  ways = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  rows = int(t.batch_size)
  if rows % ways:
    raise ValueError(
        f"train.batch_size={rows} rows must divide over the mesh batch axes (data x fsdp = "
        f"{ways}); "
        f"mesh {dict(mesh.shape)} (mesh.tensor = 0 derives a tensor axis that makes them divide)")
  per_shard, micro = rows // ways, int(t.microbatch_rows) or rows // ways
  if per_shard % micro:
    raise ValueError(
        f"train.microbatch_rows={micro} does not divide the {per_shard} rows of each batch shard")
  return {"batch_ways": ways, "microbatches": per_shard // micro}


# `train.vae_moments`: encoded once as data preparation, or in the step
VAE_MOMENTS = ("cached", "step")
# fresh adapters' key: fold_in(key(seed), this); step i folds in i (< this), so no step shares it
ADAPTER_INIT_STREAM = 0x4C6F5241


def _host_tree(tree):
  """A parameter tree as NumPy on this host (pieces of arrays spread over several processes
  gathered)."""

  def host(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(host, tree)


def moments_encoder(params_encoder, cfg, batch_size: int, dtype):
  """(encode, encoder_id) for `train_data.prepare_moments`: the frozen VAE encoder jitted once over
  this process's devices (weights replicated, images split over them; batches padded to a multiple
  of the device count), returning moments in `dtype`; encoder_id is a content hash of the encoder
  weights."""
  host = _host_tree(params_encoder)
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]:
    h.update(f"{jax.tree_util.keystr(path)}\0{leaf.dtype}\0{leaf.shape}\n".encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  devices = jax.local_devices()
  mesh = Mesh(np.array(devices), ("batch",))
  rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
  weights = jax.device_put(host, rep)
  rows = -(-int(batch_size) // len(devices)) * len(devices)
  fn = jax.jit(lambda p, x: autoencoder.encoder(p, x, cfg.ae).astype(dtype),
               in_shardings=(rep, split), out_shardings=split)

  def encode(images: np.ndarray) -> np.ndarray:
    n = images.shape[0]
    padded = np.zeros((rows,) + images.shape[1:], np.float32)
    padded[:n] = images
    return np.asarray(fn(weights, jax.device_put(padded, split)))[:n]
  return encode, h.hexdigest()[:12]


def _anchor_ids(config, cfg, tokenizer, spec):
  """The anchor prompts' wrapped ids (`prompts.anchor`), or None when the anchor is off."""
  if not float(config.srum.anchor_weight) > 0:
    return None
  items = load_prompts(config.prompts.anchor, "prompts.anchor")
  require_prompts(items, "prompts.anchor")
  return anchor_prompt_ids([it.prompt for it in items], cfg, spec, tokenizer)


def anchor_prompt_ids(prompts, cfg, spec: train_data.DataSpec, tokenizer) -> List[List[int]]:
  """[BOS] + ids + [EOS] of each anchor prompt, cut to the per-sample text budget (as the records'
  prompts)."""
  n = train_data.text_budget(cfg, spec)
  bos, eos = int(cfg.tokens.bos), int(cfg.tokens.eos)
  return [[bos] + [int(i) for i in tokenizer.encode(p)][:n] + [eos] for p in prompts]


def _data_pipeline(config, cfg, tokenizer, records_path: str, images_root: str, workdir: str,
                   params_ae=None):
  """Validate the records once per input, encode their images' posterior moments once
  (`train.vae_moments` = cached; needs `params_ae`), then this host's grain iterator (with the
  anchor prompts when `srum.anchor_weight` > 0); returns (iterator, DataReport)."""
  t, pid, pcount = config.train, jax.process_index(), jax.process_count()
  spec = train_data.spec_from_config(config, pcount)
  ar_path, report = train_records.prepare_records(
      records_path, images_root, os.path.join(workdir, "data"), max_regions=spec.max_regions,
      drop_zero_global=bool(config.srum.drop_zero_global), threads=int(
          t.data_threads), records_format=str(t.records_format))
  if report.kept == 0:  # the records or `train.images_root` are wrong: the user's to fix, one line
    raise UserValueError(
        f"no usable training records in {records_path} (images under "
        f"{images_root or 'the records folder'}; set train.records / train.images_root): "
        f"{report.summary()}")
  moments = None
  # on a remote workdir there is no shared file system for the per-process moments parts: every host
  # encodes
  # every record into its own local cache (a one-off encoder pass per round; the step's batches are
  # unchanged)
  mpid, mpcount = (0, 1) if paths.is_remote(workdir) else (pid, pcount)
  if t.vae_moments == "cached":
    master = jnp.dtype(config.model.param_dtype)  # the dtype the step would run the encoder in
    encode, encoder_id = moments_encoder(
        jax.tree.map(lambda x: x.astype(master), params_ae["encoder"]), cfg, int(t.encode_batch),
        jnp.dtype(t.moments_dtype))
    moments = train_data.prepare_moments(
        ar_path, images_root, spec.image_hw, encode, encoder_id=encoder_id, dtype=str(
            t.moments_dtype), batch_size=int(t.encode_batch), process_index=mpid,
        process_count=mpcount, threads=int(t.data_threads), resize=spec.resize)
    distributed.barrier("train_moments")
  ds = train_data.make_dataset(ar_path, images_root, spec, cfg=cfg, tokenizer=tokenizer, seed=int(
      config.seed), process_index=pid, process_count=pcount, read_threads=int(t.data_threads),
                               workers=int(t.data_workers), report=report, moments=moments,
                               anchor_ids=_anchor_ids(config, cfg, tokenizer, spec))
  return iter(ds), report


def _init_on(init, params, state_sh, stored, complete):
  """`init(params)` on the state shardings `state_sh` (a fresh start), built as what a checkpoint
  stores (`stored`), then `complete`d: with LoRA the jitted init makes the adapters' state only and
  the frozen base is the placed `params` themselves (one bf16 7B base in memory, not two)."""
  placed = jax.device_put(params, state_sh.params)
  return complete(jax.jit(lambda p: stored(init(p)), out_shardings=stored(state_sh))(placed))


def _loop(config, total: int, stop, t0: float, ckpt, sink, *, key_data, it, report, last: dict,
          hooks, stored, complete) -> loop.TrainLoop:
  """The shared loop with this stage's cadences: checkpoints every `save_every` steps (and on stop,
  at the end) of `stored(state)` with the data iterator and the last loss; `LOGGED` means every
  `log_every` steps."""
  t, main = config.train, jax.process_index() == 0
  schedule = optimizer.lr_schedule(t, total)

  def final_loss(info) -> Optional[float]:
    """The last step's loss (this invocation's, else the one saved with the checkpoint resumed)."""
    return last["final_loss"] if info is None else float(jax.device_get(info.metrics["loss"]))

  def meta(info):
    return {"report": report.to_dict(), "final_loss": final_loss(info)}

  def extra(info):  # the update's learning rate; the skipped updates so far
    return {"lr": float(schedule(info.step - 1)),
            "skipped": int(jax.device_get(info.state.skipped))}

  checkpoints = loop.Checkpoints(ckpt, every=loop.Every(steps=int(t.save_every)), meta=meta,
                                 key_data=key_data, data=it, stored=stored, complete=complete)
  metrics = loop.LogMetrics(sink, "train", loop.Every(steps=int(t.log_every), last=True), mean=True,
                            keys=logged_keys(config), extra=extra,
                            postfix=lambda v: {"loss": f"{v['loss']:.4g}", "skipped": v["skipped"]})
  return loop.TrainLoop("train", total, stop=stop, t0=t0, main=main, hooks=hooks,
                        checkpoints=checkpoints, metrics=metrics)


def _hooks(config, workdir: str, images_root: str, opts, last: dict, step_hook) -> list:
  """Sample grids every `sample_every` steps (process 0), then the caller's `step_hook(step)`."""
  hooks, every = [], int(config.train.sample_every)
  if jax.process_index() == 0 and every > 0:
    hooks.append(loop.Hook(lambda info: _write_samples(
        os.path.join(workdir, "samples", f"step_{info.step:06d}.png"), last["batch"], opts,
        images_root, train_data.resize_of(config)), loop.Every(steps=every)))
  if step_hook is not None:
    hooks.append(loop.Hook(lambda info: step_hook(info.step)))
  return hooks


def _train(stop: PreemptionFlag, config, *, cfg, params, tokenizer, records_path, images_root,
           workdir, mesh, max_steps, step_hook, opts: ts.StepOptions) -> Dict[str, Any]:
  t0, t = time.time(), config.train
  workdir = paths.abspath(workdir)  # a remote workdir (gs://) stays as it is
  paths.path(workdir).mkdir(parents=True, exist_ok=True)
  pcount = jax.process_count()
  mesh = train_mesh(config) if mesh is None else mesh
  rules = sharding.rules_from_config(config.sharding_rules)
  opts = dataclasses.replace(opts, **batch_layout(config, mesh))
  total = int(t.steps if max_steps is None else max_steps)
  it, report = _data_pipeline(config, cfg, tokenizer, records_path, images_root, workdir,
                              params["ae"])
  cfg, params, lora = _with_lora(config, cfg, params)
  labels = optimizer.param_labels(params, tuple(t.freeze), adapters_only=lora)
  tx = optimizer.make_optimizer(t, labels, total_steps=total)
  # the trained copy: model.param_dtype (e.g. fp32 masters of bf16; LoRA: the frozen base), the
  # adapters in model.lora.dtype (their fp32 masters beside a bf16 base)
  cast = functools.partial(params_lib.cast_params, dtype=jnp.dtype(config.model.param_dtype),
                           adapter_dtype=jnp.dtype(config.model.lora.dtype))
  init = lambda p: update.init_state(cast(p), tx, opts.ema_decay, labels)  # noqa: E731
  abstract = jax.eval_shape(init, params)
  state_sh = ts.state_shardings(cfg, abstract, mesh, rules)
  # LoRA checkpoints hold the trainable state (adapters, their optimizer state and EMA); the frozen
  # base comes from `params` (placed, not copied), on a fresh start as on a restore
  frozen = [params]  # emptied once the state is made: training holds no other copy

  def stored(state):
    return update.trainable_state(state, labels) if lora else state

  def complete(part):
    return update.with_frozen(part, cast(jax.device_put(frozen[0], state_sh.params)),
                              labels) if lora else part
  key_data = jax.device_put(jax.random.key_data(jax.random.key(int(config.seed))),
                            sharding.replicated(mesh))
  step_fn = ts.make_train_step(cfg, opts, tx, labels)
  # the anchor's reference: the model training started from (a resumed run is given the same model
  # again)
  consts = (jax.device_put(params, state_sh.params),) if opts.anchor_weight > 0 else ()
  last = {"batch": None, "final_loss": None}  # the step's host batch; the loss resumed from
  compiled = {}

  def advance(state, index: int):
    """Step `index`: the next host batch (its record indices to the data log), the jitted step."""
    hb = last["batch"] = next(it)
    data_log.append({"step": index, "indices": np.asarray(hb.indices).reshape(-1).tolist()})
    report.truncated_prompts += hb.truncated
    if not compiled:
      batch_sh = ts.batch_shardings(hb.batch, mesh, rules)
      options = ts.compiler_options(mesh.devices.flat[0].platform, bool(t.tpu_collective_matmul))
      compiled.update(batch_sh=batch_sh, step=ts.shard_train_step(
          lambda s, b, k, *c: step_fn(s, b, jax.random.fold_in(k, s.step), *c), state_sh, batch_sh,
          mesh, (state_sh.params,) * len(consts), options))
    return compiled["step"](state, _to_device(hb.batch, compiled["batch_sh"], pcount), base_key,
                            *consts)

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    max_to_keep=int(t.keep_checkpoints))
  with ckpt, MetricsSink(workdir, "metrics.jsonl", main=jax.process_index() == 0) as sink, \
      logs.BufferedLog(logs.process_log(workdir, "data_log")) as data_log:
    trainer = _loop(config, total, stop, t0, ckpt, sink, key_data=key_data, it=it, report=report,
                    last=last, hooks=_hooks(config, workdir, images_root, opts, last, step_hook),
                    stored=stored, complete=complete)
    restored = trainer.restore_or_init(
        checkpointing.abstract_with_shardings(stored(abstract), stored(state_sh)),
        functools.partial(_init_on, init, params, state_sh, stored, complete))
    del params
    frozen.clear()
    last["final_loss"] = restored.meta.get("final_loss")
    base_key = jax.random.wrap_key_data(restored.key_data)
    result = trainer.run(restored.state, advance, start=int(jax.device_get(restored.state.step)))
  if result.metrics is not None:
    last["final_loss"] = float(jax.device_get(result.metrics["loss"]))
  summary = _summary(workdir, result, sink.history, report, resumed_from=restored.step, total=total,
                     seconds=time.time() - t0, final_loss=last["final_loss"],
                     given_up=restored.given_up,
                     compiles=compiled["step"]._cache_size() if compiled else 0)
  return dict(summary, cfg=cfg)


def _with_lora(config, cfg, params):
  """(cfg, params, LoRA on?) that training starts from under `model.lora` (`lora.for_training`):
  fresh adapters (from `seed`) on a model without them, the model's own when they match, the merged
  model for a full fine-tune of a model with adapters."""
  lora = lora_lib.lora_config(config.model.lora)
  key = jax.random.fold_in(jax.random.key(int(config.seed)), ADAPTER_INIT_STREAM)
  try:
    cfg, params = lora_lib.for_training(cfg, params, lora, key, jnp.dtype(config.model.lora.dtype))
  except ValueError as e:
    raise UserValueError(f"config key model.lora={config.model.lora.to_dict()}: {e}; set "
                         "model.lora to match the model's adapters, or merge them first (export "
                         "--adapters merge)") from None
  return cfg, params, lora is not None


def _summary(workdir: str, result: loop.LoopResult, history: dict, report, *, resumed_from,
             total: int, seconds: float, compiles: int, final_loss: Optional[float],
             given_up: list) -> Dict[str, Any]:
  """The summary of the whole training so far: `final_loss` and `seconds` are the training's as its
  latest checkpoint records them (a resume with nothing left to do keeps them);
  `seconds_this_invocation` is this call's."""
  is_main, state, step = jax.process_index() == 0, result.state, result.step
  if is_main and history.get("train/loss"):
    curves = ("loss", "loss_reward", "loss_constraint", "loss_anchor")
    viz.loss_curve_png({k: history[f"train/{k}"] for k in curves if history.get(f"train/{k}")},
                       os.path.join(workdir, "loss_curve.png"), title="SRUM training loss")
  skipped = int(jax.device_get(state.skipped))
  summary = {"steps": step, "final_loss": final_loss, "skipped": skipped,
             "preempted": result.preempted, "resumed_from": resumed_from, "data": report.to_dict(),
             "seconds": result.seconds, "seconds_this_invocation": seconds, "compiles": compiles,
             "checkpoints_given_up": [list(g) for g in given_up],
             "checkpoint": os.path.join(workdir, "checkpoints")}
  if is_main:
    paths.write_bytes(os.path.join(workdir, "summary.json"),
                      json.dumps(summary, indent=1).encode("utf-8"))
    loss = "n/a" if final_loss is None else f"{final_loss:.5g}"
    how = "preempted at" if result.preempted else "done,"
    print(f"train: {how} step {step}/{total}; final loss "
          f"{loss}; skipped non-finite updates {skipped}; data: {report.summary()}", flush=True)
  return dict(summary, state=state, params=update.ema_params(state))


def final_params(workdir: str, step: Optional[int] = None, abstract_params=None):
  """The trained {'bagel', 'ae'} parameters from `workdir`'s latest (or `step`'s) checkpoint (LoRA:
  the adapters alone; the base is the model trained from)."""
  return checkpointing.restore_params(os.path.join(paths.abspath(workdir), "checkpoints"), step,
                                      abstract_params)


def default_load_model(config, model_dir: str):
  """(cfg, params, tokenizer) from a converted model directory (or an adapters-only one: base +
  adapters), placed on the config's mesh in `model.param_dtype` (adapters in `model.lora.dtype`)."""
  rules = sharding.rules_from_config(config.sharding_rules)
  cfg, params = checkpoint.load_model_dir(model_dir, mesh=train_mesh(config), rules=rules,
                                          dtype=config.model.param_dtype,
                                          adapter_dtype=config.model.lora.dtype)
  tokenizer = tok.load_tokenizer(model_dir)
  tokenizer.check(cfg.tokens)
  return cfg, params, tokenizer


def main(config, *, model_dir: str, records: str, images_root: str, workdir: str,
         load_model: Callable = default_load_model) -> Dict[str, Any]:
  """The standalone stage: load the model, train on `records` (images under `images_root`) in
  `workdir`, and write the trained model dir `<workdir>/model` (unless preempted: rerun to resume);
  with LoRA an adapters-only dir over the base (`checkpoint.write_trained_dir`)."""
  distributed.maybe_initialize()
  cfg, params, tokenizer = load_model(config, model_dir)
  summary = train(config, cfg=cfg, params=params, tokenizer=tokenizer, records_path=records,
                  images_root=images_root, workdir=workdir)
  if not summary["preempted"]:
    summary["model_dir"] = checkpoint.write_trained_dir(
        os.path.join(workdir, "model"), summary["cfg"], summary["params"], model_dir)
    print(
        f"train: model dir {summary['model_dir']} (python -m srum_jax export --src "
        f"{summary['model_dir']} "
        f"--dst <official dir>)", flush=True)
  return summary
