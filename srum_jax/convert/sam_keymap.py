"""SAM checkpoint keys <-> parameter-tree paths for the two layouts users download, derived by
walking `models.sam_schema` (a schema entry without a name in a layout is an error, never skipped).

Layouts (`SOURCES`):
  official      segment_anything's `sam_vit_{h,l,b}_*.pth` state dicts
                (`image_encoder.blocks.0.attn.qkv.weight`,
                `prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`, ...)
  transformers  a `SamModel` directory (`vision_encoder.layers.0.attn.qkv.weight`,
                `shared_image_embedding.positional_embedding`, ...)

Tensor transforms (PyTorch -> Flax): linear [out, in] -> [in, out]; conv [out, in, kh, kw] ->
[kh, kw, in, out]; conv_transpose [in, out, kh, kw] -> [kh, kw, in, out]; squeeze drops a leading 1
([1, D] embeddings, the [1, G, G, C] position table); identity otherwise. Stacked leaves (leading
`layers` axes: the encoder's [groups, group_size - 1] windowed and [groups] global blocks, the
decoder's layers, the hypernetwork MLPs, the four point embeddings) take one key per index.
"""
from __future__ import annotations

from typing import Dict, Iterator, NamedTuple, Optional, Tuple

import numpy as np

from srum_jax.convert.keymap import get_path, unpermuted_shape
from srum_jax.models import params as params_lib, sam_schema
from srum_jax.models.sam_config import SamConfig

Path = Tuple[str, ...]
SOURCES = ("official", "transformers")
PERMS = {"identity": None, "squeeze": None, "linear": (1, 0), "conv": (2, 3, 1, 0),
         "conv_transpose": (2, 3, 0, 1)}
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# transformers may also save the prompt encoder's copy of the tied Fourier matrix: accepted, unused
TIED_KEYS = ("prompt_encoder.shared_embedding.positional_embedding",)


class SamKey(NamedTuple):
  """Where a checkpoint tensor lives: tree path, position on the leaf's stacked axes, transform."""
  path: Path
  index: Tuple[int, ...]
  transform: str


# Module names per layout: (official, transformers).
_BLOCK = {"norm1": ("norm1", "layer_norm1"), "qkv": ("attn.qkv", "attn.qkv"),
          "proj": ("attn.proj", "attn.proj"), "rel_pos_h": ("attn.rel_pos_h", "attn.rel_pos_h"),
          "rel_pos_w": ("attn.rel_pos_w", "attn.rel_pos_w"), "norm2": ("norm2", "layer_norm2"),
          "mlp_in": ("mlp.lin1", "mlp.lin1"), "mlp_out": ("mlp.lin2", "mlp.lin2")}
_TWO_WAY = {"self_attn": ("self_attn", "self_attn"), "norm1": ("norm1", "layer_norm1"),
            "cross_token_to_image": ("cross_attn_token_to_image", "cross_attn_token_to_image"),
            "norm2": ("norm2", "layer_norm2"), "mlp_in": ("mlp.lin1", "mlp.lin1"),
            "mlp_out": ("mlp.lin2", "mlp.lin2"), "norm3": ("norm3", "layer_norm3"),
            "norm4": ("norm4", "layer_norm4"),
            "cross_image_to_token": ("cross_attn_image_to_token", "cross_attn_image_to_token")}
_MODULES = {
    ("image_encoder", "patch_embed"): ("image_encoder.patch_embed.proj",
                                       "vision_encoder.patch_embed.projection"),
    ("image_encoder", "pos_embed"): ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder", "neck", "conv1"): ("image_encoder.neck.0", "vision_encoder.neck.conv1"),
    ("image_encoder", "neck", "norm1"): ("image_encoder.neck.1", "vision_encoder.neck.layer_norm1"),
    ("image_encoder", "neck", "conv2"): ("image_encoder.neck.2", "vision_encoder.neck.conv2"),
    ("image_encoder", "neck", "norm2"): ("image_encoder.neck.3", "vision_encoder.neck.layer_norm2"),
    ("prompt_encoder", "pe_gaussian"): (
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "shared_image_embedding.positional_embedding"),
    ("prompt_encoder", "not_a_point_embed"): ("prompt_encoder.not_a_point_embed",) * 2,
    ("prompt_encoder", "no_mask_embed"): ("prompt_encoder.no_mask_embed",) * 2,
    ("prompt_encoder", "mask_embed", "conv1"): ("prompt_encoder.mask_downscaling.0",
                                                "prompt_encoder.mask_embed.conv1"),
    ("prompt_encoder", "mask_embed", "norm1"): ("prompt_encoder.mask_downscaling.1",
                                                "prompt_encoder.mask_embed.layer_norm1"),
    ("prompt_encoder", "mask_embed", "conv2"): ("prompt_encoder.mask_downscaling.3",
                                                "prompt_encoder.mask_embed.conv2"),
    ("prompt_encoder", "mask_embed", "norm2"): ("prompt_encoder.mask_downscaling.4",
                                                "prompt_encoder.mask_embed.layer_norm2"),
    ("prompt_encoder", "mask_embed", "conv3"): ("prompt_encoder.mask_downscaling.6",
                                                "prompt_encoder.mask_embed.conv3"),
    ("mask_decoder", "iou_token"): ("mask_decoder.iou_token",) * 2,
    ("mask_decoder", "mask_tokens"): ("mask_decoder.mask_tokens",) * 2,
    ("mask_decoder", "final_norm"): ("mask_decoder.transformer.norm_final_attn",
                                     "mask_decoder.transformer.layer_norm_final_attn"),
    ("mask_decoder", "upscale1"): ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder", "upscale_norm"): ("mask_decoder.output_upscaling.1",
                                       "mask_decoder.upscale_layer_norm"),
    ("mask_decoder", "upscale2"): ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
}
_SQUEEZED = {("image_encoder", "pos_embed"), ("prompt_encoder", "point_embed"),
             ("prompt_encoder", "not_a_point_embed"), ("prompt_encoder", "no_mask_embed"),
             ("mask_decoder", "iou_token")}
_TRANSPOSED_CONVS = {("mask_decoder", "upscale1"), ("mask_decoder", "upscale2")}


def _walk(schema, prefix: Path = ()) -> Iterator[Tuple[Path, params_lib.ParamSpec]]:
  for name, sub in schema.items():
    if params_lib.is_spec(sub):
      yield prefix + (name,), sub
    else:
      yield from _walk(sub, prefix + (name,))


def _module(cfg: SamConfig, source: str, mpath: Path, index: Tuple[int, ...]) -> str:
  """The checkpoint module name of schema module `mpath` at stacked position `index`."""
  s = SOURCES.index(source)
  head = mpath[:2]
  if head in (("image_encoder", "windowed"), ("image_encoder", "global")):
    g = cfg.encoder.group_size
    block = index[0] * g + (index[1] if head[1] == "windowed" else g - 1)
    prefix = ("image_encoder.blocks", "vision_encoder.layers")[s]
    return f"{prefix}.{block}.{_BLOCK[mpath[2]][s]}"
  if head == ("mask_decoder", "layers") or head == ("mask_decoder", "final_attn"):
    attn_leaf = mpath[3:] if head[1] == "layers" else mpath[2:]
    if head[1] == "layers":
      name = f"mask_decoder.transformer.layers.{index[0]}.{_TWO_WAY[mpath[2]][s]}"
    else:
      name = "mask_decoder.transformer.final_attn_token_to_image"
    return ".".join((name,) + attn_leaf)
  if head == ("mask_decoder", "hyper_mlp"):
    layer = {"fc1": ("layers.0", "proj_in"), "fc2": ("layers.1", "layers.0"),
             "fc3": ("layers.2", "proj_out")}[mpath[2]][s]
    return f"mask_decoder.output_hypernetworks_mlps.{index[0]}.{layer}"
  if head == ("mask_decoder", "iou_head"):
    i, depth = int(mpath[2]), cfg.decoder.iou_head_depth
    if s == 0:
      return f"mask_decoder.iou_prediction_head.layers.{i}"
    name = "proj_in" if i == 0 else "proj_out" if i == depth - 1 else f"layers.{i - 1}"
    return f"mask_decoder.iou_prediction_head.{name}"
  if mpath == ("prompt_encoder", "point_embed"):
    return f"prompt_encoder.{('point_embeddings', 'point_embed')[s]}.{index[0]}"
  if mpath not in _MODULES:
    raise KeyError(f"no {source} name for SAM schema path {'.'.join(mpath)}")
  return _MODULES[mpath][s]


def _transform(mpath: Path, leaf: str, rank: int) -> str:
  if mpath in _SQUEEZED:
    return "squeeze"
  if leaf == "kernel":
    if rank == 2:
      return "linear"
    return "conv_transpose" if mpath in _TRANSPOSED_CONVS else "conv"
  return "identity"


def checkpoint_keys(cfg: SamConfig, source: str) -> Dict[str, SamKey]:
  """Every parameter's key in layout `source` -> SamKey, walking `sam_schema(cfg)`."""
  if source not in SOURCES:
    raise ValueError(f"unknown SAM checkpoint layout {source!r}; choose one of {SOURCES}")
  out: Dict[str, SamKey] = {}
  for path, spec in _walk(sam_schema.sam_schema(cfg)):
    stacked = 0
    while stacked < len(spec.axes) and spec.axes[stacked] == "layers":
      stacked += 1
    raw = path[-1] not in _LEAF
    mpath, leaf = (path, None) if raw else (path[:-1], path[-1])
    transform = _transform(mpath, leaf, len(spec.shape) - stacked)
    for index in np.ndindex(*spec.shape[:stacked]):
      module = _module(cfg, source, mpath, tuple(int(i) for i in index))
      key = module if raw else f"{module}.{_LEAF[leaf]}"
      if key in out:
        raise ValueError(f"SAM key {key} produced twice by the schema")
      out[key] = SamKey(path, tuple(int(i) for i in index), transform)
  return out


def checkpoint_shape(leaf_shape: Tuple[int, ...], key: SamKey) -> Tuple[int, ...]:
  """Shape of the checkpoint tensor for a tree leaf of `leaf_shape`."""
  shape = tuple(leaf_shape[len(key.index):])
  if key.transform == "squeeze":
    return (1,) + shape
  return unpermuted_shape(shape, PERMS[key.transform])


def expected_shapes(cfg: SamConfig, source: str) -> Dict[str, Tuple[int, ...]]:
  """{key: shape} of a checkpoint in layout `source`, from the schema alone (nothing allocated)."""
  abstract = params_lib.abstract_params(sam_schema.sam_schema(cfg))
  return {k: checkpoint_shape(get_path(abstract, e.path).shape, e)
          for k, e in checkpoint_keys(cfg, source).items()}


def to_flax(x: np.ndarray, transform: str) -> np.ndarray:
  """Checkpoint layout -> Flax layout."""
  if transform == "squeeze":
    return x.reshape(x.shape[1:])
  perm = PERMS[transform]
  return x if perm is None else x.transpose(perm)


def to_checkpoint(x: np.ndarray, transform: str) -> np.ndarray:
  """Flax layout -> checkpoint layout (inverse of `to_flax`)."""
  if transform == "squeeze":
    return x[None]
  perm = PERMS[transform]
  return x if perm is None else x.transpose(tuple(np.argsort(perm)))


def detect_source(keys) -> Optional[str]:
  """The layout a set of checkpoint keys is in (None when neither)."""
  keys = set(keys)
  if "image_encoder.patch_embed.proj.weight" in keys:
    return "official"
  if "vision_encoder.patch_embed.projection.weight" in keys:
    return "transformers"
  return None
