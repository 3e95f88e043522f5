"""Packing builder, the packed-sequence mask rule (against the stored golden masks), RoPE, dense/chunked attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srum_jax.models import attention as attn_lib, packing, rope
from srum_jax.models.packing import CAUSAL, FULL, NOISE, Split, TokenMeta

BOS, EOS, SOI, EOI = 120, 121, 122, 123

# The golden cases' layouts, as the manifest describes them.
LAYOUTS = {
    "gen_t2i": [[packing.text([BOS, 11, 12, 13, 14, 15, EOS]), Split("vae_noise", 12)],
                [packing.text([BOS, 40, 41, 42, EOS]), Split("vae_noise", 4)]],
    "srum": [[packing.text([BOS, 11, 12, 13, 14, 15, EOS]), Split("vae_noise", 12)],
             [packing.text([BOS, 40, 41, 42, EOS]), Split("vae_noise", 12)]],
    "gen_edit": [[Split("vae_clean", 6), Split("vit", 6), packing.text([BOS, 21, 22, 23, 24, EOS]),
                  Split("vae_noise", 6)]],
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_builder_matches_golden_layout_and_masks(case, golden_cases):
  g = lambda name: golden_cases[f"{case}.{name}"]
  samples = LAYOUTS[case]
  N = int(g("sequence_length")) + 3  # a few padding slots at the end of the row
  pk = packing.pack([samples], N, text_capacity=20, vit_capacity=8, latent_capacity=30,
                    start_of_image=SOI, end_of_image=EOI)
  lens = [int(n) for n in g("sample_lens")]
  assert [packing.sample_length(s) for s in samples] == lens
  n = sum(lens)
  m = pk.meta
  np.testing.assert_array_equal(m.position[0, :n], g("packed_position_ids"))
  np.testing.assert_array_equal(pk.text_index[0][pk.text_valid[0]], g("packed_text_indexes"))
  np.testing.assert_array_equal(pk.text_ids[0][pk.text_valid[0]], g("packed_text_ids"))
  lat = pk.latent_index[0][pk.latent_valid[0]]
  np.testing.assert_array_equal(lat, g("packed_vae_token_indexes"))
  np.testing.assert_array_equal(lat[m.mode[0, lat] == NOISE], g("mse_loss_indexes"))
  np.testing.assert_array_equal(np.flatnonzero(m.is_gen[0]), g("packed_vae_token_indexes"))
  if case == "gen_edit":
    np.testing.assert_array_equal(pk.vit_index[0][pk.vit_valid[0]], g("packed_vit_token_indexes"))
    np.testing.assert_array_equal(pk.latent_image[0][pk.latent_valid[0]], [0] * 6 + [1] * 6)
  assert (m.sample_id[0, n:] == -1).all()
  np.testing.assert_array_equal(pk.num_und + pk.num_gen, [n])

  mask = np.asarray(packing.attention_mask(packing.to_device(m), packing.to_device(m)))[0]
  off = 0
  for s, L in enumerate(lens):
    np.testing.assert_array_equal(mask[off:off + L, off:off + L], g(f"attn_mask_sample{s}").astype(bool))
    off += L
  block = np.zeros_like(mask)
  off = 0
  for L in lens:
    block[off:off + L, off:off + L] = True
    off += L
  assert not mask[~block].any()  # no attention across samples or to/from padding


def test_builder_rows_split_ids_and_errors():
  a = [packing.text(3), Split("vit", 2), Split("vae_noise", 2)]  # 3 + 4 + 4 = 11 slots
  b = [packing.text(2)]
  c = [packing.text(2), Split("vae_clean", 1), Split("vae_noise", 1)]  # 2 + 3 + 3 = 8 slots
  rows = packing.first_fit([a, b, c], num_rows=2, num_tokens=12)
  assert rows[0] == [a] and rows[1] == [b, c]
  pk = packing.pack(rows, 12, text_capacity=12, vit_capacity=4, latent_capacity=4)
  m = pk.meta
  C, F, Z = CAUSAL, FULL, NOISE
  np.testing.assert_array_equal(m.sample_id, [[0] * 11 + [-1], [1, 1] + [2] * 8 + [-1, -1]])
  np.testing.assert_array_equal(m.split_id[0, :11], [0] * 3 + [1] * 4 + [2] * 4)
  np.testing.assert_array_equal(m.split_id[1, :10], [0, 0, 1, 1, 2, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(m.mode[0, :11], [C] * 3 + [F] * 4 + [Z] * 4)
  np.testing.assert_array_equal(m.mode[1, :10], [C] * 4 + [F] * 3 + [Z] * 3)
  np.testing.assert_array_equal(m.position[0, :11], [0, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4])
  np.testing.assert_array_equal(m.position[1, :10], [0, 1, 0, 1, 2, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(m.is_gen.astype(int), [[0] * 8 + [1, 1, 0, 0], [0] * 5 + [1, 0, 0, 1, 0, 0, 0]])
  np.testing.assert_array_equal(pk.vit_index, [[4, 5, 12, 12], [12] * 4])
  np.testing.assert_array_equal(pk.vit_image, [[0, 0, -1, -1], [-1] * 4])
  np.testing.assert_array_equal(pk.vit_offset[0, :2], [0, 1])
  np.testing.assert_array_equal(pk.latent_index, [[8, 9, 12, 12], [5, 8, 12, 12]])
  np.testing.assert_array_equal(pk.latent_valid, [[1, 1, 0, 0], [1, 1, 0, 0]])
  np.testing.assert_array_equal(pk.latent_image, [[0, 0, -1, -1], [1, 2, -1, -1]])
  np.testing.assert_array_equal(pk.latent_offset[:, :2], [[0, 1], [0, 0]])
  np.testing.assert_array_equal(pk.text_index[1, :8], [0, 1, 2, 3, 4, 6, 7, 9])
  np.testing.assert_array_equal(pk.num_und, [9, 8])
  np.testing.assert_array_equal(pk.num_gen, [2, 2])
  assert pk.text_ids is None  # no ids given

  with pytest.raises(ValueError, match="budget"):
    packing.pack([[a, b]], 12, text_capacity=20, vit_capacity=4, latent_capacity=4)
  with pytest.raises(ValueError, match="text_capacity"):
    packing.pack([[a]], 12, text_capacity=6, vit_capacity=4, latent_capacity=4)
  with pytest.raises(ValueError, match="latent_capacity"):
    packing.pack([[a]], 12, text_capacity=8, vit_capacity=4, latent_capacity=1)
  with pytest.raises(ValueError, match="fits in none"):
    packing.first_fit([a, a, a], num_rows=2, num_tokens=12)
  with pytest.raises(ValueError, match="kind"):
    Split("audio", 3)


def test_mask_noise_split_is_hidden_from_later_splits():
  """The golden layouts end with their noise split; here splits follow it (no split may see a noise split)."""
  s0 = [packing.text(3), Split("vae_noise", 1), packing.text(2), Split("vit", 1)]
  s1 = [packing.text(2)]
  pk = packing.pack([[s0, s1]], 14, text_capacity=14, vit_capacity=1, latent_capacity=1)
  got = np.asarray(packing.attention_mask(packing.to_device(pk.meta), packing.to_device(pk.meta)))[0]
  t1, nz, t2, vit, s1_ = slice(0, 3), slice(3, 6), slice(6, 8), slice(8, 11), slice(11, 13)
  want = np.zeros((14, 14), bool)
  want[t1, t1] = np.tri(3, dtype=bool)
  want[nz, t1] = want[nz, nz] = True
  want[t2, t1], want[t2, t2] = True, np.tri(2, dtype=bool)  # not the noise split before it
  want[vit, t1] = want[vit, t2] = want[vit, vit] = True  # nor here
  want[s1_, s1_] = np.tri(2, dtype=bool)
  np.testing.assert_array_equal(got, want)


def test_mask_rule_for_kv_cache_layout():
  """Cached keys (text, ViT block, text) + a causal decode split: every cached key, causal among the new
  tokens (bottom-right alignment j <= i + kv_len); a full query block sees the cache and itself."""
  kv, nq = 9, 3
  cache = TokenMeta(sample_id=np.array([[0] * kv]), split_id=np.array([[0, 0, 1, 1, 1, 1, 2, 2, 2]]),
                    mode=np.array([[CAUSAL] * 2 + [FULL] * 4 + [CAUSAL] * 3]), index=np.arange(kv)[None],
                    position=np.zeros((1, kv), int), is_gen=np.zeros((1, kv), bool))
  for mode in (CAUSAL, FULL):
    new = TokenMeta(sample_id=np.zeros((1, nq), int), split_id=np.full((1, nq), 3), mode=np.full((1, nq), mode),
                    index=kv + np.arange(nq)[None], position=np.zeros((1, nq), int),
                    is_gen=np.zeros((1, nq), bool))
    keys = TokenMeta(*(np.concatenate([c, n], 1) for c, n in zip(cache, new)))
    got = np.asarray(packing.attention_mask(packing.to_device(new), packing.to_device(keys)))[0]
    i, j = np.arange(nq)[:, None], np.arange(kv + nq)[None, :]
    want = (j <= i + kv) if mode == CAUSAL else np.ones((nq, kv + nq), bool)
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------
# RoPE


def test_rope_matches_spec_formula_and_is_relative():
  d, theta = 16, 10000.0
  pos = np.array([[0, 3, 7, 250]])
  x = np.random.default_rng(0).normal(size=(1, 4, 2, d)).astype(np.float32)
  cos, sin = rope.rope_cos_sin(jnp.asarray(pos), d, theta)
  got = np.asarray(rope.apply_rope(jnp.asarray(x), cos, sin))
  inv = theta ** (-np.arange(0, d, 2) / d)
  ang = pos[..., None] * inv
  c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  a, b = x[..., :d // 2], x[..., d // 2:]
  want = np.concatenate([a * c - b * s, b * c + a * s], axis=-1)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got[0, 0], x[0, 0], atol=0)  # position 0 is the identity

  # <rot(q, m), rot(k, n)> depends only on m - n.
  q, k = x[:, :1, :1], x[:, 1:2, :1]
  def dot(m, n):
    cm, sm = rope.rope_cos_sin(jnp.array([[m]]), d, theta)
    cn, sn = rope.rope_cos_sin(jnp.array([[n]]), d, theta)
    return float(jnp.sum(rope.apply_rope(q, cm, sm) * rope.apply_rope(k, cn, sn)))
  assert abs(dot(10, 4) - dot(106, 100)) < 1e-4


# ----------------------------------------------------------------------------------------------
# Attention


def _random_meta(rng, B, N):
  """Rows of random samples/splits/modes, each followed by some padding."""
  cols = {f: np.zeros((B, N), np.int32) for f in ("sample_id", "split_id", "mode", "index", "position")}
  for b in range(B):
    used = int(rng.integers(N // 2, N + 1))
    t, split, sid = 0, 0, 0
    while t < used:
      for _ in range(int(rng.integers(1, 4))):
        L = int(rng.integers(1, 9))
        sl = slice(t, min(t + L, used))
        cols["sample_id"][b, sl] = sid
        cols["split_id"][b, sl] = split
        cols["mode"][b, sl] = rng.integers(0, 3)
        t, split = t + L, split + 1
        if t >= used:
          break
      sid += 1
    cols["sample_id"][b, used:] = -1
    cols["index"][b] = np.arange(N)
  return TokenMeta(is_gen=np.zeros((B, N), bool), **cols)


def _reference_attention(q, k, v, mask):
  """NumPy float64: kv head h // (Hq/Hkv), scale 1/sqrt(d), empty rows 0."""
  B, Nq, Hq, d = q.shape
  G = Hq // k.shape[2]
  out = np.zeros(q.shape)
  for b in range(B):
    for h in range(Hq):
      s = q[b, :, h].astype(np.float64) @ k[b, :, h // G].T.astype(np.float64) / np.sqrt(d)
      s = np.where(mask[b], s, -np.inf)
      mx = np.max(s, axis=-1, keepdims=True)
      e = np.where(mask[b], np.exp(s - np.where(np.isfinite(mx), mx, 0)), 0)
      den = e.sum(-1, keepdims=True)
      out[b, :, h] = (e / np.where(den > 0, den, 1)) @ v[b, :, h // G]
  return out


def test_dense_matches_reference_and_chunked_matches_dense():
  rng = np.random.default_rng(1)
  B, N, Hq, Hkv, d = 2, 45, 6, 2, 8
  meta = _random_meta(rng, B, N)
  q, k, v = (rng.normal(size=(B, N, h, d)).astype(np.float32) for h in (Hq, Hkv, Hkv))
  mask = np.asarray(packing.attention_mask(packing.to_device(meta), packing.to_device(meta)))
  jm = packing.to_device(meta)
  dense = jax.jit(lambda q, k, v, m: attn_lib.attention(q, k, v, m, m, impl="dense"))(q, k, v, jm)
  np.testing.assert_allclose(np.asarray(dense), _reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
  pad = meta.sample_id < 0
  assert pad.any() and not np.asarray(dense)[pad].any()  # padding rows are exactly 0, not NaN

  for block in (8, 16, 45, 64):
    f = jax.jit(lambda q, k, v, m: attn_lib.attention(q, k, v, m, m, impl="chunked", block_q=block))
    np.testing.assert_allclose(np.asarray(f(q, k, v, jm)), np.asarray(dense), atol=1e-6, rtol=1e-6)

  # Gradients agree too (chunked blocks are rematerialised).
  def loss(impl):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attn_lib.attention(q, k, v, jm, jm, impl=impl,
                                                                                block_q=16))), argnums=(0, 1, 2)))
  for gd, gc in zip(loss("dense")(q, k, v), loss("chunked")(q, k, v)):
    assert np.isfinite(np.asarray(gc)).all()
    np.testing.assert_allclose(np.asarray(gc), np.asarray(gd), atol=1e-5, rtol=1e-5)


def test_attention_bf16_is_close_and_finite():
  rng = np.random.default_rng(2)
  meta = packing.to_device(_random_meta(rng, 1, 32))
  q, k, v = (rng.normal(size=(1, 32, h, 8)).astype(np.float32) for h in (4, 2, 2))
  f32 = attn_lib.attention(q, k, v, meta, meta)
  bf = attn_lib.attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), meta, meta, impl="chunked",
                          block_q=8)
  assert bf.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf, np.float32), np.asarray(f32), atol=5e-2, rtol=5e-2)


def test_sample_stride_puts_each_sample_in_its_own_window():
  a = [packing.text(3), Split("vae_noise", 2)]  # 3 + 4 = 7 slots
  b = [packing.text(2), Split("vit", 1), Split("vae_noise", 1)]  # 2 + 3 + 3 = 8 slots
  pk = packing.pack([[a, b], [b]], 16, text_capacity=16, vit_capacity=2, latent_capacity=4,
                    sample_stride=8)
  m = pk.meta
  np.testing.assert_array_equal(m.sample_id, [[0] * 7 + [-1] + [1] * 8, [2] * 8 + [-1] * 8])
  np.testing.assert_array_equal(m.position[0, 8:], [0, 1, 2, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(pk.latent_index, [[4, 5, 14, 16], [6, 16, 16, 16]])
  # the same samples back to back: the same metadata, moved
  flat = packing.pack([[a, b], [b]], 16, text_capacity=16, vit_capacity=2, latent_capacity=4)
  np.testing.assert_array_equal(flat.meta.sample_id[0], [0] * 7 + [1] * 8 + [-1])
  for f in ("split_id", "mode", "position", "is_gen"):
    np.testing.assert_array_equal(getattr(m, f)[0, 8:], getattr(flat.meta, f)[0, 7:15])
  with pytest.raises(ValueError, match="window"):
    packing.pack([[a, b]], 16, text_capacity=16, vit_capacity=2, latent_capacity=4, sample_stride=7)
  with pytest.raises(ValueError, match="windows"):
    packing.pack([[a, b]], 16, text_capacity=16, vit_capacity=2, latent_capacity=4, sample_stride=9)


@pytest.mark.parametrize("impl", ["dense", "xla"])
def test_window_attention_equals_attention_over_the_whole_row(impl):
  """Rows packed one sample per window: attention cut into windows gives the whole row's result and
  gradients, for queries and keys of every split kind, padding included."""
  rng = np.random.default_rng(3)
  T = 12
  samples = [[packing.text(3), Split("vae_noise", 4)], [packing.text(5), Split("vit", 2)],
             [Split("vae_clean", 2), packing.text(2), Split("vae_noise", 3)], [packing.text(1)]]
  rows = [[samples[0], samples[1]], [samples[2], samples[3]], [samples[3]]]
  meta = packing.to_device(packing.pack(rows, 2 * T, text_capacity=24, vit_capacity=4,
                                        latent_capacity=8, sample_stride=T).meta)
  B, N, Hq, Hkv, d = 3, 2 * T, 4, 2, 8
  q, k, v = (rng.normal(size=(B, N, h, d)).astype(np.float32) for h in (Hq, Hkv, Hkv))

  def run(window):
    f = lambda q, k, v: attn_lib.attention(q, k, v, meta, meta, impl=impl, window=window)
    out = jax.jit(f)(q, k, v)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))(q, k, v)
    return [np.asarray(x) for x in (out, *grads)]

  for whole, cut in zip(run(0), run(T)):
    np.testing.assert_allclose(cut, whole, atol=1e-6, rtol=1e-6)
  with pytest.raises(ValueError, match="window"):
    attn_lib.attention(q, k[:, :T], v[:, :T], meta, jax.tree.map(lambda x: x[:, :T], meta),
                       impl=impl, window=5)
