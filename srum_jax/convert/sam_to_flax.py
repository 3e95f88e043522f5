"""SAM weights as users download them -> the `sam_schema` tree, streamed onto shardings; converted
directories (orbax params + sam_config.json).

Sources (`load_sam` tells them apart):
  a released `.pth` file   segment_anything's state dict (`sam_vit_h_4b8939.pth`, ...); read with
                           torch (`torch.load(mmap=True, weights_only=True)`: tensors stay on disk
                           until read). The architecture comes from the tensor shapes, except the
                           decoder's head count, which no shape holds (8 in every release).
  a transformers directory a `SamModel` saved with `save_pretrained` (config.json and
                           model.safetensors, a sharded index or pytorch_model.bin); the
                           architecture from config.json, pixel statistics from
                           preprocessor_config.json when present.
  a converted directory    `convert` / `python -m srum_jax convert-sam` output: params/ (orbax) and
                           sam_config.json; restored straight onto the target shardings.

Every parameter is built with `jax.make_array_from_callback` on its target sharding; a callback
reads only the checkpoint tensors of its shard's stacked indices, so host memory peaks near one
stacked leaf's shard, not the model. Layout problems (missing, unexpected, mis-shaped keys)
are collected and raised together before anything is read; non-finite tensors are refused by name.
torch is imported only to read `.pth` / `.bin` files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from safetensors import safe_open

from srum_jax import paths, sharding as sharding_lib
from srum_jax.convert import keymap, sam_keymap
from srum_jax.convert.hf_to_flax import (CheckpointMismatchError, NonFiniteWeightsError,
                                         parse_dtype, parse_mesh)
from srum_jax.errors import UserFileNotFoundError, UserValueError
from srum_jax.models import params as params_lib, sam_config, sam_schema
from srum_jax.models.sam_config import SamConfig, SamDecoderConfig, SamEncoderConfig

PARAMS_DIR = "params"
CONFIG_FILE = "sam_config.json"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
OFFICIAL_DECODER_HEADS = 8


# ----------------------------------------------------------------------------------------------
# readers: {key: shape} and whole tensors in checkpoint layout (float32 numpy)

class DictReader:
  """An in-memory state dict {key: array}."""

  def __init__(self, state_dict: Dict[str, Any]):
    self.tensors = {k: np.asarray(v) for k, v in state_dict.items()}

  def shapes(self) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in self.tensors.items()}

  def read(self, key: str) -> np.ndarray:
    return np.asarray(self.tensors[key], np.float32)


class TorchFileReader:
  """A `torch.save` state dict (`.pth` / `.bin`), memory-mapped."""

  def __init__(self, path: str):
    import torch  # heavy: only the .pth / .bin sources need it
    self.torch = torch
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
      state = state["model"]
    self.tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

  def shapes(self) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in self.tensors.items()}

  def read(self, key: str) -> np.ndarray:
    return self.tensors[key].to(self.torch.float32).numpy()


class SafetensorsReader:
  """One safetensors file or a sharded set (`model.safetensors.index.json`)."""

  def __init__(self, files: List[str]):
    self.handles, self.where = [], {}
    for f in files:
      h = safe_open(f, framework="np")
      self.handles.append(h)
      for k in h.keys():
        self.where[k] = h

  def shapes(self) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(h.get_slice(k).get_shape()) for k, h in self.where.items()}

  def read(self, key: str) -> np.ndarray:
    return np.asarray(self.where[key].get_tensor(key), np.float32)


def _read_json(path: str, what: str) -> Dict[str, Any]:
  try:
    return json.loads(paths.path(path).read_text())
  except json.JSONDecodeError as e:
    raise UserValueError(f"{what} {path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def transformers_reader(directory: str):
  """The reader of a transformers `SamModel` directory's weights."""
  for name in HF_WEIGHTS:
    f = os.path.join(directory, name)
    if not os.path.exists(f):
      continue
    if name.endswith(".bin"):
      return TorchFileReader(f)
    if name.endswith(".index.json"):
      shards = sorted(set(_read_json(f, "weights index")["weight_map"].values()))
      return SafetensorsReader([os.path.join(directory, s) for s in shards])
    return SafetensorsReader([f])
  raise UserFileNotFoundError(f"{directory} holds none of {list(HF_WEIGHTS)}")


# ----------------------------------------------------------------------------------------------
# configuration

def config_from_transformers(directory: str) -> SamConfig:
  """SamConfig from a transformers directory's config.json (+ preprocessor_config.json)."""
  c = _read_json(os.path.join(directory, "config.json"), "SAM config")
  v, m, pe = c.get("vision_config", {}), c.get("mask_decoder_config", {}), c.get(
      "prompt_encoder_config", {})
  if not v.get("use_abs_pos", True) or not v.get("use_rel_pos", True):
    raise UserValueError(f"{directory}: only SAM encoders with absolute and relative positions")
  de, dd = SamEncoderConfig(), SamDecoderConfig()
  hidden = int(v.get("hidden_size", 768))
  enc = SamEncoderConfig(
      hidden_size=hidden, num_layers=int(v.get("num_hidden_layers", 12)),
      num_heads=int(v.get("num_attention_heads", 12)),
      mlp_dim=int(v.get("mlp_dim") or hidden * float(v.get("mlp_ratio", 4.0))),
      global_attn_indexes=tuple(v.get("global_attn_indexes", (2, 5, 8, 11))),
      window_size=int(v.get("window_size", de.window_size)),
      image_size=int(v.get("image_size", de.image_size)),
      patch_size=int(v.get("patch_size", de.patch_size)),
      out_channels=int(v.get("output_channels", de.out_channels)),
      layer_norm_eps=float(v.get("layer_norm_eps", de.layer_norm_eps)))
  dec = SamDecoderConfig(
      hidden_size=int(m.get("hidden_size", dd.hidden_size)),
      num_layers=int(m.get("num_hidden_layers", dd.num_layers)),
      num_heads=int(m.get("num_attention_heads", dd.num_heads)),
      mlp_dim=int(m.get("mlp_dim", dd.mlp_dim)),
      attention_downsample_rate=int(m.get("attention_downsample_rate", 2)),
      num_multimask_outputs=int(m.get("num_multimask_outputs", 3)),
      iou_head_depth=int(m.get("iou_head_depth", 3)),
      iou_head_hidden_dim=int(m.get("iou_head_hidden_dim", 256)),
      mask_in_chans=int(pe.get("mask_input_channels", dd.mask_in_chans)),
      block_norm_eps=float(m.get("layer_norm_eps", 1e-6)), final_norm_eps=1e-5)
  stats = {}
  pre = os.path.join(directory, "preprocessor_config.json")
  if os.path.exists(pre):
    p = _read_json(pre, "SAM preprocessor config")
    p = p.get("image_processor", p)
    for ours, theirs in (("pixel_mean", "image_mean"), ("pixel_std", "image_std")):
      if theirs in p:
        stats[ours] = tuple(p[theirs])
  return SamConfig(encoder=enc, decoder=dec, **stats)


def transformers_config(cfg: SamConfig) -> Dict[str, Any]:
  """transformers' `SamConfig` arguments for `cfg` (inverse of `config_from_transformers`)."""
  e, d = cfg.encoder, cfg.decoder
  return dict(
      vision_config=dict(hidden_size=e.hidden_size, output_channels=e.out_channels,
                         num_hidden_layers=e.num_layers, num_attention_heads=e.num_heads,
                         image_size=e.image_size, patch_size=e.patch_size,
                         window_size=e.window_size,
                         global_attn_indexes=list(e.global_attn_indexes), mlp_dim=e.mlp_dim,
                         num_pos_feats=d.hidden_size // 2, layer_norm_eps=e.layer_norm_eps),
      prompt_encoder_config=dict(hidden_size=d.hidden_size, image_size=e.image_size,
                                 patch_size=e.patch_size, mask_input_channels=d.mask_in_chans),
      mask_decoder_config=dict(hidden_size=d.hidden_size, mlp_dim=d.mlp_dim,
                               num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads,
                               attention_downsample_rate=d.attention_downsample_rate,
                               num_multimask_outputs=d.num_multimask_outputs,
                               iou_head_depth=d.iou_head_depth,
                               iou_head_hidden_dim=d.iou_head_hidden_dim,
                               layer_norm_eps=d.block_norm_eps))


def checkpoint_state_dict(cfg: SamConfig, params, source: str) -> Dict[str, np.ndarray]:
  """The parameter tree as a state dict in layout `source` (numpy, checkpoint layouts)."""
  out = {}
  for key, e in sam_keymap.checkpoint_keys(cfg, source).items():
    leaf = np.asarray(keymap.get_path(params, e.path))[e.index]
    out[key] = np.ascontiguousarray(sam_keymap.to_checkpoint(leaf, e.transform))
  return out


def config_from_official_shapes(shapes: Dict[str, Tuple[int, ...]],
                                decoder_heads: int = OFFICIAL_DECODER_HEADS) -> SamConfig:
  """SamConfig of a released state dict from its tensor shapes (the decoder's heads are a flag)."""
  def shape(key):
    if key not in shapes:
      raise CheckpointMismatchError(f"not a SAM state dict: no {key}")
    return shapes[key]
  c, _, patch, _ = shape("image_encoder.patch_embed.proj.weight")
  grid = shape("image_encoder.pos_embed")[1]
  depth = 0
  while f"image_encoder.blocks.{depth}.norm1.weight" in shapes:
    depth += 1
  rel = [shape(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
  global_idx = tuple(i for i, r in enumerate(rel) if r[0] == 2 * grid - 1)
  windows = {(r[0] + 1) // 2 for i, r in enumerate(rel) if i not in global_idx}
  if len(windows) > 1:
    raise CheckpointMismatchError(f"windowed blocks of several window sizes {sorted(windows)}")
  layers = 0
  while f"mask_decoder.transformer.layers.{layers}.norm1.weight" in shapes:
    layers += 1
  iou_depth = 0
  while f"mask_decoder.iou_prediction_head.layers.{iou_depth}.weight" in shapes:
    iou_depth += 1
  h = shape("mask_decoder.iou_token.weight")[1]
  inner = shape("mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0]
  enc = SamEncoderConfig(
      hidden_size=c, num_layers=depth, num_heads=c // rel[0][1],
      mlp_dim=shape("image_encoder.blocks.0.mlp.lin1.weight")[0], global_attn_indexes=global_idx,
      window_size=windows.pop() if windows else SamEncoderConfig.window_size,
      image_size=grid * patch, patch_size=patch,
      out_channels=shape("image_encoder.neck.0.weight")[0])
  dec = SamDecoderConfig(
      hidden_size=h, num_layers=layers, num_heads=decoder_heads,
      mlp_dim=shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
      attention_downsample_rate=h // inner,
      num_multimask_outputs=shape("mask_decoder.mask_tokens.weight")[0] - 1,
      iou_head_depth=iou_depth,
      iou_head_hidden_dim=shape("mask_decoder.iou_prediction_head.layers.0.weight")[0],
      mask_in_chans=shape("prompt_encoder.mask_downscaling.3.weight")[0])
  return SamConfig(encoder=enc, decoder=dec)


def check_layout(cfg: SamConfig, shapes: Dict[str, Tuple[int, ...]], source: str,
                 name: str) -> None:
  """Raise one CheckpointMismatchError listing every missing / unexpected / mis-shaped key."""
  want = sam_keymap.expected_shapes(cfg, source)
  have = {k: v for k, v in shapes.items() if k not in sam_keymap.TIED_KEYS}
  problems = []
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  misshaped = [f"{k}: file {list(have[k])}, expected {list(want[k])}" for k in sorted(want)
               if k in have and tuple(have[k]) != tuple(want[k])]
  for what, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
    if items:
      more = [f"    ... and {len(items) - 20} more"] if len(items) > 20 else []
      problems.append("\n".join([f"{name}: {len(items)} {what} keys:"] +
                                [f"    {x}" for x in items[:20]] + more))
  if problems:
    raise CheckpointMismatchError(f"{name} does not match the SAM layout ({source}):\n"
                                  + "\n".join(problems))


# ----------------------------------------------------------------------------------------------
# streaming onto shardings

def target_shardings(cfg: SamConfig, mesh: Optional[jax.sharding.Mesh] = None, rules=None):
  """Sharding of every leaf: schema logical axes -> mesh (one local device without a mesh)."""
  schema = sam_schema.sam_schema(cfg)
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: one, schema, is_leaf=params_lib.is_spec)
  return sharding_lib.schema_shardings(schema, mesh, rules or sharding_lib.DEFAULT_RULES)


def _leaf(reader, keys: Dict[Tuple[int, ...], Tuple[str, str]], shape, stacked: int, sharding,
          dtype, nonfinite: set) -> jax.Array:
  """One parameter built shard by shard from the tensors of the shard's stacked indices."""
  cache: Dict[Any, np.ndarray] = {}

  def tensor(index: Tuple[int, ...]) -> np.ndarray:
    key, transform = keys[index]
    x = sam_keymap.to_flax(reader.read(key), transform)
    if not np.isfinite(x).all():
      nonfinite.add(key)
    return x

  def callback(index):
    index = tuple(index)
    sig = tuple((s.start, s.stop, s.step) for s in index)
    if sig not in cache:
      ranges = [range(*s.indices(n)) for s, n in zip(index[:stacked], shape[:stacked])]
      rest = index[stacked:]
      grid = [len(r) for r in ranges]
      parts = [tensor(tuple(r[p] for r, p in zip(ranges, pos)))[rest] for pos in np.ndindex(*grid)]
      block = np.stack(parts).reshape(grid + list(parts[0].shape)) if stacked else parts[0]
      cache[sig] = np.array(block, dtype=dtype, order="C")
    return cache[sig]

  return jax.make_array_from_callback(tuple(shape), sharding, callback).block_until_ready()


def stream_params(reader, cfg: SamConfig, source: str, *, dtype=jnp.float32, shardings=None):
  """The parameter tree from `reader` (layout `source`) onto `shardings` (default: one device)."""
  dtype = parse_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
  shardings = shardings if shardings is not None else target_shardings(cfg)
  abstract = params_lib.abstract_params(sam_schema.sam_schema(cfg))
  by_path: Dict[Tuple[str, ...], Dict[Tuple[int, ...], Tuple[str, str]]] = {}
  for key, e in sam_keymap.checkpoint_keys(cfg, source).items():
    by_path.setdefault(e.path, {})[e.index] = (key, e.transform)
  nonfinite: set = set()
  leaves = {}
  for path, keys in by_path.items():
    stacked = len(next(iter(keys)))
    leaves[path] = _leaf(reader, keys, keymap.get_path(abstract, path).shape, stacked,
                         keymap.get_path(shardings, path), dtype, nonfinite)
  if nonfinite:
    names = sorted(nonfinite)
    raise NonFiniteWeightsError(f"{len(names)} SAM tensors hold NaN or inf: {', '.join(names[:8])}")
  return jax.tree_util.tree_map_with_path(lambda kp, _: leaves[tuple(k.key for k in kp)], abstract)


def tree_from_state_dict(cfg: SamConfig, state_dict: Dict[str, Any], source: str,
                         dtype=np.float32):
  """A numpy parameter tree from an in-memory state dict (tests; small models)."""
  reader = DictReader(state_dict)
  check_layout(cfg, reader.shapes(), source, "state dict")
  return jax.tree.map(np.asarray, stream_params(reader, cfg, source, dtype=dtype))


# ----------------------------------------------------------------------------------------------
# converted directories and the entry points

def is_converted_dir(path: str) -> bool:
  return paths.path(paths.join(path, CONFIG_FILE)).is_file()


def save_sam_dir(path: str, cfg: SamConfig, params) -> None:
  """params (orbax) + sam_config.json under `path` (local or gs://)."""
  path = paths.abspath(path)
  paths.path(path).mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(path, PARAMS_DIR), params, force=True)
    ckpt.wait_until_finished()
  text = json.dumps(sam_config.config_to_dict(cfg), indent=1)
  paths.path(os.path.join(path, CONFIG_FILE)).write_text(text)


def load_sam_dir(path: str, *, mesh=None, dtype=None, rules=None) -> Tuple[SamConfig, Any]:
  """(cfg, params) of a converted directory, restored onto the target shardings."""
  path = paths.abspath(path)
  cfg = sam_config.config_from_dict(_read_json(os.path.join(path, CONFIG_FILE), "SAM config"))
  shardings = target_shardings(cfg, mesh, rules)
  abstract = params_lib.abstract_params(sam_schema.sam_schema(cfg))
  with ocp.StandardCheckpointer() as ckpt:
    stored = ckpt.metadata(os.path.join(path, PARAMS_DIR)).item_metadata.tree
    target = jax.tree.map(
        lambda a, m, s: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype) if dtype else m.dtype,
                                             sharding=s), abstract, stored, shardings)
    params = ckpt.restore(os.path.join(path, PARAMS_DIR), target)
  return cfg, params


def load_sam(path: str, *, preset: str = "", dtype="float32", mesh=None, rules=None,
             decoder_heads: int = OFFICIAL_DECODER_HEADS) -> Tuple[SamConfig, Any]:
  """(cfg, params) from a converted directory, a released `.pth` file or a transformers directory.

  `preset` (vit_h | vit_l | vit_b | ...), when given, must agree with the weights' shapes.
  """
  if not path or not paths.path(path).exists():
    raise UserFileNotFoundError(f"SAM weights not found: {path!r} (a released sam_vit_*.pth, a "
                                "transformers SamModel directory or a `convert-sam` output)")
  if is_converted_dir(path):
    cfg, params = load_sam_dir(path, mesh=mesh, dtype=dtype, rules=rules)
    source, name = None, path
  elif os.path.isdir(path):
    if not os.path.exists(os.path.join(path, "config.json")):
      raise UserFileNotFoundError(f"{path}: a directory without {CONFIG_FILE} (converted) or "
                                  "config.json (transformers SamModel)")
    reader, source, name = transformers_reader(path), "transformers", path
    cfg = config_from_transformers(path)
  else:
    reader, source, name = TorchFileReader(path), "official", os.path.basename(path)
    cfg = config_from_official_shapes(reader.shapes(), decoder_heads)
  if preset:
    want = sam_config.get_preset(preset)
    if (want.encoder, want.decoder.hidden_size) != (cfg.encoder, cfg.decoder.hidden_size):
      raise UserValueError(f"SAM weights {name} are not preset {preset!r} (encoder {cfg.encoder})")
  if source is not None:
    check_layout(cfg, reader.shapes(), source, name)
    params = stream_params(reader, cfg, source, dtype=dtype,
                           shardings=target_shardings(cfg, mesh, rules))
  return cfg, params


def convert(src: str, dst: str, *, preset: str = "", dtype="float32", mesh=None,
            decoder_heads: int = OFFICIAL_DECODER_HEADS) -> Tuple[SamConfig, Any]:
  """Released `.pth` / transformers directory -> converted directory."""
  cfg, params = load_sam(src, preset=preset, dtype=dtype, mesh=mesh, decoder_heads=decoder_heads)
  save_sam_dir(dst, cfg, params)
  return cfg, params


def main(argv: Optional[List[str]] = None) -> int:
  """`python -m srum_jax convert-sam --src sam_vit_h_4b8939.pth --dst DIR [--dtype fp32]`."""
  ap = argparse.ArgumentParser(prog="srum_jax convert-sam", description=__doc__.split("\n")[0])
  ap.add_argument("--src", required=True, help="sam_vit_*.pth or a transformers SamModel directory")
  ap.add_argument("--dst", required=True, help="output directory (orbax params + sam_config.json)")
  ap.add_argument("--preset", default="", help="vit_h | vit_l | vit_b: checked against the weights")
  ap.add_argument("--dtype", default="fp32", help="parameter dtype: fp32 | bf16")
  ap.add_argument("--mesh", default=None, help="e.g. 'fsdp=4' (default: one device)")
  ap.add_argument("--decoder_heads", type=int, default=OFFICIAL_DECODER_HEADS,
                  help="mask-decoder attention heads of a .pth (no tensor shape holds them)")
  args = ap.parse_args(argv)
  try:
    cfg, params = convert(args.src, args.dst, preset=args.preset, dtype=args.dtype,
                          mesh=parse_mesh(args.mesh), decoder_heads=args.decoder_heads)
  except (ValueError, FileNotFoundError) as e:
    print(f"convert-sam: error: {e}", file=sys.stderr)
    return 1
  n = params_lib.count_params(params)
  e = cfg.encoder
  print(f"converted {args.src} -> {args.dst}: {n / 1e6:.1f}M parameters, dtype "
        f"{parse_dtype(args.dtype).name}, encoder {e.num_layers} x {e.hidden_size} at "
        f"{e.image_size} px")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
