"""Stage `propose`: region proposals for every generated image (docs/bagel.md, "Region proposals").

Reads the generate stage's metadata, runs the configured proposer (`sam`, `sam_torch`, `felzenszwalb`,
`components`, `grid`) with the official post-processing (boxes from masks, largest first, top `max_regions`)
and writes one `regions.jsonl` row per image ({id, image_file, regions: [{box, area}]}; `regions.<process>.jsonl`
when several processes share the work). Images go to the proposer `batch_size` at a time (a batched proposer,
`sam`, runs them as one call sharded over `mesh`); each batch's rows are logged before the next starts. Missing
or corrupt images are skipped and counted; finished ids are skipped on restart.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import List, Optional

from srum_jax import paths
from srum_jax.pipeline import common, generate, multihost
from srum_jax.pipeline.proposers import get_proposer


@dataclasses.dataclass
class ProposeReport:
  images: int = 0
  skipped_done: int = 0
  skipped_bad_image: int = 0
  skipped_log_lines: int = 0  # unreadable or incomplete lines of the metadata / regions logs
  proposed: int = 0
  regions: int = 0
  images_without_regions: int = 0


def _valid_regions(value) -> bool:
  """A `regions` field as this stage writes it: a list of {box: 4 finite numbers, ...}."""
  def number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
  return isinstance(value, list) and all(
      isinstance(r, dict) and isinstance(r.get("box"), list) and len(r["box"]) == 4 and all(map(number, r["box"]))
      for r in value)


def read_regions(out_dir: str, report: Optional[common.LogReport] = None) -> List[dict]:
  """Every process's region rows, one per image id; a row whose `regions` is not a list of boxes of 4 finite
  numbers is skipped and counted in `report` (its image is then proposed again, or scored without regions)."""
  rows = common.read_rows(out_dir, "regions", require=("regions",), report=report)
  good = [r for r in rows if _valid_regions(r["regions"])]
  if report is not None:
    report.malformed += len(rows) - len(good)
    report.rows -= len(rows) - len(good)
  return good


def propose(pcfg, gen_dir: str, out_dir: str, mesh=None) -> ProposeReport:
  """Proposals for every generated image not yet done; `mesh`: where a batched proposer runs (default: the
  local devices). Options left "" in the config are not passed to the proposer."""
  name = pcfg.name
  options = {k: v for k, v in dict(pcfg.options).items() if v != ""}
  proposer = get_proposer(name, max_regions=pcfg.max_regions, min_area=pcfg.min_area, box_mode=pcfg.box_mode,
                          mesh=mesh, images_per_call=pcfg.batch_size, **options)
  rep = ProposeReport()
  log = common.process_log(out_dir, "regions")
  log_rep = common.LogReport()
  done = {r["id"] for r in read_regions(out_dir, log_rep)}
  rows = common.process_shard(generate.read_metadata(gen_dir, log_rep))
  rep.skipped_log_lines = log_rep.skipped
  bar = common.progress(len(rows), f"propose[{name}]")
  todo = []
  for row in rows:
    rep.images += 1
    if row["id"] in done:
      rep.skipped_done += 1
      bar.update(1)
    else:
      todo.append(row)
  for start in range(0, len(todo), pcfg.batch_size):
    batch, images = [], []
    for row in todo[start:start + pcfg.batch_size]:
      image, why = common.load_rgb(paths.join(gen_dir, row["image_file"]))
      if image is None:
        rep.skipped_bad_image += 1
      else:
        batch.append(row)
        images.append(image)
    for row, regions in zip(batch, proposer.propose_batch(images) if images else []):
      log.append({"id": row["id"], "image_file": row["image_file"],
                  "regions": [{"box": [int(v) for v in r.box], "area": int(r.area)} for r in regions]})
      rep.proposed += 1
      rep.regions += len(regions)
      rep.images_without_regions += int(not regions)
    bar.update(len(todo[start:start + pcfg.batch_size]))
  bar.close()
  multihost.barrier(f"propose:{out_dir}")
  common.summary_line("propose", **dataclasses.asdict(rep), out=out_dir)
  return rep
