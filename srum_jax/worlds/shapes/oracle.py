"""The judge of the shapes world: reads objects back from pixels and checks a prompt's spec.

Independent of the renderer and of any model (it shares no code with either; only the four palette
colours are repeated here as constants), so it can score generations the way T2I-CompBench's
detectors score categories. From an RGB image:

1. Pixel classes. Brightness v = max(r, g, b). Pixels with v < `MIN_BRIGHTNESS` are background. The
   rest
   are compared by chromaticity, rgb / v, with the palette's chromaticities (red (1,0,0), green
   (0,1,0), blue (0,0,1), yellow (1,1,0)); the nearest wins if its distance is below
   `MAX_CHROMA_DIST`, else the pixel is background. Dividing by brightness makes the dim, blurred
   rims of a shape keep its colour.
2. Blobs. 8-connected components per colour (scipy.ndimage.label), each then cut at `HALF_MAX` of
   its
   own peak brightness (90th percentile of its v): the half-maximum contour of a blurred edge is
   where the sharp edge was, whatever the blob's overall brightness, and the cut separates blobs
   that blur joined. Pieces smaller than `MIN_AREA_FRAC` of the image (12 px at 32x32) are speckles
   and dropped.
3. Shapes (`shape_of`). Features (`shape_features`): fill = area / bounding-box area (square 1, disc
   pi/4,
   triangle 1/2); drop = (centroid row - box centre row) / box height (apex-up triangle 1/6, else
   0); diagonal = extent along the two diagonals over extent along the axes (square sqrt(2), disc 1,
   triangle ~1.06). The nearest of `SHAPE_PROTOTYPES` (weighted L2) names the shape. Two passes: the
   blob as it is decides whether it is a triangle (a triangle's thin apex is real structure); square
   vs circle is then decided on the blob without its 1-px-thin parts (`clean_blob`), because a stray
   rim row or a spur stretches the box a square's fill and diagonals are measured against and makes
   it read as a circle.
4. Judgement (`judge`). For each group of the spec the objects of its colour and shape are counted:
   exactly `count` when the group is `exact` (numeracy), at least `count` otherwise (objects of
   other kinds are ignored, as T2I-CompBench does). A relation (i, rel, j) holds if some `count_i`
   objects of group i and `count_j` objects of group j are pairwise in relation: "left" means
   centroid x smaller by more than `REL_MARGIN_FRAC` of the image side (4 px at 32), likewise right
   / above / below.

The spec is read by attribute: `spec.objects` (each `.color`, `.shape`, `.count`, `.exact`) and
`spec.relations` ((i, rel, j) with rel in left / right / above / below), as made by the grammar.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
from scipy import ndimage

# Palette (duplicated constants, deliberately not imported from the renderer).
COLOR_RGB = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
MIN_BRIGHTNESS = 64  # of 255: darker pixels are background (noise on black stays well below)
HALF_MAX = 0.5  # a blob keeps its pixels brighter than this fraction of its peak
# chromaticity distance to the nearest palette colour (orange is 0.5 from both)
MAX_CHROMA_DIST = 0.45
MIN_AREA_FRAC = 12 / (32 * 32)  # smaller components are speckles
REL_MARGIN_FRAC = 4 / 32  # centroids must differ by more than this fraction of the image side

# Shape prototypes (fill, drop, diagonal), between the exact shapes and their blurred, thresholded
# versions
# (blur cuts a triangle's apex: fill up, drop down; it rounds a square's corners: diagonal down).
# The
# weights are 1 / the typical spread of each feature, so each axis counts in units of its own noise.
SHAPE_PROTOTYPES = {
    "square": (0.98, 0.0, 1.33),
    "circle": (0.79, 0.0, 1.03),
    "triangle": (0.6, 0.1, 1.08),
}
SHAPE_WEIGHTS = (10.0, 33.0, 12.5)


class Detection(NamedTuple):
  color: str
  shape: str
  cx: float  # centroid, pixels (pixel centres at +0.5)
  cy: float
  area: int
  box: Tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
  features: Tuple[float, ...]  # the shape_features `shape_of` decided on


def to_uint8(image, value_range: Tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
  """uint8 [H, W, 3] from uint8, or from floats in `value_range` (the model's images are in [-1,
  1])."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
  if image.dtype == np.uint8:
    return image
  lo, hi = value_range
  x = (image.astype(np.float64) - lo) / (hi - lo)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def classify_pixels(image: np.ndarray) -> np.ndarray:
  """Int [H, W]: -1 background, else the index of the palette colour in `COLOR_RGB` order."""
  rgb = image.astype(np.float64)
  v = rgb.max(axis=-1)
  chroma = rgb / np.maximum(v, 1.0)[..., None]
  protos = np.array(list(COLOR_RGB.values()), np.float64) / 255.0
  dist = np.linalg.norm(chroma[..., None, :] - protos, axis=-1)  # [H, W, 4]
  label = dist.argmin(-1)
  ok = (v >= MIN_BRIGHTNESS) & (dist.min(-1) < MAX_CHROMA_DIST)
  return np.where(ok, label, -1)


def _blobs(mask: np.ndarray, v: np.ndarray, base: float, min_area: int):
  """Bool masks of the objects in one colour's pixel mask (components, each cut at its half maximum
  above the background level `base`)."""
  eight = np.ones((3, 3), bool)
  comp, n = ndimage.label(mask, structure=eight)
  for k in range(1, n + 1):
    blob = comp == k
    if blob.sum() < min_area:
      continue
    core = blob & (v - base >= HALF_MAX * (np.percentile(v[blob], 90) - base))
    pieces, m = ndimage.label(core, structure=eight)
    for j in range(1, m + 1):
      piece = pieces == j
      if piece.sum() >= min_area:
        yield piece


def clean_blob(mask: np.ndarray) -> np.ndarray:
  """The blob without its 1-px-thin parts: an opening by a 2x2 square removes rim rows, spurs and
  the bridges blur leaves to a neighbouring speckle, and keeps squares and discs whole (both are
  unions of 2x2 squares); the largest remaining component, cropped to its box. Blobs the opening
  would erase are kept as they are."""
  opened = ndimage.binary_opening(mask, structure=np.ones((2, 2), bool))
  comp, n = ndimage.label(opened)
  if n == 0:
    return mask
  keep = comp == 1 + int(np.argmax(ndimage.sum(opened, comp, range(1, n + 1))))
  ys, xs = np.nonzero(keep)
  return keep[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def shape_features(mask: np.ndarray) -> Tuple[float, float, float]:
  """(fill, drop, diagonal) of one component's bool mask cropped to its bounding box.

  fill: area / box area. drop: (centroid row - box centre row) / box height, > 0 for an apex-up
  triangle. diagonal: mean extent of the pixel centres projected on the two diagonals over the mean
  extent on the axes (extents include the pixel, +1): ~sqrt(2) for a square, ~1 for a disc, ~1.06
  for a triangle."""
  h, w = mask.shape
  ys, xs = np.nonzero(mask)
  fill = mask.mean()
  drop = (ys.mean() + 0.5 - h / 2) / h
  d1, d2 = (xs + ys) / np.sqrt(2), (xs - ys) / np.sqrt(2)
  diag = (np.ptp(d1) + np.ptp(d2) + 2) / (np.ptp(xs) + np.ptp(ys) + 2)
  return float(fill), float(drop), float(diag)


def classify_shape(
    features: Sequence[float], among: Sequence[str] = tuple(SHAPE_PROTOTYPES)) -> str:
  """The prototype in `among` nearest to the features (weighted L2)."""
  f = np.asarray(features) * SHAPE_WEIGHTS
  return min(among, key=lambda s: np.sum((f - np.asarray(SHAPE_PROTOTYPES[s]) * SHAPE_WEIGHTS)**2))


def shape_of(mask: np.ndarray) -> Tuple[str, Tuple[float, float, float]]:
  """(shape, features used) of one component's bool mask cropped to its box: triangle or not on the
  blob as it is, square vs circle on `clean_blob(mask)`."""
  features = shape_features(mask)
  if classify_shape(features) == "triangle":
    return "triangle", features
  features = shape_features(clean_blob(mask))
  return classify_shape(features, among=("square", "circle")), features


def detect(image, value_range: Tuple[float, float] = (-1.0, 1.0)) -> List[Detection]:
  """The objects in an image: colour, shape, centroid, area, box and shape features of each blob."""
  image = to_uint8(image, value_range)
  h, w, _ = image.shape
  labels = classify_pixels(image)
  v = image.max(axis=-1).astype(np.float64)
  base = float(np.percentile(v, 25))  # background level: objects never cover 3/4 of the canvas
  min_area = max(1, int(round(MIN_AREA_FRAC * h * w)))
  found = []
  for ci, color in enumerate(COLOR_RGB):
    for piece in _blobs(labels == ci, v, base, min_area):
      ys, xs = np.nonzero(piece)
      y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
      shape, feats = shape_of(piece[y0:y1, x0:x1])
      found.append(
          Detection(color=color, shape=shape, cx=float(xs.mean() + 0.5), cy=float(ys.mean() + 0.5),
                    area=int(piece.sum()), box=(int(x0), int(y0), int(x1), int(y1)),
                    features=feats))
  return found


def _related(a: Detection, b: Detection, rel: str, margin: float) -> bool:
  if rel == "left":
    return b.cx - a.cx > margin
  if rel == "right":
    return a.cx - b.cx > margin
  if rel == "above":
    return b.cy - a.cy > margin
  if rel == "below":
    return a.cy - b.cy > margin
  raise ValueError(f"unknown relation {rel!r}")


def check(detections: Sequence[Detection], spec, image_size: Tuple[int, int] = (32, 32)) -> bool:
  """Does a list of detections satisfy `spec` (objects: color / shape / count / exact;
  relations)?"""
  members = []
  for g in spec.objects:
    m = [d for d in detections if d.color == g.color and d.shape == g.shape]
    if len(m) < g.count or (g.exact and len(m) != g.count):
      return False
    members.append(m)
  margin = REL_MARGIN_FRAC * min(image_size)
  for i, rel, j in spec.relations:
    ni, nj = spec.objects[i].count, spec.objects[j].count
    if not any(all(_related(a, b, rel, margin) for a in si for b in sj)
               for si in itertools.combinations(members[i], ni)
               for sj in itertools.combinations(members[j], nj)):
      return False
  return True


def judge(image, spec, value_range: Tuple[float, float] = (-1.0, 1.0)) -> bool:
  """Does the image satisfy the prompt's spec? (uint8 [H, W, 3], or floats in `value_range`)."""
  image = to_uint8(image, value_range)
  return check(detect(image), spec, image.shape[:2])


def evaluate(images, prompts, value_range: Tuple[float, float] = (-1.0, 1.0)
             ) -> Dict[str, Tuple[int, int, float]]:
  """Per-category accuracy: {category: (correct, total, accuracy)} plus 'overall'.

  `prompts` are objects with `.category` and `.spec` (one per image)."""
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
  tally: Dict[str, List[int]] = {}
  for image, p in zip(images, prompts):
    ok = judge(image, p.spec, value_range)
    for key in (p.category, "overall"):
      t = tally.setdefault(key, [0, 0])
      t[0] += int(ok)
      t[1] += 1
  out = {k: (c, n, c / n) for k, (c, n) in tally.items() if k != "overall"}
  if "overall" in tally:
    c, n = tally["overall"]
    out["overall"] = (c, n, c / n)
  return out
