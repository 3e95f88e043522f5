"""Config validation before any work: every key a stage reads, checked for type, range, enum and files.

`validate(config, command)` raises `errors.UserError` with one line naming the first bad key (or file) and
what would work; the CLI prints it and exits with code 2 before any model is loaded or program compiled.
The checks are cheap: JSON files are parsed, prompt files read, model folders listed, and JAX is imported
only by the last check of eval / run (`eval.metrics`, by the evaluation stage's own parser). A model's
geometry (latent stride, largest latent grid, position limit) comes from the converted dir's
`model_config.json` or, for an official checkpoint, the config's `model.preset`.

Which sections a command reads (`SECTIONS`): generate (model and meshes, generate, prompts.train),
propose (propose), score (model, score), train (model, train, srum, prompts.anchor with the anchor
on, its records), eval (eval, eval_generate, score, prompts.val, the model unless a folder of images
is judged without the UMM), run (all of these, run.*, prompts.eval_extra), pretrain (its stage
blocks), and the inference commands sample, edit, ask (model, their block). generate, score, eval,
run and the inference commands also check `texts.file` (`check_texts`).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
import re
from typing import Any, Iterable, Optional, Sequence

import jax

from srum_jax import errors, files, paths
from srum_jax.config_checks import (check_bool as _bool, check_enum as _enum, check_float as _float,
                                    check_int as _int, check_pair as _pair, check_subset as _subset,
                                    check_value_in as _check_enum, config_value as _get,
                                    existing_dir as _existing_dir, existing_file as _existing_file,
                                    fail as _fail)
from srum_jax.convert import hf_to_flax
from srum_jax.data import prompt_sources as prompts_lib
from srum_jax.engine.judge import JUDGE_MODES
from srum_jax.errors import UserError, UserFileNotFoundError, UserValueError
from srum_jax.models.attention import CONFIG_CHOICES as ATTN_IMPLS
from srum_jax.models.config import DTYPES, PRESETS
from srum_jax.models.lora import lora_config
from srum_jax.pipeline import (evaluate, proposers, run as run_stage, train as train_stage,
                               train_data)
from srum_jax.pretrain.batches import TASKS
from srum_jax.rewards import record_sources, texts as texts_lib
from srum_jax.tokenizer import load_tokenizer
from srum_jax.training import optimizer

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


# ------------------------------------------------------------------------------------------------------------
# Small checks (`config_utils`); each raises one line naming the key.

def suggest_key(config, dotted: str) -> str:
  """'config has no key trian.steps (did you mean train.steps?)': the first unknown part and its closest
  sibling; '' when every part exists."""
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


# ------------------------------------------------------------------------------------------------------------
# The model: where it is and the geometry the other checks need.

@dataclasses.dataclass(frozen=True)
class Geometry:
  """What the model allows: pixels per latent token side, the largest latent grid side, RoPE positions."""
  latent_stride: int
  max_latent_size: int
  max_positions: int
  source: str


def _geometry_from(d: dict, source: str) -> Geometry:
  ae, llm = d.get("ae") or {}, d.get("llm") or {}
  ch_mult = ae.get("ch_mult", (1, 2, 4, 4))
  return Geometry(latent_stride=2 ** (len(ch_mult) - 1) * int(d.get("latent_patch_size", 2)),
                  max_latent_size=int(d.get("max_latent_size", 64)),
                  max_positions=int(llm.get("max_position_embeddings", 32768)), source=source)


def _preset_geometry(config, source: str, max_positions: Optional[int] = None) -> Geometry:
  preset = _enum(config, "model.preset", tuple(sorted(PRESETS)))
  cfg = PRESETS[preset]()
  return Geometry(cfg.latent_downsample, cfg.max_latent_size,
                  max_positions or cfg.llm.max_position_embeddings, source)


def check_converted_dir(path: str, key: str) -> Geometry:
  """A converted model dir (`python -m srum_jax convert` output): model_config.json, tokenizer.json and the
  orbax parameters (params/_METADATA)."""
  if not path:
    raise UserValueError(f"config key {key} is empty: set it to a model dir converted by `python -m srum_jax "
                         f"convert` (or set model.official_dir to an official checkpoint)")
  p = _existing_dir(key, path, "model directory")
  if not any(p.iterdir()):
    raise UserValueError(f"config key {key}: model directory {path!r} is empty (convert a checkpoint into it "
                         f"with `python -m srum_jax convert`)")
  for need in ("model_config.json", "tokenizer.json"):
    if not (p / need).is_file():
      raise UserFileNotFoundError(f"config key {key}: model directory {path} lacks {need}")
  if not (p / "params" / "_METADATA").is_file():
    raise UserFileNotFoundError(f"config key {key}: model directory {path} lacks params/_METADATA (an "
                                f"incomplete orbax save; convert or save the model again)")
  d = files.read_json(p / "model_config.json", "model config")
  if not isinstance(d, dict):
    raise UserValueError(f"model config {p / 'model_config.json'}: expected a JSON object")
  try:
    load_tokenizer(str(p))
  except UserError as e:
    raise UserValueError(f"config key {key}: {errors.one_line(e)}") from None
  return _geometry_from(d, str(p / "model_config.json"))


def check_official_dir(config, path: str, key: str) -> Geometry:
  """An official checkpoint dir: its files readable and whole (`hf_to_flax.check_official_files`:
  headers, the json files; a damaged file is named), and a tokenizer this code reads."""
  p = _existing_dir(key, path, "official checkpoint")
  try:
    hf_to_flax.check_official_files(str(p))
    if (p / "tokenizer.json").is_file():
      load_tokenizer(str(p))
  except UserError as e:
    raise UserValueError(f"config key {key}: {errors.one_line(e)}") from None
  llm = files.read_json(p / "llm_config.json", "LLM config")
  return _preset_geometry(config, f"model.preset={config.model.preset}",
                          int(llm.get("max_position_embeddings", 0)) or None)


def check_model(config, check_files: bool = True) -> Optional[Geometry]:
  """The model keys; with `check_files`, the model dir too (and its geometry, else None)."""
  m = "model"
  _enum(config, f"{m}.param_dtype", DTYPES)
  _enum(config, f"{m}.inference_dtype", ("",) + DTYPES)
  _enum(config, f"{m}.compute_dtype", DTYPES)
  _enum(config, f"{m}.attn_impl", ATTN_IMPLS)
  _bool(config, f"{m}.remat")
  _check_remat_lora(config)
  _lora_stages_pending(config)
  _check_mesh(config, "mesh", allow_zero_tensor=True)
  _check_mesh(config, "inference_mesh", allow_zero_tensor=False)
  if not check_files:
    return None
  if config.model.official_dir:
    return check_official_dir(config, config.model.official_dir, "model.official_dir")
  return check_converted_dir(config.model.dir, "model.dir")


# --- LoRA and the remat policy (issue 33) ---------------------------------------------------------------------
def _check_remat_lora(config) -> None:
  """`model.remat_policy`: '' or a jax.checkpoint_policies name; `model.lora`: a LoraConfig (rank 0: none)."""
  policy = config.model.remat_policy
  if policy and not callable(getattr(jax.checkpoint_policies, str(policy), None)):
    _fail("model.remat_policy", policy, "must be '' (save nothing) or a jax.checkpoint_policies name")
  _enum(config, "model.lora.dtype", DTYPES)
  try:
    lora_config(config.model.lora)
  except (ValueError, TypeError) as e:
    _fail("model.lora", config.model.lora.to_dict(), str(e))


def _lora_stages_pending(config) -> None:
  """The stages do not load or save adapters yet (issue 33's stage part): refuse LoRA. Delete when they do."""
  if config.model.lora.rank:
    _fail("model.lora.rank", config.model.lora.rank, "the pipeline stages do not run LoRA yet; set 0")


def _check_mesh(config, key: str, allow_zero_tensor: bool) -> None:
  mesh = _get(config, key)
  unknown = sorted(set(mesh.keys()) - {"data", "fsdp", "tensor"})
  if unknown:
    _fail(key, dict(mesh), f"unknown axes {unknown}; the axes are data, fsdp, tensor")
  for axis in mesh.keys():
    v = _int(config, f"{key}.{axis}", lo=-1)
    if v == 0 and not (allow_zero_tensor and axis == "tensor"):
      _fail(f"{key}.{axis}", v, "must be >= 1, or -1 (the remaining devices)")
  if sum(1 for axis in mesh.keys() if mesh[axis] == -1) > 1:
    _fail(key, dict(mesh), "at most one axis may be -1")


# ------------------------------------------------------------------------------------------------------------
# Stage sections.

def _image_side(key: str, value: int, geo: Optional[Geometry], shown: Any = None) -> None:
  """An image side in pixels (`shown`: the key's whole value, for the message)."""
  shown = value if shown is None else shown
  if value < 1:
    _fail(key, shown, "must be >= 1 pixel")
  if geo is None:
    return
  if value % geo.latent_stride:
    _fail(key, shown, f"sides must be a multiple of {geo.latent_stride} (the model's pixels per latent token side, "
          f"from {geo.source})")
  if value // geo.latent_stride > geo.max_latent_size:
    _fail(key, shown, f"a side exceeds the model's largest image side {geo.max_latent_size * geo.latent_stride} "
          f"pixels (max_latent_size {geo.max_latent_size} x {geo.latent_stride}, from {geo.source})")


def check_generate(config, key: str, geo: Optional[Geometry]) -> None:
  _int(config, f"{key}.batch_size", lo=1)
  _int(config, f"{key}.samples_per_prompt", lo=1)
  _image_side(f"{key}.height", _int(config, f"{key}.height", lo=1), geo)
  _image_side(f"{key}.width", _int(config, f"{key}.width", lo=1), geo)
  _int(config, f"{key}.num_timesteps", lo=1)
  _float(config, f"{key}.timestep_shift", lo=0.0, lo_open=True)
  _float(config, f"{key}.cfg_text_scale", lo=0.0)
  _float(config, f"{key}.cfg_img_scale", lo=0.0)
  lo, hi = _pair(config, f"{key}.cfg_interval")
  if not 0.0 <= lo <= hi <= 1.0:
    _fail(f"{key}.cfg_interval", (lo, hi), "must satisfy 0 <= start <= end <= 1")
  _enum(config, f"{key}.cfg_renorm_type", ("global", "channel", "text_channel"))
  _bool(config, f"{key}.crop_to_content")
  _float(config, f"{key}.cfg_renorm_min", lo=0.0, hi=1.0)
  _bool(config, f"{key}.think")
  _int(config, f"{key}.max_think_tokens", lo=0)
  _int(config, f"{key}.text_budget", lo=0)
  cap = _int(config, f"{key}.max_prompt_tokens", lo=0)
  if geo is not None and cap >= geo.max_positions:
    _fail(f"{key}.max_prompt_tokens", cap, f"must be below the model's {geo.max_positions} positions (from "
          f"{geo.source}); 0: the model's limit less the markers, the plan and the image")


def check_propose(config) -> None:
  _enum(config, "propose.name", proposers.available_proposers())
  _int(config, "propose.max_regions", lo=1)
  _float(config, "propose.min_area", lo=0.0)
  _enum(config, "propose.box_mode", tuple(proposers.BOX_MODES))


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
    _fail(f"{s}.logit_candidates", cands, "must be score strings in [-1, 1], e.g. ('-1.0','0.0','1.0')")
  if config.score.region_identify and mode != "logits":
    _fail(f"{s}.region_identify", True, "needs score.mode='logits'")
  _int(config, f"{s}.max_identify_tokens", lo=1)
  _int(config, f"{s}.text_budget", lo=0)
  vit = _int(config, f"{s}.vit_image_size", lo=0)
  if vit % 14:
    _fail(f"{s}.vit_image_size", vit, "must be 0 (the official transform) or a multiple of 14 (the ViT patch)")


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
  for k in ("save_every", "keep_checkpoints", "log_every", "max_regions", "data_threads", "samples_per_row"):
    _int(config, f"{t}.{k}", lo=1)
  _int(config, f"{t}.sample_every", lo=0)
  _int(config, f"{t}.data_workers", lo=0)
  _bool(config, f"{t}.sample_posterior")
  H, W = _pair(config, f"{t}.image_hw", int)
  _image_side(f"{t}.image_hw", H, geo, (H, W))
  _image_side(f"{t}.image_hw", W, geo, (H, W))
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
      _fail(f"{t}.num_tokens", tokens, f"leaves no room for prompt text: {S} samples of {H}x{W} pixels take "
            f"{latents} latent tokens, each sample needs 4 marker slots and >= 1 prompt id (text_capacity {text})")
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
  """The train command's inputs: `train.records` (default: the score stage's `<workdir>/score/rewards.jsonl`;
  a file or a folder: `rewards.record_sources.resolve` finds the file, its format and its images) and, when
  set, `train.images_root`."""
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
  is read now (existence, UTF-8, JSON, at least one prompt) unless `check_files` is False. A path under
  another source is an error (an override would be ignored); a leftover `function` under source=file
  is not (switching a python source to a file keeps the config file's function)."""
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
    prompts_lib.log.disabled = True  # the stage's own load reports skipped lines; here only errors count
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
  """The eval keys; with `own_model` (the eval command) also the model it evaluates: `eval.model_dir` (a
  converted or an official dir), else `model.*`, unless a folder of images is judged without the UMM."""
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
      _fail(f"{e}.oracle_fn", config.eval.oracle_fn, "eval.judge='oracle' needs 'module.path:function'")
  if not check_files:
    return None
  if judge == "hf_vlm":
    _existing_dir(f"{e}.hf_vlm_dir", config.eval.hf_vlm_dir, "judge model folder")
  if config.eval.images_dir:
    if not any(_existing_dir(f"{e}.images_dir", config.eval.images_dir, "images folder").iterdir()):
      _fail(f"{e}.images_dir", config.eval.images_dir, "is an empty folder: no image to score")
  for k, what in (("geneval.metadata", "GenEval metadata"), ("reasonbench.prompts", "T2I-ReasonBench prompts"),
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

def _seeds(config, key: str) -> None:
  v = _get(config, key)
  if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not all(
      isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 31 for s in v):
    _fail(key, v, "must be a tuple of seeds in [0, 2**31), e.g. (0,1,2); () uses the config's seed")


def _resize(config, key: str, stride_of: int, geo: Optional[Geometry], latent: bool) -> None:
  """An official ImageTransform triple (max side, min side, stride): stride a multiple of
  `stride_of`, max side a multiple of the stride, min <= max; a VAE resize's max side within the
  model's latent grid."""
  v = _get(config, key)
  if (isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != 3
      or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)):
    _fail(key, v, "must be (max_side, min_side, stride), positive integers, e.g. (1024,512,16)")
  hi, lo, stride = v
  if stride % stride_of or hi % stride or lo > hi:
    _fail(key, tuple(v), f"needs a stride that is a multiple of {stride_of}, a max side that is a "
          f"multiple of the stride, and min side <= max side")
  if latent:
    _image_side(key, hi, geo, tuple(v))


def _request_inputs(config, key: str, text_key: str) -> None:
  """An image (+ its text) and/or a requests JSONL file; the files must exist."""
  block = _get(config, key)
  if not block.image and not block.requests:
    _fail(f"{key}.image", block.image,
          f"is empty: give an image and {key}.{text_key}, or {key}.requests")
  if block.image:
    _existing_file(f"{key}.image", block.image, "image")
    if not str(block[text_key]).strip():
      _fail(f"{key}.{text_key}", block[text_key], f"is empty: {key}.image needs its {text_key}")
  if block.requests:
    _existing_file(f"{key}.requests", block.requests, "requests file")


def check_sample(config, geo: Optional[Geometry]) -> None:
  check_generate(config, "sample", geo)
  _seeds(config, "sample.seeds")
  given = _get(config, "sample.prompts")
  if isinstance(given, (str, bytes)) or not all(isinstance(p, str) and p.strip() for p in given):
    _fail("sample.prompts", given, "must be a tuple of non-empty prompts, e.g. ('a red fox',)")
  if config.sample.prompts_file:
    _existing_file("sample.prompts_file", config.sample.prompts_file, "prompt file")
  elif not given:
    _fail("sample.prompts", given, "is empty and so is sample.prompts_file: give prompts")


def check_edit(config, geo: Optional[Geometry]) -> None:
  e = "edit"
  _request_inputs(config, e, "prompt")
  _bool(config, f"{e}.think")
  _bool(config, f"{e}.sample_posterior")
  _int(config, f"{e}.max_think_tokens", lo=1)
  _int(config, f"{e}.num_timesteps", lo=2)
  _float(config, f"{e}.timestep_shift", lo=0.0, lo_open=True)
  _float(config, f"{e}.cfg_text_scale", lo=0.0)
  _float(config, f"{e}.cfg_img_scale", lo=0.0)
  lo, hi = _pair(config, f"{e}.cfg_interval")
  if not 0.0 <= lo <= hi <= 1.0:
    _fail(f"{e}.cfg_interval", (lo, hi), "must satisfy 0 <= start <= end <= 1")
  _enum(config, f"{e}.cfg_renorm_type", ("global", "channel", "text_channel"))
  _float(config, f"{e}.cfg_renorm_min", lo=0.0, hi=1.0)
  _resize(config, f"{e}.vae_transform", geo.latent_stride if geo else 1, geo, latent=True)
  _resize(config, f"{e}.vit_transform", 14, geo, latent=False)
  _int(config, f"{e}.text_budget", lo=0)
  _int(config, f"{e}.batch_size", lo=1)
  _seeds(config, f"{e}.seeds")


def check_ask(config) -> None:
  a = "ask"
  _request_inputs(config, a, "question")
  _bool(config, f"{a}.think")
  _bool(config, f"{a}.do_sample")
  _int(config, f"{a}.max_new_tokens", lo=1)
  _float(config, f"{a}.temperature", lo=0.0, lo_open=True)
  _resize(config, f"{a}.vae_transform", 1, None, latent=False)
  _resize(config, f"{a}.vit_transform", 14, None, latent=False)
  _int(config, f"{a}.text_budget", lo=0)
  _int(config, f"{a}.batch_size", lo=1)

# ---- end of the inference commands


def check_run(config) -> None:
  if config.train.records_format == "official":  # the loop trains on its own score stage's records
    _fail("train.records_format", "official", "is for the train command; run makes its own records")
  for name in run_stage.eval_set_names(config):  # the eval-only sets: folder names, prompt sources
    check_prompts(config, f"prompts.eval_extra.{name}")
  _int(config, "run.rounds", lo=1)
  _bool(config, "run.sft_control")
  _int(config, "run.report_images", lo=0)


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

TEXTS_COMMANDS = ("generate", "score", "eval", "run", "sample", "edit", "ask")  # commands that send texts


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


def _eval_metrics(config) -> None:
  """`eval.metrics` by the evaluation stage's own parser (imported last: it loads JAX)."""
  try:
    evaluate.parse_metrics(config.eval.metrics)
  except ValueError as e:
    raise UserValueError(f"config key {e}") from None


def validate(config, command: str, check_files: bool = True) -> None:
  """Check every key `command` reads; raise `UserError` (one line) on the first problem. `pretrain`
  checks its stage blocks; show-config and sweep are not checked (`sweep` checks each of its
  points). `check_files` False: the values only, not the files and folders they name (a sweep's dry run).
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
  """The message for the first `--config.<key>=...` of `argv` naming a key the config lacks ('' if none)."""
  for a in argv:
    if a.startswith("--config.") and "=" in a:
      msg = suggest_key(config, a[len("--config."):].split("=", 1)[0])
      if msg:
        return msg
  return ""
