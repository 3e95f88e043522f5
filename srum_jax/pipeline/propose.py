"""Stage `propose`: region proposals for every generated image (docs/bagel.md, "Region proposals").

Reads the generate stage's metadata, runs the configured proposer (`sam`, `sam_torch`,
`felzenszwalb`, `components`, `grid`) with the official post-processing (boxes from masks, largest
first, top `max_regions`) and writes one `regions.jsonl` row per image ({id, image_file, regions:
[{box, area}]}; `regions.<process>.jsonl` when several processes share the work). Images go to the
proposer `batch_size` at a time (a batched proposer, `sam`, runs them as one call sharded over
`mesh`); each batch's rows are logged before the next starts. Missing or corrupt images are skipped
and counted; finished ids are skipped on restart.
"""
from __future__ import annotations

import dataclasses

from srum_jax import distributed, files, paths, progress
from srum_jax.pipeline.proposers import get_proposer
from srum_jax.workdir import layout, logs


@dataclasses.dataclass
class ProposeReport:
  images: int = 0
  skipped_done: int = 0
  skipped_bad_image: int = 0
  skipped_log_lines: int = 0  # unreadable or incomplete lines of the metadata / regions logs
  proposed: int = 0
  regions: int = 0
  images_without_regions: int = 0


def propose(pcfg, gen_dir: str, out_dir: str, mesh=None) -> ProposeReport:
  """Proposals for every generated image not yet done; `mesh`: where a batched proposer runs
  (default: the local devices). Options left "" in the config are not passed to the proposer."""
  name = pcfg.name
  options = {k: v for k, v in dict(pcfg.options).items() if v != ""}
  proposer = get_proposer(name, max_regions=pcfg.max_regions, min_area=pcfg.min_area,
                          box_mode=pcfg.box_mode, mesh=mesh, images_per_call=pcfg.batch_size,
                          **options)
  rep = ProposeReport()
  log = logs.process_log(out_dir, "regions")
  log_rep = logs.LogReport()
  done = {r["id"] for r in layout.read_regions(out_dir, log_rep)}
  rows = distributed.process_shard(layout.read_metadata(gen_dir, log_rep))
  rep.skipped_log_lines = log_rep.skipped
  bar = progress.bar(len(rows), f"propose[{name}]")
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
      image, why = files.load_rgb(paths.join(gen_dir, row["image_file"]))
      if image is None:
        rep.skipped_bad_image += 1
      else:
        batch.append(row)
        images.append(image)
    for row, regions in zip(batch, proposer.propose_batch(images) if images else []):
      boxes = [{"box": [int(v) for v in r.box], "area": int(r.area)} for r in regions]
      log.append({"id": row["id"], "image_file": row["image_file"], "regions": boxes})
      rep.proposed += 1
      rep.regions += len(regions)
      rep.images_without_regions += int(not regions)
    bar.update(len(todo[start:start + pcfg.batch_size]))
  bar.close()
  distributed.barrier(f"propose:{out_dir}")
  progress.summary_line("propose", **dataclasses.asdict(rep), out=out_dir)
  return rep
