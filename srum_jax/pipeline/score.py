"""Stage `score`: the UMM judges its own images — global layout and per-region scores (the judge prompts of
the texts, `rewards.texts`: SRUM's `srum_data_infer/vlm.py` ones read from the user's checkout, or the own
wording; `rewards.parsing`; records in the official format, see `rewards.records`).

The judge itself (`engine.judge`: `generate` or `logits` mode) takes the `score` block's judge keys; this
stage adds which scores to ask for (`use_global`, `use_regions`) and the official fallback when every try
fails (global `global_default`, no regions).

Writes `rewards.jsonl` (versioned `RewardRecord`s, image paths relative to the generate dir) and
`stats.json` (parse failures, retries, clamps, score histograms). Finished ids are skipped on restart.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

from srum_jax import distributed, files, paths, progress
from srum_jax.engine import loaded_model
from srum_jax.engine.judge import Judge, JudgeOptions
from srum_jax.rewards import records, texts as texts_lib
from srum_jax.workdir import layout, logs


@dataclasses.dataclass
class ScoreReport:
  images: int = 0
  skipped_done: int = 0
  skipped_bad_image: int = 0
  skipped_no_proposals: int = 0
  skipped_log_lines: int = 0  # unreadable or incomplete lines of the metadata / regions / rewards logs
  scored: int = 0
  global_failures: int = 0
  region_failures: int = 0
  retries: int = 0
  regions_scored: int = 0
  nonfinite_answers: int = 0  # judge scores that were NaN / inf / outside [-1, 1]: counted as failures


def _histogram(values: Sequence[float]) -> Dict[str, int]:
  edges = np.linspace(-1, 1, 11)
  counts, _ = np.histogram(np.asarray(values, np.float64), bins=edges)
  return {f"[{edges[i]:.1f},{edges[i + 1]:.1f})": int(c) for i, c in enumerate(counts)}


def _checked(value: Optional[float], rep: ScoreReport) -> Optional[float]:
  """A judge's score as a record may hold it (finite, in [-1, 1]); anything else is a counted failure (None)."""
  if value is None:
    return None
  ok = records.valid_score(value)
  if ok is None:
    rep.nonfinite_answers += 1
  return ok


def score(scfg, model: loaded_model.Model, gen_dir: str, propose_dir: str, out_dir: str, *, seed: int,
          texts: texts_lib.Texts, compute_dtype="float32", attn_impl: str = "dense") -> ScoreReport:
  rep = ScoreReport()
  judge = Judge(JudgeOptions.from_config(scfg), model, texts=texts, seed=seed, compute_dtype=compute_dtype,
                attn_impl=attn_impl)
  paths.path(out_dir).mkdir(parents=True, exist_ok=True)
  log = logs.process_log(out_dir, "rewards")  # record fields + the item id (extra key, tolerated)
  log_rep = logs.LogReport()
  done = {r["id"] for r in layout.read_rewards(out_dir, log_rep)}
  regions = {r["id"]: r for r in layout.read_regions(propose_dir, log_rep)}
  rows = distributed.process_shard(layout.read_metadata(gen_dir, log_rep))
  rep.skipped_log_lines = log_rep.skipped
  todo = []
  for row in rows:
    rep.images += 1
    if row["id"] in done:
      rep.skipped_done += 1
    elif row["id"] not in regions and scfg.use_regions:
      rep.skipped_no_proposals += 1
    else:
      todo.append(row)
  g_values, r_values = [], []
  bar = progress.bar(len(todo), f"score[{scfg.mode}]")
  for chunk in distributed.batched(todo, int(scfg.batch_size)):
    imgs, keep = [], []
    for row in chunk:
      im, why = files.load_rgb(paths.join(gen_dir, row["image_file"]))
      if im is None:
        rep.skipped_bad_image += 1
      else:
        imgs.append(im)
        keep.append(row)
    bar.update(len(chunk))
    if not keep:
      continue
    prompts_text = [r["prompt"] for r in keep]
    g = judge.global_scores(imgs, prompts_text) if scfg.use_global else [None] * len(keep)
    g = [_checked(v, rep) for v in g]
    boxes = [[reg["box"] for reg in regions.get(r["id"], {}).get("regions", [])] for r in keep]
    with_boxes = [i for i, b in enumerate(boxes) if b]
    rs: List[Dict[int, tuple]] = [dict() for _ in keep]
    if scfg.use_regions and with_boxes:
      got = judge.region_scores([imgs[i] for i in with_boxes], [prompts_text[i] for i in with_boxes],
                                [boxes[i] for i in with_boxes])
      for i, r in zip(with_boxes, got):
        rs[i] = {k: (s, o) for k, (s, o) in r.items() if _checked(s, rep) is not None}
    done_rows = []
    for i, row in enumerate(keep):
      gs = g[i]
      if scfg.use_global and gs is None:
        rep.global_failures += 1
        gs = float(scfg.global_default)
      if scfg.use_regions and boxes[i] and not rs[i]:
        rep.region_failures += 1
      regs = tuple(records.RegionReward(box=tuple(float(v) for v in boxes[i][k - 1]), score=float(s), object=o)
                   for k, (s, o) in sorted(rs[i].items()))
      rec = records.RewardRecord(image_file=row["image_file"], prompt=row["prompt"],
                                 global_score=None if gs is None else float(gs), regions=regs,
                                 image_size=(int(imgs[i].shape[1]), int(imgs[i].shape[0])),
                                 metadata={"id": row["id"], "category": row.get("category"), "mode": scfg.mode})
      done_rows.append(dict(rec.to_dict(), id=row["id"], seq=row.get("seq")))
      rep.scored += 1
      rep.regions_scored += len(regs)
      if gs is not None:
        g_values.append(gs)
      r_values += [r.score for r in regs]
    log.extend(done_rows)  # the chunk's records in one write
  bar.close()
  rep.retries = judge.retries
  stats = {"report": dataclasses.asdict(rep), "parse": dataclasses.asdict(judge.stats),
           "global_histogram": _histogram(g_values), "region_histogram": _histogram(r_values),
           "global_mean": float(np.mean(g_values)) if g_values else None,
           "region_mean": float(np.mean(r_values)) if r_values else None}
  files.write_json(paths.join(out_dir, "stats.json" if jax.process_count() == 1 else f"stats.{jax.process_index()}.json"),
                    stats)
  logs.merge_process_logs(out_dir, "rewards")  # training reads <out>/rewards.jsonl: every process's records
  progress.summary_line("score", **dataclasses.asdict(rep), out=out_dir)
  return rep
