"""KV-cache prefill and text decoding against the official golden case `decode`."""
import jax
import numpy as np
import pytest

from srum_jax.inference import context, decoding

ATOL = RTOL = 1e-4  # fp32 golden tolerance (measured: step logits ~3e-6)
T = 64  # cache slots per row in these tests (one budget -> one compilation per function)


from helpers import CharTokenizer, max_err as _err  # noqa: E402


def _golden_context(params, cfg, batch_rows):
  """Rows: (image or None, prompt ids); row 0 of the golden case is (decode.vit_image, decode.prompt_ids)."""
  ctx = context.init_context(cfg, len(batch_rows), T)
  ctx = context.add_vit_images(params, ctx, [im for im, _ in batch_rows], cfg, budget=8)
  return context.add_texts(params, ctx, [ids for _, ids in batch_rows], cfg, length=16)


@pytest.fixture(scope="module")
def golden(golden_cases):
  return {"image": golden_cases["decode.vit_image"].transpose(1, 2, 0),  # NCHW -> HWC
          "prompt": golden_cases["decode.prompt_ids"], "tokens": golden_cases["decode.generated_tokens"],
          "logits": golden_cases["decode.step_logits"], "kv_len": golden_cases["decode.kv_len_after_prefill"],
          "rope": golden_cases["decode.rope_after_prefill"]}


def test_golden_decode(tiny_params, tiny_cfg, golden):
  params, cfg = tiny_params["bagel"], tiny_cfg
  ctx = _golden_context(params, cfg, [(golden["image"], golden["prompt"])])
  np.testing.assert_array_equal(np.asarray(ctx.kv_len), golden["kv_len"])  # [SOI,6,EOI] + [BOS,4 ids,EOS]
  np.testing.assert_array_equal(np.asarray(ctx.rope), golden["rope"])
  out = decoding.generate_text(params, ctx, cfg, max_new_tokens=6, return_logits=True)
  tokens, logits = np.asarray(out.tokens[0]), np.asarray(out.logits[0])
  # golden = [BOS, t1..t5] (the official return starts with the fed BOS); ours = [t1..t6].
  np.testing.assert_array_equal(tokens[:5], golden["tokens"][1:])
  np.testing.assert_array_equal(tokens, np.argmax(golden["logits"], axis=-1))
  print(f"decode step logits max abs err {_err(logits, golden['logits']):.2e}")
  np.testing.assert_allclose(logits, golden["logits"], atol=ATOL, rtol=RTOL)
  assert int(out.lengths[0]) == 6
  assert int(out.ctx.kv_len[0]) == 14 + 6 and int(out.ctx.rope[0]) == 7 + 6


def test_golden_decode_batched_with_other_rows(tiny_params, tiny_cfg, golden):
  """Row 0 is the golden case; row 1 has no image and a longer prompt; each row equals running it alone."""
  params, cfg = tiny_params["bagel"], tiny_cfg
  other = (None, [60, 61, 62, 63, 64, 65, 66, 67, 68])
  ctx = _golden_context(params, cfg, [(golden["image"], golden["prompt"]), other])
  np.testing.assert_array_equal(np.asarray(ctx.kv_len), [14, 11])
  np.testing.assert_array_equal(np.asarray(ctx.rope), [7, 11])
  out = decoding.generate_text(params, ctx, cfg, max_new_tokens=6, return_logits=True)
  print(f"batched row 0 step logits max abs err {_err(out.logits[0], golden['logits']):.2e}")
  np.testing.assert_allclose(np.asarray(out.logits[0]), golden["logits"], atol=ATOL, rtol=RTOL)
  np.testing.assert_array_equal(np.asarray(out.tokens[0, :5]), golden["tokens"][1:])

  alone = decoding.generate_text(params, _golden_context(params, cfg, [other]), cfg, max_new_tokens=6,
                                 return_logits=True)
  np.testing.assert_array_equal(np.asarray(out.tokens[1]), np.asarray(alone.tokens[0]))
  np.testing.assert_allclose(np.asarray(out.logits[1]), np.asarray(alone.logits[0]), atol=1e-5, rtol=1e-5)


def test_stop_token_ends_row_and_is_not_fed(tiny_params, tiny_cfg, golden):
  params, cfg = tiny_params["bagel"], tiny_cfg
  g = golden["tokens"]  # [BOS, t1, t2, ...]
  other = (None, [60, 61, 62])
  ctx = _golden_context(params, cfg, [(golden["image"], golden["prompt"]), other])
  free = decoding.generate_text(params, ctx, cfg, max_new_tokens=6, stop_ids=(), return_logits=True)
  out = decoding.generate_text(params, ctx, cfg, max_new_tokens=6, stop_ids=(int(g[2]),), pad_id=0,
                               return_logits=True)
  toks = np.asarray(out.tokens)
  np.testing.assert_array_equal(toks[0], [g[1], g[2], 0, 0, 0, 0])  # t2 is the stop: length 1, then padding
  assert int(out.lengths[0]) == 1
  assert int(out.ctx.rope[0]) == 7 + 2 and int(out.ctx.kv_len[0]) == 14 + 2  # BOS and t1 fed, not t2
  row1_free = np.asarray(free.tokens[1]).tolist()
  n1 = row1_free.index(int(g[2])) if int(g[2]) in row1_free else 6  # row 1 runs until its own stop
  assert int(out.lengths[1]) == n1
  np.testing.assert_array_equal(toks[1, :n1], row1_free[:n1])
  assert decoding.generated_ids(out)[0] == [int(g[1])]


def test_sampling_with_temperature(tiny_params, tiny_cfg, golden):
  params, cfg = tiny_params["bagel"], tiny_cfg
  ctx = _golden_context(params, cfg, [(golden["image"], golden["prompt"])])
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  cold = decoding.generate_text(params, ctx, cfg, max_new_tokens=6, stop_ids=(), temperature=1e-4, key=k1)
  np.testing.assert_array_equal(np.asarray(cold.tokens[0, :5]), golden["tokens"][1:])  # ~greedy
  hot = [decoding.generate_text(params, ctx, cfg, max_new_tokens=6, stop_ids=(), temperature=5.0, key=k)
         for k in (k1, k1, k2)]
  np.testing.assert_array_equal(np.asarray(hot[0].tokens), np.asarray(hot[1].tokens))
  assert not np.array_equal(np.asarray(hot[0].tokens), np.asarray(hot[2].tokens))
  with pytest.raises(ValueError):
    decoding.generate_text(params, ctx, cfg, max_new_tokens=2, temperature=1.0)


def test_no_recompile_when_content_changes(tiny_params, tiny_cfg, golden):
  params, cfg = tiny_params["bagel"], tiny_cfg
  rows = [[(golden["image"], golden["prompt"]), (None, [1, 2])],
          [(None, [5, 6, 7, 8, 9, 10, 11]), (golden["image"][:14, :28], [3])],
          [(golden["image"][:28, :14], list(range(12))), (golden["image"], [])]]
  before = None
  for r in rows:
    ctx = _golden_context(params, cfg, r)
    decoding.generate_text(params, ctx, cfg, max_new_tokens=6, return_logits=True)
    if before is None:
      before = dict(context.TRACES)
  for name in ("prefill_text", "prefill_vit_image", "generate_text"):
    assert context.TRACES[name] == before[name], name


def test_answer_batches_like_single_rows(tiny_params, tiny_cfg, golden):
  """answer() for a batch (prompts of different lengths, with and without an image) equals, per row, the
  context built by hand: [system] + image (ViT) + prompt, then greedy decoding until <|im_end|>."""
  params, cfg = tiny_params["bagel"], tiny_cfg
  tok = CharTokenizer()
  images = [golden["image"], None]
  prompts = ["hi", "longer prompt"]
  both = decoding.answer(params, tok, images, prompts, cfg=cfg, system_prompt="sys", max_new_tokens=6,
                         text_budget=16, patch_budget=8)
  assert len(both) == 2 and all(isinstance(s, str) and len(s) <= 6 for s in both)
  for im, p, got in zip(images, prompts, both):
    ctx = context.init_context(cfg, 1, T)  # the shapes answer() uses
    ctx = context.add_texts(params, ctx, [tok.encode("sys")], cfg)
    ctx = context.add_vit_images(params, ctx, [im], cfg, budget=8)
    ctx = context.add_texts(params, ctx, [tok.encode(p)], cfg, length=16)
    gen = decoding.generate_text(params, ctx, cfg, max_new_tokens=6, return_logits=True)
    assert got == tok.decode(decoding.generated_ids(gen)[0])


def test_think_answers_keep_text_after_last_think_tag(tiny_params, tiny_cfg, golden, monkeypatch):
  assert decoding.strip_think("<think>a</think>b</think> final") == " final"
  assert decoding.strip_think("no tags") == "no tags"
  seen = {}

  def fake_answer_text(params, tokenizer, images, prompts, *, system_prompt, **kw):
    seen["system"] = system_prompt
    return ["<think>plan</think>Score: 0.5"] * len(prompts)

  monkeypatch.setattr(decoding, "answer_text", fake_answer_text)
  out = decoding.answer(None, None, [None], ["q"], cfg=tiny_cfg, think=True, system_prompt="think first")
  assert out == ["Score: 0.5"] and seen["system"] == "think first"
  assert decoding.answer(None, None, [None], ["q"], cfg=tiny_cfg, think=True, system_prompt="s",
                         keep_reasoning=True) == ["<think>plan</think>Score: 0.5"]
  with pytest.raises(ValueError, match="judge think system prompt"):  # never a built-in wording
    decoding.answer(None, None, [None], ["q"], cfg=tiny_cfg, think=True)
