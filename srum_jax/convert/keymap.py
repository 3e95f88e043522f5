"""Official checkpoint key <-> parameter-tree path table, derived by walking the parameter schema.

Key patterns of `ema.safetensors` / `ae.safetensors` (docs/bagel.md, "Checkpoint layout"): module
attribute paths as prefixes, the ViT patch embedding stored in Linear form, and the two fixed
sin-cos tables, which are checkpoint entries but not parameters. Walking `params.bagel_schema` /
`params.ae_schema` (rather than listing keys by hand) keeps the table in sync with every preset and
config; a schema entry without an official name is an error, never silently skipped.

Tensor layout transforms (PyTorch -> Flax):
  linear    weight [out, in]          -> kernel [in, out]
  conv      weight [out, in, kh, kw]  -> kernel [kh, kw, in, out]
  identity  norm weight -> scale, embedding weight -> embedding, bias -> bias
Stacked layers (`layers` leading axis) have one official key per layer index.
LoRA adapters have no key in the official files; `adapter_keys` names them as PEFT does for the
official PyTorch model (`base_model.model.<module>.lora_A.weight` [rank, in], `lora_B.weight` [out,
rank]).
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np

from srum_jax.models import params
from srum_jax.models.config import BagelConfig

Path = Tuple[str, ...]

# Flax leaf name -> official leaf name.
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# LoRA adapter leaf -> PEFT's leaf name (nn.Linear weights: [out, in]); PEFT's key prefix on a
# wrapped model.
_PEFT_LEAF = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}
PEFT_PREFIX = "base_model.model."

# Flax layout = official layout transposed by this permutation.
PERMS = {"identity": None, "linear": (1, 0), "conv": (2, 3, 1, 0)}

# MoT expert module (und copy) -> official name inside `language_model.model.layers.{i}.`
_EXPERT = {
    "input_norm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
    "post_norm": "post_attention_layernorm",
    "mlp": "mlp",
}

# ViT encoder layer module -> official name inside `vit_model.vision_model.encoder.layers.{i}.`
_VIT_LAYER = {
    "layer_norm1": "layer_norm1",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "out_proj": "self_attn.out_proj",
    "layer_norm2": "layer_norm2",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}

# Non-layer module paths -> official module prefix.
_MODULES = {
    ("llm", "embed_tokens"): "language_model.model.embed_tokens",
    ("llm", "norm"): "language_model.model.norm",
    ("llm", "norm_gen"): "language_model.model.norm_moe_gen",
    ("llm", "lm_head"): "language_model.lm_head",
    ("time_embedder", "fc1"): "time_embedder.mlp.0",
    ("time_embedder", "fc2"): "time_embedder.mlp.2",
    ("vae2llm",): "vae2llm",
    ("llm2vae",): "llm2vae",
    ("connector", "fc1"): "connector.fc1",
    ("connector", "fc2"): "connector.fc2",
    ("vit", "patch_embedding"): "vit_model.vision_model.embeddings.patch_embedding",
    ("vit", "position_embedding"): "vit_model.vision_model.embeddings.position_embedding",
    ("vit", "post_layernorm"): "vit_model.vision_model.post_layernorm",
}

LATENT_POS_KEY = "latent_pos_embed.pos_embed"
VIT_POS_KEY = "vit_pos_embed.pos_embed"


class KeyEntry(NamedTuple):
  """Where an official tensor lives in the parameter tree (path relative to the part's tree)."""
  path: Path
  layer: Optional[int]  # index on the stacked `layers` axis, None for unstacked leaves
  transform: str  # 'identity' | 'linear' | 'conv'


def _walk(schema, prefix: Path = ()):
  """(path, ParamSpec) for every leaf, in insertion order."""
  for name, sub in schema.items():
    if params.is_spec(sub):
      yield prefix + (name,), sub
    else:
      yield from _walk(sub, prefix + (name,))


def _transform(path: Path, rank: int) -> str:
  if path[-1] == "kernel" or path[-1] in _PEFT_LEAF:
    if rank == 2:
      return "linear"
    if rank == 4:
      return "conv"
    raise ValueError(
        f"kernel {'.'.join(path)} has rank {rank}; only dense (2) and conv (4) are known")
  return "identity"


def _bagel_module(path: Path, layer: Optional[int]) -> str:
  """Official module prefix for a bagel-tree module path (the path without its leaf name)."""
  if path[:2] == ("llm", "layers"):
    expert, module, rest = path[2], path[3], path[4:]
    if expert not in ("und", "gen") or module not in _EXPERT:
      raise KeyError(f"no official name for schema path llm.layers.{'.'.join(path[2:])}")
    name = _EXPERT[module] + ("_moe_gen" if expert == "gen" else "")
    return ".".join((f"language_model.model.layers.{layer}", name) + rest)
  if path[:2] == ("vit", "layers"):
    if path[2] not in _VIT_LAYER or len(path) != 3:
      raise KeyError(f"no official name for schema path vit.layers.{'.'.join(path[2:])}")
    return f"vit_model.vision_model.encoder.layers.{layer}.{_VIT_LAYER[path[2]]}"
  if path not in _MODULES:
    raise KeyError(f"no official name for schema path {'.'.join(path)}")
  return _MODULES[path]


def _table(schema, module_name, adapters: bool = False) -> Dict[str, KeyEntry]:
  """Official keys of the schema's base leaves, or (`adapters`) PEFT keys of its LoRA leaves."""
  out: Dict[str, KeyEntry] = {}
  for path, spec in _walk(schema):
    if params.is_adapter_path(path) != adapters:
      continue
    stacked = bool(spec.axes) and spec.axes[0] == "layers"
    rank = len(spec.shape) - int(stacked)
    transform = _transform(path, rank)
    leaf, prefix = (_PEFT_LEAF[path[-1]], PEFT_PREFIX) if adapters else (_LEAF[path[-1]], "")
    for layer in (range(spec.shape[0]) if stacked else (None,)):
      key = f"{prefix}{module_name(path[:-1], layer)}.{leaf}"
      if key in out:
        raise ValueError(f"official key {key} produced twice by the schema")
      out[key] = KeyEntry(path, layer, transform)
  return out


def bagel_keys(cfg: BagelConfig) -> Dict[str, KeyEntry]:
  """Official `ema.safetensors` parameter keys (without the fixed sin-cos tables) -> tree
  entries."""
  return _table(params.bagel_schema(cfg), _bagel_module)


def adapter_keys(cfg: BagelConfig) -> Dict[str, KeyEntry]:
  """PEFT-named keys of `cfg.llm.lora`'s adapters -> entries of the bagel tree (empty without
  LoRA)."""
  return _table(params.bagel_schema(cfg), _bagel_module, adapters=True)


def peft_target_modules(cfg: BagelConfig) -> str:
  """PEFT's `target_modules` for the adapted official modules: one regular expression over module
  names."""
  lora = cfg.llm.lora
  if lora is None:
    return ""
  names = sorted({_bagel_module(("llm", "layers", e) + ((t,) if t in _EXPERT else ("mlp", t)), 0)
                  .split(".", 4)[-1] for e in lora.experts for t in lora.targets})
  return r"language_model\.model\.layers\.\d+\.(" + "|".join(n.replace(".", r"\.") for n in names) + ")"


def ae_keys(cfg: BagelConfig) -> Dict[str, KeyEntry]:
  """Official `ae.safetensors` keys -> tree entries; the AE tree mirrors the official module
  names."""
  return _table(params.ae_schema(cfg.ae), lambda path, layer: ".".join(path))


def official_keys(cfg: BagelConfig) -> Dict[str, Dict[str, KeyEntry]]:
  """{'bagel': {key: KeyEntry}, 'ae': {key: KeyEntry}}: every parameter's official key, per file."""
  return {"bagel": bagel_keys(cfg), "ae": ae_keys(cfg)}


def fixed_tables(cfg: BagelConfig) -> Dict[str, Tuple[int, int]]:
  """The fixed sin-cos tables the official file stores: key -> (grid side G, dim D); shape [G*G,
  D]."""
  d = cfg.llm.hidden_size
  out = {LATENT_POS_KEY: (cfg.max_latent_size, d)}
  if cfg.vit is not None:
    out[VIT_POS_KEY] = (cfg.vit_max_num_patch_per_side, d)
  return out


def get_path(tree, path: Path):
  for name in path:
    tree = tree[name]
  return tree


def official_shape(leaf_shape: Tuple[int, ...], entry: KeyEntry) -> Tuple[int, ...]:
  """Shape of the official tensor for a tree leaf of `leaf_shape` (drop the layer axis, undo the
  perm)."""
  shape = tuple(leaf_shape[1:] if entry.layer is not None else leaf_shape)
  return unpermuted_shape(shape, PERMS[entry.transform])


def unpermuted_shape(shape: Tuple[int, ...], perm) -> Tuple[int, ...]:
  """The shape before the axis permutation `perm` (None: no permutation) made `shape`."""
  if perm is None:
    return tuple(shape)
  out = [0] * len(shape)
  for k, p in enumerate(perm):
    out[p] = shape[k]
  return tuple(out)


def to_flax(x: np.ndarray, transform: str) -> np.ndarray:
  """Official layout -> Flax layout (a transpose view for linear/conv)."""
  perm = PERMS[transform]
  return x if perm is None else x.transpose(perm)


def to_official(x: np.ndarray, transform: str) -> np.ndarray:
  """Flax layout -> official layout (inverse of `to_flax`)."""
  perm = PERMS[transform]
  return x if perm is None else x.transpose(tuple(np.argsort(perm)))


def official_index(index: Tuple[slice, ...], transform: str) -> Tuple[slice, ...]:
  """A Flax-layout index (one slice per dim, layer axis removed) as the official-layout index."""
  perm = PERMS[transform]
  if perm is None:
    return tuple(index)
  out = [slice(None)] * len(perm)
  for k, p in enumerate(perm):
    out[p] = index[k]
  return tuple(out)


def expected_official_shapes(cfg: BagelConfig) -> Dict[str, Dict[str, Tuple[int, ...]]]:
  """{'bagel': {key: shape}, 'ae': {key: shape}} of the official files, from the schema alone (no
  weights).

  Includes the fixed sin-cos tables; with `cfg.vit=None` there are no vit_model / connector /
  vit_pos_embed keys (SRUM-trained `model.safetensors`).
  """
  # ShapeDtypeStructs: nothing is allocated
  abstract = params.abstract_params(params.model_schema(cfg))
  out = {}
  for part, table in official_keys(cfg).items():
    out[part] = {
        k: official_shape(get_path(abstract[part], e.path).shape, e) for k, e in table.items()
    }
  for key, (g, d) in fixed_tables(cfg).items():
    out["bagel"][key] = (g * g, d)
  return out
