"""The `train` stage: the imperative shell around `train_step` (data, checkpoints, logging, preemption).

    summary = train(config, cfg=cfg, params=params, tokenizer=tok, records_path="records.jsonl",
                    images_root="images/", workdir="outputs/run")
    params = summary["params"]            # or later: final_params("outputs/run")

One jitted, sharded step (static shapes: the data pipeline packs every batch to the same budgets) is
called with the state, the batch and the base PRNG key; the step folds in `state.step`, so step i always
draws the same randomness and a resumed run reproduces the uninterrupted one bit for bit. The hot loop
never waits on the device except every `log_every` steps (metrics) and when saving.

workdir layout: checkpoints/<step>/ (orbax: state, data-iterator state, meta), data/ (validated
ArrayRecord cache), tb/ (TensorBoard), samples/step_<step>.png (training images with reward overlays),
data_log.jsonl (per step: the record indices consumed), loss_curve.png, summary.json. The workdir may be
remote (gs://, through etils.epath; orbax writes checkpoints there directly): the data/ cache then lives in a
local cache folder per host (`paths.local_cache_dir`) and the data log is written as objects (`_open_data_log`).
A workdir holding checkpoints is resumed from its latest one. SIGTERM finishes the current step, saves
and returns with `preempted=True`. The optimizer, the guarded update, the preemption flag and the
checkpoints are the shared training core (`srum_jax.training`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tensorboardX import SummaryWriter

from srum_jax import distributed, files, paths, progress, sharding, tokenizer as tok, viz
from srum_jax.convert import checkpoint
from srum_jax.data.prompt_sources import load_prompts, require_prompts
from srum_jax.engine import loaded_model
from srum_jax.errors import UserValueError
from srum_jax.models import autoencoder
from srum_jax.pipeline import train_data
from srum_jax.training import checkpointing, objective, optimizer, train_step as ts, update
from srum_jax.training.preemption import PreemptionFlag

__all__ = ["OBJECTIVES", "step_options", "train", "final_params", "default_load_model", "main"]

OBJECTIVES = ("srum", "sft")  # `train.objective`: SRUM, or the SFT control on the same data

LOGGED = ("loss", "loss_reward", "loss_constraint", "loss_anchor", "reward_mean", "grad_norm", "lr", "skipped")


def step_options(config, objective_name: Optional[str] = None, platform: Optional[str] = None) -> ts.StepOptions:
  """StepOptions from `srum.*`, `train.*` and `model.*`; `objective_name` (default `train.objective`): "srum",
  or "sft" (the control: R == 1 and lambda = 0, plain flow matching on the same data; the anchor to the starting
  model, `srum.anchor_weight`, is part of the fine-tuning recipe and stays); `platform`: the one the
  attention is resolved for (default: JAX's backend)."""
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
      attn_impl=loaded_model.attn_impl(config, platform), remat=bool(m.remat), ema_decay=float(t.ema_decay),
      anchor_weight=float(s.anchor_weight))


def _to_device(tree, shardings, process_count: int):
  """Host batch -> global arrays: device_put (one process) or per-host pieces (several processes)."""
  if process_count == 1:
    return jax.device_put(tree, shardings)
  return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), tree, shardings)


def _write_samples(path: str, hb: train_data.HostBatch, opts: ts.StepOptions, images_root: str) -> None:
  """Grid of a batch's training images with their reward maps (the loss's maps, `objective.reward_maps`)."""
  b = hb.batch
  H, W = opts.image_hw
  if b.images is not None:
    pixels = np.asarray(b.images).reshape(-1, H, W, 3)
  else:  # the batch carries stored moments: read the images back for the picture
    pixels = np.stack([_load_or_blank(os.path.join(images_root, f), (H, W)) for f in hb.image_files])
  images = viz.to_uint8(pixels)
  r = jax.tree.map(lambda a: np.asarray(a).reshape((images.shape[0],) + np.shape(a)[2:]), b.rewards)
  maps = np.asarray(objective.reward_maps(r, image_hw=(H, W), levers=opts.levers))
  shown = r.valid & opts.levers.use_local
  tiles = [viz.overlay_reward_map(images[i], maps[i], boxes=r.boxes[i][shown[i]], scores=r.scores[i][shown[i]],
                                  signed=opts.levers.signed) for i in range(images.shape[0])]
  idx = np.asarray(hb.indices).reshape(-1)
  captions = [f"#{idx[i]} g={r.global_scores[i]:+.2f} {hb.prompts[i]}" for i in range(images.shape[0])]
  ncols = max(1, int(np.ceil(np.sqrt(images.shape[0]))))
  files.save_png(path, viz.image_grid(np.stack(tiles), ncols=ncols, pad=2, captions=captions))


def _load_or_blank(path: str, image_hw) -> np.ndarray:
  try:
    return train_data.load_image(path, image_hw)[0]
  except Exception:  # a picture is not worth a crash; the tile stays grey
    return np.zeros(tuple(image_hw) + (3,), np.float32)


def train(config, *, cfg, params, tokenizer, records_path: str, images_root: str, workdir: str, mesh=None,
          max_steps: Optional[int] = None, step_hook: Optional[Callable[[int], None]] = None,
          objective_name: Optional[str] = None, stop: Optional[PreemptionFlag] = None) -> Dict[str, Any]:
  """Run (or resume) SRUM post-training to `max_steps` (default `config.train.steps`); returns a summary.

  params: {'bagel', 'ae'} trees (NumPy or jax arrays; placed onto the mesh here). tokenizer: any object
  with `encode(str) -> list[int]`. step_hook(step) runs on the host after every step (tests, custom
  monitoring; it must not block for long). objective_name: see `step_options`. stop: a `PreemptionFlag` to
  poll (default: one installed here for SIGTERM / SIGINT). The summary holds steps, final_loss, skipped
  (non-finite updates), data (the DataReport as a dict), preempted, resumed_from, the final `state` and
  `params` (the EMA of the weights when `train.ema_decay` > 0, as BAGEL releases its EMA).
  """
  if stop is None:
    with PreemptionFlag() as flag:
      return train(config, cfg=cfg, params=params, tokenizer=tokenizer, records_path=records_path,
                   images_root=images_root, workdir=workdir, mesh=mesh, max_steps=max_steps, step_hook=step_hook,
                   objective_name=objective_name, stop=flag)
  return _train(stop, config, cfg=cfg, params=params, tokenizer=tokenizer, records_path=records_path,
                images_root=images_root, workdir=workdir, mesh=mesh, max_steps=max_steps, step_hook=step_hook,
                opts=step_options(config, objective_name))


def train_mesh(config):
  """Training's mesh: every device of every process, shaped by `config.mesh` for `train.batch_size` rows (a
  shape these devices cannot take is a `UserError` naming the key)."""
  try:
    return sharding.mesh_from_config(config.mesh, batch_rows=int(config.train.batch_size))
  except ValueError as e:
    raise UserValueError(f"config key mesh={dict(config.mesh)}: {e} ({jax.device_count()} devices in all)") from None


def batch_layout(config, mesh) -> Dict[str, int]:
  """{'batch_ways', 'microbatches'} of `train.batch_size` global rows on `mesh`: rows split over its data x fsdp
  axes, then each shard's rows over microbatches of `train.microbatch_rows` (0: one microbatch)."""
  t = config.train
  ways = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  rows = int(t.batch_size)
  if rows % ways:
    raise ValueError(f"train.batch_size={rows} rows must divide over the mesh batch axes (data x fsdp = {ways}); "
                     f"mesh {dict(mesh.shape)} (mesh.tensor = 0 derives a tensor axis that makes them divide)")
  per_shard, micro = rows // ways, int(t.microbatch_rows) or rows // ways
  if per_shard % micro:
    raise ValueError(f"train.microbatch_rows={micro} does not divide the {per_shard} rows of each batch shard")
  return {"batch_ways": ways, "microbatches": per_shard // micro}


VAE_MOMENTS = ("cached", "step")  # `train.vae_moments`: encoded once as data preparation, or in the step


def _host_tree(tree):
  """A parameter tree as NumPy on this host (pieces of arrays spread over several processes gathered)."""

  def host(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(host, tree)


def moments_encoder(params_encoder, cfg, batch_size: int, dtype):
  """(encode, encoder_id) for `train_data.prepare_moments`: the frozen VAE encoder jitted once over this process's
  devices (weights replicated, images split over them; batches padded to a multiple of the device count),
  returning moments in `dtype`; encoder_id is a content hash of the encoder weights."""
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
  fn = jax.jit(lambda p, x: autoencoder.encoder(p, x, cfg.ae).astype(dtype), in_shardings=(rep, split),
               out_shardings=split)

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
  items = load_prompts(config.prompts.anchor)
  require_prompts(items, "prompts.anchor")
  return train_data.anchor_prompt_ids([it.prompt for it in items], cfg, spec, tokenizer)


def _data_pipeline(config, cfg, tokenizer, records_path: str, images_root: str, workdir: str, params_ae=None):
  """Validate the records once per input, encode their images' posterior moments once (`train.vae_moments` =
  cached; needs `params_ae`), then this host's grain iterator (with the anchor prompts when
  `srum.anchor_weight` > 0); returns (iterator, DataReport)."""
  t, pid, pcount = config.train, jax.process_index(), jax.process_count()
  spec = train_data.spec_from_config(config, pcount)
  ar_path, report = train_data.prepare_records(records_path, images_root, os.path.join(workdir, "data"),
                                         max_regions=spec.max_regions,
                                         drop_zero_global=bool(config.srum.drop_zero_global),
                                         threads=int(t.data_threads))
  if report.kept == 0:  # the records or `train.images_root` are wrong: the user's to fix, one line
    raise UserValueError(f"no usable training records in {records_path} (images under "
                         f"{images_root or 'the records folder'}; set train.records / train.images_root): "
                         f"{report.summary()}")
  moments = None
  # on a remote workdir there is no shared file system for the per-process moments parts: every host encodes
  # every record into its own local cache (a one-off encoder pass per round; the step's batches are unchanged)
  mpid, mpcount = (0, 1) if paths.is_remote(workdir) else (pid, pcount)
  if t.vae_moments == "cached":
    master = jnp.dtype(config.model.param_dtype)  # the dtype the step would run the encoder in
    encode, encoder_id = moments_encoder(jax.tree.map(lambda x: x.astype(master), params_ae["encoder"]), cfg,
                                         int(t.encode_batch), jnp.dtype(t.moments_dtype))
    moments = train_data.prepare_moments(ar_path, images_root, spec.image_hw, encode, encoder_id=encoder_id,
                                   dtype=str(t.moments_dtype), batch_size=int(t.encode_batch), process_index=mpid,
                                   process_count=mpcount, threads=int(t.data_threads))
    distributed.barrier("train_moments")
  ds = train_data.make_dataset(ar_path, images_root, spec, cfg=cfg, tokenizer=tokenizer, seed=int(config.seed),
                         process_index=pid, process_count=pcount, read_threads=int(t.data_threads),
                         workers=int(t.data_workers), report=report, moments=moments,
                         anchor_ids=_anchor_ids(config, cfg, tokenizer, spec))
  return iter(ds), report


def _open_data_log(workdir: str, pid: int, pcount: int, step: int):
  """The data log file to write lines to: `data_log.jsonl` (`data_log.p<pid>.jsonl` with several processes),
  appended to. An object store cannot append: there this invocation writes `data_log[.p<pid>].from<step>.jsonl`
  (`_ObjectLog`)."""
  name = "data_log.jsonl" if pcount == 1 else f"data_log.p{pid}.jsonl"
  if not paths.is_remote(workdir):
    return open(os.path.join(workdir, name), "a")
  return _ObjectLog(paths.join(workdir, name[:-len(".jsonl")] + f".from{step:08d}.jsonl"))


class _ObjectLog:
  """A text log on an object store: lines kept in memory, the whole object rewritten by `flush` at most every
  `FLUSH_S` seconds (bounded cost) and on close; a crash loses at most the last `FLUSH_S` seconds of lines."""

  FLUSH_S = 60.0

  def __init__(self, path: str):
    self.path, self.lines, self.flushed = path, [], 0.0

  def write(self, text: str) -> None:
    self.lines.append(text)

  def flush(self, force: bool = False) -> None:
    if force or time.time() - self.flushed >= self.FLUSH_S:
      paths.write_bytes(self.path, "".join(self.lines).encode("utf-8"))
      self.flushed = time.time()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.flush(force=True)
    return False


def _restore_or_init(ckpt: checkpointing.Checkpointer, params, init, abstract, state_sh, key_data, it):
  """(state, key data, step resumed from or None, steps given up, its meta): the newest checkpoint that restores with
  its data iterator's state (damaged newer ones are moved aside and counted: `restore_latest_good`), or
  `init(params)` placed on `state_sh` when there is none."""
  resumed_from, got, given_up = ckpt.restore_latest_good(
      checkpointing.abstract_with_shardings(abstract, state_sh),
      jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=key_data.sharding), require_data=True)
  if resumed_from is None:
    if given_up:
      print(f"[checkpoint] no checkpoint restores ({len(given_up)} given up): training starts afresh", flush=True)
    params = jax.device_put(params, state_sh.params)
    return jax.jit(init, out_shardings=state_sh)(params), key_data, None, given_up, {}
  state, key_data, data_state, meta = got
  it.set_state(data_state)
  return state, key_data, resumed_from, given_up, meta


class _MetricsLog:
  """Sums step metrics on device and syncs them every `log_every` steps: TensorBoard, the bar, the history.
  On a remote workdir the TensorBoard events are written to a local cache folder and copied to `<workdir>/tb`
  at most every `UPLOAD_S` seconds and on close (no extra GCS client needed)."""

  UPLOAD_S = 60.0

  def __init__(self, workdir: str, schedule, log_every: int, is_main: bool, bar):
    self.schedule, self.log_every, self.bar = schedule, max(1, int(log_every)), bar
    self.history = {k: [] for k in LOGGED}
    self.acc, self.n, self.last = None, 0, None
    self.writer, self.tb_dir, self.uploaded = None, os.path.join(workdir, "tb"), 0.0
    if is_main:
      self.writer = SummaryWriter(paths.local_cache_dir(self.tb_dir))

  def _upload(self, force: bool = False) -> None:
    """Copy the local TensorBoard files to a remote `<workdir>/tb` (a no-op for a local workdir)."""
    if self.writer is None or not paths.is_remote(self.tb_dir):
      return
    if force or time.time() - self.uploaded >= self.UPLOAD_S:
      paths.upload_dir(paths.local_cache_dir(self.tb_dir), self.tb_dir)
      self.uploaded = time.time()

  def add(self, step: int, metrics, state, total: int) -> None:
    self.last = metrics
    self.acc = metrics if self.acc is None else jax.tree.map(jnp.add, self.acc, metrics)
    self.n += 1
    if step % self.log_every and step != total:
      return
    vals = {k: float(v) / self.n for k, v in jax.device_get(self.acc).items() if k != "skipped"}
    vals.update(lr=float(self.schedule(step - 1)), skipped=int(jax.device_get(state.skipped)))
    self.acc, self.n = None, 0
    for k in LOGGED:
      if k == "loss_anchor" and k not in vals:
        continue  # the anchor is off
      self.history[k].append((step, vals.get(k, float("nan"))))
      if self.writer is not None:
        self.writer.add_scalar(f"train/{k}", vals.get(k, float("nan")), step)
    if self.writer is not None:
      self.writer.flush()
      self._upload()
    self.bar.set_postfix(loss=f"{vals['loss']:.4g}", skipped=vals["skipped"], refresh=False)

  def final_loss(self, before: dict) -> Optional[float]:
    """The last step's loss (this invocation's, else the one saved with the checkpoint resumed from)."""
    return before.get("final_loss") if self.last is None else float(jax.device_get(self.last["loss"]))

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self._upload(force=True)


def _train(stop: PreemptionFlag, config, *, cfg, params, tokenizer, records_path, images_root, workdir, mesh,
           max_steps, step_hook, opts: ts.StepOptions) -> Dict[str, Any]:
  t0, t = time.time(), config.train
  workdir = paths.abspath(workdir)  # a remote workdir (gs://) stays as it is
  paths.path(workdir).mkdir(parents=True, exist_ok=True)
  pid, pcount = jax.process_index(), jax.process_count()
  mesh = train_mesh(config) if mesh is None else mesh
  rules = sharding.rules_from_config(config.sharding_rules)
  opts = dataclasses.replace(opts, **batch_layout(config, mesh))
  total = int(t.steps if max_steps is None else max_steps)
  it, report = _data_pipeline(config, cfg, tokenizer, records_path, images_root, workdir, params["ae"])
  tx = optimizer.make_optimizer(t, optimizer.param_labels(params, tuple(t.freeze)), total_steps=total)
  master = jnp.dtype(config.model.param_dtype)  # the trained copy (e.g. fp32 masters of a bf16 checkpoint)
  init = lambda p: update.init_state(jax.tree.map(lambda x: x.astype(master), p), tx, opts.ema_decay)  # noqa
  abstract = jax.eval_shape(init, params)
  state_sh = ts.state_shardings(cfg, abstract, mesh, rules)
  key_data = jax.device_put(jax.random.key_data(jax.random.key(int(config.seed))), sharding.replicated(mesh))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(t.keep_checkpoints),
                                    save_interval_steps=int(t.save_every))
  bar = log = None
  try:
    state, key_data, resumed_from, given_up, meta = _restore_or_init(ckpt, params, init, abstract, state_sh,
                                                                     key_data, it)
    before = {"final_loss": meta.get("final_loss"), "seconds": float(meta.get("seconds") or 0.0)}
    # the anchor's reference: the model training started from (a resumed run is given the same model again)
    consts, const_sh = ((jax.device_put(params, state_sh.params),), (state_sh.params,)) if opts.anchor_weight > 0 \
        else ((), ())
    del params
    step = int(jax.device_get(state.step))
    bar = progress.bar(total, "train", initial=min(step, total), disable=pid != 0, leave=True,
                          unit="step")
    log = _MetricsLog(workdir, optimizer.lr_schedule(t, total), t.log_every, pid == 0, bar)
    step_fn, base_key, jstep, batch_sh = ts.make_train_step(cfg, opts, tx), jax.random.wrap_key_data(key_data), None, None
    save = lambda force=False: ckpt.save(step, state, key_data=key_data, data_state=it.get_state(),  # noqa: E731
                                         meta={"report": report.to_dict(), "final_loss": log.final_loss(before),
                                               "seconds": before["seconds"] + time.time() - t0}, force=force)
    preempted = False
    with _open_data_log(workdir, pid, pcount, step) as data_log:
      while step < total:
        if distributed.any_process(stop.is_set()):
          preempted = True
          break
        hb = next(it)
        data_log.write(json.dumps({"step": step, "indices": np.asarray(hb.indices).reshape(-1).tolist()}) + "\n")
        data_log.flush()
        report.truncated_prompts += hb.truncated
        if jstep is None:
          batch_sh = ts.batch_shardings(hb.batch, mesh, rules)
          jstep = ts.shard_train_step(lambda s, b, k, *c: step_fn(s, b, jax.random.fold_in(k, s.step), *c),
                                      state_sh, batch_sh, mesh, const_sh)
        state, metrics = jstep(state, _to_device(hb.batch, batch_sh, pcount), base_key, *consts)
        step += 1
        bar.update(1)
        log.add(step, metrics, state, total)
        if pid == 0 and int(t.sample_every) > 0 and step % int(t.sample_every) == 0:
          _write_samples(os.path.join(workdir, "samples", f"step_{step:06d}.png"), hb, opts, images_root)
        if ckpt.should_save(step):
          save()
        if step_hook is not None:
          step_hook(step)
    if step > (resumed_from or 0):  # progress since the last checkpoint
      save(force=True)
  finally:
    ckpt.close()  # waits for the async writes
    if bar is not None:
      bar.close()
    if log is not None:
      log.close()
  return _summary(workdir, state, log, report, preempted=preempted, resumed_from=resumed_from, step=step,
                  total=total, seconds=time.time() - t0, compiles=0 if jstep is None else jstep._cache_size(),
                  before=before, given_up=given_up)


def _summary(workdir: str, state, log: _MetricsLog, report, *, preempted: bool, resumed_from, step: int, total: int,
             seconds: float, compiles: int, before: dict, given_up: list) -> Dict[str, Any]:
  """The summary of the whole training so far: `final_loss` and `seconds` carry over from the checkpoint
  resumed from (a resume with nothing left to do keeps them); `seconds_this_invocation` is this call's."""
  is_main = jax.process_index() == 0
  if is_main and log.history["loss"]:
    shown = ("loss", "loss_reward", "loss_constraint", "loss_anchor")
    viz.loss_curve_png({k: log.history[k] for k in shown if log.history[k]},
                       os.path.join(workdir, "loss_curve.png"), title="SRUM training loss")
  skipped = int(jax.device_get(state.skipped))
  final_loss = log.final_loss(before)
  summary = {"steps": step, "final_loss": final_loss, "skipped": skipped, "preempted": preempted,
             "resumed_from": resumed_from, "data": report.to_dict(), "seconds": before["seconds"] + seconds,
             "seconds_this_invocation": seconds, "compiles": compiles,
             "checkpoints_given_up": [list(g) for g in given_up], "checkpoint": os.path.join(workdir, "checkpoints")}
  if is_main:
    paths.write_bytes(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=1).encode("utf-8"))
    print(f"train: {'preempted at' if preempted else 'done,'} step {step}/{total}; final loss "
          f"{'n/a' if final_loss is None else f'{final_loss:.5g}'}; skipped non-finite updates {skipped}; "
          f"data: {report.summary()}", flush=True)
  return dict(summary, state=state, params=state.params if state.ema is None else state.ema)


def final_params(workdir: str, step: Optional[int] = None, abstract_params=None):
  """The trained {'bagel', 'ae'} parameters from `workdir`'s latest (or `step`'s) checkpoint."""
  return checkpointing.restore_params(os.path.join(paths.abspath(workdir), "checkpoints"), step,
                                      abstract_params)


def default_load_model(config, model_dir: str):
  """(cfg, params, tokenizer) from a converted model directory, placed on the config's mesh in
  `model.param_dtype`."""
  rules = sharding.rules_from_config(config.sharding_rules)
  cfg, params = checkpoint.load_model_dir(model_dir, mesh=train_mesh(config), dtype=config.model.param_dtype,
                                          rules=rules)
  tokenizer = tok.load_tokenizer(model_dir)
  tokenizer.check(cfg.tokens)
  return cfg, params, tokenizer


def main(config, *, model_dir: str, records: str, images_root: str, workdir: str,
         load_model: Callable = default_load_model) -> Dict[str, Any]:
  """The standalone stage: load the model, train on `records` (images under `images_root`) in `workdir`, and
  write the trained model dir `<workdir>/model` (unless preempted: rerun to resume)."""
  distributed.maybe_initialize()
  cfg, params, tokenizer = load_model(config, model_dir)
  summary = train(config, cfg=cfg, params=params, tokenizer=tokenizer, records_path=records,
                  images_root=images_root, workdir=workdir)
  if not summary["preempted"]:
    summary["model_dir"] = checkpoint.write_model_dir(os.path.join(workdir, "model"), cfg, summary["params"], model_dir)
    print(f"train: model dir {summary['model_dir']} (python -m srum_jax export --src {summary['model_dir']} "
          f"--dst <official dir>)", flush=True)
  return summary
