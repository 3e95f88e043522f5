"""The shapes-world oracle: accepts ground truth, rejects every hard-negative kind, survives mild noise.

Accuracies are measured on rendered scenes of random prompts (fixed seeds) and asserted against the
targets of the design: >= 99% on clean ground truth and on rejecting each hard-negative kind, >= 95% with
Gaussian pixel noise (sigma 10/255), a 1-px Gaussian blur (sigma 1) and a slight colour shift."""
import ast
import collections
import json
import pathlib

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from srum_jax.worlds.shapes import grammar, oracle, scene as scene_lib

PALETTE = np.array(list(scene_lib.PALETTE.values()), np.float64)


def degrade(img, rng, noise=10.0, blur=1.0, shift=True, speckles=0):
  """Generation-like damage: isolated palette speckles, blur, per-channel gain / offset, pixel noise."""
  x = img.astype(np.float64)
  if speckles:
    ys, xs = rng.integers(0, img.shape[0], speckles), rng.integers(0, img.shape[1], speckles)
    free = img[ys, xs].max(-1) == 0
    x[ys[free], xs[free]] = PALETTE[rng.integers(0, len(PALETTE), free.sum())]
  if blur:
    x = ndimage.gaussian_filter(x, sigma=(blur, blur, 0))
  if shift:
    x = x * rng.uniform(0.8, 1.0, 3) + rng.uniform(0.0, 30.0, 3)
  x = x + rng.normal(0.0, noise, x.shape)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _accuracy(n_per_category, seed, layout=grammar.DEFAULT_LAYOUT, damage=None, negatives=True):
  """(positive accuracy per category, rejection rate per hard-negative kind), both as {name: (k, n)}."""
  rng = np.random.default_rng(seed)
  pos, neg = collections.defaultdict(lambda: [0, 0]), collections.defaultdict(lambda: [0, 0])
  look = (lambda im: im) if damage is None else (lambda im: damage(im, rng))
  for c in grammar.CATEGORIES:
    for _ in range(n_per_category):
      p = grammar.sample_prompt(rng, c)
      scene = grammar.sample_scene(rng, p, layout)
      t = pos[c]
      t[0] += oracle.judge(look(scene_lib.render(scene)), p.spec)
      t[1] += 1
      if not negatives:
        continue
      for kind in grammar.negative_kinds(p, scene):
        bad, _ = grammar.hard_negative(rng, p, scene, kind, layout)
        t = neg[kind]
        t[0] += not oracle.judge(look(scene_lib.render(bad)), p.spec)
        t[1] += 1
  return dict(pos), dict(neg)


def _rate(tally):
  k = sum(v[0] for v in tally.values())
  n = sum(v[1] for v in tally.values())
  return k / n, n


def test_oracle_accepts_ground_truth_and_rejects_hard_negatives():
  pos, neg = _accuracy(120, seed=0)
  acc, n = _rate(pos)
  assert n == 600 and acc >= 0.99, pos
  assert all(k / n >= 0.97 for k, n in pos.values()), pos
  assert set(neg) == set(grammar.NEGATIVE_KINDS)
  for kind, (k, n) in neg.items():
    assert n >= 200 and k / n >= 0.99, (kind, k, n)


def test_oracle_robust_to_noise_blur_and_colour_shift():
  pos, neg = _accuracy(60, seed=1, damage=degrade)
  acc, n = _rate(pos)
  assert n == 300 and acc >= 0.95, pos
  for kind, (k, n) in neg.items():
    assert k / n >= 0.95, (kind, k, n)


def test_oracle_ignores_isolated_speckles():
  pos, _ = _accuracy(30, seed=2, damage=lambda im, rng: degrade(im, rng, blur=0, speckles=20),
                     negatives=False)
  acc, _ = _rate(pos)
  assert acc >= 0.95, pos


def test_oracle_on_3x3_layout():
  pos, neg = _accuracy(30, seed=3, layout=grammar.LAYOUT_3X3)
  assert _rate(pos)[0] >= 0.99, pos
  assert _rate(neg)[0] >= 0.99, neg


def test_detect_reads_back_objects():
  scene = scene_lib.Scene((scene_lib.Obj("circle", "red", 8, 8, 12), scene_lib.Obj("square", "blue", 24, 8, 10),
                   scene_lib.Obj("triangle", "yellow", 16, 24, 12)))
  dets = sorted(oracle.detect(scene_lib.render(scene)), key=lambda d: (d.cy, d.cx))
  assert [(d.color, d.shape) for d in dets] == [("red", "circle"), ("blue", "square"), ("yellow", "triangle")]
  np.testing.assert_allclose([d.cx for d in dets], [8, 24, 16], atol=0.01)
  np.testing.assert_allclose([d.cy for d in dets[:2]], [8, 8], atol=0.01)
  assert dets[2].cy > 24  # a triangle's centroid sits below its box centre
  assert [d.box for d in dets] == [tuple(b) for b in scene_lib.scene_boxes(scene)]
  assert oracle.detect(np.zeros((32, 32, 3), np.uint8)) == []


def test_judge_semantics():
  red_circle, blue_square = scene_lib.Obj("circle", "red", 8, 8, 10), scene_lib.Obj("square", "blue", 24, 8, 10)
  extra_circle = scene_lib.Obj("circle", "red", 8, 24, 10)
  img = lambda *objs: scene_lib.render(scene_lib.Scene(objs))  # noqa: E731
  spec = grammar.parse_prompt
  assert oracle.judge(img(red_circle, blue_square), spec("a red circle left of a blue square"))
  assert not oracle.judge(img(red_circle, blue_square), spec("a red circle right of a blue square"))
  assert not oracle.judge(img(red_circle, blue_square), spec("a red circle above a blue square"))  # same row
  # "a": at least one, other objects ignored; number words: exact counts.
  assert oracle.judge(img(red_circle, blue_square, extra_circle), spec("a red circle and a blue square"))
  assert oracle.judge(img(red_circle, extra_circle), spec("two red circles"))
  assert not oracle.judge(img(red_circle, extra_circle), spec("one red circle"))
  two_left = spec("two red circles left of a blue square")
  assert oracle.judge(img(red_circle, blue_square, extra_circle), two_left)  # left of = by x, any row
  assert not oracle.judge(img(red_circle, blue_square, scene_lib.Obj("circle", "red", 24, 24, 10)), two_left)
  assert not oracle.judge(np.zeros((32, 32, 3), np.uint8), spec("a red circle"))
  # Float images are read in the model's [-1, 1] range.
  x = img(red_circle, blue_square)
  assert oracle.judge(x.astype(np.float32) / 127.5 - 1.0, spec("a red circle left of a blue square"))
  assert oracle.judge(x.astype(np.float32) / 255.0, spec("a red circle and a blue square"), value_range=(0, 1))


def test_describe_is_judged_true():
  rng = np.random.default_rng(5)
  for c in grammar.CATEGORIES:
    for _ in range(20):
      scene = grammar.sample_scene(rng, grammar.sample_prompt(rng, c))
      assert oracle.judge(scene_lib.render(scene), grammar.parse_prompt(grammar.describe(scene, rng)))


def test_evaluate_table():
  rng = np.random.default_rng(6)
  prompts, images, expect = [], [], collections.Counter()
  for i, c in enumerate(grammar.CATEGORIES * 4):
    p = grammar.sample_prompt(rng, c)
    scene = grammar.sample_scene(rng, p)
    good = i % 4 != 0
    if not good:
      scene, _ = grammar.hard_negative(rng, p, scene)
    prompts.append(p)
    images.append(scene_lib.render(scene))
    expect[c] += good
  table = oracle.evaluate(np.stack(images), prompts)
  assert set(table) == set(grammar.CATEGORIES) | {"overall"}
  for c in grammar.CATEGORIES:
    assert table[c] == (expect[c], 4, expect[c] / 4)
  assert table["overall"] == (15, 20, 0.75)


def test_oracle_shares_no_code_with_renderer_or_model():
  tree = ast.parse(pathlib.Path(oracle.__file__).read_text())
  modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  assert modules <= {"__future__", "itertools", "typing", "numpy", "scipy"}, modules


@pytest.mark.parametrize("shape", scene_lib.SHAPES)
def test_shape_classifier_on_every_size_and_colour(shape):
  for size in (8, 10, 12):
    for color in scene_lib.COLORS:
      (det,) = oracle.detect(scene_lib.render(scene_lib.Scene((scene_lib.Obj(shape, color, 16, 16, size),))))
      assert (det.shape, det.color) == (shape, color)
      assert oracle.judge(scene_lib.render(scene_lib.Scene((scene_lib.Obj(shape, color, 16, 16, size),))),
                     grammar.parse_prompt(f"a {color} {shape}"))


# Objects cut from the shipped model's own generations (val prompts, eval seed), each read by eye.
# kind: "agree" (old and new classifier agree), "rim" (a rounded square with a thin rim or spur that the
# one-pass classifier read as a circle), "known_misread" (both read it wrong; strict xfail marks a fix).
_GENERATED = pathlib.Path(__file__).parent / "fixtures" / "oracle_generated"
_CASES = json.loads((_GENERATED / "labels.json").read_text())


@pytest.mark.parametrize("case", _CASES, ids=[f"{c['kind']}-{c['image']}-{c['color']}" for c in _CASES])
def test_shapes_of_generated_objects_read_by_eye(case, request):
  if case["kind"] == "known_misread":
    request.applymarker(pytest.mark.xfail(strict=True, reason="a misread the oracle still makes"))
  image = np.asarray(Image.open(_GENERATED / case["image"]).convert("RGB"))
  x0, y0, x1, y1 = case["box"]
  found = [d for d in oracle.detect(image) if d.color == case["color"] and x0 <= d.cx <= x1 and y0 <= d.cy <= y1]
  assert len(found) == 1, found
  assert found[0].shape == case["shape"], found[0]
