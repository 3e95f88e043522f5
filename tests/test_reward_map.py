"""reward_map / resize / token_rewards: golden `srum` maps, a plain-loop statement of the official semantics,
torch's bilinear interpolate, hypothesis properties and jit."""
import functools

import jax
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from srum_jax.rewards import records as rec
from srum_jax.rewards.reward_map import resize_reward_map, reward_map, token_rewards

H, W = 32, 24  # golden map size
_rm = jax.jit(reward_map, static_argnames=("height", "width", "signed"))  # one compile per shape, fast in CI


def _golden_records(golden_manifest):
  lists = golden_manifest["cases"]["srum"]["reward_lists"]
  return [rec.from_official({"bad_image_file": f"{i}.png", "prompt": "p", "vlm_rewards": r})
          for i, r in enumerate(lists)]


def test_golden_reward_maps_exact(golden_manifest, golden_cases):
  stats = rec.ArrayStats()
  boxes, scores, valid, g = rec.records_to_arrays(_golden_records(golden_manifest), max_regions=5, stats=stats)
  maps = np.asarray(_rm(boxes, scores, valid, g, height=H, width=W))
  names = ["srum.reward_map_sample0", "srum.reward_map_sample1", "srum.reward_map_global_only"]
  for i, name in enumerate(names):
    np.testing.assert_array_equal(maps[i], golden_cases[name], err_msg=name)  # max abs err 0
  np.testing.assert_array_equal(maps[:2], golden_cases["srum.regional_reward_map"])
  assert stats.missing_global == 0 and stats.dropped_regions == 0


def test_golden_rewards_per_token(golden_manifest, golden_cases):
  boxes, scores, valid, g = rec.records_to_arrays(_golden_records(golden_manifest)[:2], max_regions=5)
  maps = _rm(boxes, scores, valid, g, height=H, width=W)
  r_tok = np.asarray(token_rewards(maps, golden_cases["srum.patchified_vae_latent_shapes"]))
  np.testing.assert_allclose(r_tok, golden_cases["srum.rewards_per_token"], rtol=0, atol=1e-7)


# ---- plain-loop statement of the official semantics ----------------------------------------------------

def official_map_loops(entries, global_score, height, width):
  """entries: list of (bbox, score). Python ints and floats, then float32 like the official numpy code."""
  m = np.full((height, width), 0.5, np.float32)
  for bbox, score in entries:
    x_min, y_min, x_max, y_max = (int(v) for v in bbox)
    if x_min >= x_max or y_min >= y_max:
      continue
    weight = (score + 1.0) / 2.0
    for y in range(max(0, y_min), min(height, y_max)):
      for x in range(max(0, x_min), min(width, x_max)):
        m[y, x] = max(m[y, x], np.float32(weight))
  return m * np.float32((global_score + 1.0) / 2.0)


def official_resize_loops(m, out_h, out_w):
  """torch bilinear, align_corners=False, no antialias, float32 arithmetic as torch's CPU kernel."""
  in_h, in_w = m.shape
  f = np.float32

  def taps(n_in, n_out, i):
    src = max(f(f(n_in) / f(n_out)) * (f(i) + f(0.5)) - f(0.5), f(0.0))
    i0 = min(int(np.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    lam = f(min(max(src - f(i0), f(0.0)), f(1.0)))
    return i0, i1, f(1.0) - lam, lam

  out = np.zeros((out_h, out_w), np.float32)
  for y in range(out_h):
    y0, y1, a0, a1 = taps(in_h, out_h, y)
    for x in range(out_w):
      x0, x1, b0, b1 = taps(in_w, out_w, x)
      out[y, x] = a0 * (b0 * m[y0, x0] + b1 * m[y0, x1]) + a1 * (b0 * m[y1, x0] + b1 * m[y1, x1])
  return out


def _random_boxes(rng, k, height, width):
  """Random boxes mixing negative, out-of-bounds, fractional, empty and swapped coordinates."""
  boxes = []
  for _ in range(k):
    kind = rng.integers(5)
    x = np.sort(rng.uniform(-8, width + 8, 2))
    y = np.sort(rng.uniform(-8, height + 8, 2))
    if kind == 0:  # integer, inside
      x, y = np.sort(rng.integers(0, width + 1, 2)).astype(float), np.sort(rng.integers(0, height + 1, 2)).astype(float)
    elif kind == 1:  # empty after truncation
      x = np.array([x[0], x[0] + 0.4])
    elif kind == 2:  # swapped
      x = x[::-1]
    elif kind == 3:  # small negative fractions (int(-0.5) = 0)
      x, y = np.array([-0.7, x[1]]), np.array([-0.2, y[1]])
    boxes.append([x[0], y[0], x[1], y[1]])
  return np.asarray(boxes)


def test_reward_map_matches_official_loops():
  rng = np.random.default_rng(0)
  height, width, k = 19, 13, 6
  for _ in range(20):
    b = 3
    boxes = np.stack([_random_boxes(rng, k, height, width) for _ in range(b)]).astype(np.float32)
    scores = rng.uniform(-1, 1, (b, k)).astype(np.float32)
    valid = rng.random((b, k)) < 0.8
    g = rng.uniform(-1, 1, b).astype(np.float32)
    got = np.asarray(_rm(boxes, scores, valid, g, height=height, width=width))
    for i in range(b):
      entries = [(boxes[i, j].tolist(), float(scores[i, j])) for j in range(k) if valid[i, j]]
      want = official_map_loops(entries, float(g[i]), height, width)
      np.testing.assert_array_equal(got[i], want)  # exact: float32-representable scores


def test_decimal_scores_within_one_ulp():
  """Official weights are computed in float64 from the JSON decimals; ours from float32 scores, so some
  decimals land one float32 ulp away (<= 6e-8); never more."""
  scores = np.round(np.linspace(-1, 1, 201), 2)
  boxes = np.tile(np.array([[0.0, 0.0, 4.0, 4.0]]), (201, 1))[:, None]
  got = np.asarray(_rm(boxes.astype(np.float32), scores[:, None].astype(np.float32), np.ones((201, 1), bool),
                              np.full(201, 0.3, np.float32), height=4, width=4))
  want = np.stack([official_map_loops([([0, 0, 4, 4], float(s))], 0.3, 4, 4) for s in scores])
  np.testing.assert_allclose(got, want, rtol=0, atol=6e-8)


@pytest.mark.parametrize("in_hw,out_hw", [((32, 24), (4, 3)), ((13, 7), (5, 3)), ((5, 3), (13, 11)),
                                          ((7, 9), (7, 9)), ((6, 10), (17, 4)), ((1, 5), (3, 2))])
def test_resize_vs_loops_and_torch(in_hw, out_hw):
  rng = np.random.default_rng(in_hw[0] * 100 + out_hw[1])
  maps = rng.uniform(0, 1, (2, *in_hw)).astype(np.float32)
  got = np.asarray(resize_reward_map(maps, *out_hw))
  for i in range(2):
    np.testing.assert_allclose(got[i], official_resize_loops(maps[i], *out_hw), rtol=0, atol=1e-7)
  ref = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=out_hw, mode="bilinear",
                                        align_corners=False)[:, 0].numpy()
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_resize_is_not_antialiased():
  """Downsampling a checkerboard by 2 picks up exact 2x2 averages only without antialiasing."""
  m = np.indices((8, 8)).sum(0) % 2
  got = np.asarray(resize_reward_map(m[None].astype(np.float32), 4, 4))
  np.testing.assert_allclose(got, 0.5, atol=1e-7)
  got3 = np.asarray(resize_reward_map(np.arange(9, dtype=np.float32).reshape(1, 1, 9), 1, 3))
  np.testing.assert_allclose(got3, [[[1.0, 4.0, 7.0]]], atol=1e-6)  # src = 1, 4, 7: no blur across taps


def test_token_rewards_mixed_grids():
  rng = np.random.default_rng(3)
  maps = rng.uniform(0, 1, (2, 16, 12)).astype(np.float32)
  got = np.asarray(token_rewards(maps, [(4, 3), (2, 5)]))
  want = np.concatenate([official_resize_loops(maps[0], 4, 3).ravel(), official_resize_loops(maps[1], 2, 5).ravel()])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
  with pytest.raises(ValueError):
    token_rewards(maps, [(4, 3)])


def test_jit_matches_eager():
  rng = np.random.default_rng(5)
  boxes = np.stack([_random_boxes(rng, 4, 10, 9) for _ in range(2)]).astype(np.float32)
  args = (boxes, rng.uniform(-1, 1, (2, 4)).astype(np.float32), rng.random((2, 4)) < 0.7,
          rng.uniform(-1, 1, 2).astype(np.float32))
  jitted = jax.jit(reward_map, static_argnames=("height", "width", "signed"))
  for signed in (False, True):
    np.testing.assert_array_equal(np.asarray(jitted(*args, height=10, width=9, signed=signed)),
                                  np.asarray(reward_map(*args, height=10, width=9, signed=signed)))


def test_signed_map():
  boxes = np.array([[[0, 0, 4, 4], [2, 2, 6, 6], [0, 0, 1, 1], [1, 0, 2, 1]]], np.float32)
  scores = np.array([[0.4, -0.8, 0.8, -0.6]], np.float32)
  m = np.asarray(_rm(boxes, scores, np.ones((1, 4), bool), np.array([0.2], np.float32), height=6, width=6,
                            signed=True))[0]
  np.testing.assert_allclose(m[5, 0], 0.1, atol=1e-7)  # no region: g / 2
  np.testing.assert_allclose(m[1, 1], (0.4 + 0.2) / 2, atol=1e-7)  # one region
  np.testing.assert_allclose(m[3, 3], (-0.8 + 0.2) / 2, atol=1e-7)  # overlap: |-0.8| > |0.4| wins
  np.testing.assert_allclose(m[0, 0], (0.8 + 0.2) / 2, atol=1e-7)
  np.testing.assert_allclose(m[0, 1], (-0.6 + 0.2) / 2, atol=1e-7)
  tie = np.asarray(_rm(boxes[:, :2], np.array([[0.5, -0.5]], np.float32), np.ones((1, 2), bool),
                              np.zeros(1, np.float32), height=6, width=6, signed=True))[0]
  np.testing.assert_allclose(tie[3, 3], -0.25, atol=1e-7)  # tie: the lower score
  assert m.min() < 0  # really signed


# ---- hypothesis properties (one compiled shape: B=1, K=4, 12x10) ------------------------------------------

HH, WW, KK = 12, 10, 4
_map = jax.jit(functools.partial(reward_map, height=HH, width=WW))
_coord = st.floats(-6, 18, allow_nan=False, width=32)
_box = st.tuples(_coord, _coord, _coord, _coord)
_score = st.floats(-1, 1, allow_nan=False, width=32)
_case = st.tuples(st.lists(st.tuples(_box, _score, st.booleans()), min_size=KK, max_size=KK), _score)


def _arrays(case):
  entries, g = case
  boxes = np.array([[e[0] for e in entries]], np.float32)
  scores = np.array([[e[1] for e in entries]], np.float32)
  valid = np.array([[e[2] for e in entries]])
  return boxes, scores, valid, np.array([g], np.float32)


@settings(max_examples=150, deadline=None)
@given(_case)
def test_prop_unsigned_in_unit_interval(case):
  m = np.asarray(_map(*_arrays(case)))
  assert m.min() >= 0.0 and m.max() <= 1.0


@settings(max_examples=150, deadline=None)
@given(_case, st.integers(0, KK - 1), st.sampled_from(["invalid", "empty", "swapped", "outside"]))
def test_prop_invalid_boxes_change_nothing(case, k, how):
  boxes, scores, valid, g = _arrays(case)
  valid[0, k] = False
  before = np.asarray(_map(boxes, scores, valid, g))
  b2, v2 = boxes.copy(), valid.copy()
  x0, y0 = np.trunc(b2[0, k, 0]), np.trunc(b2[0, k, 1])
  if how == "invalid":
    b2[0, k] = [0, 0, WW, HH]
    scores = scores.copy()
    scores[0, k] = 1.0
  else:
    v2[0, k] = True
    if how == "empty":
      b2[0, k, 2] = x0 + 0.9 if x0 >= 0 else x0  # truncates to x0 (or equals it)
    elif how == "swapped":
      b2[0, k, 3] = y0 - 1
    else:
      b2[0, k] = [WW, 0, WW + 5, HH]  # right of the image
  np.testing.assert_array_equal(np.asarray(_map(b2, scores, v2, g)), before)


@settings(max_examples=150, deadline=None)
@given(_case, st.integers(0, KK - 1), st.floats(0, 2, width=32))
def test_prop_monotone_in_region_score(case, k, delta):
  boxes, scores, valid, g = _arrays(case)
  lo = np.asarray(_map(boxes, scores, valid, g))
  s2 = scores.copy()
  s2[0, k] = min(1.0, s2[0, k] + delta)
  hi = np.asarray(_map(boxes, s2, valid, g))
  assert np.all(hi >= lo)
