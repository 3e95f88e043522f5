"""Golden conformance of the generation-path training forward (cases gen_t2i, gen_edit, srum).

Tolerance: atol = rtol = 1e-4 on velocities (fp32, reference attention float64-accurate; measured ~2e-6),
1e-5 relative on scalar losses.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srum_jax import losses
from srum_jax.models import bagel, embeddings
from srum_jax.models.bagel import ImageTokens

ATOL = RTOL = 1e-4


def _latent_tokens(padded_nchw, shapes, p=2):
  """Image i of a padded NCHW batch -> its [h*w, p*p*z] tokens (top-left [:2h, :2w] region)."""
  out = []
  for img, (h, w) in zip(padded_nchw, shapes):
    nhwc = np.transpose(img, (1, 2, 0))[: p * h, : p * w]
    out.append(np.asarray(embeddings.patchify_latent(jnp.asarray(nhwc), p)))
  return out


def _t2i_rows(c, prefix, text_splits, bad_key, gt_key=None, rewards=None):
  shapes = [tuple(s) for s in c[f"{prefix}.patchified_vae_latent_shapes"]]
  bad = _latent_tokens(c[f"{prefix}.{bad_key}"], shapes)
  gt = _latent_tokens(c[f"{prefix}.{gt_key}"], shapes) if gt_key else [None] * len(shapes)
  raw = c[f"{prefix}.packed_timesteps"]
  starts = np.cumsum([0] + [h * w for h, w in shapes])
  samples = []
  for i, (ids, shape) in enumerate(zip(text_splits, shapes)):
    r = None if rewards is None else rewards[starts[i]:starts[i + 1]]
    samples.append([list(ids), ImageTokens("vae_noise", shape, x_bad=bad[i], x_gt=gt[i],
                                           raw_t=float(raw[starts[i]]), rewards=r)])
  return samples


def _noise_rows(inputs, slots, noise_tokens):
  """Put the golden packed-order noise rows at the batch's latent slots (row-major packing order)."""
  noise = np.zeros(slots.x_bad.shape, np.float32)
  valid = np.asarray(inputs.latent_index) < inputs.meta.sample_id.shape[1]
  noise[valid] = noise_tokens
  return noise


@pytest.fixture(scope="module")
def fwd(tiny_cfg):
  """(params, inputs, slots, noise) -> (velocities, flow times): the training forward with the times and
  noised latents made as the loss makes them."""

  @functools.partial(jax.jit, static_argnames="routing")
  def run(params, inputs, slots, noise, routing="routed"):
    t = losses.timesteps_from_raw(slots.raw_t, tiny_cfg.timestep_shift)
    x_t = losses.interpolate(slots.x_bad, noise, t)
    return bagel.forward_gen(params, inputs, x_t, t, cfg=tiny_cfg, routing=routing), t

  return run


def test_gen_t2i_golden(golden_cases, tiny_cfg, tiny_params, fwd):
  c = golden_cases
  ids = c["gen_t2i.packed_text_ids"]
  samples = _t2i_rows(c, "gen_t2i", [ids[0:7], ids[9:14]], "padded_latent")
  inputs, slots = bagel.build_packed_inputs(tiny_cfg, [samples], num_tokens=40, text_capacity=24, latent_capacity=20)
  noise = _noise_rows(inputs, slots, c["gen_t2i.noise"])
  v_pred, t = fwd(tiny_params["bagel"], inputs, slots, noise)
  m = np.asarray(slots.loss_mask[0])
  np.testing.assert_allclose(np.asarray(t[0])[m], c["gen_t2i.t_effective"], rtol=1e-6, atol=1e-6)
  v = np.asarray(v_pred[0])[m]
  np.testing.assert_allclose(v, c["gen_t2i.v_pred"], atol=ATOL, rtol=RTOL)
  mse = (v - (c["gen_t2i.noise"] - np.asarray(slots.x_bad[0])[m])) ** 2
  np.testing.assert_allclose(mse, c["gen_t2i.mse_elementwise"], atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(mse.mean(-1).sum() / mse.shape[0], c["gen_t2i.loss_bagel"], rtol=1e-5)


def test_gen_t2i_two_rows_and_naive_routing_agree(golden_cases, tiny_cfg, tiny_params, fwd):
  """One sample per row (B=2) and the naive both-experts reference give the same velocities."""
  c = golden_cases
  ids = c["gen_t2i.packed_text_ids"]
  samples = _t2i_rows(c, "gen_t2i", [ids[0:7], ids[9:14]], "padded_latent")
  inputs, slots = bagel.build_packed_inputs(tiny_cfg, [[samples[0]], [samples[1]]], num_tokens=24,
                                            text_capacity=12, latent_capacity=12)
  noise = _noise_rows(inputs, slots, c["gen_t2i.noise"])
  v_pred, _ = fwd(tiny_params["bagel"], inputs, slots, noise)
  v = np.asarray(v_pred)[np.asarray(slots.loss_mask)]
  np.testing.assert_allclose(v, c["gen_t2i.v_pred"], atol=ATOL, rtol=RTOL)
  naive, _ = fwd(tiny_params["bagel"], inputs, slots, noise, routing="naive")
  np.testing.assert_allclose(np.asarray(naive), np.asarray(v_pred), atol=1e-5)


def test_gen_edit_golden(golden_cases, tiny_cfg, tiny_params, fwd):
  """All token kinds in one sample: clean VAE image, ViT image, text, noisy VAE image."""
  c = golden_cases
  shapes = [tuple(s) for s in c["gen_edit.patchified_vae_latent_shapes"]]
  lat = _latent_tokens(c["gen_edit.padded_latent"], shapes)
  raw = c["gen_edit.packed_timesteps"]
  ids = c["gen_edit.packed_text_ids"]
  sample = [ImageTokens("vae_clean", shapes[0], x_bad=lat[0]),
            ImageTokens("vit", (2, 3), patches=c["gen_edit.packed_vit_tokens"]),
            list(ids[4:10]),
            ImageTokens("vae_noise", shapes[1], x_bad=lat[1], raw_t=float(raw[-1]))]
  inputs, slots = bagel.build_packed_inputs(tiny_cfg, [[sample]], num_tokens=32, text_capacity=14,
                                            vit_capacity=8, latent_capacity=14)
  np.testing.assert_array_equal(np.asarray(inputs.meta.position[0, :30]), c["gen_edit.packed_position_ids"])
  noise = _noise_rows(inputs, slots, c["gen_edit.noise"])
  v_pred, _ = fwd(tiny_params["bagel"], inputs, slots, noise)
  v = np.asarray(v_pred[0])[np.asarray(slots.loss_mask[0])]
  np.testing.assert_allclose(v, c["gen_edit.v_pred"], atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(((v - (c["gen_edit.noise"][6:] - lat[1])) ** 2).mean(-1).sum() / 6,
                             c["gen_edit.loss_bagel"], rtol=1e-5)


def test_srum_forward_golden(golden_cases, tiny_cfg, tiny_params, fwd):
  """SRUM: the bad latents are noised; v_theta, token rewards and the three losses match."""
  c = golden_cases
  ids = c["srum.packed_text_ids"]
  samples = _t2i_rows(c, "srum", [ids[0:7], ids[9:14]], "padded_latent_bad",
                      "packed_latent_clean_gt", rewards=c["srum.rewards_per_token"])
  inputs, slots = bagel.build_packed_inputs(tiny_cfg, [samples], num_tokens=48, text_capacity=20,
                                            latent_capacity=28)
  np.testing.assert_array_equal(np.asarray(inputs.meta.position[0, :40]), c["srum.packed_position_ids"])
  noise = _noise_rows(inputs, slots, c["srum.noise"])
  v_pred, _ = fwd(tiny_params["bagel"], inputs, slots, noise)
  m = np.asarray(slots.loss_mask[0])
  np.testing.assert_allclose(np.asarray(v_pred[0])[m], c["srum.v_theta"], atol=ATOL, rtol=RTOL)
  loss, aux = losses.srum_flow_loss(v_pred, noise, slots.x_bad, slots.x_gt, slots.rewards, slots.loss_mask,
                                    float(c["srum.lambda_constraint"]))
  np.testing.assert_allclose(float(aux["loss_reward"]), c["srum.loss_reward"], rtol=1e-5)
  np.testing.assert_allclose(float(aux["loss_constraint"]), c["srum.loss_constraint"], rtol=1e-5)
  np.testing.assert_allclose(float(loss), c["srum.loss_total_official"], rtol=1e-5)
