"""Sin-cos tables, timestep embedder and latent patchify against the official numbers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srum_jax.models import config, embeddings

CFG = config.tiny()


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("key", ["latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"])
def test_sincos_tables_equal_checkpoint_tables(golden_weights, key):
  grid = CFG.max_latent_size if key.startswith("latent") else CFG.vit_max_num_patch_per_side
  table = embeddings.sincos_2d_table(grid, CFG.llm.hidden_size)
  np.testing.assert_array_equal(table, golden_weights[key])  # bit-exact (fp64 compute, fp32 storage)


def test_sincos_table_column_half_first():
  """Entry (r, c): first half depends on the column only, second half on the row only."""
  g, d = 5, 16
  t = embeddings.sincos_2d_table(g, d).reshape(g, g, d)
  np.testing.assert_array_equal(t[:, :, :d // 2], np.broadcast_to(t[0:1, :, :d // 2], (g, g, d // 2)))
  np.testing.assert_array_equal(t[:, :, d // 2:], np.broadcast_to(t[:, 0:1, d // 2:], (g, g, d // 2)))
  col = 3
  omega = 10000.0 ** (-np.arange(d // 4) / (d // 4))
  np.testing.assert_allclose(t[0, col, :d // 2], np.concatenate([np.sin(col * omega), np.cos(col * omega)]),
                             atol=1e-7)


def _numpy_timestep_embed(sd, t):
  """Independent statement of the timestep embedder in float64: [cos(t f), sin(t f)] -> Linear -> SiLU -> Linear."""
  t = np.asarray(t, np.float64)
  f = np.exp(-math.log(10000.0) * np.arange(128) / 128.0)
  feats = np.concatenate([np.cos(t[:, None] * f), np.sin(t[:, None] * f)], axis=1)
  w0, b0 = sd["time_embedder.mlp.0.weight"].astype(np.float64), sd["time_embedder.mlp.0.bias"]
  w2, b2 = sd["time_embedder.mlp.2.weight"].astype(np.float64), sd["time_embedder.mlp.2.bias"]
  h = feats @ w0.T + b0
  h = h / (1.0 + np.exp(-h))
  return h @ w2.T + b2


def test_timestep_embed_vs_numpy(golden_weights, golden_cases):
  sd = golden_weights
  p = {"fc1": {"kernel": sd["time_embedder.mlp.0.weight"].T, "bias": sd["time_embedder.mlp.0.bias"]},
       "fc2": {"kernel": sd["time_embedder.mlp.2.weight"].T, "bias": sd["time_embedder.mlp.2.bias"]}}
  t = np.concatenate([[0.0, 0.25, 0.5, 1.0], golden_cases["gen_t2i.t_effective"]]).astype(np.float32)
  got = jax.jit(embeddings.timestep_embed)(p, jnp.asarray(t))
  want = _numpy_timestep_embed(sd, t)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
  print("timestep_embed max abs err:", float(np.max(np.abs(np.asarray(got, np.float64) - want))))


def test_timestep_features_cos_first():
  f = np.asarray(embeddings.timestep_features(jnp.asarray([0.0]), 256))
  np.testing.assert_array_equal(f[0, :128], 1.0)
  np.testing.assert_array_equal(f[0, 128:], 0.0)


def _official_patchify(latent_chw, h, w, p=2):
  """Manifest statement: latent[c, 2h, 2w] -> reshape(c,h,2,w,2) -> (h,w,p,q,c) -> [h*w, 4c]."""
  c = latent_chw.shape[0]
  x = latent_chw[:, :p * h, :p * w].reshape(c, h, p, w, p)
  return np.einsum("chpwq->hwpqc", x).reshape(h * w, p * p * c)


@pytest.mark.parametrize("case,latent_key", [("gen_t2i", "gen_t2i.padded_latent"),
                                             ("gen_edit", "gen_edit.padded_latent"),
                                             ("srum", "srum.padded_latent_bad"),
                                             ("srum", "srum.packed_latent_clean_gt")])
def test_patchify_matches_official_permutation(golden_cases, case, latent_key):
  padded = golden_cases[latent_key]
  shapes = golden_cases[f"{case}.patchified_vae_latent_shapes"]
  patchify = jax.jit(embeddings.patchify_latent, static_argnums=1)
  for i, (h, w) in enumerate(shapes):
    got = patchify(nhwc(padded)[i, :2 * h, :2 * w], 2)
    np.testing.assert_array_equal(np.asarray(got), _official_patchify(padded[i], h, w))


@pytest.mark.parametrize("latent_key,tokens_key", [("srum.padded_latent_bad", "srum.x_bad_tokens"),
                                                   ("srum.packed_latent_clean_gt", "srum.x_gt_tokens")])
def test_patchify_golden_srum_tokens(golden_cases, latent_key, tokens_key):
  padded = nhwc(golden_cases[latent_key])
  toks = [embeddings.patchify_latent(padded[i, :2 * h, :2 * w], 2)
          for i, (h, w) in enumerate(golden_cases["srum.patchified_vae_latent_shapes"])]
  np.testing.assert_array_equal(np.concatenate(toks), golden_cases[tokens_key])


def test_unpatchify_golden_flow(golden_cases):
  got = jax.jit(embeddings.unpatchify_latent, static_argnums=(1, 2, 3))(
      golden_cases["flow.final_latent_tokens"], 4, 3, 2)
  np.testing.assert_array_equal(np.asarray(got), nhwc(golden_cases["flow.final_latent_image"])[0])


def test_patchify_roundtrip_batched():
  x = jax.random.normal(jax.random.key(1), (2, 3, 6, 10, 5))
  toks = embeddings.patchify_latent(x, 2)
  assert toks.shape == (2, 3, 15, 20)
  np.testing.assert_array_equal(np.asarray(embeddings.unpatchify_latent(toks, 3, 5, 2)), np.asarray(x))
