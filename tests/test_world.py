"""The shapes world: renderer, prompt grammar, splits, scenes for prompts, hard negatives, captions.

Geometry is checked here against the scene objects themselves (the oracle has its own tests)."""
import collections
import itertools

import numpy as np
import pytest

from srum_jax.worlds.shapes import grammar, scene as scene_lib, truth


def _scenes(n_per_category, seed=0, layout=grammar.DEFAULT_LAYOUT):
  rng = np.random.default_rng(seed)
  for c in grammar.CATEGORIES:
    for _ in range(n_per_category):
      p = grammar.sample_prompt(rng, c)
      yield p, grammar.sample_scene(rng, p, layout)


def test_render_exact_palette_black_background_and_deterministic():
  scene = scene_lib.Scene((scene_lib.Obj("circle", "red", 8, 8, 12), scene_lib.Obj("square", "blue", 24, 8, 10),
                   scene_lib.Obj("triangle", "yellow", 16, 24, 12)))
  img = scene_lib.render(scene)
  assert img.shape == (32, 32, 3) and img.dtype == np.uint8
  np.testing.assert_array_equal(img, scene_lib.render(scene))
  masks = scene_lib.scene_masks(scene)
  for obj, mask in zip(scene.objects, masks):
    assert (img[mask] == scene_lib.PALETTE[obj.color]).all()
  assert (img[~masks.any(0)] == 0).all()
  colours = {tuple(c) for c in img.reshape(-1, 3)}
  assert colours == {(0, 0, 0)} | {scene_lib.PALETTE[o.color] for o in scene.objects}


def test_shapes_fill_ratio_and_boxes():
  for size in (8, 10, 12):
    fills = {}
    for shape in scene_lib.SHAPES:
      obj = scene_lib.Obj(shape, "green", 16, 16, size)
      mask = scene_lib.object_mask(obj)
      x0, y0, x1, y1 = scene_lib.object_box(obj)
      ys, xs = np.nonzero(mask)
      assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
      assert x1 - x0 == size and x1 - x0 >= y1 - y0 >= size - 1  # the apex row may be empty
      fills[shape] = mask.sum() / size ** 2
    assert fills["square"] == 1.0
    assert abs(fills["circle"] - np.pi / 4) < 0.04
    assert 0.45 < fills["triangle"] < 0.6
  boxes = scene_lib.scene_boxes(scene_lib.Scene((scene_lib.Obj("square", "red", 8, 8, 10), scene_lib.Obj("circle", "red", 24, 24, 12))))
  np.testing.assert_array_equal(boxes, [[3, 3, 13, 13], [18, 18, 30, 30]])


def test_vocab_covers_every_prompt_and_tokenisation():
  words = set()
  for p in grammar.all_prompts():
    toks = grammar.tokenize(p.text)
    assert " ".join(toks) == p.text and all(toks) and p.text == p.text.lower()
    words.update(toks)
  assert words <= set(grammar.VOCAB)
  assert words == set(grammar.VOCAB)  # no dead words either
  assert len(grammar.VOCAB) == 20


def test_prompt_space_categories_and_parse_roundtrip():
  sizes = {c: len(grammar._prompts_by_key(c)) for c in grammar.CATEGORIES}
  assert sizes == {"color": 78, "shape": 64, "spatial": 144, "numeracy": 108, "complex": 288}
  texts = [p.text for p in grammar.all_prompts()]
  assert len(texts) == len(set(texts)) == 1572
  for p in grammar.all_prompts():
    assert grammar.parse_prompt(p.text) == p.spec
    assert grammar.realize(p.spec) == p.text
    kinds = [(g.color, g.shape) for g in p.spec.objects]
    assert len(set(kinds)) == len(kinds)
  assert grammar.parse_prompt("two red circles above a blue square") == grammar.Spec(
      (grammar.Group("red", "circle", 2, True), grammar.Group("blue", "square")), ((0, "above", 1),))
  # Surface forms of one combination share the canonical key; categories have their defining traits.
  assert grammar.canonical(grammar.parse_prompt("a blue square right of a red circle")) == \
      grammar.parse_prompt("a red circle left of a blue square")
  for p in grammar.all_prompts("color"):
    assert len({g.color for g in p.spec.objects}) == len(p.spec.objects) >= 2
  for p in grammar.all_prompts("shape"):
    n = len(p.spec.objects)
    assert len({g.shape for g in p.spec.objects}) == n
    assert n == 1 or len({g.color for g in p.spec.objects}) < n
  for p in grammar.all_prompts("numeracy"):
    assert all(g.exact for g in p.spec.objects)
  for p in grammar.all_prompts("complex"):
    assert p.spec.relations and any(g.count > 1 for g in p.spec.objects)
  for bad in ("a red circles", "two red circle", "a red circle beside a blue square", "a red",
              "a red circle and", "a red circle left", "a red circle above"):
    with pytest.raises(ValueError):
      grammar.parse_prompt(bad)


def test_split_disjoint_balanced_deterministic():
  train, val = grammar.split_prompts(seed=0)
  train2, val2 = grammar.split_prompts(seed=0)
  assert [p.text for p in train] == [p.text for p in train2]
  assert [p.text for p in val] == [p.text for p in val2]
  assert not {p.text for p in train} & {p.text for p in val}
  assert not {grammar.canonical(p.spec) for p in train} & {grammar.canonical(p.spec) for p in val}  # held-out combos
  assert len(train) + len(val) == len(grammar.all_prompts())
  val_keys = collections.Counter(p.category for p in {grammar.canonical(p.spec): p for p in val}.values())
  train_keys = collections.Counter(p.category for p in {grammar.canonical(p.spec): p for p in train}.values())
  assert val_keys == {c: 24 for c in grammar.CATEGORIES}
  assert set(train_keys) == set(grammar.CATEGORIES) and min(train_keys.values()) >= 40
  assert sum(train_keys.values()) == 562 and len(val) >= 100 and len(train) >= 300
  other_train, other_val = grammar.split_prompts(seed=1)
  assert {p.text for p in other_val} != {p.text for p in val}
  assert not {p.text for p in other_train} & {p.text for p in other_val}


def test_sample_prompt_respects_category_and_pool():
  train, _ = grammar.split_prompts(seed=0)
  pool = {p.text for p in train}
  rng = np.random.default_rng(3)
  seen = collections.Counter()
  for _ in range(500):
    p = grammar.sample_prompt(rng, prompts=train)
    assert p.text in pool
    seen[p.category] += 1
  assert set(seen) == set(grammar.CATEGORIES) and min(seen.values()) > 60  # categories uniform
  assert all(grammar.sample_prompt(rng, "spatial", train).category == "spatial" for _ in range(20))
  a = [grammar.sample_prompt(np.random.default_rng(9)).text for _ in range(3)]
  assert a == [grammar.sample_prompt(np.random.default_rng(9)).text for _ in range(3)]


@pytest.mark.parametrize("layout", [grammar.DEFAULT_LAYOUT, grammar.LAYOUT_3X3], ids=["2x2", "3x3"])
def test_sample_scene_satisfies_prompt_geometry(layout):
  for p, scene in _scenes(60, seed=1, layout=layout):
    counts = collections.Counter((o.color, o.shape) for o in scene.objects)
    assert counts == {(g.color, g.shape): g.count for g in p.spec.objects}  # minimal scene
    assert scene_lib.min_gap(scene) >= 2
    boxes = scene_lib.scene_boxes(scene)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 32).all() and (boxes[:, 3] <= 32).all()
    assert all(o.size in layout.sizes for o in scene.objects)
    kind = lambda g: (g.color, g.shape)  # noqa: E731
    for i, rel, j in p.spec.relations:
      a = [o for o in scene.objects if kind(o) == kind(p.spec.objects[i])]
      b = [o for o in scene.objects if kind(o) == kind(p.spec.objects[j])]
      for oa, ob in itertools.product(a, b):
        d = {"left": ob.cx - oa.cx, "right": oa.cx - ob.cx, "above": ob.cy - oa.cy,
             "below": oa.cy - ob.cy}[rel]
        assert d >= 32 / layout.grid - 2 * layout.jitter - 1
  p = grammar.sample_prompt(np.random.default_rng(0), "complex")
  s1 = grammar.sample_scene(np.random.default_rng(5), p, layout)
  assert s1 == grammar.sample_scene(np.random.default_rng(5), p, layout)
  np.testing.assert_array_equal(scene_lib.render(s1), scene_lib.render(grammar.sample_scene(np.random.default_rng(5), p, layout)))


def test_hard_negatives_change_exactly_one_thing():
  rng = np.random.default_rng(2)
  seen = collections.Counter()
  for p, scene in _scenes(40, seed=2):
    kinds = grammar.negative_kinds(p, scene)
    assert ("relation" in kinds) == bool(p.spec.relations)
    for kind in kinds:
      neg, got = grammar.hard_negative(rng, p, scene, kind)
      assert got == kind and neg != scene
      seen[kind] += 1
      old, new = scene.objects, neg.objects
      if kind in ("color", "shape"):
        other = "shape" if kind == "color" else "color"
        diff = [(a, b) for a, b in zip(old, new) if a != b]
        assert len(old) == len(new) and len(diff) == 1
        a, b = diff[0]
        assert getattr(a, kind) != getattr(b, kind) and getattr(a, other) == getattr(b, other)
        assert (a.cx, a.cy, a.size) == (b.cx, b.cy, b.size)
      elif kind == "count":
        assert abs(len(new) - len(old)) == 1
        assert scene_lib.min_gap(neg) >= 2
        small, big = (old, new) if len(new) > len(old) else (new, old)
        assert not collections.Counter(small) - collections.Counter(big)
      elif kind == "relation":
        assert sorted((o.color, o.shape) for o in old) == sorted((o.color, o.shape) for o in new)
        assert sorted((o.cx, o.cy, o.size) for o in old) == sorted((o.cx, o.cy, o.size) for o in new)
        assert sum(a != b for a, b in zip(old, new)) == 2
      elif kind == "roles":
        diff = [(a, b) for a, b in zip(old, new) if a != b]
        assert len(diff) == 2
        (a1, b1), (a2, b2) = diff
        assert (b1.color, b2.color) == (a2.color, a1.color) and (b1.shape, b2.shape) == (a1.shape, a2.shape)
  assert set(seen) == set(grammar.NEGATIVE_KINDS)
  p = grammar.parse_prompt("three red circles")
  with pytest.raises(ValueError):
    grammar.hard_negative(rng, p, grammar.sample_scene(rng, p), "relation")


def test_describe_is_a_grammar_text_of_the_scene():
  rng = np.random.default_rng(4)
  for p, scene in _scenes(30, seed=4):
    for text in (grammar.describe(scene), grammar.describe(scene, rng)):
      assert set(grammar.tokenize(text)) <= set(grammar.VOCAB)
      spec = grammar.parse_prompt(text)
      counts = {(g.color, g.shape): g.count for g in spec.objects}
      assert counts == collections.Counter((o.color, o.shape) for o in scene.objects)
  scene = scene_lib.Scene((scene_lib.Obj("circle", "red", 8, 24, 10), scene_lib.Obj("square", "blue", 24, 24, 10)))
  assert grammar.describe(scene) == "a red circle left of a blue square"


def test_plans_round_trip_and_satisfy_their_prompts():
  """A scene's plan (one cell per object, fixed width) parses back to its objects, and a scene laid out by the
  plan satisfies the prompt, for every prompt of both splits."""
  rng = np.random.default_rng(3)
  train, val = grammar.split_prompts(0)
  for p in train + val:
    scene = grammar.sample_scene(rng, p)
    text = grammar.plan_text(scene)
    assert len(text.split()) == 8
    cells = grammar.parse_plan(text)
    kinds = sorted((o.color, o.shape) for o in scene.objects)
    assert sorted(c for c in cells if c is not None) == kinds
    for o in scene.objects:
      assert cells[grammar.cell_of(grammar.DEFAULT_LAYOUT, o)] == (o.color, o.shape)
    again = grammar.plan_scene(rng, cells)
    assert truth.scene_truth(p.spec, again)[0], (p.text, text)
  assert grammar.parse_plan("red square empty cell") is None  # too short
  assert grammar.parse_plan("red square empty cell purple circle empty cell") is None  # unknown colour
  assert grammar.parse_plan("square red empty cell empty cell empty cell") is None  # word order
  assert grammar.plan_text(scene_lib.Scene(())) == "empty cell empty cell empty cell empty cell"
  crowded = scene_lib.Scene((scene_lib.Obj("circle", "red", 5, 5, 4), scene_lib.Obj("square", "blue", 10, 10, 4)))
  with pytest.raises(ValueError, match="two objects in cell 0"):
    grammar.plan_text(crowded)
