"""FLUX autoencoder (NHWC) against the official golden case `vae`."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srum_jax.models import autoencoder, config, params

ATOL = RTOL = 1e-4  # fp32 golden tolerance (measured max errors are ~1e-6)
AE = config.tiny().ae


def golden_to_tree(sd):
  """Official ae state dict -> `params.ae_schema` tree: conv [O,I,kh,kw] -> [kh,kw,I,O], norm weight -> scale."""
  tree = {}
  for key, value in sd.items():
    *path, leaf = key.split(".")
    if leaf == "weight":
      leaf, value = ("kernel", value.transpose(2, 3, 1, 0)) if value.ndim == 4 else ("scale", value)
    node = tree
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def tree(golden_ae_weights):
  return golden_to_tree(golden_ae_weights)


def test_tree_matches_schema(tree):
  want = params.abstract_params(params.ae_schema(AE))
  assert jax.tree.structure(want) == jax.tree.structure(tree)
  for w, t in zip(jax.tree.leaves(want), jax.tree.leaves(tree)):
    assert w.shape == t.shape


def test_encode_decode_golden(golden_cases, tree):
  image = nhwc(golden_cases["vae.image"])
  moments = jax.jit(autoencoder.encode_moments, static_argnames="cfg")(tree, image, AE)
  z = jax.jit(autoencoder.encode, static_argnames="cfg")(tree, image, AE)
  dec = jax.jit(autoencoder.decode, static_argnames="cfg")
  rec = dec(tree, nhwc(golden_cases["vae.latent_mean_scaled"]), AE)
  rand = dec(tree, nhwc(golden_cases["vae.random_latent"]), AE)
  want_moments = nhwc(golden_cases["vae.encoder_moments"])
  checks = {
      "encoder_moments": (np.concatenate(moments, axis=-1), want_moments),
      "latent_mean_scaled": (z, nhwc(golden_cases["vae.latent_mean_scaled"])),
      "decode_of_latent_mean_scaled": (rec, nhwc(golden_cases["vae.decode_of_latent_mean_scaled"])),
      "decode_of_random_latent": (rand, nhwc(golden_cases["vae.decode_of_random_latent"])),
  }
  errs = {}
  for name, (got, want) in checks.items():
    assert got.shape == want.shape, name
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=RTOL, err_msg=name)
    errs[name] = _max_err(got, want)
  print("vae max abs err:", errs)


def test_decode_flow_final_latent_golden(golden_cases, tree):
  """The flow case decodes its final (scaled) latent with vae.decode: same function, another input."""
  got = jax.jit(autoencoder.decode, static_argnames="cfg")(tree, nhwc(golden_cases["flow.final_latent_image"]), AE)
  want = nhwc(golden_cases["flow.decoded"])
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=RTOL)
  print("flow.decoded max abs err:", _max_err(got, want))


def test_encode_with_key_samples_posterior(golden_cases, tree):
  image = nhwc(golden_cases["vae.image"])
  key = jax.random.key(3)
  z = jax.jit(autoencoder.encode, static_argnames="cfg")(tree, image, AE, key)
  moments = nhwc(golden_cases["vae.encoder_moments"]).astype(np.float64)
  mean, logvar = moments[..., :4], moments[..., 4:]
  eps = np.asarray(jax.random.normal(key, mean.shape, jnp.float32), np.float64)
  want = AE.scale_factor * (mean + np.exp(0.5 * logvar) * eps - AE.shift_factor)
  np.testing.assert_allclose(np.asarray(z), want, atol=ATOL, rtol=RTOL)
  assert _max_err(z, AE.scale_factor * (mean - AE.shift_factor)) > 1e-2  # it really sampled


def test_to_uint8_truncates():
  x = jnp.asarray([-3.0, -1.0, 0.0, 1.0, 2.5, 0.999, -0.999, 0.5 / 255 * 2 - 1])
  want = [0, 0, 127, 255, 255, 254, 0, 0]
  got = np.asarray(jax.jit(autoencoder.to_uint8)(x))
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, want)
  # 0.999 -> 0.9995 * 255 = 254.87 (truncated, not rounded); -0.999 -> 0.1275 -> 0.


def test_building_blocks_by_hand():
  """Downsample pads right/bottom only; upsample is nearest x2; GroupNorm normalises per group."""
  x = jnp.arange(1.0, 17.0).reshape(1, 4, 4, 1)
  ones = {"kernel": jnp.zeros((3, 3, 1, 1)).at[2, 2, 0, 0].set(1.0), "bias": jnp.zeros(1)}
  # bottom-right kernel tap of the window at (2i, 2j) reads pixel (2i+2, 2j+2), zero beyond the image.
  np.testing.assert_array_equal(np.asarray(autoencoder.downsample({"conv": ones}, x))[0, :, :, 0],
                                [[11.0, 0.0], [0.0, 0.0]])
  centre = {"kernel": jnp.zeros((3, 3, 1, 1)).at[1, 1, 0, 0].set(1.0), "bias": jnp.zeros(1)}
  up = np.asarray(autoencoder.upsample({"conv": centre}, x[:, :2, :2]))[0, :, :, 0]
  np.testing.assert_array_equal(up, [[1, 1, 2, 2], [1, 1, 2, 2], [5, 5, 6, 6], [5, 5, 6, 6]])
  g = jax.random.normal(jax.random.key(0), (2, 3, 5, 64)) * 3 + 1
  y = np.asarray(autoencoder.group_norm({"scale": jnp.ones(64), "bias": jnp.zeros(64)}, g), np.float64)
  grouped = y.reshape(2, 3, 5, 32, 2)
  np.testing.assert_allclose(grouped.mean(axis=(1, 2, 4)), 0.0, atol=1e-5)
  np.testing.assert_allclose(grouped.var(axis=(1, 2, 4)), 1.0, atol=1e-4)
  # eps 1e-6 matters for small-variance inputs: NumPy statement of GroupNorm(32, eps=1e-6) with affine.
  small = np.asarray(g, np.float64) * 1e-3
  scale, bias = np.linspace(0.5, 1.5, 64), np.linspace(-0.1, 0.1, 64)
  xs = small.reshape(2, 3, 5, 32, 2)
  mu, var = xs.mean(axis=(1, 2, 4), keepdims=True), xs.var(axis=(1, 2, 4), keepdims=True)
  want = ((xs - mu) / np.sqrt(var + 1e-6)).reshape(2, 3, 5, 64) * scale + bias
  got = autoencoder.group_norm({"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)},
                               jnp.asarray(small, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_7b_shapes_abstract():
  """Full-size AE: /8 latents with 16 channels and back (shape-only, no compute)."""
  cfg = config.bagel_7b_mot().ae
  p = params.abstract_params(params.ae_schema(cfg))
  img = jax.ShapeDtypeStruct((2, 256, 192, 3), jnp.bfloat16)
  z = jax.eval_shape(functools.partial(autoencoder.encode, cfg=cfg), p, img)
  assert z.shape == (2, 32, 24, 16) and z.dtype == jnp.bfloat16
  x = jax.eval_shape(functools.partial(autoencoder.decode, cfg=cfg), p, z)
  assert x.shape == (2, 256, 192, 3) and x.dtype == jnp.bfloat16
