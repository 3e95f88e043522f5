"""Prompt sources of the shapes world for the pipeline (`prompts.*.source = "python"`):

    c.prompts.train = {"source": "python", "function": "srum_jax.worlds.shapes.sources:prompts",
                       "kwargs": {"split": "train", "per_category": 40}}

Splits: "train" and "val" (`grammar.split_prompts`: held-out combinations of the grammar's
categories), "gen" (`generalisation.gen_prompts`: forms no grammar category holds; an eval set,
never a train set) and "anchor" (`anchors.recombined_prompts`: the train prompts' parts recombined,
every train, val and gen text excluded; the conditions of the anchor term, `srum.anchor_weight`).
"""
from __future__ import annotations

from typing import Iterator, Optional

from srum_jax.worlds.shapes import anchors, generalisation, grammar

SPLITS = ("train", "val", "gen", "anchor")


def _pool(split: str, seed: int):
  """(prompts, category order) of a split."""
  if split == "gen":
    return generalisation.gen_prompts(seed), generalisation.GEN_CATEGORIES
  if split == "anchor":
    return anchors.recombined_prompts(split_seed=seed), (anchors.ANCHOR_CATEGORY,)
  if split not in ("train", "val"):
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  train, val = grammar.split_prompts(seed)
  return {"train": train, "val": val}[split], grammar.CATEGORIES


def prompts(split: str = "train", seed: int = 0,
            per_category: Optional[int] = None) -> Iterator[dict]:
  """The split's prompts, categories interleaved round-robin (so a prefix is balanced), optionally
  `per_category` of each (None or 0: all); ids are stable (`<split>/<category>/<index in the
  split>`)."""
  pool, categories = _pool(split, seed)
  by_cat = {}
  for p in pool:
    by_cat.setdefault(p.category, []).append(p)
  n = max(len(v) for v in by_cat.values())
  if per_category:
    n = min(n, int(per_category))
  for i in range(n):
    for cat in categories:
      ps = by_cat.get(cat, [])
      if i < len(ps):
        yield {"id": f"{split}/{cat}/{i}", "prompt": ps[i].text, "category": cat}
