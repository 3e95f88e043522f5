"""Training images from files: SRUM's training transforms and host validation's decodability check.

    x, (w, h) = load_image(path, (H, W))                     # resized to (H, W), [-1, 1]
    x, (w, h) = load_canvas(path, (H, W), (1024, 512, 256))  # SRUM's aspect-keeping resize, padded
    tw, th = training_size((w, h), (H, W), resize)           # the size an image is trained at
    size, why = check_image(path)                            # (width, height) or (None, why)

Paths may be remote (gs://).
"""
from __future__ import annotations

import io
import os
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from srum_jax import paths
from srum_jax.models import image_transforms

__all__ = ["load_image", "training_size", "load_canvas", "check_image"]


def load_image(path: str, image_hw: Tuple[int, int]) -> Tuple[np.ndarray, Tuple[int, int]]:
  """PNG/JPEG -> (float32 [H, W, 3] in [-1, 1], original (width, height)). Bicubic (antialiased)
  resize to `image_hw` when the size differs; then (x / 255 - 0.5) / 0.5 as ToTensor +
  Normalize(0.5, 0.5), the official training transform. `path` may be remote (gs://)."""
  with Image.open(paths.readable(path)) as im:
    size = im.size
    im = im.convert("RGB")
    H, W = image_hw
    if im.size != (W, H):
      im = im.resize((W, H), Image.BICUBIC)
    x = np.asarray(im, np.float32)
  return (x / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5), size


def training_size(size: Tuple[int, int], image_hw: Tuple[int, int],
                  resize: Optional[Tuple[int, int, int]]) -> Tuple[int, int]:
  """(width, height) an image of `size` (width, height) is trained at: the canvas `image_hw` (H, W)
  without `resize`, else SRUM's training transform of it (`image_transforms.resize_dims`: the resize
  of its `data/transforms.py` `ImageTransform` with the sizes of `scripts/data/rft_comp.yaml`)."""
  if resize is None:
    return int(image_hw[1]), int(image_hw[0])
  return image_transforms.resize_dims(int(size[0]), int(size[1]), *(int(v) for v in resize))


def load_canvas(path: str, image_hw: Tuple[int, int], resize: Tuple[int, int, int]
                ) -> Tuple[np.ndarray, Tuple[int, int]]:
  """PNG/JPEG -> (float32 [H, W, 3] canvas, original (width, height)): the image resized by SRUM's
  training transform (`training_size`; bicubic, antialiased, [-1, 1]) at the top left of a zero
  canvas of `image_hw` (zero is mid grey in [-1, 1]; SRUM's collator pads a batch's images with
  zeros the same way). Raises ValueError when the resized image exceeds the canvas."""
  with Image.open(paths.readable(path)) as im:
    size = im.size
    x = image_transforms.transform_image(im, *(int(v) for v in resize))
  H, W = (int(v) for v in image_hw)
  if x.shape[0] > H or x.shape[1] > W:
    raise ValueError(f"{path}: resized to {x.shape[1]}x{x.shape[0]}, over the canvas {W}x{H}")
  out = np.zeros((H, W, 3), np.float32)
  out[:x.shape[0], :x.shape[1]] = x
  return out, size


def check_image(path: str) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
  """(width, height) of a fully decodable image, else (None, 'missing' | 'corrupt: why'). `path` may
  be remote (gs://: its bytes are read once)."""
  if paths.is_remote(path):
    try:
      data = paths.path(path).read_bytes()
    except FileNotFoundError:
      return None, "missing"
    source = lambda: io.BytesIO(data)  # noqa: E731
  elif not os.path.isfile(path):
    return None, "missing"
  else:
    source = lambda: path  # noqa: E731
  try:
    with Image.open(source()) as im:
      im.verify()  # chunk CRCs and structure
    with Image.open(source()) as im:
      im.load()  # every pixel decodes (truncated data raises)
      if im.size[0] <= 0 or im.size[1] <= 0:
        return None, "corrupt: empty image"
      return im.size, None
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb...)
    return None, f"corrupt: {type(e).__name__}: {e}"
