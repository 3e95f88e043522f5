"""Why SRUM forgets prompt forms its candidates do not cover: diagnostics over effect-benchmark
workdirs.

    python benchmarks/generalisation_diagnostics.py params --runs outputs/tiny_world_effect/seed_0
    python benchmarks/generalisation_diagnostics.py forms --runs outputs/tiny_world_effect/seed_0
    python benchmarks/generalisation_diagnostics.py steps --run outputs/tiny_world_effect/seed_0 \\
        [--config experiments/tiny_world.py] [--set k=v ...] --at 0,200,400,800,1600 \\
        [--objective srum|sft]

params: how far each parameter group moved, ||theta - theta_base|| / ||theta_base||, for the SRUM
  and SFT models a run left (round_0/model, sft_model) and any lever models under it
  (lever_*/round_0/model).
forms: the forms of the candidates the run trained on (prompt form: groups, determiners, relation,
  shared colour or shape; and what the oracle reads in the candidate images) next to the forms of
  the generalisation split.
steps: retrain SRUM (or the SFT control) on the run's round-0 candidates with checkpoints at the
  given steps and evaluate each on val and every `prompts.eval_extra` set: accuracy on covered and
  uncovered forms over training.
Prints markdown; nothing here feeds training.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from srum_jax import config_utils  # noqa: E402
from srum_jax import files  # noqa: E402
from srum_jax.data import prompt_sources  # noqa: E402
from srum_jax.engine import loaded_model  # noqa: E402
from srum_jax.pipeline import evaluate, run, train as train_stage  # noqa: E402
from srum_jax.rewards import texts as texts_lib  # noqa: E402
from srum_jax.workdir import layout  # noqa: E402
from srum_jax.worlds.shapes import generalisation, grammar, oracle  # noqa: E402

GROUPS = ("und expert", "gen expert", "embed_tokens", "lm_head", "time_embedder", "vae2llm",
          "llm2vae", "other")


def group_of(path) -> str:
  """The parameter group of a {'bagel': ...} leaf path (the understanding expert: its layers and
  final norm)."""
  keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  if keys[0] != "bagel":
    return "other"
  sub = keys[1:]
  if sub[:3] == ["llm", "layers", "und"] or sub[:2] == ["llm", "norm"]:
    return "und expert"
  if sub[:3] == ["llm", "layers", "gen"] or sub[:2] == ["llm", "norm_gen"]:
    return "gen expert"
  if sub[:2] in (["llm", "embed_tokens"], ["llm", "lm_head"]):
    return sub[1]
  return sub[0] if sub[0] in GROUPS else "other"


def relative_moves(base, trained) -> dict:
  """{group: ||trained - base|| / ||base||} over the group's leaves (Frobenius over all of them)."""
  num, den = collections.defaultdict(float), collections.defaultdict(float)
  flat_b = jax.tree_util.tree_flatten_with_path(base)[0]
  flat_t = jax.tree.leaves(trained)
  for (path, b), t in zip(flat_b, flat_t):
    g = group_of(path)
    b, t = np.asarray(b, np.float64), np.asarray(t, np.float64)
    num[g] += float(np.sum((t - b) ** 2))
    den[g] += float(np.sum(b ** 2))
  return {g: np.sqrt(num[g] / den[g]) if den[g] else 0.0 for g in num}


def cmd_params(a):
  cfg = config_utils.load_config(a.config, config_utils.parse_overrides(a.set))
  with cfg.unlocked():
    cfg.workdir = a.runs[0]
  base = loaded_model.load_model(loaded_model.resolve_model_dir(cfg)).params
  rows = collections.defaultdict(list)
  for r in a.runs:
    models = {"srum": os.path.join(r, "round_0", "model"), "sft": os.path.join(r, "sft_model")}
    for lever in sorted(glob.glob(os.path.join(r, "lever_*", "round_0", "model"))):
      models[os.path.basename(os.path.dirname(os.path.dirname(lever)))] = lever
    for name, d in models.items():
      if os.path.isdir(d):
        rows[name].append(relative_moves(base, loaded_model.load_model(d).params))
  present = [g for g in GROUPS if any(g in m for ms in rows.values() for m in ms)]
  print("Relative change ||theta - theta_base|| / ||theta_base|| per parameter group "
        "(mean over runs)\n")
  print("| model | " + " | ".join(present) + " |\n|---|" + "---|" * len(present))
  for name, ms in rows.items():
    print(f"| {name} ({len(ms)}) | " +
          " | ".join(f"{np.mean([m.get(g, 0.0) for m in ms]):.4f}" for g in present) + " |")


def form_of(spec) -> str:
  """A prompt's form: number of groups, determiners, connector, and whether kinds share a colour /
  shape."""
  dets = ",".join("a" if not g.exact else grammar.NUMBER_WORDS[g.count] for g in spec.objects)
  kinds = [(g.color, g.shape) for g in spec.objects]
  shared = []
  if len({k[0] for k in kinds}) < len(kinds):
    shared.append("colour")
  if len({k[1] for k in kinds}) < len(kinds):
    shared.append("shape")
  conn = "rel" if spec.relations else ("and" if len(kinds) > 1 else "-")
  return f"{len(kinds)} groups [{dets}] {conn}; shared: {'+'.join(shared) or 'none'}"


def _canon_form(spec) -> str:
  """`form_of` with the determiners sorted (word order is a surface form)."""
  f = form_of(spec)
  head, _, rest = f.partition("[")
  dets, _, tail = rest.partition("]")
  return f"{head}[{','.join(sorted(dets.split(',')))}]{tail}"


def cmd_forms(a):
  train, _ = grammar.split_prompts(0)
  train_forms = collections.Counter(_canon_form(p.spec) for p in train)
  gen_forms = collections.defaultdict(collections.Counter)
  for p in generalisation.gen_prompts():
    gen_forms[p.category][_canon_form(p.spec)] += 1
  print("Forms of the train prompts (the candidates' prompts; determiners sorted)\n")
  print("| form | train prompts |\n|---|---|")
  for f, n in sorted(train_forms.items()):
    print(f"| {f} | {n} |")
  print("\nForms of the generalisation split, and how many train prompts share each form\n")
  print("| category | form | gen prompts | train prompts of that form |\n|---|---|---|---|")
  for c in generalisation.GEN_CATEGORIES:
    for f, n in sorted(gen_forms[c].items()):
      print(f"| {c} | {f} | {n} | {train_forms.get(f, 0)} |")
  for r in a.runs:
    rows = layout.read_metadata(os.path.join(r, "round_0", "generate"))
    seen = collections.Counter()
    for row in rows:
      im, _ = files.load_rgb(os.path.join(r, "round_0", "generate", row["image_file"]))
      if im is None:
        continue
      dets = oracle.detect(im, value_range=(0, 255))
      kinds = [(d.color, d.shape) for d in dets]
      seen["images"] += 1
      seen[f"{len(dets)} objects"] += 1
      if len(set(kinds)) < len(kinds):
        seen["a kind drawn twice or more"] += 1
      shapes = [k[1] for k in set(kinds)]
      if len(shapes) != len(set(shapes)):
        seen["two kinds of one shape"] += 1
      colours = [k[0] for k in set(kinds)]
      if len(colours) != len(set(colours)):
        seen["two kinds of one colour"] += 1
    print(f"\nWhat the oracle reads in the candidate images of {r} (of {seen['images']} images)\n")
    print("| read | images |\n|---|---|")
    for k, n in sorted(seen.items()):
      if k != "images":
        print(f"| {k} | {n} ({100 * n / max(1, seen['images']):.1f}%) |")


def cmd_steps(a):
  overrides = config_utils.parse_overrides(a.set)
  cfg = config_utils.load_config(a.config, overrides)
  at = sorted(int(s) for s in a.at.split(","))
  out = os.path.join(a.run, f"steps_{a.objective}")
  with cfg.unlocked():
    cfg.workdir = a.run
    cfg.train.steps = at[-1]
    # each call's last step is saved anyway; the next call resumes from it
    cfg.train.save_every = at[-1] + 1
  base = loaded_model.load_model(loaded_model.resolve_model_dir(cfg))
  rd = os.path.join(a.run, "round_0")
  texts = texts_lib.from_setting(cfg.texts.file)
  sets = {"val": ("eval", prompt_sources.load_prompts(cfg.prompts.val))}
  sets.update({k: (f"eval_{k}", v) for k, v in run.extra_eval_sets(cfg).items()})
  tables = {}
  done = 0
  for step in at:
    if step > done:
      with cfg.unlocked():
        cfg.train.steps = step
      summary = run.train_model(cfg, base, os.path.join(rd, "score", "rewards.jsonl"),
                                os.path.join(rd, "generate"), out, objective_name=a.objective)
      done = step
      model = loaded_model.save_model(os.path.join(out, f"model_{step}"), base, summary["params"])
    else:
      model = base
    for s, (folder, items) in sets.items():
      d = (os.path.join(a.run, folder, "base") if step == 0
           else os.path.join(out, folder, f"step_{step}"))
      tables[(step, s)] = evaluate.evaluate(cfg.eval, cfg.eval_generate, cfg.score, model, items, d,
                                            seed=cfg.eval.seed, texts=texts,
                                            compute_dtype=cfg.model.compute_dtype,
                                            name=f"step_{step}",
                                            attn_impl=loaded_model.attn_impl(cfg))
  for s in sets:
    cats = list(tables[(at[0], s)])
    print(f"\n{a.objective} on {a.run}'s candidates: oracle accuracy (%) on {s} by training step\n")
    print("| step | " + " | ".join(cats) + " |\n|---|" + "---|" * len(cats))
    for step in at:
      print(f"| {step} | " +
            " | ".join(f"{100 * tables[(step, s)][c]['accuracy']:.1f}" for c in cats) + " |")


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("what", choices=("params", "forms", "steps"))
  ap.add_argument("--config", default="experiments/tiny_world.py")
  ap.add_argument("--set", action="append", default=[],
                  help="config override key=value (repeatable)")
  ap.add_argument("--runs", nargs="*", default=[],
                  help="effect-benchmark seed workdirs (params, forms)")
  ap.add_argument("--run", default="",
                  help="one seed workdir whose round-0 candidates are retrained (steps)")
  ap.add_argument("--at", default="0,50,100,200,300", help="steps to evaluate (steps)")
  ap.add_argument("--objective", default="srum", choices=train_stage.OBJECTIVES)
  a = ap.parse_args()
  {"params": cmd_params, "forms": cmd_forms, "steps": cmd_steps}[a.what](a)


if __name__ == "__main__":
  main()
