"""SAM automatic mask generation in JAX (`inference.sam_masks`) against the PyTorch path
(`pipeline.proposers.SamTorchProposer`) and NumPy statements of its steps; sharded == single device;
the `sam` proposer in the propose stage."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

from srum_jax import defaults, sharding
from srum_jax.convert import sam_to_flax
from srum_jax.inference import sam_masks
from srum_jax.pipeline import propose, proposers
from srum_jax.workdir import layout
from srum_jax.worlds import shapes

import helpers

torch = pytest.importorskip("torch")
F = torch.nn.functional

# Generator settings of the comparisons: 8 x 8 prompts, filters that keep part of the masks.
OPTIONS = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.6)


def box_iou(a, b) -> float:
  """IoU of two half-open [x0, y0, x1, y1] boxes."""
  iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def scenes(n: int, seed: int = 0):
  """n shapes-world renders: 32 x 32, and every third one padded to 32 x 48 (a non-square image)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    image = shapes.render(shapes.sample_scene(rng, shapes.sample_prompt(rng)))
    out.append(np.pad(image, ((0, 0), (0, 16), (0, 0))) if i % 3 == 2 else image)
  return out


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
  """A tiny transformers SamModel whose masks follow the image content (`helpers.random_sam`)."""
  from srum_jax.models import sam_config
  model = helpers.random_sam(sam_config.tiny(), seed=0, positions=False, mask_scale=50.0)
  return helpers.save_sam_dir(model, tmp_path_factory.mktemp("sam_hf"), 64)


def test_upscaling_matches_torch_interpolate():
  """Low-resolution logits -> image size, as the released post-processing (two bilinear resizes with
  a crop between) in PyTorch."""
  low = np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32)
  for h, w in ((32, 48), (100, 70), (64, 64)):
    rh, rw = sam_masks.input_size(h, w, 64)
    ref = F.interpolate(torch.tensor(low)[None], (64, 64), mode="bilinear", align_corners=False)
    ref = F.interpolate(ref[..., :rh, :rw], (h, w), mode="bilinear", align_corners=False)[0].numpy()
    taps_h, taps_w = sam_masks.upscale_taps(32, 64, rh, h), sam_masks.upscale_taps(32, 64, rw, w)
    ours = sam_masks._apply_taps(sam_masks._apply_taps(low, taps_h, -2), taps_w, -1)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)


def test_mask_stats_match_numpy():
  rng = np.random.default_rng(1)
  low = rng.normal(size=(6, 32, 32)).astype(np.float32) * 3
  low[0] = -10.0  # empty mask
  low[1, 5:9, 20:22] = 50.0
  low[1] -= 20.0  # one small blob
  taps = sam_masks.upscale_taps(32, 64, 64, 64), sam_masks.upscale_taps(32, 64, 43, 40)
  up = np.asarray(sam_masks._apply_taps(sam_masks._apply_taps(low, taps[0], -2), taps[1], -1))
  ref_bounds, ref_area = proposers.mask_bounds(up > 0.0)
  for rows in (64, 7, 1):  # one block; blocks with a padded last one; one row at a time
    area, stability, bounds = sam_masks.mask_stats(low, taps[0], taps[1], 0.0, 1.0,
                                                   rows_per_block=rows)
    np.testing.assert_array_equal(np.asarray(area), ref_area)
    np.testing.assert_array_equal(np.asarray(bounds), ref_bounds)
    np.testing.assert_allclose(np.asarray(stability), proposers.stability_score(up, 0.0, 1.0),
                               rtol=1e-6)
  assert ref_area[0] == 0 and 0 < ref_area[1] < 200


def test_greedy_nms_matches_numpy():
  """`greedy_nms` keeps exactly what `proposers.box_nms` keeps (duplicates, nested, degenerate
  boxes, tied scores), among the valid candidates."""
  rng = np.random.default_rng(2)
  for trial in range(20):
    n = 60
    xy = rng.integers(0, 40, (n, 2))
    wh = rng.integers(0, 12, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes[5] = boxes[4]
    scores = rng.choice(np.linspace(0, 1, 25), n).astype(np.float32)
    valid = rng.random(n) > 0.2
    thr = [0.3, 0.5, 0.7][trial % 3]
    keep = np.asarray(sam_masks.greedy_nms(boxes, scores, valid, thr))
    idx = np.nonzero(valid)[0]
    ref = idx[proposers.box_nms(boxes[idx], scores[idx], thr)]
    assert set(np.nonzero(keep)[0]) == set(ref.tolist())


def test_largest_orders_by_area_score_index():
  bounds = np.arange(24).reshape(6, 4).astype(np.int32)
  areas = np.array([5, 9, 9, 1, 9, 7], np.int32)
  scores = np.array([0.1, 0.5, 0.9, 0.3, 0.5, 0.2], np.float32)
  keep = np.array([1, 1, 1, 1, 1, 0], bool)
  b, a, s, n = (np.asarray(x) for x in sam_masks.largest(bounds, areas, scores, keep, 4))
  assert a.tolist() == [9, 9, 9, 5] and s.tolist() == pytest.approx([0.9, 0.5, 0.5, 0.1])
  assert b[:, 0].tolist() == [8, 4, 16, 0] and n == 5
  _, a, _, n = (np.asarray(x) for x in sam_masks.largest(bounds, areas, scores, keep, 8))
  assert a.tolist() == [9, 9, 9, 5, 1, -1, -1, -1] and n == 5


def _match(ref, got):
  """Fraction of `ref` regions with a `got` region of box IoU >= 0.95, and the unmatched ones."""
  missing = [r for r in ref if not any(box_iou(r.box, g.box) >= 0.95 for g in got)]
  return 1.0 - len(missing) / max(len(ref), 1), missing


def test_generator_matches_torch_path(sam_dir):
  """Every box after the filters and NMS (max_regions=None), shapes-world renders of two sizes, the
  same converted weights: >= 95% of the reference boxes have a JAX box with IoU >= 0.95 and vice
  versa (measured: all equal)."""
  images = scenes(8)
  ref = proposers.get_proposer("sam_torch", weights=sam_dir, max_regions=None, **OPTIONS)
  ours = proposers.get_proposer("sam", weights=sam_dir, max_regions=None, images_per_call=4,
                                points_per_batch=16, **OPTIONS)
  got = ours.propose_batch(images)
  total = 0
  for image, regions in zip(images, got):
    want = ref(image)
    total += len(want)
    assert len(regions) == len(want)
    for a, b in ((want, regions), (regions, want)):
      frac, missing = _match(a, b)
      assert frac >= 0.95, missing
    assert [(r.box, r.area) for r in regions] == [(r.box, r.area) for r in want]
    np.testing.assert_allclose([r.score for r in regions], [r.score for r in want], atol=1e-5)
  assert total >= 30  # the filters leave a real set of boxes (not all, not none)
  # the same proposer's top 5 (the stage's default) are the first 5 of the full list
  top = proposers.get_proposer("sam", weights=sam_dir, images_per_call=4, points_per_batch=16,
                               **OPTIONS)
  assert [[r.box for r in rs] for rs in top.propose_batch(images)] == \
      [[r.box for r in rs[:5]] for rs in got]


def test_sharded_equals_single_device(sam_dir):
  """8 images on 8 simulated devices (one per device) == the same images on one device."""
  cfg, params = sam_to_flax.load_sam(sam_dir)
  opts = sam_masks.MaskOptions(points_per_batch=32, max_boxes=8, **OPTIONS)
  images = scenes(8, seed=1)[:8]
  images = [im for im in images if im.shape == (32, 32, 3)] * 2
  images = images[:8]
  single = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  one = sam_masks.SamMaskGenerator(cfg, params, opts, mesh=single, images_per_call=8)
  eight = sam_masks.SamMaskGenerator(cfg, params, opts, mesh=sharding.make_mesh({"data": 8}),
                                     images_per_call=8)
  a, b = one(images), eight(images)
  assert sum(len(r.areas) for r in a) > 8
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.bounds, y.bounds)
    np.testing.assert_array_equal(x.areas, y.areas)
    np.testing.assert_allclose(x.scores, y.scores, atol=1e-6)
    assert x.total == y.total


def test_propose_stage_with_sam(sam_dir, tmp_path):
  """The stage with `propose.name=sam`: batches of 3 on a 2-device mesh, the same rows as the
  PyTorch proposer, resumable."""
  images = scenes(5, seed=3)
  gen = tmp_path / "generate"
  gen.mkdir()
  with open(gen / "metadata.jsonl", "w") as f:
    for i, image in enumerate(images):
      Image.fromarray(image).save(gen / f"{i}.png")
      f.write(json.dumps({"id": f"p{i}", "image_file": f"{i}.png", "prompt": "x"}) + "\n")
  cfg = defaults.base_config().propose
  cfg.batch_size = 3
  cfg.options.weights = sam_dir
  with cfg.options.unlocked():
    cfg.options.update(OPTIONS)
  rep = propose.propose(cfg, str(gen), str(tmp_path / "propose"),
                        mesh=sharding.make_mesh({"data": 2}, jax.devices()[:2]))
  assert rep.proposed == 5
  rows = {r["id"]: r["regions"] for r in layout.read_regions(str(tmp_path / "propose"))}
  ref = proposers.get_proposer("sam_torch", weights=sam_dir, max_regions=cfg.max_regions, **OPTIONS)
  for i, image in enumerate(images):
    assert rows[f"p{i}"] == [{"box": list(r.box), "area": r.area} for r in ref(image)]
  assert sum(len(v) for v in rows.values()) > 5
  again = propose.propose(cfg, str(gen), str(tmp_path / "propose"))
  assert again.skipped_done == 5 and again.proposed == 0
