"""A converted model directory: orbax parameters + serialised `BagelConfig` + tokenizer / HF json files.

Layout of `path/`:
  params/             orbax checkpoint of the tree {'bagel': bagel_schema tree, 'ae': ae_schema tree}
  model_config.json   `config_to_dict(cfg)`
  (tokenizer files, llm_config.json, vit_config.json copied from the official directory, when present)
Restoring places every leaf directly onto its target sharding (schema logical axes -> mesh), so a model
larger than one host's memory restores shard by shard.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from srum_jax import distributed, files, paths, sharding
from srum_jax.errors import UserFileNotFoundError
from srum_jax.models import params as params_lib
from srum_jax.models.config import (AEConfig, BagelConfig, LLMConfig, LoraConfig, SpecialTokens,
                                    ViTConfig)

PARAMS_DIR = "params"
CONFIG_FILE = "model_config.json"


def config_to_dict(cfg: BagelConfig) -> Dict[str, Any]:
  """JSON-ready dict of a BagelConfig (nested dataclasses -> dicts, tuples -> lists, vit may be None)."""
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _build(cls, d: Dict[str, Any]):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields {unknown}")
  return cls(**d)


def _llm_config(d: Dict[str, Any]) -> LLMConfig:
  """LLMConfig from its dict; `lora` (absent or None: no adapters) holds lists for its tuples."""
  d = dict(d)
  lora = d.pop("lora", None)
  if lora is not None:
    lora = dict(lora)
    for name in ("targets", "experts"):
      if name in lora:
        lora[name] = tuple(lora[name])
    d["lora"] = _build(LoraConfig, lora)
  return _build(LLMConfig, d)


def config_from_dict(d: Dict[str, Any]) -> BagelConfig:
  """Inverse of `config_to_dict`; missing fields take the dataclass defaults, unknown ones are errors."""
  d = dict(d)
  sub = {
      "llm": _llm_config,
      "vit": lambda v: None if v is None else _build(ViTConfig, v),
      "ae": lambda v: _build(AEConfig, dict(v, ch_mult=tuple(v.get("ch_mult", AEConfig.ch_mult)))),
      "tokens": lambda v: _build(SpecialTokens, v),
  }
  for name, make in sub.items():
    if name in d:
      d[name] = make(d[name])
  return _build(BagelConfig, d)


def target_shardings(cfg: BagelConfig, mesh: Optional[jax.sharding.Mesh] = None, rules=None):
  """Sharding of every leaf of {'bagel', 'ae'}: schema logical axes -> mesh (non-dividing dims replicate).

  Without a mesh every leaf lives on the first local device.
  """
  schema = params_lib.model_schema(cfg)
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: one, schema, is_leaf=params_lib.is_spec)
  return sharding.schema_shardings(schema, mesh, rules or sharding.DEFAULT_RULES)


def save_model_dir(path: str, cfg: BagelConfig, params) -> None:
  """Write `params` ({'bagel', 'ae'}) as an orbax checkpoint plus `model_config.json` under `path` (local or
  remote: orbax writes gs:// itself)."""
  path = paths.abspath(path)
  paths.path(path).mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(path, PARAMS_DIR), params, force=True)
    ckpt.wait_until_finished()
  paths.path(os.path.join(path, CONFIG_FILE)).write_text(json.dumps(config_to_dict(cfg), indent=1))


# Files of a model dir besides the parameters that a trained copy carries over (tokenizer, official json).
CARRIED_FILES = ("tokenizer", "special_tokens", "llm_config", "vit_config", "vocab", "merges")


def write_model_dir(path: str, cfg: BagelConfig, params, files_from: Optional[str] = None, *,
                    dtype=None) -> str:
  """`params` as a model directory (orbax + model_config.json) replacing whatever `path` held; with `files_from`,
  that model dir's tokenizer and json files (`CARRIED_FILES`) are copied beside (`python -m srum_jax export`
  turns the result into official safetensors); `dtype` casts every leaf first. Every process takes part in the
  orbax save (its shards); process 0 clears the folder and copies the files. Local or remote (`gs://`)."""
  dst = paths.path(path)
  if jax.process_index() == 0 and dst.exists():
    paths.rmtree(dst)
  distributed.barrier(f"write_model_dir:{dst}:clean")
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
  save_model_dir(str(dst), cfg, params)
  if files_from is not None and jax.process_index() == 0:
    for f in paths.path(files_from).iterdir():
      if f.is_file() and f.name.startswith(CARRIED_FILES):
        paths.copy_file(f, dst / f.name)
  distributed.barrier(f"write_model_dir:{dst}:done")
  return str(dst)


def load_config(path: str) -> BagelConfig:
  return config_from_dict(files.read_json(os.path.join(path, CONFIG_FILE), "model config"))


def load_model_dir(path: str, *, mesh: Optional[jax.sharding.Mesh] = None, dtype=None,
                   rules=None, adapter_dtype=None) -> Tuple[BagelConfig, Any]:
  """(cfg, params) restored straight onto the target shardings; `dtype` casts (None: as stored), LoRA adapters
  (a config with `llm.lora`) to `adapter_dtype` when given (e.g. fp32 adapters beside a bf16 base)."""
  path = paths.abspath(path)
  cfg = load_config(path)
  shardings = target_shardings(cfg, mesh, rules)
  if not paths.path(os.path.join(path, PARAMS_DIR, "_METADATA")).is_file():
    raise UserFileNotFoundError(f"model directory {path} lacks {PARAMS_DIR}/_METADATA (an incomplete orbax save; "
                                f"convert or save the model again)")
  with ocp.StandardCheckpointer() as ckpt:
    stored = ckpt.metadata(os.path.join(path, PARAMS_DIR)).item_metadata.tree
    abstract = params_lib.abstract_params(params_lib.model_schema(cfg))

    def leaf(path, a, m, s):
      want = adapter_dtype if adapter_dtype is not None and params_lib.is_adapter_path(path) else dtype
      return jax.ShapeDtypeStruct(a.shape, jnp.dtype(want) if want is not None else m.dtype, sharding=s)

    target = jax.tree_util.tree_map_with_path(leaf, abstract, stored, shardings)
    params = ckpt.restore(os.path.join(path, PARAMS_DIR), target)
  return cfg, params
