"""Text-to-image sampling speed: s/image at each size, with prefill, Euler steps and VAE decode
apart.

    # random weights, the paper's CFG
    python benchmarks/sample.py --preset mid --sizes 512,1024
    python benchmarks/sample.py --preset tiny --sizes 64,128 --steps 5   # CPU plumbing

Non-think T2I as `inference.sampling.text_to_image` runs it: the prompt is prefilled into a KV cache
(the `gen` context; the `cfg_text` context is the empty cache, and `cfg_img` equals `gen`), then
`--steps` flow timesteps (steps - 1 Euler updates) with classifier-free guidance at the generate
stage's defaults (`srum_jax.defaults`: text scale 4.0, image scale 1.0, interval (0.4, 1.0], global
renorm; the branches are folded into one forward; outside the interval only the conditional branch
runs), then the VAE decode. Each part is compiled first, then timed (median of `--repeats`). s/image
= (prefill + sampling + decode) / batch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from srum_jax import defaults
from srum_jax.inference import context, sampling
from srum_jax.models import autoencoder, config, params as params_lib


def _timed(fn: Callable, repeats: int):
  """(compile-and-first-run seconds, median seconds of `repeats` further runs, last output)."""
  t = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return first, float(np.median(times)), out


def measure(preset: str = "mid", *, sizes=(512, 1024), steps: int = 50, batch: int = 1,
            text: int = 32, repeats: int = 2, attn_impl: str = "dense", dtype: str = "bfloat16",
            cfg_text_scale=None, cfg_img_scale=None, out=print) -> List[Dict[str, float]]:
  cfg = config.get_preset(preset).replace(vit=None)
  g = defaults.base_config().generate
  text_scale = float(g.cfg_text_scale if cfg_text_scale is None else cfg_text_scale)
  img_scale = float(g.cfg_img_scale if cfg_img_scale is None else cfg_img_scale)
  dt = jnp.dtype(dtype)
  schema = params_lib.model_schema(cfg)
  params = jax.jit(lambda k: params_lib.init_params(schema, k, dt))(jax.random.key(0))
  rng = np.random.default_rng(0)
  ids = [[cfg.tokens.bos] +
         list(rng.integers(0, max(1,
                                  min(cfg.llm.vocab_size, cfg.tokens.bos) - 1), text - 2)) +
         [cfg.tokens.eos] for _ in range(batch)]
  ids, lens = context.pad_ids(ids)
  T = context.bucket(ids.shape[1])
  ts = np.asarray(sampling.shifted_timesteps(steps, float(g.timestep_shift)))[:-1]
  lo, hi = (float(v) for v in g.cfg_interval)
  guided_steps = int(np.sum((ts > lo) & (ts <= hi))) if text_scale > 1.0 else 0
  dev = jax.devices()[0]
  out(f"device: {getattr(dev, 'device_kind', dev.platform)} ({dev.platform}, jax "
      f"{jax.__version__}); preset {preset} "
      f"({params_lib.count_params(schema['bagel']) / 1e6:.2f}M params, {dtype}), batch {batch}, "
      f"prompt {text} tokens, "
      f"{steps} timesteps ({steps - 1} Euler updates, {guided_steps} inside the CFG interval), "
      f"cfg_text_scale "
      f"{text_scale}, cfg_img_scale {img_scale}, attn_impl {attn_impl}")
  rows = []
  for size in sizes:
    grid = sampling.latent_grid(size, size, cfg)
    base = context.init_context(cfg, batch, T, dt)
    c_pre, prefill_s, gen = _timed(
        lambda: context.prefill_text(params["bagel"], base, ids, lens, cfg=cfg, attn_impl=attn_impl
                                    ), repeats)
    x0 = sampling.initial_noise(sampling.prompt_keys(42, list(range(batch))), cfg, grid)
    c_smp, sample_s, tokens = _timed(
        lambda: sampling.sample_latents(
            params["bagel"], (gen, base, gen), x0, cfg=cfg, grid=grid, num_timesteps=steps,
            timestep_shift=float(g.timestep_shift), cfg_text_scale=text_scale,
            cfg_img_scale=img_scale, cfg_interval=tuple(g.cfg_interval), cfg_renorm_type=str(
                g.cfg_renorm_type), cfg_renorm_min=float(g.cfg_renorm_min), attn_impl=attn_impl),
        repeats)
    c_dec, decode_s, images = _timed(lambda: autoencoder.to_uint8(
        sampling.decode_latents(params["ae"], tokens, cfg=cfg, grid=grid)), repeats)
    assert images.shape == (batch, size, size, 3)
    total = prefill_s + sample_s + decode_s
    r = dict(size=size, s_per_image=total / batch, prefill_s=prefill_s,
             step_s=sample_s / max(1, steps - 1), sample_s=sample_s, decode_s=decode_s,
             compile_s=c_pre + c_smp + c_dec - total)
    rows.append(r)
    out(f"size {size}x{size} ({grid[0] * grid[1]} latent tokens): s_per_image "
        f"{r['s_per_image']:.4f}; "
        f"prefill_s {prefill_s:.4f}; step_s {r['step_s']:.5f} (sampling {sample_s:.4f} s); "
        f"decode_s {decode_s:.4f}; "
        f"compile_s {r['compile_s']:.1f}")
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="mid")
  ap.add_argument("--sizes", default="512,1024", help="square image sides, comma-separated")
  ap.add_argument("--steps", type=int, default=50, help="flow timesteps (the paper's 50)")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--text", type=int, default=32, help="prompt tokens (with BOS/EOS)")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--attn_impl", default="dense")
  ap.add_argument("--dtype", default="bfloat16", help="parameters, KV cache and compute")
  ap.add_argument("--cfg_text_scale", type=float, default=None,
                  help="default: generate.cfg_text_scale")
  ap.add_argument("--cfg_img_scale", type=float, default=None,
                  help="default: generate.cfg_img_scale")
  a = ap.parse_args(argv)
  return measure(a.preset, sizes=[int(s) for s in a.sizes.split(",")], steps=a.steps, batch=a.batch,
                 text=a.text, repeats=a.repeats, attn_impl=a.attn_impl, dtype=a.dtype,
                 cfg_text_scale=a.cfg_text_scale, cfg_img_scale=a.cfg_img_scale)


if __name__ == "__main__":
  main()
