"""The keys of a pretraining stage block (`pretrain`, `pretrain.then`, ...).
"""
from __future__ import annotations

import pathlib

from srum_jax.config_checks import (check_bool as _bool, check_enum as _enum, check_float as _float,
                                    check_int as _int, config_value as _get,
                                    existing_dir as _existing_dir, fail as _fail)
from srum_jax.models.config import DTYPES, PRESETS
from srum_jax.pretrain.batches import TASKS
from srum_jax.training import optimizer


def check_pretrain_stage(config, key: str, check_files: bool = True) -> None:
  """One pretraining stage block (`pretrain` or `pretrain.then`): numbers, dtypes, the data mix, and the
  model dirs it starts from (`init_from`, `ae.from_dir`) unless a saved state resumes it."""
  _enum(config, f"{key}.preset", tuple(sorted(PRESETS)))
  for k in ("compute_dtype", "eval_dtype", "save_dtype"):
    _enum(config, f"{key}.{k}", DTYPES)
  _bool(config, f"{key}.resume")
  _int(config, f"{key}.seed")
  _float(config, f"{key}.max_seconds", lo=0.0, lo_open=True)
  _float(config, f"{key}.snapshot_every_seconds", lo=0.0)
  _int(config, f"{key}.log_every", lo=1)
  _int(config, f"{key}.data_workers", lo=0)
  for block in ("ae", "umm"):
    _float(config, f"{key}.{block}.lr", lo=0.0, lo_open=True)
    _enum(config, f"{key}.{block}.lr_decay", optimizer.LR_DECAYS)
    _int(config, f"{key}.{block}.warmup_steps", lo=0)
  _int(config, f"{key}.ae.steps", lo=0)
  _int(config, f"{key}.ae.batch", lo=1)
  _int(config, f"{key}.umm.steps", lo=1)
  for k in ("und_rows", "und_tokens", "und_samples_per_row", "logit_capacity", "gen_rows", "gen_samples_per_row",
            "gen_text_len"):
    _int(config, f"{key}.umm.{k}", lo=1)
  tasks = _get(config, f"{key}.data.tasks")
  for k in tasks.keys():
    if k not in TASKS:
      _fail(f"{key}.data.tasks.{k}", tasks[k], f"is not a task; tasks: {', '.join(TASKS)}")
    _float(config, f"{key}.data.tasks.{k}", lo=0.0)
  if not sum(float(tasks[k]) for k in tasks.keys()) > 0:
    _fail(f"{key}.data.tasks", tasks.to_dict(), "needs a positive weight")
  for k in ("negatives", "easy_negatives", "distractors", "background_box", "blur", "short_region_answer", "think",
            "think_uncond"):
    _float(config, f"{key}.data.{k}", lo=0.0, hi=1.0)
  block = _get(config, key)
  if not isinstance(block.out, str) or not block.out and key == "pretrain":
    _fail(f"{key}.out", block.out, "must be a folder path")
  resumes = not check_files or block.resume and (pathlib.Path(block.out) / "state").is_dir()
  if block.init_from and not resumes:
    _existing_dir(f"{key}.init_from", block.init_from, "model directory to start from")
  if block.ae.from_dir and not resumes:
    _existing_dir(f"{key}.ae.from_dir", block.ae.from_dir, "model directory whose autoencoder is reused")


# ----------------------------------------------------------------------------------------------
# The texts (issue 28: official texts from the user's checkouts; srum_jax/rewards/texts.py).
