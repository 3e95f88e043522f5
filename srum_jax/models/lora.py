"""LoRA adapters as parameter-tree operations: split off, attach, initialise and fold into the base
kernels.

The adapters themselves are declared by the schema (`params.lora_adapter`, from `cfg.llm.lora`) and
applied by `layers.dense`; this module works on whole trees (nested dicts, as every parameter tree
here is):

    # two pruned trees; attach_adapters(base, adapters) undoes it
    base, adapters = split_adapters(params)
    # fresh adapters (B = 0: the model is unchanged)
    adapters = init_adapters(cfg, key)
    # W + A @ B * alpha / rank, adapters dropped (export)
    merged = merge_adapters(params, cfg.llm.lora)
    cfg, params = for_training(cfg, params, lora, key)  # what a training with `lora` starts from
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from srum_jax.models import params as params_lib
from srum_jax.models.config import BagelConfig, LoraConfig, with_lora

Tree = Any


def _prune(tree, keep) -> Tree:
  """The nested dict `tree` restricted to the leaves whose path `keep(path)` accepts (empty dicts
  dropped)."""
  def walk(node, path):
    if not isinstance(node, dict):
      return node if keep(path) else None
    out = {}
    for name, sub in node.items():
      got = walk(sub, path + (name,))
      if got is not None and not (isinstance(got, dict) and not got):
        out[name] = got
    return out
  return walk(tree, ())


def split_adapters(tree) -> Tuple[Tree, Tree]:
  """(base, adapters): `tree` (parameters or a schema) without its LoRA leaves, and those leaves
  alone."""
  return (_prune(tree, lambda p: not params_lib.is_adapter_path(p)),
          _prune(tree, params_lib.is_adapter_path))


def attach_adapters(base, adapters) -> Tree:
  """The union of two disjoint nested-dict trees (inverse of `split_adapters`)."""
  if not isinstance(adapters, dict):
    raise ValueError("adapter tree and base tree overlap at a leaf")
  out = dict(base)
  for name, sub in adapters.items():
    out[name] = attach_adapters(base[name], sub) if name in base else sub
  return out


def adapter_schema(cfg: BagelConfig) -> Tree:
  """The schema of `cfg`'s adapters alone ({'bagel': {'llm': {'layers': ...}}}); empty without
  LoRA."""
  return split_adapters(params_lib.model_schema(cfg))[1]


def init_adapters(cfg: BagelConfig, key: jax.Array, dtype=jnp.float32) -> Tree:
  """Fresh adapters for `cfg.llm.lora` (A kaiming-uniform, B zeros), in `dtype`."""
  return params_lib.init_params(adapter_schema(cfg), key, dtype)


def fold(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """kernel + a @ b * scale for [..., in, out] kernels, in fp32 at full precision, in the
  kernel's dtype."""
  delta = jnp.matmul(
      jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return (jnp.asarray(kernel, jnp.float32) + delta * scale).astype(jnp.asarray(kernel).dtype)


def merge_adapters(tree, lora: Optional[LoraConfig]) -> Tree:
  """`tree` with every adapted kernel replaced by `fold` of its adapters and the adapters dropped:
  the base model that computes what base + adapters computes (up to rounding in the kernel's dtype).
  """
  if not isinstance(tree, dict):
    return tree
  if "lora_a" in tree:
    if lora is None:
      raise ValueError("the tree holds LoRA adapters but no LoraConfig (scale) was given")
    out = {k: v for k, v in tree.items() if k not in params_lib.ADAPTER_LEAVES}
    out["kernel"] = fold(tree["kernel"], tree["lora_a"], tree["lora_b"], lora.scale)
    return out
  return {k: merge_adapters(v, lora) for k, v in tree.items()}


def has_adapters(tree) -> bool:
  return any(params_lib.is_adapter_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree))


def lora_config(settings: Mapping[str, Any]) -> Optional[LoraConfig]:
  """A LoraConfig from a settings mapping (the run config's `model.lora`: rank, alpha, dropout,
  targets, experts); rank 0 means no adapters (None)."""
  if int(settings["rank"]) == 0:
    return None
  return LoraConfig(
      rank=int(settings["rank"]), alpha=float(settings["alpha"]),
      dropout=float(settings["dropout"]), targets=tuple(settings["targets"]), experts=tuple(
          settings["experts"]))


def _shape_of(lora: LoraConfig):
  """What makes two LoraConfigs the same adapters (the dropout acts in training only)."""
  return lora.rank, float(lora.alpha), frozenset(lora.targets), frozenset(lora.experts)


def for_training(cfg: BagelConfig, params, lora: Optional[LoraConfig], key: jax.Array,
                 dtype=jnp.float32) -> Tuple[BagelConfig, Tree]:
  """(cfg, params) that a training with adapters `lora` (None: a full fine-tune) starts from, given
  a model `cfg`, `params` ({'bagel', 'ae'}): a model without adapters gets fresh ones
  (`init_adapters` from `key`, in `dtype`); a model with adapters keeps them when they are `lora`'s
  (rank, alpha, targets, experts; the dropout is `lora`'s), else ValueError; a full fine-tune of a
  model with adapters trains the merged model (`merge_adapters`)."""
  have = cfg.llm.lora
  if lora is None:
    return (cfg, params) if have is None else (with_lora(cfg, None), merge_adapters(params, have))
  if have is None:
    cfg = with_lora(cfg, lora)
    return cfg, attach_adapters(params, init_adapters(cfg, key, dtype))
  if _shape_of(have) != _shape_of(lora):
    raise ValueError(f"the model holds LoRA adapters {have}, not the {lora} asked for")
  return with_lora(cfg, lora), params
