"""Training data: reward records (JSONL) -> validated ArrayRecord file -> grain pipeline -> packed
`SrumBatch`.

    path, report = train_records.prepare_records(records_jsonl, images_root, cache_dir, ...)
    # optional: VAE once
    moments = prepare_moments(path, images_root, image_hw, encode, encoder_id=...)
    # grain.IterDataset of HostBatch
    ds = make_dataset(path, images_root, spec, tokenizer, seed=0, moments=moments)
    # hb.batch: SrumBatch, hb.indices
    it = iter(ds); hb = next(it)
    state = it.get_state(); ...; it.set_state(state)                     # checkpointable

Host validation (`train_records.prepare_records`) runs once per distinct input and counts every
skip in a `DataReport`; a pipeline with zero usable records is an error.

The grain pipeline: a deterministic global record order (shuffle reseeded every epoch, endless
repeat) whose global batches every process cuts the same way (process p takes the p-th slice: its
rows), a map that loads the PNG (bicubic resize to `image_hw`, [-1, 1]; or, with `DataSpec.resize`,
SRUM's aspect-preserving training transform, then zero padding to the static canvas `image_hw`:
`load_canvas`), scales the boxes from the stored image size to the image's training size (identity
for the official 1024 -> 1024), pads the regions to `max_regions` and tokenizes the prompt ([BOS] +
ids + [EOS], truncated to the per-sample text budget and counted), and a batcher that packs rows of
`samples_per_row` samples with `train_step.t2i_layout` under static budgets (images below the
canvas: only their own latent tokens, mapped to the canvas tokens by `SrumBatch.latent_src`). Every
batch carries the record indices it used.

With stored posterior moments (`prepare_moments`: the frozen VAE encoder run once over the prepared
records, since SRUM's training images are fixed within a round) the map reads each record's moments
row instead of decoding its image, and batches carry `SrumBatch.moments` (images None); the record
order, the per-process slices and the iterator state are the same either way.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from typing import Any, List, NamedTuple, Optional, Tuple

import grain
import ml_dtypes
import numpy as np

from srum_jax.pipeline.train_images import load_canvas, load_image, training_size  # noqa: F401
from srum_jax.pipeline.train_records import DataReport
from srum_jax.rewards import records as records_lib
from srum_jax.training import objective, train_step

__all__ = ["DataSpec", "HostBatch", "MomentsFiles", "load_image", "load_canvas", "prepare_moments",
           "make_dataset", "spec_from_config", "text_budget"]

MOMENTS_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Static layout of one host batch: `rows` packed rows of `samples_per_row` samples of `image_hw`
  pixels. `resize` (max_size, min_size, stride): SRUM's aspect-preserving transform, each image
  padded to the canvas `image_hw` (`load_canvas`); None: every image resized to `image_hw`."""
  image_hw: Tuple[int, int]
  rows: int
  samples_per_row: int
  num_tokens: int
  text_capacity: int
  max_regions: int
  resize: Optional[Tuple[int, int, int]] = None


class HostBatch(NamedTuple):
  """One host batch: the packed `SrumBatch` (NumPy), global record indices [rows, S], prompts
  [rows*S], how many of its prompts were truncated to the text budget, and the image files [rows*S]
  (relative to the images root; for pictures of the batch)."""
  batch: Any
  indices: np.ndarray
  prompts: list
  truncated: int
  image_files: list


# --- images ---------------------------------------------------------------------------------------

def _load_training_image(path: str, spec: DataSpec):
  """The pipeline's image loader: `load_image` (fixed size) or `load_canvas` (`spec.resize`)."""
  if spec.resize is None:
    return load_image(path, spec.image_hw)
  return load_canvas(path, spec.image_hw, spec.resize)


# --- posterior moments, encoded once per prepared record file -------------------------------------

@dataclasses.dataclass(frozen=True)
class MomentsFiles:
  """Stored posterior moments of a prepared record file. Process p of n encoded the records i with
  i % n == p into `parts[p]` (row i // n, [rows, h, w, 2z]; bf16 kept as its uint16 bits) and marked
  in `parts[p]`'s `.ok.npy` companion whether the image loaded."""
  parts: Tuple[str, ...]
  dtype: str

  def locate(self, index: int) -> Tuple[str, int]:
    return self.parts[index % len(self.parts)], index // len(self.parts)


def _ok_path(part: str) -> str:
  return part[:-len(".npy")] + ".ok.npy"


def _read_records(array_record_path: str) -> List[dict]:
  src = grain.sources.ArrayRecordDataSource(array_record_path)
  return [json.loads(src[i]) for i in range(len(src))]


def prepare_moments(array_record_path: str, images_root: str, image_hw: Tuple[int, int], encode, *,
                    encoder_id: str, dtype: str = "float32", batch_size: int = 8,
                    process_index: int = 0, process_count: int = 1, threads: int = 4,
                    resize: Optional[Tuple[int, int, int]] = None) -> MomentsFiles:
  """Encode this process's share of a prepared record file once: `encode(images [b, H, W, 3] float32
  in [-1, 1])
  -> moments [b, h, w, 2z]` (the caller's jitted frozen encoder) over batches of `batch_size` images
  loaded as the pipeline loads them (`load_image`, or `load_canvas` with `resize`); images that fail
  to load get ok=False and zero moments (the pipeline skips and counts them as decode failures).
  Files are named by the record file, `image_hw`, `resize`, `dtype`, `encoder_id` (identifies the
  encoder weights) and the process count, written under a temporary name and renamed, and reused
  when present. Callers with several processes wait at a barrier before reading."""
  if dtype not in MOMENTS_DTYPES:
    raise ValueError(f"moments dtype {dtype!r}; choose one of {MOMENTS_DTYPES}")
  H, W = (int(v) for v in image_hw)
  spec = DataSpec(image_hw=(H, W), rows=1, samples_per_row=1, num_tokens=1, text_capacity=1,
                  max_regions=1, resize=None if resize is None else tuple(int(v) for v in resize))
  stem = array_record_path[:-len(".array_record")] if array_record_path.endswith(
      ".array_record") else array_record_path
  size = f"{H}x{W}" if resize is None else f"{H}x{W}r" + "-".join(str(v) for v in spec.resize)
  parts = tuple(f"{stem}.moments-{size}-{dtype}-{encoder_id}.p{p}of{process_count}.npy"
                for p in range(process_count))
  out = MomentsFiles(parts=parts, dtype=dtype)
  mine = parts[process_index]
  if os.path.isfile(mine) and os.path.isfile(_ok_path(mine)):
    return out
  records = _read_records(array_record_path)[process_index::process_count]
  moments, ok = None, np.zeros((len(records),), bool)
  tmp = f"{mine}.tmp{os.getpid()}.npy"

  def load(rec):
    try:
      return _load_training_image(os.path.join(images_root, rec["image_file"]), spec)[0], True
    # vanished or changed since validation: counted when the pipeline reaches the record
    except Exception:
      return np.zeros((H, W, 3), np.float32), False

  with concurrent.futures.ThreadPoolExecutor(max(1, int(threads))) as pool:
    for lo in range(0, len(records), batch_size):
      loaded = list(pool.map(load, records[lo:lo + batch_size]))
      m = np.asarray(encode(np.stack([x for x, _ in loaded])))
      if dtype == "bfloat16":
        m = m.astype(ml_dtypes.bfloat16).view(np.uint16)
      else:
        m = m.astype(np.float32)
      if moments is None:
        moments = np.lib.format.open_memmap(tmp, mode="w+", dtype=m.dtype,
                                            shape=(len(records),) + m.shape[1:])
      moments[lo:lo + len(loaded)] = m
      ok[lo:lo + len(loaded)] = [good for _, good in loaded]
  if moments is None:  # no record for this process
    np.save(tmp, np.zeros((0,), np.float32))
  else:
    moments.flush()
    del moments
  np.save(f"{tmp}.ok.npy", ok)
  os.replace(f"{tmp}.ok.npy", _ok_path(mine))
  os.replace(tmp, mine)
  return out


class _MomentsReader:
  """Lazily memory-mapped moments rows (reopened in each grain worker process; pickles as paths
  only)."""

  def __init__(self, files: MomentsFiles):
    self.files, self._open = files, {}

  def __getstate__(self):
    return {"files": self.files}

  def __setstate__(self, state):
    self.files, self._open = state["files"], {}

  def __call__(self, index: int) -> Optional[np.ndarray]:
    part, row = self.files.locate(index)
    if part not in self._open:
      self._open[part] = (np.load(part, mmap_mode="r"), np.load(_ok_path(part)))
    m, ok = self._open[part]
    if not ok[row]:
      return None
    x = np.array(m[row])
    if self.files.dtype == "bfloat16":
      x = x.view(ml_dtypes.bfloat16)
    return x


# --- grain pipeline -------------------------------------------------------------------------------

def text_budget(cfg, spec: DataSpec) -> int:
  """Prompt ids allowed per sample: the row's text slots (ids + BOS/EOS + the image's two markers)
  and token slots left after the latent tokens, split evenly over the row's samples."""
  h, w = spec.image_hw[0] // cfg.latent_downsample, spec.image_hw[1] // cfg.latent_downsample
  S = spec.samples_per_row
  per_sample = min(spec.text_capacity // S, (spec.num_tokens - S * h * w) // S)
  n = per_sample - 4
  if n < 1:
    raise ValueError(f"no room for prompt text: num_tokens={spec.num_tokens}, text_capacity="
                     f"{spec.text_capacity}, {S} samples of {h}x{w} latent tokens")
  return n


class NoUsableRecords(RuntimeError):
  """Every record failed to load for longer than the data can explain (e.g. images deleted after
  validation): the pipeline would otherwise skip records forever without producing a batch."""


class _Decode:
  """Record bytes -> sample dict (image or stored moments, padded regions, prompt ids); None when
  the image (or its moments row) failed to load. `max_consecutive_failures` failed loads in a row
  (no success between them) raise `NoUsableRecords`."""

  def __init__(self, images_root: str, cfg, spec: DataSpec, tokenizer, report: Optional[DataReport],
               moments: Optional[MomentsFiles] = None,
               max_consecutive_failures: Optional[int] = None):
    self.images_root, self.spec, self.tokenizer, self.report = images_root, spec, tokenizer, report
    self.bos, self.eos = int(cfg.tokens.bos), int(cfg.tokens.eos)
    self.stride = int(cfg.latent_downsample)
    self.max_ids = text_budget(cfg, spec)
    self.moments = None if moments is None else _MomentsReader(moments)
    self.max_failures, self.failures_in_a_row = max_consecutive_failures, 0

  def _failed(self, rec: dict, why: str):
    if self.report is not None:
      self.report.decode_failures += 1
    self.failures_in_a_row += 1
    if self.max_failures is not None and self.failures_in_a_row >= self.max_failures:
      raise NoUsableRecords(
          f"training data: the last {self.failures_in_a_row} records all failed to load (e.g. "
          f"{rec.get('image_file')!r} under {self.images_root}: {why}), longer than two passes "
          f"over the validated "
          f"records: their images changed or vanished after validation; restore them or rerun the "
          f"stage that "
          f"wrote them") from None
    return None

  def __call__(self, raw: bytes):
    rec = json.loads(raw)
    H, W = self.spec.image_hw
    if self.moments is not None:
      pixels = self.moments(int(rec["index"]))
      if pixels is None:
        return self._failed(rec, "no stored moments")
      key, (w0, h0) = "moments", rec["image_size"]
    else:
      try:
        path = os.path.join(self.images_root, rec["image_file"])
        pixels, (w0, h0) = _load_training_image(path, self.spec)
      except Exception as e:  # the file changed or vanished after validation: skip it, never crash
        return self._failed(rec, type(e).__name__)
      key = "image"
    self.failures_in_a_row = 0
    tw, th = training_size((w0, h0), (H, W), self.spec.resize)
    sx, sy = tw / float(w0), th / float(h0)
    boxes, scores, valid, _ = records_lib.pad_regions(
        [(reg["box"][0] * sx, reg["box"][1] * sy, reg["box"][2] * sx, reg["box"][3] * sy)
         for reg in rec["regions"]], [reg["score"] for reg in rec["regions"]],
        self.spec.max_regions)
    ids = [int(i) for i in self.tokenizer.encode(rec["prompt"])]
    truncated = len(ids) > self.max_ids
    return {
        "index": int(rec["index"]),
        key: pixels,
        "image_file": rec["image_file"],
        "boxes": boxes,
        "scores": scores,
        "valid": valid,
        "global_score": np.float32(0.0 if rec["global_score"] is None else rec["global_score"]),
        "ids": [self.bos] + ids[:self.max_ids] + [self.eos],
        "truncated": truncated,
        "prompt": rec["prompt"],
        "grid": (th // self.stride, tw // self.stride)
    }


class _Collate:
  """rows * S samples (in order) -> HostBatch with the static `t2i_layout` packing. `sample_offset`:
  the global number of this process's first sample, so sample ids (and the per-sample randomness
  keyed by them, e.g. text-condition dropout) are those of the global batch, whatever the number of
  processes.

  `anchor_ids` (wrapped prompt ids): each sample also gets an anchor prompt drawn by (`anchor_seed`,
  its row's record indices, its place in the row): the same for any process count, new every epoch;
  the batch carries the same layout with those prompts (`SrumBatch.anchor_inputs`)."""

  def __init__(self, cfg, spec: DataSpec, sample_offset: int = 0, anchor_ids=None,
               anchor_seed: int = 0):
    self.cfg, self.spec, self.sample_offset = cfg, spec, int(sample_offset)
    self.anchor_ids, self.anchor_seed = anchor_ids, int(anchor_seed)

  def _layout(self, grid_ids, grids):
    inputs = train_step.t2i_layout(self.cfg, grid_ids, image_hw=self.spec.image_hw,
                                   num_tokens=self.spec.num_tokens,
                                   text_capacity=self.spec.text_capacity, grids=grids,
                                   sample_stride=train_step.sample_window(
                                       self.spec.num_tokens, self.spec.samples_per_row))
    if self.sample_offset:
      sid = inputs.meta.sample_id
      inputs = inputs._replace(
          meta=inputs.meta._replace(
              sample_id=np.where(sid >= 0, sid + self.sample_offset, sid).astype(sid.dtype)))
    return inputs

  def _anchors(self, grid):
    """One anchor prompt's ids per sample of each row (see the class docstring)."""
    out = []
    for row in grid:
      rng = np.random.default_rng([self.anchor_seed] + [int(s["index"]) for s in row])
      picks = rng.integers(len(self.anchor_ids), size=len(row))
      out.append([self.anchor_ids[int(k)] for k in picks])
    return out

  def __call__(self, samples):
    R_, S = self.spec.rows, self.spec.samples_per_row
    grid = [samples[r * S:(r + 1) * S] for r in range(R_)]
    grids = None if self.spec.resize is None else [[s["grid"] for s in row] for row in grid]
    inputs = self._layout([[s["ids"] for s in row] for row in grid], grids)
    anchor_inputs = None if not self.anchor_ids else self._layout(self._anchors(grid), grids)
    stack = lambda k: np.stack([np.stack([s[k] for s in row]) for row in grid])
    rewards = objective.RegionRewards(
        boxes=stack("boxes"), scores=stack("scores"), valid=stack("valid"),
        global_scores=stack("global_score"))
    stored = "moments" in samples[0]
    canvas = tuple(v // int(self.cfg.latent_downsample) for v in self.spec.image_hw)
    batch = train_step.SrumBatch(
        inputs=inputs, images=None if stored else stack("image"), rewards=rewards,
        moments=stack("moments") if stored else None,
        latent_src=(None if grids is None else train_step.latent_sources(grids, canvas)),
        anchor_inputs=anchor_inputs)
    return HostBatch(batch=batch, indices=stack("index").astype(
        np.int64), prompts=[s["prompt"] for s in samples], truncated=int(
            sum(s["truncated"] for s in samples)), image_files=[s["image_file"] for s in samples])


def make_dataset(array_record_path: str, images_root: str, spec: DataSpec, *, cfg, tokenizer,
                 seed: int, num_epochs: Optional[int] = None, process_index: int = 0,
                 process_count: int = 1, read_threads: int = 4, workers: int = 0,
                 report: Optional[DataReport] = None, moments: Optional[MomentsFiles] = None,
                 anchor_ids=None):
  """The grain pipeline over a prepared ArrayRecord file -> `grain.IterDataset` of this process's
  `HostBatch`es.

  Every process walks the same global record order: a deterministic permutation per epoch (seed +
  epoch; `num_epochs=None` repeats forever) cut into global batches of `process_count * rows *
  samples_per_row` records; process p reads, decodes and packs the p-th contiguous slice of each
  global batch (its rows of the global batch). So a global batch is the same whatever the number of
  processes. `workers > 0` decodes in that many processes (grain mp_prefetch); the iterator stays
  checkpointable. Images failing to load are skipped (the next record of the process's slice stream
  takes their place) and counted in `report.decode_failures` (in this process only). `moments` (from
  `prepare_moments` on the same file): batches carry the stored posterior moments instead of images.
  `anchor_ids` (wrapped prompt ids, `train.anchor_prompt_ids`): every batch also carries the anchor
  layout (`_Collate`).
  """
  ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(array_record_path))
  per_batch, n = spec.rows * spec.samples_per_row, len(ds)
  ds = ds.shuffle(seed=int(seed)).repeat(num_epochs)
  if process_count > 1:
    mine = lambda i, rec: rec if (i % (per_batch * process_count)
                                 ) // per_batch == process_index else None  # noqa
    ds = ds.map_with_index(mine)
  # A run of failures longer than two passes over the data (plus the reads in flight, which may
  # complete out
  # of order) means no record loads any more: two passes bound the run any proper subset of records
  # can make.
  prefetch = 2 * per_batch
  ds = ds.map(_Decode(images_root, cfg, spec, tokenizer, report, moments,
                      max_consecutive_failures=2 * n + prefetch * max(1, int(read_threads))))
  it = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=int(read_threads), prefetch_buffer_size=prefetch))
  it = it.filter(lambda x: x is not None)
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(workers)))
  collate = _Collate(cfg, spec, process_index * per_batch, anchor_ids, anchor_seed=seed)
  return it.batch(per_batch, drop_remainder=True, batch_fn=collate)


def spec_from_config(config, process_count: int = 1) -> DataSpec:
  """Per-host DataSpec from `config.train` (the global `batch_size` rows are split over the
  processes)."""
  t = config.train
  rows = int(t.batch_size)
  if rows % process_count:
    raise ValueError(f"train.batch_size={rows} rows do not split over {process_count} processes")
  return DataSpec(image_hw=tuple(int(v) for v in t.image_hw), rows=rows // process_count,
                  samples_per_row=int(t.samples_per_row), num_tokens=int(t.num_tokens),
                  text_capacity=int(t.text_capacity), max_regions=int(t.max_regions),
                  resize=resize_of(config))


IMAGE_RESIZES = ("fixed", "official")  # `train.image_resize`


def resize_of(config) -> Optional[Tuple[int, int, int]]:
  """`DataSpec.resize` of a config: `train.official_resize` when `train.image_resize` is
  official, else None."""
  t = config.train
  return tuple(int(v) for v in t.official_resize) if t.image_resize == "official" else None
