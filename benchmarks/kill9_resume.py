"""kill -9 and resume: `python -m srum_jax run` of the tiny pipeline SIGKILLed at random moments,
rerun to the end.

    python benchmarks/kill9_resume.py --n 5 --seed 0 --root /tmp/kill9 [--model_dir DIR]

First an uninterrupted run (the reference, which fills the persistent compilation cache), then a
second one with the warm cache: its wall time T bounds the kill moments (and it must equal the
reference). Then, for each of N trials, a fresh workdir: a run killed with SIGKILL at a moment drawn
uniformly from (1 s, T) (seeded), then the same command again until it exits 0 (the stale workdir
lock of the killed process is taken over). Each finished trial is checked against the reference:
  * every item exactly once: no id twice in any per-item log (raw lines, not de-duplicated), the
    same ids;
  * the same outputs: PNG pixels, reward rows, judgments and the report's tables equal, the trained
    parameters of every training (SRUM round 0 and the SFT control) bit-identical.
Prints one line per trial and a summary; exit code 0 when every trial held. Not part of the test
suite (minutes per run on CPU). Without --model_dir the golden tiny BAGEL of tests/fixtures is laid
out as a model dir (as the tests do). A shared persistent compilation cache makes the reruns skip
most compiles.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from srum_jax.pipeline import train as train_stage
from srum_jax.workdir import logs

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = str(ROOT / "experiments" / "tiny_pipeline.py")
LOGS = (("round_0/generate", "metadata"), ("round_0/propose", "regions"),
        ("round_0/score", "rewards"),
        ("eval/base", "metadata"), ("eval/base", "judgments"), ("eval/srum", "metadata"),
        ("eval/srum", "judgments"), ("eval/sft", "metadata"), ("eval/sft", "judgments"))
TRAININGS = ("round_0/train", "sft_train")


def _env(root: pathlib.Path) -> dict:
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
              JAX_DEFAULT_MATMUL_PRECISION="highest",
              JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def golden_model_dir(dst: pathlib.Path) -> str:
  """The golden tiny BAGEL of tests/fixtures as a converted model dir with a word-level tokenizer
  (as the tests' `tiny_model_dir` fixture builds it)."""
  if (dst / "model_config.json").is_file():
    return str(dst)
  code = f"""
import sys, jax, numpy as np
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
import conftest
from safetensors.numpy import load_file
from srum_jax.convert import checkpoint, keymap
from srum_jax.models import config, params as params_lib
from srum_jax.tokenizer import build_word_level
from srum_jax.worlds.shapes import VOCAB
cfg = config.tiny()
keys = keymap.official_keys(cfg)
weights = load_file(conftest.GOLDEN / "weights.safetensors")
ae = load_file(conftest.GOLDEN / "ae.safetensors")
params = {{"bagel": conftest.tree_from_state_dict(weights, keys["bagel"],
                                                params_lib.bagel_schema(cfg)),
          "ae": conftest.tree_from_state_dict(ae, keys["ae"], params_lib.ae_schema(cfg.ae))}}
checkpoint.save_model_dir({str(dst)!r}, cfg, jax.tree.map(np.asarray, params))
t = cfg.tokens
build_word_level(list(VOCAB) + list(conftest.JUDGE_WORDS), {str(dst)!r}, special_ids={{
    "<|im_start|>": t.bos, "<|im_end|>": t.eos, "<|vision_start|>": t.start_of_image,
    "<|vision_end|>": t.end_of_image}})
"""
  subprocess.run([sys.executable, "-c", code], check=True, env=_env(dst.parent))
  return str(dst)


def _command(model_dir: str, workdir: pathlib.Path) -> list:
  return [
      sys.executable, "-m", "srum_jax", "run", f"--config={CONFIG}",
      f"--config.model.dir={model_dir}", f"--config.workdir={workdir}"
  ]


def _run(cmd, root: pathlib.Path, log: pathlib.Path, kill_after: float = None) -> tuple:
  """(exit code, seconds); SIGKILL after `kill_after` seconds when given."""
  t0 = time.time()
  with open(log, "a") as f:
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(root), stdout=f, stderr=subprocess.STDOUT)
    if kill_after is None:
      return p.wait(), time.time() - t0
    try:
      return p.wait(timeout=kill_after), time.time() - t0
    except subprocess.TimeoutExpired:
      p.send_signal(signal.SIGKILL)
      return p.wait(), time.time() - t0


def _raw_ids(directory: pathlib.Path, stem: str) -> list:
  """Every row's id in the stage's log, duplicates included (what a reader that does not
  de-duplicate sees)."""
  return [r["id"] for r in logs.JsonlLog(str(directory / f"{stem}.jsonl")).rows()]


def _rows(directory: pathlib.Path, stem: str) -> dict:
  return {r["id"]: r for r in logs.JsonlLog(str(directory / f"{stem}.jsonl")).rows()}


def compare(ref: pathlib.Path, got: pathlib.Path) -> list:
  """What differs between two finished workdirs (empty: identical in every checked respect)."""
  from PIL import Image

  problems = []
  for sub, stem in LOGS:
    ids = _raw_ids(got / sub, stem)
    if len(ids) != len(set(ids)):
      problems.append(f"{sub}/{stem}: {len(ids) - len(set(ids))} ids logged twice")
    want, have = _rows(ref / sub, stem), _rows(got / sub, stem)
    if set(want) != set(have):
      problems.append(f"{sub}/{stem}: ids differ ({len(want)} vs {len(have)})")
      continue
    for i, w in want.items():
      h = have[i]
      if stem == "metadata":
        a = np.asarray(Image.open(ref / sub / w["image_file"]))
        b = np.asarray(Image.open(got / sub / h["image_file"]))
        if a.shape != b.shape or not np.array_equal(a, b):
          problems.append(f"{sub}: image of {i} differs")
      elif stem in ("rewards", "judgments", "regions"):
        keys = {
            "rewards": ("global_score", "regions", "image_file", "prompt"),
            "judgments": ("correct", "prompt"),
            "regions": ("regions", "image_file")
        }[stem]
        if any(w.get(k) != h.get(k) for k in keys):
          problems.append(f"{sub}/{stem}: row {i} differs")
  for sub in TRAININGS:
    a, b = train_stage.final_params(str(ref / sub)), train_stage.final_params(str(got / sub))
    import jax
    diff = max(
        jax.tree.leaves(
            jax.tree.map(
                lambda x, y: float(
                    np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))), a, b)))
    if diff != 0.0:
      problems.append(f"{sub}: parameters differ (max |diff| {diff:.3g})")
  ta = json.loads((ref / "report" / "report.json").read_text())["tables"]
  tb = json.loads((got / "report" / "report.json").read_text())["tables"]
  if ta != tb:
    problems.append("report tables differ")
  return problems


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--n", type=int, default=5, help="trials (one SIGKILL each)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--root", default="/tmp/srum_kill9")
  ap.add_argument("--model_dir", default="")
  ap.add_argument("--reuse_reference", action="store_true",
                  help="keep <root>/reference when it finished")
  ap.add_argument("--max_reruns", type=int, default=3,
                  help="reruns allowed after a kill before giving up")
  args = ap.parse_args(argv)
  root = pathlib.Path(args.root).resolve()
  root.mkdir(parents=True, exist_ok=True)
  model_dir = args.model_dir or golden_model_dir(root / "model")
  ref = root / "reference"
  if not (args.reuse_reference and (ref / "report" / "report.json").is_file()):
    shutil.rmtree(ref, ignore_errors=True)
    # also warms the compilation cache
    rc, cold = _run(_command(model_dir, ref), root, root / "reference.log")
    if rc != 0:
      print(f"reference run failed (exit {rc}); see {root / 'reference.log'}")
      return 1
    print(f"reference run (cold compilation cache): {cold:.0f} s", flush=True)
  # T: an uninterrupted run with the warm cache (what every trial's runs have); checked against the
  # reference too
  timing = root / "uninterrupted"
  shutil.rmtree(timing, ignore_errors=True)
  rc, total = _run(_command(model_dir, timing), root, root / "uninterrupted.log")
  problems = [f"exit code {rc}"] if rc != 0 else compare(ref, timing)
  print(f"uninterrupted run (warm cache): {total:.0f} s; same as the reference: "
        f"{'yes' if not problems else 'NO: ' + '; '.join(problems[:5])}", flush=True)
  rng = random.Random(args.seed)
  held = 0
  for k in range(args.n):
    work = root / f"trial_{k}"
    shutil.rmtree(work, ignore_errors=True)
    log = root / f"trial_{k}.log"
    log.unlink(missing_ok=True)
    moment = rng.uniform(1.0, total)
    rc, _ = _run(_command(model_dir, work), root, log, kill_after=moment)
    killed = rc == -signal.SIGKILL
    reruns = 0
    while reruns < args.max_reruns:
      reruns += 1
      rc, _ = _run(_command(model_dir, work), root, log)
      if rc == 0:
        break
    problems = [f"rerun exit code {rc} (see {log})"] if rc != 0 else compare(ref, work)
    held += not problems
    print(
        f"trial {k}: SIGKILL at {moment:.1f} s of ~{total:.0f} s "
        f"({'killed' if killed else 'finished first'}), "
        f"{reruns} rerun(s): {'held' if not problems else 'NOT held: ' + '; '.join(problems[:5])}",
        flush=True)
  print(
      f"kill -9 resume: {held}/{args.n} held (seed {args.seed}, uninterrupted run ~{total:.0f} s)",
      flush=True)
  return 0 if held == args.n else 1


if __name__ == "__main__":
  sys.exit(main())
