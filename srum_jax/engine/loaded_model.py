"""A loaded UMM: config, parameters on their mesh, tokenizer; where it comes from and how inference
places it.

    model = load_inference_model(config, resolve_model_dir(config))   # on `inference_mesh(config)`
    # split rows over the batch axes, or not
    rows_mesh = batch_rows_mesh(model, rows)

`resolve_model_dir` turns an official checkpoint (`model.official_dir`) into a converted model dir
once (its files' identity is stamped beside the result, so a changed checkpoint converts again).
`identity_of` names a model without loading it (the stages' outputs record it:
`workdir.fingerprints`).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from srum_jax import distributed, files, paths, sharding
from srum_jax.convert import checkpoint, hf_to_flax
from srum_jax.errors import UserFileNotFoundError, UserValueError
from srum_jax.models import attention
from srum_jax.tokenizer import load_tokenizer
from srum_jax.workdir import fingerprints
from srum_jax.workdir.fingerprints import dir_identity


def attn_impl(config, platform: Optional[str] = None) -> str:
  """The attention implementation every stage runs: `model.attn_impl` resolved for `platform`
  (default: JAX's backend; `models.attention.resolve_impl`: `auto` by platform, an explicit choice
  checked against it)."""
  return attention.resolve_impl(str(config.model.attn_impl), platform)


def on_mesh(model, fn):
  """`fn` run with the model's mesh as the ambient mesh (`jax.set_mesh`), so the attention kernels
  run per shard of it (`models.attention`); `fn` itself without a mesh."""
  if model.mesh is None:
    return fn

  def run(*args, **kwargs):
    with jax.set_mesh(model.mesh):
      return fn(*args, **kwargs)
  return run


@dataclasses.dataclass
class Model:
  """A loaded UMM: config, parameters {'bagel': ..., 'ae': ...}, tokenizer, where it came from, and
  the mesh its parameters are sharded over (None: one device). Inference stages split batch rows
  over that mesh's batch axes and let the parameters' shardings (fsdp / tensor, from the
  logical-axis rules) do the rest."""
  cfg: Any
  params: Any
  tokenizer: Any
  path: str
  mesh: Any = None
  rules: Any = None  # the logical-axis rules the parameters were placed by
  dtype: Optional[str] = None  # the parameters' dtype as loaded (None: as stored)


def check_model_dir(path: str) -> None:
  """Fail before any work starts when a model directory is missing or incomplete (a `UserError`)."""
  p = paths.path(path or ".")
  if not path or not p.is_dir():
    raise UserFileNotFoundError(
        f"model directory {path!r} does not exist (set --config.model.dir to the "
        f"output of `python -m srum_jax convert`)")
  for need in ("model_config.json", "tokenizer.json", "params/_METADATA"):
    if not (p / need).is_file():
      raise UserFileNotFoundError(
          f"model directory {path} lacks {need} (convert or save the model again)")


IDENTITY_FILE = "identity.json"  # a model dir made here (conversion, training): what made it


def official_identity(official_dir: str, param_dtype: str) -> str:
  """The identity of the model an official checkpoint converts into: its files' `dir_identity` and
  the parameter dtype of the conversion (known before converting)."""
  return fingerprints.digest({"official": dir_identity(official_dir),
                              "param_dtype": str(param_dtype)})


def model_identity(model_dir: str) -> str:
  """The identity of a converted model dir: the one recorded in it by what made it (`IDENTITY_FILE`:
  a conversion's `official_identity`, a training's fingerprint, stable when the same training
  rewrites it), else its files' recursive `dir_identity` (names, sizes, modification times: a model
  written again is another model)."""
  rec = files.read_json_if_present(paths.join(model_dir, IDENTITY_FILE), "model identity")
  if isinstance(rec, dict) and isinstance(rec.get("identity"), str):
    return rec["identity"]
  return dir_identity(model_dir, recursive=True)


def is_official_dir(path: str) -> bool:
  """Whether `path` is an official checkpoint (safetensors + json), not a converted model dir."""
  p = paths.path(path)
  return p.is_dir() and not (p / "model_config.json").is_file() and any(p.glob("*.safetensors"))


def identity_of(config, path: str = "") -> str:
  """The identity of the model `path` names (default: the config's own, `model.official_dir` else
  `model.dir`) without loading or converting it."""
  official = not path and bool(config.model.official_dir) or bool(path) and is_official_dir(path)
  path = path or config.model.official_dir or config.model.dir
  return official_identity(path, config.model.param_dtype) if official else model_identity(path)


def write_identity(model_dir: str, identity: str) -> None:
  """Record `identity` in a model dir this code made (process 0)."""
  if jax.process_index() == 0:
    files.write_json(paths.join(model_dir, IDENTITY_FILE), {"identity": identity})


def resolve_model_dir(config) -> str:
  """The model directory the stages load: `config.model.dir`, or, when `config.model.official_dir`
  is set, that official checkpoint (safetensors + json, as `python -m srum_jax export` writes it or
  BAGEL ships it) converted by the converter into `<workdir>/converted_model` (redone only when the
  official files change: their `dir_identity` is stamped next to the result). The config is not
  changed. Either may be remote (`gs://`): a remote official dir is copied into the local cache
  first (the converter memory-maps safetensors)."""
  official = config.model.official_dir
  if not official:
    return config.model.dir
  src = paths.path(official)
  if not src.is_dir():
    raise FileNotFoundError(f"model.official_dir {official!r} is not a directory")
  dst = paths.path(paths.join(config.workdir, "converted_model"))
  stamp = dst / "converted_from.json"
  want = {
      "official_dir": official if paths.is_remote(official) else str(
          pathlib.Path(official).resolve()),
      "identity": dir_identity(official),
      "param_dtype": str(config.model.param_dtype)
  }
  try:
    stamped = files.read_json_if_present(str(stamp), "conversion stamp")
  except UserValueError:  # a damaged stamp: convert again
    stamped = None
  if jax.process_index() == 0 and stamped != want:
    if dst.exists():
      paths.rmtree(dst)
    hf_to_flax.convert(paths.local_copy_dir(official), str(dst), dtype=config.model.param_dtype)
    write_identity(str(dst), official_identity(official, config.model.param_dtype))
    files.write_json(stamp, want)
    print(f"[model] converted {src} -> {dst}", flush=True)
  # the other processes wait for process 0's conversion
  distributed.barrier(f"resolve_model_dir:{dst}")
  return str(dst)


def load_model(path: str, *, dtype: Optional[str] = None, mesh=None, rules=None) -> Model:
  """A model directory's config, tokenizer and parameters, restored straight onto `mesh` (sharded by
  the logical-axis `rules`; None: one device) and cast to `dtype` (None: as stored)."""
  check_model_dir(path)
  cfg, params = checkpoint.load_model_dir(
      path, mesh=mesh, dtype=None if dtype is None else jnp.dtype(dtype), rules=rules)
  tok = load_tokenizer(path)
  tok.check(cfg.tokens)
  return Model(cfg=cfg, params=params, tokenizer=tok, path=path, mesh=mesh, rules=rules,
               dtype=dtype)


def inference_mesh(config):
  """The mesh inference runs on: this process's devices shaped by `config.inference_mesh` (each host
  generates and scores its own share of the items, so nothing waits on another host); a shape these
  devices cannot take is a `UserError` naming the key."""
  try:
    return sharding.make_mesh(dict(config.inference_mesh), jax.local_devices())
  except ValueError as e:  # e.g. the 7B recipe's tensor axis of 4 on a 1-device machine
    raise UserValueError(
        f"config key inference_mesh={dict(config.inference_mesh)}: {e} (this process has "
        f"{jax.local_device_count()} devices)") from None


def load_inference_model(config, path: str) -> Model:
  """`load_model` onto `inference_mesh(config)` in `model.inference_dtype` (default
  `model.param_dtype`), by the config's sharding rules."""
  return load_model(path, dtype=config.model.inference_dtype or config.model.param_dtype,
                    mesh=inference_mesh(config), rules=sharding.rules_from_config(
                        config.sharding_rules))


def batch_ways(model: Model) -> int:
  """How many ways batch rows split over the model's mesh (its 'data' x 'fsdp' axes; 1 without a
  mesh)."""
  if model.mesh is None:
    return 1
  return int(np.prod([model.mesh.shape[a] for a in ("data", "fsdp")]))


def batch_rows_mesh(model: Model, rows: int):
  """The model's mesh when `rows` split over its batch axes (they then run data-parallel), else None
  (rows replicated on every device; the parameters stay sharded)."""
  ways = batch_ways(model)
  return model.mesh if ways > 1 and rows % ways == 0 else None


def pad_rows(items: Sequence, multiple: int) -> List:
  """`items` with its last item repeated up to a multiple of `multiple` (the caller keeps the
  first len)."""
  items = list(items)
  return items + items[-1:] * (-len(items) % multiple) if items else items


def save_model(path: str, model: Model, params, cfg=None, identity: Optional[str] = None) -> Model:
  """The model trained from `model`: `params` of `cfg` (default `model.cfg`; a LoRA training's has
  adapters), written by `checkpoint.write_trained_dir` (LoRA: an adapters-only dir over `model`'s
  base) with `identity` recorded (what made it, e.g. the training's fingerprint), then loaded like
  `model` (same mesh, rules and dtype): trained parameters live on the training mesh, which spans
  every host, while inference runs on each host's own."""
  checkpoint.write_trained_dir(path, model.cfg if cfg is None else cfg, params, model.path)
  if identity is not None:
    write_identity(path, identity)
    distributed.barrier(f"save_model:{path}")
  return load_model(path, dtype=model.dtype, mesh=model.mesh, rules=model.rules)
