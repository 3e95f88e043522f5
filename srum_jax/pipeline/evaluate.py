"""Stage `eval`: images for a prompt set (generated here, or a folder made elsewhere), then every metric in
`eval.metrics` (comma list); per-category tables (markdown + json) and a captioned image grid.

Metrics:
* `judge`: the accuracy of `eval.judge`, one interface `judge(images uint8 list, prompts) -> list[bool]`:
  - `oracle`: a program named in the config (`eval.oracle_fn = "module:function"`, `(image, prompt) -> bool`),
    for synthetic worlds; it never sees the model.
  - `self`: the UMM's own understanding: the global-layout score (generate or logits mode, `score.*`) above
    `eval.self_threshold` counts as correct.
  - `hf_vlm`: an image-text-to-text model (`eval.hf_vlm_dir`) answering "Does the image show: <prompt>?":
    correct when the answer starts with "yes" (the MLLM judge's batching, dtype and device).
* `compbench`, `mllm`, `geneval`, `reasonbench`: `srum_jax.evaluation` (T2I-CompBench's metrics, the 0-100
  MLLM judge, GenEval, T2I-ReasonBench). GenEval and T2I-ReasonBench bring their own prompt files
  (`eval_items`); the others read `prompts.val`.

Every metric's configuration (model folders, files) is checked before any image is generated. Metric models
are loaded one metric at a time and released after it. Writes `<out>/judgments.jsonl` and
`<out>/metrics/<metric>.jsonl` (one row per image, resumable), `<out>/table.json` ({column: table}),
`<out>/table.md`, `<out>/grid.png`, and `<out>/../summary.md` (every model evaluated under the same folder,
side by side).
"""
from __future__ import annotations

import gc
import importlib
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence

from srum_jax import distributed, files, paths, progress
from srum_jax.data.prompt_sources import load_prompts
from srum_jax.engine import loaded_model
from srum_jax.engine.judge import Judge, JudgeOptions
from srum_jax.errors import UserValueError
from srum_jax.evaluation import (compbench, geneval, image_folders, mllm_judge, reasonbench, report,
                                 torch_models)
from srum_jax.pipeline import generate
from srum_jax.workdir import layout, logs

METRICS = ("judge", "compbench", "mllm", "geneval", "reasonbench")  # `eval.metrics`
JUDGES = ("oracle", "self", "hf_vlm")  # `eval.judge`


def _resolve(spec: str) -> Callable:
  module, _, fn = spec.partition(":")
  return getattr(importlib.import_module(module), fn)


class OracleJudge:
  def __init__(self, fn: str):
    self.fn = _resolve(fn)

  def __call__(self, images, prompts) -> List[bool]:
    return [bool(self.fn(im, p)) for im, p in zip(images, prompts)]


class SelfJudge:
  def __init__(self, scfg, model, threshold: float, seed: int, compute_dtype, attn_impl: str = "dense", *,
               texts):
    self.judge = Judge(JudgeOptions.from_config(scfg), model, texts=texts, seed=seed,
                       compute_dtype=compute_dtype, attn_impl=attn_impl)
    self.threshold = threshold

  def __call__(self, images, prompts) -> List[bool]:
    scores = self.judge.global_scores(images, prompts)
    return [s is not None and s > self.threshold for s in scores]


class HFVLMJudge:
  """An image-text-to-text model answering 'Does the image show: <prompt>? Answer yes or no.'"""

  def __init__(self, ecfg):
    self.judge = mllm_judge.MLLMJudge(ecfg.hf_vlm_dir, "eval.hf_vlm_dir", device=torch_models.resolve_device(
        ecfg.device), dtype=torch_models.resolve_dtype(ecfg.mllm.torch_dtype), device_map=ecfg.mllm.device_map,
        batch_size=int(ecfg.mllm.batch_size))
    self.turn = mllm_judge.user_turn

  def __call__(self, images, prompts) -> List[bool]:
    convs = [[self.turn(f"Does the image show: {p}? Answer yes or no.")] for p in prompts]
    answers = self.judge.chat(images, convs, max_new_tokens=5)
    return [str(a).strip().lower().startswith("yes") for a in answers]


def make_judge(ecfg, scfg, model, *, seed: int, texts, compute_dtype, attn_impl: str = "dense"):
  name = ecfg.judge
  if name == "oracle":
    return OracleJudge(ecfg.oracle_fn)
  if name == "self":
    if model is None:
      raise ValueError("eval.judge = 'self' needs the UMM: set eval.model_dir (or model.dir)")
    return SelfJudge(scfg, model, float(ecfg.self_threshold), seed, compute_dtype, attn_impl, texts=texts)
  if name == "hf_vlm":
    return HFVLMJudge(ecfg)
  raise ValueError(f"unknown eval judge {name!r}; choose one of {JUDGES}")


def table(rows: Sequence[dict]) -> Dict[str, Dict[str, float]]:
  """{category: {correct, total, accuracy}} plus 'overall' (T2I-CompBench-style per-category table)."""
  tally: Dict[str, List[int]] = OrderedDict()
  for r in sorted(rows, key=lambda r: str(r.get("category"))):
    for k in (str(r.get("category")), "overall"):
      t = tally.setdefault(k, [0, 0])
      t[0] += int(r["correct"] is True)
      t[1] += 1
  if "overall" in tally:
    tally.move_to_end("overall")
  return {k: {"correct": c, "total": n, "accuracy": c / n} for k, (c, n) in tally.items()}


# ----------------------------------------------------------------------------------------------
# Metrics of srum_jax.evaluation


def parse_metrics(text: str) -> List[str]:
  """`eval.metrics` ("judge,compbench") -> the metric names, checked, in order."""
  names = list(dict.fromkeys(m.strip() for m in str(text).split(",") if m.strip()))
  unknown = [m for m in names if m not in METRICS]
  if unknown or not names:
    raise ValueError(f"eval.metrics {text!r}: unknown {unknown}; choose a comma list of {', '.join(METRICS)}")
  if "geneval" in names and "reasonbench" in names:
    raise ValueError("eval.metrics: geneval and reasonbench read different prompt files; evaluate them in two runs")
  return names


def eval_items(config, texts):
  """The prompts to evaluate: GenEval's metadata or T2I-ReasonBench's files when those metrics are asked for,
  else `prompts.val`."""
  metrics, ecfg = parse_metrics(config.eval.metrics), config.eval
  if "geneval" in metrics:
    return geneval.load_items(_required(ecfg.geneval.metadata, "eval.geneval.metadata"))[0]
  if "reasonbench" in metrics:
    r = ecfg.reasonbench
    return reasonbench.load_items(_required(r.prompts, "eval.reasonbench.prompts"),
                                  _required(r.questions, "eval.reasonbench.questions"), r.dimension, texts)[0]
  return load_prompts(config.prompts.val, "prompts.val")


def _required(value: str, key: str) -> str:
  if not value:
    raise ValueError(f"{key} is not set")
  return value


def check_metrics(ecfg, metrics: Sequence[str], items) -> None:
  """Fail before any work when a metric's model folder or file is missing."""
  dirs: Dict[str, str] = {}
  if "compbench" in metrics:
    dirs.update(compbench.CompBenchScorer.required_dirs(ecfg.compbench, {it.category for it in items}))
  if "mllm" in metrics or "reasonbench" in metrics:
    dirs["eval.mllm.model_dir"] = ecfg.mllm.model_dir
  if "geneval" in metrics:
    dirs["eval.geneval.detector_dir"] = ecfg.geneval.detector_dir
    dirs["eval.geneval.clip_dir"] = ecfg.geneval.clip_dir
  for key, path in dirs.items():
    torch_models.require_dir(path, key, "the metric's model")


def make_scorer(metric: str, ecfg, items, texts):
  device, dtype = torch_models.resolve_device(ecfg.device), torch_models.resolve_dtype(ecfg.torch_dtype)
  if metric == "compbench":
    return compbench.CompBenchScorer(ecfg.compbench, device=device, dtype=dtype, items=items)
  if metric == "mllm":
    return mllm_judge.MLLMScorer(ecfg.mllm, device=device, texts=texts)
  if metric == "geneval":
    return geneval.GenEvalScorer(ecfg.geneval, device=device, dtype=dtype,
                                 metadata=geneval.load_items(ecfg.geneval.metadata)[1])
  r = ecfg.reasonbench
  _, questions, dim = reasonbench.load_items(r.prompts, r.questions, r.dimension, texts)
  return reasonbench.ReasonBenchScorer(r, ecfg.mllm, device=device, questions=questions, dimension=dim,
                                       texts=texts)


def _load_images(chunk: Sequence[dict]):
  """(images, their rows, rows of unreadable files marked skipped)."""
  images, keep, bad = [], [], []
  for r in chunk:
    im, why = files.load_rgb(r["image_file"])
    if im is None:
      bad.append({"id": r["id"], "prompt": r["prompt"], "category": r.get("category"), "score": None,
                  "skipped": f"image {why}"})
    else:
      images.append(im)
      keep.append(r)
  return images, keep, bad


def _latest(directory: str, stem: str, wanted) -> Dict[str, dict]:
  """{id: its last good row} of the ids in `wanted`, over every process's `<stem>` log in
  `directory` (an id is only ever scored by one process; rows of the wrong types are skipped and
  counted)."""
  rep = logs.LogReport()
  out = {r["id"]: r for r in layout.read_metric(directory, stem, rep) if r["id"] in wanted}
  if rep.skipped:
    print(f"[eval] {stem} logs: skipped {rep.skipped} unreadable or incomplete lines ({rep})",
          flush=True)
  return out


def run_metric(scorer, rows: Sequence[dict], directory: str, stem: str, batch_size: int) -> List[dict]:
  """Score this process's share of the rows not yet in `<directory>/<stem>[.<process>].jsonl` (one line per
  image, appended as scored); every process's latest result of every row once all are done. Skipped rows
  (unreadable image, no metadata for the prompt) are tried again by a rerun."""
  log = logs.process_log(directory, stem)
  wanted = {r["id"] for r in rows}
  done = {i for i, r in _latest(directory, stem, wanted).items() if "skipped" not in r}
  todo = [r for r in distributed.process_shard(rows) if r["id"] not in done]
  bar = progress.bar(len(todo), scorer.name)
  for chunk in distributed.batched(todo, max(1, int(batch_size))):
    images, keep, bad = _load_images(chunk)
    log.extend(bad + (scorer(images, keep) if keep else []))
    bar.update(len(chunk))
  bar.close()
  distributed.barrier(f"metric:{directory}:{stem}")
  return list(_latest(directory, stem, wanted).values())


def _verdict(metric: str, row: dict) -> str:
  if row.get("score") is None:
    return "skipped" if "skipped" in row else "failed"
  if metric == "compbench":
    short = {"blip_vqa": "vqa", "three_in_one": "3-in-1"}
    return f"{row['score']:.3f} {short.get(row['metric'], row['metric'])}"
  if metric == "geneval":
    return "correct" if row["correct"] else "wrong"
  if metric == "reasonbench":
    return f"acc {row['score']:.0f} / quality {row['quality']:.0f}"
  return f"{row['score']:.0f}/100"


def judge_images(ecfg, judge, rows: Sequence[dict], out, batch_size: int) -> List[dict]:
  """The judge's verdict on every image not yet judged (this process's share, `<out>/judgments[.<process>].jsonl`);
  every process's rows of `rows`' ids once all are done."""
  log = logs.process_log(str(out), "judgments")
  done = {r["id"] for r in layout.read_judgments(str(out))}
  todo = [r for r in distributed.process_shard(rows) if r["id"] not in done]
  for chunk in distributed.batched(todo, max(1, int(batch_size))):
    images, keep, bad = _load_images(chunk)
    log.extend([{"id": r["id"], "prompt": r["prompt"], "category": r.get("category"), "correct": bool(ok),
                 "judge": ecfg.judge} for r, ok in zip(keep, judge(images, [r["prompt"] for r in keep]) if keep else [])])
    if bad:
      print(f"[eval] {len(bad)} unreadable images left out of the judge's table", flush=True)
  distributed.barrier(f"judge:{out}")
  wanted = {r["id"] for r in rows}
  rep = logs.LogReport()
  judged = [r for r in layout.read_judgments(str(out), rep) if r["id"] in wanted]
  if rep.skipped:
    print(f"[eval] judgments logs: skipped {rep.skipped} unreadable or incomplete lines ({rep})", flush=True)
  return judged


def score_images(ecfg, metrics: Sequence[str], judge, rows: Sequence[dict], items, out_dir: str, *,
                 batch_size: int, name: str, texts) -> Dict[str, dict]:
  """Every metric over `rows` (image_file absolute); writes the tables and the grid. Returns {"judge": the
  judge's accuracy table (or {}), "tables": the metric tables}."""
  out = paths.path(out_dir)  # local or remote (gs://)
  tables, verdicts, judge_table = [], {}, {}
  if judge is not None:
    judged = judge_images(ecfg, judge, rows, out, batch_size)
    judge_table = table(judged)
    tables.append(report.judge_columns(judge_table, ecfg.judge))
    verdicts[f"{ecfg.judge}"] = {r["id"]: "yes" if r["correct"] else "no" for r in judged}
  for metric in (m for m in metrics if m != "judge"):
    scorer = make_scorer(metric, ecfg, items, texts)
    scored = run_metric(scorer, rows, str(out / "metrics"), metric, batch_size)
    del scorer
    gc.collect()
    tables += [report.metric_table(scored, metric, *col) for col in report.COLUMNS[metric]]
    verdicts[metric] = {r["id"]: _verdict(metric, r) for r in scored}
  _write(out, tables, rows, verdicts, int(ecfg.grid_images), name)
  overall = {t["column"]: t["overall"]["mean"] for t in tables}
  progress.summary_line("eval", model=name, images=len(rows), **{k.split(" (")[0].replace(" ", "_"): (
      "-" if v is None else round(v, 4)) for k, v in overall.items()}, out=out_dir)
  return {"judge": judge_table, "tables": tables}


def _write(out, tables: List[dict], rows, verdicts, grid_images: int, name: str) -> None:
  """The tables (json, markdown), the grid and the side-by-side summary; written by process 0."""
  if not distributed.is_main():
    return
  files.write_json(str(out / "table.json"), {t["column"]: t for t in tables})
  md = report.markdown(tables, title=f"{name}: {len(rows)} images")
  (out / "table.md").write_text(md)
  print("\n" + md, flush=True)
  picture = report.grid(rows, verdicts, grid_images, title=name) if grid_images > 0 else None
  if picture is not None:
    files.save_png(str(out / "grid.png"), picture)
  (out.parent / "summary.md").write_text(report.side_by_side(str(out.parent)))


def evaluate(ecfg, gcfg, scfg, model: loaded_model.Model, items, out_dir: str, *, seed: int, texts,
             compute_dtype="float32", name: str = "model", attn_impl: str = "dense") -> Dict[str, Dict[str, float]]:
  """Generate the missing images of `items` into `out_dir` (sharded, resumable), then score them with every
  metric of `ecfg.metrics`; returns the judge's accuracy table ({} without the judge). `texts`: the think
  system prompts, the self-judge's questions and the metric judges' rubrics (`rewards.texts`)."""
  metrics = parse_metrics(ecfg.metrics)
  judge = (make_judge(ecfg, scfg, model, seed=seed, texts=texts, compute_dtype=compute_dtype, attn_impl=attn_impl)
           if "judge" in metrics else None)
  check_metrics(ecfg, metrics, items)
  generate.generate(gcfg, model, items, out_dir, seed=seed, texts=texts, compute_dtype=compute_dtype,
                    attn_impl=attn_impl)
  rows = [dict(r, image_file=paths.join(out_dir, r["image_file"])) for r in layout.read_metadata(out_dir)]
  wanted = {it.id for it in items}
  rows = [r for r in rows if r.get("prompt_id", r["id"]) in wanted]
  return score_images(ecfg, metrics, judge, rows, items, out_dir, batch_size=int(ecfg.batch_size), name=name,
                      texts=texts)["judge"]


def evaluate_folder(ecfg, scfg, model: Optional[loaded_model.Model], items, images_dir: str, out_dir: str, *,
                    seed: int, texts, compute_dtype="float32", name: str = "model",
                    attn_impl: str = "dense") -> Dict[str, dict]:
  """Score the images of `images_dir` (made elsewhere; `srum_jax.evaluation.images` matches them to `items`)."""
  metrics = parse_metrics(ecfg.metrics)
  rows, rep = image_folders.collect(images_dir, items)  # before any model loads
  progress.summary_line("eval-folder", layout=rep.layout, files=rep.files, matched=rep.matched,
                        unmatched_files=len(rep.unmatched_files),
                        prompts_without_image=rep.prompts_without_image)
  if not rows:
    raise UserValueError(f"config key eval.images_dir: no image in {images_dir} matches a prompt "
                         f"({rep.files} files; see srum_jax/evaluation/image_folders.py for the "
                         f"accepted names)")
  judge = (make_judge(ecfg, scfg, model, seed=seed, texts=texts, compute_dtype=compute_dtype,
                      attn_impl=attn_impl) if "judge" in metrics else None)
  check_metrics(ecfg, metrics, items)
  return score_images(ecfg, metrics, judge, rows, items, out_dir, batch_size=int(ecfg.batch_size),
                      name=name, texts=texts)
