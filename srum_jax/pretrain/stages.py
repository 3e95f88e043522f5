"""The pretraining driver: one stage (A: the autoencoder, B: the UMM) and the chain of stages of one
command.

How a stage starts is decided once (`start_mode`):
  resume      <out>/state holds a checkpoint of this stage (and `resume`): continue stage B where it
              stopped
  warm_start  `init_from` names a model dir: its AE and UMM weights, a fresh optimizer and warm-up
  reuse_ae    `ae.from_dir` names a model dir: its AE (and latent scale), a fresh UMM
  fresh       train the AE (stage A), then a fresh UMM
The schedules are functions of the step; `max_seconds` caps the stage's wall clock (over restarts)
and a stage that reaches it stops cleanly and is saved like a finished one. SIGTERM / SIGINT save
the state and return (`preempted`); the same command resumes.

Outputs under `pretrain.out`: model/ (orbax params + model_config.json + tokenizer.json, loadable by
`engine.loaded_model.load_model`), official/ (the official safetensors layout), log.jsonl + tb/ (the
metrics sink: rows of both stages, TensorBoard), pretrain_summary.json, pretrain_eval.json
(`heldout.evaluate_model`). Both stages run the shared training loop (`training.loop`).
"""
from __future__ import annotations

import dataclasses
import enum
import os
import pathlib
import shutil
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from srum_jax import files
from srum_jax.convert import checkpoint, flax_to_hf
from srum_jax.models import params as params_lib
from srum_jax.models.config import get_preset
from srum_jax.pretrain import batches, heldout, init, steps as steps_lib, vocab
from srum_jax.training import (checkpointing, loop, objective, optimizer, preemption, train_step,
                               update)
from srum_jax.training.metrics_sink import MetricsSink
from srum_jax.training.preemption import PreemptionFlag
from srum_jax.workdir import locking

STATE_DIR = "state"


class StartMode(str, enum.Enum):
  FRESH = "fresh"
  RESUME = "resume"
  WARM_START = "warm_start"
  REUSE_AE = "reuse_ae"


def start_mode(p) -> StartMode:
  """How the stage configured by `p` (a `pretrain` block) starts; see the module docstring."""
  if p.resume and checkpointing.finished_steps(str(pathlib.Path(p.out) / STATE_DIR)):
    return StartMode.RESUME
  if p.init_from:
    return StartMode.WARM_START
  if p.ae.from_dir:
    return StartMode.REUSE_AE
  return StartMode.FRESH


@dataclasses.dataclass
class Start:
  """What stage B starts from: the model config (with the AE's latent scale), parameters {'bagel',
  'ae'} (on resume: the structure the checkpoint restores into), stage A's summary and seconds
  already spent."""
  mode: StartMode
  cfg: Any
  params: Dict[str, Any]
  ae_summary: Dict[str, Any]
  seconds_before_b: float
  resume_meta: Optional[Dict[str, Any]] = None


def _log_rows(sink: MetricsSink, stage: str, p, schedule, postfix, *,
              last: bool) -> loop.LogMetrics:
  """Pretraining's rows: the step's values on the first step of every `log_every` (and on the last
  step when `last`), labelled with the update's 0-based index, with its learning rate."""
  return loop.LogMetrics(sink, stage, loop.Every(steps=int(p.log_every), offset=1, last=last),
                         label=lambda info: info.index,
                         extra=lambda info: {"lr": float(schedule(info.index))}, postfix=postfix)


def _host_floats(metrics) -> Dict[str, float]:
  """A step's metrics as host floats ({} before any step)."""
  return {k: float(v) for k, v in (metrics or {}).items()}


def train_autoencoder(p, cfg, sampler: batches.PretrainSampler, params_ae, *, seed: int,
                      deadline: float, sink: MetricsSink) -> tuple:
  """Stage A: (trained AE params, summary). Stops at `p.ae.steps` or the wall-clock deadline; no
  checkpoints (a stop signal is answered by stage B, whose first save holds this stage's result)."""
  a = p.ae
  total = int(a.steps)
  tx = optimizer.make_optimizer(a, None, total_steps=total)
  step_fn = jax.jit(steps_lib.make_ae_step(cfg.ae, tx, float(a.kl_weight)),
                    donate_argnums=update.state_donation())
  key = jax.random.PRNGKey(seed)

  def advance(state, n: int):
    images = sampler.ae_images(np.random.default_rng([seed, 7, n]), int(a.batch))
    return step_fn(state, jnp.asarray(images), jax.random.fold_in(key, n))

  rows = _log_rows(sink, "ae", p, optimizer.lr_schedule(a, total), last=False,
                   postfix=lambda m: {"l1": f"{m['l1']:.4f}", "kl": f"{m['kl']:.2f}"})
  trainer = loop.TrainLoop("pretrain[ae]", total, deadline=deadline, metrics=rows)
  r = trainer.run(update.init_state(params_ae, tx), advance)
  return r.state.params, dict(steps=r.step, seconds=r.seconds, final=_host_floats(r.metrics))


def _load_dir(path: str):

  cfg_src, params = checkpoint.load_model_dir(path)
  return cfg_src, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def prepare_start(mode: StartMode, p, cfg, sampler: batches.PretrainSampler, tokenizer, *,
                  deadline: float, sink: MetricsSink) -> Start:
  """Everything stage B needs from before it, by start mode (stage A runs here for `fresh`)."""

  t0, seed = time.time(), int(p.seed)
  k_bagel, k_ae = jax.random.split(jax.random.PRNGKey(seed))
  if mode == StartMode.RESUME:
    state_dir = pathlib.Path(p.out) / STATE_DIR
    with checkpointing.Checkpointer(str(state_dir)) as ckpt:
      meta = ckpt.restore_meta()
    cfg = checkpoint.config_from_dict(meta["model_config"])
    params = {"bagel": params_lib.init_params(params_lib.bagel_schema(cfg), k_bagel),
              "ae": params_lib.init_params(params_lib.ae_schema(cfg.ae), k_ae)}
    return Start(mode, cfg, params, dict(meta["ae_summary"]), float(meta["seconds_before_b"]), meta)
  if mode == StartMode.FRESH:
    params_ae = params_lib.init_params(params_lib.ae_schema(cfg.ae), k_ae)
    ae_deadline = min(deadline, time.time() + float(p.ae.max_seconds))
    params_ae, ae_summary = train_autoencoder(p, cfg, sampler, params_ae, seed=seed,
                                              deadline=ae_deadline, sink=sink)
    cfg = init.fit_latent_scale(params_ae, cfg,
                                sampler.ae_images(np.random.default_rng([seed, 99]), 256))
    bagel = None
  else:
    source = p.init_from if mode == StartMode.WARM_START else p.ae.from_dir
    cfg_src, loaded = _load_dir(source)
    cfg, params_ae = cfg.replace(ae=cfg_src.ae), loaded["ae"]
    ae_summary = dict(from_dir=source)
    bagel = loaded["bagel"] if mode == StartMode.WARM_START else None
  if bagel is None:
    bagel = params_lib.init_params(params_lib.bagel_schema(cfg), k_bagel)
    if p.umm.number_init:
      bagel = init.init_number_embeddings(bagel, tokenizer, seed)
  if float(p.umm.vit_pos_init_std):
    bagel = init.init_vit_positions(bagel, float(p.umm.vit_pos_init_std), seed)
  ae_summary.update(shift_factor=cfg.ae.shift_factor, scale_factor=cfg.ae.scale_factor)
  return Start(mode, cfg, {"bagel": bagel, "ae": params_ae}, ae_summary, time.time() - t0)


def _abstract_state(state, sharding):
  """The state's structure, shapes and dtypes, every leaf on `sharding` (what a restore reads
  onto)."""

  abstract = jax.eval_shape(lambda s: s, state)
  return checkpointing.abstract_with_shardings(abstract, jax.tree.map(lambda _: sharding, abstract))


def _umm_step(p, cfg, params) -> tuple:
  """(optimizer, jitted step(state, batches, key)) of stage B (the AE frozen; the state donated
  where `update.state_donation` says)."""
  u = p.umm
  labels = optimizer.param_labels(params, ("ae",))
  tx = optimizer.make_optimizer(u, labels, total_steps=int(u.steps))
  opts = train_step.StepOptions(
      image_hw=batches.IMAGE_HW, samples_per_row=int(u.gen_samples_per_row), lambda_constraint=0.0,
      levers=objective.RewardLevers(uniform=True), timestep_shift=float(u.timestep_shift),
      text_cond_dropout=float(u.text_cond_dropout), sample_posterior=True,
      compute_dtype=jax.numpy.dtype(p.compute_dtype))
  step = steps_lib.make_umm_step(cfg, opts, tx, und_weight=float(u.und_weight),
                                 score_weight=float(u.score_weight))
  return tx, jax.jit(step, donate_argnums=update.state_donation())


def _umm_postfix():
  """The bar's figures for stage B: a moving average of the logged values."""
  smooth = {}

  def postfix(m):
    smooth.update({k: m[k] if k not in smooth else 0.8 * smooth[k] + 0.2 * m[k] for k in m})
    return {"flow": f"{smooth['flow']:.3f}", "ce": f"{smooth['ce']:.3f}",
            "sacc": f"{smooth['score_acc']:.2f}"}
  return postfix


def train_umm(p, start: Start, curriculum, *, tokenizer_dir: str, deadline: float,
              stop: PreemptionFlag, sink: MetricsSink) -> tuple:
  """Stage B from `start` until `p.umm.steps`, the deadline or a stop signal; returns (state, info).
  The state is saved every `snapshot_every_seconds` (then a model dir snapshot) and on a stop
  signal; a finished stage writes its model instead."""
  u, cfg, seed, out = p.umm, start.cfg, int(p.seed), pathlib.Path(p.out)
  total = int(u.steps)
  tx, step_fn = _umm_step(p, cfg, start.params)
  state, key = update.init_state(start.params, tx), jax.random.PRNGKey(seed)
  meta = dict(model_config=checkpoint.config_to_dict(cfg), ae_summary=start.ae_summary,
              seconds_before_b=start.seconds_before_b)
  with checkpointing.Checkpointer(str(out / STATE_DIR), max_to_keep=1, async_save=False) as ckpt:
    saves = loop.Checkpoints(
        ckpt, every=loop.Every(seconds=float(p.snapshot_every_seconds)), meta=lambda info: meta,
        at_end=False, snapshot=lambda info: _snapshot(out, cfg, info.state.params, p.save_dtype))
    rows = _log_rows(sink, "umm", p, optimizer.lr_schedule(u, total), _umm_postfix(), last=True)
    trainer = loop.TrainLoop("pretrain[umm]", total, stop=stop, deadline=deadline,
                             checkpoints=saves, metrics=rows)
    if start.mode == StartMode.RESUME:
      one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      state = trainer.restore_or_init(_abstract_state(state, one_device), None, required=True).state
    n0 = int(jax.device_get(state.step))
    budgets = batches.BatchBudgets.from_config(u, curriculum[-1][1].vit_size)
    stream = batches.BatchStream(curriculum, budgets, seed, workers=int(p.data_workers), start=n0,
                                 model_config=meta["model_config"], tokenizer_dir=tokenizer_dir)
    try:
      r = trainer.run(state, lambda s, n: step_fn(s, stream.next(), jax.random.fold_in(key, n)),
                      start=n0)
    finally:
      stream.close()
  return r.state, dict(steps=r.step, seconds=r.seconds, resumed_at=n0 if n0 else None,
                       final=_host_floats(r.metrics), preempted=r.preempted)


def save_model(out_dir: str, cfg, params, *, param_dtype: str = "float32") -> str:
  """Model directory (`checkpoint.write_model_dir`: orbax params {'bagel', 'ae'} cast to param_dtype
  + model_config.json) with the world's tokenizer.json; returns its path."""
  path = checkpoint.write_model_dir(out_dir, cfg, jax.tree.map(np.asarray, params),
                                    dtype=param_dtype)
  vocab.build_tokenizer(path, cfg)
  return path


def _snapshot(out: pathlib.Path, cfg, params, param_dtype: str) -> None:
  """<out>/snapshot: the current params as a model dir (written aside, then renamed into place)."""
  try:
    tmp = save_model(str(out / "snapshot.tmp"), cfg, params, param_dtype=param_dtype)
    if (out / "snapshot").exists():
      shutil.rmtree(out / "snapshot")
    os.replace(tmp, out / "snapshot")
  except OSError as e:  # a full disk must not end a long run: the final save reports it
    print(f"[pretrain] snapshot failed: {e}", flush=True)


def _finish(p, config, cfg, params, summary: dict, out: pathlib.Path) -> Dict[str, Any]:
  """Save the model dir and its official export, drop the resumable state, evaluate; returns the
  summary."""
  model_dir = save_model(str(out / "model"), cfg, params, param_dtype=p.save_dtype)
  summary.update(model_dir=model_dir, model_dir_bytes=files.dir_size(model_dir))
  # the official layout too: what the repo ships
  flax_to_hf.export(model_dir, str(out / "official"))
  summary.update(
      official_dir=str(out / "official"), official_dir_bytes=files.dir_size(str(out / "official")))
  shutil.rmtree(out / STATE_DIR, ignore_errors=True)  # finished: a rerun is a new run
  print(f"[pretrain] saved {model_dir} ({summary['model_dir_bytes'] / 1e6:.2f} MB) after "
        f"{summary['umm']['steps']} UMM steps, {summary['train_seconds']:.0f} s", flush=True)
  if p.eval.enabled:
    summary["eval"] = heldout.evaluate_model(
        model_dir, heldout.EvalSettings.from_config(p.eval),
        vit_image_size=int(config.score.vit_image_size), compute_dtype=p.eval_dtype, out_path=str(
            out / "pretrain_eval.json"), extra=dict(pretrain={
                k: v for k, v in summary.items() if k != "eval"
            }))
  files.write_json(str(out / "pretrain_summary.json"), summary)
  return summary


def run_stage(config, stop: Optional[PreemptionFlag] = None) -> Dict[str, Any]:
  """One stage (`config.pretrain`): start (`start_mode`), stage A when fresh, stage B, save,
  heldout. Returns the summary (`preempted` when a signal stopped it: the state is saved, no model
  is written)."""
  with preemption.flag_or_installed(stop) as flag:
    return _run_stage(config, flag)


def _run_stage(config, stop: PreemptionFlag) -> Dict[str, Any]:
  p, t_start = config.pretrain, time.time()
  out = pathlib.Path(p.out)
  out.mkdir(parents=True, exist_ok=True)
  mode = start_mode(p)
  cfg = get_preset(p.preset)
  tok_dir = out / "tokenizer"
  tok = vocab.build_tokenizer(tok_dir, cfg)
  vit_size = int(config.score.vit_image_size)
  sampler = batches.PretrainSampler(cfg, tok, p.data, vit_size=vit_size)
  with MetricsSink(str(out), "log.jsonl", fresh=mode != StartMode.RESUME) as sink:  # A's and B's
    deadline = t_start + float(p.max_seconds)
    start = prepare_start(mode, p, cfg, sampler, tok, deadline=deadline, sink=sink)
    summary: Dict[str, Any] = dict(preset=p.preset, start_mode=mode.value,
                                   ae=dict(start.ae_summary))
    if p.init_from and mode == StartMode.WARM_START:
      summary["init_from"] = p.init_from
    if mode == StartMode.RESUME:
      used = start.seconds_before_b + float(start.resume_meta["seconds"])
      deadline = t_start + max(0.0, float(p.max_seconds) - used)  # the cap holds over restarts
      print(f"[pretrain] resuming stage B ({used:.0f} s done) from {out / STATE_DIR}", flush=True)
    else:
      summary["ae"]["recon_oracle_acc"] = heldout.ae_reconstruction_accuracy(
          start.params["ae"], start.cfg, sampler, seed=int(p.seed), n=int(p.ae.check_images))
      print(f"[pretrain] autoencoder: {summary['ae']}", flush=True)
    sampler.cfg = start.cfg
    phases = batches.curriculum_data(p)
    curriculum = [(first, batches.PretrainSampler(start.cfg, tok, mix, vit_size=vit_size))
                  for first, mix in phases[:-1]] + [(phases[-1][0], sampler)]
    state, info = train_umm(p, start, curriculum, tokenizer_dir=str(tok_dir), deadline=deadline,
                            stop=stop, sink=sink)
  budgets = batches.BatchBudgets.from_config(p.umm, vit_size)
  summary["umm"] = dict(info, rows_und=info["steps"] * budgets.und_rows,
                        samples_gen=info["steps"] * budgets.gen_rows * budgets.gen_samples_per_row)
  if info["preempted"]:  # keep the state, no final model; rerunning the same command resumes
    print(
        f"[pretrain] stopped by a signal at step {info['steps']}; state saved to {out / STATE_DIR}",
        flush=True)
    return dict(summary, preempted=True)
  summary["train_seconds"] = time.time() - t_start
  return _finish(p, config, start.cfg, state.params, summary, out)


def next_stage(config):
  """The config whose `pretrain` is the stage that follows `config.pretrain` (its `then`), or None.

  A follow-up stage is a warm start (`init_from`, fresh optimizer) from this stage's model; empty
  `out` / `init_from` are derived: `<pretrain.out>/<then.name>` and `<pretrain.out>/model`. The
  follow-up's own `then` (if it has one) comes next.
  """
  p = config.pretrain
  if not p.then.name:
    return None
  c = config.copy_and_resolve_references()
  then = c.pretrain.then
  then.init_from = then.init_from or str(pathlib.Path(p.out) / "model")
  then.out = then.out or str(pathlib.Path(p.out) / then.name)
  if "then" not in then:
    with then.unlocked():
      then.then = ml_collections.ConfigDict({"name": "", "out": ""})  # name "": the chain ends here
  c.pretrain = then
  return c


def finished_summary(p) -> Optional[Dict[str, Any]]:
  """The summary of a stage that already ran to the end in `p.out` (a rerun of a chain keeps it),
  else None."""
  out = pathlib.Path(p.out)
  done = (out / "pretrain_summary.json").is_file() and (
      out / "model").is_dir() and not (out / STATE_DIR).exists()
  if not (p.resume and done):
    return None
  return files.read_json(out / "pretrain_summary.json", "pretrain summary")


def pretrain_chain(config) -> List[Dict[str, Any]]:
  """`pretrain` and its `then` stage in one command; a stage that finished before (and is followed
  by another) is kept, so an interrupted chain resumes where it stopped. Writes `<first
  out>/chain_summary.json`."""
  t0, summaries, c = time.time(), [], config
  while c is not None:
    nxt, name = next_stage(c), c.pretrain.name
    s = finished_summary(c.pretrain) if nxt is not None else None
    if s is not None:
      print(
          f"[pretrain] stage {name} already finished in {c.pretrain.out}; kept "
          f"(pretrain.resume=False redoes it)",
          flush=True)
    else:
      s = run_stage(c)
    summaries.append(dict(s, name=name, out=c.pretrain.out))
    if s.get("preempted"):
      break
    c = nxt
  if len(summaries) > 1:
    files.write_json(
        str(pathlib.Path(config.pretrain.out) / "chain_summary.json"),
        dict(
            seconds_this_command=time.time() - t0, stages=[
                dict(name=s["name"], out=s["out"], train_seconds=s.get("train_seconds"),
                     umm_steps=s["umm"]["steps"], eval=s.get("eval")) for s in summaries
            ]))
  return summaries


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the state is saved; run the same command again to resume


def main(config, flags) -> int:
  """`python -m srum_jax pretrain --config=...`: the chain under the lock of its folder
  (`pretrain.out`), then one line of figures per stage; exit code 75 when a signal stopped it (its
  state is saved: the same command resumes)."""
  return locking.run_locked(str(config.pretrain.out), "pretrain", lambda: _main(config))


def _main(config) -> int:
  summaries = pretrain_chain(config)
  if summaries and summaries[-1].get("preempted"):
    print(f"[pretrain] preempted: stage {summaries[-1]['name']} stopped by a signal; its state is "
          f"saved: run the same command again to resume (exit code {EXIT_PREEMPTED})", flush=True)
    return EXIT_PREEMPTED
  for summary in summaries:
    ev = summary.get("eval")
    if ev:
      print(
          f"[pretrain] {summary['name']}: judge acc {ev['judge']['accuracy']:.3f} (auc "
          f"{ev['judge']['auc']:.3f}), "
          f"regions sign-correct {ev['regions']['sign_correct']:.3f} (one-step answer "
          f"{ev['regions_direct']['sign_correct']:.3f}), generation oracle "
          f"{ev['generation']['oracle_accuracy']:.3f}, judge AUC on own generations "
          f"{ev['generation']['judge_auc']}", flush=True)
      think = ev.get("generation_think")
      if think:
        print(
            f"[pretrain] {summary['name']}: think mode: plans valid {think['plan_valid']:.3f}, "
            f"generation oracle "
            f"{think['oracle_accuracy']:.3f}", flush=True)
  return 0
