"""CLI entry points of the pipeline stages (`python -m srum_jax <stage> --config=...`).

Standalone stages read and write under `config.workdir`: generate/ (images + metadata), propose/
(regions.jsonl), score/ (rewards.jsonl, stats.json), train/ (checkpoints, tb, samples), eval/<name>/.
A wrong config key fails in the flag parser; bad values, missing files and folders fail in
`config_validation.validate` (called by the CLI), before any work; a stage left with no prompts is an error.
Every stage holds the workdir's lock (`locking.WorkdirLock`) while it runs: a second command on the same
workdir exits with code 2 and one line naming the holder.
"""
from __future__ import annotations

import functools
import os
import sys

from srum_jax import distributed, paths
from srum_jax.data.prompt_sources import load_prompts, require_prompts
from srum_jax.engine import loaded_model
from srum_jax.pipeline import evaluate, generate, propose, run, score, train
from srum_jax.rewards import texts as texts_lib
from srum_jax.workdir import locking

EXIT_USAGE = 2


def locked(stage):
  """Run the stage under the workdir's lock (after jax.distributed is up: only process 0 takes it, and every
  process of the run stops when it cannot)."""
  @functools.wraps(stage)
  def wrapper(config, flags) -> int:
    distributed.maybe_initialize()
    lock, busy = locking.workdir_lock(config.workdir, command=stage.__name__.replace("_main", "")), None
    try:
      lock.acquire()
    except locking.WorkdirBusy as e:
      busy = str(e)
    if distributed.any_process(busy is not None):
      print(f"error: {busy or f'workdir {config.workdir} is in use (process 0 could not take its lock)'}",
            file=sys.stderr, flush=True)
      return EXIT_USAGE
    try:
      return stage(config, flags)
    finally:
      lock.release()
  return wrapper


def _dirs(config):
  w = config.workdir
  return {k: os.path.join(w, k) for k in ("generate", "propose", "score", "train", "eval")}


def config_texts(config) -> texts_lib.Texts:
  """The texts the config names (`texts.file`: "" / "own" or a texts file; `rewards.texts`)."""
  return texts_lib.from_setting(config.texts.file)


def _model(config) -> loaded_model.Model:
  """The config's model, placed for inference (`loaded_model.load_inference_model`)."""
  model_dir = loaded_model.resolve_model_dir(config)
  loaded_model.check_model_dir(model_dir)
  return loaded_model.load_inference_model(config, model_dir)


@locked
def generate_main(config, flags) -> int:
  distributed.maybe_initialize()
  items = load_prompts(config.prompts.train)
  require_prompts(items, "prompts.train")
  model = _model(config)
  rep = generate.generate(config.generate, model, items, _dirs(config)["generate"], seed=config.seed,
                          texts=config_texts(config), compute_dtype=config.model.compute_dtype,
                          attn_impl=loaded_model.attn_impl(config))
  return 1 if rep.skipped_nonfinite else 0


@locked
def propose_main(config, flags) -> int:
  distributed.maybe_initialize()
  d = _dirs(config)
  propose.propose(config.propose, d["generate"], d["propose"],
                  mesh=loaded_model.inference_mesh(config))
  return 0


@locked
def score_main(config, flags) -> int:
  distributed.maybe_initialize()
  model = _model(config)
  d = _dirs(config)
  score.score(config.score, model, d["generate"], d["propose"], d["score"], seed=config.seed,
              texts=config_texts(config), compute_dtype=config.model.compute_dtype,
              attn_impl=loaded_model.attn_impl(config))
  return 0


@locked
def train_main(config, flags) -> int:
  """Records from `train.records` (default: the score stage's `<workdir>/score/rewards.jsonl`), images from
  `train.images_root` (default: the generate stage's folder when the records are the score stage's, else the
  records' folder); writes `<workdir>/train`."""
  d = _dirs(config)
  records = config.train.records or os.path.join(d["score"], "rewards.jsonl")
  images_root = config.train.images_root or (d["generate"] if not config.train.records
                                             else os.path.dirname(paths.abspath(records)))
  model_dir = loaded_model.resolve_model_dir(config)
  loaded_model.check_model_dir(model_dir)
  train.main(config, model_dir=model_dir, records=records, images_root=images_root, workdir=d["train"])
  return 0


def _eval_model(config, out_dir: str) -> loaded_model.Model:
  """`eval.model_dir` (a converted model dir, or an official checkpoint converted into `<out_dir>/converted_model`),
  else the config's `model.*`."""
  path = config.eval.model_dir
  if not path:
    return _model(config)
  p = paths.path(path)
  if p.is_dir() and not (p / "model_config.json").is_file() and any(p.glob("*.safetensors")):
    view = config.copy_and_resolve_references()  # the converter's view of this model; the config is unchanged
    view.model.official_dir, view.workdir = path, out_dir
    path = loaded_model.resolve_model_dir(view)
  loaded_model.check_model_dir(path)
  return loaded_model.load_inference_model(config, path)


@locked
def eval_main(config, flags) -> int:
  """Generate for the prompt set and score (`eval.metrics`), or score `eval.images_dir`; results in
  `<workdir>/eval/<eval.name>` (pipeline/evaluate.py)."""
  distributed.maybe_initialize()
  ecfg = config.eval
  metrics = evaluate.parse_metrics(ecfg.metrics)
  texts = config_texts(config)
  items = evaluate.eval_items(config, texts)
  require_prompts(items, "prompts.val")
  out = os.path.join(_dirs(config)["eval"], ecfg.name)
  if ecfg.images_dir:
    needs_umm = "judge" in metrics and ecfg.judge == "self"
    evaluate.evaluate_folder(ecfg, config.score, _eval_model(config, out) if needs_umm else None, items,
                             ecfg.images_dir, out, seed=ecfg.seed, texts=texts,
                             compute_dtype=config.model.compute_dtype, name=ecfg.name,
                             attn_impl=loaded_model.attn_impl(config))
  else:
    evaluate.evaluate(ecfg, config.eval_generate, config.score, _eval_model(config, out), items, out,
                      seed=ecfg.seed, texts=texts, compute_dtype=config.model.compute_dtype, name=ecfg.name,
                      attn_impl=loaded_model.attn_impl(config))
  return 0


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the state is saved; run the same command again to resume


@locked
def run_main(config, flags) -> int:
  distributed.maybe_initialize()
  try:
    run.run(config)
  except run.Preempted as e:
    print(f"[run] preempted: {e}", flush=True)
    return EXIT_PREEMPTED
  return 0
