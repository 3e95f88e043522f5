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
data_log.jsonl (per step: the record indices consumed), loss_curve.png, summary.json.
A workdir holding checkpoints is resumed from its latest one. SIGTERM finishes the current step, saves
and returns with `preempted=True`.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from srum_jax import sharding, train_step as ts, viz
from srum_jax.pipeline import checkpointing, data

__all__ = ["step_options", "lr_schedule", "train", "final_params", "default_load_model", "main"]

LOGGED = ("loss", "loss_reward", "loss_constraint", "reward_mean", "grad_norm", "lr", "skipped")


def step_options(config) -> ts.StepOptions:
  """StepOptions from `srum.*`, `train.*` and `model.*` (`train.sft_baseline`: uniform R, lambda 0)."""
  t, s, m = config.train, config.srum, config.model
  sft = bool(t.sft_baseline)
  return ts.StepOptions(
      image_hw=tuple(int(v) for v in t.image_hw), samples_per_row=int(t.samples_per_row),
      lambda_constraint=0.0 if sft else float(s.lambda_constraint), signed_rewards=bool(s.signed_rewards),
      use_local=bool(s.use_local), use_global=bool(s.use_global), uniform_rewards=sft,
      timestep_shift=float(t.timestep_shift), text_cond_dropout=float(t.text_cond_dropout),
      sample_posterior=bool(t.sample_posterior), compute_dtype=jnp.dtype(m.compute_dtype),
      attn_impl=str(m.attn_impl), remat=bool(m.remat), ema_decay=float(t.ema_decay))


def lr_schedule(tcfg) -> optax.Schedule:
  """The learning rate `make_optimizer` applies at update count n (linear warm-up from 0, then constant)."""
  warm = max(int(tcfg.warmup_steps), 1)
  return optax.join_schedules([optax.linear_schedule(0.0, tcfg.lr, warm), optax.constant_schedule(tcfg.lr)],
                              [warm])


def _to_device(tree, shardings, process_count: int):
  """Host batch -> global arrays: device_put (one process) or per-host pieces (several processes)."""
  if process_count == 1:
    return jax.device_put(tree, shardings)
  return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), tree, shardings)


def _any_process(flag: bool, process_count: int) -> bool:
  """True when `flag` is set on any process (so every host stops at the same step)."""
  if process_count == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _write_samples(path: str, hb: data.HostBatch, opts: ts.StepOptions) -> None:
  """Grid of a batch's training images with their reward maps (as the loss sees them) and boxes."""
  from srum_jax.rewards import reward_map
  b = hb.batch
  H, W = opts.image_hw
  images = viz.to_uint8(np.asarray(b.images).reshape(-1, H, W, 3))
  r = jax.tree.map(lambda a: np.asarray(a).reshape((images.shape[0],) + np.shape(a)[2:]), b.rewards)
  valid = r.valid if opts.use_local else np.zeros_like(r.valid)
  g = r.global_scores if opts.use_global else np.ones_like(r.global_scores)
  if opts.uniform_rewards:
    maps = np.ones((images.shape[0], H, W), np.float32)
  else:
    maps = np.asarray(reward_map(r.boxes, r.scores, valid, g, height=H, width=W, signed=opts.signed_rewards))
  tiles = [viz.overlay_reward_map(images[i], maps[i], boxes=r.boxes[i][valid[i]], scores=r.scores[i][valid[i]],
                                  signed=opts.signed_rewards) for i in range(images.shape[0])]
  idx = np.asarray(hb.indices).reshape(-1)
  captions = [f"#{idx[i]} g={g[i]:+.2f} {hb.prompts[i]}" for i in range(images.shape[0])]
  ncols = max(1, int(np.ceil(np.sqrt(images.shape[0]))))
  viz.save_png(path, viz.image_grid(np.stack(tiles), ncols=ncols, pad=2, captions=captions))


class _Preemption:
  """SIGTERM -> a flag the loop polls (installed only from the main thread; restored on exit)."""

  def __init__(self):
    self.flag = threading.Event()
    self._installed, self._prev = False, None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._prev = signal.signal(signal.SIGTERM, lambda signum, frame: self.flag.set())
      self._installed = True
    return self

  def __exit__(self, *exc):
    if self._installed:
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._prev is None else self._prev)
    return False


def train(config, *, cfg, params, tokenizer, records_path: str, images_root: str, workdir: str, mesh=None,
          max_steps: Optional[int] = None, step_hook: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
  """Run (or resume) SRUM post-training to `max_steps` (default `config.train.steps`); returns a summary.

  params: {'bagel', 'ae'} trees (NumPy or jax arrays; placed onto the mesh here). tokenizer: any object
  with `encode(str) -> list[int]`. step_hook(step) runs on the host after every step (tests, custom
  monitoring; it must not block for long). The summary holds steps, final_loss, skipped (non-finite
  updates), data (the DataReport as a dict), preempted, resumed_from, the final `state` and `params`.
  """
  with _Preemption() as stop:
    return _train(stop, config, cfg=cfg, params=params, tokenizer=tokenizer, records_path=records_path,
                  images_root=images_root, workdir=workdir, mesh=mesh, max_steps=max_steps, step_hook=step_hook)


def _train(stop: "_Preemption", config, *, cfg, params, tokenizer, records_path, images_root, workdir, mesh,
           max_steps, step_hook) -> Dict[str, Any]:
  t0 = time.time()
  t = config.train
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  pid, pcount = jax.process_index(), jax.process_count()
  is_main = pid == 0
  mesh = sharding.mesh_from_config(config.mesh) if mesh is None else mesh
  rules = sharding.rules_from_config(config.get("sharding_rules", []))
  batch_ways = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
  if int(t.batch_size) % batch_ways:
    raise ValueError(f"train.batch_size={t.batch_size} rows must divide over the mesh batch axes "
                     f"(data x fsdp = {batch_ways})")
  total = int(t.steps if max_steps is None else max_steps)
  opts = step_options(config)

  # data: validate once per input, then a per-host grain pipeline
  spec = data.spec_from_config(config, pcount)
  ar_path, report = data.prepare_records(records_path, images_root, os.path.join(workdir, "data"),
                                         max_regions=spec.max_regions,
                                         drop_zero_global=bool(config.srum.drop_zero_global),
                                         threads=int(t.data_threads))
  if report.kept == 0:
    raise ValueError(f"no usable training records in {records_path}: {report.summary()}")
  import grain
  ds = data.make_dataset(ar_path, images_root, spec, cfg=cfg, tokenizer=tokenizer, seed=int(config.seed),
                         shard=grain.sharding.ShardOptions(pid, pcount), read_threads=int(t.data_threads),
                         workers=int(t.data_workers), report=report)
  it = iter(ds)

  # optimizer, state shardings, restore or init
  labels = ts.param_labels(params, tuple(t.freeze))
  tx = ts.make_optimizer(t, labels)
  abstract = jax.eval_shape(lambda p: ts.init_state(p, tx, opts.ema_decay), params)
  state_sh = ts.state_shardings(cfg, tx, abstract, mesh, rules)
  rep = sharding.replicated(mesh)
  key_data = jax.device_put(jax.random.key_data(jax.random.key(int(config.seed))), rep)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(t.keep_checkpoints),
                                    save_interval_steps=int(t.save_every))
  writer, bar = None, None
  try:
    resumed_from = ckpt.latest_step()
    if resumed_from is not None:
      state, key_data, data_state, _ = ckpt.restore(
          resumed_from, checkpointing.abstract_with_shardings(abstract, state_sh),
          jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=rep))
      if data_state is not None:
        it.set_state(data_state)
    else:
      params = jax.device_put(params, state_sh.params)
      state = jax.jit(lambda p: ts.init_state(p, tx, opts.ema_decay), out_shardings=state_sh)(params)
    del params
    step = int(jax.device_get(state.step))
    base_key = jax.random.wrap_key_data(key_data)

    step_fn = ts.make_train_step(cfg, opts, tx)
    keyed = lambda s, b, k: step_fn(s, b, jax.random.fold_in(k, s.step))
    jstep, batch_sh = None, None
    schedule = lr_schedule(t)

    if is_main:
      from tensorboardX import SummaryWriter
      writer = SummaryWriter(os.path.join(workdir, "tb"))
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=min(step, total), desc="train", disable=not is_main, dynamic_ncols=True,
               file=sys.stderr)
    log_name = "data_log.jsonl" if pcount == 1 else f"data_log.p{pid}.jsonl"
    history = {k: [] for k in LOGGED}
    acc, n_acc, last = None, 0, None
    preempted = False
    log_every, sample_every = max(1, int(t.log_every)), int(t.sample_every)
    with open(os.path.join(workdir, log_name), "a") as data_log:
      while step < total:
        if _any_process(stop.flag.is_set(), pcount):
          preempted = True
          break
        hb = next(it)
        data_log.write(json.dumps({"step": step, "indices": np.asarray(hb.indices).reshape(-1).tolist()}) + "\n")
        data_log.flush()
        report.truncated_prompts += hb.truncated
        if jstep is None:
          batch_sh = ts.batch_shardings(hb.batch, mesh, rules)
          jstep = ts.shard_train_step(keyed, state_sh, batch_sh, mesh)
        state, last = jstep(state, _to_device(hb.batch, batch_sh, pcount), base_key)
        step += 1
        bar.update(1)
        acc = last if acc is None else jax.tree.map(jnp.add, acc, last)
        n_acc += 1
        if step % log_every == 0 or step == total:
          host = jax.device_get(acc)
          vals = {k: float(v) / n_acc for k, v in host.items() if k != "skipped"}
          vals["lr"] = float(schedule(step - 1))
          vals["skipped"] = int(jax.device_get(state.skipped))
          acc, n_acc = None, 0
          for k in LOGGED:
            history[k].append((step, vals.get(k, float("nan"))))
          if writer is not None:
            for k in LOGGED:
              writer.add_scalar(f"train/{k}", vals.get(k, float("nan")), step)
            writer.flush()
          bar.set_postfix(loss=f"{vals['loss']:.4g}", skipped=vals["skipped"])
        if is_main and sample_every > 0 and step % sample_every == 0:
          _write_samples(os.path.join(workdir, "samples", f"step_{step:06d}.png"), hb, opts)
        if ckpt.should_save(step):
          ckpt.save(step, state, key_data=key_data, data_state=it.get_state(), meta={"report": report.to_dict()})
        if step_hook is not None:
          step_hook(step)
    if step > (0 if resumed_from is None else resumed_from):  # progress since the last checkpoint
      ckpt.save(step, state, key_data=key_data, data_state=it.get_state(), meta={"report": report.to_dict()},
                force=True)
  finally:
    ckpt.close()  # waits for the async writes
    if bar is not None:
      bar.close()
    if writer is not None:
      writer.close()

  if is_main and history["loss"]:
    viz.loss_curve_png({k: history[k] for k in ("loss", "loss_reward", "loss_constraint")},
                       os.path.join(workdir, "loss_curve.png"), title="SRUM training loss")
  skipped = int(jax.device_get(state.skipped))
  final_loss = None if last is None else float(jax.device_get(last["loss"]))
  summary = {"steps": step, "final_loss": final_loss, "skipped": skipped, "preempted": preempted,
             "resumed_from": resumed_from, "data": report.to_dict(), "seconds": time.time() - t0,
             "compiles": 0 if jstep is None else int(getattr(jstep, "_cache_size", lambda: -1)()),
             "checkpoint": os.path.join(workdir, "checkpoints")}
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
    print(f"train: {'preempted at' if preempted else 'done,'} step {step}/{total}; final loss "
          f"{'n/a' if final_loss is None else f'{final_loss:.5g}'}; skipped non-finite updates {skipped}; "
          f"data: {report.summary()}", flush=True)
  return dict(summary, state=state, params=state.params)


def final_params(workdir: str, step: Optional[int] = None, abstract_params=None):
  """The trained {'bagel', 'ae'} parameters from `workdir`'s latest (or `step`'s) checkpoint."""
  return checkpointing.restore_params(os.path.join(os.path.abspath(workdir), "checkpoints"), step,
                                      abstract_params)


def default_load_model(config):
  """(cfg, params, tokenizer) from `config.model.dir` (a `python -m srum_jax convert` output), placed on
  the config's mesh in `model.param_dtype`."""
  from srum_jax import tokenizer as tok
  from srum_jax.convert import checkpoint
  if not config.model.dir:
    raise ValueError("training needs config.model.dir: a converted model directory (python -m srum_jax convert)")
  mesh = sharding.mesh_from_config(config.mesh)
  rules = sharding.rules_from_config(config.get("sharding_rules", []))
  cfg, params = checkpoint.load_model_dir(config.model.dir, mesh=mesh, dtype=config.model.param_dtype, rules=rules)
  tokenizer = tok.load_tokenizer(config.model.dir)
  tokenizer.check(cfg.tokens)
  return cfg, params, tokenizer


def main(config, opts=None, load_model: Callable = default_load_model) -> int:
  """CLI entry (`python -m srum_jax train --config=...`): records from `train.records` (default
  `<workdir>/records.jsonl`), images from `train.images_root` (default: the records' folder)."""
  from srum_jax import distributed
  distributed.maybe_initialize()
  cfg, params, tokenizer = load_model(config)
  records = config.train.records or os.path.join(config.workdir, "records.jsonl")
  images_root = config.train.images_root or os.path.dirname(os.path.abspath(records))
  train(config, cfg=cfg, params=params, tokenizer=tokenizer, records_path=records, images_root=images_root,
        workdir=config.workdir)
  return 0
