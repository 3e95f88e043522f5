"""The self-judge's speed, logits mode vs generate mode, and how well the two rank the same images.

    # the shipped tiny-world model on world scenes
    python benchmarks/judge.py
    python benchmarks/judge.py --config experiments/bagel_7b_compbench.py --set model.dir=CKPT \
        # a real-size model (plumbing on random pixels)
        --images random:1024 --num 16 --max_new_tokens 64

Both modes are the score stage's `Judge` (`srum_jax.pipeline.score`) answering the global-layout
question for the same `--num` (image, prompt) pairs in batches of `score.batch_size`: `logits` reads
the expected score token after "Score:" (one forward), `generate` decodes an answer and parses it
(retries off unless `--retries`). Images: `world` renders shapes-world scenes for the world's
prompts, every other one a hard negative (so the scores have something to rank); `random:S` draws
uniform S x S pixels (speed only). Each mode runs one batch first (compilation), then every batch
timed: images/s. Rank agreement: Spearman's rho between the two modes' scores over the images both
scored (generate answers that fail to parse are counted and left out).
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
import time
from typing import List, Optional, Sequence

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from srum_jax import config_utils
from srum_jax.engine import loaded_model
from srum_jax.engine.judge import Judge, JudgeOptions
from srum_jax.rewards import texts as texts_lib  # noqa: E402
from srum_jax.worlds.shapes import grammar, scene as scene_lib


def average_ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 1..n with ties sharing their mean rank."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="mergesort")
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(1, len(x) + 1)
  for v in np.unique(x):
    tie = x == v
    ranks[tie] = ranks[tie].mean()
  return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
  """Spearman's rho: Pearson correlation of average ranks (nan when either side is constant or n
  < 2)."""
  ra, rb = average_ranks(np.asarray(a)), average_ranks(np.asarray(b))
  if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
    return float("nan")
  return float(np.corrcoef(ra, rb)[0, 1])


def world_items(n: int, seed: int = 0):
  """n (uint8 image, prompt) pairs from the shapes world: scenes of val prompts, odd ones hard
  negatives."""
  rng = np.random.default_rng(seed)
  _, val = grammar.split_prompts(0)
  items = []
  for i in range(n):
    p = val[int(rng.integers(len(val)))]
    sc = grammar.sample_scene(rng, p)
    if i % 2:
      sc, _ = grammar.hard_negative(rng, p, sc)
    items.append((scene_lib.render(sc), p.text))
  return items


def random_items(n: int, size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  _, val = grammar.split_prompts(0)
  return [(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), val[i % len(val)].text)
          for i in range(n)]


def _batches(items, size: int):
  return [items[i:i + size] for i in range(0, len(items), size)]


def run_mode(config, model, items, mode: str, out=print) -> dict:
  scfg = config.score.copy_and_resolve_references()
  scfg.mode = mode
  judge = Judge(
      JudgeOptions.from_config(scfg), model, texts=texts_lib.from_setting(config.texts.file),
      seed=int(config.seed), compute_dtype=config.model.compute_dtype, attn_impl=str(
          config.model.attn_impl))
  batches = _batches(items, max(1, int(scfg.batch_size)))
  t = time.perf_counter()
  judge.global_scores([im for im, _ in batches[0]], [p for _, p in batches[0]])
  first = time.perf_counter() - t
  scores = []
  t = time.perf_counter()
  for b in batches:
    scores += judge.global_scores([im for im, _ in b], [p for _, p in b])
  seconds = time.perf_counter() - t
  failed = sum(s is None for s in scores)
  r = dict(mode=mode, images_per_s=len(items) / seconds, seconds=seconds, first_batch_s=first,
           scores=scores, parse_failures=failed)
  out(f"{mode}: images_per_s {r['images_per_s']:.3f} ({len(items)} images in {seconds:.3f} s, "
      f"batches of "
      f"{int(scfg.batch_size)}; first batch with compilation {first:.1f} s); parse_failures "
      f"{failed}"
     )
  return r


def measure(config, items, out=print) -> dict:
  import jax
  model = loaded_model.load_inference_model(config, loaded_model.resolve_model_dir(config))
  dev = jax.devices()[0]
  out(f"device: {getattr(dev, 'device_kind', dev.platform)} ({dev.platform}, jax "
      f"{jax.__version__}); model "
      f"{model.path}; {len(items)} images {items[0][0].shape[0]}x{items[0][0].shape[1]}; think "
      f"{bool(config.score.think)}; max_new_tokens {int(config.score.max_new_tokens_global)}; "
      f"retries "
      f"{int(config.score.max_retries)}")
  logits = run_mode(config, model, items, "logits", out)
  gen = run_mode(config, model, items, "generate", out)
  both = [(a, b) for a, b in zip(logits["scores"], gen["scores"]) if a is not None and b is not None
         ]
  rho = spearman([a for a, _ in both], [b for _, b in both]) if both else float("nan")
  ratio = logits["images_per_s"] / gen["images_per_s"]
  out(f"logits/generate speed {ratio:.2f}x; spearman_rho {rho:.3f} over {len(both)} images scored "
      f"by both"
     )
  return dict(logits=logits, generate=gen, speed_ratio=ratio, spearman=rho, compared=len(both))


def main(argv: Optional[List[str]] = None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=os.path.join(ROOT, "experiments/tiny_world.py"))
  ap.add_argument("--set", action="append", default=[],
                  help="key=value config overrides (repeatable)")
  ap.add_argument("--images", default="world", help="world | random:SIZE")
  ap.add_argument("--num", type=int, default=64)
  ap.add_argument("--max_new_tokens", type=int, default=0,
                  help="score.max_new_tokens_global (0: the config's)")
  ap.add_argument("--retries", type=int, default=0, help="score.max_retries for generate mode")
  ap.add_argument("--workdir", default="",
                  help="where an official checkpoint is converted (default: a temp dir)")
  a = ap.parse_args(argv)
  config = config_utils.load_config(a.config)
  for kv in a.set:
    k, _, v = kv.partition("=")
    try:
      v = ast.literal_eval(v)
    except (ValueError, SyntaxError):  # a bare string
      pass
    config_utils.set_dotted(config, k, v)
  config.score.max_retries = a.retries
  if a.max_new_tokens:
    config.score.max_new_tokens_global = a.max_new_tokens
  config.workdir = a.workdir or os.path.join(tempfile.gettempdir(), "srum_judge_benchmark")
  if a.images == "world":
    items = world_items(a.num)
  elif a.images.startswith("random:"):
    items = random_items(a.num, int(a.images.split(":")[1]))
  else:
    raise SystemExit(f"--images {a.images!r}: world or random:SIZE")
  return measure(config, items)


if __name__ == "__main__":
  main()
