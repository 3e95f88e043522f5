"""Converted model (directory or (cfg, params)) -> official BAGEL files the PyTorch code loads.

Writes `ema.safetensors` (official key names, including the two fixed sin-cos tables recomputed by
`embeddings.sincos_2d_table`), `ae.safetensors`, `llm_config.json` and `vit_config.json` (json layer count
= used + 1: BAGEL drops SigLIP's last layer). Files are written tensor by tensor (header first, then each
tensor's bytes, one layer of a stacked leaf at a time), so host memory peaks near one tensor. In fp32 the
round trip official -> flax -> official is bit-exact.

LoRA adapters (a model whose config has `llm.lora`) are either folded into their kernels as each layer is
written (`adapters="merge"`: W + A @ B * alpha / rank, official files any BAGEL loader reads) or written
apart (`adapters="separate"`: the base weights, plus `adapter_model.safetensors` and `adapter_config.json`
in PEFT's layout, `convert.adapters`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import jax
import ml_dtypes
import numpy as np

from srum_jax import files
from srum_jax.convert import adapters, checkpoint, keymap
from srum_jax.convert.hf_to_flax import (AE_FILE, AUX_FILES, EXTRAS_JSON, LLM_JSON, VIT_JSON,
                                         check_destination, parse_dtype)
from srum_jax.models import embeddings, lora as lora_lib, params as params_lib
from srum_jax.models.config import BagelConfig, with_lora

ADAPTER_MODES = ("merge", "separate")

ST_NAMES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
            np.dtype(ml_dtypes.bfloat16): "BF16"}

PT_METADATA = {"format": "pt"}  # what safetensors.torch.save_file writes; HF loaders look for it

Entry = Tuple[str, np.dtype, Tuple[int, ...], Callable[[], np.ndarray]]


def write_safetensors(path: str, entries: List[Entry], metadata: Optional[Dict[str, str]] = None) -> None:
  """Stream `(key, dtype, shape, fetch)` entries into a safetensors file (ordered by dtype size, then key).

  The header is built from shapes alone, then each `fetch()` result is written and dropped.
  """
  entries = sorted(entries, key=lambda e: (-np.dtype(e[1]).itemsize, e[0]))
  header: Dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  for key, dtype, shape, _ in entries:
    n = math.prod(shape) * np.dtype(dtype).itemsize
    header[key] = {"dtype": ST_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
    offset += n
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for key, dtype, shape, fetch in entries:
      arr = np.ascontiguousarray(fetch())
      if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{key}: produced {arr.dtype}{list(arr.shape)}, header says {np.dtype(dtype)}{list(shape)}")
      f.write(arr.reshape(-1).view(np.uint8).data)
  os.replace(tmp, path)


def official_entries(cfg: BagelConfig, params, dtype=None) -> Dict[str, List[Entry]]:
  """{'bagel': [...], 'ae': [...]} write entries; `dtype` None keeps each leaf's dtype.

  The fixed tables take `dtype`, else the dtype of the token embedding. Kernels with LoRA adapters are
  written folded (`lora.fold`, one layer at a time).
  """
  abstract = params_lib.abstract_params(params_lib.model_schema(cfg))
  bad = []
  for part in ("bagel", "ae"):
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(abstract[part])}
    have = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(params[part])}
    bad += [f"{part}{k}: missing" for k in sorted(set(want) - set(have))]
    bad += [f"{part}{k}: unexpected" for k in sorted(set(have) - set(want))]
    bad += [f"{part}{k}: shape {list(have[k])}, expected {list(want[k])}" for k in sorted(want)
            if k in have and have[k] != want[k]]
  if bad:
    raise ValueError("parameter tree does not match the configuration:\n    " + "\n    ".join(bad))

  out: Dict[str, List[Entry]] = {}
  for part, table in keymap.official_keys(cfg).items():
    entries = []
    for key, e in table.items():
      leaf = keymap.get_path(params[part], e.path)
      dt = np.dtype(dtype) if dtype is not None else np.dtype(leaf.dtype)
      shape = keymap.official_shape(leaf.shape, e)

      module = keymap.get_path(params[part], e.path[:-1])
      adapted = e.path[-1] == "kernel" and "lora_a" in module

      def fetch(leaf=leaf, e=e, dt=dt, module=module, adapted=adapted):
        pick = lambda a: a[e.layer] if e.layer is not None else a  # noqa: E731
        x = np.asarray(pick(leaf))
        if adapted:
          x = np.asarray(lora_lib.fold(x, np.asarray(pick(module["lora_a"])), np.asarray(pick(module["lora_b"])),
                                       cfg.llm.lora.scale))
        return keymap.to_official(x, e.transform).astype(dt)

      entries.append((key, dt, shape, fetch))
    out[part] = entries
  embed = params["bagel"]["llm"]["embed_tokens"]["embedding"]
  table_dtype = np.dtype(dtype) if dtype is not None else np.dtype(embed.dtype)
  for key, (g, d) in keymap.fixed_tables(cfg).items():
    out["bagel"].append((key, table_dtype, (g * g, d),
                         lambda g=g, d=d: embeddings.sincos_2d_table(g, d).astype(table_dtype)))
  return out


def save_adapters(dst_dir: str, cfg: BagelConfig, params, dtype=None) -> None:
  """Write the adapters of `params` ({'bagel', ...} or the bagel tree) under `dst_dir`; `dtype` casts them
  (None: as stored)."""
  if cfg.llm.lora is None:
    raise ValueError("the configuration has no LoRA adapters to save")
  bagel = params["bagel"] if "bagel" in params else params
  dt = parse_dtype(dtype) if dtype is not None else None
  entries = []
  for key, e in keymap.adapter_keys(cfg).items():
    leaf = keymap.get_path(bagel, e.path)
    d = dt if dt is not None else np.dtype(leaf.dtype)

    def fetch(leaf=leaf, e=e, d=d):
      return keymap.to_official(np.asarray(leaf[e.layer]), e.transform).astype(d)

    entries.append((key, d, keymap.official_shape(leaf.shape, e), fetch))
  os.makedirs(dst_dir, exist_ok=True)
  write_safetensors(os.path.join(dst_dir, adapters.ADAPTER_WEIGHTS), entries, PT_METADATA)
  with open(os.path.join(dst_dir, adapters.ADAPTER_CONFIG), "w") as f:
    json.dump(adapters.adapter_config_json(cfg), f, indent=2)



def hf_json_configs(cfg: BagelConfig, base_llm: Optional[Dict[str, Any]] = None,
                    base_vit: Optional[Dict[str, Any]] = None) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
  """(llm_config.json, vit_config.json or None) contents; the config's values override `base_*` fields."""
  c = cfg.llm
  llm = dict(base_llm or {})
  llm.update(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
             num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
             num_key_value_heads=c.num_key_value_heads, hidden_act="silu",
             max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
             rope_theta=c.rope_theta, tie_word_embeddings=False, qk_norm=c.qk_norm,
             layer_module="Qwen2MoTDecoderLayer")
  if cfg.vit is None:
    return llm, None
  v = cfg.vit
  vit = dict(base_vit or {})
  vit.update(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
             num_hidden_layers=v.num_hidden_layers + 1, num_attention_heads=v.num_attention_heads,
             num_channels=3, image_size=v.image_size, patch_size=v.patch_size, hidden_act="gelu_pytorch_tanh",
             layer_norm_eps=v.layer_norm_eps, attention_dropout=vit.get("attention_dropout", 0.0), rope=False)
  return llm, vit


def extras_json(cfg: BagelConfig) -> Dict[str, Any]:
  """The configuration values the official files do not hold (see hf_to_flax.EXTRAS_JSON)."""
  t = cfg.tokens
  return dict(max_latent_size=cfg.max_latent_size, vit_max_num_patch_per_side=cfg.vit_max_num_patch_per_side,
              connector_act=cfg.connector_act, timestep_shift=cfg.timestep_shift, ae_resolution=cfg.ae.resolution,
              scale_factor=cfg.ae.scale_factor, shift_factor=cfg.ae.shift_factor,
              tokens=dict(bos=t.bos, eos=t.eos, start_of_image=t.start_of_image, end_of_image=t.end_of_image))


def export(src: Union[str, Tuple[BagelConfig, Any]], dst_dir: str, *, dtype=None,
           weights_name: str = "ema.safetensors", metadata: Optional[Dict[str, str]] = PT_METADATA,
           adapters_mode: str = "merge") -> BagelConfig:
  """Write the official files for a model directory or a `(cfg, {'bagel', 'ae'} params)` pair.

  `dtype` (e.g. 'bf16') casts every tensor; None keeps the stored dtypes. From a directory the
  tokenizer files (and the original HF json fields this code does not own) are carried over.
  `metadata` is the safetensors header metadata (None: none, as in files written without it).
  `adapters_mode` (a model with LoRA adapters): "merge" folds them into the official weights, "separate"
  writes the base weights and the adapters in PEFT's files next to them.
  """
  if adapters_mode not in ADAPTER_MODES:
    raise ValueError(f"adapters_mode={adapters_mode!r}; choose one of {ADAPTER_MODES}")
  src_dir = None
  if isinstance(src, (str, os.PathLike)):
    src_dir = os.fspath(src)
    cfg, params = checkpoint.load_model_dir(src_dir)
  else:
    cfg, params = src
  dt = parse_dtype(dtype) if dtype is not None else None
  os.makedirs(dst_dir, exist_ok=True)
  if cfg.llm.lora is not None and adapters_mode == "separate":
    save_adapters(dst_dir, cfg, params, dtype)
    cfg, params = with_lora(cfg, None), lora_lib.split_adapters(params)[0]
  entries = official_entries(cfg, params, dt)
  write_safetensors(os.path.join(dst_dir, weights_name), entries["bagel"], metadata)
  write_safetensors(os.path.join(dst_dir, AE_FILE), entries["ae"], metadata)
  base = {n: files.read_json_if_present(os.path.join(src_dir, n)) if src_dir else None for n in (LLM_JSON, VIT_JSON)}
  llm, vit = hf_json_configs(cfg, base[LLM_JSON], base[VIT_JSON])
  with open(os.path.join(dst_dir, LLM_JSON), "w") as f:
    json.dump(llm, f, indent=2)
  if vit is not None:
    with open(os.path.join(dst_dir, VIT_JSON), "w") as f:
      json.dump(vit, f, indent=2)
  with open(os.path.join(dst_dir, EXTRAS_JSON), "w") as f:
    json.dump(extras_json(cfg), f, indent=2)
  if src_dir:
    for n in AUX_FILES:
      if n not in (LLM_JSON, VIT_JSON) and os.path.exists(os.path.join(src_dir, n)):
        shutil.copyfile(os.path.join(src_dir, n), os.path.join(dst_dir, n))
  return cfg


def main(argv: Optional[List[str]] = None) -> int:
  """`python -m srum_jax export --src MODEL_DIR --dst DIR [--dtype bf16]`; argv excludes the subcommand."""
  ap = argparse.ArgumentParser(prog="srum_jax export", description=__doc__.split("\n")[0])
  ap.add_argument("--src", required=True, help="converted model directory")
  ap.add_argument("--dst", required=True, help="output directory for the official files")
  ap.add_argument("--dtype", default=None, help="bf16 | fp32 | fp16 (default: as stored)")
  ap.add_argument("--weights_name", default="ema.safetensors", help="name of the BAGEL weights file")
  ap.add_argument("--adapters", default="merge", choices=ADAPTER_MODES,
                  help="a model with LoRA adapters: fold them into the weights (merge) or write them apart, "
                       f"in PEFT's {adapters.ADAPTER_WEIGHTS} + {adapters.ADAPTER_CONFIG} (separate)")
  args = ap.parse_args(argv)
  try:
    check_destination(args.src, args.dst, "export")
    cfg = export(args.src, args.dst, dtype=args.dtype, weights_name=args.weights_name,
                 adapters_mode=args.adapters)
  except (ValueError, FileNotFoundError) as e:  # the user's files or flags: exit code 2
    print(f"export: error: {e}", file=sys.stderr)
    return 2
  print(f"exported {args.src} -> {args.dst} ({args.weights_name}, {AE_FILE}, {LLM_JSON}"
        f"{', ' + VIT_JSON if cfg.vit else ''})")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
