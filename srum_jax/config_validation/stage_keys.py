"""The keys of the SRUM stages: generate, propose, score, train (and its records), eval, run,
prompt sources and the texts file.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence

from srum_jax import paths
from srum_jax.config_checks import (check_bool as _bool, check_enum as _enum, check_float as _float,
                                    check_int as _int, check_pair as _pair, check_subset as _subset,
                                    check_value_in as _check_enum, config_value as _get,
                                    existing_dir as _existing_dir, existing_file as _existing_file,
                                    fail as _fail)
from srum_jax.config_validation.model_keys import (Geometry, check_converted_dir, check_model,
                                                   check_official_dir, image_side)
from srum_jax.data import prompt_sources as prompts_lib
from srum_jax.engine.judge import JUDGE_MODES
from srum_jax.errors import UserError, UserFileNotFoundError, UserValueError
from srum_jax.pipeline import (evaluate, proposers, run as run_stage, train as train_stage,
                               train_data)
from srum_jax.rewards import record_sources, texts as texts_lib
from srum_jax.training import optimizer


def check_guidance(config, key: str) -> None:
  """The flow sampler's schedule and classifier-free guidance keys of the block `key`."""
  _float(config, f"{key}.timestep_shift", lo=0.0, lo_open=True)
  _float(config, f"{key}.cfg_text_scale", lo=0.0)
  _float(config, f"{key}.cfg_img_scale", lo=0.0)
  lo, hi = _pair(config, f"{key}.cfg_interval")
  if not 0.0 <= lo <= hi <= 1.0:
    _fail(f"{key}.cfg_interval", (lo, hi), "must satisfy 0 <= start <= end <= 1")
  _enum(config, f"{key}.cfg_renorm_type", ("global", "channel", "text_channel"))
  _float(config, f"{key}.cfg_renorm_min", lo=0.0, hi=1.0)


def check_generate(config, key: str, geo: Optional[Geometry]) -> None:
  _int(config, f"{key}.batch_size", lo=1)
  _int(config, f"{key}.samples_per_prompt", lo=1)
  image_side(f"{key}.height", _int(config, f"{key}.height", lo=1), geo)
  image_side(f"{key}.width", _int(config, f"{key}.width", lo=1), geo)
  _int(config, f"{key}.num_timesteps", lo=1)
  check_guidance(config, key)
  _bool(config, f"{key}.crop_to_content")
  _bool(config, f"{key}.think")
  _int(config, f"{key}.max_think_tokens", lo=0)
  _int(config, f"{key}.text_budget", lo=0)
  cap = _int(config, f"{key}.max_prompt_tokens", lo=0)
  if geo is not None and cap >= geo.max_positions:
    _fail(
        f"{key}.max_prompt_tokens", cap,
        f"must be below the model's {geo.max_positions} positions (from "
        f"{geo.source}); 0: the model's limit less the markers, the plan and the image")


def check_propose(config) -> None:
  name = _enum(config, "propose.name", proposers.available_proposers())
  _int(config, "propose.max_regions", lo=1)
  _float(config, "propose.min_area", lo=0.0)
  _enum(config, "propose.box_mode", tuple(proposers.BOX_MODES))
  proposers.check_propose_options(config, name)


def check_score(config) -> None:
  s = "score"
  mode = _enum(config, f"{s}.mode", JUDGE_MODES)
  for k in ("think", "use_global", "use_regions", "region_identify"):
    _bool(config, f"{s}.{k}")
  _int(config, f"{s}.batch_size", lo=1)
  _int(config, f"{s}.max_retries", lo=1)
  _float(config, f"{s}.retry_temperature", lo=0.0)
  _int(config, f"{s}.max_new_tokens_global", lo=1)
  _int(config, f"{s}.max_new_tokens_regions", lo=1)
  _float(config, f"{s}.global_default", lo=-1.0, hi=1.0)
  cands = _get(config, f"{s}.logit_candidates")
  try:
    values = [float(c) for c in cands]
  except (TypeError, ValueError):
    values = []
  if not values or not all(-1.0 <= v <= 1.0 for v in values):
    _fail(f"{s}.logit_candidates", cands,
          "must be score strings in [-1, 1], e.g. ('-1.0','0.0','1.0')")
  if config.score.region_identify and mode != "logits":
    _fail(f"{s}.region_identify", True, "needs score.mode='logits'")
  _int(config, f"{s}.max_identify_tokens", lo=1)
  _int(config, f"{s}.text_budget", lo=0)
  vit = _int(config, f"{s}.vit_image_size", lo=0)
  if vit % 14:
    _fail(f"{s}.vit_image_size", vit,
          "must be 0 (the official transform) or a multiple of 14 (the ViT patch)")


def check_train(config, geo: Optional[Geometry]) -> None:
  t = "train"
  if _int(config, f"{t}.steps") < 1:
    _fail(f"{t}.steps", config.train.steps, "must be >= 1 (the number of optimizer updates)")
  _enum(config, f"{t}.objective", train_stage.OBJECTIVES)
  _enum(config, f"{t}.vae_moments", train_stage.VAE_MOMENTS)
  _enum(config, f"{t}.moments_dtype", train_data.MOMENTS_DTYPES)
  _int(config, f"{t}.encode_batch", lo=1)
  _subset(config, f"{t}.freeze", optimizer.FREEZE_GROUPS)
  _float(config, f"{t}.lr", lo=0.0, lo_open=True)
  _enum(config, f"{t}.lr_decay", optimizer.LR_DECAYS)
  _float(config, f"{t}.min_lr_ratio", lo=0.0, hi=1.0)
  _int(config, f"{t}.warmup_steps", lo=0)
  _float(config, f"{t}.b1", lo=0.0, hi=1.0, hi_open=True)
  _float(config, f"{t}.b2", lo=0.0, hi=1.0, hi_open=True)
  _float(config, f"{t}.eps", lo=0.0, lo_open=True)
  _float(config, f"{t}.weight_decay", lo=0.0)
  _float(config, f"{t}.grad_clip", lo=0.0)
  _float(config, f"{t}.timestep_shift", lo=0.0, lo_open=True)
  _float(config, f"{t}.text_cond_dropout", lo=0.0, hi=1.0)
  _float(config, f"{t}.ema_decay", lo=0.0, hi=1.0, hi_open=True)
  rows = _int(config, f"{t}.batch_size", lo=1)
  micro = _int(config, f"{t}.microbatch_rows", lo=0)
  if micro > rows:
    _fail(f"{t}.microbatch_rows", micro, f"must be <= train.batch_size ({rows})")
  for k in ("save_every", "keep_checkpoints", "log_every", "max_regions", "data_threads",
            "samples_per_row"):
    _int(config, f"{t}.{k}", lo=1)
  _int(config, f"{t}.sample_every", lo=0)
  _int(config, f"{t}.data_workers", lo=0)
  _bool(config, f"{t}.sample_posterior")
  H, W = _pair(config, f"{t}.image_hw", int)
  image_side(f"{t}.image_hw", H, geo, (H, W))
  image_side(f"{t}.image_hw", W, geo, (H, W))
  fmt = _enum(config, f"{t}.records_format", record_sources.RECORD_FORMATS)
  if fmt == "official" and not config.train.records:
    _fail(f"{t}.records_format", "official", "needs train.records (stages write this project's)")
  if _enum(config, f"{t}.image_resize", train_data.IMAGE_RESIZES) == "official":
    check_official_resize(config, (H, W), geo)
  S = int(config.train.samples_per_row)
  text = _int(config, f"{t}.text_capacity", lo=1)
  tokens = _int(config, f"{t}.num_tokens", lo=1)
  if geo is not None:  # the data pipeline's text_budget: room for at least one prompt id per sample
    latents = S * (H // geo.latent_stride) * (W // geo.latent_stride)
    per_sample = min(text // S, (tokens - latents) // S) - 4
    if per_sample < 1:
      _fail(
          f"{t}.num_tokens", tokens,
          f"leaves no room for prompt text: {S} samples of {H}x{W} pixels take "
          f"{latents} latent tokens, each sample needs 4 marker slots and >= 1 prompt id "
          f"(text_capacity {text})"
      )
  for k in ("lambda_constraint", "anchor_weight"):
    _float(config, f"srum.{k}", lo=0.0)
  if float(config.srum.anchor_weight) > 0:
    check_prompts(config, "prompts.anchor")
  for k in ("signed_rewards", "use_local", "use_global", "drop_zero_global"):
    _bool(config, f"srum.{k}")


def check_official_resize(config, canvas, geo: Optional[Geometry]) -> None:
  """`train.official_resize` (max, min, stride) of SRUM's training transform: the sizes it makes are
  multiples of the model's latent stride and fit the canvas `train.image_hw`."""
  key, v = "train.official_resize", _get(config, "train.official_resize")
  if (isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != 3
      or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)):
    _fail(key, v, "must be (max_image_size, min_image_size, image_stride), e.g. (1024,512,256)")
  (mx, mn, stride), stride_px = v, (geo.latent_stride if geo is not None else 1)
  if mn > mx or mx % stride or stride % stride_px:
    _fail(key, tuple(v), f"needs min <= max, max a multiple of the stride, the stride a multiple "
          f"of {stride_px} (the model's pixels per latent token side)")
  if min(canvas) < mx:
    _fail("train.image_hw", tuple(canvas), f"the canvas must hold the largest image of "
          f"train.official_resize ({mx}x{mx}), or set train.image_resize='fixed'")


def check_train_inputs(config) -> None:
  """The train command's inputs: `train.records` (default: the score stage's
  `<workdir>/score/rewards.jsonl`; a file or a folder: `rewards.record_sources.resolve` finds the
  file, its format and its images) and, when set, `train.images_root`."""
  if config.train.images_root:
    _existing_dir("train.images_root", config.train.images_root, "images folder")
  if config.train.records:
    t = config.train
    record_sources.resolve(t.records, t.images_root, t.records_format)
  else:
    records = os.path.join(str(config.workdir), "score", "rewards.jsonl")
    if not paths.path(records).is_file():
      why = "is a folder, not a file" if paths.path(records).exists() else "does not exist"
      raise UserFileNotFoundError(f"config key train.records is empty and the score stage's "
                                  f"{records} {why}: run generate, propose and score first, or set "
                                  f"train.records")
  if config.train.images_root:
    _existing_dir("train.images_root", config.train.images_root, "images folder")


def check_prompts(config, key: str, check_files: bool = True) -> None:
  """A prompt source's keys (a partial block takes the defaults of the keys it lacks); a file source
  is read now (existence, UTF-8, JSON, at least one prompt) unless `check_files` is False. A path
  under another source is an error (an override would be ignored); a leftover `function` under
  source=file is not (switching a python source to a file keeps the config file's function)."""
  src = prompts_lib.normalise(_get(config, key), key)
  given = _get(config, key)
  source = src["source"]
  if isinstance(given, str) or given.get("source"):
    _check_enum(f"{key}.source", source, prompts_lib.PROMPT_SOURCES)
  if src["path"] and source != "file":
    _fail(f"{key}.path", src["path"], f"is ignored by {key}.source={source!r}: also set "
          f"--config.{key}.source=file (or clear the path)")
  if src["limit"] is not None and src["limit"] < 1:
    _fail(f"{key}.limit", src["limit"], "must be >= 1 (or None: every prompt)")
  if source == "file":
    _check_enum(f"{key}.format", src["format"], prompts_lib.PROMPT_FORMATS)
    if not src["path"]:
      _fail(f"{key}.path", src["path"], "is empty: set the prompt file (txt, json or jsonl)")
    if not check_files:
      return
    _existing_file(f"{key}.path", src["path"], "prompt file")
    quiet = prompts_lib.log.disabled
    # the stage's own load reports skipped lines; here only errors count
    prompts_lib.log.disabled = True
    try:
      items = prompts_lib.load_prompts(src)
    except UserError as e:
      raise UserValueError(f"config key {key}.path: {e}") from None
    finally:
      prompts_lib.log.disabled = quiet
    prompts_lib.require_prompts(items, key)
  elif source == "python":
    module, sep, fn = str(src["function"]).partition(":")
    if not (module and sep and fn):
      _fail(f"{key}.function", src["function"], "must be 'module.path:function'")


def check_eval(config, own_model: bool, check_files: bool = True) -> Optional[Geometry]:
  """The eval keys; with `own_model` (the eval command) also the model it evaluates:
  `eval.model_dir` (a converted or an official dir), else `model.*`, unless a folder of images is
  judged without the UMM."""
  e = "eval"
  for k in ("batch_size",):
    _int(config, f"{e}.{k}", lo=1)
  _int(config, f"{e}.grid_images", lo=0)
  _int(config, f"{e}.seed")
  judge = _enum(config, f"{e}.judge", evaluate.JUDGES)
  name = str(config.eval.name)
  if not name or not re.fullmatch(r"[A-Za-z0-9._+=-]+", name) or name in (".", ".."):
    _fail(f"{e}.name", name, "must be a non-empty folder name (letters, digits, . _ + = -)")
  if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(config.eval.device)):
    _fail(f"{e}.device", config.eval.device, "must be auto, cpu, cuda or cuda:N")
  if judge == "oracle":
    module, sep, fn = str(config.eval.oracle_fn).partition(":")
    if not (module and sep and fn):
      _fail(f"{e}.oracle_fn", config.eval.oracle_fn,
            "eval.judge='oracle' needs 'module.path:function'")
  if not check_files:
    return None
  if judge == "hf_vlm":
    _existing_dir(f"{e}.hf_vlm_dir", config.eval.hf_vlm_dir, "judge model folder")
  if config.eval.images_dir:
    if not any(_existing_dir(f"{e}.images_dir", config.eval.images_dir, "images folder").iterdir()):
      _fail(f"{e}.images_dir", config.eval.images_dir, "is an empty folder: no image to score")
  for k, what in (("geneval.metadata", "GenEval metadata"), ("reasonbench.prompts",
                                                             "T2I-ReasonBench prompts"),
                  ("reasonbench.questions", "T2I-ReasonBench questions")):
    if _get(config, f"{e}.{k}"):
      _existing_file(f"{e}.{k}", _get(config, f"{e}.{k}"), what)
  metrics = [m.strip() for m in str(config.eval.metrics).split(",") if m.strip()]
  needs_model = not config.eval.images_dir or ("judge" in metrics and judge == "self")
  geo = None
  if own_model and needs_model:
    if config.eval.model_dir:
      p = _existing_dir(f"{e}.model_dir", config.eval.model_dir, "model directory")
      official = not (p / "model_config.json").is_file() and any(p.glob("*.safetensors"))
      geo = (check_official_dir(config, config.eval.model_dir, "eval.model_dir") if official
             else check_converted_dir(config.eval.model_dir, "eval.model_dir"))
    else:
      geo = check_model(config)
  return geo


# ---- The inference commands: sample, edit, ask (pipeline/inference_commands.py).


def check_run(config) -> None:
  if config.train.records_format == "official":  # the loop trains on its own score stage's records
    _fail("train.records_format", "official", "is for the train command; run makes its own records")
  for name in run_stage.eval_set_names(config):  # the eval-only sets: folder names, prompt sources
    check_prompts(config, f"prompts.eval_extra.{name}")
  _int(config, "run.rounds", lo=1)
  _bool(config, "run.sft_control")
  _int(config, "run.report_images", lo=0)


# commands that send texts
TEXTS_COMMANDS = ("generate", "score", "eval", "run", "sample", "edit", "ask")


def check_texts(config, command: str) -> None:
  """`texts.file`: "" / "own" (the project's own wording) or a texts file that loads and checks. A
  config with `texts.require_official` (the paper's run) stops on "" with the line that says how to
  import the official set; `own` stays possible, explicitly. T2I-ReasonBench needs its protocol."""
  value = str(config.texts.file)
  if _bool(config, "texts.require_official") and value == "":
    raise UserValueError(
        "config key texts.file is empty, and this config needs the official BAGEL and SRUM texts: "
        f"{texts_lib.IMPORT_HINT}; then pass --config.texts.file=texts.json "
        "(or --config.texts.file=own for the project's own wording)")
  texts = texts_lib.from_setting(value)
  metrics = [m.strip() for m in str(config.eval.metrics).split(",") if m.strip()]
  if command in ("eval", "run") and "reasonbench" in metrics and not texts.reasonbench:
    raise UserValueError(f"eval.metrics has reasonbench, but texts.file {value!r} holds no "
                         f"T2I-ReasonBench protocol; {texts_lib.IMPORT_HINT}")

# ----------------------------------------------------------------------------------------------
