"""Shared plumbing of the pipeline stages: model loading, resumable JSONL logs, images, summaries.

Every stage writes one JSONL line per finished item (after the item's files are on disk), so a restarted
stage reads the ids already done and skips them: each item is done exactly once, whatever the crash point.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np


# ----------------------------------------------------------------------------------------------
# Model


def attn_impl(config, platform: Optional[str] = None) -> str:
  """The attention implementation every stage runs: `model.attn_impl` resolved for `platform` (default: JAX's
  backend; `models.attention.resolve_impl`: `auto` by platform, an explicit choice checked against it)."""
  from srum_jax.models import attention
  return attention.resolve_impl(str(config.model.attn_impl), platform)


def on_mesh(model, fn):
  """`fn` run with the model's mesh as the ambient mesh (`jax.set_mesh`), so the attention kernels run per shard
  of it (`models.attention`); `fn` itself without a mesh."""
  if model.mesh is None:
    return fn

  def run(*args, **kwargs):
    import jax
    with jax.set_mesh(model.mesh):
      return fn(*args, **kwargs)
  return run


@dataclasses.dataclass
class Model:
  """A loaded UMM: config, parameters {'bagel': ..., 'ae': ...}, tokenizer, where it came from, and the mesh
  its parameters are sharded over (None: one device). Inference stages split batch rows over that mesh's
  batch axes and let the parameters' shardings (fsdp / tensor, from the logical-axis rules) do the rest."""
  cfg: Any
  params: Any
  tokenizer: Any
  path: str
  mesh: Any = None
  rules: Any = None  # the logical-axis rules the parameters were placed by
  dtype: Optional[str] = None  # the parameters' dtype as loaded (None: as stored)


def check_model_dir(path: str) -> None:
  """Fail before any work starts when a model directory is missing or incomplete (a `UserError`)."""
  from srum_jax.errors import UserFileNotFoundError
  p = pathlib.Path(path)
  if not path or not p.is_dir():
    raise UserFileNotFoundError(f"model directory {path!r} does not exist (set --config.model.dir to the "
                                f"output of `python -m srum_jax convert`)")
  for need in ("model_config.json", "tokenizer.json", "params/_METADATA"):
    if not (p / need).is_file():
      raise UserFileNotFoundError(f"model directory {path} lacks {need} (convert or save the model again)")


def dir_identity(directory: pathlib.Path, small: int = 1 << 20) -> str:
  """A SHA-256 identifying a checkpoint directory's files without reading the weights: every file's name, size
  and modification time, the whole of small files (json, tokenizer) and each safetensors file's header (its
  tensor names, dtypes, shapes and offsets). A 29 GB checkpoint costs a few kilobytes of reads."""
  digest = hashlib.sha256()
  for f in sorted(p for p in directory.iterdir() if p.is_file()):
    st = f.stat()
    digest.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    with open(f, "rb") as fh:
      if st.st_size <= small:
        digest.update(fh.read())
      elif f.suffix == ".safetensors":
        n = int.from_bytes(fh.read(8), "little")
        digest.update(fh.read(min(n, 1 << 26)))
  return digest.hexdigest()


def resolve_model_dir(config) -> str:
  """The model directory the stages load: `config.model.dir`, or, when `config.model.official_dir` is set,
  that official checkpoint (safetensors + json, as `python -m srum_jax export` writes it or BAGEL ships it)
  converted by the converter into `<workdir>/converted_model` (redone only when the official files change:
  their `dir_identity` is stamped next to the result). The config is not changed."""
  import shutil

  official = config.model.official_dir
  if not official:
    return config.model.dir
  from srum_jax.convert import hf_to_flax
  src = pathlib.Path(official)
  if not src.is_dir():
    raise FileNotFoundError(f"model.official_dir {official!r} is not a directory")
  dst = pathlib.Path(config.workdir) / "converted_model"
  stamp = dst / "converted_from.json"
  want = {"official_dir": str(src.resolve()), "identity": dir_identity(src)}
  import jax

  from srum_jax.pipeline import multihost
  if jax.process_index() == 0 and not (stamp.is_file() and json.loads(stamp.read_text()) == want):
    if dst.exists():
      shutil.rmtree(dst)
    hf_to_flax.convert(str(src), str(dst), dtype=config.model.param_dtype)
    stamp.write_text(json.dumps(want, indent=2))
    print(f"[model] converted {src} -> {dst}", flush=True)
  multihost.barrier(f"resolve_model_dir:{dst}")  # the other processes wait for process 0's conversion
  return str(dst)


def load_model(path: str, *, dtype: Optional[str] = None, mesh=None, rules=None) -> Model:
  """A model directory's config, tokenizer and parameters, restored straight onto `mesh` (sharded by the
  logical-axis `rules`; None: one device) and cast to `dtype` (None: as stored)."""
  import jax.numpy as jnp

  from srum_jax.convert import checkpoint
  from srum_jax.tokenizer import load_tokenizer
  check_model_dir(path)
  cfg, params = checkpoint.load_model_dir(path, mesh=mesh, dtype=None if dtype is None else jnp.dtype(dtype),
                                          rules=rules)
  tok = load_tokenizer(path)
  tok.check(cfg.tokens)
  return Model(cfg=cfg, params=params, tokenizer=tok, path=path, mesh=mesh, rules=rules, dtype=dtype)


def inference_mesh(config):
  """The mesh inference runs on: this process's devices shaped by `config.inference_mesh` (each host
  generates and scores its own share of the items, so nothing waits on another host); a shape these devices
  cannot take is a `UserError` naming the key."""
  import jax

  from srum_jax import sharding
  from srum_jax.errors import UserValueError
  try:
    return sharding.make_mesh(dict(config.inference_mesh), jax.local_devices())
  except ValueError as e:  # e.g. the 7B recipe's tensor axis of 4 on a 1-device machine
    raise UserValueError(f"config key inference_mesh={dict(config.inference_mesh)}: {e} (this process has "
                         f"{jax.local_device_count()} devices)") from None


def load_inference_model(config, path: str) -> Model:
  """`load_model` onto `inference_mesh(config)` in `model.inference_dtype` (default `model.param_dtype`), by
  the config's sharding rules."""
  from srum_jax import sharding
  return load_model(path, dtype=config.model.inference_dtype or config.model.param_dtype,
                    mesh=inference_mesh(config), rules=sharding.rules_from_config(config.sharding_rules))


def batch_ways(model: Model) -> int:
  """How many ways batch rows split over the model's mesh (its 'data' x 'fsdp' axes; 1 without a mesh)."""
  if model.mesh is None:
    return 1
  return int(np.prod([model.mesh.shape[a] for a in ("data", "fsdp")]))


def batch_rows_mesh(model: Model, rows: int):
  """The model's mesh when `rows` split over its batch axes (they then run data-parallel), else None (rows
  replicated on every device; the parameters stay sharded)."""
  ways = batch_ways(model)
  return model.mesh if ways > 1 and rows % ways == 0 else None


def pad_rows(items: Sequence, multiple: int) -> List:
  """`items` with its last item repeated up to a multiple of `multiple` (the caller keeps the first len)."""
  items = list(items)
  return items + items[-1:] * (-len(items) % multiple) if items else items


def write_model_dir(path: str, cfg, params, source_dir: str) -> str:
  """`params` as a model directory (orbax + model_config.json) with the tokenizer and json files of the model
  dir it was trained from (`python -m srum_jax export` turns it into official safetensors). Every process
  takes part in the orbax save (its shards); process 0 copies the files."""
  import shutil

  import jax

  from srum_jax.convert import checkpoint
  from srum_jax.pipeline import multihost
  dst = pathlib.Path(path)
  if jax.process_index() == 0 and dst.exists():
    shutil.rmtree(dst)
  multihost.barrier(f"write_model_dir:{dst}:clean")
  checkpoint.save_model_dir(str(dst), cfg, params)
  if jax.process_index() == 0:
    for f in pathlib.Path(source_dir).iterdir():
      if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "llm_config", "vit_config", "vocab",
                                            "merges")):
        shutil.copy2(f, dst / f.name)
  multihost.barrier(f"write_model_dir:{dst}:done")
  return str(dst)


def save_model(path: str, model: Model, params) -> Model:
  """`write_model_dir`, then the written model loaded like `model` (same mesh, rules and dtype): trained
  parameters live on the training mesh, which spans every host, while inference runs on each host's own."""
  write_model_dir(path, model.cfg, params, model.path)
  return load_model(path, dtype=model.dtype, mesh=model.mesh, rules=model.rules)


# ----------------------------------------------------------------------------------------------
# Resumable logs


def stable_int(text: str, bits: int = 31) -> int:
  """A platform-independent integer from a string (per-item seeds)."""
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % (1 << bits)


class JsonlLog:
  """Append-only JSONL keyed by `id`: `done()` gives finished ids; `append` is flushed and fsynced."""

  def __init__(self, path: str):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)

  def rows(self) -> List[Dict[str, Any]]:
    """Well-formed rows; a torn last line (crash mid-write) or garbage line is ignored."""
    if not self.path.is_file():
      return []
    out = []
    with open(self.path, encoding="utf-8") as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(row, dict) and "id" in row:
          out.append(row)
    return out

  def done(self) -> set:
    return {r["id"] for r in self.rows()}

  def append(self, row: Dict[str, Any]) -> None:
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    if self.path.is_file() and self.path.stat().st_size:
      with open(self.path, "rb") as f:  # repair a torn last line before appending
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
          data = b"\n" + data
    with open(self.path, "ab") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())


def process_log(directory: str, stem: str) -> JsonlLog:
  """This process's resumable log `<stem>.jsonl` in `directory` (`<stem>.<process>.jsonl` when several
  processes share the directory: no two processes ever append to one file)."""
  import jax
  suffix = "" if jax.process_count() == 1 else f".{jax.process_index()}"
  return JsonlLog(str(pathlib.Path(directory) / f"{stem}{suffix}.jsonl"))


def read_rows(directory: str, stem: str) -> List[Dict[str, Any]]:
  """The rows of every process's `<stem>*.jsonl` log in `directory` (merged files included), one per id (the
  first seen, files in name order), in the prompt set's order (`seq`, when every row has one) whatever the
  number of processes that wrote them."""
  rows, seen = [], set()
  for p in sorted(pathlib.Path(directory).glob(f"{stem}*.jsonl")):
    if p.name != f"{stem}.jsonl" and not p.name[len(stem) + 1:-len(".jsonl")].isdigit():
      continue
    for r in JsonlLog(str(p)).rows():
      if r["id"] not in seen:
        seen.add(r["id"])
        rows.append(r)
  if rows and all(isinstance(r.get("seq"), int) for r in rows):
    rows.sort(key=lambda r: r["seq"])
  return rows


def merge_process_logs(directory: str, stem: str) -> None:
  """After every process finished its share: process 0 writes `<stem>.jsonl` holding every process's rows
  (one per id); a no-op with one process, whose log is that file already."""
  import jax

  from srum_jax.pipeline import multihost
  multihost.barrier(f"merge:{directory}:{stem}:ready")
  if jax.process_count() > 1 and jax.process_index() == 0:
    rows = read_rows(directory, stem)
    path = pathlib.Path(directory) / f"{stem}.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
  multihost.barrier(f"merge:{directory}:{stem}:done")


def save_png(path: str, image: np.ndarray) -> None:
  """Atomic PNG write (tmp + rename): a crash never leaves a half-written image under the final name."""
  from PIL import Image
  p = pathlib.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.with_name(p.name + ".tmp")
  Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG")
  os.replace(tmp, p)


def load_rgb(path: str) -> Tuple[Optional[np.ndarray], Optional[str]]:
  """(uint8 HWC image, None) or (None, reason) for a missing or corrupt file."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB")), None
  except FileNotFoundError:
    return None, "missing"
  except Exception as e:  # corrupt / truncated / not an image
    return None, f"corrupt ({type(e).__name__})"


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
  for i in range(0, len(items), size):
    yield items[i:i + size]


def progress(total: int, desc: str):
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True, leave=False)


def process_shard(items: Sequence) -> Sequence:
  """This host's share of the items (round robin by jax process index)."""
  import jax
  return items[jax.process_index()::jax.process_count()]


def write_json(path: str, obj: Any) -> None:
  p = pathlib.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.with_name(p.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float))
  os.replace(tmp, p)


def summary_line(stage: str, **counts) -> str:
  parts = ", ".join(f"{k}={v}" for k, v in counts.items())
  line = f"[{stage}] {parts}"
  print(line, flush=True)
  return line
