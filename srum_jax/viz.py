"""Pictures of a run with PIL only: image grids, reward-map overlays, loss curves, atomic PNG
writes.

    grid = image_grid(images_uint8, ncols=4, pad=2, captions=prompts)         # PIL.Image
    table = labeled_grid([[im, ...], ...], column_titles=prompts, row_titles=models,
                         # small images upscaled
                         cell_captions=[["ok", ...], ...], min_tile=160)
    # uint8 [6H, 6W, 3]
    over = overlay_reward_map(image_uint8, rmap, boxes=boxes, scores=scores, scale=6)
    loss_curve_png({"loss": [(step, value), ...]}, "workdir/loss.png")
    files.save_png("workdir/samples/step_100.png", grid)

Reward colours are a red -> green ramp: 0 (or -1 for a signed map) is pure red, 1 pure green.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from srum_jax import files

__all__ = [
    "to_uint8", "reward_colors", "image_grid", "upscale_nearest", "labeled_grid",
    "overlay_reward_map", "loss_curve_png"
]

# legend / series colours (RGB), cycled
PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127))


def to_uint8(images) -> np.ndarray:
  """Float images in [-1, 1] -> uint8 (clip(x*0.5+0.5) * 255, truncated, as the official
  inferencer); NaN -> 0."""
  x = np.clip(np.nan_to_num(np.asarray(images, np.float32) * 0.5 + 0.5, nan=0.0), 0.0, 1.0)
  return (x * 255.0).astype(np.uint8)


def reward_colors(values) -> np.ndarray:
  """Values in [0, 1] -> float RGB [..., 3] on the red -> green ramp (NaN -> grey)."""
  v = np.asarray(values, np.float32)
  nan = ~np.isfinite(v)
  v = np.clip(np.where(nan, 0.5, v), 0.0, 1.0)
  rgb = np.stack([255.0 * (1.0 - v), 255.0 * v, np.zeros_like(v)], axis=-1)
  return np.where(nan[..., None], 128.0, rgb)


def _font(size: Optional[int] = None):
  """PIL's bundled font: the bitmap default, or the scalable one at `size` pixels."""
  return ImageFont.load_default() if size is None else ImageFont.load_default(size=size)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> Tuple[int, int]:
  x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
  return x1 - x0, y1 - y0


def _fit_text(draw, text: str, font, width: int) -> str:
  """`text` cut (with an ellipsis) to fit `width` pixels."""
  if _text_size(draw, text, font)[0] <= width:
    return text
  while text and _text_size(draw, text + "...", font)[0] > width:
    text = text[:-1]
  return text + "..." if text else ""


def image_grid(images, ncols: int, pad: int = 2, captions: Optional[Sequence[str]] = None,
               background=(255, 255, 255)) -> Image.Image:
  """uint8 [N, H, W, 3] -> one PIL image: `ncols` columns, `pad` pixels of `background` around and
  between the tiles; with `captions`, a line of text (PIL's default font, cut to the tile width)
  under each tile."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"image_grid needs uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
  N, H, W, _ = images.shape
  ncols = max(1, min(int(ncols), N))
  nrows = max(1, math.ceil(N / ncols))
  font = _font()
  cap_h = 0
  if captions is not None:
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cap_h = _text_size(probe, "Ag", font)[1] + 4
  tile_h = H + cap_h
  canvas = Image.new("RGB", (pad + ncols * (W + pad), pad + nrows * (tile_h + pad)),
                     tuple(background))
  draw = ImageDraw.Draw(canvas)
  for i in range(N):
    r, c = divmod(i, ncols)
    x, y = pad + c * (W + pad), pad + r * (tile_h + pad)
    canvas.paste(Image.fromarray(images[i]), (x, y))
    if captions is not None and i < len(captions):
      draw.text((x, y + H + 1), _fit_text(draw, str(captions[i]), font, W), fill=(0, 0, 0),
                font=font)
  return canvas


def upscale_nearest(image, min_size: int) -> np.ndarray:
  """uint8 [H, W, C] enlarged by the smallest integer factor that makes its short side >= `min_size`
  (nearest neighbour: every pixel becomes a square block, nothing is blurred)."""
  image = np.asarray(image)
  factor = max(1, -(-int(min_size) // max(1, min(image.shape[:2]))))
  return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1) if factor > 1 else image


def _wrap(draw, text: str, font, width: int, max_lines: int = 4) -> list:
  """`text` broken at spaces into lines of at most `width` pixels (a word too long is cut), at most
  `max_lines` lines (the last one ending in an ellipsis when text remains)."""
  lines, line = [], ""
  for word in str(text).split():
    trial = f"{line} {word}".strip()
    if _text_size(draw, trial, font)[0] <= width or not line:
      line = trial if _text_size(draw, trial, font)[0] <= width else _fit_text(
          draw, trial, font, width)
    else:
      lines.append(line)
      line = _fit_text(draw, word, font, width)
  if line:
    lines.append(line)
  if len(lines) > max_lines:
    lines = lines[:max_lines - 1] + [
        _fit_text(draw, lines[max_lines - 1] + " " + " ".join(lines[max_lines:]) + "...", font,
                  width)
    ]
  return lines


def _tile(image, min_tile: int, max_tile: int) -> np.ndarray:
  """Small images upscaled (nearest neighbour) to >= `min_tile`, large ones shrunk (Lanczos) to
  <= `max_tile`."""
  image = upscale_nearest(image, min_tile)
  h, w = image.shape[:2]
  if max(h, w) <= max_tile:
    return image
  s = max_tile / max(h, w)
  return np.asarray(
      Image.fromarray(image).resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS))


def labeled_grid(cells: Sequence[Sequence[np.ndarray]], column_titles: Sequence[str],
                 row_titles: Optional[Sequence[str]] = None,
                 cell_captions: Optional[Sequence[Sequence[str]]] = None, min_tile: int = 160,
                 max_tile: int = 256, pad: int = 8, font_size: int = 13,
                 title: str = "") -> Image.Image:
  """A table of images a person can read: rows x columns of uint8 images, small ones upscaled
  (nearest neighbour) to at least `min_tile` pixels and large ones shrunk to at most `max_tile`,
  each column headed by its (wrapped) title, each row named on the left, each image captioned
  underneath (a caption may hold several lines separated by newlines). Every tile takes the size of
  the first."""
  font = _font(font_size)
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  line_h = _text_size(probe, "Ag", font)[1] + 4
  tiles = [[_tile(im, min_tile, max_tile) for im in row] for row in cells]
  th, tw = tiles[0][0].shape[:2]
  left = pad + (
      max(_text_size(probe, str(t), font)[0] for t in row_titles) + pad if row_titles else 0)
  heads = [_wrap(probe, t, font, tw) for t in column_titles]
  head_h = max((len(h) for h in heads), default=0) * line_h + pad
  caps = [
      [str(c).split("\n") for c in row] for row in (cell_captions or [[""] * len(r) for r in tiles])
  ]
  cap_h = max((len(c) for row in caps for c in row), default=0) * line_h
  top = pad + (line_h + pad if title else 0)
  ncols = max(len(r) for r in tiles)
  canvas = Image.new(
      "RGB", (left + ncols * (tw + pad), top + head_h + len(tiles) * (th + cap_h + pad) + pad),
      (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  if title:
    draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
  for c, lines in enumerate(heads):
    for k, line in enumerate(lines):
      draw.text((left + c * (tw + pad), top + k * line_h), line, fill=(0, 0, 0), font=font)
  for r, row in enumerate(tiles):
    y = top + head_h + r * (th + cap_h + pad)
    if row_titles:
      draw.text((pad, y + th // 2 - line_h // 2), str(row_titles[r]), fill=(0, 0, 0), font=font)
    for c, tile in enumerate(row):
      x = left + c * (tw + pad)
      canvas.paste(Image.fromarray(tile).resize((tw, th), Image.NEAREST), (x, y))
      for k, line in enumerate(caps[r][c] if c < len(caps[r]) else []):
        draw.text((x, y + th + 2 + k * line_h), _fit_text(draw, line, font, tw), fill=(0, 0, 0),
                  font=font)
  return canvas


def overlay_reward_map(image, rmap, boxes=None, scores=None, alpha: float = 0.45,
                       signed: Optional[bool] = None, scale: int = 1) -> np.ndarray:
  """Blend a reward map over an image: out = (1 - alpha) * image + alpha * ramp(rmap), uint8 [H, W,
  3].

  `rmap` [H, W] in [0, 1], or in [-1, 1] when `signed` (None: signed iff it has negative values),
  shown as (r + 1) / 2. Boxes [K, 4] (x_min, y_min, x_max, y_max pixels) are outlined in their
  score's colour (score in [-1, 1] -> (s + 1) / 2 on the ramp) with the score written at the
  top-left corner on a dark label. `scale` > 1 enlarges image, map and boxes by that factor first
  (nearest neighbour), so the labels are legible on small images (font and line width grow with it).
  """
  image = np.asarray(image)
  rmap = np.asarray(rmap, np.float32)
  if image.shape[:2] != rmap.shape:
    raise ValueError(f"image {image.shape} and reward map {rmap.shape} differ in size")
  scale = max(1, int(scale))
  if scale > 1:
    image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    rmap = np.repeat(np.repeat(rmap, scale, axis=0), scale, axis=1)
    boxes = None if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4) * scale
  if signed is None:
    signed = bool(np.nanmin(rmap) < 0) if np.isfinite(rmap).any() else False
  v = (rmap + 1.0) / 2.0 if signed else rmap
  out = (1.0 - alpha) * image.astype(np.float32) + alpha * reward_colors(v)
  out = np.clip(np.round(out), 0, 255).astype(np.uint8)
  if boxes is None:
    return out
  pil = Image.fromarray(out)
  draw = ImageDraw.Draw(pil)
  font = _font() if scale == 1 else _font(max(10, 2 * scale + 4))
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  scores = None if scores is None else np.asarray(scores, np.float32).reshape(-1)
  for k, (x0, y0, x1, y1) in enumerate(boxes):
    if not np.all(np.isfinite([x0, y0, x1, y1])) or x0 >= x1 or y0 >= y1:
      continue
    s = None if scores is None else float(scores[k])
    color = (255, 255, 255) if s is None else tuple(int(c) for c in reward_colors((s + 1.0) / 2.0))
    draw.rectangle([int(x0), int(y0), int(x1) - 1, int(y1) - 1], outline=color, width=max(
        1, scale // 3))
    if s is not None:
      label, at = f"{s:+.2f}", (int(x0) + 2 + scale // 3, int(y0) + 1 + scale // 3)
      if scale > 1:  # a label in the score's colour with dark text
        x0b, y0b, x1b, y1b = draw.textbbox(at, label, font=font)
        draw.rectangle([x0b - 1, y0b - 1, x1b + 1, y1b + 1], fill=color)
      draw.text(at, label, fill=(0, 0, 0) if scale > 1 else color, font=font)
  return np.asarray(pil)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> np.ndarray:
  """About n round tick values covering [lo, hi] (1, 2, 5 x 10^k steps)."""
  if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
    return np.array([lo])
  raw = (hi - lo) / max(1, n)
  mag = 10.0 ** math.floor(math.log10(raw))
  step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
  start = math.ceil(lo / step - 1e-9) * step
  return np.arange(start, hi + step * 1e-6, step)


def _fmt(v: float) -> str:
  if v == 0:
    return "0"
  a = abs(v)
  return f"{v:.3g}" if 1e-3 <= a < 1e5 else f"{v:.1e}"


def loss_curve_png(series: Dict[str, Sequence[Tuple[float, float]]], path: str, *, width: int = 640,
                   height: int = 400, title: Optional[str] = None) -> Image.Image:
  """Line plot of named (step, value) series with axes, ticks and a legend, written to `path` (PNG).

  Non-finite values are left out (the line breaks there). Returns the image.
  """
  img = Image.new("RGB", (int(width), int(height)), (255, 255, 255))
  draw = ImageDraw.Draw(img)
  font = _font()
  left, right, top, bottom = 64, 16, 24 if title else 12, 36
  x0, y0, x1, y1 = left, top, width - right, height - bottom
  pts = [
      (float(s), float(v)) for vals in series.values() for s, v in vals if math.isfinite(float(v))
  ]
  if pts:
    xs, ys = zip(*pts)
    xlo, xhi, ylo, yhi = min(xs), max(xs), min(ys), max(ys)
  else:
    xlo, xhi, ylo, yhi = 0.0, 1.0, 0.0, 1.0
  if xhi <= xlo:
    xlo, xhi = xlo - 0.5, xhi + 0.5
  if yhi <= ylo:
    pad = abs(ylo) * 0.05 or 0.5
    ylo, yhi = ylo - pad, yhi + pad
  else:
    pad = (yhi - ylo) * 0.05
    ylo, yhi = ylo - pad, yhi + pad
  px = lambda s: x0 + (s - xlo) / (xhi - xlo) * (x1 - x0)
  py = lambda v: y1 - (v - ylo) / (yhi - ylo) * (y1 - y0)
  grid, axis = (230, 230, 230), (0, 0, 0)
  for t in _nice_ticks(ylo, yhi):
    y = py(t)
    if y0 <= y <= y1:
      draw.line([(x0, y), (x1, y)], fill=grid)
      draw.line([(x0 - 4, y), (x0, y)], fill=axis)
      label = _fmt(float(t))
      w, h = _text_size(draw, label, font)
      draw.text((x0 - 6 - w, y - h / 2 - 1), label, fill=axis, font=font)
  for t in _nice_ticks(xlo, xhi):
    x = px(t)
    if x0 <= x <= x1:
      draw.line([(x, y0), (x, y1)], fill=grid)
      draw.line([(x, y1), (x, y1 + 4)], fill=axis)
      label = _fmt(float(t))
      w, _ = _text_size(draw, label, font)
      draw.text((x - w / 2, y1 + 6), label, fill=axis, font=font)
  draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=axis)
  draw.text(((x0 + x1) / 2 - 12, height - 14), "step", fill=axis, font=font)
  if title:
    draw.text((x0, 6), title, fill=axis, font=font)
  for i, (name, vals) in enumerate(series.items()):
    color = PALETTE[i % len(PALETTE)]
    seg = []
    for s, v in list(vals) + [(math.nan, math.nan)]:
      if math.isfinite(float(v)) and math.isfinite(float(s)):
        seg.append((px(float(s)), py(float(v))))
        continue
      if len(seg) > 1:
        draw.line(seg, fill=color, width=2)
      elif len(seg) == 1:
        (cx, cy), = seg
        draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=color)
      seg = []
    # legend entry, top right
    lw, lh = _text_size(draw, name, font)
    ly = y0 + 4 + i * (lh + 6)
    draw.line([(x1 - lw - 30, ly + lh / 2), (x1 - lw - 12, ly + lh / 2)], fill=color, width=3)
    draw.text((x1 - lw - 6, ly), name, fill=axis, font=font)
  files.save_png(path, img)
  return img
