"""Scenes of coloured shapes on a black canvas, and their exact (aliased) renderer.

A scene is a handful of `Obj`s, each a filled circle, square or triangle of one pure palette colour.
Coordinates are continuous pixels: pixel (row i, column j) covers [j, j+1) x [i, i+1) and is painted
when its centre (j + 0.5, i + 0.5) lies inside the shape. No anti-aliasing, so every painted pixel
carries an exact palette colour and the background is exactly black (what a tiny generative model
can learn and what the oracle can threshold). Every shape fills the `size` x `size` box centred on
(cx, cy):

  square    the whole box (fill ratio 1)
  circle    the inscribed disc (fill ratio ~ pi/4)
  triangle  apex at the top centre, base along the bottom edge (fill ratio ~ 1/2)
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import numpy as np

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")

# Pure, well separated palette colours (uint8 RGB). The background is black.
PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
palette = PALETTE
BACKGROUND = (0, 0, 0)


@dataclasses.dataclass(frozen=True)
class Obj:
  """One filled shape: `size` is the side of its bounding box in pixels, (cx, cy) the box centre."""
  shape: str
  color: str
  cx: float
  cy: float
  size: float

  def __post_init__(self):
    if self.shape not in SHAPES:
      raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
    if self.color not in PALETTE:
      raise ValueError(f"unknown colour {self.color!r}; expected one of {COLORS}")


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: Tuple[Obj, ...]
  height: int = 32
  width: int = 32

  def __post_init__(self):
    object.__setattr__(self, "objects", tuple(self.objects))


def object_mask(obj: Obj, height: int = 32, width: int = 32) -> np.ndarray:
  """Bool [H, W]: the pixels whose centres lie inside `obj`."""
  x = np.arange(width, dtype=np.float64)[None, :] + 0.5
  y = np.arange(height, dtype=np.float64)[:, None] + 0.5
  half = obj.size / 2.0
  dx, dy = x - obj.cx, y - obj.cy
  if obj.shape == "square":
    return (np.abs(dx) < half) & (np.abs(dy) < half)
  if obj.shape == "circle":
    return dx * dx + dy * dy < half * half
  # Triangle: vertical extent [-half, half); half-width grows linearly from 0 at the apex to `half`.
  t = (dy + half) / obj.size  # 0 at the apex, 1 at the base
  return (t >= 0) & (t < 1) & (np.abs(dx) < half * t)


def object_box(obj: Obj, height: int = 32, width: int = 32) -> Tuple[int, int, int, int]:
  """Tight pixel box [x0, y0, x1, y1] of the painted pixels (x1, y1 exclusive, like slicing)."""
  ys, xs = np.nonzero(object_mask(obj, height, width))
  if ys.size == 0:
    return (0, 0, 0, 0)
  return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def scene_masks(scene: Scene) -> np.ndarray:
  """Bool [N, H, W], one mask per object."""
  if not scene.objects:
    return np.zeros((0, scene.height, scene.width), bool)
  return np.stack([object_mask(o, scene.height, scene.width) for o in scene.objects])


def scene_boxes(scene: Scene) -> np.ndarray:
  """Int [N, 4] ground-truth boxes [x0, y0, x1, y1] (x1, y1 exclusive), one per object."""
  return np.array([object_box(o, scene.height, scene.width) for o in scene.objects],
                  dtype=np.int32).reshape(-1, 4)


def render(scene: Scene) -> np.ndarray:
  """uint8 [H, W, 3]: black canvas, each object painted in its exact palette colour (later on
  top)."""
  image = np.zeros((scene.height, scene.width, 3), np.uint8)
  for obj in scene.objects:
    image[object_mask(obj, scene.height, scene.width)] = PALETTE[obj.color]
  return image


def min_gap(scene: Scene) -> float:
  """Smallest Chebyshev gap in pixels between the painted boxes of two objects (inf if < 2 objects).

  A gap of g >= 1 means at least g background pixels separate the two boxes along x or along y, so
  the objects are distinct connected components (also under 8-connectivity)."""
  boxes = scene_boxes(scene)
  best = float("inf")
  for a in range(len(boxes)):
    for b in range(a + 1, len(boxes)):
      (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
      gx = max(bx0 - ax1, ax0 - bx1)
      gy = max(by0 - ay1, ay0 - by1)
      best = min(best, float(max(gx, gy)))
  return best
