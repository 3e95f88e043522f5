"""The jitted SRUM objective sharded over 8 simulated devices equals the single-device result."""
import functools

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from srum_jax import sharding
from srum_jax.rewards import resize_reward_map, reward_map
from srum_jax.training import objective


def _batch(B=8, K=4, H=32, W=24, h=4, w=3, C=16, seed=0):
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-6, W + 6, (B, K))
  y0 = rng.uniform(-6, H + 6, (B, K))
  boxes = np.stack([x0, y0, x0 + rng.uniform(-4, 20, (B, K)), y0 + rng.uniform(-4, 20, (B, K))], -1)
  r = objective.RegionRewards(boxes.astype(np.float32), rng.uniform(-1, 1, (B, K)).astype(np.float32),
                              rng.uniform(size=(B, K)) < 0.8, rng.uniform(-1, 1, B).astype(np.float32))
  toks = [rng.normal(size=(B, h * w, C)).astype(np.float32) for _ in range(4)]
  mask = rng.uniform(size=(B, h * w)) < 0.9
  return r, toks, mask


def _numpy_reference(r, toks, mask, H, W, h, w, lam):
  """Independent statement: maps via the reward_map/resize primitives per image, then the loss in NumPy."""
  v, eps, xb, xg = (np.asarray(t, np.float64) for t in toks)
  R = np.stack([np.asarray(resize_reward_map(reward_map(r.boxes[i:i + 1], r.scores[i:i + 1], r.valid[i:i + 1],
                                                        r.global_scores[i:i + 1], height=H, width=W), h, w))
                .reshape(-1) for i in range(len(mask))])
  m = mask[..., None].astype(np.float64)
  n = m.sum() * v.shape[-1]
  lr = (R[..., None] * (v - (eps - xb)) ** 2 * m).sum() / n
  lc = ((v - (eps - xg)) ** 2 * m).sum() / n
  return lr + lam * lc


def test_sharded_objective_equals_single_device():
  H, W, h, w, lam = 32, 24, 4, 3, 0.5
  r, toks, mask = _batch()
  fn = functools.partial(objective.srum_objective, image_hw=(H, W), latent_hw=(h, w), lambda_constraint=lam)
  single = jax.jit(fn)(r, *toks, mask)
  jax.block_until_ready(single)

  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  assert mesh.devices.size == 8
  bs = lambda x: sharding.batch_sharding(mesh, np.ndim(x))
  args = jax.tree.map(lambda x: jax.device_put(x, bs(x)), (r, *toks, mask))
  assert args[1].sharding.spec == P(("data", "fsdp"), None, None)
  sharded = jax.jit(fn, in_shardings=jax.tree.map(lambda a: a.sharding, args),
                    out_shardings=sharding.replicated(mesh))(*args)
  jax.block_until_ready(sharded)
  np.testing.assert_allclose(float(sharded[0]), float(single[0]), rtol=1e-6)
  for k in single[1]:
    np.testing.assert_allclose(float(sharded[1][k]), float(single[1][k]), rtol=1e-6)
  np.testing.assert_allclose(float(single[0]), _numpy_reference(r, toks, mask, H, W, h, w, lam), rtol=1e-5)


def test_ablation_levers_change_the_rewards():
  r, _, _ = _batch(B=2)
  full = objective.per_token_rewards(r, image_hw=(32, 24), latent_hw=(4, 3))
  no_local = objective.per_token_rewards(r, image_hw=(32, 24), latent_hw=(4, 3),
                                        levers=objective.RewardLevers(use_local=False))
  no_global = objective.per_token_rewards(r, image_hw=(32, 24), latent_hw=(4, 3),
                                         levers=objective.RewardLevers(use_global=False))
  uniform = objective.per_token_rewards(r, image_hw=(32, 24), latent_hw=(4, 3),
                                       levers=objective.RewardLevers(uniform=True))
  g = (np.asarray(r.global_scores) + 1) / 2
  np.testing.assert_allclose(np.asarray(no_local), np.broadcast_to(0.5 * g[:, None], (2, 12)), rtol=1e-6)
  assert np.all(np.asarray(no_global) >= 0.5 - 1e-6)
  assert not np.allclose(np.asarray(full), np.asarray(no_local))
  np.testing.assert_array_equal(np.asarray(uniform), np.ones((2, 12), np.float32))
  # the pictures' maps are the loss's maps before the resize to the latent grid
  maps = objective.reward_maps(r, image_hw=(32, 24))
  np.testing.assert_allclose(np.asarray(resize_reward_map(maps, 4, 3)).reshape(2, 12), np.asarray(full), rtol=1e-6)
  two = jax.tree.map(lambda a: np.stack([a, a], 1), r)  # leading dims [B, S]: S images per row, in order
  np.testing.assert_allclose(np.asarray(objective.per_token_rewards(two, image_hw=(32, 24), latent_hw=(4, 3))),
                             np.concatenate([np.asarray(full)] * 2, 1), rtol=1e-6)


def test_mesh_construction_errors():
  import pytest
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh({"data": 3, "fsdp": 2})
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.make_mesh({"pipeline": 2})
  m = sharding.make_mesh({"data": -1, "tensor": 2})
  assert dict(m.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  spec = sharding.logical_to_mesh_spec(("batch", "embed", "mlp"))
  assert spec == P(("data", "fsdp"), None, "tensor")  # fsdp already used by batch
