"""Parameter schema: one declarative table of every weight's shape, logical axes and initialiser.

The schema is the single source of the parameter-tree layout. It drives random initialisation,
abstract (shape-only) parameters for ahead-of-time compilation, logical -> mesh sharding
(`srum_jax.sharding`), and the checkpoint converter (`srum_jax.convert`). Trees are nested dicts
with Flax naming: `kernel` ([in, out] for dense, [kh, kw, in, out] for conv), `bias`, `scale`
(norms), `embedding`. Layers of the LLM and ViT are stacked on a leading `layers` axis and run with
`lax.scan`. LoRA adapters (`cfg.llm.lora`) are leaves `lora_a` [in, rank] and `lora_b` [rank, out]
next to the `kernel` they adapt (`models.lora` splits them off, folds them in, and names them).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from srum_jax.models.config import AEConfig, BagelConfig

Tree = Dict[str, Any]

ADAPTER_LEAVES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  shape: Tuple[int, ...]
  axes: Tuple[Optional[str], ...]  # logical axis name per dim (None: replicated)
  init: str = "normal"  # normal (std 1/sqrt(fan_in)) | zeros | ones | embed (std 0.02)
  #                      | kaiming_uniform (U(-b, b), b = 1/sqrt(fan_in): PEFT's LoRA A)
  fan_in_dims: int = 1  # how many trailing-but-one dims make the fan-in (conv: 3)

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f"shape {self.shape} and axes {self.axes} differ in rank")


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def stack_layers(tree: Tree, n: int) -> Tree:
  """Prefix every spec in `tree` with a stacked `layers` axis of size n."""
  return jax.tree.map(
      lambda s: dataclasses.replace(s, shape=(n,) + s.shape, axes=("layers",) + s.axes), tree,
      is_leaf=is_spec)


def dense(d_in: int, d_out: int, in_axis: Optional[str], out_axis: Optional[str], bias: bool = True,
          init: str = "normal") -> Tree:
  p = {"kernel": ParamSpec((d_in, d_out), (in_axis, out_axis), init)}
  if bias:
    p["bias"] = ParamSpec((d_out,), (out_axis,), "zeros")
  return p


def norm(d: int, axis: Optional[str] = "norm", bias: bool = False) -> Tree:
  p = {"scale": ParamSpec((d,), (axis,), "ones")}
  if bias:
    p["bias"] = ParamSpec((d,), (axis,), "zeros")
  return p


def lora_adapter(kernel: ParamSpec, rank: int) -> Tree:
  """LoRA leaves for a dense `kernel` [in, out]: A [in, rank] (PEFT's kaiming-uniform init), B
  [rank, out] (zeros: a fresh adapter leaves the model unchanged). The rank axis is replicated."""
  (d_in, d_out), (in_axis, out_axis) = kernel.shape, kernel.axes
  return {"lora_a": ParamSpec((d_in, rank), (in_axis, "lora_rank"), "kaiming_uniform"),
          "lora_b": ParamSpec((rank, d_out), ("lora_rank", out_axis), "zeros")}


# ----------------------------------------------------------------------------------------------
# BAGEL (everything in ema.safetensors)

def expert_schema(cfg: BagelConfig, expert: str = "und") -> Tree:
  """One expert's per-token weights in one MoT layer (und and gen have the same shapes), with the
  LoRA adapters `cfg.llm.lora` puts on this expert's projections."""
  c = cfg.llm
  d = c.hidden_size
  q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
  tree = {
      "input_norm": norm(d),
      "q_proj": dense(d, q_dim, "embed", "heads"),
      "k_proj": dense(d, kv_dim, "embed", "kv_heads"),
      "v_proj": dense(d, kv_dim, "embed", "kv_heads"),
      "o_proj": dense(q_dim, d, "heads", "embed", bias=False),
      "q_norm": norm(c.head_dim),
      "k_norm": norm(c.head_dim),
      "post_norm": norm(d),
      "mlp": {
          "gate_proj": dense(d, c.intermediate_size, "embed", "mlp", bias=False),
          "up_proj": dense(d, c.intermediate_size, "embed", "mlp", bias=False),
          "down_proj": dense(c.intermediate_size, d, "mlp", "embed", bias=False),
      },
  }
  if c.lora is not None and expert in c.lora.experts:
    for name in c.lora.targets:
      proj = tree["mlp"][name] if name in tree["mlp"] else tree[name]
      proj.update(lora_adapter(proj["kernel"], c.lora.rank))
  return tree


def llm_schema(cfg: BagelConfig) -> Tree:
  c = cfg.llm
  return {
      "embed_tokens": {
          "embedding": ParamSpec((c.vocab_size, c.hidden_size), ("vocab", "embed"), "embed")
      },
      "layers": stack_layers({e: expert_schema(cfg, e) for e in ("und", "gen")},
                             c.num_hidden_layers),
      "norm": norm(c.hidden_size),
      "norm_gen": norm(c.hidden_size),
      "lm_head": dense(c.hidden_size, c.vocab_size, "embed", "vocab", bias=False),
  }


def vit_schema(cfg: BagelConfig) -> Tree:
  v = cfg.vit
  c = v.hidden_size
  layer = {
      "layer_norm1": norm(c, "norm", bias=True),
      "q_proj": dense(c, c, "vit_embed", "vit_heads"),
      "k_proj": dense(c, c, "vit_embed", "vit_heads"),
      "v_proj": dense(c, c, "vit_embed", "vit_heads"),
      "out_proj": dense(c, c, "vit_heads", "vit_embed"),
      "layer_norm2": norm(c, "norm", bias=True),
      "fc1": dense(c, v.intermediate_size, "vit_embed", "vit_mlp"),
      "fc2": dense(v.intermediate_size, c, "vit_mlp", "vit_embed"),
  }
  return {
      "patch_embedding": dense(v.patch_dim, c, None, "vit_embed"),
      "position_embedding": {
          "embedding": ParamSpec((v.num_positions, c), (None, "vit_embed"), "embed")
      },
      "layers": stack_layers(layer, v.num_hidden_layers),
      "post_layernorm": norm(c, "norm", bias=True),
  }


def bagel_schema(cfg: BagelConfig) -> Tree:
  """Everything the official `ema.safetensors` holds except the two fixed sin-cos tables.

  The fixed tables (`latent_pos_embed`, `vit_pos_embed`) are recomputed, never trained
  (`srum_jax.models.embeddings.sincos_2d_table`); the converter checks and the exporter writes them.
  """
  d = cfg.llm.hidden_size
  tree = {
      "llm": llm_schema(cfg),
      "time_embedder": {
          "fc1": dense(cfg.timestep_embed_dim, d, None, "embed"),
          "fc2": dense(d, d, "mlp", "embed"),
      },
      "vae2llm": dense(cfg.patch_latent_dim, d, None, "embed"),
      "llm2vae": dense(d, cfg.patch_latent_dim, "embed", None, init="zeros"),
  }
  if cfg.vit is not None:
    tree["vit"] = vit_schema(cfg)
    tree["connector"] = {
        "fc1": dense(cfg.vit.hidden_size, d, "vit_embed", "embed"),
        "fc2": dense(d, d, "mlp", "embed"),
    }
  return tree


# ----------------------------------------------------------------------------------------------
# FLUX autoencoder (ae.safetensors). Mirrors the official module names with string indices.

def _conv(c_in: int, c_out: int, k: int) -> Tree:
  return {
      "kernel": ParamSpec((k, k, c_in, c_out), (None, None, None, None), "normal", fan_in_dims=3),
      "bias": ParamSpec((c_out,), (None,), "zeros")
  }


def _gn(c: int) -> Tree:
  return {"scale": ParamSpec((c,), (None,), "ones"), "bias": ParamSpec((c,), (None,), "zeros")}


def _resblock(c_in: int, c_out: int) -> Tree:
  p = {
      "norm1": _gn(c_in),
      "conv1": _conv(c_in, c_out, 3),
      "norm2": _gn(c_out),
      "conv2": _conv(c_out, c_out, 3)
  }
  if c_in != c_out:
    p["nin_shortcut"] = _conv(c_in, c_out, 1)
  return p


def _attn(c: int) -> Tree:
  return {
      "norm": _gn(c),
      "q": _conv(c, c, 1),
      "k": _conv(c, c, 1),
      "v": _conv(c, c, 1),
      "proj_out": _conv(c, c, 1)
  }


def ae_schema(a: AEConfig) -> Tree:
  chans = [a.ch * m for m in a.ch_mult]
  top = chans[-1]
  enc: Tree = {"conv_in": _conv(a.in_channels, a.ch, 3), "down": {}}
  c_in = a.ch
  for i, c in enumerate(chans):
    blocks = {}
    for j in range(a.num_res_blocks):
      blocks[str(j)] = _resblock(c_in, c)
      c_in = c
    level = {"block": blocks}
    if i < len(chans) - 1:
      level["downsample"] = {"conv": _conv(c, c, 3)}
    enc["down"][str(i)] = level
  enc["mid"] = {
      "block_1": _resblock(top, top),
      "attn_1": _attn(top),
      "block_2": _resblock(top, top)
  }
  enc["norm_out"] = _gn(top)
  enc["conv_out"] = _conv(top, 2 * a.z_channels, 3)

  dec: Tree = {
      "conv_in": _conv(a.z_channels, top, 3),
      "mid": {
          "block_1": _resblock(top, top),
          "attn_1": _attn(top),
          "block_2": _resblock(top, top)
      },
      "up": {}
  }
  c_in = top
  for i in reversed(range(len(chans))):
    blocks = {}
    for j in range(a.num_res_blocks + 1):
      blocks[str(j)] = _resblock(c_in, chans[i])
      c_in = chans[i]
    level = {"block": blocks}
    if i > 0:
      level["upsample"] = {"conv": _conv(chans[i], chans[i], 3)}
    dec["up"][str(i)] = level
  dec["norm_out"] = _gn(a.ch)
  dec["conv_out"] = _conv(a.ch, a.out_ch, 3)
  return {"encoder": enc, "decoder": dec}


# ----------------------------------------------------------------------------------------------
# Schema -> arrays

def _init_leaf(spec: ParamSpec, key, dtype):
  if spec.init == "zeros":
    return jnp.zeros(spec.shape, dtype)
  if spec.init == "ones":
    return jnp.ones(spec.shape, dtype)
  if spec.init == "embed":
    return (0.02 * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)
  fan_in = int(np.prod(spec.shape[-1 - spec.fan_in_dims:-1]))
  if spec.init == "kaiming_uniform":
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, spec.shape, jnp.float32, -bound, bound).astype(dtype)
  return (jax.random.normal(key, spec.shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)


def is_adapter_path(path) -> bool:
  """Whether a tree path (key entries or names) ends at a LoRA adapter leaf."""
  if not path:
    return False
  last = path[-1]
  return getattr(last, "key", getattr(last, "name", last)) in ADAPTER_LEAVES


def leaf_dtypes(schema: Tree, dtype, adapter_dtype=None) -> Tree:
  """The dtype of every leaf: `dtype`, and `adapter_dtype` (default `dtype`) for LoRA adapters (e.g.
  a bf16 frozen base with fp32 adapter master weights)."""
  adapter_dtype = dtype if adapter_dtype is None else adapter_dtype
  return jax.tree_util.tree_map_with_path(
      lambda path, _: jnp.dtype(adapter_dtype
                                if is_adapter_path(path) else dtype), schema, is_leaf=is_spec)


def cast_params(tree: Tree, dtype, adapter_dtype=None) -> Tree:
  """`tree` (arrays) with every leaf in `dtype`, the LoRA adapters in `adapter_dtype` (default
  `dtype`)."""
  adapter_dtype = dtype if adapter_dtype is None else adapter_dtype
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.astype(adapter_dtype if is_adapter_path(path) else dtype), tree)


def init_params(schema: Tree, key: jax.Array, dtype=jnp.float32, adapter_dtype=None) -> Tree:
  """Random parameters for `schema` (pure; jit / eval_shape friendly); adapters in
  `adapter_dtype`."""
  leaves, treedef = jax.tree.flatten(schema, is_leaf=is_spec)
  dtypes = jax.tree.leaves(leaf_dtypes(schema, dtype, adapter_dtype))
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef,
                            [_init_leaf(s, k, dt) for s, k, dt in zip(leaves, keys, dtypes)])


def model_schema(cfg: BagelConfig) -> Tree:
  """The whole model's tree {'bagel': bagel_schema, 'ae': ae_schema} (what a model dir /
  checkpoint holds)."""
  return {"bagel": bagel_schema(cfg), "ae": ae_schema(cfg.ae)}


def abstract_params(schema: Tree, dtype=jnp.float32, adapter_dtype=None) -> Tree:
  """ShapeDtypeStructs of `schema`'s leaves (adapters in `adapter_dtype`, default `dtype`)."""
  return jax.tree.map(lambda s, dt: jax.ShapeDtypeStruct(s.shape, dt), schema,
                      leaf_dtypes(schema, dtype, adapter_dtype), is_leaf=is_spec)


def logical_axes(schema: Tree) -> Tree:
  """Tree of logical-axis tuples, same structure as the parameters."""
  return jax.tree.map(lambda s: jax.sharding.PartitionSpec(*s.axes), schema, is_leaf=is_spec)


def count_params(tree: Tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree, is_leaf=is_spec)
             if hasattr(x, "shape"))
