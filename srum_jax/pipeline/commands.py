"""CLI entry points of the pipeline stages (`python -m srum_jax <stage> --config=...`).

Standalone stages read and write under `config.workdir`: generate/ (images + metadata), propose/
(regions.jsonl), score/ (rewards.jsonl, stats.json), train/ (checkpoints, tb, samples), eval/<name>/.
A wrong config key fails in the flag parser; bad values, missing files and folders fail in
`config_validation.validate` (called by the CLI), before any work; a stage left with no prompts is an error.
Every stage holds the workdir's lock (`locking.WorkdirLock`) while it runs: a second command on the same
workdir exits with code 2 and one line naming the holder. Before any work each stage claims its
outputs (`provenance`): outputs another configuration made stop it with exit code 2, unless
`discard_stale`. A training stopped by a signal exits with code 75 (its state is saved: the same
command resumes).
"""
from __future__ import annotations

import functools

import jax

from srum_jax import errors, paths
from srum_jax.data.prompt_sources import load_prompts, require_prompts
from srum_jax.engine import loaded_model
from srum_jax.errors import UserValueError
from srum_jax.pipeline import evaluate, generate, propose, provenance, run, score, train
from srum_jax.rewards import record_sources, texts as texts_lib
from srum_jax.workdir import fingerprints, locking


def locked(stage):
  """Run the stage under the workdir's lock (`locking.run_locked`)."""
  @functools.wraps(stage)
  def wrapper(config, flags) -> int:
    command = stage.__name__.replace("_main", "")
    return locking.run_locked(config.workdir, command, lambda: stage(config, flags))
  return wrapper


def _dirs(config):
  w = config.workdir
  return {k: paths.join(w, k) for k in ("generate", "propose", "score", "train", "eval")}


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
  items = load_prompts(config.prompts.train, "prompts.train")
  require_prompts(items, "prompts.train")
  out = _dirs(config)["generate"]
  provenance.claim(config, [provenance.generate_unit(
      config, out, block="generate", model=loaded_model.identity_of(config), seed=config.seed,
      items=items, what="generate")])
  model = _model(config)
  rep = generate.generate(config.generate, model, items, out, seed=config.seed,
                          texts=config_texts(config), compute_dtype=config.model.compute_dtype,
                          attn_impl=loaded_model.attn_impl(config))
  return 1 if rep.skipped_nonfinite else 0


@locked
def propose_main(config, flags) -> int:
  d = _dirs(config)
  generated = fingerprints.fingerprint_of(d["generate"], "metadata")
  provenance.claim(config, [provenance.propose_unit(config, d["propose"], generated)])
  propose.propose(config.propose, d["generate"], d["propose"])
  return 0


@locked
def score_main(config, flags) -> int:
  d = _dirs(config)
  provenance.claim(config, [provenance.score_unit(
      config, d["score"], model=loaded_model.identity_of(config), seed=config.seed,
      generate_fp=fingerprints.fingerprint_of(d["generate"], "metadata"),
      propose_fp=fingerprints.fingerprint_of(d["propose"], "regions"))])
  model = _model(config)
  score.score(config.score, model, d["generate"], d["propose"], d["score"], seed=config.seed,
              texts=config_texts(config), compute_dtype=config.model.compute_dtype,
              attn_impl=loaded_model.attn_impl(config))
  return 0


def check_train_devices(config) -> None:
  """`train.batch_size` rows divide over the training mesh (before any model is loaded)."""
  try:
    train.batch_layout(config, train.train_mesh(config))
  except ValueError as e:
    raise UserValueError(f"config key {errors.one_line(e)} ({jax.device_count()} "
                         f"devices)") from None


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the state is saved; run the same command again to resume


def _preempted(what: str, detail: str) -> int:
  print(f"[{what}] preempted: {detail}; the state is saved: run the same command again to resume "
        f"(exit code {EXIT_PREEMPTED})", flush=True)
  return EXIT_PREEMPTED


@locked
def train_main(config, flags) -> int:
  """Records from `train.records` (default: the score stage's `<workdir>/score/rewards.jsonl`; a
  file of this project's or SRUM's format, or a folder of SRUM's released data:
  `rewards.record_sources`), images from `train.images_root` (default: the generate stage's folder
  for the score stage's records, else found beside the records); writes `<workdir>/train`. Exit
  code 75 when a signal stopped it (rerun to resume)."""
  check_train_devices(config)
  d = _dirs(config)
  if config.train.records:
    t = config.train
    src = record_sources.resolve(t.records, t.images_root, t.records_format)
    records, images_root = src.path, src.images_root
    print(f"[train] records {records} ({src.format}), images under {images_root}", flush=True)
    inputs = {"records_file": provenance.file_digest(records)}
  else:
    records = paths.join(d["score"], "rewards.jsonl")
    inputs = {"score": fingerprints.fingerprint_of(d["score"], "rewards")}
    if inputs["score"] is None:  # records made outside a command: their content
      inputs["records_file"] = provenance.file_digest(records)
    images_root = config.train.images_root or d["generate"]
  if config.train.images_root:
    inputs["images_root"] = config.train.images_root
  unit = provenance.train_unit(config, d["train"], model=loaded_model.identity_of(config),
                               records=inputs, objective=config.train.objective)
  provenance.claim(config, [unit])
  model_dir = loaded_model.resolve_model_dir(config)
  loaded_model.check_model_dir(model_dir)
  summary = train.main(config, model_dir=model_dir, records=records, images_root=images_root,
                       workdir=d["train"])
  if summary["preempted"]:
    return _preempted("train", f"stopped by a signal at step {summary['steps']}")
  loaded_model.write_identity(summary["model_dir"], unit.fingerprint)
  return 0


def _eval_model(config, out_dir: str) -> loaded_model.Model:
  """`eval.model_dir` (a converted model dir, or an official checkpoint converted into `<out_dir>/converted_model`),
  else the config's `model.*`."""
  path = config.eval.model_dir
  if not path:
    return _model(config)
  if loaded_model.is_official_dir(path):
    view = config.copy_and_resolve_references()  # the converter's view of this model; the config is unchanged
    view.model.official_dir, view.workdir = path, out_dir
    path = loaded_model.resolve_model_dir(view)
  loaded_model.check_model_dir(path)
  return loaded_model.load_inference_model(config, path)


@locked
def eval_main(config, flags) -> int:
  """Generate for the prompt set and score (`eval.metrics`), or score `eval.images_dir`; results in
  `<workdir>/eval/<eval.name>` (pipeline/evaluate.py), keyed by the evaluated model's identity as
  well as the name (another model under the same name stops with exit code 2)."""
  ecfg = config.eval
  metrics = evaluate.parse_metrics(ecfg.metrics)
  texts = config_texts(config)
  items = evaluate.eval_items(config, texts)
  require_prompts(items, "prompts.val")
  out = paths.join(_dirs(config)["eval"], ecfg.name)
  needs_umm = not ecfg.images_dir or "judge" in metrics and ecfg.judge == "self"
  identity = loaded_model.identity_of(config, ecfg.model_dir) if needs_umm else None
  provenance.claim(config, provenance.eval_units(config, out, model=identity, items=items,
                                                 name=ecfg.name))
  if ecfg.images_dir:
    evaluate.evaluate_folder(ecfg, config.score, _eval_model(config, out) if needs_umm else None, items,
                             ecfg.images_dir, out, seed=ecfg.seed, texts=texts,
                             compute_dtype=config.model.compute_dtype, name=ecfg.name,
                             attn_impl=loaded_model.attn_impl(config))
  else:
    evaluate.evaluate(ecfg, config.eval_generate, config.score, _eval_model(config, out), items, out,
                      seed=ecfg.seed, texts=texts, compute_dtype=config.model.compute_dtype, name=ecfg.name,
                      attn_impl=loaded_model.attn_impl(config))
  return 0


@locked
def run_main(config, flags) -> int:
  check_train_devices(config)
  try:
    run.run(config)
  except run.Preempted as e:
    return _preempted("run", str(e))
  return 0
