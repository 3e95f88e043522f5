"""LoRA adapters (issue 33): declared by the schema, applied in PEFT's order, exact no-ops when B = 0, folded
into official files within bf16 rounding, trained alone (no gradients, moments or EMA for the frozen base),
sharded like their kernels, and written / read in PEFT's layout.

Tolerances: fp32 formula checks 1e-5 relative; fp32 merged vs adapters forward 1e-4 (one fp32 rounding of
W + A B per weight); a bf16 merged export 3e-2 of the velocities' scale (bf16 keeps 8 mantissa bits).
"""
import dataclasses
import json

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from srum_jax import config_validation, defaults, sharding
from srum_jax.config_validation import model_keys
from srum_jax.convert import adapters as adapters_io, checkpoint, flax_to_hf, hf_to_flax, keymap
from srum_jax.errors import UserValueError
from srum_jax.models import bagel, layers, lora as lora_lib, params as params_lib
from srum_jax.models.bagel import ImageTokens
from srum_jax.models.config import LoraConfig, with_lora
from srum_jax.training import checkpointing, objective, optimizer, train_step as ts, update

GEN = LoraConfig(rank=4, alpha=8.0, dropout=0.1)
BOTH = LoraConfig(rank=3, alpha=3.0, dropout=0.0, experts=("gen", "und"))


def _adapters(cfg, seed=1, b_scale=0.0):
  """Adapters for `cfg` (its LoRA); B = b_scale * N(0, 1) (0: the fresh adapters of the schema)."""
  ad = lora_lib.init_adapters(cfg, jax.random.key(seed))
  if b_scale:
    leaves, tree = jax.tree_util.tree_flatten_with_path(ad)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    ad = jax.tree.unflatten(tree, [x + b_scale * jax.random.normal(k, x.shape) if p[-1].key == "lora_b" else x
                                   for (p, x), k in zip(leaves, keys)])
  return ad


def _with(params, ad):
  return lora_lib.attach_adapters(params, ad)


def _gen_inputs(cfg, seed=0, B=2):
  """B T2I rows (text then a 2x3 noisy latent image) and their noised latents / times."""
  rng = np.random.default_rng(seed)
  rows = [[[[cfg.tokens.bos] + list(rng.integers(0, 100, 3 + b % 3)) + [cfg.tokens.eos],
            ImageTokens("vae_noise", (2, 3), x_bad=rng.normal(size=(6, cfg.patch_latent_dim)).astype(np.float32),
                        raw_t=0.3)]] for b in range(B)]
  inputs, slots = bagel.build_packed_inputs(cfg, rows, num_tokens=20, text_capacity=10, latent_capacity=6)
  t = jnp.asarray(rng.uniform(0.1, 0.9, slots.raw_t.shape), jnp.float32)
  return inputs, jnp.asarray(slots.x_bad), t


def _und_inputs(cfg, seed=0):
  """Two rows of a ViT image (2x3 patches) followed by a text split; logits at the text slots."""
  rng = np.random.default_rng(seed)
  rows = [[[ImageTokens("vit", (2, 3), patches=rng.uniform(-1, 1, (6, cfg.vit.patch_dim)).astype(np.float32)),
            [cfg.tokens.bos] + list(rng.integers(0, 100, 4 + b)) + [cfg.tokens.eos]]] for b in range(2)]
  inputs, _ = bagel.build_packed_inputs(cfg, rows, num_tokens=24, text_capacity=12, vit_capacity=8)
  return inputs, inputs.text_index


def _gen(params, cfg, inputs, x_t, t, key=None, dtype=jnp.float32):
  f = jax.jit(lambda p, i, x, tt, k: bagel.forward_gen(p, i, x, tt, cfg=cfg, dtype=dtype, lora_key=k))
  return np.asarray(f(params, inputs, x_t, t, key))


def _und(params, cfg, inputs, index, key=None, dtype=jnp.float32):
  f = jax.jit(lambda p, i, ix, k: bagel.forward_und(p, i, ix, cfg=cfg, dtype=dtype, lora_key=k))
  return np.asarray(f(params, inputs, index, key))


# ----------------------------------------------------------------------------------------------------------
# Schema and forward


def test_schema_declares_adapters_with_shapes_axes_init_and_dtypes(tiny_cfg):
  cfg = with_lora(tiny_cfg, GEN)
  schema = params_lib.bagel_schema(cfg)
  gen, und = schema["llm"]["layers"]["gen"], schema["llm"]["layers"]["und"]
  L, D, r = 2, 64, 4
  assert gen["q_proj"]["lora_a"] == params_lib.ParamSpec((L, D, r), ("layers", "embed", "lora_rank"),
                                                          "kaiming_uniform")
  assert gen["q_proj"]["lora_b"] == params_lib.ParamSpec((L, r, D), ("layers", "lora_rank", "heads"), "zeros")
  assert gen["k_proj"]["lora_b"].shape == (L, r, 2 * 16) and gen["mlp"]["down_proj"]["lora_a"].shape == (L, 128, r)
  assert "lora_a" not in und["q_proj"] and "lora_a" not in und["mlp"]["up_proj"]
  assert len(keymap.adapter_keys(cfg)) == 2 * 7 * L
  assert keymap.bagel_keys(cfg) == keymap.bagel_keys(tiny_cfg)  # adapters have no official key
  both = params_lib.bagel_schema(with_lora(tiny_cfg, BOTH))["llm"]["layers"]
  assert all("lora_a" in both[e]["o_proj"] for e in ("und", "gen"))
  # init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform), B = 0; dtypes: base vs adapters
  p = params_lib.init_params(schema, jax.random.key(0), jnp.bfloat16, jnp.float32)
  a = np.asarray(p["llm"]["layers"]["gen"]["mlp"]["down_proj"]["lora_a"])
  assert a.dtype == np.float32 and np.abs(a).max() <= 1 / np.sqrt(128) and np.abs(a).max() > 0.8 / np.sqrt(128)
  assert not np.any(np.asarray(p["llm"]["layers"]["gen"]["q_proj"]["lora_b"]))
  assert p["llm"]["layers"]["gen"]["q_proj"]["kernel"].dtype == jnp.bfloat16
  abstract = params_lib.abstract_params(schema, jnp.bfloat16, jnp.float32)
  assert abstract["llm"]["layers"]["gen"]["v_proj"]["lora_b"].dtype == jnp.float32
  # the adapters shard like their kernel's in / out dims; the rank axis is replicated
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sh = sharding.schema_shardings(schema, mesh)["llm"]["layers"]["gen"]
  P = jax.sharding.PartitionSpec
  assert sh["q_proj"]["lora_a"].spec == P(None, "fsdp", None)
  assert sh["q_proj"]["lora_b"].spec == P(None, None, "tensor")
  assert sh["mlp"]["down_proj"]["lora_a"].spec == P(None, "tensor", None)


@pytest.mark.parametrize("lora", [GEN, BOTH], ids=["gen", "gen+und"])
def test_zero_b_adapters_leave_both_paths_bit_equal(tiny_cfg, tiny_params, lora):
  """Fresh adapters (B = 0): forward_gen velocities and forward_und logits are bit-equal to the base model's,
  in fp32 and bf16, with and without the training dropout."""
  cfg = with_lora(tiny_cfg, lora)
  base = jax.tree.map(jnp.asarray, tiny_params)
  full = _with(base, _adapters(cfg))
  assert np.any(np.asarray(full["bagel"]["llm"]["layers"]["gen"]["q_proj"]["lora_a"]))
  inputs, x_t, t = _gen_inputs(tiny_cfg)
  uin, uix = _und_inputs(tiny_cfg)
  for dtype in (jnp.float32, jnp.bfloat16):
    v0 = _gen(base["bagel"], tiny_cfg, inputs, x_t, t, dtype=dtype)
    assert np.abs(v0).max() > 0.1
    np.testing.assert_array_equal(_gen(full["bagel"], cfg, inputs, x_t, t, dtype=dtype), v0)
    np.testing.assert_array_equal(_gen(full["bagel"], cfg, inputs, x_t, t, jax.random.key(4), dtype), v0)
    l0 = _und(base["bagel"], tiny_cfg, uin, uix, dtype=dtype)
    np.testing.assert_array_equal(_und(full["bagel"], cfg, uin, uix, dtype=dtype), l0)
    np.testing.assert_array_equal(_und(full["bagel"], cfg, uin, uix, jax.random.key(4), dtype), l0)


def test_lora_dense_is_the_peft_formula():
  """y = x W + b + (dropout(x) A) B * alpha / rank; dropout scales kept inputs by 1 / (1 - rate)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 16)).astype(np.float32)
  p = {"kernel": rng.normal(size=(16, 8)), "bias": rng.normal(size=(8,)), "lora_a": rng.normal(size=(16, 4)),
       "lora_b": rng.normal(size=(4, 8))}
  p = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
  n = {k: np.asarray(v, np.float64) for k, v in p.items()}
  y = np.asarray(layers.dense(p, jnp.asarray(x), layers.LoraRun(scale=0.5)))
  want = x @ n["kernel"] + n["bias"] + (x @ n["lora_a"]) @ n["lora_b"] * 0.5
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  key = jax.random.key(2)
  y = np.asarray(layers.dense(p, jnp.asarray(x), layers.LoraRun(0.5, 0.25, key)))
  keep = np.asarray(jax.random.bernoulli(key, 0.75, x.shape))
  assert 0.6 < keep.mean() < 0.9
  xd = np.where(keep, x / 0.75, 0)
  want = x @ n["kernel"] + n["bias"] + (xd @ n["lora_a"]) @ n["lora_b"] * 0.5
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="LoraRun"):
    layers.dense(p, jnp.asarray(x))


def test_merged_weights_compute_base_plus_adapters(tiny_cfg, tiny_params):
  """`merge_adapters` (W + A B alpha / rank, adapters dropped) gives the forward of the unmerged model; trained
  (non-zero) adapters do change the model."""
  cfg = with_lora(tiny_cfg, BOTH)
  full = _with(jax.tree.map(jnp.asarray, tiny_params), _adapters(cfg, b_scale=0.2))
  merged = lora_lib.merge_adapters(full, cfg.llm.lora)
  assert not lora_lib.has_adapters(merged) and lora_lib.has_adapters(full)
  k = full["bagel"]["llm"]["layers"]["gen"]["mlp"]["up_proj"]
  np.testing.assert_allclose(merged["bagel"]["llm"]["layers"]["gen"]["mlp"]["up_proj"]["kernel"],
                             np.asarray(k["kernel"]) + np.einsum("lir,lro->lio", k["lora_a"], k["lora_b"]) * 1.0,
                             rtol=1e-5, atol=1e-6)
  inputs, x_t, t = _gen_inputs(tiny_cfg, seed=3)
  v = _gen(full["bagel"], cfg, inputs, x_t, t)
  np.testing.assert_allclose(_gen(merged["bagel"], tiny_cfg, inputs, x_t, t), v, rtol=1e-4,
                             atol=1e-4 * np.abs(v).max())
  assert np.abs(v - _gen(tiny_params["bagel"], tiny_cfg, inputs, x_t, t)).max() > 1e-2 * np.abs(v).max()
  base, ad = lora_lib.split_adapters(full)
  assert not lora_lib.has_adapters(base) and jax.tree.structure(ad) == jax.tree.structure(_adapters(cfg))
  for a, b in zip(jax.tree.leaves(lora_lib.attach_adapters(base, ad)), jax.tree.leaves(full)):
    assert a is b


def test_sharded_lora_forward_equals_single_device(tiny_cfg, tiny_params):
  """Base and adapters on their schema shardings over 8 devices (data 2, fsdp 2, tensor 2): the same
  velocities as on one device."""
  cfg = with_lora(tiny_cfg, BOTH)
  full = _with(jax.tree.map(jnp.asarray, tiny_params), _adapters(cfg, b_scale=0.2))
  inputs, x_t, t = _gen_inputs(tiny_cfg, seed=5, B=4)
  single = _gen(full["bagel"], cfg, inputs, x_t, t)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sh = sharding.schema_shardings(params_lib.model_schema(cfg), mesh)
  placed = jax.device_put(full, sh)
  assert placed["bagel"]["llm"]["layers"]["gen"]["q_proj"]["lora_a"].sharding.spec[1] == "fsdp"
  rows = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, np.ndim(x)))  # noqa: E731
  f = jax.jit(sharding.under_mesh(lambda p, i, x, tt: bagel.forward_gen(p, i, x, tt, cfg=cfg), mesh))
  got = f(placed["bagel"], jax.tree.map(rows, inputs), rows(x_t), rows(t))
  np.testing.assert_allclose(np.asarray(jax.block_until_ready(got)), single, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Training: the adapters alone


def _srum_batch(cfg, B=2, H=32, W=24, seed=0):
  rng = np.random.default_rng(seed)
  ids = [[[cfg.tokens.bos] + list(rng.integers(0, 100, 3 + b)) + [cfg.tokens.eos]] for b in range(B)]
  inputs = ts.t2i_layout(cfg, ids, image_hw=(H, W), num_tokens=12 + 2 + 8 + 2, text_capacity=10)
  K = 2
  boxes = np.tile(np.array([[0, 0, 12, 16], [6, 8, 24, 32]], np.float32), (B, 1, 1, 1))
  rewards = objective.RegionRewards(boxes, rng.uniform(-1, 1, (B, 1, K)).astype(np.float32),
                                    np.ones((B, 1, K), bool), rng.uniform(-1, 1, (B, 1)).astype(np.float32))
  return ts.SrumBatch(inputs=inputs, images=rng.uniform(-1, 1, (B, 1, H, W, 3)).astype(np.float32), rewards=rewards)


def _lora_setup(tiny_cfg, tiny_params, ema_decay=0.0):
  cfg = with_lora(tiny_cfg, GEN)
  params = _with(jax.tree.map(jnp.asarray, tiny_params), _adapters(cfg))
  tcfg = defaults.base_config().train
  tcfg.warmup_steps, tcfg.lr = 1, 1e-2
  labels = optimizer.param_labels(params, tuple(tcfg.freeze), adapters_only=True)
  tx = optimizer.make_optimizer(tcfg, labels)
  opts = ts.StepOptions(image_hw=(32, 24), samples_per_row=1, compute_dtype=jnp.float32, timestep_shift=2.0,
                        ema_decay=ema_decay)
  return cfg, params, labels, tx, opts


def _dot_shapes(jaxpr, out=None):
  """Output shapes of every dot_general in a jaxpr and its sub-jaxprs (scan, remat, pjit bodies)."""
  out = set() if out is None else out
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.add(tuple(eqn.outvars[0].aval.shape))
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        if isinstance(sub, jax_core.ClosedJaxpr):
          _dot_shapes(sub.jaxpr, out)
        elif isinstance(sub, jax_core.Jaxpr):
          _dot_shapes(sub, out)
  return out


def test_train_step_moves_only_the_adapters(tiny_cfg, tiny_params):
  """With every leaf but the adapters frozen: the loss falls, only adapter leaves change, the optimizer keeps
  Adam moments for the adapters alone, the EMA holds the adapters alone, and no weight gradient of a frozen
  kernel is ever computed (no dot_general with a frozen kernel's shape in the step)."""
  cfg, params, labels, tx, opts = _lora_setup(tiny_cfg, tiny_params, ema_decay=0.5)
  n_adapters = params_lib.count_params(lora_lib.split_adapters(params)[1])
  assert {(params_lib.is_adapter_path(p), label) for p, label in jax.tree_util.tree_leaves_with_path(labels)} \
      == {(True, "train"), (False, "frozen")}
  step_fn = ts.make_train_step(cfg, opts, tx, labels)
  state = update.init_state(params, tx, opts.ema_decay, labels)
  assert sum(np.size(x) for x in jax.tree.leaves(state.opt_state)) == 2 * n_adapters + 2  # mu, nu + counts
  assert params_lib.count_params(state.ema) == n_adapters
  batch, key = _srum_batch(tiny_cfg), jax.random.key(0)
  step = jax.jit(step_fn)
  losses = []
  for _ in range(6):
    state, m = step(state, batch, key)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] and int(state.skipped) == 0, losses
  for (path, new), old in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(params)):
    if params_lib.is_adapter_path(path):
      assert path[-1].key == "lora_a" or np.any(np.asarray(new)), path  # B left zero
    else:
      np.testing.assert_array_equal(np.asarray(new), np.asarray(old), err_msg=jax.tree_util.keystr(path))
  kept = update.ema_params(state)  # the EMA for the adapters, the parameters elsewhere
  assert jax.tree.structure(kept) == jax.tree.structure(params)
  gen = lambda tree: tree["bagel"]["llm"]["layers"]["gen"]["q_proj"]  # noqa: E731
  assert gen(kept)["kernel"] is gen(state.params)["kernel"] and gen(kept)["lora_b"] is gen(state.ema)["lora_b"]
  # frozen kernels get no weight gradient: none of their [in, out] shapes is a dot_general output ...
  frozen_shapes = {tuple(x.shape[1:]) for p, x in jax.tree_util.tree_leaves_with_path(params["bagel"]["llm"]["layers"])
                   if p[-1].key == "kernel"}
  assert not _dot_shapes(jax.make_jaxpr(step_fn)(state, batch, key).jaxpr) & frozen_shapes
  # ... while training everything computes them
  every = optimizer.param_labels(params, ())
  tx_all = optimizer.make_optimizer(defaults.base_config().train, every)
  step_all = ts.make_train_step(cfg, opts, tx_all, every)
  assert _dot_shapes(jax.make_jaxpr(step_all)(update.init_state(params, tx_all, 0.0, every), batch, key).jaxpr) \
      & frozen_shapes


def test_sharded_lora_train_step_equals_single_device(tiny_cfg, tiny_params):
  cfg, params, labels, tx, opts = _lora_setup(tiny_cfg, tiny_params, ema_decay=0.5)
  step_fn = ts.make_train_step(cfg, opts, tx, labels)
  batch, key = _srum_batch(tiny_cfg, B=4, seed=2), jax.random.key(7)
  init = lambda p: update.init_state(p, tx, opts.ema_decay, labels)  # noqa: E731
  single, single_m = jax.jit(step_fn)(init(params), batch, key)
  jax.block_until_ready(single)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  state_sh = ts.state_shardings(cfg, jax.eval_shape(init, params), mesh)
  assert state_sh.ema["bagel"]["llm"]["layers"]["gen"]["q_proj"]["lora_a"].spec[1] == "fsdp"
  batch_sh = ts.batch_shardings(batch, mesh)
  step = ts.shard_train_step(step_fn, state_sh, batch_sh, mesh)
  new, m = step(jax.device_put(init(params), state_sh), jax.device_put(batch, batch_sh), key)
  jax.block_until_ready(new)
  np.testing.assert_allclose(float(m["loss"]), float(single_m["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves((new.params, new.ema)), jax.tree.leaves((single.params, single.ema))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_checkpoint_round_trip_of_an_adapters_only_state(tiny_cfg, tiny_params, tmp_path):
  """A training checkpoint of the trainable state alone (adapters, their Adam moments, their EMA; None at the
  frozen leaves) restores, and the frozen base from the model rebuilds the whole state."""
  cfg, params, labels, tx, opts = _lora_setup(tiny_cfg, tiny_params, ema_decay=0.5)
  step = jax.jit(ts.make_train_step(cfg, opts, tx, labels))
  state, _ = step(update.init_state(params, tx, opts.ema_decay, labels), _srum_batch(tiny_cfg), jax.random.key(1))
  part = update.trainable_state(state, labels)
  assert params_lib.count_params(part.params) == params_lib.count_params(lora_lib.split_adapters(params)[1])
  with checkpointing.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=1) as ckpt:
    ckpt.save(1, part, force=True)
  rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(lambda p: update.trainable_state(update.init_state(p, tx, opts.ema_decay, labels),
                                                             labels), params)
  abstract = checkpointing.abstract_with_shardings(abstract, jax.tree.map(lambda _: rep, abstract))
  with checkpointing.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    got = update.with_frozen(ckpt.restore(1, abstract)[0], params, labels)
  assert jax.tree.structure(got) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------------------
# Configs, model directories, export and PEFT files


def test_config_and_model_dir_round_trip_with_adapters(tiny_cfg, tiny_params, tmp_path):
  cfg = with_lora(tiny_cfg, BOTH)
  d = checkpoint.config_to_dict(cfg)
  assert d["llm"]["lora"] == {"rank": 3, "alpha": 3.0, "dropout": 0.0, "targets": list(BOTH.targets),
                              "experts": ["gen", "und"]}
  assert checkpoint.config_from_dict(d) == cfg
  assert checkpoint.config_from_dict(checkpoint.config_to_dict(tiny_cfg)) == tiny_cfg
  full = _with(jax.tree.map(np.asarray, tiny_params), jax.tree.map(np.asarray, _adapters(cfg, b_scale=0.1)))
  checkpoint.save_model_dir(str(tmp_path / "m"), cfg, full)
  got_cfg, got = checkpoint.load_model_dir(str(tmp_path / "m"))
  assert got_cfg == cfg
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(full)):
    np.testing.assert_array_equal(np.asarray(a), b)
  _, got = checkpoint.load_model_dir(str(tmp_path / "m"), dtype="bfloat16", adapter_dtype="float32")
  assert {params_lib.is_adapter_path(p): str(x.dtype) for p, x in jax.tree_util.tree_leaves_with_path(got)} \
      == {True: "float32", False: "bfloat16"}
  # the export command on a model directory with adapters: written apart, in PEFT's files
  assert flax_to_hf.main(["--src", str(tmp_path / "m"), "--dst", str(tmp_path / "out"), "--adapters", "separate"]) == 0
  assert adapters_io.read_adapters(str(tmp_path / "out"), tiny_cfg)[0] == BOTH


def test_merged_export_equals_base_plus_adapters(tiny_cfg, tiny_params, tmp_path):
  """Official files with the adapters folded in, read back by the converter: fp32 files give the unmerged
  model's velocities to 1e-4; bf16 files to bf16 rounding."""
  cfg = with_lora(tiny_cfg, GEN)
  full = _with(jax.tree.map(np.asarray, tiny_params), jax.tree.map(np.asarray, _adapters(cfg, b_scale=0.2)))
  inputs, x_t, t = _gen_inputs(tiny_cfg, seed=7)
  want = _gen(full["bagel"], cfg, inputs, x_t, t)
  scale = np.abs(want).max()
  for dtype, tol in (("fp32", 1e-4), ("bf16", 3e-2)):
    out = tmp_path / dtype
    flax_to_hf.export((cfg, full), str(out), dtype=dtype)  # adapters_mode="merge" is the default
    assert not (out / adapters_io.ADAPTER_WEIGHTS).exists()
    got_cfg, got = hf_to_flax.load_official(str(out), dtype="fp32")
    assert got_cfg.llm.lora is None
    np.testing.assert_allclose(_gen(got["bagel"], got_cfg, inputs, x_t, t), want, atol=tol * scale)
  folded = lora_lib.merge_adapters(full, cfg.llm.lora)  # the bf16 file holds the folded kernels, rounded
  np.testing.assert_allclose(got["bagel"]["llm"]["layers"]["gen"]["q_proj"]["kernel"],
                             folded["bagel"]["llm"]["layers"]["gen"]["q_proj"]["kernel"], rtol=2 ** -8, atol=1e-6)


def test_separate_export_writes_peft_files_and_loads_back(tiny_cfg, tiny_params, tmp_path):
  """`adapters_mode="separate"`: the base official files (byte-equal to exporting the base alone) plus PEFT's
  adapter_model.safetensors / adapter_config.json; `load_with_adapters` rebuilds base + adapters exactly."""
  cfg = with_lora(tiny_cfg, BOTH)
  ad = jax.tree.map(np.asarray, _adapters(cfg, b_scale=0.2))
  full = _with(jax.tree.map(np.asarray, tiny_params), ad)
  flax_to_hf.export((cfg, full), str(tmp_path / "sep"), adapters_mode="separate")
  flax_to_hf.export((tiny_cfg, tiny_params), str(tmp_path / "base"))
  assert (tmp_path / "sep" / "ema.safetensors").read_bytes() == (tmp_path / "base" / "ema.safetensors").read_bytes()
  meta = json.loads((tmp_path / "sep" / adapters_io.ADAPTER_CONFIG).read_text())
  assert (meta["peft_type"], meta["r"], meta["lora_alpha"], meta["bias"]) == ("LORA", 3, 3.0, "none")
  from safetensors.numpy import load_file
  tensors = load_file(str(tmp_path / "sep" / adapters_io.ADAPTER_WEIGHTS))
  key = "base_model.model.language_model.model.layers.1.mlp_moe_gen.gate_proj.lora_A.weight"
  np.testing.assert_array_equal(tensors[key], ad["bagel"]["llm"]["layers"]["gen"]["mlp"]["gate_proj"]["lora_a"][1].T)
  key = "base_model.model.language_model.model.layers.0.self_attn.o_proj.lora_B.weight"  # the und expert's
  np.testing.assert_array_equal(tensors[key], ad["bagel"]["llm"]["layers"]["und"]["o_proj"]["lora_b"][0].T)
  assert len(tensors) == 2 * 2 * 7 * 2
  lora, read = adapters_io.read_adapters(str(tmp_path / "sep"), tiny_cfg)
  assert lora == BOTH
  for a, b in zip(jax.tree.leaves(read), jax.tree.leaves(ad)):
    np.testing.assert_array_equal(a, b)
  got_cfg, got = adapters_io.load_with_adapters(str(tmp_path / "sep"), str(tmp_path / "sep"), dtype="fp32")
  assert got_cfg == cfg
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(full)):
    np.testing.assert_array_equal(np.asarray(a), b)
  with pytest.raises(ValueError, match="does not fit"):
    adapters_io.read_adapters(str(tmp_path / "sep"),
                              tiny_cfg.replace(llm=dataclasses.replace(tiny_cfg.llm, num_hidden_layers=1)))


def test_lora_settings_are_validated():
  def check(**lora):
    c = defaults.base_config()
    c.model.lora.update(lora)
    model_keys._check_remat_lora(c)

  check(rank=0, targets=("nonsense",))  # off: nothing else is read
  check(rank=8, experts=("gen", "und"))
  for bad, why in ((dict(rank=-1), "rank"), (dict(rank=8, alpha=0.0), "alpha"), (dict(rank=8, dropout=1.0), "dropout"),
                   (dict(rank=8, dtype="int8"), "dtype"), (dict(rank=8, targets=("q_proj", "qkv")), "targets"),
                   (dict(rank=8, experts=()), "experts")):
    with pytest.raises(UserValueError, match=f"model\\.lora.*{why}"):
      check(**bad)
  c = defaults.base_config()
  c.model.remat_policy = "save_everything_please"
  with pytest.raises(UserValueError, match="remat_policy"):
    model_keys._check_remat_lora(c)
  c.model.remat_policy = "dots_with_no_batch_dims_saveable"
  model_keys._check_remat_lora(c)
  assert lora_lib.lora_config(ml_collections.ConfigDict(dict(defaults.base_config().model.lora))) is None
  c = defaults.base_config()
  model_keys._lora_stages_pending(c)
  c.model.lora.rank = 8  # the stages refuse LoRA until they load and save adapters
  with pytest.raises(UserValueError, match="do not run LoRA yet"):
    model_keys._lora_stages_pending(c)
  with pytest.raises(ValueError, match="rank"):
    LoraConfig(rank=0)


def test_7b_lora_recipe_state_on_one_device():
  """experiments/bagel_7b_lora.py on one device: the 16 images of an update as 16 microbatches, a bf16 frozen
  base with fp32 adapters, optimizer moments for the ~81M adapter parameters only, and the step traces."""
  from srum_jax import aot, config_utils

  import helpers
  config = config_utils.load_config(str(helpers.ROOT / "experiments/bagel_7b_lora.py"))
  prog = aot.train_step_program(config, jax.devices()[:1])
  info = prog.info
  assert (info["rows"], info["microbatches"], info["mesh"]) == (16, 16, {"data": 1, "fsdp": 1, "tensor": 1})
  assert info["params"] > 14.7e9 and 80e6 < info["trainable"] < 82e6
  state = prog.args[0]
  dtypes = {params_lib.is_adapter_path(p): str(x.dtype) for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
  assert dtypes == {True: "float32", False: "bfloat16"}
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(state.opt_state)) == 2 * info["trainable"] + 2
  assert info["remat"] and info["remat_policy"] == "dots_with_no_batch_dims_saveable"
  assert prog.jitted.lower(*prog.args) is not None
  assert config_utils.load_config(str(helpers.ROOT / "experiments/bagel_7b_lora.py:v6e")).model.remat_policy == ""
