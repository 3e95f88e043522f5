"""Region proposers: exact objects on synthetic scenes, the shared post-processing, SAM code path."""
import numpy as np
import pytest

from srum_jax.pipeline import proposers

H, W = 64, 96


def _disk(cy, cx, r):
  yy, xx = np.mgrid[:H, :W]
  return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _scene():
  """Black image with known objects; returns (image, [(mask, name)])."""
  img = np.zeros((H, W, 3), np.uint8)
  objects = []

  def put(mask, colour, name):
    img[mask] = colour
    objects.append((mask, name))

  m = np.zeros((H, W), bool)
  m[5:25, 10:40] = True
  put(m, (255, 0, 0), "red rect")  # 600 px
  m = np.zeros((H, W), bool)
  m[5:25, 40:52] = True
  put(m, (0, 255, 0), "green rect touching red")  # 240 px
  put(_disk(45, 20, 8), (0, 0, 255), "blue disk")  # 197 px
  m = np.zeros((H, W), bool)
  m[60, 5:25] = True
  put(m, (255, 255, 255), "one-pixel line")  # 20 px, height 1
  m = np.zeros((H, W), bool)
  m[2:5, 80:83] = True
  put(m, (255, 255, 0), "yellow speck")  # 9 px
  for x in (60, 80):  # same colour twice, not connected: two objects
    m = np.zeros((H, W), bool)
    m[40:50, x:x + 10] = True
    put(m, (200, 0, 200), f"magenta square at x={x}")  # 100 px each
  img[30:34, 70:74] = (10, 10, 10)  # dim patch: background at the default threshold
  return img, objects


def _expected(objects, box_mode):
  rows = []
  for mask, _ in objects:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
    if box_mode == "half_open":
      x1, y1 = x1 + 1, y1 + 1
    else:  # inclusive last pixel; one-pixel-thick masks widened by one
      x1, y1 = (x1 + 1 if x1 == x0 else x1), (y1 + 1 if y1 == y0 else y1)
    rows.append(((int(x0), int(y0), int(x1), int(y1)), int(mask.sum())))
  order = np.argsort([-a for _, a in rows], kind="stable")
  return [rows[i] for i in order]


def _check_well_formed(regions, h, w, max_regions=None):
  if max_regions is not None:
    assert len(regions) <= max_regions
  areas = [r.area for r in regions]
  assert areas == sorted(areas, reverse=True)
  for r in regions:
    x0, y0, x1, y1 = r.box
    assert all(isinstance(v, int) for v in r.box) and isinstance(r.area, int)
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, r
    assert 1 <= r.area <= (x1 - x0 + 1) * (y1 - y0 + 1)


@pytest.mark.parametrize("box_mode", ["half_open", "official"])
def test_components_exact_objects(box_mode):
  img, objects = _scene()
  regions = proposers.get_proposer("components", max_regions=None, box_mode=box_mode)(img)
  assert [(r.box, r.area) for r in regions] == _expected(objects, box_mode)
  assert all(r.score is None for r in regions)


def test_components_top_k_min_area_and_background_threshold():
  img, objects = _scene()
  expected = _expected(objects, "half_open")
  top2 = proposers.get_proposer("components", max_regions=2, box_mode="half_open")(img)
  assert [(r.box, r.area) for r in top2] == expected[:2]
  default = proposers.get_proposer("components", box_mode="half_open")(img)  # max_regions defaults to 5
  assert [(r.box, r.area) for r in default] == expected[:5]
  # min_area as pixels (>= 1) and as a fraction of the image (< 1): 200 / 6144 of the image
  for min_area in (200, 200 / (H * W)):
    got = proposers.get_proposer("components", max_regions=None, min_area=min_area, box_mode="half_open")(img)
    assert [(r.box, r.area) for r in got] == [e for e in expected if e[1] >= 200]
  assert len([e for e in expected if e[1] >= 200]) == 2
  # a lower background threshold turns the dim 4x4 patch into an object
  low = proposers.get_proposer("components", max_regions=None, background_threshold=5, box_mode="half_open")(img)
  assert ((70, 30, 74, 34), 16) in [(r.box, r.area) for r in low]
  assert len(low) == len(expected) + 1


def test_grid_tiles_image():
  h, w = 10, 14
  img = np.zeros((h, w, 3), np.uint8)
  for mode in ("half_open", "official"):
    regions = proposers.get_proposer("grid", k=3, max_regions=None, box_mode=mode)(img)
    assert len(regions) == 9
    cover = np.zeros((h, w), int)
    for r in regions:
      x0, y0, x1, y1 = r.box
      if mode == "official":
        x1, y1 = x1 + 1, y1 + 1
      cover[y0:y1, x0:x1] += 1
      assert r.area == (x1 - x0) * (y1 - y0)
    np.testing.assert_array_equal(cover, 1)  # every pixel in exactly one cell
    _check_well_formed(regions, h, w)
  assert len(proposers.get_proposer("grid", k=3)(img)) == 5  # default max_regions
  grid = proposers.get_proposer("grid", k=4, max_regions=None)
  assert len(grid(np.zeros((2, 3, 3), np.uint8))) == 6  # empty cells dropped


def test_felzenszwalb_valid_boxes_and_exact_objects():
  img, objects = _scene()
  rng = np.random.default_rng(0)
  noisy = np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
  regions = proposers.get_proposer("felzenszwalb")(noisy)
  assert 1 <= len(regions) <= 5
  _check_well_formed(regions, H, W, max_regions=5)
  # without smoothing, flat objects on black are segments of their own (plus the background)
  exact = proposers.get_proposer("felzenszwalb", sigma=0.0, min_size=5, scale=100.0, max_regions=None,
                         box_mode="half_open")(img[:, :, :])
  got = [(r.box, r.area) for r in exact]
  assert ((10, 5, 40, 25), 600) in got and ((12, 37, 29, 54), 197) in got
  assert sum(r.area for r in exact) == H * W  # the segments partition the image


def test_mask_bounds_matches_brute_force():
  rng = np.random.default_rng(1)
  masks = rng.random((20, 13, 17)) < rng.random((20, 1, 1)) * 0.05
  masks[3] = False
  bounds, areas = proposers.mask_bounds(masks)
  for m, b, a in zip(masks, bounds, areas):
    assert a == m.sum()
    if a == 0:
      assert tuple(b) == (0, 0, 0, 0)
    else:
      ys, xs = np.nonzero(m)
      assert tuple(b) == (xs.min(), ys.min(), xs.max(), ys.max())
  labels = rng.integers(3, 9, (13, 17))
  ids, lb, la = proposers.label_bounds(labels, background=5)
  assert 5 not in ids
  for i, b, a in zip(ids, lb, la):
    m = labels == i
    assert a == m.sum() and tuple(b) == tuple(proposers.mask_bounds(m)[0][0])


def test_postprocess_sort_stable_clip_and_options():
  bounds = np.array([[0, 0, 3, 3], [-5, -5, 200, 200], [2, 2, 4, 4], [7, 1, 7, 1], [1, 1, 2, 2]])
  areas = np.array([10, 50, 10, 1, 0])
  scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
  regions = proposers.postprocess(proposers.Candidates(bounds, areas, scores), (8, 9), max_regions=None)
  assert [r.box for r in regions] == [(0, 0, 8, 7), (0, 0, 3, 3), (2, 2, 4, 4), (7, 1, 8, 2)]
  assert [r.score for r in regions] == [0.2, 0.1, 0.3, 0.4]  # equal areas keep input order; area 0 dropped
  half = proposers.postprocess(proposers.Candidates(bounds, areas), (8, 9), max_regions=None, box_mode="half_open")
  assert [r.box for r in half] == [(0, 0, 9, 8), (0, 0, 4, 4), (2, 2, 5, 5), (7, 1, 8, 2)]
  assert proposers.postprocess(proposers.Candidates(bounds, areas), (8, 9), max_regions=0) == []
  assert len(proposers.postprocess(proposers.Candidates(bounds, areas), (8, 9), min_area=10)) == 3
  assert len(proposers.postprocess(proposers.Candidates(bounds, areas), (8, 9), min_area=0.5)) == 1  # 36 px of 72
  with pytest.raises(ValueError):
    proposers.postprocess(proposers.Candidates(bounds, areas), (8, 9), box_mode="xywh")
  with pytest.raises(ValueError):
    proposers.min_area_pixels(-1, 10)
  regions = proposers.masks_to_regions(np.eye(4, dtype=bool)[None], scores=[0.7])
  assert regions == [proposers.Region(box=(0, 0, 3, 3), area=4, score=0.7)]
  assert regions[0].to_dict() == {"box": [0, 0, 3, 3], "area": 4, "score": 0.7}


def test_registry_and_input_checks():
  assert set(proposers.available_proposers()) >= {"sam", "sam_torch", "felzenszwalb", "components",
                                                  "grid"}
  with pytest.raises(ValueError, match="available"):
    proposers.get_proposer("nope")
  grid = proposers.get_proposer("grid")
  assert isinstance(grid, proposers.Proposer)
  for bad in (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8)):
    with pytest.raises(ValueError):
      grid(bad)


def test_sam_helpers():
  np.testing.assert_allclose(proposers.point_grid(2), [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
  assert proposers.point_grid(32).shape == (1024, 2)
  logits = np.zeros((3, 2, 2))
  logits[0] = [[2.0, 0.5], [-2.0, -0.5]]  # > 1: 1 px, > -1: 3 px
  logits[2] = -5.0  # empty union
  np.testing.assert_allclose(proposers.stability_score(logits, 0.0, 1.0), [1 / 3, 0.0, 0.0])
  boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 5], [5, 5, 5, 5]])
  scores = np.array([0.5, 0.9, 0.8, 0.7, 0.1])
  # IoU(1, 0) = 81/100 > 0.7 -> 0 dropped; IoU(3, 1) = 36/(50+81-36) < 0.7 -> kept; degenerate box kept
  np.testing.assert_array_equal(proposers.box_nms(boxes, scores, 0.7), [1, 2, 3, 4])
  np.testing.assert_array_equal(proposers.box_nms(boxes, scores, 0.3), [1, 2, 4])


@pytest.fixture(scope="module")
def tiny_sam_dir(tmp_path_factory):
  """A tiny randomly initialised SamModel (64 px input) saved with its processor config."""
  torch = pytest.importorskip("torch")
  from transformers import SamConfig, SamImageProcessorPil, SamModel, SamProcessor

  cfg = SamConfig(
    vision_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2,
                       image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=32,
                       num_pos_feats=4),
    prompt_encoder_config=dict(hidden_size=8, image_size=64, patch_size=8, mask_input_channels=4),
    mask_decoder_config=dict(hidden_size=8, mlp_dim=16, num_hidden_layers=1, num_attention_heads=2,
                             iou_head_hidden_dim=8))
  torch.manual_seed(0)
  path = tmp_path_factory.mktemp("sam_tiny")
  SamModel(cfg).save_pretrained(path)
  processor = SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
  SamProcessor(image_processor=processor).save_pretrained(path)
  return path


def test_sam_tiny_random_model(tiny_sam_dir):
  img, _ = _scene()
  weights = str(tiny_sam_dir)
  sam = proposers.get_proposer("sam_torch", weights=weights, points_per_side=3, points_per_batch=4)
  assert isinstance(sam, proposers.SamTorchProposer)
  _check_well_formed(sam(img), H, W, max_regions=5)
  # permissive filters: arbitrary masks survive, still well-formed, scores are the predicted IoUs
  loose = proposers.get_proposer("sam_torch", weights=weights, points_per_side=3,
                                 points_per_batch=4, pred_iou_thresh=-np.inf,
                                 stability_score_thresh=0.0,
                                 box_nms_thresh=1.0, max_regions=None)
  regions = loose(img)
  _check_well_formed(regions, H, W)
  assert all(isinstance(r.score, float) for r in regions)
  # mask threshold far below every logit: all 27 masks cover the whole image; NMS keeps exactly one
  full = proposers.get_proposer("sam_torch", weights=weights, points_per_side=3, points_per_batch=4,
                                pred_iou_thresh=-np.inf, mask_threshold=-1e9)(img)
  assert [(r.box, r.area) for r in full] == [((0, 0, W - 1, H - 1), H * W)]
  none = proposers.get_proposer("sam_torch", weights=weights, points_per_side=3,
                                pred_iou_thresh=np.inf, mask_threshold=-1e9)(img)
  assert none == []


class _Recorder:
  """Wraps a SamModel: records the point prompts and predicted IoUs of every decoder call."""

  def __init__(self, model):
    self.model, self.points, self.ious = model, [], []

  def get_image_embeddings(self, pixel_values):
    return self.model.get_image_embeddings(pixel_values)

  def __call__(self, **kwargs):
    out = self.model(**kwargs)
    self.points.append(kwargs["input_points"].numpy().copy())
    self.ious.append(out.iou_scores.float().numpy().reshape(-1))
    return out


def test_sam_prompts_and_iou_filter(tiny_sam_dir):
  img, _ = _scene()  # 64 x 96 -> model input 43 x 64 (longest side 64)
  sam = proposers.get_proposer("sam_torch", weights=str(tiny_sam_dir), points_per_side=3,
                               points_per_batch=4, pred_iou_thresh=0.0, mask_threshold=-1e9,
                               box_nms_thresh=1.0, max_regions=None)
  sam.model = rec = _Recorder(sam.model)
  regions = sam(img)
  assert [p.shape for p in rec.points] == [(1, 4, 1, 2), (1, 4, 1, 2), (1, 1, 1, 2)]
  side = np.array([1 / 6, 1 / 2, 5 / 6])
  expected = np.stack(np.meshgrid(side * 96 * (64 / 96), side * 64 * (43 / 64)), -1).reshape(-1, 2)
  np.testing.assert_allclose(np.concatenate([p.reshape(-1, 2) for p in rec.points]), expected, rtol=1e-6)
  ious = np.concatenate(rec.ious)  # 9 points x 3 masks, all masks full: only the IoU filter decides
  assert len(ious) == 27 and 0 < (ious > 0).sum() < 27
  assert sorted(r.score for r in regions) == pytest.approx(sorted(ious[ious > 0].tolist()))
  assert {(r.box, r.area) for r in regions} == {((0, 0, W - 1, H - 1), H * W)}


def test_sam_missing_directory(tmp_path):
  missing = tmp_path / "no_such_sam"
  with pytest.raises(FileNotFoundError, match="no_such_sam"):
    proposers.get_proposer("sam_torch", weights=str(missing))
  with pytest.raises(FileNotFoundError, match="config.json"):
    proposers.get_proposer("sam_torch", weights=str(tmp_path))
