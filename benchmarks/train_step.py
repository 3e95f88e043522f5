"""The SRUM train step's speed: tokens/s, TFLOP/s and MFU, by BAGEL's formula and by XLA's counted
FLOPs.

    # ~2B MoT, 2 x 1024x960 images, 8192 tokens
    python benchmarks/train_step.py --preset mid
    # 7B width, layers cut to fit one chip
    python benchmarks/train_step.py --preset bagel_7b_mot --layers 8
    # CPU plumbing
    python benchmarks/train_step.py --preset tiny --image 32x32 --tokens 64 --text 8 --steps 3
    python benchmarks/train_step.py --config experiments/tiny_world.py --steps 50 --losses 40

One packed row of two T2I samples (random weights, fp32 masters, bf16 compute by default), the full
step: posterior sample (from stored moments, `--vae cached`, as the train stage feeds it; or the VAE
encoder in the step, `--vae step`), reward maps, packed MoT forward/backward, AdamW. Prints the
median step time over `--steps` timed steps after warm-up, tokens/s, and two FLOP rates:
* model FLOPs by BAGEL's MFU formula (`srum_jax.flops.bagel_flops`, what the official trainer
  reports);
* counted FLOPs: XLA's HLO cost analysis of the same step lowered with its layers unrolled (forward,
  backward, remat recompute, optimizer, the encoder when in the step). Lowering is tracing only, no
  compile; the unrolled form is needed because XLA counts a scanned loop's body once. The timed
  program scans its layers as the trainer does (`--unroll` times the unrolled program instead).
MFU divides by the device's peak dense bf16 FLOP/s from `PEAK_TFLOPS` (matched on the device kind),
by `--peak_tflops`, or, on CPU, by a measured matmul rate; the device and the peak used are printed.
`--profile_dir` writes a jax.profiler trace of a few steps there (see
`benchmarks/trace_summary.py`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Dict, Optional, Tuple

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from srum_jax import aot, config_utils, defaults, sharding
from srum_jax.flops import bagel_flops
from srum_jax.models import config, params as params_lib
from srum_jax.pipeline import train as train_stage
from srum_jax.training import objective, optimizer, train_step as ts, update

# Dense bf16 peak TFLOP/s per chip (vendor figures, no sparsity), matched on jax's device_kind
# (lowercase).
PEAK_TFLOPS = (
    ("h200", 989.0), ("h100", 989.0), ("a100", 312.0),
    ("v5p", 459.0), ("v6 lite", 918.0), ("v6e", 918.0), ("v5 lite", 197.0), ("v5e", 197.0),
)


def measured_matmul_tflops(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
  """Best observed rate of an n^3 matmul on the default device (the CPU's practical peak)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best / 1e12


def device_peak(peak_tflops: float = 0.0) -> Tuple[str, float, str]:
  """(device kind, peak TFLOP/s, where the peak came from)."""
  dev = jax.devices()[0]
  kind = str(getattr(dev, "device_kind", dev.platform))
  if peak_tflops > 0:
    return kind, float(peak_tflops), "--peak_tflops"
  low = kind.lower()
  for name, tf in PEAK_TFLOPS:
    if name in low:
      return kind, tf, f"table ({name}: dense bf16)"
  return kind, measured_matmul_tflops(), "measured fp32 1024^3 matmul (no table entry)"


def counted_flops(lowered) -> Optional[float]:
  """FLOPs of a lowered (or compiled) program by XLA's cost analysis (None when the backend gives
  none)."""
  try:
    ca = lowered.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca or "flops" not in ca:
    return None
  return float(ca["flops"])


def model_config(preset: str, layers: int = 0):
  cfg = config.get_preset(preset).replace(vit=None)  # the SRUM step never runs the ViT
  if layers:
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, num_hidden_layers=int(layers)))
  return cfg


def make_batch(cfg, image_hw: Tuple[int, int], tokens: int, text: int, vae: str, seed: int = 0,
               samples: int = 2, moments_dtype=np.float32):
  """One packed row of `samples` T2I samples (prompt of `text` tokens incl. BOS/EOS), random images
  or their stand-in posterior moments, five boxes each."""
  H, W = image_hw
  rng = np.random.default_rng(seed)
  vocab = min(cfg.llm.vocab_size, 150000)
  ids = [[[cfg.tokens.bos] + list(rng.integers(0, max(1, min(vocab, cfg.tokens.bos) - 1), text - 2))
          + [cfg.tokens.eos] for _ in range(samples)]]
  inputs = ts.t2i_layout(cfg, ids, image_hw=(H, W), num_tokens=tokens,
                         text_capacity=samples * (text + 2))
  K = 5
  rewards = objective.RegionRewards(
      np.tile(np.array([0, 0, W // 2, H // 2], np.float32), (1, samples, K, 1)),
      rng.uniform(-1, 1, (1, samples, K)).astype(np.float32), np.ones((1, samples, K), bool),
      rng.uniform(-1, 1, (1, samples)).astype(np.float32))
  if vae == "step":
    return ts.SrumBatch(inputs=inputs, images=rng.uniform(-1, 1, (1, samples, H, W, 3)).astype(
        np.float32), rewards=rewards)
  f = cfg.ae.downsample
  m = rng.normal(size=(1, samples, H // f, W // f, 2 * cfg.ae.z_channels)).astype(np.float32)
  m[..., cfg.ae.z_channels:] = np.log(0.01)  # a narrow posterior, as the FLUX encoder's
  return ts.SrumBatch(inputs=inputs, images=None, rewards=rewards, moments=m.astype(moments_dtype))


def measure(preset: str = "mid", *, layers: int = 0, image: str = "1024x960", tokens: int = 8192,
            text: int = 128, steps: int = 10, warmup: int = 2, attn_impl: str = "chunked",
            vae: str = "cached", remat: bool = True, unroll: bool = False,
            compute_dtype: str = "bfloat16", peak_tflops: float = 0.0, profile_dir: str = "",
            profile_steps: int = 3, out=print) -> Dict[str, float]:
  """Time the step; print and return the figures."""
  if vae not in ("cached", "step"):
    raise ValueError(f"--vae {vae!r}; choose cached or step")
  cfg = model_config(preset, layers)
  H, W = (int(v) for v in image.split("x"))
  S = 2
  schema = params_lib.model_schema(cfg)
  params = jax.jit(lambda k: params_lib.init_params(schema, k, jnp.float32))(jax.random.key(0))
  tx = optimizer.make_optimizer(defaults.base_config().train, optimizer.param_labels(
      params, ("ae",)))
  opts = ts.StepOptions(image_hw=(H, W), samples_per_row=S, compute_dtype=jnp.dtype(compute_dtype),
                        attn_impl=attn_impl, remat=remat, scan_unroll=True if unroll else 1)
  batch = jax.device_put(make_batch(cfg, (H, W), tokens, text, vae))
  state = update.init_state(params, tx)
  del params
  step = jax.jit(ts.make_train_step(cfg, opts, tx), donate_argnums=update.state_donation())
  kind, peak, peak_from = device_peak(peak_tflops)
  t0 = time.time()
  compiled = step.lower(state, batch, jax.random.key(1)).compile()
  compile_s = time.time() - t0
  unrolled = dataclasses.replace(opts, scan_unroll=True)
  counted = counted_flops(
      jax.jit(ts.make_train_step(cfg, unrolled, tx)).lower(state, batch, jax.random.key(1)))
  for i in range(warmup):
    state, m = compiled(state, batch, jax.random.key(2 + i))
  jax.block_until_ready(m["loss"])
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, batch, jax.random.key(10 + i))
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t)
  if profile_dir:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for i in range(profile_steps):
        state, m = compiled(state, batch, jax.random.key(100 + i))
      jax.block_until_ready(m["loss"])
  med = float(np.median(times))
  n_lat = (H // cfg.latent_downsample) * (W // cfg.latent_downsample)
  real = S * (text + 2 + n_lat)
  model = bagel_flops(cfg, real, [text + 2 + n_lat] * S)
  r = dict(step_ms=med * 1e3, tokens=real, tokens_per_s=real / med, model_flops=model,
           model_tflops_per_s=model / med / 1e12, mfu_model=model / med / (peak * 1e12),
           counted_flops=float("nan") if counted is None else counted,
           counted_tflops_per_s=float("nan") if counted is None else counted / med / 1e12,
           mfu_counted=float("nan") if counted is None else counted / med / (peak * 1e12),
           compile_s=compile_s, peak_tflops=peak, loss=float(m["loss"]))
  out(f"device: {kind} ({jax.devices()[0].platform}, {jax.device_count()} devices, jax "
      f"{jax.__version__}); "
      f"peak {peak:.4g} TFLOP/s from {peak_from}")
  out(f"config: preset {preset}, layers {cfg.llm.num_hidden_layers}, "
      f"{params_lib.count_params(schema['bagel']) / 1e6:.2f}M params, images {S} x {H}x{W}, "
      f"tokens {real} "
      f"(budget {tokens}), attn_impl {attn_impl}, vae {vae}, remat {remat}, unroll {unroll}, "
      f"compute {compute_dtype}"
     )
  out(f"step_ms {r['step_ms']:.1f} (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}, "
      f"n={steps}); "
      f"compile_s {compile_s:.1f}; loss {r['loss']:.4f}")
  out(f"tokens_per_s {r['tokens_per_s']:.1f}")
  out(f"model_flops {model:.4e} (BAGEL formula); model_tflops_per_s {r['model_tflops_per_s']:.4f}; "
      f"mfu_model {100 * r['mfu_model']:.2f}%")
  out(f"counted_flops {r['counted_flops']:.4e} (XLA HLO cost analysis, layers unrolled; includes "
      f"remat recompute "
      f"and the optimizer); counted_tflops_per_s {r['counted_tflops_per_s']:.4f}; mfu_counted "
      f"{100 * r['mfu_counted']:.2f}%"
     )
  out(f"counted/model {r['counted_flops'] / model:.3f}")
  return r


def stage_batch(cfg, config, seed: int):
  """One batch of the train stage's shapes for `config` (`train.batch_size` rows of
  `train.samples_per_row` T2I samples, the prompt budget, stand-in posterior moments and five judged
  boxes per image), random content."""
  t = config.train
  H, W = (int(v) for v in t.image_hw)
  rows, S, K = int(t.batch_size), int(t.samples_per_row), int(t.max_regions)
  rng = np.random.default_rng(seed)
  per = int(t.text_capacity) // S - 2  # BOS + ids + EOS, next to the two image markers
  ids = [[[cfg.tokens.bos] + list(rng.integers(0, cfg.tokens.bos, int(rng.integers(1, per - 1)))) +
          [cfg.tokens.eos] for _ in range(S)] for _ in range(rows)]
  inputs = ts.t2i_layout(cfg, ids, image_hw=(H, W), num_tokens=int(t.num_tokens),
                         text_capacity=int(t.text_capacity),
                         sample_stride=ts.sample_window(t.num_tokens, S))
  boxes = np.sort(rng.uniform(0, min(H, W), (rows, S, K, 2, 2)), axis=-2).reshape(rows, S, K, 4)
  rewards = objective.RegionRewards(
      boxes.astype(np.float32),
      rng.uniform(-1, 1, (rows, S, K)).astype(np.float32),
      rng.uniform(size=(rows, S, K)) < 0.8,
      rng.uniform(-1, 1, (rows, S)).astype(np.float32))
  f, z = cfg.ae.downsample, cfg.ae.z_channels
  m = rng.normal(size=(rows, S, H // f, W // f, 2 * z)).astype(np.float32)
  m[..., z:] = np.log(0.01)
  return ts.SrumBatch(inputs=inputs, images=None, rewards=rewards,
                      moments=m.astype(t.moments_dtype))


def measure_stage(config_path: str, *, steps: int = 20, warmup: int = 2, batches: int = 4,
                  losses: int = 0, profile_dir: str = "", profile_steps: int = 5, sets=(),
                  out=print) -> Dict[str, float]:
  """The train stage's step for a config (`pipeline.train`: its step options, optimizer, mesh and
  jit), random-initialised parameters (seed 0), `batches` random batches of the stage's shapes used
  in turn. Prints the median step time; with `losses` N, the loss of each of the first N steps (a
  fixed sequence: compare two versions of the code on it)."""
  overrides = {}
  for kv in sets:
    k, v = kv.split("=", 1)
    overrides[k] = _literal(v)
  config = config_utils.load_config(config_path, overrides)
  cfg = aot.model_config(config)
  t = config.train
  mesh = train_stage.train_mesh(config)
  opts = dataclasses.replace(
      train_stage.step_options(config), **train_stage.batch_layout(config, mesh))
  params = jax.jit(lambda k: params_lib.init_params(
      params_lib.model_schema(cfg), k, jnp.float32, jnp.dtype(config.model.lora.dtype)))(
          jax.random.key(0))
  labels = optimizer.param_labels(params, tuple(t.freeze), adapters_only=cfg.llm.lora is not None)
  tx = optimizer.make_optimizer(t, labels, total_steps=int(t.steps))
  state = update.init_state(jax.tree.map(lambda x: x.astype(config.model.param_dtype), params), tx,
                            opts.ema_decay, labels)
  rules = sharding.rules_from_config(config.sharding_rules)
  state_sh = ts.state_shardings(cfg, jax.eval_shape(lambda s: s, state), mesh, rules)
  state = jax.device_put(state, state_sh)
  host = [stage_batch(cfg, config, seed) for seed in range(batches)]
  batch_sh = ts.batch_shardings(host[0], mesh, rules)
  dev = [jax.device_put(b, batch_sh) for b in host]
  step_fn = ts.make_train_step(cfg, opts, tx, labels)
  jstep = ts.shard_train_step(
      lambda s, b, k: step_fn(s, b, jax.random.fold_in(k, s.step)), state_sh, batch_sh, mesh,
      options=ts.compiler_options(mesh.devices.flat[0].platform, bool(t.tpu_collective_matmul)))
  key = jax.random.key(int(config.seed))
  t0 = time.time()
  compiled = jstep.lower(state, dev[0], key).compile()
  compile_s = time.time() - t0
  seen = []
  for i in range(warmup):
    state, m = compiled(state, dev[i % batches], key)
    seen.append(m["loss"])
  jax.block_until_ready(state)
  times = []
  for i in range(warmup, warmup + steps):
    t1 = time.perf_counter()
    state, m = compiled(state, dev[i % batches], key)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t1)
    seen.append(m["loss"])
  i = warmup + steps
  while len(seen) < losses:
    state, m = compiled(state, dev[i % batches], key)
    seen.append(m["loss"])
    i += 1
  if profile_dir:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for j in range(profile_steps):
        state, m = compiled(state, dev[(i + j) % batches], key)
      jax.block_until_ready(m["loss"])
  med = float(np.median(times))
  out(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}; "
      f"config {config_path} "
      f"{list(sets)}: preset {config.model.preset}, {t.batch_size} rows x {t.samples_per_row} "
      f"samples, "
      f"image {tuple(t.image_hw)}, tokens {t.num_tokens}, attn {opts.attn_impl}, remat "
      f"{opts.remat}, "
      f"compute {np.dtype(opts.compute_dtype).name}")
  out(f"step_ms {med * 1e3:.2f} (min {min(times) * 1e3:.2f}, max {max(times) * 1e3:.2f}, "
      f"n={steps}); "
      f"compile_s {compile_s:.1f}")
  if losses:
    out("losses " + " ".join(f"{float(v):.8g}" for v in seen[:losses]))
  return dict(step_ms=med * 1e3, compile_s=compile_s, losses=[float(v) for v in seen[:losses]])


def _literal(text: str):
  import ast
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parser():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="mid", help="tiny | mid | bagel_7b_mot (srum_jax.models.config)")
  ap.add_argument("--layers", type=int, default=0,
                  help="cut the decoder to this many layers (0: the preset's)")
  ap.add_argument("--image", default="1024x960", help="HxW of each of the 2 images of the row")
  ap.add_argument("--tokens", type=int, default=8192, help="packed token budget of the row")
  ap.add_argument("--text", type=int, default=128, help="prompt tokens per sample (with BOS/EOS)")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--attn_impl", default="chunked", help="model.attn_impl of the step")
  ap.add_argument("--vae", default="cached", help="cached: stored moments in the batch | step: encoder in the step")
  ap.add_argument("--no_remat", dest="remat", action="store_false")
  ap.add_argument("--unroll", action="store_true",
                  help="time the program with unrolled layers (default: scanned)")
  ap.add_argument("--compute_dtype", default="bfloat16")
  ap.add_argument("--peak_tflops", type=float, default=0.0,
                  help="override the device's peak (TFLOP/s)")
  ap.add_argument("--profile_dir", default="")
  ap.add_argument(
      "--config", default="", help="time the train stage's step of this config instead (e.g. "
      "experiments/tiny_world.py: the shapes world's train stage); --set, --losses apply")
  ap.add_argument("--set", action="append", default=[],
                  help="with --config: override key=value (repeatable)")
  ap.add_argument("--losses", type=int, default=0,
                  help="with --config: print the first N steps' losses")
  return ap


def main(argv=None):
  a = parser().parse_args(argv)
  if a.config:
    return measure_stage(a.config, steps=a.steps, warmup=a.warmup, losses=a.losses,
                         profile_dir=a.profile_dir, sets=a.set)
  return measure(a.preset, layers=a.layers, image=a.image, tokens=a.tokens, text=a.text,
                 steps=a.steps, warmup=a.warmup, attn_impl=a.attn_impl, vae=a.vae, remat=a.remat,
                 unroll=a.unroll, compute_dtype=a.compute_dtype, peak_tflops=a.peak_tflops,
                 profile_dir=a.profile_dir)


if __name__ == "__main__":
  main()
