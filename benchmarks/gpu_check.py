"""One prepared GPU check: golden conformance in fp32 and bf16, then the mid-size SRUM train step
timing.

    JAX_PLATFORMS=cuda python benchmarks/gpu_check.py [--steps 20]

Part 1 reruns the golden cases gen_t2i / srum (training forward) and llm on the accelerator with
fp32 compute (matmul precision 'highest') and with bf16 compute, and prints max abs errors vs the
official fp32 references. Part 2 times the `mid` preset's full SRUM train step with
`benchmarks/train_step.py` (posterior samples from stored moments, or `--vae step` for the encoder
in the step; reward maps, packed MoT forward/backward, AdamW; fp32 master weights, bf16 compute,
remat, chunked attention): median step time, tokens/s, MFU by BAGEL's formula and by XLA-counted
FLOPs against the device's peak.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from srum_jax import losses
from srum_jax.convert import keymap
from srum_jax.models import bagel, config, packing, params as params_lib, qwen2_mot


def golden(dtype_name: str):
  from test_bagel_forward import _noise_rows, _t2i_rows

  import conftest  # noqa: F401  (helpers only; platform already chosen)
  d = os.path.join(ROOT, "tests/fixtures/bagel_tiny")
  c = dict(load_file(f"{d}/cases.safetensors"))
  c.update(load_file(f"{d}/srum_cases.safetensors"))
  cfg = config.tiny()
  tree = conftest.tree_from_state_dict(
      load_file(f"{d}/weights.safetensors"),
      keymap.official_keys(cfg)["bagel"], params_lib.bagel_schema(cfg))
  params = jax.tree.map(jnp.asarray, tree)
  dtype = jnp.float32 if dtype_name == "fp32" else jnp.bfloat16
  out = {}
  for case, bad, gt in (("gen_t2i", "padded_latent", None), ("srum", "padded_latent_bad",
                                                             "packed_latent_clean_gt")):
    ids = c[f"{case}.packed_text_ids"]
    samples = _t2i_rows(c, case, [ids[0:7], ids[9:14]], bad, gt)
    inputs, slots = bagel.build_packed_inputs(cfg, [samples], num_tokens=48, text_capacity=24,
                                              latent_capacity=28)
    noise = _noise_rows(inputs, slots, c[f"{case}.noise"])
    t = losses.timesteps_from_raw(slots.raw_t, cfg.timestep_shift)
    x_t = losses.interpolate(slots.x_bad, noise, t)
    v_pred = jax.jit(lambda p, i, x, t: bagel.forward_gen(p, i, x, t, cfg=cfg, dtype=dtype))(
        params, inputs, x_t, t)
    v = np.asarray(v_pred[0])[np.asarray(slots.loss_mask[0])]
    ref = c["gen_t2i.v_pred" if case == "gen_t2i" else "srum.v_theta"]
    out[case] = float(np.abs(v - ref).max())
  # llm case: two causal samples packed in one row
  ids = c["llm.packed_text_ids"]
  lens = [int(x) for x in c["llm.sample_lens"]]
  pk = packing.pack([[[packing.text(ids[:lens[0]])], [packing.text(ids[lens[0]:])]]], 16,
                    text_capacity=16)
  x = qwen2_mot.embed_text(params["llm"], jnp.asarray(np.pad(ids, (0, 16 - len(ids))))[None], dtype)
  h = qwen2_mot.decoder_forward(params["llm"], x, packing.to_device(pk.meta), cfg=cfg.llm,
                                und_capacity=16, gen_capacity=0)
  logits = np.asarray(qwen2_mot.lm_logits(params["llm"], h)[0, :len(ids)].astype(jnp.float32))
  out["llm.logits"] = float(np.abs(logits - c["llm.logits"]).max())
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--skip_golden", action="store_true")
  ap.add_argument("--preset", default="mid")
  ap.add_argument("--image", default="1024x960", help="HxW of each of the 2 images per step")
  ap.add_argument("--tokens", type=int, default=8192, help="packed token budget of the row")
  ap.add_argument("--text", type=int, default=128, help="prompt tokens per sample")
  ap.add_argument("--vae", default="cached", help="cached: stored posterior moments | step: encoder in the step")
  a = ap.parse_args()
  print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
  if not a.skip_golden:
    for name in ("fp32", "bf16"):
      with jax.default_matmul_precision("highest" if name == "fp32" else "default"):
        errs = golden(name)
      print(f"golden {name} max abs err: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()),
            flush=True)
  import train_step as step_benchmark  # benchmarks/train_step.py
  step_benchmark.measure(a.preset, image=a.image, tokens=a.tokens, text=a.text, steps=a.steps,
                         attn_impl="chunked", vae=a.vae)


if __name__ == "__main__":
  main()
