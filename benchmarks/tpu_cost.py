"""XLA's own TPU cost model on the 7B programs, compiled on this machine for abstract TPU devices.

COMPILER ESTIMATES, NOT MEASUREMENTS. Each program of `srum_jax.aot` (the SRUM train step, one
sampler step with CFG (the guided step, inside `cfg_interval`), the prompt prefill, the judge) is
compiled for a TPU target with a cut-down decoder (1 and 2 LLM layers; for the judge also 2 ViT
layers) and every `lax.scan` unrolled, and the whole program is read off by linear extrapolation:
cost(L) = cost(1) + (L - 1) * (cost(2) - cost(1)). Per compile:
* XLA's `cost_analysis()`: flops, bytes accessed and `optimal_seconds`, the compiler's estimate of
  the run
  time on that chip. It counts a while loop's body once, and XLA TPU turns FSDP all-gather + matmul
  pairs into such loops (windowed einsum): `hlo_ops` reads the loops' trip counts from the compiled
  module, and the missing iterations are added (their FLOPs and bytes; their time as the body's
  per-op roofline).
* the op-category split (`hlo_ops`): FLOPs, bytes and per-op roofline seconds per category, loops
  counted.
* the attention kernel: splash is a Pallas custom call, outside the cost model (no FLOPs; its
  operands'
  bytes are counted). Its FLOPs are computed here from the blocks it executes: each call's q / k
  shapes come from the module, the visible blocks from the program's token layout
  (`attention_sites`), and units of 2 x heads x head_dim x (block pairs x bq x bkv): forward 2
  (QK^T, PV), dq 3, dkv 4 (fused dq + dkv: 5, one recomputation of the scores). Its time is those
  FLOPs at the chip's peak (at 512-blocks the kernel does ~512 FLOPs per byte read, compute-bound).
Estimated time = XLA's optimal_seconds (extrapolated) + the loops' missing iterations + the kernel's
time. Utilisation: BAGEL's formula (`srum_jax.flops`) over estimated time x peak (train step), and
the counted FLOPs (XLA's, loop-corrected, + kernel) over the same. The check `counted / formula`
validates the scaling.

    TPU_SKIP_MDS_QUERY=1 venv_tpu/bin/python benchmarks/tpu_cost.py --target tpu:v5p:2x2x4 \
        --programs train
    ... --programs sampler,prefill,judge --json runs/tpu_cost.jsonl --label baseline
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time

CHIPS = {  # per chip: dense bf16 peak FLOP/s, HBM bytes/s, ICI bytes/s (all links), HBM bytes
    "TPU v5": dict(name="v5p", peak=459e12, hbm=2.765e12, ici=600e9, hbm_bytes=95e9),
    "TPU v5p": dict(name="v5p", peak=459e12, hbm=2.765e12, ici=600e9, hbm_bytes=95e9),
    "TPU v6 lite": dict(name="v6e", peak=918e12, hbm=1.64e12, ici=448e9, hbm_bytes=32e9),
}
PROGRAMS = ("train", "sampler", "prefill", "judge")
HOST_TOPOLOGY = {"v5p": "2x2x1", "v6e": "2x2"}
KERNEL_UNITS = {"fwd": 2, "dq": 3, "dkv": 4, "fused": 5}  # block matmuls per executed block pair


def _parse():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--target", default="tpu:v5p:2x2x4", help="tpu:<type>:<topology>")
  ap.add_argument("--config", default="experiments/bagel_7b_compbench.py")
  ap.add_argument("--programs", default="train", help=f"comma list of {PROGRAMS}")
  ap.add_argument("--set", action="append", default=[],
                  help="config override key=value (repeatable)")
  ap.add_argument("--attn_impl", default="",
                  help="model.attn_impl (default: the config's, resolved for TPU)")
  ap.add_argument("--host_topology", default="",
                  help=f"inference programs' topology (default {HOST_TOPOLOGY})")
  ap.add_argument("--xla", action="append", default=[],
                  help="XLA compiler option key=value for the compile")
  ap.add_argument("--json", default="", help="append one JSON record per program to this file")
  ap.add_argument("--label", default="", help="a name for this configuration in the JSON records")
  ap.add_argument("--hlo_dir", default="", help="write each compiled module's text here")
  return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # abstract TPU devices need no TPU backend

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hlo_ops  # noqa: E402

from srum_jax import aot, config_utils  # noqa: E402
from srum_jax.flops import bagel_active_params, bagel_flops  # noqa: E402
from srum_jax.inference import context  # noqa: E402
from srum_jax.models import packing  # noqa: E402
from srum_jax.training import train_step  # noqa: E402


@contextlib.contextmanager
def unrolled_scans():
  """Every `jax.lax.scan` traced inside runs unrolled (no while loop): XLA's cost analysis counts a
  loop body once, so the layer scans are unrolled for counting. Only for compiling estimates."""
  scan = jax.lax.scan

  def unrolled(*args, **kwargs):
    kwargs["unroll"] = True
    return scan(*args, **kwargs)

  jax.lax.scan = unrolled
  try:
    yield
  finally:
    jax.lax.scan = scan


def _value(text: str):
  import ast
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def tpu_devices(spec: str, host: bool = False):
  from jax.experimental import topologies
  chip, _, topology = spec.partition(":")
  if host:
    topology = ARGS.host_topology or HOST_TOPOLOGY[chip]
  return list(
      topologies.get_topology_desc(topology_name=f"{chip}:{topology}", platform="tpu").devices)


# --------------------------------------------------------------------------------------------------
# The attention kernel's executed blocks


@dataclasses.dataclass(frozen=True)
class Site:
  """One attention call of a layer: `q_len` queries over `slots` cached keys (`filled` of them real,
  earlier splits: visible to all queries) followed by the queries' own keys, `mode` CAUSAL or FULL
  among them; or, with `meta`, the packed training row's own mask."""
  q_len: int
  slots: int = 0
  filled: int = 0
  mode: int = packing.FULL
  meta: object = None


def _mask(site: Site) -> np.ndarray:
  """bool [Nq, Nk] of one row."""
  if site.meta is not None:
    m = site.meta
    return np.asarray(packing.attention_mask(m, m))[0]
  nq, nk = site.q_len, site.slots + site.q_len
  mask = np.zeros((nq, nk), bool)
  mask[:, :site.filled] = True
  own = np.tril(np.ones((nq, nq), bool)) if site.mode == packing.CAUSAL else np.ones((nq, nq), bool)
  mask[:, site.slots:] = own
  return mask


def executed_pairs(site: Site, block: int) -> tuple:
  """(visible pairs, pairs the kernel computes: non-empty block pairs x block^2) of one row, with
  splash's padding of both axes to whole blocks (`models.attention._splash_local`)."""
  mask = _mask(site)
  nq, nk = mask.shape
  bq, bk = min(block, -(-nq // 128) * 128), min(block, -(-nk // 128) * 128)
  pq, pk = -(-nq // bq) * bq, -(-nk // bk) * bk
  padded = np.zeros((pq, pk), bool)
  padded[:nq, :nk] = mask
  blocks = padded.reshape(pq // bq, bq, pk // bk, bk).any(axis=(1, 3))
  return int(mask.sum()), int(blocks.sum()) * bq * bk, (pq, pk)


def attention_sites(name: str, config, cfg) -> list:
  """The kernel's attention calls per layer of a program, in the layout the program compiles for.
  Inference contexts are taken as filled to the budgets `aot` sizes them by (system prompt, prompt,
  plan): an upper bound on a typical context."""
  t, g = config.train, config.generate
  if name == "train":
    H, W = (int(v) for v in t.image_hw)
    S = int(t.samples_per_row)
    per = int(t.text_capacity) // S - 4
    ids = [[[cfg.tokens.bos] + [7] * per + [cfg.tokens.eos] for _ in range(S)]]
    T = train_step.sample_window(t.num_tokens, S)
    inputs = train_step.t2i_layout(cfg, ids, image_hw=(H, W), num_tokens=int(t.num_tokens),
                                   text_capacity=int(t.text_capacity), sample_stride=T)
    meta = packing.to_device(inputs.meta)
    if not T:
      return [Site(q_len=int(t.num_tokens), meta=meta)]
    # the step attends within each sample's window (`StepOptions.sample_window`)
    return [Site(q_len=T, meta=jax.tree.map(lambda x, k=k: x[:, k * T:(k + 1) * T], meta))
            for k in range(S)]
  if name == "sampler":
    slots = aot._context_length(config, cfg)
    think = int(g.max_think_tokens) + 2 if g.think else 0
    filled = min(slots, 256 + (int(g.text_budget) or 128) + think)
    grid = (int(g.height) // cfg.latent_downsample, int(g.width) // cfg.latent_downsample)
    return [Site(q_len=grid[0] * grid[1] + 2, slots=slots, filled=filled, mode=packing.FULL)]
  if name == "prefill":
    return [Site(q_len=int(g.text_budget) or 128, slots=aot._context_length(config, cfg), filled=0,
                 mode=packing.CAUSAL)]
  if name == "judge":
    side = cfg.vit_max_num_patch_per_side
    img = side * side + 2
    slots = context.bucket(side * side + 2 + 512 + 16)
    return [Site(q_len=img, slots=slots, filled=0, mode=packing.FULL),
            Site(q_len=512, slots=slots, filled=img, mode=packing.CAUSAL)]
  raise ValueError(name)


def kernel_flops(split: hlo_ops.Split, sites: list, block: int) -> tuple:
  """(FLOPs, calls) of the module's attention-kernel calls: each call matched to a site by its
  padded query length, heads and head dim from its q operand."""
  by_len = {}
  for s in sites:
    vis, exe, (pq, pk) = executed_pairs(s, block)
    by_len[pq] = (exe, s)
  total, calls = 0.0, 0
  kernels = [o for o in split.ops if o.category == "attention kernel" and o.q_shape]
  fused = not any("dq" in o.name for o in kernels)  # a fused backward: dq from the dkv kernel
  for o in kernels:
    kind = "dkv" if "dkv" in o.name else "dq" if "dq" in o.name else "fwd"
    if kind == "dkv" and fused:
      kind = "fused"
    *lead, nq, d = o.q_shape
    heads = math.prod(lead)
    match = by_len.get(nq)
    if match is None:
      continue
    total += 2.0 * KERNEL_UNITS[kind] * heads * d * match[0] * o.count
    calls += o.count
  return total, calls


# --------------------------------------------------------------------------------------------------
# One program


def _cfg(config, llm_layers: int, vit_layers: int):
  cfg = aot.model_config(config)
  cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, num_hidden_layers=llm_layers))
  if cfg.vit is not None:
    cfg = cfg.replace(vit=dataclasses.replace(cfg.vit, num_hidden_layers=vit_layers))
  return cfg


def compile_variant(name: str, config, target: str, llm_layers: int, vit_layers: int, chip: dict):
  """Compile one cut-down variant; returns its measurements (a dict)."""
  builders = {
      "train": aot.train_step_program,
      "sampler": functools.partial(aot.sampler_step_program, guided=True),
      "prefill": aot.prefill_program,
      "judge": aot.judge_program
  }
  devs = tpu_devices(target, host=name != "train")
  cfg = _cfg(config, llm_layers, vit_layers)
  t0 = time.time()
  with unrolled_scans():
    prog = builders[name](config, devs, cfg)
    lowered = prog.jitted.lower(*prog.args)
  options = {k: _value(v) for k, v in (kv.split("=", 1) for kv in ARGS.xla)}
  compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
  seconds = time.time() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  if ARGS.hlo_dir:
    os.makedirs(ARGS.hlo_dir, exist_ok=True)
    with open(
        os.path.join(ARGS.hlo_dir,
                     f"{ARGS.label or 'run'}_{name}_{llm_layers}_{vit_layers}.hlo.txt"), "w") as f:
      f.write(text)
  split = hlo_ops.split(text, chip["peak"], chip["hbm"], chip["ici"])
  kflops, kcalls = kernel_flops(split, attention_sites(name, config, cfg), 512)
  return dict(compile_s=seconds, devices=len(prog.mesh.devices.flat), mesh=dict(
      prog.mesh.shape), info=prog.info, xla_flops=float(cost.get("flops", 0.0)), xla_bytes=float(
          cost.get("bytes accessed", 0.0)), xla_seconds=float(cost.get(
              "optimal_seconds", 0.0)), loop_flops=split.loop_extra["flops"],
              loop_bytes=split.loop_extra["bytes"], loop_seconds=split.loop_extra["seconds"],
              cat_flops=split.flops, cat_bytes=split.bytes, cat_seconds=split.seconds,
              kernel_flops=kflops, kernel_calls=kcalls)


def _extrapolate(a, b, n: float):
  """a + n (b - a) for numbers and dicts of numbers."""
  if isinstance(a, dict):
    return {k: _extrapolate(a[k], b[k], n) for k in a}
  return a + n * (b - a)


def train_formula(config, cfg) -> tuple:
  """BAGEL's formula for one update of the config's batch: (total, the 6 N tokens term, the
  attention term)."""
  t = config.train
  H, W = (int(v) for v in t.image_hw)
  n_lat = (H // cfg.latent_downsample) * (W // cfg.latent_downsample)
  per_sample = int(t.text_capacity) // int(t.samples_per_row) + n_lat
  samples = int(t.batch_size) * int(t.samples_per_row)
  total = bagel_flops(cfg, samples * per_sample, [per_sample] * samples)
  dense = 6.0 * bagel_active_params(cfg) * samples * per_sample
  return total, dense, total - dense


def estimate(name: str, config, target: str) -> dict:
  """Compile the variants of a program and extrapolate to the full model (a dict of the figures)."""
  devs = tpu_devices(target, host=name != "train")
  chip = CHIPS[devs[0].device_kind]
  full = aot.model_config(config)
  L = full.llm.num_hidden_layers
  Lv = full.vit.num_hidden_layers if full.vit is not None else 1
  v11 = compile_variant(name, config, target, 1, 1, chip)
  v21 = compile_variant(name, config, target, 2, 1, chip)
  keys = ("xla_flops", "xla_bytes", "xla_seconds", "loop_flops", "loop_bytes", "loop_seconds",
          "cat_flops", "cat_bytes", "cat_seconds", "kernel_flops", "kernel_calls")
  pick = lambda v: {k: v[k] for k in keys}  # noqa: E731
  whole = _extrapolate(pick(v11), pick(v21), L - 1)
  per_layer = {k: _sub(pick(v21)[k], pick(v11)[k]) for k in keys}
  vit_layer = v12 = None
  if name == "judge":
    v12 = compile_variant(name, config, target, 1, 2, chip)
    vit_layer = {k: _sub(pick(v12)[k], pick(v11)[k]) for k in keys}
    whole = {k: _add(whole[k], _scale(vit_layer[k], Lv - 1)) for k in keys}
  n = v11["devices"]
  kernel_s = whole["kernel_flops"] / chip["peak"]
  roofline = sum(whole["cat_seconds"].values()) + kernel_s
  valid = all(v["xla_seconds"] > 0 for v in (v11, v21, v12) if v is not None)
  # XLA's estimate where it gave one (on some targets some ops get a negative time: then the
  # roofline)
  est = whole["xla_seconds"] + whole["loop_seconds"] + kernel_s if valid else roofline
  counted = whole["xla_flops"] + whole["loop_flops"] + whole["kernel_flops"]
  cat_seconds = dict(whole["cat_seconds"])
  cat_seconds["attention kernel"] += kernel_s
  cat_flops = dict(whole["cat_flops"])
  cat_flops["attention kernel"] += whole["kernel_flops"]
  raw = {
      "%d_%d" % lv:
          dict(xla_flops=v["xla_flops"], xla_bytes=v["xla_bytes"], xla_seconds=v["xla_seconds"])
      for lv, v in (((1, 1), v11), ((2, 1), v21)) + ((((1, 2), v12),) if name == "judge" else ())
  }
  out = dict(
      program=name, target=target, raw=raw, chip=chip["name"], devices=n, mesh=v11["mesh"],
      info=v11["info"], layers=L, vit_layers=Lv if name == "judge" else 0, label=ARGS.label,
      sets=ARGS.set, xla_options=ARGS.xla, compile_s=[v11["compile_s"], v21["compile_s"]],
      xla_flops=whole["xla_flops"], xla_bytes=whole["xla_bytes"], xla_seconds=whole["xla_seconds"],
      loop_flops=whole["loop_flops"], loop_bytes=whole["loop_bytes"],
      loop_seconds=whole["loop_seconds"], kernel_flops=whole["kernel_flops"],
      kernel_seconds=kernel_s, kernel_calls=whole["kernel_calls"], estimated_seconds=est,
      xla_time_valid=valid, roofline_seconds=roofline, counted_flops=counted,
      bytes_per_chip=whole["xla_bytes"] + whole["loop_bytes"],
      counted_utilisation=counted / (est * chip["peak"]), cat_flops=cat_flops,
      cat_bytes=whole["cat_bytes"], cat_seconds=cat_seconds, per_layer=dict(
          xla_flops=per_layer["xla_flops"], xla_bytes=per_layer["xla_bytes"],
          xla_seconds=per_layer["xla_seconds"], loop_flops=per_layer["loop_flops"],
          loop_bytes=per_layer["loop_bytes"], loop_seconds=per_layer["loop_seconds"],
          kernel_flops=per_layer["kernel_flops"]), hbm_gib=chip["hbm_bytes"] / 2**30)
  matmul_s = cat_flops["matmul/convolution"] / chip["peak"]
  out["matmul_bound_seconds"] = matmul_s
  out["matmul_attention_bound_seconds"] = matmul_s + kernel_s
  if name == "train":
    formula, dense, attn = train_formula(config, full)
    out["formula_flops"] = formula
    out["mfu_formula"] = formula / n / (est * chip["peak"])
    out["counted_over_formula"] = counted * n / formula
    out["matmul_over_formula_dense"] = cat_flops["matmul/convolution"] * n / dense
    out["kernel_over_formula_attention"] = whole["kernel_flops"] * n / attn
  return out


def _sub(a, b):
  return {k: a[k] - b[k] for k in a} if isinstance(a, dict) else a - b


def _add(a, b):
  return {k: a[k] + b[k] for k in a} if isinstance(a, dict) else a + b


def _scale(a, s):
  return {k: a[k] * s for k in a} if isinstance(a, dict) else a * s


def report(r: dict) -> None:
  gib = 2 ** 30
  print(
      f"\n[{r['program']}] {r['target']} ({r['devices']} x {r['chip']}; mesh {r['mesh']}); "
      f"{r['layers']} layers{' + %d ViT layers' % r['vit_layers'] if r['vit_layers'] else ''}; "
      f"label "
      f"{r['label'] or '-'}; sets {r['sets']}; xla options {r['xla_options']} -- COMPILER ESTIMATE")
  print(f"  info {r['info']}; compile {r['compile_s'][0]:.0f} + {r['compile_s'][1]:.0f} s")
  print(
      f"  XLA cost_analysis (per chip, extrapolated): flops {r['xla_flops']:.3e}, bytes "
      f"{r['xla_bytes']:.3e}, "
      f"optimal_seconds {r['xla_seconds']:.4f}")
  print(
      f"  + loop iterations XLA counts once: flops {r['loop_flops']:.3e}, bytes "
      f"{r['loop_bytes']:.3e}, "
      f"{r['loop_seconds']:.4f} s (roofline)")
  print(f"  + attention kernel: {r['kernel_calls']:.0f} calls, flops {r['kernel_flops']:.3e}, "
        f"{r['kernel_seconds']:.4f} s at peak")
  if not r["xla_time_valid"]:
    print(
        f"  XLA's optimal_seconds is not usable on this target (a variant's is <= 0: {r['raw']}): "
        f"the estimate "
        f"below is the per-op roofline")
  print(
      f"  = estimated {r['estimated_seconds']:.4f} s per step per chip (per-op roofline "
      f"{r['roofline_seconds']:.4f} s); "
      f"bytes per chip {r['bytes_per_chip']:.3e}; "
      f"counted FLOPs {r['counted_flops']:.3e} at {100 * r['counted_utilisation']:.1f}% of peak")
  pl = r["per_layer"]
  print(
      f"  per layer: XLA flops {pl['xla_flops']:.3e} bytes {pl['xla_bytes']:.3e} "
      f"{pl['xla_seconds']:.4f} s; "
      f"loops +{pl['loop_flops']:.3e} flops +{pl['loop_bytes']:.3e} bytes "
      f"+{pl['loop_seconds']:.4f} s; "
      f"kernel {pl['kernel_flops']:.3e} flops")
  if "formula_flops" in r:
    print(
        f"  BAGEL formula {r['formula_flops']:.3e} per update "
        f"({r['formula_flops'] / r['devices']:.3e} per chip): "
        f"MFU {100 * r['mfu_formula']:.1f}%; counted / formula {r['counted_over_formula']:.3f} "
        f"(matmuls / 6 N tokens "
        f"{r['matmul_over_formula_dense']:.3f}, kernel / attention term "
        f"{r['kernel_over_formula_attention']:.3f})"
    )
  print(
      f"  matmul-only bound {r['matmul_bound_seconds']:.4f} s (+ kernel "
      f"{r['matmul_attention_bound_seconds']:.4f} s); "
      f"estimate / bound {r['estimated_seconds'] / r['matmul_attention_bound_seconds']:.2f}")
  tot_s = sum(r["cat_seconds"].values()) or 1.0
  print(f"  {'category':22s} {'flops':>10s} {'bytes':>10s} {'roofline s':>10s} {'share':>6s}")
  for c in hlo_ops.CATEGORIES:
    print(
        f"  {c:22s} {r['cat_flops'][c]:10.3e} {r['cat_bytes'][c]:10.3e} "
        f"{r['cat_seconds'][c]:10.4f} "
        f"{100 * r['cat_seconds'][c] / tot_s:5.1f}%")
  del gib


def main():
  overrides = {k: _value(v) for k, v in (kv.split("=", 1) for kv in ARGS.set)}
  if ARGS.attn_impl:
    overrides["model.attn_impl"] = ARGS.attn_impl
  config = config_utils.load_config(ARGS.config, overrides)
  kind, _, spec = ARGS.target.partition(":")
  if kind != "tpu":
    sys.exit("tpu_cost: the target must be tpu:<type>:<topology>")
  print(
      f"jax {jax.__version__}; config {ARGS.config}; COMPILER ESTIMATES (XLA's TPU cost model), "
      f"not measurements",
      flush=True)
  for name in ARGS.programs.split(","):
    r = estimate(name, config, spec)
    report(r)
    if ARGS.json:
      with open(ARGS.json, "a") as f:
        f.write(json.dumps(r) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
  main()
