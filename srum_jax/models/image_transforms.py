"""Image preprocessing (docs/bagel.md, "Image transforms"): stride-aligned resize, [-1, 1] range, ViT patchify,
and the save-time crop of SRUM's generated images.

Host-side helpers (NumPy / PIL) that run in the data pipeline; `vit_patchify` also works on jax arrays.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from PIL import Image

VIT_MAX_PIXELS = 14 * 14 * 9 * 1024  # 1806336, the default pixel budget of ImageTransform

# (max_size, min_size, stride) presets of the official ImageTransform.
VAE_TRANSFORM = (1024, 512, 16)
VIT_TRANSFORM = (980, 224, 14)
SRUM_VAE_TRANSFORM = (1024, 512, 256)


def _make_div(v: int, stride: int) -> int:
  """Nearest multiple of `stride` (Python round, half to even), at least `stride`."""
  return max(stride, int(round(v / stride)) * stride)


def _scaled(w: int, h: int, scale: float, stride: int) -> Tuple[int, int]:
  return _make_div(round(w * scale), stride), _make_div(round(h * scale), stride)


def resize_dims(w: int, h: int, max_size: int, min_size: int, stride: int,
                max_pixels: int = VIT_MAX_PIXELS) -> Tuple[int, int]:
  """(new_w, new_h) of ImageTransform's resize, exactly the official rule.

  Long edge capped at max_size (never upscaled for that), short edge raised to min_size, both rounded to a
  multiple of `stride`; then a pixel-budget pass whose factor is the area ratio used as a linear scale (as
  the official code does), then a final long-edge cap. Python `round` (half to even) throughout.
  """
  scale = min(max_size / max(w, h), 1.0)
  scale = max(scale, min_size / min(w, h))
  new_w, new_h = _scaled(w, h, scale, stride)
  if new_w * new_h > max_pixels:
    new_w, new_h = _scaled(new_w, new_h, max_pixels / (new_w * new_h), stride)
  if max(new_w, new_h) > max_size:
    new_w, new_h = _scaled(new_w, new_h, max_size / max(new_w, new_h), stride)
  return new_w, new_h


def resize_image(img, max_size: int, min_size: int, stride: int, max_pixels: int = VIT_MAX_PIXELS):
  """RGB PIL image resized to `resize_dims` with PIL bicubic.

  PIL's `Image.resize(..., BICUBIC)` filters with a support widened by the downscale factor (antialiased);
  that is exactly what torchvision's `F.resize(pil_image, size, BICUBIC, antialias=True)` calls for PIL
  inputs, so the pixels match the official pipeline.
  """
  img = img.convert("RGB")
  new_w, new_h = resize_dims(img.width, img.height, max_size, min_size, stride, max_pixels)
  if (new_w, new_h) == img.size:
    return img
  return img.resize((new_w, new_h), Image.BICUBIC)


def to_model_range(image_uint8) -> np.ndarray:
  """uint8 HWC -> float32 in [-1, 1] (ToTensor then Normalize(mean 0.5, std 0.5) per channel)."""
  x = np.asarray(image_uint8, dtype=np.float32) / 255.0
  return (x - 0.5) / 0.5


def transform_image(img, max_size: int, min_size: int, stride: int,
                    max_pixels: int = VIT_MAX_PIXELS) -> np.ndarray:
  """PIL image -> resized float32 HWC array in [-1, 1] (the whole ImageTransform)."""
  return to_model_range(resize_image(img, max_size, min_size, stride, max_pixels))


def content_box(image_uint8):
  """(left, top, right, bottom) of the pixels with any non-zero channel (PIL `Image.getbbox` of an RGB
  image: right / bottom exclusive), or None for an all-black image."""
  x = np.asarray(image_uint8)
  mask = x.any(axis=-1) if x.ndim == 3 else x != 0
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  if rows.size == 0:
    return None
  return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_to_content(image_uint8) -> np.ndarray:
  """The image cropped to its `content_box` (an all-black image unchanged): how SRUM's
  `srum_data_infer/t2i.py` `main` saves every generated image (`generate.crop_to_content`)."""
  box = content_box(image_uint8)
  if box is None:
    return np.asarray(image_uint8)
  left, top, right, bottom = box
  return np.asarray(image_uint8)[top:bottom, left:right]


def vit_patchify(image_hwc, patch_size: int = 14):
  """[H, W, 3] -> [(H/p) * (W/p), p*p*3]: patches row-major, features (row-in-patch, col-in-patch, channel)."""
  H, W, c = image_hwc.shape
  hp, wp = H // patch_size, W // patch_size
  x = image_hwc.reshape(hp, patch_size, wp, patch_size, c)
  x = x.transpose(0, 2, 1, 3, 4)  # [hp, wp, row, col, c]
  return x.reshape(hp * wp, patch_size * patch_size * c)


def square_view(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 image -> PIL bicubic resize to size x size (a multiple of the ViT patch, 14): the judge's view of
  small synthetic images (the judge's `vit_image_size`), and what pretraining shows the judge."""
  if size % 14:
    raise ValueError(f"score.vit_image_size must be a multiple of 14, got {size}")
  return np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((size, size), Image.BICUBIC))

