"""Images made elsewhere (the official PyTorch model, another repository) matched to a prompt set,
so the same scorers read them. `collect(images_dir, items)` -> rows {id, prompt_id, prompt,
category, image_file}:

* a folder written by this repository's `generate` stage (metadata*.jsonl): its rows, as they are;
* GenEval's layout: `<prompt id>/samples/<k>.png` (a numbered folder per prompt);
* a flat folder (images also under `samples/`), each file named after its prompt's id (`<id>.png`,
  `<id>#<k>.png`, `<id>_<k>.png`; an id's characters outside [A-Za-z0-9] may be any such character;
  or the `generate` stage's own names, `layout.image_file_name`, without their metadata) or, as
  T2I-CompBench names samples, after its prompt text (`<prompt>_<k>.png`).

Files that match no prompt and prompts without an image are counted in the report, not guessed.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Dict, List, Sequence, Tuple

from srum_jax.workdir import layout

__all__ = ["CollectReport", "collect", "match_key"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass
class CollectReport:
  layout: str = ""
  files: int = 0
  matched: int = 0
  unmatched_files: List[str] = dataclasses.field(default_factory=list)
  prompts_without_image: int = 0


def match_key(text: str) -> str:
  """The comparison form of an id or file stem: runs of characters outside [A-Za-z0-9] become one
  '_'."""
  return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _row(item, image_id: str, path: pathlib.Path) -> dict:
  return {"id": image_id, "prompt_id": item.id, "prompt": item.prompt, "category": item.category,
          "image_file": str(path)}


def _geneval_layout(root: pathlib.Path, items) -> Tuple[List[dict], CollectReport]:
  rep = CollectReport(layout="geneval")
  by_id = {match_key(it.id): it for it in items}
  rows = []
  for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
    for f in sorted((folder / "samples").glob("*")):
      if f.suffix.lower() not in IMAGE_SUFFIXES:
        continue
      rep.files += 1
      it = by_id.get(match_key(folder.name))
      if it is None:
        rep.unmatched_files.append(str(f.relative_to(root)))
        continue
      rows.append(_row(it, f"{it.id}#{f.stem}", f))
  return rows, rep


def _match_stem(stem: str, by_id: Dict[str, object], by_prompt: Dict[str, object]):
  """(item, sample suffix or None) for a file stem, or (None, None)."""
  key = match_key(stem)
  if key in by_id:
    return by_id[key], None
  head, _, tail = stem.rpartition("#") if "#" in stem else stem.rpartition("_")
  if head and tail.isdigit():
    if match_key(head) in by_id:
      return by_id[match_key(head)], tail
    if head.strip().lower() in by_prompt:
      return by_prompt[head.strip().lower()], tail
  return None, None


def _match_own_name(name: str, by_key: Dict[str, list]):
  """(item, sample suffix or None) for a file named by this repository's generate stage
  (`layout.image_file_name`: a prefix of the image id, '-', a hash of the whole id), checked against
  the hash (ids that differ only in replaced characters share a prefix; the hash tells them apart).
  """
  m = re.fullmatch(r"(.+)-[0-9a-f]{16}(\.[A-Za-z]+)", name)
  if m is None:
    return None, None
  head, suffix = m.group(1), m.group(2)
  base, _, tail = head.rpartition("_")
  tries = [(head, None)] + ([(base, tail)] if base and tail.isdigit() else [])
  for stem, sample in tries:
    for it in by_key.get(match_key(stem), []):
      if layout.image_file_name(it.id if sample is None else f"{it.id}#{sample}", suffix) == name:
        return it, sample
  return None, None


def _flat_layout(root: pathlib.Path, items) -> Tuple[List[dict], CollectReport]:
  rep = CollectReport(layout="flat")
  folder = root / "samples" if (root / "samples").is_dir() else root
  by_id = {match_key(it.id): it for it in items}
  by_key: Dict[str, list] = {}
  by_prompt = {}
  for it in items:
    by_prompt.setdefault(it.prompt.strip().lower(), it)
    by_key.setdefault(match_key(it.id), []).append(it)
  rows = []
  for f in sorted(folder.iterdir()):
    if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
      continue
    rep.files += 1
    it, sample = _match_own_name(f.name, by_key)
    if it is None:
      it, sample = _match_stem(f.stem, by_id, by_prompt)
    if it is None:
      rep.unmatched_files.append(f.name)
      continue
    rows.append(_row(it, it.id if sample is None else f"{it.id}#{sample}", f))
  return rows, rep


def collect(images_dir: str, items: Sequence) -> Tuple[List[dict], CollectReport]:
  """Rows of the images in `images_dir` that belong to `items` (module docstring), and what did
  not match."""
  root = pathlib.Path(images_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"eval.images_dir {images_dir!r} is not a directory")
  if list(root.glob("metadata*.jsonl")):
    wanted = {it.id for it in items}
    every = [
        dict(r, image_file=str(root / r["image_file"])) for r in layout.read_metadata(str(root))
    ]
    rows = [r for r in every if r.get("prompt_id", r["id"]) in wanted]
    rep = CollectReport(
        layout="srum_jax", files=len(every), unmatched_files=[
            r["image_file"] for r in every if r.get("prompt_id", r["id"]) not in wanted
        ])
  elif any(p.is_dir() and p.name.isdigit() and (p / "samples").is_dir() for p in root.iterdir()):
    rows, rep = _geneval_layout(root, items)
  else:
    rows, rep = _flat_layout(root, items)
  rep.matched = len(rows)
  have = {r.get("prompt_id", r["id"]) for r in rows}
  rep.prompts_without_image = sum(it.id not in have for it in items)
  return rows, rep
