"""Text generation with the KV cache (docs/bagel.md, "Decoding and prompt format") and the judge
helper built on it.

`generate_text` runs a `lax.while_loop` of single-token decoder steps over a prefilled `Context`:
the first fed token is `<|im_start|>` at the row's `rope`; each step appends the fed token to the
cache (und experts, one causal split for the whole answer) and predicts the next one from
`lm_head(norm(h))`, greedily or by sampling `softmax(logits / temperature)`. A row stops after
predicting a stop token (that token is not fed back); the loop ends when every row has stopped or
after `max_new_tokens` steps.

    ctx = context.add_vit_images(params, context.init_context(cfg, B, 512), images, cfg)
    ctx = context.add_texts(params, ctx, prompt_ids, cfg)
    out = generate_text(params, ctx, cfg, max_new_tokens=256)   # out.tokens[b, :out.lengths[b]]
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from srum_jax.inference import context
from srum_jax.inference.context import Context
from srum_jax.models import image_transforms, qwen2_mot
from srum_jax.models.config import BagelConfig
from srum_jax.models.packing import CAUSAL, TokenMeta
from srum_jax.rewards.parsing import strip_think

__all__ = ["Generation", "generate_text", "generated_ids", "answer_text", "answer", "strip_think",
           "next_token_logits", "greedy_continuations", "continue_then_logits"]


class Generation(NamedTuple):
  """tokens [B, max_new_tokens]: predicted ids (the start token excluded); row b's text is
  tokens[b, :lengths[b]], followed by its stop token if it stopped, then `pad_id`.
  logits [B, max_new_tokens, V] fp32 (step k predicts tokens[:, k]; zeros after a row stopped) or
  None. ctx: the context after decoding (fed tokens cached, rope advanced)."""
  tokens: jax.Array
  lengths: jax.Array
  logits: Optional[jax.Array]
  ctx: Context


def _decode_step(params, ctx: Context, token: jax.Array, active: jax.Array, cfg: BagelConfig,
                 attn_impl: str) -> Tuple[jax.Array, Context]:
  """Feed token [B] (padding where not active) at position rope; returns logits [B, V] fp32 and
  the context."""
  B = token.shape[0]
  col = lambda a: a[:, None].astype(jnp.int32)
  meta = TokenMeta(sample_id=col(jnp.where(active, 0, -1)), split_id=col(ctx.split),
                   mode=jnp.full((B, 1), CAUSAL, jnp.int32), index=jnp.zeros((B, 1), jnp.int32),
                   position=col(ctx.rope), is_gen=jnp.zeros((B, 1), bool))
  x = qwen2_mot.embed_text(params["llm"], token[:, None], ctx.cache.k.dtype)
  h, cache = qwen2_mot.decoder_forward_cached(params["llm"], x, meta, ctx.cache, cfg=cfg.llm,
                                              update_cache=True, und_capacity=1, gen_capacity=0,
                                              attn_impl=attn_impl)
  logits = qwen2_mot.lm_logits(params["llm"], h[:, 0]).astype(jnp.float32)
  return logits, ctx._replace(cache=cache, rope=ctx.rope + active.astype(jnp.int32))


@functools.partial(
    jax.jit, static_argnames=("cfg", "max_new_tokens", "sample", "return_logits", "attn_impl"))
def _generate(params, ctx: Context, stops: jax.Array, temperature: jax.Array, pad_id: jax.Array,
              key, *, cfg: BagelConfig, max_new_tokens: int, sample: bool, return_logits: bool,
              attn_impl: str) -> Generation:
  context.TRACES["generate_text"] += 1
  B = ctx.rope.shape[0]
  V = cfg.llm.vocab_size

  def cond(carry):
    step, _, _, done, *_ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, ctx, token, done, lengths, tokens, logits_buf = carry
    active = ~done
    logits, ctx = _decode_step(params, ctx, token, active, cfg, attn_impl)
    if sample:
      nxt = jax.random.categorical(jax.random.fold_in(key, step), logits / temperature, axis=-1)
    else:
      nxt = jnp.argmax(logits, axis=-1)
    nxt = nxt.astype(jnp.int32)
    tokens = tokens.at[:, step].set(jnp.where(active, nxt, pad_id))
    if return_logits:
      logits_buf = logits_buf.at[:, step].set(jnp.where(active[:, None], logits, 0.0))
    is_stop = jnp.any(nxt[:, None] == stops[None, :], axis=1)
    lengths = lengths + (active & ~is_stop).astype(jnp.int32)
    return step + 1, ctx, nxt, done | (active & is_stop), lengths, tokens, logits_buf

  start = jnp.full((B,), cfg.tokens.bos, jnp.int32)
  tokens = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
  logits_buf = jnp.zeros((B, max_new_tokens, V) if return_logits else (B, 0, V), jnp.float32)
  carry = (jnp.int32(0), ctx, start, jnp.zeros((B,), bool), jnp.zeros(
      (B,), jnp.int32), tokens, logits_buf)
  _, ctx, _, _, lengths, tokens, logits_buf = jax.lax.while_loop(cond, body, carry)
  return Generation(tokens=tokens, lengths=lengths, logits=logits_buf if return_logits else None,
                    ctx=ctx._replace(split=ctx.split + 1))


def generate_text(params, ctx: Context, cfg: BagelConfig, *, max_new_tokens: int,
                  stop_ids: Optional[Sequence[int]] = None, temperature: float = 0.0,
                  key: Optional[jax.Array] = None, pad_id: Optional[int] = None,
                  return_logits: bool = False, attn_impl: str = "dense") -> Generation:
  """Decode up to `max_new_tokens` per row from a prefilled context.

  stop_ids: default (eos,); () never stops early. temperature 0: greedy; > 0: sampling with `key`
  (required). Stop ids, temperature and pad id are traced: changing their values does not recompile.
  The cache needs `max_new_tokens` free slots per row (decoded tokens past its end would be
  dropped).
  """
  if temperature > 0 and key is None:
    raise ValueError("sampling (temperature > 0) needs a key")
  stops = [cfg.tokens.eos] if stop_ids is None else [int(s) for s in stop_ids]
  stops = np.asarray(stops or [-1], np.int32)  # -1 matches no token
  pad = cfg.tokens.eos if pad_id is None else int(pad_id)
  key = jax.random.PRNGKey(0) if key is None else key
  return _generate(params, ctx, stops, np.float32(max(temperature, 0.0)), np.int32(pad), key,
                   cfg=cfg, max_new_tokens=int(max_new_tokens), sample=temperature > 0,
                   return_logits=bool(return_logits), attn_impl=attn_impl)


def generated_ids(gen: Generation) -> list:
  """Host lists of each row's generated ids (stop token and padding removed)."""
  toks, lens = np.asarray(gen.tokens), np.asarray(gen.lengths)
  return [toks[b, :lens[b]].tolist() for b in range(toks.shape[0])]


# ----------------------------------------------------------------------------------------------
# Understanding helper (the SRUM judge)


def _vit_image(img) -> Optional[np.ndarray]:
  """PIL image -> official transforms (VAE resize, then ViT transform) HWC in [-1, 1]; arrays: uint8
  are mapped to [-1, 1], floats are taken as already in [-1, 1] (sides must be multiples of 14)."""
  if img is None:
    return None
  if hasattr(img, "convert"):  # PIL
    img = image_transforms.resize_image(img.convert("RGB"), *image_transforms.VAE_TRANSFORM)
    return image_transforms.transform_image(img, *image_transforms.VIT_TRANSFORM)
  a = np.asarray(img)
  return image_transforms.to_model_range(a) if a.dtype == np.uint8 else a.astype(np.float32)


def judge_context(params, tokenizer, images: Sequence, prompts: Sequence[str], *, cfg: BagelConfig,
                  system_prompt: Optional[str] = None, extra_tokens: int = 0, dtype=jnp.float32,
                  text_budget: Optional[int] = None, patch_budget: Optional[int] = None,
                  attn_impl: str = "dense", mesh=None) -> Context:
  """The understanding context per row: [system prompt] + image (ViT only) + prompt, in a cache with
  room for `extra_tokens` more. images: one per prompt (None, a PIL image or an HWC array; see
  `_vit_image`). Budgets default to power-of-two buckets, so similar batches reuse compiled code.
  mesh: split the rows over its ('data', 'fsdp') axes (`context.shard_rows`; the parameters keep
  their own shardings)."""
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
  B = len(prompts)
  sys_ids = None if system_prompt is None else context.wrap_text(
      tokenizer.encode(system_prompt), cfg)
  prompt_ids, prompt_lens = context.pad_ids(
      [context.wrap_text(tokenizer.encode(p), cfg) for p in prompts], text_budget)
  patches, grid = context.vit_inputs([_vit_image(im) for im in images], cfg, patch_budget)
  T = context.bucket((0 if sys_ids is None else len(sys_ids)) + patches.shape[1] + 2 +
                     prompt_ids.shape[1] + extra_tokens)
  ctx = context.init_context(cfg, B, T, dtype)
  if mesh is not None:
    ctx = context.shard_context(ctx, mesh)
    prompt_ids, prompt_lens, patches, grid = context.shard_rows(
        (prompt_ids, prompt_lens, patches, grid), mesh)
  if sys_ids is not None:
    ids, lens = context.pad_ids([sys_ids] * B)
    ctx = context.prefill_text(params, ctx, ids, lens, cfg=cfg, attn_impl=attn_impl)
  ctx = context.prefill_vit_image(params, ctx, patches, grid, cfg=cfg, attn_impl=attn_impl)
  return context.prefill_text(params, ctx, prompt_ids, prompt_lens, cfg=cfg, attn_impl=attn_impl)


def answer_text(params, tokenizer, images: Sequence, prompts: Sequence[str], *, cfg: BagelConfig,
                system_prompt: Optional[str] = None, max_new_tokens: int = 1024,
                temperature: float = 0.0, key: Optional[jax.Array] = None, dtype=jnp.float32,
                text_budget: Optional[int] = None, patch_budget: Optional[int] = None,
                attn_impl: str = "dense", mesh=None) -> list:
  """Raw decoded answers, one per prompt, from `judge_context`."""
  ctx = judge_context(params, tokenizer, images, prompts, cfg=cfg, system_prompt=system_prompt,
                      extra_tokens=max_new_tokens, dtype=dtype, text_budget=text_budget,
                      patch_budget=patch_budget, attn_impl=attn_impl, mesh=mesh)
  gen = generate_text(params, ctx, cfg, max_new_tokens=max_new_tokens, temperature=temperature,
                      key=key, attn_impl=attn_impl)
  return [tokenizer.decode(ids) for ids in generated_ids(gen)]


def answer(params, tokenizer, images: Sequence, prompts: Sequence[str], *, cfg: BagelConfig,
           system_prompt: Optional[str] = None, max_new_tokens: int = 1024, think: bool = False,
           keep_reasoning: bool = False, **kw) -> list:
  """Judge answers as strings. think=True needs `system_prompt` (the understanding think system
  prompt, `texts.judge_think_system`) and returns what follows the last `</think>` (the whole
  decoded text with keep_reasoning=True)."""
  if think and system_prompt is None:
    raise ValueError(
        "think mode needs the judge think system prompt (system_prompt=texts.judge_think_system)")
  texts = answer_text(params, tokenizer, images, prompts, cfg=cfg, system_prompt=system_prompt,
                      max_new_tokens=max_new_tokens, **kw)
  return texts if (keep_reasoning or not think) else [strip_think(t) for t in texts]


@functools.partial(jax.jit, static_argnames=("cfg", "attn_impl"))
def _prefix_logits(params, ctx: Context, ids: jax.Array, lengths: jax.Array, *, cfg: BagelConfig,
                   attn_impl: str = "dense") -> jax.Array:
  """Feed the answer prefix ids [B, L] (BOS + prefix, right-padded) as the start of the answer split
  in one forward pass; logits [B, V] at each row's last real prefix token."""
  context.TRACES["prefix_logits"] += 1
  B, L = ids.shape
  k = jnp.arange(L, dtype=jnp.int32)[None, :]
  real = k < lengths[:, None]
  meta = TokenMeta(
      sample_id=jnp.where(real, 0, -1).astype(jnp.int32), split_id=jnp.broadcast_to(
          ctx.split[:, None], (B, L)).astype(jnp.int32), mode=jnp.full(
              (B, L), CAUSAL, jnp.int32), index=jnp.zeros((B, L), jnp.int32),
      position=(ctx.rope[:, None] + k).astype(jnp.int32), is_gen=jnp.zeros((B, L), bool))
  x = qwen2_mot.embed_text(params["llm"], ids, ctx.cache.k.dtype)
  h, _ = qwen2_mot.decoder_forward_cached(params["llm"], x, meta, ctx.cache, cfg=cfg.llm,
                                          update_cache=False, und_capacity=L, gen_capacity=0,
                                          attn_impl=attn_impl)
  last = jnp.take_along_axis(h, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
  return qwen2_mot.lm_logits(params["llm"], last).astype(jnp.float32)


def next_token_logits(params, tokenizer, images: Sequence, prompts: Sequence[str],
                      answer_prefix: Union[str, Sequence[str]], *, cfg: BagelConfig,
                      system_prompt: Optional[str] = None, dtype=jnp.float32,
                      text_budget: Optional[int] = None, patch_budget: Optional[int] = None,
                      attn_impl: str = "dense", mesh=None) -> jax.Array:
  """Logits [B, V] of the token that follows `answer_prefix` (one for all rows, or one per row) in
  the answer to each (image, prompt).

  Same context as `answer_text` ([system] + image (ViT) + prompt), then BOS + prefix in one forward
  pass: no decoding. Used by the `logits` judge mode (expected score over score tokens).
  """
  ctx = judge_context(params, tokenizer, images, prompts, cfg=cfg, system_prompt=system_prompt,
                      dtype=dtype, text_budget=text_budget, patch_budget=patch_budget,
                      attn_impl=attn_impl, mesh=mesh)
  return _logits_after(params, tokenizer, ctx, _per_row(answer_prefix, len(prompts)), cfg,
                       attn_impl)


def _per_row(answer_prefix: Union[str, Sequence[str]], n: int) -> list:
  prefixes = [answer_prefix] * n if isinstance(answer_prefix, str) else list(answer_prefix)
  if len(prefixes) != n:
    raise ValueError(f"{len(prefixes)} answer prefixes for {n} prompts")
  return prefixes


def _logits_after(params, tokenizer, ctx: Context, prefixes: Sequence[str], cfg: BagelConfig,
                  attn_impl: str) -> jax.Array:
  pre_ids, pre_lens = context.pad_ids([[cfg.tokens.bos] + tokenizer.encode(p) for p in prefixes])
  return _prefix_logits(params, ctx, pre_ids, pre_lens, cfg=cfg, attn_impl=attn_impl)


def continue_then_logits(params, tokenizer, images: Sequence, prompts: Sequence[str],
                         answer_prefix: str, then: str, *, cfg: BagelConfig,
                         max_new_tokens: int = 8, stop_texts: Sequence[str] = ("\n", "Score"),
                         system_prompt: Optional[str] = None, dtype=jnp.float32,
                         text_budget: Optional[int] = None, patch_budget: Optional[int] = None,
                         attn_impl: str = "dense", mesh=None) -> Tuple[list, jax.Array]:
  """Greedy-continue `answer_prefix` for each row, then read the logits after `prefix + continuation
  + then`.

  The identify-then-score judge: prefix "Region ID: 1\nIdentified Object:", the model names what it
  sees, and the score is read after "<that name>\nScore:", so it is conditioned on the model's own
  identification (the official answer order) rather than produced in one step. The context is
  prefilled once; each decoded token is one forward pass over the (short) answer prefix. A row's
  continuation ends before the first of `stop_texts` (or EOS), or after `max_new_tokens`. Returns
  (continuations [str], logits [B, V]).
  """
  ctx = judge_context(params, tokenizer, images, prompts, cfg=cfg, system_prompt=system_prompt,
                      dtype=dtype, text_budget=text_budget, patch_budget=patch_budget,
                      attn_impl=attn_impl, mesh=mesh)
  new = greedy_continuations(params, tokenizer, ctx, answer_prefix, cfg=cfg,
                             max_new_tokens=max_new_tokens, stop_texts=stop_texts,
                             attn_impl=attn_impl)
  names = [_cut(tokenizer.decode(n), stop_texts)[0].strip() for n in new]
  logits = _logits_after(params, tokenizer, ctx, [f"{answer_prefix} {n}{then}" for n in names], cfg,
                         attn_impl)
  return names, logits


def _cut(text: str, stop_texts: Sequence[str]) -> Tuple[str, bool]:
  ends = [text.find(t) for t in stop_texts if t and t in text]
  return (text[:min(ends)] if ends else text), bool(ends)


def greedy_continuations(params, tokenizer, ctx: Context, answer_prefix: str, *, cfg: BagelConfig,
                         max_new_tokens: int, stop_texts: Sequence[str] = (),
                         attn_impl: str = "dense") -> list:
  """Greedy token ids after BOS + `answer_prefix`, per row of a prefilled judge context, by one
  forward pass over the whole answer prefix per step (no cache writes). A row ends at EOS (not
  included), once its decoded text contains one of `stop_texts` (that token included), or after
  `max_new_tokens`."""
  B = ctx.rope.shape[0]
  head = [cfg.tokens.bos] + tokenizer.encode(answer_prefix)
  new: list = [[] for _ in range(B)]
  done = [False] * B
  for _ in range(int(max_new_tokens)):
    if all(done):
      break
    pre_ids, pre_lens = context.pad_ids([head + n for n in new])
    nxt = np.asarray(
        jnp.argmax(
            _prefix_logits(params, ctx, pre_ids, pre_lens, cfg=cfg, attn_impl=attn_impl), axis=-1))
    for b in range(B):
      if done[b]:
        continue
      if int(nxt[b]) == cfg.tokens.eos:
        done[b] = True
        continue
      new[b].append(int(nxt[b]))
      done[b] = _cut(tokenizer.decode(new[b]), stop_texts)[1]
  return new
