"""Config validation before any work: every key a stage reads, checked for type, range, enum and
files.

`validate(config, command)` raises `errors.UserError` with one line naming the first bad key (or
file) and what would work; the CLI prints it and exits with code 2 before any model is loaded or
program compiled. The checks are cheap: JSON files are parsed, prompt files read, model folders
listed, and JAX is imported only by the last check of eval / run (`eval.metrics`, by the evaluation
stage's own parser). A model's geometry (latent stride, largest latent grid, position limit) comes
from the converted dir's `model_config.json` or, for an official checkpoint, the config's
`model.preset`.

Which sections a command reads (`SECTIONS`): generate (model and meshes, generate, prompts.train),
propose (propose), score (model, score), train (model, train, srum, prompts.anchor with the anchor
on, its records), eval (eval, eval_generate, score, prompts.val, the model unless a folder of images
is judged without the UMM), run (all of these, run.*, prompts.eval_extra), pretrain (its stage
blocks), and the inference commands sample, edit, ask (model, their block). generate, score, eval,
run and the inference commands also check `texts.file` (`check_texts`).
"""
from __future__ import annotations

import difflib
from typing import Iterable

from srum_jax.config_checks import (check_bool as _bool, check_int as _int, config_value as _get,
                                    fail as _fail)
from srum_jax.config_validation.inference_keys import check_ask, check_edit, check_sample
from srum_jax.config_validation.model_keys import check_model
from srum_jax.config_validation.pretrain_keys import check_pretrain_stage
from srum_jax.config_validation.stage_keys import (TEXTS_COMMANDS, check_eval, check_generate,
                                                   check_prompts, check_propose, check_run,
                                                   check_score, check_texts, check_train,
                                                   check_train_inputs)
from srum_jax.errors import UserValueError
from srum_jax.pipeline import evaluate

SECTIONS = {
    "generate": ("model", "generate", "prompts.train"),
    "propose": ("propose",),
    "score": ("model", "score"),
    "train": ("model", "train"),
    "eval": ("eval",),
    "run": ("model", "generate", "prompts.train", "propose", "score", "train", "eval", "run"),
    "sample": ("model", "sample"),  # the inference commands (pipeline/inference_commands.py)
    "edit": ("model", "edit"),
    "ask": ("model", "ask"),
}


# --------------------------------------------------------------------------------------------------
# Small checks (`config_utils`); each raises one line naming the key.


def suggest_key(config, dotted: str) -> str:
  """'config has no key trian.steps (did you mean train.steps?)': the first unknown part and its
  closest sibling; '' when every part exists."""
  node, done = config, []
  for part in dotted.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      bad = ".".join(done + [part])
      close = difflib.get_close_matches(part, [str(k) for k in keys], n=1)
      hint = f" (did you mean {'.'.join(done + close)!s}?)" if close else ""
      return f"config has no key {bad!r}{hint}"
    node, done = node[part], done + [part]
  return ""


# --------------------------------------------------------------------------------------------------
# The model: where it is and the geometry the other checks need.


def _eval_metrics(config) -> None:
  """`eval.metrics` by the evaluation stage's own parser (imported last: it loads JAX)."""
  try:
    evaluate.parse_metrics(config.eval.metrics)
  except ValueError as e:
    raise UserValueError(f"config key {e}") from None


def validate(config, command: str, check_files: bool = True) -> None:
  """Check every key `command` reads; raise `UserError` (one line) on the first problem. `pretrain`
  checks its stage blocks; show-config and sweep are not checked (`sweep` checks each of its
  points). `check_files` False: the values only, not the files and folders they name (a sweep's dry
  run).
  """
  _bool(config, "discard_stale")
  if command == "pretrain":
    key = "pretrain"
    while True:  # the stage and the stages chained after it (`then`)
      check_pretrain_stage(config, key, check_files)
      block = _get(config, key)
      if "then" not in block or not block.then.name:
        return
      key += ".then"
  sections = SECTIONS.get(command)
  if sections is None:
    return
  _int(config, "seed")
  if not str(config.workdir):
    _fail("workdir", config.workdir, "must be a folder path")
  if command in TEXTS_COMMANDS:
    check_texts(config, command)
  geo = check_model(config, check_files) if "model" in sections else None
  if "prompts.train" in sections:
    check_prompts(config, "prompts.train", check_files)
  if "generate" in sections:
    check_generate(config, "generate", geo)
  if "propose" in sections:
    check_propose(config)
  if "score" in sections:
    check_score(config)
  if "train" in sections:
    check_train(config, geo)
  if command == "train" and check_files:
    check_train_inputs(config)
  if "run" in sections:
    check_run(config)
  if "sample" in sections:  # the inference commands
    check_sample(config, geo)
  if "edit" in sections:
    check_edit(config, geo)
  if "ask" in sections:
    check_ask(config)
  if "eval" in sections:
    eval_geo = check_eval(config, own_model=command == "eval", check_files=check_files)
    metrics = [m.strip() for m in str(config.eval.metrics).split(",") if m.strip()]
    if not ({"geneval", "reasonbench"} & set(metrics)):
      check_prompts(config, "prompts.val", check_files)
    if not config.eval.images_dir or command == "run":
      check_generate(config, "eval_generate", eval_geo or geo)
    if "judge" in metrics and config.eval.judge == "self" or command == "run":
      check_score(config)
    _eval_metrics(config)


def first_unknown_override(config, argv: Iterable[str]) -> str:
  """The message for the first `--config.<key>=...` of `argv` naming a key the config lacks (''
  if none)."""
  for a in argv:
    if a.startswith("--config.") and "=" in a:
      msg = suggest_key(config, a[len("--config."):].split("=", 1)[0])
      if msg:
        return msg
  return ""
