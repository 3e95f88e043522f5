"""Stage `run`: the whole SRUM loop from one config, with a final report.

    baseline eval -> for each round: generate (train prompts) -> propose -> score (self-judge)
    -> train -> eval of the post-trained model; optionally the SFT control: the same
    self-generated images trained with R == 1 and lambda = 0 from the same starting model, then
    evaluated.

With LoRA (`model.lora.rank` > 0) each round trains the adapters further (round r + 1 starts from
round r's) and writes round_<r>/model as an adapters-only model dir over the base model; the SFT
control trains its own adapters from the base.

Every eval runs on `prompts.val` and on each further prompt set named in `prompts.eval_extra` (e.g.
the shapes world's generalisation split: prompt forms that neither train nor val holds), each with
the same eval seed; extra sets are evaluated, never trained on (`check_eval_sets_unseen`). Their
images go to <workdir>/eval_<set>/<model>.

Every stage is resumable, so a restarted `run` continues where it stopped. Every output it will
write is known before any work (`plan`): outputs another configuration made stop the run with exit
code 2, unless `discard_stale`. The report folder holds
report.json / report.md (per-category before/after, SFT, where the outputs are), grids of the same
prompts and seeds before/after, reward-map overlays on the scored candidates, and the loss curves.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re
import time
from typing import Dict, List, Optional

import numpy as np

from srum_jax import distributed, files, paths, viz
from srum_jax.data.prompt_sources import load_prompts, require_prompts
from srum_jax.engine import loaded_model
from srum_jax.errors import UserValueError
from srum_jax.evaluation import report
from srum_jax.pipeline import evaluate, generate, propose, provenance, score, train as train_stage
from srum_jax.rewards import records as records_lib, texts as texts_lib
from srum_jax.training import objective
from srum_jax.workdir import layout


def train_model(config, model: loaded_model.Model, records: str, images_root: str, workdir: str, *,
                objective_name: str = "srum") -> dict:
  """Train the model saved at `model.path` on reward records (its parameters restored straight onto
  the training mesh in `model.param_dtype`); the summary's `params` are the trained ones, of its
  `cfg` (`train.train`; with LoRA: base + adapters)."""
  cfg, params, tokenizer = train_stage.default_load_model(config, model.path)
  return train_stage.train(config, cfg=cfg, params=params, tokenizer=tokenizer,
                           records_path=records, images_root=images_root, workdir=workdir,
                           objective_name=objective_name)


def _grid_before_after(report_dir: pathlib.Path, eval_dirs: Dict[str, str], n: int) -> List[str]:
  """PNG table: one row per model, one column per prompt (its first image, the same seed in every
  row; the categories in turn), the prompt above each column and the judge's verdict under each
  image; small images upscaled (nearest neighbour)."""
  rows = {name: {r["id"]: r for r in layout.read_metadata(d)} for name, d in eval_dirs.items()}
  common_ids = set.intersection(*[set(r) for r in rows.values()])
  first = rows[next(iter(rows))]
  ids = [r["id"] for r in report.spread([first[i] for i in sorted(common_ids)], n)]
  if not ids:
    return []
  cells, captions = [], []
  for name, d in eval_dirs.items():
    verdicts = {j["id"]: j for j in layout.read_judgments(d)}
    images = [files.load_rgb(os.path.join(d, rows[name][i]["image_file"]))[0] for i in ids]
    cells.append([im if im is not None else np.zeros((32, 32, 3), np.uint8) for im in images])
    captions.append([
        f"{verdicts[i].get('judge')}: {'yes' if verdicts[i].get('correct') else 'no'}"
        if i in verdicts else "" for i in ids
    ])
  grid = viz.labeled_grid(cells, [first[i]["prompt"] for i in ids], row_titles=list(eval_dirs),
                          cell_captions=captions,
                          title="same prompts and seeds per column; judge verdict below")
  path = report_dir / "grid_before_after.png"
  files.save_png(str(path), grid)
  return [str(path)]


def record_reward_map(record, image_hw, levers: objective.RewardLevers) -> np.ndarray:
  """[H, W] reward map of one reward record (`rewards.records.RewardRecord`): the map the loss
  weighs."""
  arrays = records_lib.records_to_arrays([record], max_regions=max(1, len(record.regions)))
  return np.asarray(
      objective.reward_maps(
          objective.RegionRewards(*arrays), image_hw=tuple(image_hw), levers=levers))[0]


def _reward_overlays(report_dir: pathlib.Path, gen_dir: str, score_dir: str, n: int,
                     levers: objective.RewardLevers) -> List[str]:
  """Scored candidates with their reward maps (the maps the loss weighs) and the judged boxes,
  enlarged so the region scores are legible, each under its prompt with its global score."""
  recs, _ = records_lib.read_records(os.path.join(score_dir, "rewards.jsonl"))
  tiles, titles, captions = [], [], []
  for r in recs[:n]:
    im, _ = files.load_rgb(os.path.join(gen_dir, r.image_file))
    if im is None:
      continue
    m = record_reward_map(r, im.shape[:2], levers)
    scale = max(1, -(-192 // max(1, min(im.shape[:2]))))
    tiles.append(
        viz.overlay_reward_map(im, m, boxes=[reg.box for reg in r.regions],
                               scores=[reg.score for reg in r.regions], signed=levers.signed,
                               scale=scale))
    titles.append(r.prompt)
    g = "-" if r.global_score is None else f"{r.global_score:+.2f}"
    captions.append(f"global {g}, {len(r.regions)} regions")
  if not tiles:
    return []
  ramp = "-1" if levers.signed else "0"
  path = report_dir / "reward_overlays.png"
  files.save_png(str(path), viz.labeled_grid([tiles], titles, cell_captions=[captions], title=(
      f"reward map: red {ramp} -> green 1; boxes: the judge's region scores in [-1, 1]")))
  return [str(path)]


class StageClock:
  """Wall seconds per named stage of this invocation, in the order the stages ran (a resumed stage
  that had nothing left to do shows the seconds it took to find that out)."""

  def __init__(self):
    self.seconds: Dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, name: str):
    t0 = time.time()
    try:
      yield
    finally:
      self.seconds[name] = round(self.seconds.get(name, 0.0) + time.time() - t0, 2)


class Preempted(Exception):
  """A training stage was stopped by a signal: its state is saved, nothing after it runs; rerun
  to resume."""


def _trained(summary: dict) -> dict:
  if summary["preempted"]:
    raise Preempted(
        f"training stopped by a signal at step {summary['steps']}; its checkpoint is in "
        f"{summary['checkpoint']}; run the same command again to resume")
  return summary


def accumulate_counters(path: pathlib.Path, current: Dict[str, int]) -> Dict[str, int]:
  """A stage's counters over every invocation of a resumed run: counters of work done (`scored`,
  `retries`, ...) add this invocation's to those stored at `path`; `images` and `skipped_*` describe
  what this invocation saw (a rerun sees the same items again) and are taken as they are. Written
  back by process 0."""
  before = {}
  if path.is_file():
    try:
      before = files.read_json(path, "counters")
    except UserValueError:
      before = {}
  if not isinstance(before, dict):  # a damaged file counts from zero again
    before = {}
  before = {k: v for k, v in before.items() if isinstance(v, int) and not isinstance(v, bool)}
  total = {k: v if k == "images" or k.startswith("skipped") else int(before.get(k, 0) or 0) + v
           for k, v in current.items()}
  total["invocations"] = int(before.get("invocations", 0) or 0) + 1
  if distributed.is_main():
    files.write_json(str(path), total)
  return total


def plan(config, base_identity: str, train_items, val_items,
         extra_items: Optional[Dict[str, list]] = None) -> Dict[str, object]:
  """Every output unit of the run (`provenance`), known before any work: {"units": [...], "rounds":
  [each round's units], "final": the final eval's name, "sft_train": the SFT control's training unit
  or None}. `extra_items`: the eval-only sets ({set: items}, `extra_eval_sets`), evaluated like
  val."""
  work = str(config.workdir)
  rounds, units, current = [], [], base_identity
  extra = [(f"eval_{k}", f"{k}/", v) for k, v in (extra_items or {}).items()]
  sets = [("eval", "", val_items)] + extra

  def evals(name: str, model: str) -> None:
    for folder, prefix, items in sets:
      units.extend(provenance.eval_units(config, paths.join(work, folder, name), model=model,
                                         items=items, name=prefix + name, images_dir=""))

  evals("base", base_identity)
  for r in range(int(config.run.rounds)):
    rd = provenance.round_units(config, paths.join(work, f"round_{r}"), model=current,
                                seed=config.seed + r, items=train_items, label=f"round {r}")
    rounds.append(rd)
    units.extend(rd.values())
    current = rd["train"].fingerprint
  final = "srum" if int(config.run.rounds) <= 1 else f"srum_r{int(config.run.rounds)}"
  evals(final, current)
  sft = None
  if config.run.sft_control and int(config.run.rounds) >= 1:
    sft = provenance.train_unit(config, paths.join(work, "sft_train"), model=base_identity,
                                records={"score": rounds[0]["score"].fingerprint}, objective="sft",
                                what="SFT control train")
    units.append(sft)
    evals("sft", sft.fingerprint)
  return {"units": units, "rounds": rounds, "final": final, "sft_train": sft}


def _srum_rounds(config, base: loaded_model.Model, train_items, work: pathlib.Path,
                 clock: StageClock, round_units: List[dict], texts: texts_lib.Texts):
  """rounds x (generate -> propose -> score -> train); returns (final model, per-round
  summaries)."""
  dt, attn, current, rounds = config.model.compute_dtype, loaded_model.attn_impl(config), base, []
  for r in range(int(config.run.rounds)):
    rd = work / f"round_{r}"
    gen_dir, prop_dir, score_dir = str(rd / "generate"), str(rd / "propose"), str(rd / "score")
    with clock(f"round_{r}/generate"):
      generate.generate(config.generate, current, train_items, gen_dir, seed=config.seed + r,
                        texts=texts, compute_dtype=dt, attn_impl=attn)
    with clock(f"round_{r}/propose"):
      propose.propose(config.propose, gen_dir, prop_dir, mesh=loaded_model.inference_mesh(config))
    with clock(f"round_{r}/score"):
      srep = score.score(config.score, current, gen_dir, prop_dir, score_dir, seed=config.seed + r,
                         texts=texts, compute_dtype=dt, attn_impl=attn)
    # counted as soon as the stage is done (a later crash cannot lose them)
    score_counts = accumulate_counters(rd / "score_counters.json",
                                       distributed.sum_over_processes(dataclasses.asdict(srep)))
    score_counts["scored"] = len(layout.read_rewards(score_dir))  # the records on disk: exact
    with clock(f"round_{r}/train"):
      summary = _trained(
          train_model(config, current, os.path.join(score_dir, "rewards.jsonl"), gen_dir,
                      str(rd / "train")))
      current = loaded_model.save_model(str(rd / "model"), current, summary["params"],
                                        cfg=summary["cfg"],
                                        identity=round_units[r]["train"].fingerprint)
    rounds.append({"round": r, "score": score_counts, "train": {
        k: v for k, v in summary.items() if k not in ("state", "params", "cfg")}})
  return current, rounds


def _table_markdown(config, tables: Dict[str, dict], num: int, what: str) -> str:
  """One markdown table: every model's judge accuracy per category on one prompt set."""
  per = int(config.eval_generate.samples_per_prompt)
  on = f"{num} {what}" + (f" x {per} images" if per > 1 else "")
  title = (f"Oracle-judged accuracy (%) on {on}" if config.eval.judge == "oracle"
           else f"{config.eval.judge}-judged accuracy (%) on {on}")
  return report.markdown([report.judge_columns(t, config.eval.judge, column=name, counts=True)
                          for name, t in tables.items()], title=title)


def _write_report(config, work: pathlib.Path, tables: Dict[str, dict], eval_dirs: Dict[str, str],
                  rounds: list, num_val: int, seconds: float, stage_seconds: Dict[str, float],
                  extra: Dict[str, dict]) -> dict:
  """report.json / report.md, grids, overlays and loss curves (process 0 writes; every process
  returns it). `extra`: {set name: {"tables": {model: table}, "num": prompts, "eval_dirs": {model:
  dir}}}."""
  report_dir = work / "report"
  md = _table_markdown(config, tables, num_val, "validation prompts")
  for set_name, e in extra.items():
    md += "\n\n" + _table_markdown(config, e["tables"], e["num"],
                                   f"'{set_name}' prompts (prompts.eval_extra)")
  extra_tables = {k: e["tables"] for k, e in extra.items()}
  if not distributed.is_main():
    return {"tables": tables, "extra_tables": extra_tables, "rounds": rounds, "workdir": str(work),
            "eval_dirs": eval_dirs, "seconds": seconds, "stage_seconds": stage_seconds,
            "judge": config.eval.judge}
  pictures = _grid_before_after(report_dir, {k: eval_dirs[k] for k in tables},
                                int(config.run.report_images))
  if rounds:
    levers = train_stage.step_options(config).levers
    pictures += _reward_overlays(report_dir, str(work / "round_0" / "generate"),
                                 str(work / "round_0" / "score"), int(config.run.report_images),
                                 levers)
    for r in range(len(rounds)):
      curve = work / f"round_{r}" / "train" / "loss_curve.png"
      if curve.is_file():
        paths.copy_file(curve, report_dir / f"loss_curve_round_{r}.png")
        pictures.append(str(report_dir / f"loss_curve_round_{r}.png"))
  runs = accumulate_counters(report_dir / "run_counters.json", {"seconds": int(round(seconds))})
  summary = {"tables": tables, "extra_tables": extra_tables, "rounds": rounds, "workdir": str(work),
             "eval_dirs": eval_dirs,
             "extra_eval_dirs": {k: e["eval_dirs"] for k, e in extra.items()},
             "pictures": pictures, "seconds": runs["seconds"], "seconds_this_invocation": seconds,
             "invocations": runs["invocations"], "stage_seconds": stage_seconds,
             "judge": config.eval.judge}
  files.write_json(str(report_dir / "report.json"), summary)
  lines = ["# SRUM run report", "", md, "", "## Where things are", ""]
  lines += [f"- {k}: `{v}`" for k, v in eval_dirs.items()]
  lines += [f"- {k} on {s}: `{v}`" for s, e in extra.items() for k, v in e["eval_dirs"].items()]
  lines += [f"- picture: `{p}`" for p in pictures]
  lines += [
      "",
      f"Total time: {runs['seconds']:.0f} s over {runs['invocations']} invocation(s) (this one "
      f"{seconds:.0f} s)",
      "", "| stage (this invocation) | s |", "|---|---|"
  ]
  lines += [f"| {k} | {v:.0f} |" for k, v in stage_seconds.items()]
  (report_dir / "report.md").write_text("\n".join(lines) + "\n")
  print("\n" + md, flush=True)
  print(f"report: {report_dir / 'report.md'}", flush=True)
  return summary


def run(config) -> dict:
  """The loop: eval(base) -> rounds -> eval, plus the SFT control when `run.sft_control`; returns
  the report. A preempted training stops the run (`Preempted`); rerunning resumes every stage."""
  t0, clock = time.time(), StageClock()
  work = paths.path(config.workdir)  # local or remote (gs://): etils.epath
  train_items = load_prompts(config.prompts.train, "prompts.train")
  val_items = load_prompts(config.prompts.val, "prompts.val")
  require_prompts(train_items, "prompts.train")
  require_prompts(val_items, "prompts.val")
  extra_items = extra_eval_sets(config)
  check_eval_sets_unseen(config, train_items, extra_items)
  outputs = plan(config, loaded_model.identity_of(config), train_items, val_items, extra_items)
  provenance.claim(config, outputs["units"])  # before any work: another config's outputs stop here
  (work / "report").mkdir(parents=True, exist_ok=True)
  with clock("load"):
    model_dir = loaded_model.resolve_model_dir(config)
    loaded_model.check_model_dir(model_dir)
    base = loaded_model.load_inference_model(config, model_dir)
  # the think system prompts, judge questions, rubrics
  texts = texts_lib.from_setting(config.texts.file)
  tables: Dict[str, dict] = {}
  eval_dirs: Dict[str, str] = {}
  extra = {k: {"tables": {}, "num": len(v), "eval_dirs": {}} for k, v in extra_items.items()}

  def do_eval(name: str, model: loaded_model.Model):
    sets = [(val_items, "eval", tables, eval_dirs)] + [
        (v, f"eval_{k}", extra[k]["tables"], extra[k]["eval_dirs"]) for k, v in extra_items.items()]
    for items, folder, out, dirs in sets:
      d = str(work / folder / name)
      with clock(f"{folder}/{name}"):
        out[name] = evaluate.evaluate(config.eval, config.eval_generate, config.score, model, items,
                                      d, seed=config.eval.seed, texts=texts,
                                      compute_dtype=config.model.compute_dtype, name=name,
                                      attn_impl=loaded_model.attn_impl(config))
      dirs[name] = d

  do_eval("base", base)
  current, rounds = _srum_rounds(config, base, train_items, work, clock, outputs["rounds"], texts)
  name = outputs["final"]
  do_eval(name, current)
  order = ["base", name]
  if config.run.sft_control and int(config.run.rounds) >= 1:
    rd = work / "round_0"
    with clock("sft/train"):
      summary = _trained(
          train_model(config, base, str(rd / "score" / "rewards.jsonl"), str(rd / "generate"),
                      str(work / "sft_train"), objective_name="sft"))
      sft_model = loaded_model.save_model(str(work / "sft_model"), base, summary["params"],
                                          summary["cfg"], identity=outputs["sft_train"].fingerprint)
    do_eval("sft", sft_model)
    order = ["base", "sft", name]
  for e in extra.values():
    e["tables"] = {k: e["tables"][k] for k in order}
  return _write_report(config, work, {k: tables[k] for k in order}, eval_dirs, rounds,
                       len(val_items),
                       time.time() - t0, clock.seconds, extra)


def eval_set_names(config) -> List[str]:
  """The names of `prompts.eval_extra`'s sets, each a folder name (`eval_<name>/`); else a user
  error."""
  names = list(config.prompts.eval_extra.keys())
  for name in names:
    if not re.fullmatch(r"[A-Za-z0-9._+=-]+", name) or name in (".", ".."):
      raise UserValueError(
          f"config key prompts.eval_extra.{name}: the set's name must be a folder name "
          "(letters, digits, . _ + = -)")
  return names


def extra_eval_sets(config) -> Dict[str, list]:
  """{name: prompt items} of `prompts.eval_extra` (each a prompt source; none by default), in config
  order."""
  out = {}
  for name in eval_set_names(config):
    items = load_prompts(config.prompts.eval_extra[name], f"prompts.eval_extra.{name}")
    require_prompts(items, f"prompts.eval_extra.{name}")
    out[name] = items
  return out


def check_eval_sets_unseen(config, train_items: list, extra_items: Dict[str, list]) -> None:
  """Refuse (one line) a run whose eval-only sets (`prompts.eval_extra`) share a prompt text with
  the train prompts (the candidates are generated from those) or, with the anchor on
  (`srum.anchor_weight` > 0), with the anchor's prompts: those sets measure what training never
  saw."""
  trained = {"prompts.train": {it.prompt for it in train_items}}
  if float(config.srum.anchor_weight) > 0:
    trained["prompts.anchor"] = {
        it.prompt for it in load_prompts(config.prompts.anchor, "prompts.anchor")
    }
  for name, items in extra_items.items():
    for source, texts in trained.items():
      shared = sorted({it.prompt for it in items} & texts)
      if shared:
        raise UserValueError(
            f"prompts.eval_extra.{name} shares {len(shared)} prompt(s) with {source} "
            f"(e.g. {shared[0]!r}); an eval-only set must stay out of training")
