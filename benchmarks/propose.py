"""Region proposals: SAM's automatic mask generation in JAX vs the PyTorch path, and the JAX program
compiled for TPU targets.

    python benchmarks/propose.py --preset small --images 8         # images/s, both paths, this CPU
    python benchmarks/propose.py --preset vit_b --images 1 --image 1024 --paths jax,torch
    TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 venv_tpu/bin/python benchmarks/propose.py \
        --target tpu:v5p:2x2x1 --preset vit_h --images_per_device 2          # compile + memory only

Speed (`--target cpu`): one random SAM of `--preset` (our initialiser; the same weights go to both
paths: a transformers SamModel directory written from the tree), `--images` shapes-world renders
scaled to `--image` pixels, SAM's default generator settings (32 x 32 points, IoU 0.88, stability
0.95, NMS 0.7). `jax`: the `sam` proposer, `--images_per_call` images per call on this machine's
devices, one untimed call first (compilation). `torch`: the `sam_torch` proposer (transformers
`SamModel`, one image at a time) after one untimed image. Both with `--threads` threads. Prints
seconds and images/s per path, and whether their boxes agree. Random weights: the filters may keep
few masks, which changes only the NMS loop (a small part of either path's time).

TPU (`--target tpu:<type>:<host topology>`): `sam_masks.automatic_boxes` lowered on abstract devices
(`jax.experimental.topologies`: one host's chips) with `--images_per_device` images per chip, images
of `--image` pixels; prints compile seconds, XLA's per-device memory (arguments, outputs,
temporaries, peak) against the chip's HBM, and XLA's FLOP count.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from srum_jax import sharding  # noqa: E402
from srum_jax.convert import sam_to_flax  # noqa: E402
from srum_jax.inference import sam_masks  # noqa: E402
from srum_jax.models import params as params_lib, sam_config, sam_schema  # noqa: E402
from srum_jax.pipeline import proposers  # noqa: E402
from srum_jax.worlds import shapes  # noqa: E402

HBM_BYTES = {"TPU v5": 95e9, "TPU v5p": 95e9, "TPU v6 lite": 32e9, "TPU v5 lite": 16e9}


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--target", default="cpu", help="cpu, or tpu:<type>:<one host's topology>")
  ap.add_argument("--preset", default="small", help="tiny | small | vit_b | vit_l | vit_h")
  ap.add_argument("--image", type=int, default=0, help="image side (default: the model's)")
  ap.add_argument("--images", type=int, default=4, help="timed images per path")
  ap.add_argument("--images_per_call", type=int, default=4, help="JAX: images per program call")
  ap.add_argument("--images_per_device", type=int, default=2, help="TPU compile: images per chip")
  ap.add_argument("--points_per_side", type=int, default=32)
  ap.add_argument("--points_per_batch", type=int, default=64)
  ap.add_argument("--paths", default="jax,torch", help="comma list of jax, torch")
  ap.add_argument("--threads", type=int, default=1, help="CPU threads per path")
  ap.add_argument("--dtype", default="float32", help="JAX weights and compute: float32 | bfloat16")
  return ap.parse_args(argv)


def _setup_cpu_threads(threads: int) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if threads == 1 and "multi_thread_eigen" not in flags:
    os.environ["XLA_FLAGS"] = flags + " --xla_cpu_multi_thread_eigen=false"


def scenes(n: int, side: int):
  """n shapes-world renders scaled (nearest) to side x side."""

  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    image = shapes.render(shapes.sample_scene(rng, shapes.sample_prompt(rng)))
    out.append(np.asarray(Image.fromarray(image).resize((side, side), Image.NEAREST)))
  return out


def random_weights(preset: str, directory: str):
  """(cfg, params) of a random SAM, also written as a transformers SamModel directory."""
  import torch
  from safetensors.torch import save_file
  from transformers import SamConfig, SamModel

  cfg = sam_config.get_preset(preset)
  params = params_lib.init_params(sam_schema.sam_schema(cfg), jax.random.key(0))
  params = jax.tree.map(np.asarray, params)
  with torch.device("meta"):
    model = SamModel(SamConfig(**sam_to_flax.transformers_config(cfg)))
  model.config.save_pretrained(directory)
  state = sam_to_flax.checkpoint_state_dict(cfg, params, "transformers")
  state = {k: torch.tensor(v) for k, v in state.items()}
  save_file(state, os.path.join(directory, "model.safetensors"))
  del model
  return cfg, params


def speed(args) -> dict:
  import torch

  torch.set_num_threads(args.threads)
  work = tempfile.mkdtemp(prefix="sam_bench_")
  cfg, _ = random_weights(args.preset, work)
  side = args.image or cfg.image_size
  images = scenes(args.images, side)
  opts = dict(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
              max_regions=None)
  print(f"preset {args.preset}: encoder {cfg.encoder.num_layers} x {cfg.encoder.hidden_size} at "
        f"{cfg.image_size} px; {args.images} images of {side}x{side}; "
        f"{args.points_per_side}^2 points, "
        f"{args.points_per_batch} per batch; {args.threads} thread(s)", flush=True)
  out, boxes = {}, {}
  for path in args.paths.split(","):
    if path == "jax":
      p = proposers.get_proposer("sam", weights=work, images_per_call=args.images_per_call,
                                 dtype=args.dtype, **opts)
      t0 = time.time()
      p.propose_batch(images[:args.images_per_call])
      warm = time.time() - t0
      t0 = time.time()
      boxes[path] = [r for start in range(0, len(images), args.images_per_call)
                     for r in p.propose_batch(images[start:start + args.images_per_call])]
    else:
      p = proposers.get_proposer("sam_torch", weights=work, device="cpu", **opts)
      t0 = time.time()
      p(images[0])
      warm = time.time() - t0
      t0 = time.time()
      boxes[path] = [p(image) for image in images]
    sec = time.time() - t0
    out[path] = dict(seconds=sec, images_per_s=len(images) / sec, first_call_s=warm)
    print(f"  {path:<6} {sec:8.2f} s for {len(images)} images: {len(images) / sec:.4f} images/s "
          f"(first call {warm:.1f} s)", flush=True)
  if len(boxes) == 2:
    a, b = boxes.values()
    same = sum([r.box for r in x] == [r.box for r in y] for x, y in zip(a, b))
    n = [len(x) for x in a]
    print(f"  boxes identical on {same}/{len(images)} images (JAX boxes per image: {n})")
    out["identical_images"] = same
  if "jax" in out and "torch" in out:
    print(f"  jax / torch speed: {out['jax']['images_per_s'] / out['torch']['images_per_s']:.2f}x")
  return out


def tpu_devices(target: str):
  _, chip, topology = target.split(":")
  desc = topologies.get_topology_desc(topology_name=f"{chip}:{topology}", platform="tpu")
  return list(desc.devices)


def compile_tpu(args) -> dict:

  devices = tpu_devices(args.target)
  cfg = sam_config.get_preset(args.preset)
  mesh = sharding.make_mesh({"data": len(devices)}, devices)
  batch = args.images_per_device * len(devices)
  side = args.image or cfg.image_size
  dtype = jnp.dtype(args.dtype)
  opts = sam_masks.MaskOptions(points_per_side=args.points_per_side,
                               points_per_batch=args.points_per_batch)
  shardings, _, params, images = sam_masks.compile_args(cfg, mesh, batch, dtype)
  t0 = time.time()
  program = sam_masks.jit_program(cfg, opts, (side, side), mesh, shardings, dtype)
  compiled = program.lower(params, images).compile()
  sec = time.time() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = 2 ** 30
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + \
      mem.temp_size_in_bytes
  hbm = HBM_BYTES.get(devices[0].device_kind)
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  print(f"target {args.target}: {len(devices)} x {devices[0].device_kind}; SAM {args.preset}, "
        f"{dtype.name}; "
        f"{batch} images of {side}x{side} ({args.images_per_device} per chip), "
        f"{args.points_per_side}^2 points, {args.points_per_batch} per step")
  print(f"  compile {sec:.1f} s; per device: arguments {mem.argument_size_in_bytes / gib:.2f} GiB, "
        f"outputs {mem.output_size_in_bytes / gib:.4f} GiB, temporaries "
        f"{mem.temp_size_in_bytes / gib:.2f} GiB; peak ~{peak / gib:.2f} GiB"
        + (f" of {hbm / gib:.1f} GiB HBM ({100 * peak / hbm:.0f}%)" if hbm else ""))
  hlo = compiled.as_text()
  collectives = {op: hlo.count(f" {op}(") for op in ("all-gather", "all-reduce", "reduce-scatter",
                                                      "all-to-all", "collective-permute")}
  print(f"  XLA cost_analysis: {flops:.3e} FLOPs per device per call (loop bodies counted once); "
        f"collectives in the program: {collectives}")
  return dict(compile_s=sec, peak_bytes=peak, flops=flops, collectives=collectives)


def main(argv: Optional[List[str]] = None):
  args = parse(argv)
  if args.target == "cpu":
    _setup_cpu_threads(args.threads)
    return speed(args)
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  return compile_tpu(args)


if __name__ == "__main__":
  main(sys.argv[1:])
