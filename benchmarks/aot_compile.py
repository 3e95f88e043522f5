"""Ahead-of-time compile of the full-size SRUM train step on a simulated device mesh (no weights).

Lowers and compiles `train_step.make_train_step` for BAGEL-7B-MoT with abstract (shape-only) parameters,
bf16 params and compute, remat and chunked attention, `--tokens_per_device` packed tokens per device,
for each mesh in `--meshes` (e.g. 8 = fsdp 8, 32 = fsdp 32; or 2x16 = data 2 x fsdp 16). Prints per-device
memory from `compiled.memory_analysis()`, XLA's FLOPs per step from `cost_analysis()`, and BAGEL's MFU
formula 6*N*tokens + 12*head_dim*heads*layers*sum(len^2) (N = parameters a token passes through: one
expert's decoder weights, plus the generation heads) for comparison.

    python benchmarks/aot_compile.py --meshes 8,32            # ~minutes on 2 CPU cores
    python benchmarks/aot_compile.py --preset mid --meshes 8
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time


def _parse():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="bagel_7b_mot")
  ap.add_argument("--meshes", default="8,32", help="comma list; N = fsdp N, DxF = data D x fsdp F")
  ap.add_argument("--tokens_per_device", type=int, default=8192)
  ap.add_argument("--image", default="960x1024", help="HxW of each training image (multiples of 16)")
  ap.add_argument("--samples_per_row", type=int, default=2)
  ap.add_argument("--text_tokens", type=int, default=128, help="prompt tokens per sample incl. BOS/EOS")
  ap.add_argument("--no_remat", action="store_true")
  ap.add_argument("--attn", default="chunked")
  ap.add_argument("--param_dtype", default="float32", help="master weights (compute is bf16 either way)")
  ap.add_argument("--no_count", action="store_true", help="skip the unrolled FLOP-counting compile")
  return ap.parse_args()


ARGS = _parse()
_meshes = [tuple(int(x) for x in m.split("x")) for m in ARGS.meshes.split(",")]
_max_dev = max(m[0] * (m[1] if len(m) > 1 else 1) for m in _meshes)
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_max_dev}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from srum_jax import defaults, objective, sharding, train_step as ts  # noqa: E402
from srum_jax.flops import bagel_active_params, bagel_flops  # noqa: E402
from srum_jax.models import config as model_config, params as params_lib  # noqa: E402
from srum_jax.training import optimizer, update  # noqa: E402


def abstract_batch(cfg, rows: int):
  H, W = (int(v) for v in ARGS.image.split("x"))
  S = ARGS.samples_per_row
  ids = [[[cfg.tokens.bos] + [7] * (ARGS.text_tokens - 2) + [cfg.tokens.eos] for _ in range(S)]]
  inputs = ts.t2i_layout(cfg, ids, image_hw=(H, W), num_tokens=ARGS.tokens_per_device,
                         text_capacity=S * (ARGS.text_tokens + 2))
  inputs = jax.tree.map(lambda x: jax.ShapeDtypeStruct((rows,) + x.shape[1:], x.dtype), inputs)
  K = 5
  f32 = jnp.float32
  batch = ts.SrumBatch(
      inputs=inputs, images=jax.ShapeDtypeStruct((rows, S, H, W, 3), jnp.bfloat16),
      rewards=objective.RegionRewards(jax.ShapeDtypeStruct((rows, S, K, 4), f32), jax.ShapeDtypeStruct((rows, S, K), f32),
                                      jax.ShapeDtypeStruct((rows, S, K), jnp.bool_), jax.ShapeDtypeStruct((rows, S), f32)))
  n_lat = (H // cfg.latent_downsample) * (W // cfg.latent_downsample)
  real_tokens = S * (ARGS.text_tokens + 2 + n_lat)
  lens = [ARGS.text_tokens + 2 + n_lat] * S  # one attention sequence per sample
  return batch, (H, W), real_tokens, lens


def main():
  cfg = model_config.get_preset(ARGS.preset)
  if cfg.vit is not None:
    cfg = cfg.replace(vit=None)  # SRUM trains the generation path only (the official visual_und=False)
  tcfg = defaults.base_config().train
  opts = ts.StepOptions(image_hw=tuple(int(v) for v in ARGS.image.split("x")), samples_per_row=ARGS.samples_per_row,
                        compute_dtype=jnp.bfloat16, attn_impl=ARGS.attn, remat=not ARGS.no_remat)
  schema = ts.model_schema(cfg)
  params = params_lib.abstract_params(schema, jnp.dtype(ARGS.param_dtype))
  labels = optimizer.param_labels(params, ("ae",))
  tx = optimizer.make_optimizer(tcfg, labels)
  abstract_state = jax.eval_shape(lambda p: update.init_state(p, tx), params)
  n_params = params_lib.count_params(schema["bagel"])
  print(f"preset={ARGS.preset} params(bagel)={n_params / 1e9:.2f}B ae={params_lib.count_params(schema['ae']) / 1e6:.1f}M "
        f"tokens/device={ARGS.tokens_per_device} image={ARGS.image} x{ARGS.samples_per_row}/row "
        f"remat={opts.remat} attn={opts.attn_impl} params={ARGS.param_dtype} compute=bf16 "
        f"jax={jax.__version__} backend={jax.default_backend()}")
  counted = False
  for m in _meshes:
    data, fsdp = (1, m[0]) if len(m) == 1 else m
    n = data * fsdp
    mesh = sharding.make_mesh({"data": data, "fsdp": fsdp, "tensor": 1}, jax.devices()[:n])
    batch, hw, real_tokens, lens = abstract_batch(cfg, rows=n)
    state_sh = ts.state_shardings(cfg, abstract_state, mesh)
    batch_sh = ts.batch_shardings(batch, mesh)
    step = ts.shard_train_step(ts.make_train_step(cfg, opts, tx), state_sh, batch_sh, mesh)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    t0 = time.time()
    lowered = step.lower(abstract_state, batch, key)
    t1 = time.time()
    compiled = lowered.compile()
    t2 = time.time()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    formula = bagel_flops(cfg, real_tokens, lens) * n
    gib = 1 / 2 ** 30
    print(f"\nmesh data={data} fsdp={fsdp} ({n} devices): lower {t1 - t0:.1f}s compile {t2 - t1:.1f}s")
    if mem is not None:
      print(f"  per-device memory: arguments {mem.argument_size_in_bytes * gib:.2f} GiB, outputs "
            f"{mem.output_size_in_bytes * gib:.2f} GiB (aliased {mem.alias_size_in_bytes * gib:.2f}), temporaries "
            f"{mem.temp_size_in_bytes * gib:.2f} GiB, code {mem.generated_code_size_in_bytes / 2 ** 20:.1f} MiB; "
            f"peak ~ {(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes) * gib:.2f} GiB")
    print(f"  XLA cost_analysis of this program: {xla_flops * n:.3e} FLOPs/step (loop bodies -- layer scan, "
          f"attention chunks -- counted once by XLA, so this undercounts)")
    print(f"  BAGEL formula: {formula:.3e} FLOPs/step (6*N*tokens + 12*d*h*L*sum(len^2); {real_tokens} real "
          f"tokens/device, N = {bagel_active_params(cfg) / 1e9:.2f}B params per token)")
    if not ARGS.no_count and not counted:
      # Exact count: layers unrolled, dense attention, no remat (no recomputation), same shapes.
      count_opts = dataclasses.replace(opts, scan_unroll=True, attn_impl="dense", remat=False)
      cstep = ts.shard_train_step(ts.make_train_step(cfg, count_opts, tx), state_sh, batch_sh, mesh)
      t3 = time.time()
      ccost = cstep.lower(abstract_state, batch, key).compile().cost_analysis()
      ccost = ccost[0] if isinstance(ccost, (list, tuple)) else ccost
      cf = float(ccost.get("flops", float("nan"))) * n
      print(f"  XLA exact count (unrolled, dense attention, no remat; compile {time.time() - t3:.1f}s): "
            f"{cf:.3e} FLOPs/step = {cf / formula:.2f} x formula (the step also runs 2 VAE encodes per image)")
      counted = True


if __name__ == "__main__":
  main()
