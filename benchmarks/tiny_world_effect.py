"""The SRUM effect on the embedded default, over seeds: base vs SFT (R == 1, lambda = 0) vs SRUM.

    python benchmarks/tiny_world_effect.py --seeds 0,1,2 [--config experiments/tiny_world.py] \\
        [--set k=v ...] [--lever srum.lambda_constraint=0.0,0.1] [--column "k1=v1 k2=v2" ...] \\
        [--oracle_ceiling] [--on_train_prompts] [--workdir outputs/tiny_world_effect]

Each seed runs the whole `run` loop (its own generation seed, judge seed and training order) from
the same pretrained checkpoint, with the SFT control trained on the same self-generated images.
Prints per-category oracle accuracy as mean +- std over seeds for each model and the paired
differences SRUM - base and SRUM - SFT, on val and on every eval-only prompt set of the config
(`prompts.eval_extra`; the shapes world's generalisation split `gen`: forms neither train nor val
holds), and writes them to <workdir>/effect.json. Report what it prints, whatever it is.

Why SRUM helps or not is in the judge: after each run (never inside it) the oracle also checks the
round-0 candidates, and the script prints how well the self-judge's global scores separate them (ROC
AUC, accuracy of score > 0) and the mean reward-map value of oracle-correct vs oracle-wrong
candidates. Each --column is one more SRUM model trained on the same candidates and rewards with
several overrides, paired with SRUM itself, e.g. LoRA against full fine-tuning:
    --column "model.lora.rank=8 train.lr=1e-3"
The base model's eval is the same for every seed (eval.seed is fixed), so a seed reuses the base
images of any seed already in the workdir; every stage resumes, so seeds can run as separate
invocations with one --workdir, and a last invocation over all of them prints the table over seeds.
With --on_train_prompts every model is also evaluated on the train prompts (the prompts its
candidates were drawn for), to tell a recipe that does not learn from its data from one that does
not generalise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from srum_jax import config_utils, files, paths  # noqa: E402
from srum_jax.data import prompt_sources  # noqa: E402
from srum_jax.engine import loaded_model  # noqa: E402
from srum_jax.metrics import roc_auc  # noqa: E402
from srum_jax.pipeline import evaluate, run, train as train_stage  # noqa: E402
from srum_jax.rewards import records as records_lib, texts as texts_lib  # noqa: E402
from srum_jax.workdir import logs  # noqa: E402
from srum_jax.worlds.shapes import judge_text  # noqa: E402


def oracle_checked_candidates(workdir: str):
  """(record, image, oracle verdict) for each readable round-0 candidate (the images SRUM trained
  on)."""
  rd = os.path.join(workdir, "round_0")
  for rec in logs.JsonlLog(os.path.join(rd, "score", "rewards.jsonl")).rows():
    im, _ = files.load_rgb(os.path.join(rd, "generate", rec["image_file"]))
    if im is not None:
      yield rec, im, bool(judge_text(im, rec["prompt"]))


def candidate_diagnostics(workdir: str, levers) -> dict:
  """Self-judge vs oracle on the round-0 candidates (reward maps under the run's `levers`)."""
  g, ok, r_mean = [], [], []
  for rec, im, verdict in oracle_checked_candidates(workdir):
    g.append(float(rec.get("global_score") or 0.0))
    ok.append(verdict)
    r_mean.append(
        float(
            run.record_reward_map(records_lib.record_from_dict(rec), im.shape[:2], levers).mean()))
  g, ok, r_mean = np.asarray(g), np.asarray(ok), np.asarray(r_mean)
  return dict(
      n=int(len(g)), oracle_correct=float(ok.mean()) if len(ok) else None, judge_auc=roc_auc(
          g, ok), judge_accuracy=float(np.mean((g > 0) == ok)) if len(ok) else None,
      reward_mean_correct=float(r_mean[ok].mean()) if ok.any() else None,
      reward_mean_wrong=float(r_mean[~ok].mean()) if (~ok).any() else None)


def _copy_stage_dirs(src: str, dst: str) -> None:
  """Seed the lever run's workdir with what does not depend on the lever (resumable stages skip it):
  the converted model, the base model's evals (val and every extra set) and round 0's candidates and
  rewards."""
  rels = [os.path.join(d, "base") for d in os.listdir(src) if d == "eval" or d.startswith("eval_")]
  stages = [os.path.join("round_0", s) for s in ("generate", "propose", "score")]
  for rel in ["converted_model"] + rels + stages:
    if os.path.isdir(os.path.join(src, rel)) and not os.path.exists(os.path.join(dst, rel)):
      shutil.copytree(os.path.join(src, rel), os.path.join(dst, rel))


def _reuse_base_eval(root: str, workdir: str, folder: str = "eval") -> None:
  """Seed `workdir`/<folder>/base with another seed's base eval under `root` (eval.seed is the same
  for every seed; resumable stage: the copied images are judged again, not redrawn)."""
  base_eval = os.path.join(workdir, folder, "base")
  if os.path.exists(base_eval) or not os.path.isdir(root):
    return
  for name in sorted(os.listdir(root)):
    other = os.path.join(root, name, folder, "base")
    if name.startswith("seed_") and os.path.isdir(other):
      shutil.copytree(other, base_eval)
      return


def oracle_filtered_sft(cfg) -> dict:
  """The ceiling of reward-filtered self-training: SFT (same settings as the control) on only the
  round-0 candidates the oracle accepts, as a perfect binary judge would pick them; evaluated like
  the others, on val and every `prompts.eval_extra` set ({set: table}). A diagnostic run after the
  SRUM run, which never sees the oracle."""
  rd = os.path.join(cfg.workdir, "round_0")
  out = os.path.join(cfg.workdir, "oracle_sft_train")
  records = os.path.join(out, "rewards.jsonl")  # paths.write_bytes makes `out`
  kept = [rec for rec, _, verdict in oracle_checked_candidates(cfg.workdir) if verdict]
  paths.write_bytes(records, "".join(json.dumps(rec) + "\n" for rec in kept).encode("utf-8"))
  base = loaded_model.load_model(loaded_model.resolve_model_dir(cfg))
  summary = run.train_model(cfg, base, records, os.path.join(rd, "generate"), out,
                            objective_name="sft")
  model = loaded_model.save_model(os.path.join(cfg.workdir, "oracle_sft_model"), base,
                                  summary["params"], summary["cfg"])
  return {s: evaluate.evaluate(cfg.eval, cfg.eval_generate, cfg.score, model, items,
                               os.path.join(cfg.workdir, folder, "oracle_sft"), seed=cfg.eval.seed,
                               texts=texts_lib.from_setting(cfg.texts.file),
                               compute_dtype=cfg.model.compute_dtype, name="oracle_sft")
          for s, (folder, items) in eval_sets(cfg).items()}


def eval_sets(cfg) -> dict:
  """{set: (eval folder, prompt items)}: val, then each `prompts.eval_extra` set, as `run` evaluates
  them."""
  out = {"val": ("eval", prompt_sources.load_prompts(cfg.prompts.val))}
  out.update({k: (f"eval_{k}", v) for k, v in run.extra_eval_sets(cfg).items()})
  return out


def _model_dirs(cfg, names) -> dict:
  """Where the run left each evaluated model (base: the configured model dir)."""
  where = {
      "base": loaded_model.resolve_model_dir(cfg),
      "sft": os.path.join(cfg.workdir, "sft_model"),
      "srum": os.path.join(cfg.workdir, "round_0", "model"),
      "oracle_sft": os.path.join(cfg.workdir, "oracle_sft_model")
  }
  return {n: where[n] for n in names if n in where}


def train_prompt_tables(cfg, names) -> dict:
  """Each model's oracle table on the train prompts (same eval settings and seed as on val)."""
  items = prompt_sources.load_prompts(cfg.prompts.train)
  return {
      name: evaluate.evaluate(
          cfg.eval, cfg.eval_generate, cfg.score, loaded_model.load_inference_model(cfg,
                                                                                    path), items,
          os.path.join(cfg.workdir, "eval_train",
                       name), seed=cfg.eval.seed, texts=texts_lib.from_setting(
                           cfg.texts.file), compute_dtype=cfg.model.compute_dtype, name=name,
          attn_impl=loaded_model.attn_impl(cfg)) for name, path in _model_dirs(cfg, names).items()
  }


def table_text(tables: dict, title: str):
  """Markdown: mean +- std over seeds per model and category, and the paired differences of each
  SRUM column to base and to SFT, and of each extra SRUM column to SRUM; returns
  (text, {model: {category: accuracies over seeds}})."""
  models = list(next(iter(tables.values())))
  models = ["base", "sft", "srum"] + [m for m in models if m not in ("base", "sft", "srum")]
  cats = [c for c in next(iter(tables.values()))["base"]]
  acc = {
      m: {
          c: np.array([100 * tables[s][m][c]["accuracy"] for s in tables]) for c in cats
      } for m in models
  }
  srums = [m for m in models if m.startswith("srum")]
  pairs = [(m, ref) for ref in ("base", "sft") for m in srums]
  pairs += [(m, "srum") for m in srums if m != "srum"]  # extra columns (levers, LoRA) vs SRUM
  head = models + [f"{m} - {ref}" for m, ref in pairs]
  lines = ["| category | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
  for c in cats:
    cells = [f"{acc[m][c].mean():.1f} +- {acc[m][c].std():.1f}" for m in models]
    for m, ref in pairs:
      d = acc[m][c] - acc[ref][c]
      cells.append(f"{d.mean():+.1f} +- {d.std():.1f}")
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  text = f"{title} over seeds {sorted(tables)} (mean +- std over seeds; differences paired)\n\n"
  return text + "\n".join(lines), acc


def _set_title(name: str) -> str:
  return {"val": "Oracle accuracy (%) on the val prompts",
          "train": "Oracle accuracy (%) on the train prompts"}.get(
      name, f"Oracle accuracy (%) on the '{name}' prompts (prompts.eval_extra)")


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="experiments/tiny_world.py")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--workdir", default="outputs/tiny_world_effect")
  ap.add_argument("--set", action="append", default=[],
                  help="config override key=value (repeatable)")
  ap.add_argument(
      "--lever", default="",
      help="key=v1,v2,...: extra SRUM columns trained on the same candidates and rewards, e.g. "
      "srum.lambda_constraint=0.0,0.1 or srum.use_local=False")
  ap.add_argument("--column", action="append", default=[],
                  help="'k1=v1 k2=v2 ...' (repeatable): one extra SRUM column per flag with these "
                       "overrides, trained on the same candidates and rewards (a lever of several "
                       "keys, e.g. LoRA: 'model.lora.rank=8 train.lr=1e-3')")
  ap.add_argument(
      "--oracle_ceiling", action="store_true",
      help="also train SFT on only the oracle-correct candidates (column oracle_sft): what a "
           "perfect "
      "binary judge would give")
  ap.add_argument(
      "--on_train_prompts", action="store_true",
      help="also evaluate every model on the train prompts (section 'on train prompts')")
  a = ap.parse_args()
  overrides = config_utils.parse_overrides(a.set)
  columns = {}  # column name -> its overrides
  if a.lever:
    lever_key, _, vals = a.lever.partition("=")
    for v in vals.split(","):
      columns[f"srum[{lever_key.split('.')[-1]}={v}]"] = {lever_key: config_utils.literal(v)}
  for text in a.column:
    columns[f"srum[{text}]"] = config_utils.parse_overrides(text.split())
  tables, diags = {}, {}  # tables: {set: {seed: {model: table}}}; sets: val, the extra sets, train
  seeds = [int(s) for s in a.seeds.split(",")]
  for seed in seeds:
    cfg = config_utils.load_config(a.config, overrides)
    with cfg.unlocked():
      cfg.seed = cfg.seed + 1000 * seed
      # same eval prompts and noise for every seed: a paired comparison
      cfg.eval.seed = cfg.eval.seed
      cfg.workdir = os.path.join(a.workdir, f"seed_{seed}")
      cfg.run.sft_control = True
    for folder, _ in eval_sets(cfg).values():
      _reuse_base_eval(a.workdir, cfg.workdir, folder)
    out = run.run(cfg)
    for name, t in {"val": out["tables"], **out["extra_tables"]}.items():
      tables.setdefault(name, {})[seed] = dict(t)
    diags[seed] = candidate_diagnostics(cfg.workdir, train_stage.step_options(cfg).levers)
    print(f"[seed {seed}] candidates: {json.dumps(diags[seed])}", flush=True)
    for column, extra in columns.items():  # same candidates and rewards, another SRUM setting
      lc = config_utils.load_config(a.config, {**overrides, **extra})
      with lc.unlocked():
        lc.seed, lc.run.sft_control = cfg.seed, False
        lc.workdir = os.path.join(a.workdir, f"seed_{seed}", "lever_" + "_".join(
            f"{k}={v}" for k, v in extra.items()).replace("/", "|").replace(" ", ""))
      _copy_stage_dirs(cfg.workdir, lc.workdir)
      lo = run.run(lc)
      for name, t in {"val": lo["tables"], **lo["extra_tables"]}.items():
        tables[name][seed][column] = t[next(k for k in t if k.startswith("srum"))]
    if a.oracle_ceiling:
      for name, t in oracle_filtered_sft(cfg).items():
        tables[name][seed]["oracle_sft"] = t
    if a.on_train_prompts:
      tables.setdefault("train", {})[seed] = train_prompt_tables(cfg, list(tables["val"][seed]))
  text, acc = table_text(tables["val"], _set_title("val"))
  summary = {"val": acc}
  for name in [n for n in tables if n != "val"]:
    t, summary[name] = table_text(tables[name], _set_title(name))
    text += "\n\n" + t
  keys = [
      "oracle_correct", "judge_auc", "judge_accuracy", "reward_mean_correct", "reward_mean_wrong"
  ]
  text += "\n\nSelf-judge on the round-0 candidates (oracle as reference; mean over seeds)\n\n"
  text += "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n| " + " | ".join(
      f"{np.mean([diags[s][k] for s in diags if diags[s][k] is not None]):.3f}" for k in keys) + " |"
  print(text)
  means = {s: {m: {c: [float(v.mean()), float(v.std())] for c, v in per.items()}
               for m, per in acc_s.items()} for s, acc_s in summary.items()}
  files.write_json(os.path.join(a.workdir, "effect.json"),
                   {"seeds": seeds, "tables": tables, "candidates": diags, "overrides": a.set,
                    "lever": a.lever, "columns": a.column, "summary": means})
  paths.write_bytes(os.path.join(a.workdir, "effect.md"), (text + "\n").encode("utf-8"))


if __name__ == "__main__":
  main()
