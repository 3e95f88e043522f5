"""The generalisation split of the shapes world: prompt forms that neither train nor val holds.

The grammar's five categories (`grammar.CATEGORIES`) use a fixed set of forms; the train/val split
holds out combinations, never forms. This split holds what the categories never say, in the same
words, parseable by `grammar.parse_prompt`, judged by the oracle as every other prompt. Four
categories of its own:

  three_and   three single objects joined by "and" where a shape repeats ("a red circle and a blue
              circle and a green square"). The colour category's triples have pairwise different
              shapes and colours, the shape category's pairwise different shapes: a repeated shape
              is in neither.
  count_and   exact counts in "and" pairings the numeracy category never uses: (one, one), (two,
              two), (three, one), (two, one) when the two kinds share a colour or a shape, and an
              exact group beside an "a" group ("two red circles and a blue square"); at most 4
              objects in all. Numeracy pairs only "two X and one Y" with X, Y of different colour
              and shape.
  rel_shared  one relation between two single objects that share a colour or a shape ("a red circle
              left of a red square", "a blue triangle above a green triangle"). Spatial relates
              objects that differ in both.
  count_rel   counts in relations, in positions the complex category never uses: an exact "one" on
              either side, two against two ("two red circles left of two blue squares"), and "two X
              rel a Y" with X, Y sharing a colour or a shape. Complex is only "two X rel a Y" with
              X, Y differing in both.

How it is built (deterministic, no randomness beyond a hash): each category's combinations are
enumerated as canonical specs (`grammar.canonical`), kept only when no surface form of them is a
text of any grammar category (so no val or train prompt of any split seed), the groups differ in
kind (colour, shape), and the default 2x2 layout can place them (`grammar.sample_scene` must be able
to draw a true scene: at most 4 objects, relations on the lattice). The `per_category` combinations
of lowest sha256(seed | key text) are taken, each with one surface form (word order / mirrored
relation) picked by the same hash, so the split covers many combinations in varied word orders.
Nothing here enters training or candidate generation: the pipeline's train prompts come from
`grammar.split_prompts`, whose texts this split excludes by construction.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
from typing import Dict, List, Tuple

from srum_jax.worlds.shapes import grammar
from srum_jax.worlds.shapes.grammar import Group, Prompt, Spec

GEN_CATEGORIES = ("three_and", "count_and", "rel_shared", "count_rel")
GEN_PER_CATEGORY = 100  # combinations (one prompt each) per category: 400 prompts

_KINDS = grammar.KINDS


def _shares_one(a, b) -> bool:
  """Two kinds (colour, shape) with exactly one attribute in common."""
  return (a[0] == b[0]) != (a[1] == b[1])


def _differ_in_both(a, b) -> bool:
  return a[0] != b[0] and a[1] != b[1]


def _group(kind, count: int = 1, exact: bool = False) -> Group:
  return Group(kind[0], kind[1], count, exact)


# Count determiners of one group: (count, exact). "a" is (1, False); number words are exact.
_A, _ONE, _TWO, _THREE = (1, False), (1, True), (2, True), (3, True)


def _candidates(category: str) -> List[Spec]:
  """Every spec of the category's form (before the exclusion and layout filters), canonical."""
  out = []
  if category == "three_and":
    for ks in itertools.combinations(_KINDS, 3):
      if len({k[1] for k in ks}) < 3:
        out.append(Spec(tuple(_group(k) for k in ks)))
  elif category == "count_and":
    dets = (_A, _ONE, _TWO, _THREE)
    for a, b in itertools.permutations(_KINDS, 2):
      for da, db in itertools.product(dets, dets):
        if not (da[1] or db[1]) or da[0] + db[0] > 4:
          continue  # at least one exact count; at most 4 objects
        if da == _TWO and db == _ONE and _differ_in_both(a, b):
          continue  # numeracy's own pairing
        out.append(Spec((_group(a, *da), _group(b, *db))))
  elif category == "rel_shared":
    for a, b in itertools.permutations(_KINDS, 2):
      if _shares_one(a, b):
        out += [Spec((_group(a), _group(b)), ((0, rel, 1),)) for rel in ("left", "above")]
  elif category == "count_rel":
    dets = (_A, _ONE, _TWO)
    for a, b in itertools.permutations(_KINDS, 2):
      if not (_shares_one(a, b) or _differ_in_both(a, b)):
        continue
      for da, db in itertools.product(dets, dets):
        if not (da[1] or db[1]):
          continue  # a count somewhere (two single "a" objects: spatial / rel_shared)
        complex_form = {da, db} == {_TWO, _A}
        if complex_form and _differ_in_both(a, b):
          continue  # the complex category's own form (either side: mirrors are surface forms)
        out += [Spec((_group(a, *da), _group(b, *db)), ((0, rel, 1),)) for rel in grammar.RELATIONS]
  else:
    raise ValueError(f"unknown generalisation category {category!r}; "
                     f"expected one of {GEN_CATEGORIES}")
  return sorted({grammar.canonical(s) for s in out}, key=grammar.realize)


def _forms(key: Spec) -> List[Spec]:
  """Surface forms of a combination: the group orders of an "and" prompt, both sides of a
  relation."""
  return grammar._surface_forms(key)


def _placeable(spec: Spec) -> bool:
  counts = tuple(g.count for g in spec.objects)
  return bool(grammar._assignments(grammar.DEFAULT_LAYOUT, counts, tuple(spec.relations)))


@functools.lru_cache(maxsize=None)
def _grammar_texts() -> frozenset:
  return frozenset(p.text for p in grammar.all_prompts())


@functools.lru_cache(maxsize=None)
def gen_keys(category: str) -> Tuple[Spec, ...]:
  """The category's combinations outside every grammar category, placeable on the default 2x2
  layout."""
  known = _grammar_texts()
  keep = []
  for key in _candidates(category):
    kinds = [(g.color, g.shape) for g in key.objects]
    if len(set(kinds)) != len(kinds) or not _placeable(key):
      continue
    if any(grammar.realize(f) in known for f in _forms(key)):
      continue
    keep.append(key)
  return tuple(keep)


def _hash(seed: int, text: str) -> str:
  return hashlib.sha256(f"gen|{seed}|{text}".encode()).hexdigest()


def gen_prompts(seed: int = 0, per_category: int = GEN_PER_CATEGORY) -> List[Prompt]:
  """The split: per category the `per_category` combinations of lowest hash, one surface form each
  (picked by the hash), in hash order; categories in `GEN_CATEGORIES` order. Deterministic."""
  out = []
  for c in GEN_CATEGORIES:
    keys = gen_keys(c)
    if not 0 < per_category <= len(keys):
      raise ValueError(f"per_category must be in (0, {len(keys)}] for {c!r}")
    ranked = sorted(keys, key=lambda k: _hash(seed, grammar.realize(k)))[:per_category]
    for key in ranked:
      forms = _forms(key)
      form = forms[int(_hash(seed, "form|" + grammar.realize(key)), 16) % len(forms)]
      out.append(Prompt(grammar.realize(form), c, form))
  return out


def gen_sizes() -> Dict[str, int]:
  """Combinations available per category (the ceiling of `per_category`)."""
  return {c: len(gen_keys(c)) for c in GEN_CATEGORIES}
