"""Parity of this port with the official PyTorch BAGEL on the same weights and inputs; prints the
largest differences.

    python benchmarks/parity_official.py --bagel_code=~/Bagel --weights=~/BAGEL-7B-MoT --device=cuda

Three checks, each built from the same token ids, pixels and noise on both sides:
  t2i     the velocity of one T2I query block at fixed noise and flow time: conditional (prompt
          context), unconditional (empty context) and their CFG combination (global renorm);
  judge   the next-token logits after [ViT image] + question (the first answer token), and a few
          greedy tokens;
  think   a few greedy think-mode tokens after [BAGEL's generation think system prompt] + prompt,
          with their logits.
Text is tokenized once (this port's tokenizer, from the weights dir); when the official Qwen2
tokenizer loads from the same dir, its ids are compared too. The image is `--image` (default: the
official repository's test_images/meme.jpg), resized by the official VAE then ViT transforms
(`models.image_transforms`, which equal torchvision's on PIL images). The think system prompt is
read from the official `inferencer.py` (parsed, not run, so the JAX half needs no torch).

The official half runs BAGEL's own modules imported from `--bagel_code` (its `InterleaveInferencer`
context updates, `_forward_flow` and `generate_text`), with the weights loaded as its notebook does
(accelerate, bfloat16, one device). Where `flash_attn` is not installed (CPU), its
`flash_attn_varlen_func` is replaced by exact per-segment softmax attention with torch SDPA (causal
masks aligned bottom-right, as flash-attn >= 2.1 does for the KV-cache path); BAGEL's code is not
otherwise changed. `--official_dtype=float32` loads the weights in float32 and redirects the code's
hard-coded bfloat16 casts to float32: with `--jax_dtype=float32` both sides then compute in float32,
and the differences show the implementations, not rounding.

The official code needs its own environment (transformers 4.49) and this port its own (JAX); the
halves can run apart: `--half=jax --save=jax.npz` here, then, with the official environment's
Python, `--half=torch --inputs=jax.npz` (that half imports neither JAX nor srum_jax) prints the
comparison. `--half=both` runs both in one environment that has both. Imports: torch only inside the
official half, JAX and srum_jax only inside the JAX half (each absent from the other half's
environment).
"""
from __future__ import annotations

import argparse
import ast
import importlib.machinery
import os
import sys
import types
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

FLOAT_OUTPUTS = ("v_cond", "v_uncond", "v_cfg", "logits")  # the other outputs are token ids

# ----------------------------------------------------------------------------------------------
# Inputs (prepared once, in the JAX environment)


def official_constant(bagel_code: str, name: str) -> str:
  """A string constant of the official `inferencer.py`, read from its syntax tree (not run)."""
  path = os.path.join(os.path.expanduser(bagel_code), "inferencer.py")
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
      if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
        return node.value.value
  raise ValueError(f"{path} has no string constant {name} (the official file changed layout)")


def default_image(bagel_code: str, size: Tuple[int, int] = (640, 480)) -> Image.Image:
  """The official repository's test_images/meme.jpg, or (absent) a fixed synthetic picture."""
  path = os.path.join(os.path.expanduser(bagel_code), "test_images", "meme.jpg")
  if os.path.exists(path):
    return Image.open(path).convert("RGB")
  y, x = np.mgrid[0:size[1], 0:size[0]]
  img = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) % 256], -1).astype(np.uint8)
  return Image.fromarray(img)


def make_inputs(tokenizer, cfg, *, image: Image.Image, prompt: str, question: str,
                think_system: str, size: Tuple[int, int], t: float, cfg_text_scale: float,
                num_tokens: int, seed: int, vae_transform: Sequence[int],
                vit_transform: Sequence[int]) -> dict:
  """The three checks' inputs as plain arrays: token ids (BOS/EOS added by the context builders),
  the ViT view of `image` (the VAE resize, then the ViT transform: (max, min, stride) each), the
  noise [h*w, p*p*z] (NumPy, `seed`) and the model facts the official half needs."""
  from srum_jax.models import image_transforms  # srum_jax: absent from the official environment
  vae_view = image_transforms.resize_image(image, *vae_transform)
  vit_view = image_transforms.transform_image(vae_view, *vit_transform)
  if max(vit_view.shape[:2]) > 14 * cfg.vit_max_num_patch_per_side:
    raise ValueError(
        f"the ViT view {vit_view.shape[:2]} exceeds the model's {cfg.vit_max_num_patch_per_side} "
        f"patches a side: lower --vit_transform's max size")
  f = cfg.latent_downsample
  grid = (size[0] // f, size[1] // f)
  noise = np.random.default_rng(seed).standard_normal(
      (grid[0] * grid[1], cfg.patch_latent_dim)).astype(np.float32)
  ids = lambda text: np.asarray(tokenizer.encode(text), np.int64)
  tok = cfg.tokens
  return {
      "prompt": np.asarray(prompt),
      "question": np.asarray(question),
      "think_system": np.asarray(think_system),
      "prompt_ids": ids(prompt),
      "question_ids": ids(question),
      "think_system_ids": ids(think_system),
      "vit_image": vit_view.astype(np.float32),
      "noise": noise,
      "t": np.float32(t),
      "size": np.asarray(size),
      "cfg_text_scale": np.float32(cfg_text_scale),
      "num_tokens": np.int64(num_tokens),
      "special_ids": np.asarray([tok.bos, tok.eos, tok.start_of_image, tok.end_of_image]),
      "vae_downsample": np.int64(f // cfg.latent_patch_size),
      "latent_patch_size": np.int64(cfg.latent_patch_size),
      "z_channels": np.int64(cfg.ae.z_channels),
      "max_latent_size": np.int64(cfg.max_latent_size),
      "vit_max_num_patch_per_side": np.int64(cfg.vit_max_num_patch_per_side),
      "connector_act": np.asarray(cfg.connector_act),
      "timestep_shift": np.float32(cfg.timestep_shift),
  }


def check_parts(inputs: dict) -> Dict[str, List[Tuple[str, np.ndarray]]]:
  """Each check's context as (kind, content) splits, in order."""
  return {"t2i": [("text", inputs["prompt_ids"])],
          "judge": [("vit", inputs["vit_image"]), ("text", inputs["question_ids"])],
          "think": [("text", inputs["think_system_ids"]), ("text", inputs["prompt_ids"])]}


# ----------------------------------------------------------------------------------------------
# This port (JAX)


def jax_half(params, cfg, inputs: dict, parts=None, dtype="float32") -> Dict[str, np.ndarray]:
  """This port's outputs for `inputs` (`params`: {'bagel': ...}); `parts` replaces `check_parts`."""
  import jax.numpy as jnp  # jax: absent from the official environment

  from srum_jax.inference import context, decoding, sampling

  params = params["bagel"]
  parts = parts or check_parts(inputs)
  n = int(inputs["num_tokens"])

  def build(splits, extra):
    patches = [context.vit_inputs([x], cfg) for kind, x in splits if kind == "vit"]
    texts = sum(len(x) + 2 for kind, x in splits if kind == "text")
    T = context.bucket(texts + sum(p.shape[1] + 2 for p, _ in patches) + extra)
    ctx = context.init_context(cfg, 1, T, jnp.dtype(dtype))
    for kind, x in splits:
      if kind == "text":
        ctx = context.add_texts(params, ctx, [list(map(int, x))], cfg)
      else:
        ctx = context.add_vit_images(params, ctx, [np.asarray(x, np.float32)], cfg)
    return ctx

  grid = tuple(int(s) // cfg.latent_downsample for s in inputs["size"])
  noise = jnp.asarray(inputs["noise"])[None]
  gen, empty = build(parts["t2i"], 0), build([], 0)
  v_cond, v_uncond = sampling.branch_velocities(params, (gen, empty), noise, inputs["t"], cfg=cfg,
                                                grid=grid)
  v_cfg = sampling.cfg_combine(v_cond, v_uncond, None,
                               cfg_text_scale=float(inputs["cfg_text_scale"]), cfg_img_scale=1.0,
                               cfg_renorm_type="global")
  out = {"t2i.v_cond": v_cond[0], "t2i.v_uncond": v_uncond[0], "t2i.v_cfg": v_cfg[0]}
  for check in ("judge", "think"):
    g = decoding.generate_text(params, build(parts[check], n + 2), cfg, max_new_tokens=n,
                               stop_ids=(), return_logits=True)
    out[f"{check}.tokens"] = g.tokens[0]
    out[f"{check}.logits"] = g.logits[0]
  return {k: np.asarray(v, np.float32 if k.endswith(FLOAT_OUTPUTS) else np.int64)
          for k, v in out.items()}


def load_jax_model(weights: str, dtype: str):
  """(cfg, params, tokenizer) of an official checkpoint dir, through the converter (in memory)."""
  from srum_jax.convert import hf_to_flax  # srum_jax: absent from the official environment
  from srum_jax.tokenizer import load_tokenizer

  cfg, params = hf_to_flax.load_official(weights, dtype=dtype)
  tok = load_tokenizer(weights)
  tok.check(cfg.tokens)
  return cfg, params, tok


# ----------------------------------------------------------------------------------------------
# The official PyTorch model


def install_flash_attn_fallback() -> bool:
  """Provide `flash_attn.flash_attn_varlen_func` as exact attention with torch SDPA when flash-attn
  is not installed; True when the fallback was installed."""
  try:
    import flash_attn  # noqa: F401  (flash_attn: the real kernels, when installed)
    return False
  except ImportError:
    pass
  import torch  # torch: only the official half uses it

  def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                             max_seqlen_k=None, dropout_p=0.0, softmax_scale=None, causal=False,
                             **unused):
    out = torch.empty_like(q)
    for b in range(len(cu_seqlens_q) - 1):
      q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
      k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
      qb, kb, vb = (x.transpose(0, 1).float() for x in (q[q0:q1], k[k0:k1], v[k0:k1]))  # [H, L, d]
      rep = qb.shape[0] // kb.shape[0]
      kb, vb = kb.repeat_interleave(rep, 0), vb.repeat_interleave(rep, 0)
      mask = None
      if causal:  # query i of Lq sees key j iff j <= i + Lk - Lq
        i = torch.arange(q1 - q0, device=q.device)[:, None]
        j = torch.arange(k1 - k0, device=q.device)[None, :]
        mask = j <= i + (k1 - k0) - (q1 - q0)
      o = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask,
                                                           scale=softmax_scale)
      out[q0:q1] = o.transpose(0, 1).to(q.dtype)
    return out

  module = types.ModuleType("flash_attn")
  # A spec without package metadata: libraries that probe for flash-attn still find none.
  module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
  module.flash_attn_varlen_func = flash_attn_varlen_func
  sys.modules["flash_attn"] = module
  return True


def compare_tokenizers(weights: str, inputs: dict) -> None:
  """Print whether the official Qwen2 tokenizer (with BAGEL's special tokens), loaded from
  `weights`, gives the ids this port's tokenizer gave; a dir without its files is reported."""
  try:
    from data.data_utils import add_special_tokens
    from modeling.qwen2 import Qwen2Tokenizer
    tok, special, _ = add_special_tokens(Qwen2Tokenizer.from_pretrained(weights))
  except Exception as e:  # e.g. a tiny checkpoint with a word-level tokenizer.json only
    print(f"[official] tokenizer not compared ({type(e).__name__}: {str(e)[:80]})", flush=True)
    return
  names = ("bos_token_id", "eos_token_id", "start_of_image", "end_of_image")
  same = {"special ids": [special[n] for n in names] == [int(i) for i in inputs["special_ids"]]}
  for name in ("prompt", "question", "think_system"):
    same[name] = tok.encode(str(inputs[name])) == [int(i) for i in inputs[f"{name}_ids"]]
  agree = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items())
  print(f"[official] tokenizer ids agree: {agree}", flush=True)


class _IdTokenizer:
  """The official context builders call `tokenizer.encode(text)`; here the text is already ids."""

  def encode(self, ids):
    return [int(i) for i in ids]


def torch_half(bagel_code: str, weights: str, inputs: dict, device: str = "cpu",
               dtype: str = "bfloat16") -> Dict[str, Any]:
  """The official model's outputs for `inputs` (its modules from `bagel_code`). dtype "float32":
  weights in float32 and BAGEL's hard-coded bfloat16 casts redirected to float32 (`torch.bfloat16`
  is rebound for this process), so the differences show the implementations, not rounding."""
  import torch  # torch: only the official half uses it
  from accelerate import init_empty_weights, load_checkpoint_and_dispatch

  if dtype == "float32":
    torch.bfloat16 = torch.float32
  compute = getattr(torch, dtype)

  sys.path.insert(0, os.path.expanduser(bagel_code))
  fallback = install_flash_attn_fallback()
  from inferencer import InterleaveInferencer
  from modeling.bagel import (Bagel, BagelConfig, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig,
                              SiglipVisionModel)

  weights = os.path.expanduser(weights)
  llm_config = Qwen2Config.from_json_file(os.path.join(weights, "llm_config.json"))
  llm_config.qk_norm, llm_config.tie_word_embeddings = True, False
  llm_config.layer_module = "Qwen2MoTDecoderLayer"
  vit_config = SiglipVisionConfig.from_json_file(os.path.join(weights, "vit_config.json"))
  vit_config.rope, vit_config.num_hidden_layers = False, vit_config.num_hidden_layers - 1
  vae_config = types.SimpleNamespace(
      downsample=int(inputs["vae_downsample"]), z_channels=int(inputs["z_channels"]))
  config = BagelConfig(visual_gen=True, visual_und=True, llm_config=llm_config,
                       vit_config=vit_config, vae_config=vae_config,
                       vit_max_num_patch_per_side=int(inputs["vit_max_num_patch_per_side"]),
                       connector_act=str(inputs["connector_act"]),
                       latent_patch_size=int(inputs["latent_patch_size"]),
                       max_latent_size=int(inputs["max_latent_size"]),
                       timestep_shift=float(inputs["timestep_shift"]))
  with init_empty_weights():
    model = Bagel(Qwen2ForCausalLM(llm_config), SiglipVisionModel(vit_config), config)
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config, meta=True)
  name = next(n for n in ("ema.safetensors", "model.safetensors")
              if os.path.exists(os.path.join(weights, n)))
  model = load_checkpoint_and_dispatch(model, checkpoint=os.path.join(weights, name),
                                       device_map={"": device}, dtype=compute).eval()
  model.language_model.model.enable_taylorseer = False
  bos, eos, soi, eoi = (int(i) for i in inputs["special_ids"])
  token_ids = dict(bos_token_id=bos, eos_token_id=eos, start_of_image=soi, end_of_image=eoi)
  vit = lambda image: torch.from_numpy(np.asarray(image, np.float32).transpose(2, 0, 1).copy())
  inf = InterleaveInferencer(model, None, _IdTokenizer(), None, vit, token_ids)
  note = "; flash-attn replaced by SDPA" if fallback else ""
  print(f"[official] {name} on {device} ({dtype}){note}", flush=True)
  compare_tokenizers(weights, inputs)

  def build(splits):
    ctx = inf.init_gen_context()
    for kind, x in splits:
      if kind == "text":
        ctx = inf.update_context_text(x, ctx)
      else:
        ctx = inf.update_context_image(x, ctx, vae=False)
    return ctx

  def flow(ctx, H, W, x, t, scale, uncond=None):
    gi = model.prepare_vae_latent(curr_kvlens=ctx["kv_lens"], curr_rope=ctx["ropes"],
                                  image_sizes=[(H, W)], new_token_ids=token_ids)
    gi.pop("packed_init_noises")
    gi = {k: v.to(device) for k, v in gi.items()}
    kw = {}
    if uncond is not None:
      c = model.prepare_vae_latent_cfg(curr_kvlens=uncond["kv_lens"], curr_rope=uncond["ropes"],
                                       image_sizes=[(H, W)])
      kw = dict(cfg_text_scale=scale, cfg_text_past_key_values=uncond["past_key_values"],
                cfg_renorm_type="global", cfg_renorm_min=0.0,
                **{f"cfg_text_{k[4:]}": v.to(device) for k, v in c.items()})
    timestep = torch.full((x.shape[0],), float(t), device=device)
    return model._forward_flow(x_t=x, timestep=timestep, past_key_values=ctx["past_key_values"],
                               **gi, **kw)

  def greedy(ctx, n):
    seen = []
    hook = model.language_model.lm_head.register_forward_hook(
        lambda m, i, o: seen.append(o.float().cpu()))
    try:
      start = model.prepare_start_tokens(ctx["kv_lens"], ctx["ropes"], token_ids)
      gi = {k: v.to(device) for k, v in start.items()}
      toks = model.generate_text(past_key_values=ctx["past_key_values"], max_length=n,
                                 do_sample=False, end_token_id=None, **gi)
    finally:
      hook.remove()
    return toks[1:, 0].cpu().numpy(), torch.cat(seen)[:n].numpy()

  parts = check_parts(inputs)
  H, W = (int(s) for s in inputs["size"])
  out = {}
  autocast = torch.autocast(device_type=torch.device(device).type, dtype=compute,
                            enabled=dtype != "float32")
  with torch.no_grad(), autocast:
    x = torch.from_numpy(inputs["noise"]).to(device)
    gen, empty = build(parts["t2i"]), inf.init_gen_context()
    out["t2i.v_cond"] = flow(gen, H, W, x, inputs["t"], 1.0)
    out["t2i.v_uncond"] = flow(empty, H, W, x, inputs["t"], 1.0)
    out["t2i.v_cfg"] = flow(gen, H, W, x, inputs["t"], float(inputs["cfg_text_scale"]),
                            uncond=empty)
    out = {k: v.float().cpu().numpy() for k, v in out.items()}
    n = int(inputs["num_tokens"])
    for check in ("judge", "think"):
      toks, logits = greedy(build(parts[check]), n + 1)  # step 0 feeds BOS; n predictions follow
      out[f"{check}.tokens"], out[f"{check}.logits"] = toks[:n].astype(np.int64), logits[:n]
  return out


# ----------------------------------------------------------------------------------------------
# Comparison


def compare(ours: Dict[str, np.ndarray], official: Dict[str, np.ndarray]) -> List[str]:
  """One line per output: the largest absolute difference and its size relative to the official
  values' largest magnitude; for tokens the agreeing prefix; for logits also top-1 agreement."""
  lines = []
  for k in sorted(official):
    a, b = np.asarray(ours[k]), np.asarray(official[k])
    if k.endswith(".tokens"):
      same = int(np.argmin(np.append(a == b, False)))
      lines.append(f"{k:<14} ours {a.tolist()}  official {b.tolist()}  agree on the first {same} "
                   f"of {len(b)}")
      continue
    d = float(np.max(np.abs(a.astype(np.float64) - b)))
    ref = float(np.max(np.abs(b)))
    extra = ""
    if k.endswith(".logits"):
      extra = f"  top-1 agrees at {int(np.sum(a.argmax(-1) == b.argmax(-1)))}/{len(b)} steps"
    rel = d / max(ref, 1e-30)
    lines.append(f"{k:<14} max |diff| {d:.3e}  max |official| {ref:.3e}  relative {rel:.2e}{extra}")
  return lines


def _ints(text: str) -> Tuple[int, ...]:
  return tuple(int(v) for v in text.split(","))


def main(argv: Sequence[str] = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--bagel_code", required=True,
                  help="a checkout of github.com/ByteDance-Seed/Bagel")
  ap.add_argument("--weights", required=True,
                  help="the official checkpoint dir (e.g. BAGEL-7B-MoT)")
  ap.add_argument("--half", choices=("both", "jax", "torch"), default="both")
  ap.add_argument("--save", default="", help="write the inputs and this run's outputs here (npz)")
  ap.add_argument("--inputs", default="", help="--half=torch: the npz a --half=jax run saved")
  ap.add_argument("--device", default="cpu",
                  help="torch device of the official half (cpu, cuda, cuda:1)")
  ap.add_argument("--jax_dtype", default="bfloat16", help="this port's parameter and compute dtype")
  ap.add_argument("--official_dtype", choices=("bfloat16", "float32"), default="bfloat16",
                  help="the official half's dtype (float32: its bfloat16 casts redirected)")
  ap.add_argument("--image", default="", help="default: <bagel_code>/test_images/meme.jpg")
  ap.add_argument("--prompt", default="A red apple to the left of a blue cup on a wooden table.")
  ap.add_argument("--question", default="What objects are in this picture, and where is each one?")
  ap.add_argument("--size", default="256,256", help="T2I image height,width in pixels")
  ap.add_argument("--t", type=float, default=1.0, help="flow time of the velocity (1: pure noise)")
  ap.add_argument("--cfg_text_scale", type=float, default=4.0)
  ap.add_argument("--num_tokens", type=int, default=8,
                  help="greedy tokens of the judge and think checks")
  ap.add_argument("--seed", type=int, default=0, help="the noise's seed")
  ap.add_argument("--vae_transform", default="1024,512,16",
                  help="max,min,stride of the VAE resize (official)")
  ap.add_argument("--vit_transform", default="980,224,14",
                  help="max,min,stride of the ViT transform (official)")
  args = ap.parse_args(argv)

  if args.half == "torch":
    if not args.inputs:
      ap.error("--half=torch needs --inputs (the npz of a --half=jax run)")
    saved = dict(np.load(args.inputs, allow_pickle=False))
    inputs = {k[3:]: v for k, v in saved.items() if k.startswith("in.")}
    official = torch_half(args.bagel_code, args.weights, inputs, args.device, args.official_dtype)
    ours = {k[4:]: v for k, v in saved.items() if k.startswith("jax.")}
  else:
    sys.path.insert(0, ROOT)
    cfg, params, tok = load_jax_model(os.path.expanduser(args.weights), args.jax_dtype)
    image = Image.open(args.image).convert("RGB") if args.image else default_image(args.bagel_code)
    inputs = make_inputs(tok, cfg, image=image, prompt=args.prompt, question=args.question,
                         think_system=official_constant(args.bagel_code, "GEN_THINK_SYSTEM_PROMPT"),
                         size=_ints(args.size), t=args.t, cfg_text_scale=args.cfg_text_scale,
                         num_tokens=args.num_tokens, seed=args.seed,
                         vae_transform=_ints(args.vae_transform),
                         vit_transform=_ints(args.vit_transform))
    ours = jax_half(params, cfg, inputs, dtype=args.jax_dtype)
    del params
    official = None
    if args.half == "both":
      official = torch_half(args.bagel_code, args.weights, inputs, args.device, args.official_dtype)
  if args.save:
    blob = {f"in.{k}": v for k, v in inputs.items()}
    blob.update({f"jax.{k}": v for k, v in ours.items()})
    blob.update({f"official.{k}": v for k, v in (official or {}).items()})
    np.savez(args.save, **blob)
    print(f"saved {args.save}")
  if official is not None:
    print("\n".join(compare(ours, official)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
