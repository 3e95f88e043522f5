"""Official BAGEL checkpoint directory -> converted model directory (orbax params +
model_config.json).

Checkpoint layout: docs/bagel.md, "Checkpoint layout" (patch embedding already in Linear form, fixed
tables). The source directory holds `llm_config.json`, `vit_config.json` (HF json; the ViT really
uses `num_hidden_layers - 1` layers), `ema.safetensors` (or `model.safetensors` from SRUM training,
which has no ViT), `ae.safetensors` and tokenizer files.

Conversion streams: every parameter is built with `jax.make_array_from_callback` directly on its
target sharding, and each callback reads only its shard's block of each needed official tensor
(`safe_open(...).get_slice(key)[...]`, one layer at a time for stacked leaves), so host memory peaks
near one tensor, not one model. Every layout problem (missing / unexpected / mis-shaped / truncated
keys) is collected first and raised as one `CheckpointMismatchError` before anything is read.

Values the official loaders hard-code are inferred from tensor shapes where possible
(max_latent_size, vit_max_num_patch_per_side, ViT image size, latent_patch_size, timestep_embed_dim
and the AE's ch / ch_mult / num_res_blocks / z_channels / channels); the rest are flags with the
official defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import sys
import warnings
from typing import Any, Dict, List, Optional, Tuple

import jax
import ml_dtypes  # registers bfloat16 with numpy, which safetensors' numpy reader needs
import numpy as np

from srum_jax import files, paths, sharding as sharding_lib
from srum_jax.convert import checkpoint, keymap
from srum_jax.convert.safetensors_files import (ST_DTYPES, CheckpointMismatchError,
                                                NonFiniteWeightsError, SafetensorsReader,
                                                parse_dtype, problem_listing, raise_damaged,
                                                read_header)
from srum_jax.errors import UserError, UserFileNotFoundError, UserValueError
from srum_jax.models import embeddings, params as params_lib
from srum_jax.models.config import AEConfig, BagelConfig, LLMConfig, SpecialTokens, ViTConfig

log = logging.getLogger(__name__)

WEIGHT_FILES = ("ema.safetensors", "model.safetensors")
AE_FILE = "ae.safetensors"
LLM_JSON = "llm_config.json"
VIT_JSON = "vit_config.json"
# Values the official code hard-codes rather than stores (AE resolution and latent scale, timestep
# shift,
# special ids, ...). The exporter writes them here for checkpoints that differ from BAGEL-7B-MoT
# (the tiny shapes-world model); `load_official` takes them as defaults, explicit arguments win.
EXTRAS_JSON = "srum_jax_extras.json"
EXTRA_KEYS = ("max_latent_size", "vit_max_num_patch_per_side", "connector_act", "timestep_shift",
              "ae_resolution", "scale_factor", "shift_factor", "tokens")
# Copied verbatim into the model directory (the exporter copies them back).
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
             "special_tokens_map.json", "added_tokens.json", "generation_config.json",
             "preprocessor_config.json", LLM_JSON, VIT_JSON)

def check_official_files(src_dir: str, weights: Optional[str] = None) -> None:
  """What a conversion needs, checked without reading a tensor: the weights and AE files with
  readable headers whose byte ranges fit the files (else `DamagedFileError`), a JSON
  `llm_config.json`, and a `vit_config.json` when the weights hold a ViT (`CheckpointMismatchError`
  / `UserFileNotFoundError`)."""
  names = {"bagel": _weights_file(src_dir, weights), "ae": AE_FILE}
  for n in names.values():
    if not os.path.isfile(os.path.join(src_dir, n)):
      raise UserFileNotFoundError(f"official checkpoint {src_dir} lacks {n}")
  llm = files.read_json_if_present(os.path.join(src_dir, LLM_JSON), "checkpoint config")
  if not isinstance(llm, dict):
    raise UserFileNotFoundError(f"official checkpoint {src_dir} lacks {LLM_JSON} (a JSON object)")
  header, bad = read_header(os.path.join(src_dir, names["bagel"]))
  raise_damaged(os.path.join(src_dir, names["bagel"]), bad)
  raise_damaged(os.path.join(src_dir, AE_FILE), read_header(os.path.join(src_dir, AE_FILE))[1])
  vit = files.read_json_if_present(os.path.join(src_dir, VIT_JSON), "checkpoint config")
  if any(k.startswith(("vit_model.", "connector.")) for k in header) and not isinstance(vit, dict):
    raise CheckpointMismatchError(f"official checkpoint {src_dir}: the weights hold vit_model.* "
                                  f"keys but there is no {VIT_JSON} (a JSON object)")


def check_destination(src: str, dst: str, command: str) -> None:
  """`--dst` is neither `--src` (nor a folder holding it, nor inside it) nor an existing file:
  refused before anything is written."""
  a, b = os.path.realpath(src), os.path.realpath(dst)
  if a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep):
    raise UserValueError(f"--dst {dst} is --src {src}, holds it or lies in it: write the {command} "
                         f"result to a folder of its own")
  if os.path.exists(dst) and not os.path.isdir(dst):
    raise UserValueError(f"--dst {dst} is a file: name a folder (it is made when absent)")


def _grid(shape, key: str, problems: List[str]) -> Optional[int]:
  """Side G of a [G*G, D] table (None and a problem when the row count is not a square)."""
  if shape is None or len(shape) != 2:
    return None
  g = math.isqrt(shape[0])
  if g * g != shape[0]:
    problems.append(f"{key}: {shape[0]} rows is not a square grid G*G")
    return None
  return g


def _pick(name: str, flag, inferred, default):
  """Flag beats inferred beats default; a flag that contradicts the checkpoint is allowed but
  noted."""
  if flag is not None:
    if inferred is not None and flag != inferred:
      warnings.warn(f"{name}={flag} given, checkpoint implies {inferred}; using {flag}")
    return flag
  return inferred if inferred is not None else default


def _llm_config(llm_json: Dict[str, Any], problems: List[str]) -> LLMConfig:
  """The LLM from `llm_config.json` (qk_norm is always on, as every official loader sets it)."""
  required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads")
  missing = [k for k in required if k not in llm_json]
  if missing:
    raise CheckpointMismatchError(f"{LLM_JSON} lacks {missing}")
  dl = LLMConfig()
  llm = LLMConfig(
      **{k: int(llm_json[k]) for k in required},
      rope_theta=float(llm_json.get("rope_theta", dl.rope_theta)), rms_norm_eps=float(
          llm_json.get("rms_norm_eps", dl.rms_norm_eps)), max_position_embeddings=int(
              llm_json.get("max_position_embeddings", dl.max_position_embeddings)), qk_norm=True)
  if llm.hidden_size % llm.num_attention_heads:
    problems.append(
        f"{LLM_JSON}: hidden_size {llm.hidden_size} not divisible by {llm.num_attention_heads} "
        f"heads"
    )
  return llm


def _vit_config(vit_json: Optional[Dict[str, Any]], shapes: Dict[str, Tuple[int, ...]],
                problems: List[str]) -> Optional[ViTConfig]:
  """The ViT from `vit_config.json` with one layer fewer than the json says (the official loader
  drops the last one); None when the weights hold no `vit_model.*` keys."""
  if not any(k.startswith(("vit_model.", "connector.", keymap.VIT_POS_KEY)) for k in shapes):
    return None
  if vit_json is None:
    raise CheckpointMismatchError(f"the weights hold vit_model.* keys but there is no {VIT_JSON}")
  missing = [
      k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
      if k not in vit_json
  ]
  if missing:
    raise CheckpointMismatchError(f"{VIT_JSON} lacks {missing}")
  dv = ViTConfig()
  patch = int(vit_json.get("patch_size", dv.patch_size))
  image_size = int(vit_json.get("image_size", dv.image_size))
  pos_key = "vit_model.vision_model.embeddings.position_embedding.weight"
  side = _grid(shapes.get(pos_key), pos_key, problems)
  if side is not None and side * patch != image_size:
    warnings.warn(
        f"{VIT_JSON} image_size {image_size} disagrees with {pos_key} ({side}x{side} patches "
        f"of {patch}); using image_size {side * patch}")
    image_size = side * patch
  return ViTConfig(
      hidden_size=int(vit_json["hidden_size"]), intermediate_size=int(
          vit_json["intermediate_size"]), num_hidden_layers=int(vit_json["num_hidden_layers"]) - 1,
      num_attention_heads=int(vit_json["num_attention_heads"]), patch_size=patch,
      image_size=image_size, layer_norm_eps=float(
          vit_json.get("layer_norm_eps", dv.layer_norm_eps)))


def _ae_config(ae_shapes: Dict[str, Tuple[int, ...]], *, resolution: Optional[int],
               scale_factor: Optional[float], shift_factor: Optional[float]) -> AEConfig:
  """The AE's structure from its tensor shapes (the official loader hard-codes it)."""
  da = AEConfig()
  conv_in = ae_shapes.get("encoder.conv_in.weight")
  ch = conv_in[0] if conv_in else da.ch
  levels = 0
  while f"encoder.down.{levels}.block.0.conv1.weight" in ae_shapes:
    levels += 1
  ch_mult = tuple(
      ae_shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
  blocks = 0
  while f"encoder.down.0.block.{blocks}.conv1.weight" in ae_shapes:
    blocks += 1
  conv_out = ae_shapes.get("encoder.conv_out.weight")
  dec_out = ae_shapes.get("decoder.conv_out.weight")
  return AEConfig(
      resolution=resolution if resolution is not None else da.resolution,
      in_channels=conv_in[1] if conv_in else da.in_channels, ch=ch,
      out_ch=dec_out[0] if dec_out else da.out_ch, ch_mult=ch_mult or da.ch_mult,
      num_res_blocks=blocks or da.num_res_blocks,
      z_channels=conv_out[0] // 2 if conv_out else da.z_channels,
      scale_factor=scale_factor if scale_factor is not None else da.scale_factor,
      shift_factor=shift_factor if shift_factor is not None else da.shift_factor)


def infer_config(
    llm_json: Dict[str, Any],
    vit_json: Optional[Dict[str, Any]],
    shapes: Dict[str, Tuple[int, ...]],
    ae_shapes: Dict[str, Tuple[int, ...]],
    *,
    max_latent_size: Optional[int] = None,
    vit_max_num_patch_per_side: Optional[int] = None,
    connector_act: Optional[str] = None,
    timestep_shift: Optional[float] = None,
    ae_resolution: Optional[int] = None,
    scale_factor: Optional[float] = None,
    shift_factor: Optional[float] = None,
    tokens: Optional[SpecialTokens] = None,
) -> Tuple[BagelConfig, List[str]]:
  """(BagelConfig, problems) from the HF json files and the official tensor shapes.

  The LLM and the ViT come from their json files, the AE and the values the official code hard-codes
  from the tensor shapes or from flags (flags win, with a warning).
  """
  problems: List[str] = []
  base = BagelConfig()
  llm = _llm_config(llm_json, problems)
  vit = _vit_config(vit_json, shapes, problems)
  ae = _ae_config(ae_shapes, resolution=ae_resolution, scale_factor=scale_factor,
                  shift_factor=shift_factor)
  p = base.latent_patch_size
  if "vae2llm.weight" in shapes:
    in_dim = shapes["vae2llm.weight"][1]
    p = math.isqrt(max(in_dim // ae.z_channels, 0))
    if p * p * ae.z_channels != in_dim:
      problems.append(f"vae2llm.weight: in-dim {in_dim} is not p*p*z for z={ae.z_channels}")
      p = base.latent_patch_size
  t_in = shapes.get("time_embedder.mlp.0.weight")
  cfg = BagelConfig(
      llm=llm, vit=vit, ae=ae, tokens=tokens or SpecialTokens(), latent_patch_size=p,
      max_latent_size=_pick(
          "max_latent_size", max_latent_size,
          _grid(shapes.get(keymap.LATENT_POS_KEY), keymap.LATENT_POS_KEY, problems),
          base.max_latent_size), vit_max_num_patch_per_side=_pick(
              "vit_max_num_patch_per_side", vit_max_num_patch_per_side,
              _grid(shapes.get(keymap.VIT_POS_KEY), keymap.VIT_POS_KEY, problems),
              base.vit_max_num_patch_per_side), connector_act=connector_act or base.connector_act,
      timestep_shift=timestep_shift if timestep_shift is not None else base.timestep_shift,
      timestep_embed_dim=t_in[1] if t_in else base.timestep_embed_dim)
  return cfg, problems


def check_layout(cfg: BagelConfig, shapes: Dict[str, Dict[str, Tuple[int, ...]]],
                 weight_files: Dict[str, str]) -> List[str]:
  """Problems (missing / unexpected / mis-shaped keys) of the official files against `cfg`.

  `shapes` / `weight_files` are keyed 'bagel' and 'ae'. The fixed sin-cos tables are optional (they
  are recomputed); when present they must be [G*G, D].
  """
  expected = keymap.expected_official_shapes(cfg)
  tables = keymap.fixed_tables(cfg)
  problems = []
  for part in ("bagel", "ae"):
    want = {k: v for k, v in expected[part].items() if k not in tables}
    have = shapes[part]
    name = weight_files[part]
    missing = sorted(set(want) - set(have))
    unexpected = sorted(k for k in have if k not in want and k not in tables)
    misshaped = [f"{k}: file {list(have[k])}, expected {list(want[k])}" for k in sorted(want)
                 if k in have and tuple(have[k]) != tuple(want[k])]
    for key in tables if part == "bagel" else ():
      if key in have and (len(have[key]) != 2 or have[key][1] != cfg.llm.hidden_size
                          or math.isqrt(have[key][0]) ** 2 != have[key][0]):
        misshaped.append(f"{key}: file {list(have[key])}, expected [G*G, {cfg.llm.hidden_size}]")
    if missing:
      problems.append(problem_listing(f"{name}: {len(missing)} missing keys", missing))
    if unexpected:
      problems.append(problem_listing(f"{name}: {len(unexpected)} unexpected keys", unexpected))
    if misshaped:
      problems.append(problem_listing(f"{name}: {len(misshaped)} mis-shaped keys", misshaped))
  return problems


# ----------------------------------------------------------------------------------------------
# streaming tensors onto their shardings

def _block(reader: SafetensorsReader, key: str, index, transform: str, dtype) -> np.ndarray:
  """Flax-layout block `leaf[index]` of one official tensor, cast to `dtype`."""
  raw = reader.read(key, keymap.official_index(index, transform))
  return np.array(keymap.to_flax(raw, transform), dtype=dtype, order="C")


def _finite_block(reader, key: str, index, transform: str, dtype, nonfinite: set) -> np.ndarray:
  """`_block`, with `key` added to `nonfinite` when the block holds NaN or inf (checked in float32:
  a bf16 or fp16 block's own values, whatever the target dtype)."""
  block = _block(reader, key, index, transform, dtype)
  if not np.isfinite(block.astype(np.float32)).all():
    nonfinite.add(key)
  return block


def _leaf_array(reader, keys: List[str], transform: str, stacked: bool, shape, sharding, dtype,
                nonfinite: set) -> jax.Array:
  """One parameter built shard by shard; a stacked leaf reads each needed layer's block separately.
  Official tensors with non-finite values are added to `nonfinite`."""
  cache: Dict[Any, np.ndarray] = {}  # replicated shards share one read

  def callback(index):
    index = tuple(index)
    sig = tuple((s.start, s.stop, s.step) for s in index)
    if sig not in cache:
      if stacked:
        layers = range(*index[0].indices(shape[0]))
        cache[sig] = np.stack([
            _finite_block(reader, keys[l], index[1:], transform, dtype, nonfinite) for l in layers
        ])
      else:
        cache[sig] = _finite_block(reader, keys[0], index, transform, dtype, nonfinite)
    return cache[sig]

  # wait for the host->device copies so the host blocks are freed before the next leaf is read
  return jax.make_array_from_callback(tuple(shape), sharding, callback).block_until_ready()


def stream_params(readers: Dict[str, SafetensorsReader], cfg: BagelConfig, dtype,
                  shardings) -> Dict[str, Any]:
  """{'bagel', 'ae'} parameter tree read block-wise from the official files onto `shardings`;
  official tensors holding NaN or inf raise `NonFiniteWeightsError` naming them (after every tensor
  was read)."""
  abstract = params_lib.abstract_params(params_lib.model_schema(cfg))
  out, nonfinite = {}, set()
  for part, table in keymap.official_keys(cfg).items():
    by_path: Dict[Tuple[str, ...], Dict[Optional[int], str]] = {}
    transforms = {}
    for key, e in table.items():
      by_path.setdefault(e.path, {})[e.layer] = key
      transforms[e.path] = e.transform
    leaves = {}
    for path, layer_keys in by_path.items():
      stacked = None not in layer_keys
      keys = [layer_keys[i] for i in sorted(layer_keys)] if stacked else [layer_keys[None]]
      leaves[path] = _leaf_array(readers[part], keys, transforms[path], stacked,
                                 keymap.get_path(abstract[part], path).shape,
                                 keymap.get_path(shardings[part], path), dtype, nonfinite)
    out[part] = jax.tree_util.tree_map_with_path(
        lambda kp, _: leaves[tuple(k.key for k in kp)], abstract[part])
  if nonfinite:
    names = sorted(nonfinite)
    raise NonFiniteWeightsError(
        f"{len(names)} tensors hold NaN or inf values: {', '.join(names[:8])}" +
        (f" and {len(names) - 8} more" if len(names) > 8 else ""))
  return out


def check_fixed_tables(reader: SafetensorsReader,
                       shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, float]:
  """Max |stored - sincos_2d_table| per fixed table present; warns (never fails) beyond one ulp at 1."""
  out = {}
  for key in (keymap.LATENT_POS_KEY, keymap.VIT_POS_KEY):
    if key not in shapes:
      continue
    rows, dim = shapes[key]
    stored = reader.read_all(key)
    table = embeddings.sincos_2d_table(math.isqrt(rows), dim)
    diff = float(np.max(np.abs(stored.astype(np.float64) -
                               table.astype(np.float64)))) if stored.size else 0.0
    out[key] = diff
    # one ulp at 1.0 of the stored dtype (bf16 too)
    if diff > float(ml_dtypes.finfo(stored.dtype).eps):
      warnings.warn(f"{key} differs from the fixed 2-D sin-cos table by up to {diff:.3g}; "
                    "the recomputed table is used")
    else:
      log.info("%s matches the fixed sin-cos table (max diff %.3g)", key, diff)
  return out


# ----------------------------------------------------------------------------------------------

def _weights_file(src_dir: str, weights: Optional[str]) -> str:
  names = (weights,) if weights else WEIGHT_FILES
  for n in names:
    if os.path.exists(os.path.join(src_dir, n)):
      return n
  raise UserFileNotFoundError(f"official checkpoint {src_dir} holds none of {list(names)}")


def _with_extras(src_dir: str, overrides: Dict[str, Any]) -> Dict[str, Any]:
  """`overrides` with the missing (None) entries filled from the directory's EXTRAS_JSON, if any."""
  extras = files.read_json_if_present(os.path.join(src_dir, EXTRAS_JSON), "checkpoint config") or {}
  unknown = sorted(set(extras) - set(EXTRA_KEYS))
  if unknown:
    raise CheckpointMismatchError(
        f"{EXTRAS_JSON} has unknown keys {unknown}; known: {list(EXTRA_KEYS)}")
  out = dict(overrides)
  for k, v in extras.items():
    if out.get(k) is None:
      out[k] = SpecialTokens(**v) if k == "tokens" else v
  return out


def load_official(src_dir: str, *, dtype="bf16", mesh=None, rules=None,
                  weights: Optional[str] = None, **overrides) -> Tuple[BagelConfig, Dict[str, Any]]:
  """(cfg, {'bagel', 'ae'} params) from an official checkpoint directory, streamed onto shardings.

  `overrides` go to `infer_config` (max_latent_size, vit_max_num_patch_per_side, connector_act,
  timestep_shift, ae_resolution, scale_factor, shift_factor, tokens).
  """
  dtype = parse_dtype(dtype)
  wname = _weights_file(src_dir, weights)
  weight_files = {"bagel": wname, "ae": AE_FILE}
  for n in weight_files.values():
    if not os.path.exists(os.path.join(src_dir, n)):
      raise FileNotFoundError(f"{n} not found in {src_dir}")
  llm_json = files.read_json_if_present(os.path.join(src_dir, LLM_JSON), "checkpoint config")
  if llm_json is None:
    raise FileNotFoundError(f"{LLM_JSON} not found in {src_dir}")
  vit_json = files.read_json_if_present(os.path.join(src_dir, VIT_JSON), "checkpoint config")
  overrides = _with_extras(src_dir, overrides)

  problems, shapes = [], {}
  for part, n in weight_files.items():
    header, bad = read_header(os.path.join(src_dir, n))
    raise_damaged(os.path.join(src_dir, n), bad)
    problems += [f"{n}: {k} has non-float dtype {d}" for k, (d, _) in sorted(header.items())
                 if d not in ST_DTYPES]
    shapes[part] = {k: s for k, (_, s) in header.items()}
  cfg, bad = infer_config(llm_json, vit_json, shapes["bagel"], shapes["ae"], **overrides)
  problems += bad
  problems += check_layout(cfg, shapes, weight_files)
  if problems:
    titles = "; ".join(p.split("\n", 1)[0].rstrip(":") for p in problems)
    raise CheckpointMismatchError(f"{src_dir} does not match the expected BAGEL layout: {titles}\n"
                                  + "\n".join(problems))

  shardings = checkpoint.target_shardings(cfg, mesh, rules)
  with contextlib.ExitStack() as stack:
    readers = {
        part: stack.enter_context(SafetensorsReader(os.path.join(src_dir, n)))
        for part, n in weight_files.items()
    }
    check_fixed_tables(readers["bagel"], shapes["bagel"])
    params = stream_params(readers, cfg, dtype, shardings)
  return cfg, params


def convert(src_dir: str, dst_dir: str, *, dtype="bf16", mesh=None, rules=None,
            weights: Optional[str] = None, **overrides) -> Tuple[BagelConfig, Dict[str, Any]]:
  """Official checkpoint dir -> model dir (orbax params, model_config.json, tokenizer/json files
  copied)."""
  cfg, params = load_official(src_dir, dtype=dtype, mesh=mesh, rules=rules, weights=weights,
                              **overrides)
  checkpoint.save_model_dir(dst_dir, cfg, params)
  for n in AUX_FILES:
    if os.path.exists(os.path.join(src_dir, n)):
      if paths.is_remote(dst_dir):  # gs://...: one object each
        paths.copy_file(os.path.join(src_dir, n), paths.join(dst_dir, n))
      else:
        shutil.copyfile(os.path.join(src_dir, n), os.path.join(dst_dir, n))
  return cfg, params


def parse_mesh(text: Optional[str]):
  """'data=2,fsdp=4' -> Mesh (None for an empty/absent spec)."""
  if not text:
    return None
  shape = {}
  for part in text.split(","):
    name, _, size = part.partition("=")
    shape[name.strip()] = int(size)
  return sharding_lib.make_mesh(shape)


def main(argv: Optional[List[str]] = None) -> int:
  """`python -m srum_jax convert --src DIR --dst DIR [--dtype bf16] ...`; argv excludes the
  subcommand."""
  ap = argparse.ArgumentParser(prog="srum_jax convert", description=__doc__.split("\n")[0])
  ap.add_argument("--src", required=True, help="official checkpoint directory")
  ap.add_argument("--dst", required=True, help="output model directory")
  ap.add_argument("--dtype", default="bf16", help="parameter dtype: bf16 | fp32 | fp16")
  ap.add_argument("--weights", default=None,
                  help="weights file name (default: ema.safetensors, else model.safetensors)")
  ap.add_argument("--mesh", default=None,
                  help="e.g. 'fsdp=8' or 'data=2,fsdp=4' (default: one device)")
  ap.add_argument("--max_latent_size", type=int, default=None,
                  help="default: from latent_pos_embed rows, else 64")
  ap.add_argument("--vit_max_num_patch_per_side", type=int, default=None,
                  help="default: from vit_pos_embed rows, else 70")
  ap.add_argument("--connector_act", default=None, help="default gelu_pytorch_tanh")
  ap.add_argument("--timestep_shift", type=float, default=None, help="default 1.0")
  ap.add_argument("--ae_resolution", type=int, default=None, help="default 256")
  ap.add_argument("--scale_factor", type=float, default=None,
                  help="AE latent scale (default 0.3611)")
  ap.add_argument("--shift_factor", type=float, default=None,
                  help="AE latent shift (default 0.1159)")
  d = SpecialTokens()
  for flag, name in (("--bos_token_id", "bos"), ("--eos_token_id", "eos"),
                     ("--start_of_image_id", "start_of_image"), ("--end_of_image_id",
                                                                 "end_of_image")):
    ap.add_argument(flag, type=int, default=None,
                    help=f"default: {EXTRAS_JSON} if present, else {getattr(d, name)}")
  args = ap.parse_args(argv)
  ids = dict(bos=args.bos_token_id, eos=args.eos_token_id, start_of_image=args.start_of_image_id,
             end_of_image=args.end_of_image_id)
  tokens = None
  try:
    check_destination(args.src, args.dst, "convert")
  except UserError as e:
    print(f"convert: error: {e}", file=sys.stderr)
    return 2
  if any(v is not None for v in ids.values()):
    extra = (files.read_json_if_present(os.path.join(args.src, EXTRAS_JSON), "checkpoint config") or
             {}).get("tokens") or {}
    tokens = SpecialTokens(**{
        k: v if v is not None else extra.get(k, getattr(d, k)) for k, v in ids.items()
    })
  try:
    cfg, params = convert(args.src, args.dst, dtype=args.dtype, mesh=parse_mesh(
        args.mesh), weights=args.weights, max_latent_size=args.max_latent_size,
                          vit_max_num_patch_per_side=args.vit_max_num_patch_per_side,
                          connector_act=args.connector_act, timestep_shift=args.timestep_shift,
                          ae_resolution=args.ae_resolution, scale_factor=args.scale_factor,
                          shift_factor=args.shift_factor, tokens=tokens)
  except (ValueError, FileNotFoundError) as e:  # the user's files: one message, exit code 2
    print(f"convert: error: {e}", file=sys.stderr)
    return 2
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(
      f"converted {args.src} -> {args.dst}: {n / 1e9:.3f}e9 parameters, dtype "
      f"{parse_dtype(args.dtype).name}, "
      f"vit={'yes' if cfg.vit else 'no'}, max_latent_size={cfg.max_latent_size}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
