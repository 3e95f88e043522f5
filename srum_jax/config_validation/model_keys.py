"""The model keys: where the model is (a converted or an official dir, checked whole) and the
geometry (`Geometry`) the other checks need; meshes; LoRA settings.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

from srum_jax import errors, files
from srum_jax.config_checks import (check_bool as _bool, check_enum as _enum, check_int as _int,
                                    config_value as _get, existing_dir as _existing_dir,
                                    fail as _fail)
from srum_jax.convert import checkpoint, hf_to_flax
from srum_jax.errors import UserError, UserFileNotFoundError, UserValueError
from srum_jax.models.attention import CONFIG_CHOICES as ATTN_IMPLS
from srum_jax.models.config import DTYPES, PRESETS
from srum_jax.models.lora import lora_config
from srum_jax.tokenizer import load_tokenizer


@dataclasses.dataclass(frozen=True)
class Geometry:
  """What the model allows: pixels per latent token side, the largest latent grid side, RoPE
  positions."""
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
  """A converted model dir (`python -m srum_jax convert` output): model_config.json, tokenizer.json
  and the orbax parameters (params/_METADATA)."""
  if not path:
    raise UserValueError(
        f"config key {key} is empty: set it to a model dir converted by `python -m srum_jax "
        f"convert` (or set model.official_dir to an official checkpoint)")
  p = _existing_dir(key, path, "model directory")
  if not any(p.iterdir()):
    raise UserValueError(
        f"config key {key}: model directory {path!r} is empty (convert a checkpoint into it "
        f"with `python -m srum_jax convert`)")
  for need in ("model_config.json", "tokenizer.json"):
    if not (p / need).is_file():
      raise UserFileNotFoundError(f"config key {key}: model directory {path} lacks {need}")
  if not (p / "params" / "_METADATA").is_file():
    raise UserFileNotFoundError(
        f"config key {key}: model directory {path} lacks params/_METADATA (an "
        f"incomplete orbax save; convert or save the model again)")
  d = files.read_json(p / "model_config.json", "model config")
  if not isinstance(d, dict):
    raise UserValueError(f"model config {p / 'model_config.json'}: expected a JSON object")
  checkpoint.resolve_base(str(p))  # an adapters-only dir: its base is there (a UserError when not)
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
  _check_mesh(config, "mesh", allow_zero_tensor=True)
  _check_mesh(config, "inference_mesh", allow_zero_tensor=False)
  if not check_files:
    return None
  if config.model.official_dir:
    return check_official_dir(config, config.model.official_dir, "model.official_dir")
  return check_converted_dir(config.model.dir, "model.dir")


# --- LoRA and the remat policy (issue 33) ---------------------------------------------------------
def _check_remat_lora(config) -> None:
  """`model.remat_policy`: '' or a jax.checkpoint_policies name; `model.lora`: a LoraConfig (rank
  0: none)."""
  policy = config.model.remat_policy
  if policy and not callable(getattr(jax.checkpoint_policies, str(policy), None)):
    _fail("model.remat_policy", policy,
          "must be '' (save nothing) or a jax.checkpoint_policies name")
  _enum(config, "model.lora.dtype", DTYPES)
  try:
    lora_config(config.model.lora)
  except (ValueError, TypeError) as e:
    _fail("model.lora", config.model.lora.to_dict(), str(e))


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


# --------------------------------------------------------------------------------------------------
# Stage sections.


def image_side(key: str, value: int, geo: Optional[Geometry], shown: Any = None) -> None:
  """An image side in pixels (`shown`: the key's whole value, for the message)."""
  shown = value if shown is None else shown
  if value < 1:
    _fail(key, shown, "must be >= 1 pixel")
  if geo is None:
    return
  if value % geo.latent_stride:
    _fail(
        key, shown,
        f"sides must be a multiple of {geo.latent_stride} (the model's pixels per latent token "
        f"side, "
        f"from {geo.source})")
  if value // geo.latent_stride > geo.max_latent_size:
    _fail(
        key, shown,
        f"a side exceeds the model's largest image side {geo.max_latent_size * geo.latent_stride} "
        f"pixels (max_latent_size {geo.max_latent_size} x {geo.latent_stride}, from {geo.source})")
