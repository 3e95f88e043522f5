"""The prompt grammar of the shapes world: categories, held-out splits, scenes for prompts, hard
negatives.

A prompt names 1-3 groups of objects, each `<det> <colour> <shape>` ("a red circle", "two blue
squares"), joined by "and" or by one spatial relation ("left of", "right of", "above", "below"). The
determiner sets the count semantics: "a" means at least one such object, a number word ("one",
"two", "three") means exactly that many (T2I-CompBench numeracy). Five categories mirror
T2I-CompBench:

  color     2-3 single objects with pairwise different colours: colour must bind to the right shape
            ("a red circle and a blue square").
  shape     one object, or 2-3 objects with pairwise different shapes where some colour repeats, so
            that only the shape tells the objects apart ("a red circle and a red triangle").
  spatial   two objects (different colours and shapes) in a 2-D relation ("a green triangle left of
            a yellow circle"), decided by centroids with a margin.
  numeracy  exact counts: "three blue squares", "two red circles and one blue square".
  complex   count + colour + relation: "two red circles above a blue square" (every circle above
            it).

Surface forms (group orders, mirrored relations) of one combination share a canonical key, and the
train/val split is made over keys, so a validation prompt is a combination never seen in training.
Tokenisation is splitting on single spaces; `VOCAB` holds every word the grammar can produce.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from srum_jax.worlds.shapes.scene import COLORS, SHAPES, Obj, Scene

CATEGORIES = ("color", "shape", "spatial", "numeracy", "complex")
RELATIONS = ("left", "right", "above", "below")
RELATION_TEXT = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
PLURAL = {s: s + "s" for s in SHAPES}
NEGATIVE_KINDS = ("color", "shape", "count", "relation", "roles")

VOCAB = tuple(sorted(set(
    ["a", "and", "of"] + list(NUMBER_WORDS.values()) + list(COLORS) + list(SHAPES)
    + list(PLURAL.values()) + [w for r in RELATION_TEXT.values() for w in r.split(" ")])))


def tokenize(text: str) -> List[str]:
  """Canonical tokenisation: the words between single spaces."""
  return text.split(" ")


@dataclasses.dataclass(frozen=True)
class Group:
  """`count` objects of one colour and shape; `exact` (a number word) vs at least (the article
  "a")."""
  color: str
  shape: str
  count: int = 1
  exact: bool = False


@dataclasses.dataclass(frozen=True)
class Spec:
  """Required object groups, and relations (i, rel, j): every object of group i is `rel` of every
  one of j."""
  objects: Tuple[Group, ...]
  relations: Tuple[Tuple[int, str, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str
  category: str
  spec: Spec


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where objects go: centred on a `grid` x `grid` lattice of cells, side in `sizes`, centre
  jitter."""
  grid: int = 2
  sizes: Tuple[int, ...] = (10, 12)  # even sides keep boxes pixel aligned at integer centres
  jitter: int = 1
  min_gap: int = 2  # background pixels between any two objects' boxes
  height: int = 32
  width: int = 32

  def cell_centre(self, cell: int) -> Tuple[int, int]:
    row, col = divmod(cell, self.grid)
    return (int(round((col + 0.5) * self.width / self.grid)),
            int(round((row + 0.5) * self.height / self.grid)))


DEFAULT_LAYOUT = Layout()
LAYOUT_3X3 = Layout(grid=3, sizes=(8,), jitter=1)


# --------------------------------------------------------------------------------------------------
# Text <-> spec.

def _group_text(g: Group) -> str:
  if not g.exact and g.count != 1:
    raise ValueError(f"an at-least group must have count 1, got {g}")
  det = NUMBER_WORDS[g.count] if g.exact else "a"
  return f"{det} {g.color} {g.shape if g.count == 1 else PLURAL[g.shape]}"


def realize(spec: Spec) -> str:
  """The text of `spec` in its own group order (a relation spec has two groups, subject first)."""
  if spec.relations:
    (i, rel, j), = spec.relations
    if len(spec.objects) != 2 or (i, j) != (0, 1):
      raise ValueError(f"relation prompts have two groups related as (0, rel, 1): {spec}")
    return f"{_group_text(spec.objects[0])} {RELATION_TEXT[rel]} {_group_text(spec.objects[1])}"
  return " and ".join(_group_text(g) for g in spec.objects)


def parse_prompt(text: str) -> Spec:
  """Inverse of `realize` for every text of the grammar (also those of `describe`)."""
  words = tokenize(text)
  count_of = {"a": (1, False), **{w: (n, True) for n, w in NUMBER_WORDS.items()}}
  shape_of = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURAL.items()}}

  def group(i):
    if i + 3 > len(words) or words[i] not in count_of or words[i + 1] not in COLORS \
        or words[i + 2] not in shape_of:
      raise ValueError(f"cannot parse {text!r} at word {i}")
    count, exact = count_of[words[i]]
    if (words[i + 2] in SHAPES) != (count == 1):
      raise ValueError(f"number disagreement in {text!r}")
    return Group(words[i + 1], shape_of[words[i + 2]], count, exact), i + 3

  first, i = group(0)
  groups = [first]
  if i < len(words) and words[i] != "and":
    rel = words[i]
    if rel not in RELATIONS:
      raise ValueError(f"cannot parse {text!r} at word {i}")
    i += 2 if rel in ("left", "right") else 1
    if rel in ("left", "right") and words[i - 1:i] != ["of"]:
      raise ValueError(f"expected 'of' in {text!r}")
    second, i = group(i)
    if i != len(words):
      raise ValueError(f"trailing words in {text!r}")
    return Spec((first, second), ((0, rel, 1),))
  while i < len(words):
    if words[i] != "and":
      raise ValueError(f"cannot parse {text!r} at word {i}")
    g, i = group(i + 1)
    groups.append(g)
  return Spec(tuple(groups))


def _mirror(spec: Spec) -> Spec:
  (_, rel, _), = spec.relations
  return Spec((spec.objects[1], spec.objects[0]), ((0, INVERSE[rel], 1),))


def canonical(spec: Spec) -> Spec:
  """One representative per combination: groups sorted, or the relation stated as left / above."""
  if spec.relations:
    return spec if spec.relations[0][1] in ("left", "above") else _mirror(spec)
  return Spec(tuple(sorted(spec.objects, key=lambda g: (g.color, g.shape, g.count, g.exact))))


def _surface_forms(spec: Spec) -> List[Spec]:
  if spec.relations:
    return [spec, _mirror(spec)]
  return [Spec(p) for p in itertools.permutations(spec.objects)]


# --------------------------------------------------------------------------------------------------
# The prompt space.

KINDS = tuple((c, s) for c in COLORS for s in SHAPES)


def _one(kind, count=1, exact=False):
  return Group(kind[0], kind[1], count, exact)


def _keys(category: str) -> List[Spec]:
  """Canonical specs (combinations) of a category."""
  distinct = lambda a, b: a[0] != b[0] and a[1] != b[1]  # noqa: E731  (different colour and shape)
  keys = []
  if category == "color":
    for ks in itertools.combinations(KINDS, 2):
      if ks[0][0] != ks[1][0]:
        keys.append(Spec(tuple(_one(k) for k in ks)))
    for ks in itertools.combinations(KINDS, 3):
      if all(distinct(a, b) for a, b in itertools.combinations(ks, 2)):
        keys.append(Spec(tuple(_one(k) for k in ks)))
  elif category == "shape":
    keys += [Spec((_one(k),)) for k in KINDS]
    for n in (2, 3):
      for ks in itertools.combinations(KINDS, n):
        if len({k[1] for k in ks}) == n and len({k[0] for k in ks}) < n:
          keys.append(Spec(tuple(_one(k) for k in ks)))
  elif category == "spatial":
    for a, b in itertools.permutations(KINDS, 2):
      if distinct(a, b):
        keys += [Spec((_one(a), _one(b)), ((0, rel, 1),)) for rel in ("left", "above")]
  elif category == "numeracy":
    keys += [Spec((_one(k, n, True),)) for k in KINDS for n in (1, 2, 3)]
    for a, b in itertools.permutations(KINDS, 2):
      if distinct(a, b):
        keys.append(Spec((_one(a, 2, True), _one(b, 1, True))))
  elif category == "complex":
    for a, b in itertools.permutations(KINDS, 2):
      if distinct(a, b):
        keys += [Spec((_one(a, 2, True), _one(b)), ((0, rel, 1),)) for rel in RELATIONS]
  else:
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
  return [canonical(k) for k in keys]


@functools.lru_cache(maxsize=None)
def _prompts_by_key(category: str) -> Tuple[Tuple[Spec, Tuple[Prompt, ...]], ...]:
  return tuple((key, tuple(Prompt(realize(s), category, s) for s in _surface_forms(key)))
               for key in _keys(category))


@functools.lru_cache(maxsize=None)
def _key_of_text() -> Dict[str, Spec]:
  return {p.text: key for c in CATEGORIES for key, forms in _prompts_by_key(c) for p in forms}


def all_prompts(category: Optional[str] = None) -> List[Prompt]:
  """Every prompt text of a category (or of all categories), all surface forms."""
  cats = CATEGORIES if category is None else (category,)
  return [p for c in cats for _, forms in _prompts_by_key(c) for p in forms]


def _rank(seed: int, key: Spec) -> str:
  return hashlib.sha256(f"{seed}|{realize(key)}".encode()).hexdigest()


def split_prompts(seed: int = 0, val_per_category: int = 24) -> Tuple[List[Prompt], List[Prompt]]:
  """(train, val): per category, the `val_per_category` combinations of lowest hash(seed, key) are
  held out with all their surface forms; the rest train. Disjoint by text and by combination,
  deterministic."""
  train, val = [], []
  for c in CATEGORIES:
    groups = sorted(_prompts_by_key(c), key=lambda kv: _rank(seed, kv[0]))
    if not 0 < val_per_category < len(groups):
      raise ValueError(f"val_per_category must be in (0, {len(groups)}) for {c!r}")
    for n, (_, forms) in enumerate(groups):
      (val if n < val_per_category else train).extend(forms)
  return train, val


PromptIndex = Dict[str, List[List[Prompt]]]  # category -> combinations -> surface forms


def prompt_index(prompts: Sequence[Prompt]) -> PromptIndex:
  """Prompts grouped by category and combination, for repeated `sample_prompt` calls."""
  key_of = _key_of_text()
  by_cat: Dict[str, Dict[Spec, List[Prompt]]] = {}
  for p in prompts:
    key = key_of.get(p.text) or canonical(p.spec)
    by_cat.setdefault(p.category, {}).setdefault(key, []).append(p)
  return {c: list(by_cat[c].values()) for c in sorted(by_cat)}


@functools.lru_cache(maxsize=None)
def _full_index() -> PromptIndex:
  return prompt_index(all_prompts())


def sample_prompt(rng: np.random.Generator, category: Optional[str] = None, prompts=None) -> Prompt:
  """A random prompt: category uniform (unless given), then combination uniform, then surface form.

  `prompts` restricts the choice (e.g. the train split): a sequence of prompts, or its
  `prompt_index` (faster when sampling many times)."""
  index = _full_index() if prompts is None else prompts if isinstance(prompts, dict) \
      else prompt_index(prompts)
  if category is None:
    category = list(index)[rng.integers(len(index))]
  if category not in index:
    raise ValueError(f"no prompts of category {category!r}")
  keys = index[category]
  forms = keys[rng.integers(len(keys))]
  return forms[rng.integers(len(forms))]


# --------------------------------------------------------------------------------------------------
# Scenes.

def _spec_of(prompt) -> Spec:
  return prompt.spec if isinstance(prompt, Prompt) else prompt


def _cell_ok(layout: Layout, rel: str, a: int, b: int) -> bool:
  (ra, ca), (rb, cb) = divmod(a, layout.grid), divmod(b, layout.grid)
  return {"left": ca < cb, "right": ca > cb, "above": ra < rb, "below": ra > rb}[rel]


@functools.lru_cache(maxsize=None)
def _assignments(layout: Layout, counts: Tuple[int, ...], relations) -> Tuple[Tuple[int, ...], ...]:
  """Every injective map of the objects (grouped by `counts`) to cells that puts relations on the
  lattice."""
  owners = [g for g, n in enumerate(counts) for _ in range(n)]
  out = []
  for cells in itertools.permutations(range(layout.grid ** 2), len(owners)):
    if all(_cell_ok(layout, rel, cells[a], cells[b])
           for i, rel, j in relations
           for a in range(len(owners)) if owners[a] == i
           for b in range(len(owners)) if owners[b] == j):
      out.append(cells)
  return tuple(out)


def _gap(a: Obj, b: Obj) -> float:
  ha, hb = a.size / 2, b.size / 2
  return max(abs(a.cx - b.cx) - ha - hb, abs(a.cy - b.cy) - ha - hb)


def place_object(rng, layout: Layout, cell: int, shape: str, color: str, others: Sequence[Obj],
           tries: int = 32) -> Optional[Obj]:
  """An object in `cell` with random size and jitter, inside the canvas and `min_gap` from
  `others`."""
  cx0, cy0 = layout.cell_centre(cell)
  for t in range(tries + 1):
    last = t == tries  # last try: smallest size, no jitter
    size = min(layout.sizes) if last else int(rng.choice(layout.sizes))
    dx, dy = (0, 0) if last else rng.integers(-layout.jitter, layout.jitter + 1, size=2)
    obj = Obj(shape, color, float(cx0 + dx), float(cy0 + dy), float(size))
    inside = (
        obj.cx - size / 2 >= 0 and obj.cy - size / 2 >= 0 and obj.cx + size / 2 <= layout.width and
        obj.cy + size / 2 <= layout.height)
    if inside and all(_gap(obj, o) >= layout.min_gap for o in others):
      return obj
  return None


def cell_of(layout: Layout, obj: Obj) -> int:
  """The lattice cell (row-major index) that holds the object's centre."""
  col = min(int(obj.cx * layout.grid / layout.width), layout.grid - 1)
  row = min(int(obj.cy * layout.grid / layout.height), layout.grid - 1)
  return row * layout.grid + col


def sample_scene(rng: np.random.Generator, prompt, layout: Layout = DEFAULT_LAYOUT) -> Scene:
  """A minimal scene satisfying `prompt` (a Prompt or Spec): exactly `count` objects per group,
  nothing else, on random lattice cells consistent with the relations, random sizes and jitter."""
  spec = _spec_of(prompt)
  counts = tuple(g.count for g in spec.objects)
  options = _assignments(layout, counts, tuple(spec.relations))
  if not options:
    raise ValueError(f"no {layout.grid}x{layout.grid} layout satisfies {spec}")
  cells = options[rng.integers(len(options))]
  kinds = [(g.shape, g.color) for g in spec.objects for _ in range(g.count)]
  objs: List[Obj] = []
  for cell, (shape, color) in zip(cells, kinds):
    obj = place_object(rng, layout, cell, shape, color, objs)
    if obj is None:
      raise ValueError(f"layout {layout} cannot separate objects by {layout.min_gap} px")
    objs.append(obj)
  order = rng.permutation(len(objs))  # paint order carries no information
  return Scene(tuple(objs[k] for k in order), layout.height, layout.width)


def negative_kinds(prompt, scene: Scene) -> List[str]:
  """The hard-negative kinds that apply to (prompt, scene)."""
  spec = _spec_of(prompt)
  kinds = ["color", "shape", "count"] if scene.objects else []
  if spec.relations:
    kinds.append("relation")
  owner = _owners(spec, scene)
  if any(owner[a] != owner[b] and x.color != y.color and x.shape != y.shape
         for (a, x), (b, y) in itertools.combinations(enumerate(scene.objects), 2)):
    kinds.append("roles")
  return kinds


def _owners(spec: Spec, scene: Scene) -> List[int]:
  index = {(g.color, g.shape): i for i, g in enumerate(spec.objects)}
  if len(index) != len(spec.objects):
    raise ValueError(f"groups of one spec must differ in colour or shape: {spec}")
  return [index.get((o.color, o.shape), -1) for o in scene.objects]


def hard_negative(rng: np.random.Generator, prompt, scene: Scene, kind: Optional[str] = None,
                  layout: Layout = DEFAULT_LAYOUT) -> Tuple[Scene, str]:
  """(scene', kind): `scene` (a minimal scene of `prompt`, as from `sample_scene`) with one change
  that makes the prompt false:

    color     one object recoloured            shape     one object given another shape
    count     exact groups +-1 object, "a" groups one object fewer
    relation  two related objects swap places  roles     two objects of different groups swap
              colours (with their sizes)                         (colour-shape binding swapped)
  """
  spec = _spec_of(prompt)
  applicable = negative_kinds(spec, scene)
  kind = applicable[rng.integers(len(applicable))] if kind is None else kind
  if kind not in applicable:
    raise ValueError(f"hard negative {kind!r} does not apply to {spec} (applicable: {applicable})")
  objs = list(scene.objects)
  owner = _owners(spec, scene)

  if kind in ("color", "shape"):
    k = int(rng.integers(len(objs)))
    o = objs[k]
    if kind == "color":
      new = [c for c in COLORS if c != o.color]
      objs[k] = dataclasses.replace(o, color=new[rng.integers(len(new))])
    else:
      new = [s for s in SHAPES if s != o.shape]
      objs[k] = dataclasses.replace(o, shape=new[rng.integers(len(new))])
  elif kind == "count":
    g = int(rng.integers(len(spec.objects)))
    members = [k for k in range(len(objs)) if owner[k] == g]
    added = None
    if spec.objects[g].exact and rng.random() < 0.5:
      used = {cell_of(layout, o) for o in objs}
      free = [c for c in range(layout.grid ** 2) if c not in used]
      for c in rng.permutation(free):
        added = place_object(rng, layout, int(c), spec.objects[g].shape, spec.objects[g].color,
                             objs)
        if added is not None:
          break
    if added is not None:
      objs.append(added)
    else:
      objs.pop(members[rng.integers(len(members))])
  elif kind == "relation":
    i, _, j = spec.relations[rng.integers(len(spec.relations))]
    a = [k for k in range(len(objs)) if owner[k] == i]
    b = [k for k in range(len(objs)) if owner[k] == j]
    a, b = a[rng.integers(len(a))], b[rng.integers(len(b))]
    oa, ob = objs[a], objs[b]
    objs[a] = dataclasses.replace(oa, cx=ob.cx, cy=ob.cy, size=ob.size)
    objs[b] = dataclasses.replace(ob, cx=oa.cx, cy=oa.cy, size=oa.size)
  elif kind == "roles":
    pairs = [(a, b) for a, b in itertools.combinations(range(len(objs)), 2)
             if owner[a] != owner[b] and objs[a].color != objs[b].color
             and objs[a].shape != objs[b].shape]
    a, b = pairs[rng.integers(len(pairs))]
    objs[a], objs[b] = (dataclasses.replace(objs[a], color=objs[b].color),
                        dataclasses.replace(objs[b], color=objs[a].color))
  else:
    raise ValueError(f"unknown hard-negative kind {kind!r}; expected one of {NEGATIVE_KINDS}")
  return Scene(tuple(objs), scene.height, scene.width), kind


# --------------------------------------------------------------------------------------------------
# Captions.

def describe(scene: Scene, rng: Optional[np.random.Generator] = None, margin: float = 8.0) -> str:
  """A grammar text true of `scene` (for caption / understanding data).

  Objects are grouped by kind ("a" for one, a number word for several, in reading order of the first
  member, or a random order with `rng`). Two objects of different kinds whose centres differ by more
  than `margin` px along x (else y) are stated as a relation ("a red circle left of a blue square");
  with `rng` the relation is sometimes mirrored or replaced by the plain list."""
  if not scene.objects:
    raise ValueError("an empty scene has no description")
  objs = sorted(scene.objects, key=lambda o: (o.cy, o.cx))
  groups: Dict[Tuple[str, str], List[Obj]] = {}
  for o in objs:
    groups.setdefault((o.color, o.shape), []).append(o)
  spec_groups = [Group(c, s, len(m), len(m) > 1) for (c, s), m in groups.items()]
  if rng is not None:
    spec_groups = [spec_groups[k] for k in rng.permutation(len(spec_groups))]
  if len(objs) == 2 and len(groups) == 2 and (rng is None or rng.random() < 2 / 3):
    a, b = sorted(objs, key=lambda o: (o.cx, o.cy))
    rel = None
    if b.cx - a.cx > margin:
      rel = "left"
    else:
      a, b = sorted(objs, key=lambda o: (o.cy, o.cx))
      if b.cy - a.cy > margin:
        rel = "above"
    if rel is not None:
      spec = Spec((Group(a.color, a.shape), Group(b.color, b.shape)), ((0, rel, 1),))
      if rng is not None and rng.random() < 0.5:
        spec = _mirror(spec)
      return realize(spec)
  return realize(Spec(tuple(spec_groups)))


# --------------------------------------------------------------------------------------------------
# Layout plans (think mode).
#
# A plan is the text a model writes before drawing in think mode: what goes in each cell of the 2x2
# lattice,
# in reading order, two words per cell ("red square" or "empty cell"), e.g. for "two red circles
# above a
# blue square": "red circle red circle empty cell blue square". Fixed width keeps each cell's words
# at a fixed distance from the image that follows, so the generator can read cell k from its slot.

PLAN_EMPTY = ("empty", "cell")
PLAN_WORDS = PLAN_EMPTY  # the words a plan adds to the grammar's vocabulary


def plan_text(scene: Scene, layout: Layout = DEFAULT_LAYOUT) -> str:
  """The plan of `scene`: each lattice cell's object ("colour shape") or "empty cell", in reading
  order."""
  cells: Dict[int, Obj] = {}
  for o in scene.objects:
    c = cell_of(layout, o)
    if c in cells:
      raise ValueError(
          f"two objects in cell {c} of {layout.grid}x{layout.grid}: a plan holds one per cell")
    cells[c] = o
  words = []
  for c in range(layout.grid ** 2):
    o = cells.get(c)
    words += PLAN_EMPTY if o is None else (o.color, o.shape)
  return " ".join(words)


def parse_plan(text: str,
               layout: Layout = DEFAULT_LAYOUT) -> Optional[Tuple[Optional[Tuple[str, str]], ...]]:
  """Inverse of `plan_text`: per cell (colour, shape) or None for an empty cell; None when `text` is
  not a plan of this layout (wrong length, unknown words)."""
  words = text.split()
  if len(words) != 2 * layout.grid ** 2:
    return None
  out = []
  for k in range(0, len(words), 2):
    pair = tuple(words[k:k + 2])
    if pair == PLAN_EMPTY:
      out.append(None)
    elif pair[0] in COLORS and pair[1] in SHAPES:
      out.append(pair)
    else:
      return None
  return tuple(out)


def plan_scene(rng: np.random.Generator, plan, layout: Layout = DEFAULT_LAYOUT) -> Optional[Scene]:
  """A scene drawn from a parsed plan (each object in its cell, random size and jitter); None if the
  objects cannot be placed apart."""
  objs: List[Obj] = []
  for cell, kind in enumerate(plan):
    if kind is None:
      continue
    obj = place_object(rng, layout, cell, kind[1], kind[0], objs)
    if obj is None:
      return None
    objs.append(obj)
  return Scene(tuple(objs), layout.height, layout.width)
