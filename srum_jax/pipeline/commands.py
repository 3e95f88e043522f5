"""CLI entry points of the pipeline stages (`python -m srum_jax <stage> --config=...`).

Standalone stages read and write under `config.workdir`: generate/ (images + metadata), propose/
(regions.jsonl), score/ (rewards.jsonl, stats.json), train/ (checkpoints, tb, samples), eval/<name>/.
A wrong config key fails in the flag parser; a missing model directory fails here, before any work.
"""
from __future__ import annotations

import os

from srum_jax import distributed
from srum_jax.pipeline import common


def _dirs(config):
  w = config.workdir
  return {k: os.path.join(w, k) for k in ("generate", "propose", "score", "train", "eval")}


def _model(config) -> common.Model:
  common.resolve_model_dir(config)
  common.check_model_dir(config.model.dir)
  return common.load_model(config.model.dir)


def generate_main(config, opts) -> int:
  from srum_jax.pipeline import generate
  from srum_jax.pipeline.prompts import load_prompts
  distributed.maybe_initialize()
  model = _model(config)
  items = load_prompts(config.prompts.train)
  generate.generate(config.generate, model, items, _dirs(config)["generate"], seed=config.seed,
                    compute_dtype=config.model.compute_dtype)
  return 0


def propose_main(config, opts) -> int:
  from srum_jax.pipeline import propose
  d = _dirs(config)
  propose.propose(config.propose, d["generate"], d["propose"])
  return 0


def score_main(config, opts) -> int:
  from srum_jax.pipeline import score
  distributed.maybe_initialize()
  model = _model(config)
  d = _dirs(config)
  score.score(config.score, model, d["generate"], d["propose"], d["score"], seed=config.seed,
              compute_dtype=config.model.compute_dtype)
  return 0


def train_main(config, opts) -> int:
  from srum_jax.pipeline import train
  d = _dirs(config)
  if not config.train.records:
    with config.unlocked():
      config.train.records = os.path.join(d["score"], "rewards.jsonl")
      config.train.images_root = config.train.images_root or d["generate"]
  common.resolve_model_dir(config)
  common.check_model_dir(config.model.dir)
  with config.unlocked():
    config.workdir = d["train"]
  return train.main(config, opts)


def eval_main(config, opts) -> int:
  from srum_jax.pipeline import evaluate
  from srum_jax.pipeline.prompts import load_prompts
  distributed.maybe_initialize()
  model = _model(config)
  items = load_prompts(config.prompts.val)
  evaluate.evaluate(config.eval, config.eval_generate, config.score, model, items,
                    os.path.join(_dirs(config)["eval"], "model"), seed=config.eval.seed,
                    compute_dtype=config.model.compute_dtype)
  return 0


def run_main(config, opts) -> int:
  from srum_jax.pipeline import run
  distributed.maybe_initialize()
  common.resolve_model_dir(config)
  run.run(config)
  return 0
