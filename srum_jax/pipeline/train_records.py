"""Reward records -> the validated ArrayRecord file the training pipeline reads
(`pipeline/train_data.py`).

    path, report = prepare_records(records_jsonl, images_root, cache_dir, max_regions=5)

Host validation runs once per distinct input (the ArrayRecord file name carries a content hash of
the JSONL, the image files' sizes/mtimes and the validation settings): malformed lines, non-finite
scores, records the official formatting filter drops (`records.formatting_filter`), missing or
undecodable images are skipped, and boxes are sanitised (degenerate or fully outside the image:
dropped; partly outside: clamped), all COUNTED in a `DataReport`. Records come as this project's
schema or SRUM's formatted JSONL (`records_format`, auto-detected: `rewards.record_sources`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
from typing import List, Tuple

from array_record.python.array_record_module import ArrayRecordWriter

from srum_jax import files, paths
from srum_jax.pipeline import train_images
from srum_jax.rewards import record_sources, records as records_lib

# bump when validation/sanitising changes: rebuilds every cached ArrayRecord file
VALIDATION_VERSION = 3


@dataclasses.dataclass
class DataReport:
  """What host validation saw and dropped; `decode_failures` / `truncated_prompts` grow while
  iterating."""
  lines: int = 0
  # unparsable lines or schema violations (scores outside [-1, 1], missing fields, ...)
  malformed: int = 0
  nonfinite: int = 0  # lines with NaN / inf numbers
  # a second record of an item id already read (`metadata.id`): the first one is kept
  duplicate_id: int = 0
  filtered_zero_global: int = 0
  filtered_missing_global: int = 0
  filtered_empty: int = 0
  missing_image: int = 0
  corrupt_image: int = 0
  # x_min >= x_max or y_min >= y_max after truncation (ignored officially too)
  boxes_degenerate: int = 0
  boxes_outside: int = 0  # no pixel of the image covered
  boxes_clamped: int = 0
  regions_truncated: int = 0  # regions beyond max_regions
  missing_global: int = 0  # kept records without a global score (0.0 is used, as official)
  other_good_image: int = 0  # official rows whose good (target) image is another file: skipped
  records_format: str = ""  # srum_jax | official (`rewards.record_sources`)
  kept: int = 0
  # first few (where, why) of skipped records
  examples: list = dataclasses.field(default_factory=list)
  # images that failed to load while iterating (file changed after validation)
  decode_failures: int = 0
  truncated_prompts: int = 0  # prompts cut to the text budget (counted by the training loop)

  @property
  def skipped(self) -> int:
    return (self.malformed + self.nonfinite + self.duplicate_id + self.filtered_zero_global +
            self.filtered_missing_global + self.filtered_empty + self.missing_image +
            self.corrupt_image + self.other_good_image)

  def to_dict(self) -> dict:
    return dict(dataclasses.asdict(self), skipped=self.skipped)

  def summary(self) -> str:
    return (
        f"{self.records_format or 'records'} records kept {self.kept}/{self.lines} "
        f"(skipped {self.skipped}: "
        f"malformed {self.malformed}, other good image {self.other_good_image}, "
        f"non-finite {self.nonfinite}, duplicate ids {self.duplicate_id}, filtered "
        f"{self.filtered_zero_global + self.filtered_missing_global}"
        f"+{self.filtered_empty}, missing image {self.missing_image}, corrupt image "
        f"{self.corrupt_image}); "
        f"boxes dropped {self.boxes_degenerate + self.boxes_outside}, clamped "
        f"{self.boxes_clamped}; "
        f"regions truncated {self.regions_truncated}; decode failures {self.decode_failures}; "
        f"truncated prompts {self.truncated_prompts}")

  _MAX_EXAMPLES = 20

  def note(self, where, why: str) -> None:
    if len(self.examples) < self._MAX_EXAMPLES:
      self.examples.append((where, why[:200]))




def _sanitise_box(box, width: int, height: int, report: DataReport):
  """Official semantics made explicit: coordinates truncate toward zero, x_min >= x_max (or y) is
  ignored, the box clamps to the image; returns the clamped integer box or None (dropped), counting
  both."""
  x0, y0, x1, y1 = (math.trunc(max(min(v, 2.0 ** 30), -2.0 ** 30)) for v in box)
  if x0 >= x1 or y0 >= y1:
    report.boxes_degenerate += 1
    return None
  c = (min(max(x0, 0), width), min(max(y0, 0), height), min(max(x1, 0),
                                                            width), min(max(y1, 0), height))
  if c[0] >= c[2] or c[1] >= c[3]:
    report.boxes_outside += 1
    return None
  if c != (x0, y0, x1, y1):
    report.boxes_clamped += 1
  return c


def _format_of(records_path: str, records_format: str) -> str:
  """The records' format: `records_format`, or for "auto" the file's (this project's when it has no
  record of a known format: its lines are then counted as malformed, never a crash)."""
  if records_format != "auto":
    return records_format
  return record_sources.detect_format(records_path, default="srum_jax")


def validate_records(records_path: str, images_root: str, *, max_regions: int,
                     drop_zero_global: bool = True, threads: int = 8,
                     records_format: str = "auto") -> Tuple[List[dict], DataReport]:
  """Read, filter and check every record; returns the usable records as plain dicts (with the
  decoded image size in `image_size` and sanitised boxes) and the report of everything skipped or
  changed. `records_format`: srum_jax | official | auto (`rewards.record_sources`);
  `drop_zero_global` applies to this project's records (the official file was filtered when SRUM
  formatted it)."""
  report = DataReport()
  fmt = _format_of(records_path, records_format)
  records, read_report = record_sources.read(records_path, fmt)
  report.lines, report.records_format = read_report.lines, fmt
  if fmt == "official":
    drop_zero_global = False
    kept = []
    for r in records:
      if "good_image_file" in r.metadata:  # SRUM's target is another image: not trained here
        report.other_good_image += 1
        report.note(r.image_file, f"good image {r.metadata['good_image_file']!r} differs")
      else:
        kept.append(r)
    records = kept
  for line_no, why in read_report.skipped:
    if "finite" in why:
      report.nonfinite += 1
    else:
      report.malformed += 1
    report.note(f"line {line_no}", why)
  unique, seen = [], set()
  for r in records:  # one record per item id (the score stage's records carry it in metadata.id)
    item_id = r.metadata.get("id")
    if isinstance(item_id, str) and item_id in seen:
      report.duplicate_id += 1
      report.note(item_id, "duplicate id")
      continue
    seen.add(item_id)
    unique.append(r)
  records, freport = records_lib.formatting_filter(unique, drop_zero_global=drop_zero_global)
  report.filtered_zero_global = freport.dropped_zero_global
  report.filtered_missing_global = freport.dropped_missing_global
  report.filtered_empty = freport.dropped_empty

  image_paths = [os.path.join(images_root, r.image_file) for r in records]
  with concurrent.futures.ThreadPoolExecutor(max(1, int(threads))) as pool:
    checked = list(pool.map(train_images.check_image, image_paths))
  out = []
  for r, (size, why) in zip(records, checked):
    if size is None:
      if why == "missing":
        report.missing_image += 1
      else:
        report.corrupt_image += 1
      report.note(r.image_file, why)
      continue
    regions = []
    for reg in r.regions:
      box = _sanitise_box(reg.box, size[0], size[1], report)
      if box is not None:
        regions.append({"box": list(box), "score": reg.score, "object": reg.object})
    if len(regions) > max_regions:
      report.regions_truncated += len(regions) - max_regions
      regions = regions[:max_regions]
    if r.global_score is None:
      report.missing_global += 1
    out.append({"index": len(out), "image_file": r.image_file, "prompt": r.prompt,
                "global_score": r.global_score, "image_size": list(size), "regions": regions})
  report.kept = len(out)
  return out, report


def _file_stamp(images_root: str, name: str) -> str:
  """`name\0size\0mtime` of an image file (a remote object: the store's size and mtime), or
  `name\0missing`."""
  path = os.path.join(images_root, name)
  try:
    if paths.is_remote(path):
      st = paths.path(path).stat()
      return f"{name}\0{st.length}\0{st.mtime}\n"
    st = os.stat(path)
    return f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n"
  except OSError:  # FileNotFoundError included
    return f"{name}\0missing\n"


def _input_hash(records_path: str, images_root: str, max_regions: int, drop_zero_global: bool,
                threads: int = 8, records_format: str = "auto") -> str:
  """Content hash of the JSONL, the referenced image files' (name, size, mtime) and the settings."""
  h = hashlib.sha256()
  fmt = _format_of(records_path, records_format)
  h.update(json.dumps([VALIDATION_VERSION, paths.abspath(images_root), int(max_regions),
                       bool(drop_zero_global), fmt]).encode())
  with (paths.path(records_path).open("rb") if paths.is_remote(records_path) else open(
      records_path, "rb")) as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  names = set()
  for rec in record_sources.read(records_path, fmt)[0]:
    names.add(rec.image_file)
  # a remote stat is a round trip
  with concurrent.futures.ThreadPoolExecutor(max(1, int(threads))) as pool:
    for stamp in pool.map(lambda n: _file_stamp(images_root, n), sorted(names)):
      h.update(stamp.encode())
  return h.hexdigest()[:16]


def _report_from_dict(d: dict) -> DataReport:
  d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(DataReport)}}
  d["examples"] = [tuple(e) for e in d.get("examples", [])]
  return DataReport(**d)


def prepare_records(records_path: str, images_root: str, cache_dir: str, *, max_regions: int,
                    drop_zero_global: bool = True, threads: int = 8,
                    records_format: str = "auto") -> Tuple[str, DataReport]:
  """Validated records -> `cache_dir/records-<n>-<hash>.array_record` (one JSON record per entry)
  plus a `.report.json` beside it; an existing file for the same input is reused. Writes go to a
  per-process temporary name and are renamed into place, so several hosts preparing the same file
  cannot clash. A remote `cache_dir` (gs://...) stands for a local one (`paths.local_cache_dir`:
  ArrayRecord and the memory-mapped moments need local files), which each host fills for itself; the
  records and images may be remote."""
  cache_dir = paths.local_cache_dir(cache_dir)
  os.makedirs(cache_dir, exist_ok=True)
  key = _input_hash(records_path, images_root, max_regions, drop_zero_global, threads,
                    records_format)
  existing = [f for f in os.listdir(cache_dir) if f.endswith(f"-{key}.array_record")]
  if existing:
    path = os.path.join(cache_dir, existing[0])
    report_path = path[:-len(".array_record")] + ".report.json"
    if os.path.isfile(report_path):
      return path, _report_from_dict(files.read_json(report_path, "records report"))
  good, report = validate_records(records_path, images_root, max_regions=max_regions,
                                  drop_zero_global=drop_zero_global, threads=threads,
                                  records_format=records_format)
  path = os.path.join(cache_dir, f"records-{len(good)}-{key}.array_record")
  report_path = path[:-len(".array_record")] + ".report.json"
  tmp = f"{path}.tmp{os.getpid()}"
  writer = ArrayRecordWriter(tmp, "group_size:1")
  for rec in good:
    writer.write(json.dumps(rec, ensure_ascii=False, allow_nan=False).encode("utf-8"))
  writer.close()
  os.replace(tmp, path)
  files.write_json(report_path, report.to_dict())
  return path, report
