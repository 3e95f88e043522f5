"""The keys of the inference commands sample, edit and ask.
"""
from __future__ import annotations

from typing import Optional, Sequence

from srum_jax.config_checks import (check_bool as _bool, check_enum as _enum, check_float as _float,
                                    check_int as _int, check_pair as _pair, config_value as _get,
                                    existing_file as _existing_file, fail as _fail)
from srum_jax.config_validation.model_keys import Geometry, image_side
from srum_jax.config_validation.stage_keys import check_generate


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
    image_side(key, hi, geo, tuple(v))


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
