"""The SRUM effect on the embedded default, over seeds: base vs SFT (R == 1, lambda = 0) vs SRUM.

    python benchmarks/tiny_world_effect.py --seeds 0,1,2 [--config experiments/tiny_world.py] [--set k=v ...]

Each seed runs the whole `run` loop (its own generation seed, judge seed and training order) from the same
pretrained checkpoint, with the SFT control trained on the same self-generated images. Prints per-category
oracle accuracy as mean +- std over seeds for each model and the paired differences SRUM - base and
SRUM - SFT, and writes them to <workdir>/effect.json. Report what it prints, whatever it is.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from srum_jax import config_utils  # noqa: E402
from srum_jax.pipeline import run  # noqa: E402


def _value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="experiments/tiny_world.py")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--workdir", default="outputs/tiny_world_effect")
  ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
  a = ap.parse_args()
  overrides = dict(kv.split("=", 1) for kv in a.set)
  tables = {}
  for seed in [int(s) for s in a.seeds.split(",")]:
    cfg = config_utils.load_config(a.config, {k: _value(v) for k, v in overrides.items()})
    with cfg.unlocked():
      cfg.seed = cfg.seed + 1000 * seed
      cfg.eval.seed = cfg.eval.seed  # same eval prompts and noise for every seed: a paired comparison
      cfg.workdir = os.path.join(a.workdir, f"seed_{seed}")
      cfg.run.sft_baseline = True
    tables[seed] = run.run(cfg)["tables"]
  models = ["base", "sft", "srum"]
  cats = [c for c in next(iter(tables.values()))["base"]]
  acc = {m: {c: np.array([100 * tables[s][m][c]["accuracy"] for s in tables]) for c in cats} for m in models}
  lines = ["| category | " + " | ".join(models) + " | SRUM - base | SRUM - SFT |", "|---|" + "---|" * 5]
  for c in cats:
    cells = [f"{acc[m][c].mean():.1f} +- {acc[m][c].std():.1f}" for m in models]
    d1, d2 = acc["srum"][c] - acc["base"][c], acc["srum"][c] - acc["sft"][c]
    cells += [f"{d1.mean():+.1f} +- {d1.std():.1f}", f"{d2.mean():+.1f} +- {d2.std():.1f}"]
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  text = f"Oracle accuracy (%) over seeds {sorted(tables)} (mean +- std)\n\n" + "\n".join(lines)
  print(text)
  os.makedirs(a.workdir, exist_ok=True)
  with open(os.path.join(a.workdir, "effect.json"), "w") as f:
    json.dump({"seeds": sorted(tables), "tables": tables,
               "summary": {m: {c: [float(acc[m][c].mean()), float(acc[m][c].std())] for c in cats} for m in models}},
              f, indent=1)


if __name__ == "__main__":
  main()
