"""A converted model directory: orbax parameters + serialised `BagelConfig` + tokenizer / HF json
files.

Layout of `path/`:
  params/             orbax checkpoint of the tree {'bagel': bagel_schema tree, 'ae': ae_schema
                      tree}
  model_config.json   `config_to_dict(cfg)`
  (tokenizer files, llm_config.json, vit_config.json copied from the official directory, when
  present)
Restoring places every leaf directly onto its target sharding (schema logical axes -> mesh), so a
model larger than one host's memory restores shard by shard.

An adapters-only model directory (what LoRA training writes: `write_trained_dir`) has the same
files, but params/ holds the LoRA adapters alone and `base_model.json` names the full model
directory they adapt:
  base_model.json     {"path": the base dir (absolute), "relative": the same relative to this
                       dir (local dirs), "identity": `base_identity` of the base they adapt}
  model_config.json   the config with `llm.lora` (the base's config plus the adapters)
`load_model_dir` loads the base (from `path`, else from `relative`: a workdir moved as a whole still
loads), checks that it is the base the adapters were trained on (same config and identity), and
attaches the adapters, so every reader (the stages, `export`) sees base + adapters. The base of an
adapters-only dir is always a full dir (a second round of LoRA training points at the first's base).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from srum_jax import distributed, files, paths, sharding
from srum_jax.errors import UserFileNotFoundError, UserValueError
from srum_jax.models import lora as lora_lib, params as params_lib
from srum_jax.models.config import (AEConfig, BagelConfig, LLMConfig, LoraConfig, SpecialTokens,
                                    ViTConfig, with_lora)

PARAMS_DIR = "params"
CONFIG_FILE = "model_config.json"
BASE_FILE = "base_model.json"  # an adapters-only model dir: the full model dir it adapts


def config_to_dict(cfg: BagelConfig) -> Dict[str, Any]:
  """JSON-ready dict of a BagelConfig (nested dataclasses -> dicts, tuples -> lists, vit may be
  None)."""
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
  """Inverse of `config_to_dict`; missing fields take the dataclass defaults, unknown ones are
  errors."""
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
  """Sharding of every leaf of {'bagel', 'ae'}: schema logical axes -> mesh (non-dividing dims
  replicate).

  Without a mesh every leaf lives on the first local device.
  """
  schema = params_lib.model_schema(cfg)
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: one, schema, is_leaf=params_lib.is_spec)
  return sharding.schema_shardings(schema, mesh, rules or sharding.DEFAULT_RULES)


def save_model_dir(path: str, cfg: BagelConfig, params) -> None:
  """Write `params` ({'bagel', 'ae'}) as an orbax checkpoint plus `model_config.json` under `path`
  (local or remote: orbax writes gs:// itself)."""
  path = paths.abspath(path)
  paths.path(path).mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(path, PARAMS_DIR), params, force=True)
    ckpt.wait_until_finished()
  files.write_json(os.path.join(path, CONFIG_FILE), config_to_dict(cfg))


# Files of a model dir besides the parameters that a trained copy carries over (tokenizer, official
# json).
CARRIED_FILES = ("tokenizer", "special_tokens", "llm_config", "vit_config", "vocab", "merges")


def _write_dir(path: str, cfg: BagelConfig, tree, files_from: Optional[str], dtype,
               base: Optional[dict] = None) -> str:
  """`tree` saved as `path`'s params/ with `cfg`, replacing whatever `path` held; `files_from`'s
  `CARRIED_FILES` copied beside; `base`: the record of an adapters-only dir."""
  dst = paths.path(path)
  if jax.process_index() == 0 and dst.exists():
    paths.rmtree(dst)
  distributed.barrier(f"write_model_dir:{dst}:clean")
  if dtype is not None:
    tree = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), tree)
  save_model_dir(str(dst), cfg, tree)
  if jax.process_index() == 0:
    if files_from is not None:
      for f in paths.path(files_from).iterdir():
        if f.is_file() and f.name.startswith(CARRIED_FILES):
          paths.copy_file(f, dst / f.name)
    if base is not None:
      (dst / BASE_FILE).write_text(json.dumps(base, indent=1))
  distributed.barrier(f"write_model_dir:{dst}:done")
  return str(dst)


def write_model_dir(path: str, cfg: BagelConfig, params, files_from: Optional[str] = None, *,
                    dtype=None) -> str:
  """`params` as a model directory (orbax + model_config.json) replacing whatever `path` held;
  with `files_from`, that model dir's tokenizer and json files (`CARRIED_FILES`) are copied beside
  (`python -m srum_jax export` turns the result into official safetensors); `dtype` casts every
  leaf first. Every process takes part in the orbax save (its shards); process 0 clears the
  folder and copies the files. Local or remote (`gs://`)."""
  return _write_dir(path, cfg, params, files_from, dtype)


def base_identity(path: str) -> str:
  """A SHA-256 naming one save of a model directory: its config and the orbax metadata of its
  parameters (orbax stamps each save with its time; a copy of the directory keeps the stamp,
  saving it again changes it). A few small reads, whatever the model's size."""
  digest = hashlib.sha256()
  for rel in (CONFIG_FILE, f"{PARAMS_DIR}/_CHECKPOINT_METADATA", f"{PARAMS_DIR}/_METADATA"):
    f = paths.path(os.path.join(path, rel))
    if f.is_file():
      digest.update(rel.encode() + b"\0" + f.read_bytes() + b"\n")
  return digest.hexdigest()


def read_base_record(path: str) -> Optional[dict]:
  """The `base_model.json` record of an adapters-only model dir; None for a full model dir."""
  f = paths.path(os.path.join(path, BASE_FILE))
  return files.read_json(f, "base model record") if f.is_file() else None


def resolve_base(path: str) -> Optional[str]:
  """The full model dir the adapters-only dir `path` adapts (None: `path` is a full dir): its
  recorded path, else its recorded relative path, whichever holds the same save (`base_identity`);
  a `UserError` when neither does (the base moved, or was saved again: another model for all the
  adapters know)."""
  record = read_base_record(path)
  if record is None:
    return None
  tried = [record["path"]]
  if record.get("relative") and not paths.is_remote(path):
    tried.append(os.path.normpath(os.path.join(path, record["relative"])))
  for base in tried:
    found = paths.path(os.path.join(base, CONFIG_FILE)).is_file()
    if found and base_identity(base) == record["identity"]:
      return base
  raise UserFileNotFoundError(
      f"model dir {path} holds LoRA adapters of the base model {record['path']}, which is "
      f"missing or was saved again since ({BASE_FILE}: identity {record['identity'][:12]}); put "
      f"that base back (or merge the adapters with `python -m srum_jax export --adapters merge` "
      f"where it is)")


def base_of(path: str) -> Optional[str]:
  """The full model dir without adapters that `path`'s parameters build on: its base (an
  adapters-only dir), `path` itself (a dir without adapters), or None (a full dir with adapters
  inside)."""
  base = resolve_base(path)
  if base is not None:
    return base
  return path if load_config(path).llm.lora is None else None


def write_adapter_dir(path: str, cfg: BagelConfig, params, base_dir: str,
                      files_from: Optional[str] = None, *, dtype=None) -> str:
  """The adapters of `params` (a `cfg` with `llm.lora`) as an adapters-only model dir over the
  full model dir `base_dir` (whose config must be `cfg` without adapters); see the module
  docstring."""
  path, base_dir = paths.abspath(path), paths.abspath(base_dir)
  if cfg.llm.lora is None:
    raise ValueError("an adapters-only model dir needs a config with llm.lora")
  base_cfg = load_config(base_dir)
  if read_base_record(base_dir) is not None or base_cfg != with_lora(cfg, None):
    raise ValueError(f"{base_dir} is not a full model dir of this model without adapters")
  record = {"path": base_dir, "identity": base_identity(base_dir)}
  if not paths.is_remote(path):
    record["relative"] = os.path.relpath(base_dir, path)
  adapters = lora_lib.split_adapters(params)[1]
  return _write_dir(path, cfg, adapters, files_from, dtype, base=record)


def write_trained_dir(path: str, cfg: BagelConfig, params, source_dir: str, *,
                      dtype=None) -> str:
  """The model a training made from the model dir `source_dir`: with adapters (`cfg.llm.lora`) an
  adapters-only dir over the base `source_dir` builds on (`base_of`), else (or when that holds
  its adapters inside) a full model dir; `source_dir`'s tokenizer and json files go along."""
  base = base_of(source_dir) if cfg.llm.lora is not None else None
  if base is not None:
    return write_adapter_dir(path, cfg, params, base, source_dir, dtype=dtype)
  return write_model_dir(path, cfg, params, source_dir, dtype=dtype)


def load_config(path: str) -> BagelConfig:
  return config_from_dict(files.read_json(os.path.join(path, CONFIG_FILE), "model config"))


def _restore(path: str, schema, shardings, dtype, adapter_dtype):
  """The orbax tree under `path`/params for `schema`, onto `shardings`, cast (`load_model_dir`)."""
  if not paths.path(os.path.join(path, PARAMS_DIR, "_METADATA")).is_file():
    raise UserFileNotFoundError(f"model directory {path} lacks {PARAMS_DIR}/_METADATA (an "
                                f"incomplete orbax save; convert or save the model again)")
  with ocp.StandardCheckpointer() as ckpt:
    stored = ckpt.metadata(os.path.join(path, PARAMS_DIR)).item_metadata.tree
    abstract = params_lib.abstract_params(schema)

    def leaf(p, a, m, s):
      adapter = adapter_dtype is not None and params_lib.is_adapter_path(p)
      want = adapter_dtype if adapter else dtype
      return jax.ShapeDtypeStruct(a.shape, m.dtype if want is None else jnp.dtype(want), sharding=s)

    target = jax.tree_util.tree_map_with_path(leaf, abstract, stored, shardings)
    return ckpt.restore(os.path.join(path, PARAMS_DIR), target)


def load_model_dir(path: str, *, mesh: Optional[jax.sharding.Mesh] = None, dtype=None,
                   rules=None, adapter_dtype=None) -> Tuple[BagelConfig, Any]:
  """(cfg, params) restored straight onto the target shardings; `dtype` casts (None: as stored),
  LoRA adapters (a config with `llm.lora`) to `adapter_dtype` when given (e.g. fp32 adapters beside
  a bf16 base). An adapters-only dir gives its base's parameters with its adapters attached (see
  the module docstring)."""
  path = paths.abspath(path)
  cfg = load_config(path)
  shardings = target_shardings(cfg, mesh, rules)
  base_dir = resolve_base(path)
  if base_dir is None:
    return cfg, _restore(path, params_lib.model_schema(cfg), shardings, dtype, adapter_dtype)
  base_cfg, base = load_model_dir(base_dir, mesh=mesh, dtype=dtype, rules=rules)
  if base_cfg != with_lora(cfg, None) or read_base_record(base_dir) is not None:
    raise UserValueError(f"model dir {path}: its base {base_dir} is not this model without "
                         "adapters")
  schema = lora_lib.split_adapters(params_lib.model_schema(cfg))[1]
  adapters = _restore(path, schema, lora_lib.split_adapters(shardings)[1], dtype, adapter_dtype)
  return cfg, lora_lib.attach_adapters(base, adapters)
