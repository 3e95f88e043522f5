"""One prepared GPU check: golden conformance in fp32 and bf16, then the mid-size SRUM train step timing.

    JAX_PLATFORMS=cuda python benchmarks/gpu_check.py [--steps 20]

Part 1 reruns the golden cases gen_t2i / srum (training forward) and llm on the accelerator with fp32
compute (matmul precision 'highest') and with bf16 compute, and prints max abs errors vs the official
fp32 references. Part 2 times the `mid` preset's full SRUM train step (VAE encode x2, reward maps, packed
MoT forward/backward, AdamW; fp32 master weights, bf16 compute, remat, chunked attention): median of
`--steps` steps after warm-up, tokens/s, and MFU by BAGEL's formula against 989 TFLOP/s (dense bf16).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

PEAK = 989e12


def golden(dtype_name: str):
  import conftest  # noqa: F401  (helpers only; platform already chosen)
  from srum_jax import losses
  from srum_jax.convert import keymap
  from srum_jax.models import bagel, config, params as params_lib, qwen2_mot, packing
  from test_bagel_forward import _t2i_rows, _noise_rows
  d = os.path.join(ROOT, "tests/fixtures/bagel_tiny")
  c = dict(load_file(f"{d}/cases.safetensors"))
  c.update(load_file(f"{d}/srum_cases.safetensors"))
  cfg = config.tiny()
  tree = conftest.tree_from_state_dict(load_file(f"{d}/weights.safetensors"), keymap.official_keys(cfg)["bagel"],
                                       params_lib.bagel_schema(cfg))
  params = jax.tree.map(jnp.asarray, tree)
  dtype = jnp.float32 if dtype_name == "fp32" else jnp.bfloat16
  out = {}
  for case, bad, gt in (("gen_t2i", "padded_latent", None), ("srum", "padded_latent_bad", "packed_latent_clean_gt")):
    ids = c[f"{case}.packed_text_ids"]
    samples = _t2i_rows(c, case, [ids[0:7], ids[9:14]], bad, gt)
    inputs, slots = bagel.build_packed_inputs(cfg, [samples], num_tokens=48, text_capacity=24, latent_capacity=28)
    noise = _noise_rows(inputs, slots, c[f"{case}.noise"])
    t = losses.timesteps_from_raw(slots.raw_t, cfg.timestep_shift)
    x_t = losses.interpolate(slots.x_bad, noise, t)
    v_pred = jax.jit(lambda p, i, x, t: bagel.forward_gen(p, i, x, t, cfg=cfg, dtype=dtype))(params, inputs, x_t, t)
    v = np.asarray(v_pred[0])[np.asarray(slots.loss_mask[0])]
    ref = c["gen_t2i.v_pred" if case == "gen_t2i" else "srum.v_theta"]
    out[case] = float(np.abs(v - ref).max())
  # llm case: two causal samples packed in one row
  ids = c["llm.packed_text_ids"]
  lens = [int(x) for x in c["llm.sample_lens"]]
  pk = packing.pack([[[packing.text(ids[:lens[0]])], [packing.text(ids[lens[0]:])]]], 16, text_capacity=16)
  x = qwen2_mot.embed_text(params["llm"], jnp.asarray(np.pad(ids, (0, 16 - len(ids))))[None], dtype)
  h = qwen2_mot.decoder_forward(params["llm"], x, packing.to_device(pk.meta), cfg=cfg.llm, und_capacity=16,
                                gen_capacity=0)
  logits = np.asarray(qwen2_mot.lm_logits(params["llm"], h)[0, :len(ids)].astype(jnp.float32))
  out["llm.logits"] = float(np.abs(logits - c["llm.logits"]).max())
  return out


def time_step(steps: int, preset: str, image: str, tokens: int, text: int):
  from srum_jax.flops import bagel_flops
  from srum_jax import defaults, objective, train_step as ts
  from srum_jax.models import config, params as params_lib
  from srum_jax.training import optimizer, update
  cfg = config.get_preset(preset).replace(vit=None)
  (H, W), S, T = (int(v) for v in image.split('x')), 2, text
  schema = params_lib.model_schema(cfg)
  params = jax.jit(lambda k: params_lib.init_params(schema, k, jnp.float32))(jax.random.key(0))
  tx = optimizer.make_optimizer(defaults.base_config().train, optimizer.param_labels(params, ("ae",)))
  opts = ts.StepOptions(image_hw=(H, W), samples_per_row=S, compute_dtype=jnp.bfloat16, attn_impl="chunked",
                        remat=True)
  rng = np.random.default_rng(0)
  ids = [[[cfg.tokens.bos] + list(rng.integers(0, min(cfg.llm.vocab_size, 150000) - 8, T - 2)) + [cfg.tokens.eos] for _ in range(S)]]
  inputs = ts.t2i_layout(cfg, ids, image_hw=(H, W), num_tokens=tokens, text_capacity=S * (T + 2))
  K = 5
  batch = ts.SrumBatch(inputs=inputs, images=rng.uniform(-1, 1, (1, S, H, W, 3)).astype(np.float32),
                       rewards=objective.RegionRewards(
                           np.tile(np.array([0, 0, W // 2, H // 2], np.float32), (1, S, K, 1)),
                           rng.uniform(-1, 1, (1, S, K)).astype(np.float32), np.ones((1, S, K), bool),
                           rng.uniform(-1, 1, (1, S)).astype(np.float32)))
  batch = jax.device_put(batch)
  step = jax.jit(ts.make_train_step(cfg, opts, tx), donate_argnums=(0,))
  state = update.init_state(params, tx)
  t0 = time.time()
  state, m = step(state, batch, jax.random.key(1))
  jax.block_until_ready(m["loss"])
  compile_s = time.time() - t0
  for i in range(2):
    state, m = step(state, batch, jax.random.key(2 + i))
  jax.block_until_ready(m["loss"])
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, m = step(state, batch, jax.random.key(10 + i))
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t)
  med = float(np.median(times))
  n_lat = (H // cfg.latent_downsample) * (W // cfg.latent_downsample)
  real = S * (T + 2 + n_lat)
  flops = bagel_flops(cfg, real, [T + 2 + n_lat] * S)
  print(f"{preset} preset: {params_lib.count_params(schema['bagel']) / 1e9:.2f}B params, tokens/step {real} (budget {tokens}), "
        f"compile+first step {compile_s:.1f}s, loss {float(m['loss']):.4f}")
  print(f"step time median {med * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}, n={steps}); "
        f"{real / med:.0f} tokens/s; MFU (BAGEL formula {flops:.3e} FLOPs) = {flops / med / PEAK * 100:.1f}% of 989 TFLOP/s")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--skip_golden", action="store_true")
  ap.add_argument("--preset", default="mid")
  ap.add_argument("--image", default="1024x960", help="HxW of each of the 2 images per step")
  ap.add_argument("--tokens", type=int, default=8192, help="packed token budget of the row")
  ap.add_argument("--text", type=int, default=128, help="prompt tokens per sample")
  a = ap.parse_args()
  print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
  if not a.skip_golden:
    for name in ("fp32", "bf16"):
      with jax.default_matmul_precision("highest" if name == "fp32" else "default"):
        errs = golden(name)
      print(f"golden {name} max abs err: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()), flush=True)
  time_step(a.steps, a.preset, a.image, a.tokens, a.text)


if __name__ == "__main__":
  main()
