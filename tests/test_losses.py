"""Losses: golden SRUM loss values, masking / batching, NaN safety, float64 finite-difference gradients,
timestep sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srum_jax import losses

RTOL = 1e-5  # golden scalars (float32; measured ~1e-7 relative)


@pytest.fixture(scope="module")
def srum(golden_cases):
  return {k.split(".", 1)[1]: v for k, v in golden_cases.items() if k.startswith("srum.")}


def test_golden_srum_loss(srum):
  loss, aux = losses.srum_flow_loss(srum["v_theta"], srum["noise"], srum["x_bad_tokens"], srum["x_gt_tokens"],
                                    srum["rewards_per_token"], None, float(srum["lambda_constraint"]))
  np.testing.assert_allclose(aux["loss_reward"], srum["loss_reward"], rtol=RTOL)
  np.testing.assert_allclose(aux["loss_constraint"], srum["loss_constraint"], rtol=RTOL)
  np.testing.assert_allclose(loss, srum["loss_total_official"], rtol=RTOL)
  ones = np.ones_like(srum["rewards_per_token"])
  plain = lambda x: losses.srum_flow_loss(srum["v_theta"], srum["noise"], x, x, ones, None, 0.0)[0]  # noqa: E731
  np.testing.assert_allclose(plain(srum["x_gt_tokens"]), srum["loss_gt_only_official"], rtol=RTOL)
  np.testing.assert_allclose(plain(srum["x_bad_tokens"]), srum["loss_no_gt_official"], rtol=RTOL)


def test_golden_timesteps(srum):
  raw = srum["packed_timesteps"]
  t = np.asarray(losses.timesteps_from_raw(raw, 2.0))
  s = 1 / (1 + np.exp(-raw.astype(np.float64)))
  np.testing.assert_allclose(t, 2 * s / (1 + s), rtol=1e-6)
  assert np.all((t > 0) & (t < 1))
  np.testing.assert_allclose(t[:12], 2 * (1 / (1 + np.exp(-0.3))) / (1 + 1 / (1 + np.exp(-0.3))), rtol=1e-6)
  np.testing.assert_allclose(t[12:], 2 * (1 / (1 + np.exp(0.7))) / (1 + 1 / (1 + np.exp(0.7))), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(losses.timesteps_from_raw(np.array([-np.inf, np.inf]), 3.0)), [0.0, 1.0])


def test_shift_and_sampling():
  t = jnp.linspace(0, 1, 11)
  np.testing.assert_allclose(losses.shift_timesteps(t, 1.0), t, atol=1e-7)
  shifted = np.asarray(losses.shift_timesteps(t, 3.0))
  assert np.all(shifted[1:-1] > np.asarray(t)[1:-1]) and np.all(np.diff(shifted) > 0)
  raw = jax.random.normal(jax.random.key(0), (20000,))
  ts = np.asarray(losses.timesteps_from_raw(raw, 1.0))
  assert ts.min() > 0 and ts.max() < 1 and abs(np.median(ts) - 0.5) < 0.02  # sigmoid(N(0,1)): median 1/2
  ts3 = np.asarray(losses.timesteps_from_raw(raw, 3.0))
  np.testing.assert_allclose(ts3, 3 * ts / (1 + 2 * ts), rtol=1e-5)


def test_interpolate_and_target():
  rng = np.random.default_rng(0)
  x0, eps = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
  t = np.linspace(0, 1, 5).astype(np.float32)
  xt = np.asarray(losses.interpolate(x0, eps, t))
  np.testing.assert_allclose(xt, (1 - t[:, None]) * x0 + t[:, None] * eps, atol=1e-6)
  np.testing.assert_array_equal(xt[0], x0[0])
  np.testing.assert_allclose(xt[-1], eps[-1], atol=1e-7)
  np.testing.assert_allclose(losses.flow_target(x0, eps), eps - x0)


def _random_case(rng, shape, dtype=np.float32):
  n = shape[:-1]
  return (rng.normal(size=shape).astype(dtype), rng.normal(size=shape).astype(dtype),
          rng.normal(size=shape).astype(dtype), rng.normal(size=shape).astype(dtype),
          rng.uniform(0, 1, n).astype(dtype))


def _np_srum(v, eps, xb, xg, r, m, lam):
  """float64 statement of the SRUM loss over valid tokens only."""
  v, eps, xb, xg, r = (np.asarray(a, np.float64)[m] for a in (v, eps, xb, xg, r))
  return np.mean(r[:, None] * (v - (eps - xb)) ** 2) + lam * np.mean((v - (eps - xg)) ** 2)


def test_mask_and_batch_dim():
  rng = np.random.default_rng(1)
  v, eps, xb, xg, r = _random_case(rng, (3, 7, 4))
  mask = rng.random((3, 7)) < 0.6
  mask[0, 0] = True
  v_pad = v.copy()
  v_pad[~mask] = np.nan  # garbage in padding must not leak
  loss, aux = losses.srum_flow_loss(v_pad, eps, xb, xg, r, mask, 0.5)
  np.testing.assert_allclose(loss, _np_srum(v, eps, xb, xg, r, mask, 0.5), rtol=1e-5)
  flat = losses.srum_flow_loss(v.reshape(21, 4), eps.reshape(21, 4), xb.reshape(21, 4), xg.reshape(21, 4),
                               r.reshape(21), mask.reshape(21), 0.5)[0]
  np.testing.assert_allclose(loss, flat, rtol=1e-6)
  g = jax.grad(lambda x: losses.srum_flow_loss(x, eps, xb, xg, r, mask, 0.5)[0])(v_pad)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~mask] == 0)
  # R == 1 and lambda == 0 is the plain flow loss mean((v - (eps - x0))^2) over valid tokens
  plain = np.mean((np.asarray(v, np.float64) - (eps - xb).astype(np.float64))[mask] ** 2)
  np.testing.assert_allclose(losses.srum_flow_loss(v, eps, xb, xg, np.ones_like(r), mask, 0.0)[0], plain, rtol=1e-6)


def test_all_false_mask_is_zero_not_nan():
  rng = np.random.default_rng(2)
  v, eps, xb, xg, r = _random_case(rng, (5, 3))
  mask = np.zeros(5, bool)
  f = lambda x: losses.srum_flow_loss(x, eps, xb, xg, r, mask, 0.5)[0]
  assert float(f(v)) == 0.0
  np.testing.assert_array_equal(np.asarray(jax.grad(f)(v)), 0.0)


def test_gradient_vs_finite_differences_float64():
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    v, eps, xb, xg, r = _random_case(rng, (6, 3), np.float64)
    mask = np.array([True, True, False, True, True, False])
    f = jax.jit(lambda x: losses.srum_flow_loss(x, eps, xb, xg, r, mask, 0.5)[0])
    g = np.asarray(jax.grad(f)(v))
    assert g.dtype == np.float64
    h = 1e-6
    fd = np.zeros_like(v)
    for idx in np.ndindex(v.shape):
      e = np.zeros_like(v)
      e[idx] = h
      fd[idx] = (float(f(v + e)) - float(f(v - e))) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-7, atol=1e-9)
    # and the analytic gradient of the float64 statement: 2/(n*C) * (R e_bad + lambda e_gt) on valid tokens
    n_c = mask.sum() * v.shape[1]
    want = 2 / n_c * (r[:, None] * (v - (eps - xb)) + 0.5 * (v - (eps - xg))) * mask[:, None]
    np.testing.assert_allclose(g, want, rtol=1e-10, atol=1e-12)


def test_jit_and_bf16_inputs():
  rng = np.random.default_rng(4)
  v, eps, xb, xg, r = _random_case(rng, (8, 4))
  mask = np.ones(8, bool)
  eager = losses.srum_flow_loss(v, eps, xb, xg, r, mask, 0.5)[0]
  jitted = jax.jit(losses.srum_flow_loss)(v, eps, xb, xg, r, mask, 0.5)[0]
  np.testing.assert_allclose(eager, jitted, rtol=1e-6)
  out = losses.srum_flow_loss(jnp.asarray(v, jnp.bfloat16), eps, xb, xg, r, mask, 0.5)[0]
  assert out.dtype == jnp.float32


def test_anchor_velocity_loss_is_the_masked_mean_square_distance():
  rng = np.random.default_rng(4)
  v = rng.normal(size=(2, 5, 3)).astype(np.float32)
  ref = rng.normal(size=(2, 5, 3)).astype(np.float32)
  mask = np.array([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], bool)
  want = ((v - ref) ** 2)[mask].sum() / (mask.sum() * 3)
  np.testing.assert_allclose(losses.anchor_velocity_loss(v, ref, mask), want, rtol=1e-6)
  np.testing.assert_allclose(losses.anchor_velocity_loss(v, ref), ((v - ref)**2).mean(), rtol=1e-6)
  g_ref = jax.grad(lambda r: losses.anchor_velocity_loss(jnp.asarray(v), r))(jnp.asarray(ref))
  assert not np.any(np.asarray(g_ref))  # the reference is a target: no gradient reaches it
  g = jax.grad(lambda x: losses.anchor_velocity_loss(x, jnp.asarray(ref)))(jnp.asarray(v))
  np.testing.assert_allclose(g, 2 * (v - ref) / v.size, rtol=1e-5)
