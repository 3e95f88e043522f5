"""Ahead-of-time compile of a config's programs for a target device set, on this machine (no weights).

Targets: `cpu:N` (N simulated CPU devices) or `tpu:<type>:<topology>` (abstract TPU devices from
`jax.experimental.topologies`: needs the TPU build of JAX, e.g. a separate venv with
`pip install "jax[tpu]==0.10.2"`, and TPU_SKIP_MDS_QUERY=1). Programs (`srum_jax.aot`): the train step on
`config.mesh` over every device, and on one host's devices (`config.inference_mesh`) one sampler step with
CFG, the prompt prefill and the judge forward. Prints, per program: the mesh, compile time, XLA's
per-device memory (arguments, outputs, temporaries, peak) against the chip's HBM; for the train step also
XLA's FLOPs and BAGEL's formula. `--attn_impl` picks the attention (default: the config's `model.attn_impl`,
resolved for the target's platform: `auto` is splash on TPU targets, xla on CPU ones).

    TPU_SKIP_MDS_QUERY=1 python benchmarks/aot_compile.py --target tpu:v5p:2x2x4
    TPU_SKIP_MDS_QUERY=1 python benchmarks/aot_compile.py --target tpu:v6e:4x4 --programs sampler,judge
    python benchmarks/aot_compile.py --target cpu:8 --programs train --set model.remat=False
    TPU_SKIP_MDS_QUERY=1 python benchmarks/aot_compile.py --target tpu:v5p:2x2x4 --programs train --attn_impl splash
    TPU_SKIP_MDS_QUERY=1 python benchmarks/aot_compile.py --target tpu:v5p:1x1x1 --single_host --programs train \
        --config experiments/bagel_7b_lora.py                 # one chip: the LoRA memory plan
`--single_host` describes the topology as one host's chips (needed below a host's usual 4 chips, e.g. one
chip, and for v6e-8's single host of 8 chips: `--target tpu:v6e:2x4 --single_host`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HBM_BYTES = {"TPU v5": 95e9, "TPU v5p": 95e9, "TPU v6 lite": 32e9, "TPU v5 lite": 16e9, "TPU v4": 32e9}
PROGRAMS = ("train", "sampler", "prefill", "judge")
HOST_TOPOLOGY = {"v5p": "2x2x1", "v4": "2x2x1", "v6e": "2x2", "v5e": "2x2"}  # one host's chips


def _parse():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--target", default="cpu:8", help="cpu:N or tpu:<type>:<topology>, e.g. tpu:v5p:2x2x4")
  ap.add_argument("--config", default="experiments/bagel_7b_compbench.py")
  ap.add_argument("--programs", default=",".join(PROGRAMS), help=f"comma list of {PROGRAMS}")
  ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
  ap.add_argument("--attn_impl", default="",
                  help="model.attn_impl for every program: auto | xla | dense | chunked | splash | cudnn | tokamax "
                       "(default: the config's); splash_interpret: the splash kernel in the Pallas interpreter "
                       "(a CPU check of its lowering)")
  ap.add_argument("--single_host", action="store_true",
                  help="the TPU topology is one host's chips (chips_per_host_bounds = the topology): one chip "
                       "(1x1x1), or v6e-8's 2x4")
  ap.add_argument("--host_topology", default="",
                  help="TPU topology of one host, where the inference programs compile (default: 4 chips, "
                       f"{HOST_TOPOLOGY})")
  return ap.parse_args()


ARGS = _parse()
_kind, _, _spec = ARGS.target.partition(":")
if _kind == "cpu":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={int(_spec or 8)}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
elif _kind == "tpu":
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the abstract TPU devices need no TPU backend
else:
  sys.exit(f"unknown target {ARGS.target!r}: use cpu:N or tpu:<type>:<topology>")

import jax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from srum_jax import aot, config_utils  # noqa: E402
from srum_jax.flops import bagel_active_params, bagel_flops  # noqa: E402


def devices(host: bool = False):
  """The target's devices; `host`: one host's (inference runs on each host's own devices; TPU programs compile
  on that host's own topology, a compile on a subset of a multi-host topology is not supported)."""
  if _kind == "cpu":
    return jax.devices()
  from jax.experimental import topologies
  chip, _, topology = _spec.partition(":")
  kwargs = {}
  if ARGS.single_host:
    dims = [int(v) for v in topology.split("x")]
    kwargs["chips_per_host_bounds"] = dims + [1] * (3 - len(dims))
  elif host:
    topology = ARGS.host_topology or HOST_TOPOLOGY[chip]
  return list(topologies.get_topology_desc(topology_name=f"{chip}:{topology}", platform="tpu", **kwargs).devices)


def _value(text: str):
  import ast
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def resident_bytes(tree) -> int:
  """Bytes one device holds of an abstract tree with shardings (e.g. the whole model: the program may read
  only part of it, but every parameter stays in HBM)."""
  import numpy as np
  return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def report(prog, compiled, seconds: float, hbm) -> None:
  gib = 2 ** 30
  mem = compiled.memory_analysis()
  print(f"\n[{prog.name}] {prog.info}")
  print(f"  compile {seconds:.1f} s; resident per device: {resident_bytes(prog.args[0]) / gib:.2f} GiB of "
        f"{'the training state' if prog.name == 'train_step' else 'model parameters'}")
  if mem is not None:
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    fits = "" if hbm is None else f" of {hbm / gib:.1f} GiB HBM ({100 * peak / hbm:.0f}%: {'fits' if peak < hbm else 'DOES NOT FIT'})"
    print(f"  per device: arguments {mem.argument_size_in_bytes / gib:.2f} GiB, outputs "
          f"{mem.output_size_in_bytes / gib:.2f} GiB (aliased {mem.alias_size_in_bytes / gib:.2f}), temporaries "
          f"{mem.temp_size_in_bytes / gib:.2f} GiB; peak ~{peak / gib:.2f} GiB{fits}")


def train_flops(prog, compiled, config) -> None:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n = prog.mesh.devices.size
  xla = float(cost.get("flops", float("nan"))) * n if cost else float("nan")
  cfg = aot.model_config(config)
  t = config.train
  H, W = (int(v) for v in t.image_hw)
  n_lat = (H // cfg.latent_downsample) * (W // cfg.latent_downsample)
  per_sample = int(t.text_capacity) // int(t.samples_per_row) + n_lat
  samples = int(t.batch_size) * int(t.samples_per_row)
  formula = bagel_flops(cfg, samples * per_sample, [per_sample] * samples)
  print(f"  XLA cost_analysis: {xla:.3e} FLOPs per update (loop bodies counted once: an undercount); BAGEL "
        f"formula {formula:.3e} ({samples} samples of {per_sample} tokens, N = {bagel_active_params(cfg) / 1e9:.2f}B)")


def main():
  overrides = {k: _value(v) for k, v in (kv.split("=", 1) for kv in ARGS.set)}
  if ARGS.attn_impl:
    overrides["model.attn_impl"] = ARGS.attn_impl
  config = config_utils.load_config(ARGS.config, overrides)
  devs = devices()
  try:
    attn = aot.attn_impl(config, devs)  # the programs resolve it the same way
  except (ValueError, ImportError) as e:
    sys.exit(f"aot_compile: {e}")
  hbm = HBM_BYTES.get(devs[0].device_kind) if _kind == "tpu" else None
  print(f"target {ARGS.target}: {len(devs)} x {devs[0].device_kind}; config {ARGS.config} {ARGS.set}; "
        f"jax {jax.__version__}; attention {attn}", flush=True)
  builders = {"train": aot.train_step_program, "sampler": aot.sampler_step_program, "prefill": aot.prefill_program,
              "judge": aot.judge_program}
  for name in ARGS.programs.split(","):
    t0 = time.time()
    prog = builders[name](config, devs if name == "train" else devices(host=True))
    compiled = prog.jitted.lower(*prog.args).compile()
    report(prog, compiled, time.time() - t0, hbm)
    if name == "train":
      train_flops(prog, compiled, config)
    sys.stdout.flush()


if __name__ == "__main__":
  main()
