"""SRUM train step: learns, freezes what it should, skips non-finite updates, and shards exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srum_jax import defaults, sharding
from srum_jax.models import autoencoder
from srum_jax.training import objective, optimizer, train_step as ts, update

H, W = 32, 24


def _tcfg(**kw):
  c = defaults.base_config().train
  c.warmup_steps = 1
  c.lr = 1e-3
  for k, v in kw.items():
    c[k] = v
  return c


def _batch(cfg, B=2, S=2, seed=0, stride=0):
  rng = np.random.default_rng(seed)
  ids = [[[cfg.tokens.bos] + list(rng.integers(0, 100, 3 + (b + s) % 3)) + [cfg.tokens.eos] for s in range(S)]
         for b in range(B)]
  inputs = ts.t2i_layout(cfg, ids, image_hw=(H, W), num_tokens=S * (12 + 2 + 8), text_capacity=S * 10,
                         sample_stride=stride)
  images = rng.uniform(-1, 1, (B, S, H, W, 3)).astype(np.float32)
  K = 3
  boxes = np.tile(np.array([[0, 0, 12, 16], [6, 8, 24, 32], [3, 3, 3, 9]], np.float32), (B, S, 1, 1))
  rewards = objective.RegionRewards(boxes, rng.uniform(-1, 1, (B, S, K)).astype(np.float32),
                                    np.ones((B, S, K), bool), rng.uniform(-1, 1, (B, S)).astype(np.float32))
  return ts.SrumBatch(inputs=inputs, images=images, rewards=rewards)


@pytest.fixture(scope="module")
def setup(tiny_cfg, tiny_params):
  params = jax.tree.map(jnp.asarray, tiny_params)
  tcfg = _tcfg()
  labels = optimizer.param_labels(params, ("vit", "connector", "ae"))
  tx = optimizer.make_optimizer(tcfg, labels)
  opts = ts.StepOptions(image_hw=(H, W), samples_per_row=2, compute_dtype=jnp.float32, timestep_shift=2.0)
  return params, tx, opts


@pytest.mark.slow
def test_step_learns_and_freezes(tiny_cfg, setup):
  params, tx, opts = setup
  step = jax.jit(ts.make_train_step(tiny_cfg, opts, tx))
  state = update.init_state(params, tx)
  batch = _batch(tiny_cfg)
  key = jax.random.key(0)
  losses = []
  for _ in range(8):
    state, m = step(state, batch, key)  # same key: same noise/t, so the loss must fall
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.8 * losses[0], losses
  assert int(state.step) == 8 and int(state.skipped) == 0
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(state.params["ae"], params["ae"])
  assert same(state.params["bagel"]["vit"], params["bagel"]["vit"])
  assert same(state.params["bagel"]["connector"], params["bagel"]["connector"])
  assert not same(state.params["bagel"]["llm"]["layers"]["gen"], params["bagel"]["llm"]["layers"]["gen"])
  # lm_head gets no gradient (no CE term), so AdamW with wd 0 leaves it unchanged
  assert same(state.params["bagel"]["llm"]["lm_head"], params["bagel"]["llm"]["lm_head"])


def test_nonfinite_loss_skips_update(tiny_cfg, setup):
  params, tx, opts = setup
  step = jax.jit(ts.make_train_step(tiny_cfg, opts, tx))
  state = update.init_state(params, tx)
  batch = _batch(tiny_cfg)
  bad = batch._replace(images=batch.images.copy())
  bad.images[0, 0, 0, 0, 0] = np.nan
  new, m = step(state, bad, jax.random.key(1))
  assert int(m["skipped"]) == 1 and int(new.skipped) == 1 and int(new.step) == 1
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  new2, m2 = step(new, batch, jax.random.key(1))
  assert int(m2["skipped"]) == 0 and np.isfinite(float(m2["loss"]))


@pytest.mark.slow
def test_sft_control_options(tiny_cfg, setup):
  """uniform rewards + lambda 0 is the plain flow loss (R == 1)."""
  params, tx, opts = setup
  batch = _batch(tiny_cfg)
  key = jax.random.key(3)
  sft = dataclass_replace(opts, levers=objective.RewardLevers(uniform=True), lambda_constraint=0.0)
  loss, aux = ts.srum_loss(params, batch, key, cfg=tiny_cfg, opts=sft)
  np.testing.assert_allclose(float(aux["reward_mean"]), 1.0)
  np.testing.assert_allclose(float(loss), float(aux["loss_reward"]), rtol=1e-6)
  srum, _ = ts.srum_loss(params, batch, key, cfg=tiny_cfg, opts=opts)
  assert abs(float(srum) - float(loss)) > 1e-4


def test_sample_windows_give_the_loss_and_gradients_of_the_packed_row(tiny_cfg, setup):
  """One window per sample (`t2i_layout(sample_stride=)` + `StepOptions.sample_window`, the train
  stage's layout) is the same computation as the samples back to back with attention over the whole
  row."""
  params, _, opts = setup
  S = 2
  T = ts.sample_window(S * (12 + 2 + 8), S)
  assert T == 22 and ts.sample_window(45, 2) == 0 and ts.sample_window(44, 1) == 0
  key = jax.random.key(4)
  flat, cut = _batch(tiny_cfg, S=S), _batch(tiny_cfg, S=S, stride=T)
  assert not np.array_equal(flat.inputs.meta.sample_id, cut.inputs.meta.sample_id)
  grad = jax.jit(jax.value_and_grad(ts.srum_loss, has_aux=True), static_argnames=("cfg", "opts"))
  (l0, _), g0 = grad(params, flat, key, cfg=tiny_cfg, opts=opts)
  (l1, _), g1 = grad(params, cut, key, cfg=tiny_cfg, opts=dataclass_replace(opts, sample_window=T))
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_state_donation_by_platform():
  assert update.state_donation("cpu") == ()
  assert update.state_donation("tpu") == update.state_donation("gpu") == (0,)


def dataclass_replace(x, **kw):
  import dataclasses
  return dataclasses.replace(x, **kw)


@pytest.mark.slow
def test_sharded_step_equals_single_device(tiny_cfg, setup):
  params, tx, opts = setup
  step_fn = ts.make_train_step(tiny_cfg, opts, tx)
  batch = _batch(tiny_cfg, B=4, S=1, seed=5)
  key = jax.random.key(7)
  single_state, single_m = jax.jit(step_fn)(update.init_state(params, tx), batch, key)
  jax.block_until_ready(single_state)

  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  abstract = jax.eval_shape(lambda p: update.init_state(p, tx), params)
  state_sh = ts.state_shardings(tiny_cfg, abstract, mesh)
  batch_sh = ts.batch_shardings(batch, mesh)
  state = jax.device_put(update.init_state(params, tx), state_sh)
  emb = state.params["bagel"]["llm"]["embed_tokens"]["embedding"]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  step = ts.shard_train_step(step_fn, state_sh, batch_sh, mesh)
  new_state, m = step(state, jax.device_put(batch, batch_sh), key)
  jax.block_until_ready(new_state)
  np.testing.assert_allclose(float(m["loss"]), float(single_m["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(single_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


@pytest.mark.slow
def test_stored_moments_give_the_step_encoders_loss(tiny_cfg, tiny_params, setup):
  """The loss from stored posterior moments (the encoder run once, outside the step) equals the loss with the
  encoder in the step, for the same key: fp32 moments to 1e-6 relative (only the encoder's compiled form
  differs), bf16-stored moments to 2e-2 relative."""
  import ml_dtypes

  _, _, opts = setup
  params = jax.tree.map(jnp.asarray, tiny_params)  # fresh: earlier tests donate the shared fixture's buffers
  batch = _batch(tiny_cfg)
  B, S = batch.images.shape[:2]
  m = autoencoder.encoder(params["ae"]["encoder"], jnp.asarray(batch.images.reshape(B * S, H, W, 3)), tiny_cfg.ae)
  m = np.asarray(m).reshape((B, S) + m.shape[1:])
  assert m.shape[-1] == 2 * tiny_cfg.ae.z_channels
  fwd = jax.jit(lambda p, b, k: ts.srum_loss(p, b, k, cfg=tiny_cfg, opts=opts)[0])
  key = jax.random.key(3)
  ref = float(fwd(params, batch, key))
  got = float(fwd(params, batch._replace(images=None, moments=m), key))
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  assert got != float(fwd(params, batch._replace(images=None, moments=m), jax.random.key(4)))  # the key matters
  half = float(fwd(params, batch._replace(images=None, moments=m.astype(ml_dtypes.bfloat16)), key))
  np.testing.assert_allclose(half, ref, rtol=2e-2)
  assert half != ref  # bf16 storage really rounds


def _anchored(cfg, batch, seed=11):
  """The batch with an anchor layout: other prompts, the same latent slots."""
  rng = np.random.default_rng(seed)
  B, S = batch.images.shape[:2]
  ids = [[[cfg.tokens.bos] + list(rng.integers(0, 100, 2 + (b * S + s) % 4)) + [cfg.tokens.eos]
          for s in range(S)]
         for b in range(B)]
  a = ts.t2i_layout(cfg, ids, image_hw=(H, W), num_tokens=S * (12 + 2 + 8), text_capacity=S * 10)
  return batch._replace(anchor_inputs=a)


@pytest.mark.slow
def test_anchor_term_is_the_reference_velocity_distance(tiny_cfg, tiny_params, setup):
  """anchor_weight w adds w * mean((v(x_t, t | anchor prompt) - v_ref(...))^2) at the batch's own
  noised latents and times: zero (loss and gradients unchanged) when the reference is the model
  itself; with another reference, the distance of the two models' velocities computed by hand from
  `forward_gen`. The jitted step takes the reference as an input."""
  from srum_jax import losses
  from srum_jax.models import bagel

  _, tx, opts = setup
  # fresh: other tests donate the shared fixture's buffers
  params = jax.tree.map(jnp.asarray, tiny_params)
  opts = dataclass_replace(opts, text_cond_dropout=0.0)
  anchored = dataclass_replace(opts, anchor_weight=0.7)
  batch = _anchored(tiny_cfg, _batch(tiny_cfg))
  key = jax.random.key(5)
  grad = jax.jit(
      jax.value_and_grad(lambda p, b, k, r, o: ts.srum_loss(p, b, k, r, cfg=tiny_cfg, opts=o),
                         has_aux=True), static_argnums=4)
  (plain, _), g_plain = grad(params, batch, key, None, opts)
  (same, aux), g_same = grad(params, batch, key, params, anchored)
  # one model twice (XLA may fuse the two forwards differently)
  assert float(aux["loss_anchor"]) < 1e-10
  np.testing.assert_allclose(float(same), float(plain), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_same), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)

  ref = jax.tree.map(lambda x: x * 1.05, params)
  (loss, aux), _ = grad(params, batch, key, ref, anchored)
  # by hand: the step's noised latents and times (same key split), both models on the anchor layout
  k_bad, _, k_t, k_noise, _ = jax.random.split(key, 5)
  B, S = batch.images.shape[:2]
  m = ts.batch_moments(params["ae"], batch, tiny_cfg)
  x0, = ts._latent_tokens_from_moments(m, tiny_cfg, (k_bad,), True)
  t = losses.timesteps_from_raw(
      jnp.repeat(jax.random.normal(k_t, (B, S)), x0.shape[1] // S, axis=1), opts.timestep_shift)
  x_t = losses.interpolate(x0, jax.random.normal(k_noise, x0.shape, jnp.float32), t)
  v = lambda p: bagel.forward_gen(p["bagel"], batch.anchor_inputs, x_t, t,  # noqa: E731
                                  cfg=tiny_cfg, dtype=opts.compute_dtype, attn_impl=opts.attn_impl)
  want = float(jnp.mean((v(params) - v(ref)) ** 2))
  assert want > 0
  np.testing.assert_allclose(float(aux["loss_anchor"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(plain) + 0.7 * want, rtol=1e-5)

  step = jax.jit(ts.make_train_step(tiny_cfg, anchored, tx))
  state, metrics = step(update.init_state(params, tx), batch, key, ref)
  assert np.isfinite(float(metrics["loss_anchor"])) and int(state.step) == 1
  with pytest.raises(ValueError, match="anchor_inputs"):
    ts.srum_loss(params, batch._replace(anchor_inputs=None), key, ref, cfg=tiny_cfg, opts=anchored)


# --- images below the canvas (SRUM's aspect-preserving training transform, padded) ------------------------------

def test_latent_sources_and_the_layout_of_smaller_images(tiny_cfg):
  """Slots hold each sample's own grid row-major (positions numbered as BAGEL numbers that grid); latent_src
  maps them to the canvas tokens (by hand: canvas grid 4 x 3, samples of 2 x 3 and 4 x 2 tokens)."""
  grids = [[(2, 3), (4, 2)]]
  src = ts.latent_sources(grids, (4, 3))
  want = [0, 1, 2, 3, 4, 5] + [12, 13, 15, 16, 18, 19, 21, 22] + [-1] * 10
  np.testing.assert_array_equal(src[0], want)
  ids = [[[tiny_cfg.tokens.bos, 5, tiny_cfg.tokens.eos]] * 2]
  inputs = ts.t2i_layout(tiny_cfg, ids, image_hw=(H, W), num_tokens=2 * (3 + 2 + 12), text_capacity=10,
                         grids=grids)
  assert inputs.latent_index.shape == (1, 24)
  assert int((inputs.latent_index[0] < inputs.meta.sample_id.shape[1]).sum()) == 6 + 8  # 10 unused slots
  G = tiny_cfg.max_latent_size
  pos = [(k // 3) * G + k % 3 for k in range(6)] + [(k // 2) * G + k % 2 for k in range(8)]
  np.testing.assert_array_equal(inputs.latent_pos[0, :14], pos)
  assert int((inputs.meta.sample_id[0] >= 0).sum()) == 2 * (3 + 2) + 14  # padding attends to nothing
  with pytest.raises(ValueError, match="fit the canvas"):
    ts.t2i_layout(tiny_cfg, ids, image_hw=(H, W), num_tokens=60, text_capacity=10, grids=[[(5, 3), (1, 1)]])


def _canvas_batch(cfg, grids, seed=0):
  """A moments batch (B = 1 row, S = 2) of images with latent grids `grids` on the (H, W) canvas."""
  rng = np.random.default_rng(seed)
  ids = [[[cfg.tokens.bos] + list(rng.integers(0, 100, 4)) + [cfg.tokens.eos] for _ in range(2)]]
  inputs = ts.t2i_layout(cfg, ids, image_hw=(H, W), num_tokens=2 * (6 + 2 + 12), text_capacity=16,
                         grids=[grids])
  f = cfg.ae.downsample
  moments = rng.normal(0, 1, (1, 2, H // f, W // f, 2 * cfg.ae.z_channels)).astype(np.float32)
  moments[..., cfg.ae.z_channels:] = -4.0  # small posterior variance
  boxes = np.array([[[0, 0, 16, 16], [4, 8, 20, 30]], [[2, 2, 9, 30], [0, 20, 24, 32]]], np.float32)[None]
  rewards = objective.RegionRewards(boxes, np.array([[[0.8, -0.6], [0.3, 0.9]]], np.float32),
                                    np.ones((1, 2, 2), bool), np.array([[0.4, -0.2]], np.float32))
  canvas = (H // cfg.latent_downsample, W // cfg.latent_downsample)
  return ts.SrumBatch(inputs=inputs, images=None, rewards=rewards, moments=moments,
                      latent_src=ts.latent_sources([grids], canvas))


def test_canvas_path_equals_the_fixed_path_for_images_filling_the_canvas(tiny_cfg, tiny_params, setup):
  _, _, opts = setup
  params = jax.tree.map(jnp.asarray, tiny_params)
  full = (H // tiny_cfg.latent_downsample, W // tiny_cfg.latent_downsample)
  batch = _canvas_batch(tiny_cfg, [full, full])
  fwd = jax.jit(lambda b, k: ts.srum_loss(params, b, k, cfg=tiny_cfg, opts=opts))
  key = jax.random.key(11)
  (a, aux_a), (b, aux_b) = fwd(batch, key), fwd(batch._replace(latent_src=None), key)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
  np.testing.assert_allclose(float(aux_a["reward_mean"]), float(aux_b["reward_mean"]), rtol=1e-6)


def test_canvas_loss_ignores_the_padding(tiny_cfg, tiny_params, setup):
  """Moments and reward boxes in the padded area change nothing; the real area does."""
  _, _, opts = setup
  params = jax.tree.map(jnp.asarray, tiny_params)
  grids = [(2, 3), (4, 2)]
  batch = _canvas_batch(tiny_cfg, grids)
  fwd = jax.jit(lambda b, k: ts.srum_loss(params, b, k, cfg=tiny_cfg, opts=opts)[0])
  key = jax.random.key(5)
  ref = float(fwd(batch, key))
  p = tiny_cfg.latent_patch_size
  noisy = batch.moments.copy()
  rng = np.random.default_rng(9)
  for s, (gh, gw) in enumerate(grids):
    pad = np.ones(noisy.shape[2:4], bool)
    pad[:gh * p, :gw * p] = False
    noisy[0, s][pad] = rng.normal(0, 5, (int(pad.sum()), noisy.shape[-1]))
  boxes = batch.rewards.boxes.copy()
  boxes[0, 0, 1] = [4, 17, 24, 32]  # sample 0 is 16 px tall: this box lies in its padding
  moved = batch._replace(moments=noisy, rewards=batch.rewards._replace(boxes=boxes))
  np.testing.assert_allclose(float(fwd(moved, key)), ref, rtol=1e-6)
  inside = batch.moments.copy()
  inside[0, 1, 0, 0] += 3.0
  assert abs(float(fwd(batch._replace(moments=inside), key)) - ref) > 1e-5


def test_canvas_rewards_are_each_images_own_map(tiny_cfg):
  """Per slot, the reward is the sample's map built at its own size (boxes clamped to it, as SRUM's dataset
  builds it) resized to its own latent grid: what SRUM's loss interpolates per image."""
  from srum_jax.rewards import resize_reward_map, reward_map

  grids = [(2, 3), (4, 2)]
  batch = _canvas_batch(tiny_cfg, grids)
  d = tiny_cfg.latent_downsample
  canvas = (H // d, W // d)
  got = objective.gather_tokens(objective.per_token_rewards(batch.rewards, image_hw=(H, W), latent_hw=canvas),
                                batch.latent_src)
  r = batch.rewards
  want = []
  for s, (gh, gw) in enumerate(grids):
    m = reward_map(r.boxes[:, s], r.scores[:, s], r.valid[:, s], r.global_scores[:, s], height=gh * d, width=gw * d)
    want.append(np.asarray(resize_reward_map(m, gh, gw)).reshape(-1))
  want = np.concatenate(want)
  np.testing.assert_allclose(np.asarray(got)[0, :want.size], want, rtol=0, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(got)[0, want.size:], 0.0)
