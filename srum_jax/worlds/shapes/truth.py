"""Ground truth of a scene against a prompt, from the scene's objects (never from pixels): what
pretraining's judge data is labelled with. Pure NumPy, no JAX.

    ok, region_scores = scene_truth(prompt.spec, scene)
    boxes = [official_box(b) for b in scene_boxes(scene)]     # the region proposer's box convention
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Tuple

import numpy as np

from srum_jax.worlds.shapes import grammar
from srum_jax.worlds.shapes.scene import Obj, Scene, scene_boxes

__all__ = [
    "REL_MARGIN", "related", "scene_truth", "official_box", "jitter_box", "background_box",
    "unique_objects"
]

# px: relations hold between object centres this far apart (the oracle's margin at 32 px)
REL_MARGIN = 4.0


def related(a: Obj, b: Obj, rel: str, margin: float = REL_MARGIN) -> bool:
  """Does `a rel b` hold for the objects' centres (left / right / above / below, `margin` px
  apart)?"""
  return {"left": b.cx - a.cx > margin, "right": a.cx - b.cx > margin,
          "above": b.cy - a.cy > margin, "below": a.cy - b.cy > margin}[rel]


def scene_truth(spec: grammar.Spec, scene: Scene) -> Tuple[bool, List[float]]:
  """(does the scene satisfy the spec, one region score per object) from the ground-truth objects.

  Semantics of the grammar: each group needs `count` objects of its colour and shape (exactly, for
  number words); objects of other kinds do not falsify the prompt; a relation holds if some
  `count_i` objects of group i and `count_j` of group j are pairwise related (centres `REL_MARGIN`
  px apart). Region scores: 1.0 asked-for object; -0.5 right kind but its group has the wrong count;
  -1.0 kind not asked for (wrong colour / shape / extra object) or an object of a violated relation.
  """
  kinds = {(g.color, g.shape): i for i, g in enumerate(spec.objects)}
  owner = [kinds.get((o.color, o.shape), -1) for o in scene.objects]
  scores = [1.0 if w >= 0 else -1.0 for w in owner]
  members = [[k for k, w in enumerate(owner) if w == i] for i in range(len(spec.objects))]
  ok = True
  for g, ms in zip(spec.objects, members):
    if len(ms) < g.count or (g.exact and len(ms) != g.count):
      ok = False
      for k in ms:
        scores[k] = -0.5
  objs = scene.objects
  for i, rel, j in spec.relations:
    ni, nj = spec.objects[i].count, spec.objects[j].count
    holds = any(all(related(objs[a], objs[b], rel) for a in si for b in sj)
                for si in itertools.combinations(members[i], ni)
                for sj in itertools.combinations(members[j], nj))
    if not holds:
      ok = False
      for a in members[i]:
        for b in members[j]:
          if not related(objs[a], objs[b], rel):
            scores[a] = scores[b] = -1.0
  return ok, scores


def official_box(box_half_open) -> Tuple[int, int, int, int]:
  """Half-open [x0, y0, x1, y1] -> the region proposer's "official" box (inclusive max, never
  empty)."""
  x0, y0, x1, y1 = (int(v) for v in box_half_open)
  return x0, y0, max(x1 - 1, x0 + 1), max(y1 - 1, y0 + 1)


def jitter_box(rng: np.random.Generator, box, height: int = 32,
               width: int = 32) -> Tuple[int, int, int, int]:
  """Each coordinate moved by -1, 0 or +1 px, kept inside the image and non-empty."""
  x0, y0, x1, y1 = (int(v) + int(rng.integers(-1, 2)) for v in box)
  x0, y0 = min(max(x0, 0), width - 2), min(max(y0, 0), height - 2)
  return x0, y0, min(max(x1, x0 + 1), width - 1), min(max(y1, y0 + 1), height - 1)


def background_box(
    rng: np.random.Generator, scene: Scene,
    layout: grammar.Layout = grammar.DEFAULT_LAYOUT) -> Optional[Tuple[int, int, int, int]]:
  """An official box on empty canvas (in a lattice cell holding no object, clear of every object
  box), or None when no such box is found."""
  used = {grammar.cell_of(layout, o) for o in scene.objects}
  free = [c for c in range(layout.grid ** 2) if c not in used]
  boxes = scene_boxes(scene)
  for c in rng.permutation(free) if free else []:
    cx, cy = layout.cell_centre(int(c))
    for _ in range(8):
      side = int(rng.integers(5, 12))
      x0 = int(np.clip(cx - side // 2 + rng.integers(-2, 3), 0, layout.width - side))
      y0 = int(np.clip(cy - side // 2 + rng.integers(-2, 3), 0, layout.height - side))
      x1, y1 = x0 + side, y0 + side
      if all(x1 <= b[0] or b[2] <= x0 or y1 <= b[1] or b[3] <= y0 for b in boxes):
        return official_box((x0, y0, x1, y1))
  return None


def unique_objects(scene: Scene) -> List[int]:
  """Indices of the objects whose (colour, shape) occurs once in the scene: the ones a phrase can
  name."""
  kinds = [(o.color, o.shape) for o in scene.objects]
  return [k for k, kind in enumerate(kinds) if kinds.count(kind) == 1]
