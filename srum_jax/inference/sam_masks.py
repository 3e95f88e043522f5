"""SAM automatic mask generation as one jitted, batched program: images in, the largest boxes out.

    gen = SamMaskGenerator(cfg, params, MaskOptions(), mesh=mesh, images_per_call=8)
    results = gen([image_a, image_b, ...])   # uint8 [H, W, 3] each -> [MaskBoxes(bounds, areas,
                                             #   scores)] per image, largest first

What runs (SAM's `SamAutomaticMaskGenerator` with its defaults and one crop, the whole image):
  host    each image resized so its longer side is the model's input size S (PIL bilinear, the
          released preprocessing; nothing to do for S x S images) and zero-padded to S x S uint8;
          images of one size form a call, padded with blank images to `images_per_call`.
  device  (`automatic_boxes`, jitted once per image size) normalise, encode every image; prompt
          each with a `points_per_side`^2 grid of single positive points (`point_grid`, cell
          centres, scaled to the model input), `points_per_batch` points of all images per step
          (`lax.map`), three masks per point; every mask's logits upscaled to the image size as the
          released post-processing (bilinear, align_corners=False, to S x S, crop to the resized
          image, bilinear to the original size: one precomputed matrix per axis, fp32 matmuls);
          per mask only its pixel area, stability (|logits > t + offset| / |logits > t - offset|,
          0 for an empty union) and inclusive bounds (x_min, y_min, x_max, y_max of logits > t;
          0s when empty) are kept, computed 64 upscaled rows at a time (no full-size mask ever
          exists); masks with predicted IoU > `pred_iou_thresh` and stability >=
          `stability_score_thresh` are candidates; greedy box
          NMS (IoU > `box_nms_thresh` suppressed, highest predicted IoU first, ties by index,
          torchvision's box IoU on the inclusive bounds) in a `while_loop` that ends when no
          candidate remains; the survivors sorted by area (largest first, then predicted IoU, then
          index) and the first `max_boxes` returned with their count.
  out     bounds [B, K, 4] int32, areas [B, K] int32, scores [B, K] fp32, count [B] int32: the only
          arrays that leave the device. Rows past `count` hold area -1.

Box convention: the bounds are inclusive pixel indices, `pipeline.proposers.postprocess` turns them
into the stage's boxes exactly as for every other proposer. Images (the batch axis) are sharded over
the mesh's data x fsdp devices; parameters follow the schema's logical axes (replicated on an
inference mesh without tensor parallelism).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from srum_jax import sharding as sharding_lib
from srum_jax.models import params as params_lib, sam_decoder, sam_encoder, sam_schema
from srum_jax.models.sam_config import SamConfig


@dataclasses.dataclass(frozen=True)
class MaskOptions:
  """The automatic mask generator's settings (SAM's defaults) and the number of boxes returned."""
  points_per_side: int = 32
  points_per_batch: int = 64
  pred_iou_thresh: float = 0.88
  stability_score_thresh: float = 0.95
  stability_score_offset: float = 1.0
  box_nms_thresh: float = 0.7
  mask_threshold: float = 0.0  # logits above it are the mask (the released models' value)
  max_boxes: int = 5  # largest boxes returned per image (SRUM scores 5)

  def __post_init__(self):
    if self.points_per_side < 1 or self.points_per_batch < 1 or self.max_boxes < 1:
      raise ValueError(f"points_per_side, points_per_batch and max_boxes must be >= 1: {self}")


class MaskBoxes(NamedTuple):
  """One image's result: inclusive bounds [n, 4] (x_min, y_min, x_max, y_max), areas [n], predicted
  IoUs [n], largest first (n <= max_boxes), and `total` boxes that survived NMS."""
  bounds: np.ndarray
  areas: np.ndarray
  scores: np.ndarray
  total: int


# ----------------------------------------------------------------------------------------------
# host: geometry

def point_grid(n_per_side: int) -> np.ndarray:
  """SAM's prompt grid: [n*n, 2] (x, y) in [0, 1], cell centres (offset 1/(2n)), row-major."""
  offset = 1.0 / (2 * n_per_side)
  side = np.linspace(offset, 1.0 - offset, n_per_side)
  xs = np.tile(side[None, :], (n_per_side, 1))
  ys = np.tile(side[:, None], (1, n_per_side))
  return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def input_size(height: int, width: int, size: int) -> Tuple[int, int]:
  """(h, w) of an image resized so its longer side is `size` (rounded half up, as the released
  preprocessing)."""
  scale = size / max(height, width)
  return int(height * scale + 0.5), int(width * scale + 0.5)


def model_input(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]: PIL bilinear resize to `input_size`, zero padding at
  the bottom / right."""
  h, w = image.shape[:2]
  rh, rw = input_size(h, w, size)
  if (rh, rw) != (h, w):
    image = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR))
  out = np.zeros((size, size, 3), np.uint8)
  out[:rh, :rw] = image
  return out


def prompt_points(height: int, width: int, size: int, n_per_side: int) -> np.ndarray:
  """[n*n, 2] float32 (x, y) grid points of a height x width image in model-input pixels."""
  rh, rw = input_size(height, width, size)
  points = point_grid(n_per_side) * np.array([width, height], np.float64)
  return (points * np.array([rw / width, rh / height])).astype(np.float32)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] float64: PyTorch's bilinear resize along one axis (align_corners=False, no
  antialias): output i reads input (i + 0.5) * in / out - 0.5, clamped at 0, from two neighbours."""
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0
  m = np.zeros((out_size, in_size))
  np.add.at(m, (np.arange(out_size), i0), 1.0 - lam)
  np.add.at(m, (np.arange(out_size), i1), lam)
  return m


def upscale_taps(low: int, size: int, resized: int, out: int) -> Tuple[np.ndarray, np.ndarray]:
  """The released mask post-processing along one axis as sparse taps: low-resolution logits (`low`)
  -> `size` (the model input), crop to the first `resized`, -> `out` (the image). Returns (index
  [out, K] int32, weight [out, K] float32), K the most inputs any output reads."""
  m = bilinear_matrix(resized, out) @ bilinear_matrix(low, size)[:resized]
  k = max(int((m != 0).sum(axis=1).max()), 1)
  index = np.zeros((out, k), np.int32)
  weight = np.zeros((out, k), np.float32)
  for row in range(out):
    nz = np.nonzero(m[row])[0]
    index[row, :len(nz)] = nz
    weight[row, :len(nz)] = m[row, nz]
  return index, weight


# ----------------------------------------------------------------------------------------------
# device: per-mask statistics, NMS, selection

def _apply_taps(x: jax.Array, taps, axis: int) -> jax.Array:
  """Resample `x` along `axis` with (index [out, K], weight [out, K]) taps, in fp32."""
  index, weight = jnp.asarray(taps[0]), jnp.asarray(taps[1])
  shape = [1] * x.ndim
  shape[axis] = index.shape[0]
  out = None
  for k in range(index.shape[1]):
    term = jnp.take(x, index[:, k], axis=axis) * weight[:, k].reshape(shape)
    out = term if out is None else out + term
  return out


def tap_matrix(taps, size_in: int) -> np.ndarray:
  """The dense [out, size_in] float32 matrix of (index [out, K], weight [out, K]) taps."""
  index, weight = (np.asarray(t) for t in taps)
  m = np.zeros((index.shape[0], size_in), np.float32)
  rows = np.repeat(np.arange(index.shape[0]), index.shape[1])
  np.add.at(m, (rows, index.ravel()), weight.ravel())
  return m


def mask_stats(logits: jax.Array, taps_h, taps_w, threshold: float, offset: float,
               rows_per_block: int = 64):
  """Low-resolution logits [..., L, L] -> (areas, stability, bounds [..., 4]) at the image size.

  Upscaled logits are thresholded at `threshold` (area, bounds) and at threshold +- offset
  (stability). The taps run as dense fp32 matmuls (HIGHEST precision: fp32 on TPUs too), the
  image `rows_per_block` output rows at a time (`lax.scan`), so only one block of rows of every
  mask exists at once; nothing image-sized is returned.
  """
  low = logits.shape[-1]
  m_h, m_w = tap_matrix(taps_h, logits.shape[-2]), tap_matrix(taps_w, low)
  h, w = m_h.shape[0], m_w.shape[0]
  block = min(rows_per_block, h)
  n = -(-h // block)
  m_h = np.pad(m_h, ((0, n * block - h), (0, 0))).reshape(n, block, -1)
  real = (np.arange(n * block) < h).reshape(n, block)
  x32 = logits.astype(jnp.float32)
  lead = logits.shape[:-2]
  hi = jax.lax.Precision.HIGHEST

  def rows(carry, xs):
    area, inter, union, cols = carry
    mh, valid = xs
    x = jnp.einsum("...hl,bh->...bl", x32, mh, precision=hi)
    x = jnp.einsum("...bl,wl->...bw", x, jnp.asarray(m_w), precision=hi)  # [..., block, W]
    valid = valid[:, None]
    inside = (x > threshold) & valid
    count = lambda m: m.sum(axis=(-2, -1), dtype=jnp.int32)
    carry = (area + count(inside), inter + count((x > threshold + offset) & valid),
             union + count((x > threshold - offset) & valid), cols | inside.any(axis=-2))
    return carry, inside.any(axis=-1)

  zeros = jnp.zeros(lead, jnp.int32)
  init = (zeros, zeros, zeros, jnp.zeros(lead + (w,), bool))
  (area, inter, union, cols), row_any = jax.lax.scan(
      rows, init, (jnp.asarray(m_h), jnp.asarray(real)))
  row_any = jnp.moveaxis(row_any, 0, -2).reshape(lead + (n * block,))[..., :h]
  stability = jnp.where(union > 0, inter.astype(jnp.float32) / jnp.maximum(union, 1), 0.0)
  y0, y1 = jnp.argmax(row_any, axis=-1), h - 1 - jnp.argmax(row_any[..., ::-1], axis=-1)
  x0, x1 = jnp.argmax(cols, axis=-1), w - 1 - jnp.argmax(cols[..., ::-1], axis=-1)
  bounds = jnp.stack([x0, y0, x1, y1], axis=-1).astype(jnp.int32)
  bounds = jnp.where((area > 0)[..., None], bounds, 0)
  return area, stability, bounds


def box_iou(box: jax.Array, boxes: jax.Array) -> jax.Array:
  """IoU of one box [4] with boxes [N, 4] (x0, y0, x1, y1; area (x1 - x0) * (y1 - y0), torchvision's
  convention); a zero union gives 0."""
  b = boxes.astype(jnp.float32)
  a = box.astype(jnp.float32)
  iw = jnp.clip(jnp.minimum(a[2], b[:, 2]) - jnp.maximum(a[0], b[:, 0]), 0.0)
  ih = jnp.clip(jnp.minimum(a[3], b[:, 3]) - jnp.maximum(a[1], b[:, 1]), 0.0)
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def greedy_nms(bounds: jax.Array, scores: jax.Array, valid: jax.Array,
               threshold: float) -> jax.Array:
  """[N] bool kept: repeatedly keep the highest-scored remaining candidate (lowest index on ties)
  and drop the remaining ones whose IoU with it exceeds `threshold`; stops when none remains."""
  bounds, scores, valid = jnp.asarray(bounds), jnp.asarray(scores), jnp.asarray(valid)
  n = scores.shape[0]

  def body(state):
    remaining, keep = state
    i = jnp.argmax(jnp.where(remaining, scores, -jnp.inf))
    keep = keep.at[i].set(True)
    remaining = remaining & ~(box_iou(bounds[i], bounds) > threshold)
    return remaining.at[i].set(False), keep

  _, keep = jax.lax.while_loop(lambda s: s[0].any(), body, (valid, jnp.zeros((n,), bool)))
  return keep


def largest(bounds, areas, scores, keep, k: int):
  """The first k kept candidates by (area desc, score desc, index asc): (bounds [k, 4], areas [k]
  (-1 past the kept ones), scores [k], count of kept)."""
  bounds, areas, scores, keep = (jnp.asarray(x) for x in (bounds, areas, scores, keep))
  n = areas.shape[0]
  area_key = jnp.where(keep, areas, -1)
  order = jnp.lexsort((jnp.arange(n), -jnp.where(keep, scores, -jnp.inf), -area_key))[:k]
  if k > n:
    order = jnp.concatenate([order, jnp.zeros((k - n,), order.dtype)])
  pad = jnp.arange(k) >= n
  return (jnp.where(pad[:, None], 0, bounds[order]), jnp.where(pad, -1, area_key[order]),
          jnp.where(pad, 0.0, scores[order]), keep.sum(dtype=jnp.int32))


# ----------------------------------------------------------------------------------------------
# the program

def automatic_boxes(params, images: jax.Array, *, cfg: SamConfig, opts: MaskOptions,
                    image_hw: Tuple[int, int], dtype=jnp.float32):
  """uint8 [B, S, S, 3] (`model_input` of images of size `image_hw`) -> (bounds [B, K, 4], areas
  [B, K], scores [B, K], count [B]) of the largest boxes after SAM's filters and NMS."""
  h, w = image_hw
  s = cfg.image_size
  rh, rw = input_size(h, w, s)
  low = 4 * cfg.encoder.grid
  taps_h, taps_w = upscale_taps(low, s, rh, h), upscale_taps(low, s, rw, w)
  b = images.shape[0]
  pixels = sam_encoder.normalize_pixels(cfg, images, rh, rw, dtype)
  params = jax.tree.map(lambda x: x.astype(dtype) if x.dtype != dtype else x, params)
  emb = sam_encoder.encode_images(params["image_encoder"], cfg, pixels)[:, None]  # [B, 1, G, G, D]

  points = prompt_points(h, w, s, opts.points_per_side)
  chunk = min(opts.points_per_batch, len(points))
  n_chunks = -(-len(points) // chunk)
  real = np.arange(n_chunks * chunk) < len(points)
  points = np.concatenate([points, np.zeros((n_chunks * chunk - len(points), 2), np.float32)])

  def step(pts):  # pts [chunk, 2]: one batch of prompts for every image
    p = jnp.broadcast_to(pts[None, :, None, :], (b, chunk, 1, 2))
    logits, iou = sam_decoder.decode(params, cfg, emb, p, jnp.ones((b, chunk, 1), jnp.int32))
    area, stability, bounds = mask_stats(logits, taps_h, taps_w, opts.mask_threshold,
                                         opts.stability_score_offset)
    return area, stability, bounds, iou

  area, stability, bounds, iou = jax.lax.map(step, jnp.asarray(points.reshape(n_chunks, chunk, 2)))
  flat = lambda x: jnp.moveaxis(x, 0, 1).reshape((b, -1) + x.shape[4:])  # [B, point * 3 + mask]
  area, stability, bounds, iou = flat(area), flat(stability), flat(bounds), flat(iou)
  real = jnp.asarray(np.repeat(real, iou.shape[1] // len(real)))
  valid = real & (iou > opts.pred_iou_thresh) & (stability >= opts.stability_score_thresh)

  def per_image(bounds, area, iou, valid):
    keep = greedy_nms(bounds, iou, valid, opts.box_nms_thresh)
    return largest(bounds, area, iou, keep, opts.max_boxes)

  return jax.vmap(per_image)(bounds, area, iou, valid)


def compile_args(cfg: SamConfig, mesh, batch: int, dtype=jnp.float32, rules=None):
  """(param shardings, image sharding, abstract params, abstract images) of `automatic_boxes` on
  `mesh` with `batch` images per call (the batch over data x fsdp)."""
  schema = sam_schema.sam_schema(cfg)
  shardings = sharding_lib.schema_shardings(schema, mesh, rules or sharding_lib.DEFAULT_RULES)
  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, dtype, sharding=sh),
                          params_lib.abstract_params(schema), shardings)
  s = cfg.image_size
  image_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  images = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.uint8, sharding=image_sharding)
  return shardings, image_sharding, abstract, images


def jit_program(cfg: SamConfig, opts: MaskOptions, image_hw: Tuple[int, int], mesh,
                param_shardings, dtype=jnp.float32):
  """`automatic_boxes` jitted on `mesh`: images and outputs sharded over the batch axes."""
  rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  fn = functools.partial(automatic_boxes, cfg=cfg, opts=opts, image_hw=tuple(image_hw), dtype=dtype)
  return jax.jit(fn, in_shardings=(param_shardings, rows), out_shardings=(rows, rows, rows, rows))


# ----------------------------------------------------------------------------------------------
# the shell

class SamMaskGenerator:
  """Runs `automatic_boxes` over lists of images: groups them by size, `images_per_call` per call
  (rounded up to a multiple of the mesh's batch devices), one compile per image size."""

  def __init__(self, cfg: SamConfig, params, opts: MaskOptions = MaskOptions(), *, mesh=None,
               images_per_call: int = 8, dtype=jnp.float32, rules=None):
    self.cfg, self.opts, self.dtype = cfg, opts, jnp.dtype(dtype)
    self.mesh = mesh if mesh is not None else sharding_lib.make_mesh({"data": -1})
    devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.batch = -(-max(int(images_per_call), 1) // devices) * devices
    self.param_shardings = sharding_lib.schema_shardings(
        sam_schema.sam_schema(cfg), self.mesh, rules or sharding_lib.DEFAULT_RULES)
    self.params = jax.device_put(params, self.param_shardings)
    self._programs: Dict[Tuple[int, int], Any] = {}

  def program(self, image_hw: Tuple[int, int]):
    if image_hw not in self._programs:
      self._programs[image_hw] = jit_program(self.cfg, self.opts, image_hw, self.mesh,
                                             self.param_shardings, self.dtype)
    return self._programs[image_hw]

  def run_batch(self, images: Sequence[np.ndarray]) -> List[MaskBoxes]:
    """Images of one size (at most `self.batch`) in one call."""
    h, w = images[0].shape[:2]
    s = self.cfg.image_size
    batch = np.zeros((self.batch, s, s, 3), np.uint8)
    for i, image in enumerate(images):
      batch[i] = model_input(image, s)
    rows = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))
    out = self.program((h, w))(self.params, jax.device_put(batch, rows))
    bounds, areas, scores, count = (np.asarray(x) for x in out)
    results = []
    for i in range(len(images)):
      n = int(min(count[i], self.opts.max_boxes))
      results.append(MaskBoxes(bounds[i, :n].astype(np.int64), areas[i, :n].astype(np.int64),
                               scores[i, :n].astype(np.float64), int(count[i])))
    return results

  def __call__(self, images: Sequence[np.ndarray]) -> List[MaskBoxes]:
    """uint8 [H, W, 3] images (any sizes) -> one MaskBoxes per image, in order."""
    results: List[Optional[MaskBoxes]] = [None] * len(images)
    by_size: Dict[Tuple[int, int], List[int]] = {}
    for i, image in enumerate(images):
      by_size.setdefault(tuple(image.shape[:2]), []).append(i)
    for idx in by_size.values():
      for start in range(0, len(idx), self.batch):
        part = idx[start:start + self.batch]
        for i, r in zip(part, self.run_batch([images[i] for i in part])):
          results[i] = r
    return results
