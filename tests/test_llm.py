"""Qwen2 MoT decoder: golden `llm` case (packed training path), KV-cache path, static shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srum_jax.models import config, packing, params, qwen2_mot
from srum_jax.models.packing import Split, TokenMeta

CFG = config.tiny()
LLM = CFG.llm
TOL = dict(atol=1e-4, rtol=1e-4)  # fp32 golden tolerance (manifest suggestion); measured ~1e-6


def llm_params_from_golden(sd):
  """Local stand-in for the converter: official Qwen2-MoT keys -> `params.llm_schema` tree."""
  pre = "language_model.model."
  L = LLM.num_hidden_layers

  def lin(name, bias):
    out = {"kernel": np.stack([sd[f"{pre}layers.{i}.{name}.weight"].T for i in range(L)])}
    if bias:
      out["bias"] = np.stack([sd[f"{pre}layers.{i}.{name}.bias"] for i in range(L)])
    return out

  def nrm(name):
    return {"scale": np.stack([sd[f"{pre}layers.{i}.{name}.weight"] for i in range(L)])}

  def expert(sfx):
    a = "self_attn."
    return {
        "input_norm": nrm("input_layernorm" + sfx),
        "q_proj": lin(a + "q_proj" + sfx, True), "k_proj": lin(a + "k_proj" + sfx, True),
        "v_proj": lin(a + "v_proj" + sfx, True), "o_proj": lin(a + "o_proj" + sfx, False),
        "q_norm": nrm(a + "q_norm" + sfx), "k_norm": nrm(a + "k_norm" + sfx),
        "post_norm": nrm("post_attention_layernorm" + sfx),
        "mlp": {n: lin(f"mlp{sfx}.{n}", False) for n in ("gate_proj", "up_proj", "down_proj")},
    }

  tree = {
      "embed_tokens": {"embedding": sd[pre + "embed_tokens.weight"]},
      "layers": {"und": expert(""), "gen": expert("_moe_gen")},
      "norm": {"scale": sd[pre + "norm.weight"]},
      "norm_gen": {"scale": sd[pre + "norm_moe_gen.weight"]},
      "lm_head": {"kernel": sd["language_model.lm_head.weight"].T},
  }
  want = jax.tree.map(lambda s: s.shape, params.llm_schema(CFG), is_leaf=params.is_spec)
  assert jax.tree.map(lambda a: a.shape, tree) == want
  return jax.tree.map(jnp.asarray, tree)


@pytest.fixture(scope="module")
def golden_llm(golden_weights):
  return llm_params_from_golden(golden_weights)


def _forward(p, ids, meta, und_cap, gen_cap=0):
  x = qwen2_mot.embed_text(p, jnp.asarray(ids))
  h = qwen2_mot.decoder_forward(p, x, packing.to_device(meta), cfg=LLM, und_capacity=und_cap,
                                gen_capacity=gen_cap)
  return h, qwen2_mot.lm_logits(p, h)


_forward_jit = jax.jit(_forward, static_argnums=(3, 4))


def test_golden_llm_one_row_and_padded_rows(golden_llm, golden_cases):
  ids = golden_cases["llm.packed_text_ids"]
  lens = [int(n) for n in golden_cases["llm.sample_lens"]]
  assert lens == [7, 5]
  ref_h, ref_logits = golden_cases["llm.last_hidden"], golden_cases["llm.logits"]
  a, b = [packing.text(ids[:7])], [packing.text(ids[7:])]

  # One row holding both samples (N = 12, no padding).
  pk = packing.pack([[a, b]], 12, text_capacity=12, start_of_image=122, end_of_image=123)
  np.testing.assert_array_equal(pk.meta.position[0], golden_cases["llm.packed_position_ids"])
  h, logits = _forward_jit(golden_llm, pk.text_ids, pk.meta, 12)
  err_h = float(np.abs(np.asarray(h[0]) - ref_h).max())
  err_l = float(np.abs(np.asarray(logits[0]) - ref_logits).max())
  print(f"golden llm B=1: max|dh|={err_h:.2e} max|dlogits|={err_l:.2e}")
  np.testing.assert_allclose(np.asarray(h[0]), ref_h, **TOL)
  np.testing.assert_allclose(np.asarray(logits[0]), ref_logits, **TOL)

  # One sample per row, padded to N = 10: real tokens unchanged, padding outputs exactly 0.
  pk2 = packing.pack([[a], [b]], 10, text_capacity=10, start_of_image=122, end_of_image=123)
  h2, logits2 = _forward_jit(golden_llm, pk2.text_ids, pk2.meta, 10)
  h2 = np.asarray(h2)
  np.testing.assert_allclose(h2[0, :7], ref_h[:7], **TOL)
  np.testing.assert_allclose(h2[1, :5], ref_h[7:], **TOL)
  np.testing.assert_allclose(np.asarray(logits2)[0, :7], ref_logits[:7], **TOL)
  np.testing.assert_allclose(np.asarray(logits2)[1, :5], ref_logits[7:], **TOL)
  np.testing.assert_allclose(h2[0, :7], np.asarray(h)[0, :7], atol=1e-5)
  assert not h2[0, 7:].any() and not h2[1, 5:].any()


# ----------------------------------------------------------------------------------------------
# KV cache


def _random_params(seed=0):
  return params.init_params(params.llm_schema(CFG), jax.random.PRNGKey(seed))


def _meta(sample_id, split_id, mode, position, is_gen):
  a = lambda x: jnp.asarray(np.asarray(x)[None] if np.ndim(x) == 1 else np.asarray(x))
  sample_id = a(sample_id).astype(jnp.int32)
  return TokenMeta(sample_id=sample_id, split_id=a(split_id).astype(jnp.int32), mode=a(mode).astype(jnp.int32),
                   index=jnp.broadcast_to(jnp.arange(sample_id.shape[1], dtype=jnp.int32), sample_id.shape),
                   position=a(position).astype(jnp.int32), is_gen=a(is_gen).astype(bool))


_cached = jax.jit(qwen2_mot.decoder_forward_cached,
                  static_argnames=("cfg", "update_cache", "und_capacity", "gen_capacity", "attn_impl", "block_q"))
_uncached = jax.jit(qwen2_mot.decoder_forward,
                    static_argnames=("cfg", "und_capacity", "gen_capacity", "attn_impl", "remat", "remat_policy",
                                     "routing", "block_q"))


def test_chunked_prefill_through_cache_equals_one_forward():
  p = _random_params(1)
  n1, n2 = 6, 5
  x = jax.random.normal(jax.random.PRNGKey(2), (1, n1 + n2, LLM.hidden_size))
  n = n1 + n2
  zeros = np.zeros(n, int)
  full = _meta(zeros, zeros, zeros, np.arange(n), zeros)  # one causal text split
  ref = _uncached(p, x, full, cfg=LLM, und_capacity=n, gen_capacity=0)

  cache = qwen2_mot.init_cache(LLM, 1, 16, jnp.float32)
  m1 = jax.tree.map(lambda a: a[:, :n1], full)
  m2 = jax.tree.map(lambda a: a[:, n1:], full)
  h1, cache = _cached(p, x[:, :n1], m1, cache, cfg=LLM, update_cache=True, und_capacity=n1, gen_capacity=0)
  assert int(cache.length[0]) == n1
  h2, cache2 = _cached(p, x[:, n1:], m2, cache, cfg=LLM, update_cache=False, und_capacity=n2, gen_capacity=0)
  np.testing.assert_allclose(np.asarray(h1), np.asarray(ref[:, :n1]), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(h2), np.asarray(ref[:, n1:]), atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(cache2), jax.tree.leaves(cache)):  # update_cache=False: cache untouched
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(cache.meta.index[0, :n1]), np.arange(n1))
  assert (np.asarray(cache.meta.sample_id[0, n1:]) == -1).all()

  # Decoding one token at a time continues the same causal split.
  for i in range(n2):
    hi, cache = _cached(p, x[:, n1 + i:n1 + i + 1], jax.tree.map(lambda a: a[:, n1 + i:n1 + i + 1], full), cache,
                        cfg=LLM, update_cache=True, und_capacity=1, gen_capacity=0)
    np.testing.assert_allclose(np.asarray(hi[0, 0]), np.asarray(ref[0, n1 + i]), atol=1e-5, rtol=1e-5)
  assert int(cache.length[0]) == n


def test_cache_rows_of_different_lengths_and_generation_block():
  """Two rows prefilled with different lengths (padding not cached), then a gen query block (full split,
  markers und, latents gen, not cached) per row; each row equals its own uncached forward."""
  p = _random_params(3)
  D = LLM.hidden_size
  lens = [7, 4]
  img = 5  # SOI + 3 latent + EOI
  rng = np.random.default_rng(0)
  T, Nq = 12, max(lens)
  cache = qwen2_mot.init_cache(LLM, 2, T, jnp.float32)
  ctx = rng.normal(size=(2, Nq, D)).astype(np.float32)
  blk = rng.normal(size=(2, img, D)).astype(np.float32)
  sid = np.array([[0] * n + [-1] * (Nq - n) for n in lens])
  pos = np.array([list(range(Nq))] * 2)
  zeros = np.zeros((2, Nq), int)
  h_ctx, cache = _cached(p, jnp.asarray(ctx), _meta(sid, zeros, zeros, pos, zeros), cache, cfg=LLM,
                         update_cache=True, und_capacity=Nq, gen_capacity=0)
  np.testing.assert_array_equal(np.asarray(cache.length), lens)
  np.testing.assert_array_equal(np.asarray(cache.meta.sample_id), [[0] * 7 + [-1] * 5, [0] * 4 + [-1] * 8])

  gen = np.array([[0, 1, 1, 1, 0]] * 2)
  bpos = np.array([[n] * img for n in lens])  # the context's next rope position
  h_blk, cache_after = _cached(p, jnp.asarray(blk), _meta(np.zeros((2, img)), np.ones((2, img)),
                                                          np.ones((2, img)), bpos, gen),
                               cache, cfg=LLM, update_cache=False, und_capacity=2, gen_capacity=3)
  for a, b in zip(jax.tree.leaves(cache_after), jax.tree.leaves(cache)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  for b, n in enumerate(lens):
    x = jnp.asarray(np.concatenate([ctx[b, :n], blk[b]])[None])
    m = _meta(np.zeros(n + img), [0] * n + [1] * img, [0] * n + [1] * img,
              list(range(n)) + [n] * img, [0] * n + list(gen[b]))
    ref = np.asarray(_uncached(p, x, m, cfg=LLM, und_capacity=n + 2, gen_capacity=3))[0]
    np.testing.assert_allclose(np.asarray(h_ctx)[b, :n], ref[:n], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(h_blk)[b], ref[n:], atol=1e-5, rtol=1e-5)
    assert not np.asarray(h_ctx)[b, n:].any()


def test_no_recompile_when_only_content_changes():
  traces = []

  def step(p, text_ids, text_index, meta):
    traces.append(1)  # Python side effect: runs once per trace
    emb = qwen2_mot.embed_text(p, text_ids)
    x = jax.vmap(lambda e, i: jnp.zeros((16, LLM.hidden_size)).at[i].set(e, mode="drop"))(emb, text_index)
    return qwen2_mot.decoder_forward(p, x, meta, cfg=LLM, und_capacity=12, gen_capacity=8)

  f = jax.jit(step)
  p = _random_params(4)
  layouts = [
      [[[packing.text([1, 2, 3]), Split("vae_noise", 4)], [packing.text([5, 6])]]],
      [[[packing.text([7, 8, 9, 10, 11, 12]), Split("vae_clean", 2), Split("vae_noise", 3)]]],
      [[[packing.text(list(range(1, 9)))]]],
  ]
  outs = []
  for rows in layouts:
    pk = packing.pack(rows, 16, text_capacity=12, latent_capacity=8, start_of_image=122, end_of_image=123)
    assert pk.num_und.max() <= 12 and pk.num_gen.max() <= 8
    outs.append(f(p, pk.text_ids, pk.text_index, packing.to_device(pk.meta)))
  assert len(traces) == 1
  assert all(np.isfinite(np.asarray(o)).all() for o in outs)
