"""Prompt sources of the shapes world for the pipeline (`prompts.*.source = "python"`):

    c.prompts.train = {"source": "python", "function": "srum_jax.worlds.shapes.sources:prompts",
                       "kwargs": {"split": "train", "per_category": 40}}
"""
from __future__ import annotations

from typing import Iterator, Optional

from srum_jax.worlds.shapes import grammar


def prompts(split: str = "train", seed: int = 0, per_category: Optional[int] = None) -> Iterator[dict]:
  """The split's prompts, categories interleaved round-robin (so a prefix is balanced), optionally
  `per_category` of each (None or 0: all); ids are stable (`<split>/<category>/<index in the split>`)."""
  train, val = grammar.split_prompts(seed)
  pool = {"train": train, "val": val}[split]
  by_cat = {}
  for p in pool:
    by_cat.setdefault(p.category, []).append(p)
  n = max(len(v) for v in by_cat.values())
  if per_category:
    n = min(n, int(per_category))
  for i in range(n):
    for cat in grammar.CATEGORIES:
      ps = by_cat.get(cat, [])
      if i < len(ps):
        yield {"id": f"{split}/{cat}/{i}", "prompt": ps[i].text, "category": cat}
