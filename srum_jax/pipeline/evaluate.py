"""Stage `eval`: generate for held-out prompts, then judge every image; per-category tables (paper style).

Judges (one interface: `judge(images uint8 list, prompts list[str]) -> list[bool]`):
* `oracle`: a program named in the config (`eval.oracle_fn = "module:function"`, `(image, prompt) ->
  bool`), for synthetic worlds; it never sees the model.
* `self`: the UMM's own understanding: the global-layout score (generate or logits mode, `score.*`) above
  `eval.self_threshold` counts as correct.
* `hf_vlm`: a transformers image-text-to-text model from a local directory, asked whether the image
  matches the prompt (yes/no). Optional: a missing directory is a clear error before any work.

Writes `<out>/judgments.jsonl` (resumable), `<out>/table.json` and `<out>/table.md`.
"""
from __future__ import annotations

import importlib
import pathlib
from collections import OrderedDict
from typing import Callable, Dict, List, Sequence

from srum_jax.pipeline import common, generate, multihost


def _resolve(spec: str) -> Callable:
  module, _, fn = spec.partition(":")
  return getattr(importlib.import_module(module), fn)


class OracleJudge:
  def __init__(self, fn: str):
    self.fn = _resolve(fn)

  def __call__(self, images, prompts) -> List[bool]:
    return [bool(self.fn(im, p)) for im, p in zip(images, prompts)]


class SelfJudge:
  def __init__(self, scfg, model, threshold: float, seed: int, compute_dtype, attn_impl: str = "dense"):
    from srum_jax.pipeline.score import Judge, ScoreReport
    self.judge = Judge(scfg, model, seed=seed, compute_dtype=compute_dtype, attn_impl=attn_impl)
    self.threshold = threshold
    self.rep = ScoreReport()

  def __call__(self, images, prompts) -> List[bool]:
    scores = self.judge.global_scores(images, prompts, self.rep)
    return [s is not None and s > self.threshold for s in scores]


class HFVLMJudge:
  """A transformers VLM from a local directory answering 'Does the image show: <prompt>? yes or no'."""

  def __init__(self, model_dir: str):
    if not model_dir or not pathlib.Path(model_dir).is_dir():
      raise FileNotFoundError(f"eval.hf_vlm_dir {model_dir!r} is not a directory with a transformers VLM")
    from transformers import pipeline
    self.pipe = pipeline("image-text-to-text", model=model_dir)

  def __call__(self, images, prompts) -> List[bool]:
    from PIL import Image
    out = []
    for im, p in zip(images, prompts):
      msg = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(im)},
                                          {"type": "text", "text": f"Does the image show: {p}? Answer yes or no."}]}]
      ans = self.pipe(text=msg, max_new_tokens=5)[0]["generated_text"]
      text = ans[-1]["content"] if isinstance(ans, list) else str(ans)
      out.append(str(text).strip().lower().startswith("yes"))
    return out


def make_judge(ecfg, scfg, model, *, seed: int, compute_dtype, attn_impl: str = "dense"):
  name = ecfg.judge
  if name == "oracle":
    return OracleJudge(ecfg.oracle_fn)
  if name == "self":
    return SelfJudge(scfg, model, float(ecfg.self_threshold), seed, compute_dtype, attn_impl)
  if name == "hf_vlm":
    return HFVLMJudge(ecfg.hf_vlm_dir)
  raise ValueError(f"unknown eval judge {name!r}; choose oracle, self or hf_vlm")


def table(rows: Sequence[dict]) -> Dict[str, Dict[str, float]]:
  """{category: {correct, total, accuracy}} plus 'overall' (T2I-CompBench-style per-category table)."""
  tally: Dict[str, List[int]] = OrderedDict()
  for r in sorted(rows, key=lambda r: str(r.get("category"))):
    for k in (str(r.get("category")), "overall"):
      t = tally.setdefault(k, [0, 0])
      t[0] += int(bool(r["correct"]))
      t[1] += 1
  if "overall" in tally:
    tally.move_to_end("overall")
  return {k: {"correct": c, "total": n, "accuracy": c / n} for k, (c, n) in tally.items()}


def markdown(tables: Dict[str, Dict[str, Dict[str, float]]], title: str = "") -> str:
  """Side-by-side accuracy table: one column per model (e.g. base / SFT / SRUM), one row per category."""
  names = list(tables)
  cats = []
  for t in tables.values():
    cats += [c for c in t if c not in cats and c != "overall"]
  cats.append("overall")
  lines = ([f"### {title}", ""] if title else []) + ["| category | " + " | ".join(names) + " |",
                                                      "|---|" + "---|" * len(names)]
  for c in cats:
    cells = []
    for n in names:
      e = tables[n].get(c)
      cells.append("-" if e is None else f"{100 * e['accuracy']:.1f} ({e['correct']}/{e['total']})")
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def evaluate(ecfg, gcfg, scfg, model: common.Model, items, out_dir: str, *, seed: int, compute_dtype="float32",
             name: str = "model", attn_impl: str = "dense") -> Dict[str, Dict[str, float]]:
  out = pathlib.Path(out_dir)
  judge = make_judge(ecfg, scfg, model, seed=seed, compute_dtype=compute_dtype, attn_impl=attn_impl)
  generate.generate(gcfg, model, items, str(out), seed=seed, compute_dtype=compute_dtype, attn_impl=attn_impl)
  log = common.process_log(str(out), "judgments")
  done = {r["id"] for r in common.read_rows(str(out), "judgments")}
  rows = [r for r in common.process_shard(generate.read_metadata(str(out))) if r["id"] not in done]
  bad = 0
  for chunk in common.batched(rows, int(gcfg.batch_size)):
    imgs, keep = [], []
    for r in chunk:
      im, why = common.load_rgb(str(out / r["image_file"]))
      if im is None:
        bad += 1
        continue
      imgs.append(im)
      keep.append(r)
    for r, ok in zip(keep, judge(imgs, [r["prompt"] for r in keep])):
      log.append({"id": r["id"], "prompt": r["prompt"], "category": r.get("category"), "correct": bool(ok),
                  "judge": ecfg.judge})
  multihost.barrier(f"evaluate:{out_dir}")
  judged = common.read_rows(str(out), "judgments")
  t = table(judged)
  if multihost.is_main():
    common.write_json(str(out / "table.json"), t)
    (out / "table.md").write_text(markdown({name: t}))
  common.summary_line("eval", model=name, judge=ecfg.judge, images=len(judged), skipped_bad_image=bad,
                      overall=f"{100 * t.get('overall', {}).get('accuracy', 0.0):.1f}%", out=out_dir)
  return t
