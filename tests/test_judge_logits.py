"""The logits judge reads the same distribution greedy decoding would sample from (one forward pass)."""
import jax.numpy as jnp
import numpy as np

from srum_jax.inference import decoding
from srum_jax.pipeline import common


def test_next_token_logits_equal_decoding_logits(tiny_model_dir):
  m = common.load_model(tiny_model_dir)
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
