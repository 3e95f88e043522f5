"""Anchor prompts of the shapes world: conditions outside the candidate set for the anchor term of
training (`srum.anchor_weight`: the trained model's velocity is kept near the starting model's on
these prompts; the target is the model's own prediction, so nothing here is a label).

`recombined_prompts` recombines the parts of the train split's prompts (its object groups: colour,
shape, count word; its connectors: "and", the four relations) into other texts of the grammar: 1-3
groups of different kinds, at most 4 objects, placeable on the default 2x2 layout, joined by "and"
or (two groups) by a relation. Every text of the val split is excluded, every combination of the
generalisation split (`generalisation.gen_prompts`) in all its word orders, and every train text
(those are the candidates' own prompts). Since every text of the five grammar categories is either
train or val, what is left are texts in forms the categories do not use (repeated shapes in triples,
other count pairings, relations between objects sharing a colour or shape, counts in relations): the
same kinds of forms the generalisation split draws from, never its combinations. Deterministic.
"""
from __future__ import annotations

from typing import List

import numpy as np

from srum_jax.worlds.shapes import generalisation, grammar
from srum_jax.worlds.shapes.grammar import Prompt, Spec

ANCHOR_CATEGORY = "anchor"


def _parts(train: List[Prompt]):
  """(groups, relation words) the train prompts use."""
  groups = sorted({g for p in train for g in p.spec.objects},
                  key=lambda g: (g.color, g.shape, g.count, g.exact))
  relations = sorted({r for p in train for _, r, _ in p.spec.relations})
  return groups, relations


def recombined_prompts(seed: int = 0, n: int = 2000, split_seed: int = 0) -> List[Prompt]:
  """Up to `n` distinct recombined texts (see the module docstring), in draw order; `split_seed`:
  the train/val split whose parts are recombined and whose texts are excluded."""
  train, val = grammar.split_prompts(split_seed)
  excluded = {p.text for p in train + val}  # every surface form of a train or val combination
  gen_keys = {grammar.canonical(p.spec) for p in generalisation.gen_prompts()}
  groups, relations = _parts(train)
  rng = np.random.default_rng(seed)
  out, seen = [], set()
  for _ in range(200 * n):
    if len(out) >= n:
      break
    k = int(rng.integers(1, 4))
    picked = [groups[i] for i in rng.choice(len(groups), size=k, replace=False)]
    kinds = {(g.color, g.shape) for g in picked}
    if len(kinds) != k or sum(g.count for g in picked) > 4:
      continue
    related = k == 2 and rng.random() < 0.5
    rel = ((0, relations[int(rng.integers(len(relations)))], 1),) if related else ()
    spec = Spec(tuple(picked), rel)
    if not generalisation._placeable(spec):
      continue
    text = grammar.realize(spec)
    if text in excluded or grammar.canonical(spec) in gen_keys or text in seen:
      continue
    seen.add(text)
    out.append(Prompt(text, ANCHOR_CATEGORY, spec))
  return out
