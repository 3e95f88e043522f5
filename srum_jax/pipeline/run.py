"""Stage `run`: the whole SRUM loop from one config, with a final report.

    baseline eval -> for each round: generate (train prompts) -> propose -> score (self-judge) -> train
    -> eval of the post-trained model; optionally the SFT control: the same self-generated images trained
    with R == 1 and lambda = 0 from the same starting model, then evaluated.

Every stage is resumable, so a restarted `run` continues where it stopped. The report folder holds
report.json / report.md (per-category before/after, SFT, where the outputs are), grids of the same
prompts and seeds before/after, reward-map overlays on the scored candidates, and the loss curves.
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import shutil
import time
from typing import Dict, List

import numpy as np

from srum_jax.pipeline import common, evaluate, generate, propose, score
from srum_jax.pipeline.prompts import load_prompts


def _train(config, model: common.Model, records: str, images_root: str, workdir: str, *, sft: bool):
  from srum_jax.pipeline import train as train_stage
  c = copy.deepcopy(config)
  if sft:
    with c.unlocked():
      c.train.sft_baseline = True
  summary = train_stage.train(c, cfg=model.cfg, params=model.params, tokenizer=model.tokenizer, records_path=records,
                              images_root=images_root, workdir=workdir)
  if float(c.train.ema_decay) > 0 and summary["state"].ema is not None:  # the trained model is the EMA (as BAGEL's)
    summary["params"] = dict(summary["params"], bagel=summary["state"].ema)
  return summary


def _grid_before_after(report_dir: pathlib.Path, eval_dirs: Dict[str, str], n: int) -> List[str]:
  """PNG grid: one row per model, same prompts and seeds in each column."""
  from srum_jax import viz
  rows = {name: {r["id"]: r for r in generate.read_metadata(d)} for name, d in eval_dirs.items()}
  ids = sorted(set.intersection(*[set(r) for r in rows.values()]))[:n]
  if not ids:
    return []
  images, captions = [], []
  for name, d in eval_dirs.items():
    for i in ids:
      im, _ = common.load_rgb(os.path.join(d, rows[name][i]["image_file"]))
      images.append(im if im is not None else np.zeros((32, 32, 3), np.uint8))
      captions.append(name)
  grid = viz.image_grid(np.stack(images), ncols=len(ids), captions=captions)
  path = report_dir / "grid_before_after.png"
  viz.save_png(str(path), grid)
  (report_dir / "grid_prompts.txt").write_text("\n".join(f"col {k}: {rows[next(iter(rows))][i]['prompt']}"
                                                        for k, i in enumerate(ids)) + "\n")
  return [str(path)]


def record_reward_map(record: dict, height: int, width: int, signed: bool = False) -> np.ndarray:
  """The [height, width] reward map of one reward record (its regions and global score)."""
  from srum_jax.rewards import reward_map
  regs = record.get("regions") or []
  K = max(1, len(regs))
  boxes = np.zeros((1, K, 4), np.float32)
  scores = np.zeros((1, K), np.float32)
  valid = np.zeros((1, K), bool)
  for k, reg in enumerate(regs):
    boxes[0, k], scores[0, k], valid[0, k] = reg["box"], reg["score"], True
  g = np.asarray([record.get("global_score") or 0.0], np.float32)
  return np.asarray(reward_map(boxes, scores, valid, g, height=height, width=width, signed=signed))[0]


def _reward_overlays(report_dir: pathlib.Path, gen_dir: str, score_dir: str, n: int, signed: bool) -> List[str]:
  from srum_jax import viz
  rows = common.JsonlLog(os.path.join(score_dir, "rewards.jsonl")).rows()[:n]
  tiles = []
  for r in rows:
    im, _ = common.load_rgb(os.path.join(gen_dir, r["image_file"]))
    if im is None:
      continue
    regs = r.get("regions") or []
    m = record_reward_map(r, im.shape[0], im.shape[1], signed)
    tiles.append(viz.overlay_reward_map(im, m, boxes=[reg["box"] for reg in regs],
                                        scores=[reg["score"] for reg in regs]))
  if not tiles:
    return []
  path = report_dir / "reward_overlays.png"
  viz.save_png(str(path), viz.image_grid(np.stack(tiles), ncols=min(8, len(tiles))))
  return [str(path)]


def run(config) -> dict:
  t0 = time.time()
  work = pathlib.Path(config.workdir)
  report_dir = work / "report"
  report_dir.mkdir(parents=True, exist_ok=True)
  common.check_model_dir(config.model.dir)  # fail before any work
  base = common.load_model(config.model.dir)
  train_items = load_prompts(config.prompts.train)
  val_items = load_prompts(config.prompts.val)
  if not train_items or not val_items:
    raise ValueError(f"no prompts: {len(train_items)} train / {len(val_items)} val")
  dt = config.model.compute_dtype
  tables: Dict[str, dict] = {}
  eval_dirs: Dict[str, str] = {}

  def do_eval(name: str, model: common.Model):
    d = str(work / "eval" / name)
    tables[name] = evaluate.evaluate(config.eval, config.eval_generate, config.score, model, val_items, d,
                                     seed=config.eval.seed, compute_dtype=dt, name=name)
    eval_dirs[name] = d

  do_eval("base", base)
  current = base
  rounds = []
  for r in range(int(config.run.rounds)):
    rd = work / f"round_{r}"
    gen_dir, prop_dir, score_dir = str(rd / "generate"), str(rd / "propose"), str(rd / "score")
    generate.generate(config.generate, current, train_items, gen_dir, seed=config.seed + r, compute_dtype=dt)
    propose.propose(config.propose, gen_dir, prop_dir)
    srep = score.score(config.score, current, gen_dir, prop_dir, score_dir, seed=config.seed + r, compute_dtype=dt)
    summary = _train(config, current, os.path.join(score_dir, "rewards.jsonl"), gen_dir, str(rd / "train"),
                     sft=False)
    current = common.save_model(str(rd / "model"), current, summary["params"])
    rounds.append({"round": r, "score": srep.__dict__, "train": {k: v for k, v in summary.items()
                                                                  if k not in ("state", "params")}})
  name = "srum" if int(config.run.rounds) <= 1 else f"srum_r{int(config.run.rounds)}"
  do_eval(name, current)

  if config.run.sft_baseline and int(config.run.rounds) >= 1:
    rd = work / "round_0"
    summary = _train(config, base, str(rd / "score" / "rewards.jsonl"), str(rd / "generate"), str(work / "sft_train"),
                     sft=True)
    sft_model = common.save_model(str(work / "sft_model"), base, summary["params"])
    do_eval("sft", sft_model)
    order = ["base", "sft", name]
  else:
    order = ["base", name]

  ordered = {k: tables[k] for k in order}
  per = int(config.eval_generate.samples_per_prompt)
  on = f"{len(val_items)} validation prompts" + (f" x {per} images" if per > 1 else "")
  md = evaluate.markdown(ordered, title=f"Oracle-judged accuracy (%) on {on}"
                         if config.eval.judge == "oracle" else f"{config.eval.judge}-judged accuracy (%)")
  pictures = _grid_before_after(report_dir, {k: eval_dirs[k] for k in order}, int(config.run.report_images))
  if rounds:
    pictures += _reward_overlays(report_dir, str(work / "round_0" / "generate"), str(work / "round_0" / "score"),
                                 int(config.run.report_images), bool(config.srum.signed_rewards))
    for r in range(len(rounds)):
      curve = work / f"round_{r}" / "train" / "loss_curve.png"
      if curve.is_file():
        shutil.copy2(curve, report_dir / f"loss_curve_round_{r}.png")
        pictures.append(str(report_dir / f"loss_curve_round_{r}.png"))
  report = {"tables": ordered, "rounds": rounds, "workdir": str(work), "eval_dirs": eval_dirs, "pictures": pictures,
            "seconds": time.time() - t0, "judge": config.eval.judge}
  common.write_json(str(report_dir / "report.json"), report)
  lines = [f"# SRUM run report", "", md, "", "## Where things are", ""]
  lines += [f"- {k}: `{v}`" for k, v in eval_dirs.items()]
  lines += [f"- picture: `{p}`" for p in pictures]
  lines += ["", f"Total time: {report['seconds']:.0f} s"]
  (report_dir / "report.md").write_text("\n".join(lines) + "\n")
  print("\n" + md, flush=True)
  print(f"report: {report_dir / 'report.md'}", flush=True)
  return report
