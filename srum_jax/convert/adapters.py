"""LoRA adapters on disk apart from their base model, in PEFT's layout for the official PyTorch BAGEL.

  <dir>/adapter_model.safetensors  PEFT keys (`keymap.adapter_keys`): `base_model.model.<official module>.lora_A
                                   .weight` [rank, in] and `.lora_B.weight` [out, rank], one per layer
  <dir>/adapter_config.json        PEFT's LoRA fields: r, lora_alpha, lora_dropout, target_modules (a regular
                                   expression over the official module names), bias "none", ...

    flax_to_hf.save_adapters(dir, cfg, params)           # writing lives with the exporter
    lora, adapters = read_adapters(dir, cfg)             # NumPy {'bagel': ...} tree of adapters only
    cfg, params = load_with_adapters(base_dir, dir)      # a model dir or official dir + adapters, attached

Which projections carry adapters and their rank are read from the file's keys and shapes; alpha and dropout
from the json.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import jax
import numpy as np

from srum_jax import sharding
from srum_jax.convert import checkpoint, hf_to_flax, keymap
from srum_jax.models import lora as lora_lib, params as params_lib
from srum_jax.models.config import LORA_EXPERTS, LORA_TARGETS, BagelConfig, LoraConfig, with_lora

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_config_json(cfg: BagelConfig) -> Dict[str, Any]:
  """PEFT's adapter_config.json fields for `cfg.llm.lora`."""
  lora = cfg.llm.lora
  return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
          "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": "none",
          "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "modules_to_save": None,
          "target_modules": keymap.peft_target_modules(cfg)}


def _lora_from_files(cfg: BagelConfig, shapes: Dict[str, Tuple[int, ...]], meta: Dict[str, Any]) -> LoraConfig:
  """The LoraConfig the file holds: the adapted (expert, projection) pairs and the rank from layer 0's keys."""
  probe = with_lora(cfg, LoraConfig(rank=1, targets=LORA_TARGETS, experts=LORA_EXPERTS))
  found = {}
  for key, e in keymap.adapter_keys(probe).items():
    if e.layer == 0 and e.path[-1] == "lora_a" and key in shapes:
      expert, target = e.path[2], e.path[-2]
      found[(expert, target)] = shapes[key][0]
  if not found:
    raise ValueError(f"{ADAPTER_WEIGHTS} holds no LoRA keys of this model's layers")
  ranks = set(found.values())
  if len(ranks) != 1:
    raise ValueError(f"{ADAPTER_WEIGHTS}: adapters of different ranks {sorted(ranks)} are not supported")
  experts = tuple(x for x in LORA_EXPERTS if any(e == x for e, _ in found))
  targets = tuple(t for t in LORA_TARGETS if any(tt == t for _, tt in found))
  if {(e, t) for e in experts for t in targets} != set(found):
    raise ValueError(f"{ADAPTER_WEIGHTS}: the adapted projections differ between experts: {sorted(found)}")
  return LoraConfig(rank=ranks.pop(), alpha=float(meta["lora_alpha"]), dropout=float(meta.get("lora_dropout", 0.0)),
                    targets=targets, experts=experts)


def read_adapters(src_dir: str, cfg: BagelConfig) -> Tuple[LoraConfig, Any]:
  """(LoraConfig, {'bagel': adapters} NumPy tree) from `src_dir` for the base model `cfg`. Keys or shapes
  that do not fit the base model raise a ValueError listing them."""
  with open(os.path.join(src_dir, ADAPTER_CONFIG)) as f:
    meta = json.load(f)
  if meta.get("use_rslora") or meta.get("bias", "none") != "none":
    raise ValueError(f"{ADAPTER_CONFIG}: only plain LoRA (no rsLoRA, bias 'none') is supported")
  path = os.path.join(src_dir, ADAPTER_WEIGHTS)
  header, problems = hf_to_flax.read_header(path)
  if problems:
    raise ValueError("\n".join(problems))
  shapes = {k: s for k, (_, s) in header.items()}
  lora = _lora_from_files(with_lora(cfg, None), shapes, meta)
  full = with_lora(cfg, lora)
  table = keymap.adapter_keys(full)
  abstract = lora_lib.adapter_schema(full)
  want = {k: keymap.official_shape(keymap.get_path(abstract["bagel"], e.path).shape, e) for k, e in table.items()}
  bad = [f"{k}: unexpected" for k in sorted(set(shapes) - set(want))]
  bad += [f"{k}: missing" for k in sorted(set(want) - set(shapes))]
  bad += [f"{k}: shape {list(shapes[k])}, expected {list(w)}" for k, w in want.items() if k in shapes and shapes[k] != w]
  if bad:
    raise ValueError(f"{path} does not fit the base model:\n    " + "\n    ".join(bad))
  out = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract["bagel"], is_leaf=params_lib.is_spec)
  with hf_to_flax.SafetensorsReader(path) as reader:
    for key, e in table.items():
      value = keymap.to_flax(reader.read_all(key), e.transform)
      leaf = keymap.get_path(out, e.path)
      leaf[e.layer] = value
      dtype = value.dtype
  out = jax.tree.map(lambda x: x.astype(dtype), out)
  return lora, {"bagel": out}


def load_with_adapters(base_dir: str, adapter_dir: str, *, mesh=None, dtype=None, adapter_dtype=None,
                       rules=None) -> Tuple[BagelConfig, Any]:
  """(cfg with LoRA, {'bagel', 'ae'} params with the adapters attached): the base from a converted model
  directory (or an official checkpoint directory), the adapters from `adapter_dir`; every leaf on its schema
  sharding over `mesh` (None: the first local device). `dtype` casts the base (None: as stored; an official
  directory defaults to bf16), `adapter_dtype` the adapters (None: as stored)."""
  if os.path.exists(os.path.join(base_dir, checkpoint.CONFIG_FILE)):
    cfg, params = checkpoint.load_model_dir(base_dir, mesh=mesh, dtype=dtype, rules=rules)
  else:
    cfg, params = hf_to_flax.load_official(base_dir, dtype=dtype or "bf16", mesh=mesh, rules=rules)
  if cfg.llm.lora is not None:
    raise ValueError(f"{base_dir} already holds LoRA adapters; merge or drop them first")
  lora, adapters = read_adapters(adapter_dir, cfg)
  cfg = with_lora(cfg, lora)
  if adapter_dtype is not None:
    adapters = jax.tree.map(lambda x: x.astype(hf_to_flax.parse_dtype(adapter_dtype)), adapters)
  schema = lora_lib.adapter_schema(cfg)
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    placed = jax.tree.map(lambda x: jax.device_put(x, one), adapters)
  else:
    placed = jax.device_put(adapters, sharding.schema_shardings(schema, mesh, rules or sharding.DEFAULT_RULES))
  return cfg, lora_lib.attach_adapters(params, placed)
