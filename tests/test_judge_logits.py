"""The logits judge reads the same distribution greedy decoding would sample from (one forward pass)."""
import numpy as np

from srum_jax import config_utils
from srum_jax.engine import loaded_model
from srum_jax.engine.judge import Judge, JudgeOptions
from srum_jax.inference import context, decoding
from srum_jax.rewards.texts import own_texts


def test_next_token_logits_equal_decoding_logits(tiny_model_dir):
  m = loaded_model.load_model(tiny_model_dir)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 255, (28, 42, 3), dtype=np.uint8), rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)]
  prompts = ["a red circle", "two blue squares left of a green triangle"]
  p = m.params["bagel"]
  ctx = decoding.judge_context(p, m.tokenizer, images, prompts, cfg=m.cfg, extra_tokens=4)
  gen = decoding.generate_text(p, ctx, m.cfg, max_new_tokens=3, return_logits=True)
  # prefix "" -> the distribution after BOS = decoding step 0
  l0 = decoding.next_token_logits(p, m.tokenizer, images, prompts, "", cfg=m.cfg)
  np.testing.assert_allclose(np.asarray(l0), np.asarray(gen.logits[:, 0]), atol=1e-4, rtol=1e-4)
  # prefix = the first greedy token -> decoding step 1 (only for rows whose first token is a plain word)
  first = np.asarray(gen.tokens[:, 0])
  for b in range(2):
    word = m.tokenizer.decode([int(first[b])])
    if int(first[b]) < len(m.tokenizer.hf.get_vocab()) - 5 and " " not in word.strip():
      l1 = decoding.next_token_logits(p, m.tokenizer, images[b:b + 1], prompts[b:b + 1], word, cfg=m.cfg)
      np.testing.assert_allclose(np.asarray(l1[0]), np.asarray(gen.logits[b, 1]), atol=1e-4, rtol=1e-4)


def test_per_row_prefixes_equal_one_call_per_row(tiny_model_dir):
  m = loaded_model.load_model(tiny_model_dir)
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 255, (28, 28, 3), dtype=np.uint8) for _ in range(3)]
  prompts = ["a red circle", "two blue squares", "a green triangle left of a yellow circle"]
  prefixes = ["Score:", "Region ID: 1 Identified Object: red circle Score:", ""]
  p = m.params["bagel"]
  both = np.asarray(decoding.next_token_logits(p, m.tokenizer, images, prompts, prefixes, cfg=m.cfg))
  for b in range(3):
    one = decoding.next_token_logits(p, m.tokenizer, images[b:b + 1], prompts[b:b + 1], prefixes[b], cfg=m.cfg)
    np.testing.assert_allclose(both[b], np.asarray(one[0]), atol=1e-4, rtol=1e-4)
  try:
    decoding.next_token_logits(p, m.tokenizer, images, prompts, prefixes[:2], cfg=m.cfg)
  except ValueError as e:
    assert "2 answer prefixes for 3 prompts" in str(e)
  else:
    raise AssertionError("a prefix count mismatch must raise")


def test_greedy_continuations_equal_cached_greedy_decoding(tiny_model_dir):
  """The identify-then-score helper decodes by re-reading the answer prefix each step (no KV cache): its
  tokens must be the cached greedy decoder's, and its final logits those after the decoded text + `then`."""
  m = loaded_model.load_model(tiny_model_dir)
  rng = np.random.default_rng(2)
  images = [rng.integers(0, 255, (28, 28, 3), dtype=np.uint8) for _ in range(4)]
  prompts = ["a red circle", "two blue squares", "a green triangle left of a yellow circle", "three red squares"]
  p, tok, k = m.params["bagel"], m.tokenizer, 4
  ctx = decoding.judge_context(p, tok, images, prompts, cfg=m.cfg, extra_tokens=k)
  gen = decoding.generate_text(p, ctx, m.cfg, max_new_tokens=k)
  want = decoding.generated_ids(gen)
  got = decoding.greedy_continuations(p, tok, ctx, "", cfg=m.cfg, max_new_tokens=k)
  assert got == want and sum(len(w) for w in want) >= 8, want  # rows that decode several tokens
  names, logits = decoding.continue_then_logits(p, tok, images, prompts, "Identified Object:", " Score:", cfg=m.cfg,
                                                max_new_tokens=k, stop_texts=("Score",))
  ref = decoding.next_token_logits(p, tok, images, prompts, [f"Identified Object: {n} Score:" for n in names],
                                   cfg=m.cfg)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-5, rtol=1e-5)
  assert all("Score" not in n for n in names)


def _judge_inputs(n: int, seed: int):
  rng = np.random.default_rng(seed)
  images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
  words = ["red circle", "two blue squares", "a green triangle", "three red squares", "a yellow circle"]
  prompts = [words[i % len(words)] for i in range(n)]
  boxes = [[[0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 32, 32]][:1 + i % 3] for i in range(n)]
  return images, prompts, boxes


def test_logits_judge_pads_to_one_shape_per_query_kind(tiny_model_dir):
  """The logits judge (regions named, then scored) pads every call to `score.batch_size` rows: a stage's
  chunks of other sizes (its last one, region lists of any length) reuse the compiled prefills and prefix
  passes instead of compiling one program per chunk size, and the padding never changes a real row's name
  or score (each item judged alone gives the same)."""
  import pathlib

  tiny = str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "tiny_pipeline.py")
  cfg = config_utils.load_config(tiny, {"score.region_identify": True,
                                                                   "score.batch_size": 4})
  judge = Judge(JudgeOptions.from_config(cfg.score), loaded_model.load_model(tiny_model_dir), texts=own_texts())
  images, prompts, boxes = _judge_inputs(7, seed=3)
  judge.global_scores(images[:4], prompts[:4])  # warm up: one program per query kind
  got = judge.region_scores(images[:3], prompts[:3], boxes[:3])  # 1 + 2 + 3 regions: chunks of 4 and 2
  before = dict(context.TRACES)
  got += judge.region_scores(images[3:], prompts[3:], boxes[3:])  # 4 images, 2 + 3 + 1 + 2 regions
  g = judge.global_scores(images[:3], prompts[:3]) + judge.global_scores(images[3:4], prompts[3:4])
  for name in ("prefill_text", "prefill_vit_image", "prefix_logits"):
    assert context.TRACES[name] == before[name], (name, before[name], context.TRACES[name])
  assert [len(r) for r in got] == [len(b) for b in boxes]
  for i in range(len(images)):  # each item alone: the same names, the same scores up to float noise
    alone = judge.region_scores(images[i:i + 1], prompts[i:i + 1], boxes[i:i + 1])[0]
    assert [o for _, o in alone.values()] == [o for _, o in got[i].values()]
    np.testing.assert_allclose([s for s, _ in alone.values()], [s for s, _ in got[i].values()], atol=1e-5)
  for i in range(4):
    np.testing.assert_allclose(judge.global_scores(images[i:i + 1], prompts[i:i + 1]), g[i:i + 1], atol=1e-5)
