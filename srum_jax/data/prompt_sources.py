"""Prompt sources for data generation: one config -> a list of `PromptItem`s plus a load report.

  items = load_prompts({"source": "file", "path": "SRUM/train_comp.json"})
  items = load_prompts({"source": "tfds", "split": "val", "data_dir": "~/tfds", "local_dir": ".../dataset"})
  items = load_prompts({"source": "python", "function": "my_pkg.prompts:make", "kwargs": {"n": 10}})
  items.report.summary()   # 'SRUM/train_comp.json: 6234 loaded of 6234; 0 empty, 0 malformed, ...'

The result is a `PromptList` (a plain list of `PromptItem`) with the `LoadReport` attached as `.report`.

Config keys (`prompt_source` declares them all with their defaults; a dict or ConfigDict may give any subset,
an unknown key is an error; a bare path string means {"source": "file", "path": it}):
  source      "file" | "tfds" | "python" ("": inferred: `path` -> file, `function` -> python, else tfds)
  file:       path; format "txt" | "json" | "jsonl" (default: from the extension); category (see below)
  tfds:       name (default "t2i_compbench"), config (builder config, e.g. "original" / "plus"), split
              ("train" | "val"), data_dir (tfds default when absent), prepare (default True: build the
              dataset if it is not there yet), local_dir / manual_dir (build from local prompt files instead
              of downloading; see `srum_jax.data.t2i_compbench`). Read back with `tfds.data_source` (array_record
              random access; no tensorflow).
  python:     function "module.path:function" returning an iterable of PromptItem, dicts or strings; kwargs
  categories  optional list: keep only these categories;  limit: optional int, keep the first `limit` items

Formats. TXT: one prompt per line. JSON: a list of objects {Question|prompt, Category|category,
Question_id|id} (the SRUM files' format) or a list of strings. JSONL: one such object (or JSON string) per line.
Category: a TXT file's is the `category` key, else its file name without extension and a trailing
_train/_val/_test; for objects without a category field the same default applies (python sources:
`category` or "uncategorized").

Rules, all counted in the report with their positions (1-based line for TXT/JSONL, 1-based entry index for
JSON lists, python iterables and tfds rows):
  * empty / whitespace-only prompts (blank lines included) are skipped (`empty`);
  * unparsable JSONL lines, entries that are neither objects nor strings, objects without a string prompt,
    and ids that are not strings or integers are skipped (`malformed`, with the reason);
  * ids come from the id field (as a string) or are a stable hash of (source name, position, prompt); a
    repeated id keeps its first item, later ones are skipped (`duplicate_ids`);
  * repeated prompt texts with distinct ids are kept but listed (`duplicate_prompts`).
Prompts are whitespace-stripped. Whole-file problems (missing file, not UTF-8, invalid JSON document, JSON
that is not a list) raise a `UserError` naming the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
from typing import Any, Iterable, Mapping, Optional

import ml_collections
import tensorflow_datasets as tfds

from srum_jax.data import t2i_compbench  # noqa: F401  (registers the tfds builder)
from srum_jax.errors import UserError, UserFileNotFoundError, UserValueError

__all__ = ["PromptItem", "LoadReport", "PromptList", "load_prompts", "prompt_id", "category_from_path",
           "PROMPT_SOURCE_DEFAULTS", "PROMPT_SOURCES", "PROMPT_FORMATS", "prompt_source",
           "require_prompts", "normalise"]

log = logging.getLogger(__name__)

_PROMPT_KEYS = ("Question", "prompt")
_CATEGORY_KEYS = ("Category", "category")
_ID_KEYS = ("Question_id", "id")
_FORMATS = {".txt": "txt", ".json": "json", ".jsonl": "jsonl"}
PROMPT_SOURCES = ("file", "tfds", "python")  # `source`; "" picks one from the keys that are set
PROMPT_FORMATS = ("",) + tuple(_FORMATS.values())  # `format`; "": from the file's extension

# Every key a prompt source may set, with its default ("" / None: not set).
PROMPT_SOURCE_DEFAULTS = dict(source="", path="", format="", category="", function="", kwargs={},
                              name="t2i_compbench", config="", split="train", data_dir="", prepare=True,
                              local_dir="", manual_dir="", categories=(), limit=None)


def prompt_source(**values):
  """A prompt-source config block with every key declared (an ml_collections ConfigDict)."""
  unknown = set(values) - set(PROMPT_SOURCE_DEFAULTS)
  if unknown:
    raise KeyError(f"unknown prompt source keys {sorted(unknown)}; known: {sorted(PROMPT_SOURCE_DEFAULTS)}")
  block = ml_collections.ConfigDict({**PROMPT_SOURCE_DEFAULTS, **values})
  if block.limit is None:  # a typed empty value: `--config.<block>.limit=10` can set it
    block.limit = ml_collections.config_dict.placeholder(int)
  return block


def _type_problem(name: str, value: Any) -> Optional[str]:
  """Why a prompt source key's value cannot work ('' / None: it can), by the type of its default."""
  default = PROMPT_SOURCE_DEFAULTS[name]
  if name == "limit":
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
    return None if ok else "must be an integer (or None)"
  if name == "kwargs":
    ok = isinstance(value, Mapping) or hasattr(value, "to_dict")
    return None if ok else "must be a dict of arguments"
  if name == "categories":
    ok = isinstance(value, (list, tuple)) and all(isinstance(c, str) for c in value)
    return None if ok else "must be a list of category names"
  if isinstance(default, bool):
    return None if isinstance(value, bool) else "must be True or False"
  return None if isinstance(value, (str, os.PathLike)) else "must be a string"


def normalise(source_cfg, key: str = "prompt source") -> dict:
  """Any accepted form of a source config -> a dict with every key of PROMPT_SOURCE_DEFAULTS: a dict
  or ConfigDict giving any subset of the keys (the others take their defaults), or a bare path
  string (a file source). An unknown key, a value of the wrong type or anything else is a
  `UserValueError` naming `key`."""
  if isinstance(source_cfg, (str, os.PathLike)):
    given = {"source": "file", "path": os.fspath(source_cfg)}
  elif isinstance(source_cfg, Mapping) or hasattr(source_cfg, "to_dict"):
    given = dict(source_cfg.to_dict() if hasattr(source_cfg, "to_dict") else source_cfg)
  else:
    raise UserValueError(f"config key {key}: a prompt source is a block of keys "
                         f"({', '.join(PROMPT_SOURCE_DEFAULTS)}) or a file path, not "
                         f"{type(source_cfg).__name__} {source_cfg!r}")
  unknown = sorted(str(k) for k in set(given) - set(PROMPT_SOURCE_DEFAULTS))
  if unknown:
    raise UserValueError(f"config key {key}: unknown prompt source keys {unknown}; known: "
                         f"{sorted(PROMPT_SOURCE_DEFAULTS)}")
  for name, value in given.items():
    why = _type_problem(name, value)
    if why:
      raise UserValueError(f"config key {key}.{name}={value!r}: {why}")
  cfg = {**PROMPT_SOURCE_DEFAULTS, **given}
  cfg.update({k: os.fspath(v) for k, v in cfg.items() if isinstance(v, os.PathLike)})
  if not cfg["source"]:
    cfg["source"] = "file" if cfg["path"] else "python" if cfg["function"] else "tfds"
  return cfg


@dataclasses.dataclass(frozen=True)
class PromptItem:
  id: str
  prompt: str
  category: str

  def to_dict(self) -> dict:
    return {"id": self.id, "prompt": self.prompt, "category": self.category}


@dataclasses.dataclass
class LoadReport:
  """What loading did: positions of skipped entries, duplicates, counts. `seen` counts every line / entry."""
  source: str
  seen: int = 0
  loaded: int = 0
  empty: list = dataclasses.field(default_factory=list)  # positions
  malformed: list = dataclasses.field(default_factory=list)  # (position, reason)
  duplicate_ids: list = dataclasses.field(default_factory=list)  # (position, id), skipped
  duplicate_prompts: list = dataclasses.field(default_factory=list)  # (position, id), kept
  filtered: int = 0  # dropped by `categories` / `limit`

  def summary(self) -> str:
    return (f"{self.source}: {self.loaded} loaded of {self.seen}; {len(self.empty)} empty, "
            f"{len(self.malformed)} malformed, {len(self.duplicate_ids)} duplicate ids skipped, "
            f"{len(self.duplicate_prompts)} duplicate prompts kept, {self.filtered} filtered out")


class PromptList(list):
  """A list of PromptItem with the `LoadReport` of how it was loaded."""

  def __init__(self, items: Iterable[PromptItem] = (), report: Optional[LoadReport] = None):
    super().__init__(items)
    self.report = report


def prompt_id(source_name: str, position: int, prompt: str) -> str:
  """Stable id for an entry without one: 16 hex digits of sha1(source name, position, prompt)."""
  digest = hashlib.sha1(f"{source_name}\x00{position}\x00{prompt}".encode("utf-8")).hexdigest()
  return digest[:16]


def category_from_path(path: str) -> str:
  """'dir/color_train.txt' -> 'color': the file name without extension and a trailing _train/_val/_test."""
  stem = os.path.splitext(os.path.basename(path))[0]
  return re.sub(r"_(train|val|test)$", "", stem)


class _Collector:
  """Accumulates items with the module's rules (empty, ids, duplicates) into a LoadReport."""

  def __init__(self, source_name: str, default_category: str):
    self.report = LoadReport(source=source_name)
    self.default_category = default_category
    self.items: list[PromptItem] = []
    self._ids: set[str] = set()
    self._prompts: set[str] = set()

  def malformed(self, position: int, reason: str):
    self.report.seen += 1
    self.report.malformed.append((position, reason))

  def add(self, position: int, prompt: Any, category: Any = None, item_id: Any = None):
    self.report.seen += 1
    if not isinstance(prompt, str):
      self.report.malformed.append((position, f"prompt is {type(prompt).__name__}, not a string"))
      return
    prompt = prompt.strip()
    if not prompt:
      self.report.empty.append(position)
      return
    if isinstance(item_id, bool) or not (item_id is None or isinstance(item_id, (str, int))):
      self.report.malformed.append((position, f"id is {type(item_id).__name__}, not a string or integer"))
      return
    if category is not None and not isinstance(category, str):
      self.report.malformed.append((position, f"category is {type(category).__name__}, not a string"))
      return
    item_id = None if item_id is None else str(item_id).strip()
    if not item_id:
      item_id = prompt_id(self.report.source, position, prompt)
    if item_id in self._ids:
      self.report.duplicate_ids.append((position, item_id))
      return
    if prompt in self._prompts:
      self.report.duplicate_prompts.append((position, item_id))
    category = (category or "").strip() or self.default_category
    self._ids.add(item_id)
    self._prompts.add(prompt)
    self.items.append(PromptItem(id=item_id, prompt=prompt, category=category))

  def add_entry(self, position: int, entry: Any):
    """A JSON-like entry: a mapping with prompt / category / id fields, a string, or a PromptItem."""
    if isinstance(entry, PromptItem):
      self.add(position, entry.prompt, entry.category, entry.id)
    elif isinstance(entry, str):
      self.add(position, entry)
    elif isinstance(entry, Mapping):
      prompt = _first(entry, _PROMPT_KEYS)
      if prompt is None:
        self.malformed(position, f"no prompt field ({' / '.join(_PROMPT_KEYS)})")
        return
      self.add(position, prompt, _first(entry, _CATEGORY_KEYS), _first(entry, _ID_KEYS))
    else:
      self.malformed(position, f"entry is {type(entry).__name__}, not an object or string")


def _first(entry: Mapping, keys) -> Any:
  for key in keys:
    if key in entry:
      return entry[key]
  return None


def _load_file(cfg: dict) -> _Collector:
  path = os.path.expanduser(os.fspath(cfg["path"]))
  fmt = cfg["format"] or _FORMATS.get(os.path.splitext(path)[1].lower())
  if fmt not in ("txt", "json", "jsonl"):
    raise UserValueError(f"{path}: unknown prompt file format {fmt!r}; set format to txt, json or jsonl")
  if not os.path.isfile(path):
    raise UserFileNotFoundError(f"prompt file not found: {path}")
  col = _Collector(os.path.basename(path), cfg["category"] or category_from_path(path))
  try:
    with open(path, encoding="utf-8-sig") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise UserValueError(f"prompt file {path}: not UTF-8 text (invalid byte at offset {e.start}); save it as "
                         f"UTF-8") from None
  if fmt == "txt":
    for lineno, line in enumerate(text.splitlines(), start=1):
      col.add(lineno, line, col.default_category)
  elif fmt == "jsonl":
    for lineno, line in enumerate(text.splitlines(), start=1):
      if not line.strip():
        col.add(lineno, "")
        continue
      try:
        entry = json.loads(line)
      except json.JSONDecodeError as e:
        col.malformed(lineno, f"invalid JSON: {e.msg}")
        continue
      except (ValueError, RecursionError) as e:  # an integer beyond Python's digit limit; nesting too deep
        col.malformed(lineno, f"invalid JSON: {type(e).__name__}")
        continue
      col.add_entry(lineno, entry)
  else:
    try:
      entries = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, digit limit, nesting too deep
      raise UserValueError(f"prompt file {path}: invalid JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(entries, list):
      raise UserValueError(f"{path}: expected a JSON list of prompts, got {type(entries).__name__}")
    for index, entry in enumerate(entries, start=1):
      col.add_entry(index, entry)
  return col


def _load_python(cfg: dict) -> _Collector:
  """The entries of `function(**kwargs)`; a function that cannot be found or that raises (a bad
  argument) is a `UserValueError` naming it and its arguments (user code: any exception)."""
  spec = cfg["function"]
  module_name, sep, fn_name = spec.partition(":")
  if not sep or not module_name or not fn_name:
    raise UserValueError(f"python prompt source must be 'module.path:function', got {spec!r}")
  given = cfg["kwargs"]
  kwargs = dict(given.to_dict() if hasattr(given, "to_dict") else given or {})
  col = _Collector(spec, cfg["category"] or "uncategorized")
  try:
    fn = getattr(importlib.import_module(module_name), fn_name)
    for index, entry in enumerate(fn(**kwargs), start=1):
      col.add_entry(index, entry)
  except Exception as e:
    text = " ".join(str(e).split())
    raise UserValueError(f"python prompt source {spec}(**{kwargs}) failed: {type(e).__name__}: "
                         f"{text}") from None
  return col


def _decode(value: Any) -> Any:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def _load_tfds(cfg: dict) -> _Collector:


  name, config, split = cfg["name"] or "t2i_compbench", cfg["config"], cfg["split"] or "train"
  full_name = f"{name}/{config}" if config else name
  builder_kwargs = {}
  if cfg["local_dir"]:
    builder_kwargs["local_dir"] = cfg["local_dir"]
  prepare_kwargs = {}
  if cfg["manual_dir"]:
    prepare_kwargs["download_config"] = tfds.download.DownloadConfig(manual_dir=cfg["manual_dir"])
  data_dir = os.path.expanduser(cfg["data_dir"]) if cfg["data_dir"] else None
  source = tfds.data_source(full_name, split=split, data_dir=data_dir, download=bool(cfg["prepare"]),
                            builder_kwargs=builder_kwargs or None, download_and_prepare_kwargs=prepare_kwargs or None)
  col = _Collector(f"tfds:{full_name}[{split}]", cfg["category"] or "uncategorized")
  for index in range(len(source)):
    row = {k: _decode(v) for k, v in source[index].items()}
    col.add_entry(index + 1, row)
  return col


def load_prompts(source_cfg, key: str = "prompt source") -> PromptList:
  """Prompts from a file, the tfds builder or a Python function (module docstring), with `.report`;
  `key`: the config key named by errors."""
  cfg = normalise(source_cfg, key)
  source = cfg["source"]
  loaders = dict(zip(PROMPT_SOURCES, (_load_file, _load_tfds, _load_python)))
  if source not in loaders:
    raise UserValueError(f"unknown prompt source {source!r}; expected one of {sorted(loaders)}")
  try:
    col = loaders[source](cfg)
  except UserError as e:
    if key == "prompt source":
      raise
    raise type(e)(f"config key {key}: {e}") from None
  items, report = col.items, col.report
  categories = cfg["categories"]
  if categories:
    wanted = set(categories)
    kept = [it for it in items if it.category in wanted]
    report.filtered += len(items) - len(kept)
    items = kept
  limit = cfg["limit"]
  if limit is not None and len(items) > int(limit):
    report.filtered += len(items) - int(limit)
    items = items[:int(limit)]
  report.loaded = len(items)
  if report.empty or report.malformed or report.duplicate_ids:
    log.warning("%s", report.summary())
  return PromptList(items, report)


def require_prompts(items, key: str) -> None:
  """A stage with no prompt to work on is a user error, not a silent success."""
  if not len(items):
    summary = items.report.summary() if getattr(items, "report", None) is not None else "0 loaded"
    raise UserValueError(f"config key {key}: no prompts to use ({summary})")
