"""Is the fine-tuning recipe at fault? SFT the shipped tiny model on PERFECT images and see what
happens.

    python benchmarks/recipe_diagnostics.py [--config experiments/tiny_world.py] [--set k=v ...] \\
        [--lever train.timestep_shift=1.0,4.0] [--images_per_prompt 4] [--workdir DIR]

The SRUM train stage's recipe (the config's `train` / `srum` blocks, SFT objective: R == 1, lambda
0) is run on ground-truth renders of the tiny world's train prompts (`grammar.sample_scene` + the
exact renderer: images every oracle accepts, with exactly the named objects, the distribution
pretraining drew from), not on the model's own samples. Each model is evaluated like `run` does
(oracle, eval seed fixed) on the train prompts and on the val prompt_sources. If SFT on perfect data
lowers accuracy, the recipe (steps, lr, optimizer, timestep sampling, text dropout) damages the
generator whatever the data; if it raises it, the model's own candidates are what limits
self-training. `--lever key=v1,v2` adds one SFT model per value (same data).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from srum_jax import config_utils  # noqa: E402
from srum_jax import files
from srum_jax.data import prompt_sources
from srum_jax.engine import loaded_model
from srum_jax.pipeline import evaluate, run  # noqa: E402
from srum_jax.rewards import records as records_lib, texts as texts_lib  # noqa: E402
from srum_jax.workdir import layout
from srum_jax.worlds.shapes import grammar, scene as scene_lib


def truth_records(cfg, out_dir: str, per_prompt: int, seed: int) -> str:
  """Ground-truth renders of the train prompts as reward records (global 1, no regions); returns
  the path."""
  images = os.path.join(out_dir, "images")
  os.makedirs(images, exist_ok=True)
  path = os.path.join(out_dir, "rewards.jsonl")
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for item in prompt_sources.load_prompts(cfg.prompts.train):
      for k in range(per_prompt):
        name = layout.image_file_name(f"truth-{item.id}#{k}")
        image = scene_lib.render(grammar.sample_scene(rng, grammar.parse_prompt(item.prompt)))
        files.save_png(os.path.join(images, name), image)
        rec = records_lib.RewardRecord(image_file=name, prompt=item.prompt, global_score=1.0,
                                       image_size=(image.shape[1], image.shape[0]),
                                       metadata={"id": f"{item.id}#{k}", "category": item.category})
        f.write(json.dumps(rec.to_dict()) + "\n")
  return path


def tables_for(cfg, model, name: str) -> dict:
  """Oracle tables of one model on the train and the val prompts (run's eval settings and seed)."""
  out = {}
  for split in ("train", "val"):
    items = prompt_sources.load_prompts(cfg.prompts[split])
    out[split] = evaluate.evaluate(cfg.eval, cfg.eval_generate, cfg.score, model, items,
                                   os.path.join(cfg.workdir, f"eval_{split}", name),
                                   seed=cfg.eval.seed, texts=texts_lib.from_setting(
                                       cfg.texts.file), compute_dtype=cfg.model.compute_dtype,
                                   name=name, attn_impl=loaded_model.attn_impl(cfg))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="experiments/tiny_world.py")
  ap.add_argument("--workdir", default="outputs/recipe_diagnostics")
  ap.add_argument("--set", action="append", default=[],
                  help="config override key=value (repeatable)")
  ap.add_argument("--lever", default="", help="key=v1,v2,...: one more SFT model per value")
  ap.add_argument("--images_per_prompt", type=int, default=4)
  a = ap.parse_args()
  overrides = config_utils.parse_overrides(a.set)
  variants = {"sft_truth": {}}
  if a.lever:
    key, _, vals = a.lever.partition("=")
    variants.update({
        f"sft_truth[{key.split('.')[-1]}={v}]": {
            key: config_utils.literal(v)
        } for v in vals.split(",")
    })
  cfg = config_utils.load_config(a.config, {**overrides, "workdir": a.workdir})
  records = truth_records(cfg, os.path.join(a.workdir, "truth"), a.images_per_prompt, int(cfg.seed))
  base = loaded_model.load_model(loaded_model.resolve_model_dir(cfg))
  results = {"base": tables_for(cfg, base, "base")}
  for name, extra in variants.items():
    vcfg = config_utils.load_config(a.config, {**overrides, **extra, "workdir": a.workdir})
    # no brackets in checkpoint paths
    where = os.path.join(a.workdir, re.sub(r"[^A-Za-z0-9._-]", "_", name))
    summary = run.train_model(vcfg, base, records, os.path.join(a.workdir, "truth", "images"),
                              os.path.join(where, "train"), objective_name="sft")
    model = loaded_model.save_model(os.path.join(where, "model"), base, summary["params"],
                                    summary["cfg"])
    results[name] = tables_for(vcfg, model, name)
  cats = list(results["base"]["val"])
  lines = []
  for split in ("train", "val"):
    lines += [f"\nOracle accuracy (%) on the {split} prompts", "| category | " + " | ".join(results) + " |",
              "|---|" + "---|" * len(results)]
    for c in cats:
      lines.append(f"| {c} | " + " | ".join(f"{100 * results[m][split][c]['accuracy']:.1f}" for m in results) + " |")
  text = "\n".join(lines)
  print(text)
  with open(os.path.join(a.workdir, "recipe_diagnostics.json"), "w") as f:
    json.dump({"results": results, "overrides": a.set, "lever": a.lever}, f, indent=1)
  with open(os.path.join(a.workdir, "recipe_diagnostics.md"), "w") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  main()
