"""LoRA in the stages (issue 33): adapters-only model dirs over a recorded base, the train stage
with a frozen bf16 base and fp32 adapters (checkpoints of the adapters alone, bit-exact resume),
`run` chaining rounds, and `export --adapters merge|separate` on what the stages write.

The fast tests work on model dirs of the golden tiny model; the trainings are in the slow tier.
"""
import json
import os
import shutil
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from srum_jax import config_utils, config_validation, defaults, files, sharding
from srum_jax.config_validation import model_keys
from srum_jax.convert import adapters as adapters_io, checkpoint, flax_to_hf, hf_to_flax
from srum_jax.engine import loaded_model
from srum_jax.errors import UserError
from srum_jax.models import bagel, lora as lora_lib, params as params_lib
from srum_jax.models.bagel import ImageTokens
from srum_jax.models.config import LoraConfig, with_lora
from srum_jax.pipeline import provenance, run, train as train_stage
from srum_jax.training import preemption

LORA = LoraConfig(rank=4, alpha=8.0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _adapters(cfg, seed=1, b_scale=0.1):
  """NumPy adapters for `cfg` with B = b_scale * N(0, 1) (a trained-looking, non-zero update)."""
  ad = lora_lib.init_adapters(cfg, jax.random.key(seed))
  leaves, tree = jax.tree_util.tree_flatten_with_path(ad)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [
      np.asarray(x + b_scale * jax.random.normal(k, x.shape) if p[-1].key == "lora_b" else x)
      for (p, x), k in zip(leaves, keys)])


def _leaves(tree):
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def _assert_trees_equal(a, b):
  a, b = _leaves(a), _leaves(b)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _adapter_part(tree):
  return lora_lib.split_adapters(jax.device_get(tree))[1]


def _dtypes(tree):
  """{is an adapter: dtype names} over a parameter tree."""
  out = {}
  for p, x in jax.tree_util.tree_leaves_with_path(tree):
    out.setdefault(params_lib.is_adapter_path(p), set()).add(str(x.dtype))
  return out


def _stored(orbax_dir):
  """[(path, shape)] of the leaves an orbax tree on disk holds (its metadata: nothing is read)."""
  with ocp.PyTreeCheckpointer() as ckpt:
    tree = ckpt.metadata(str(orbax_dir)).item_metadata.tree
  return [(p, tuple(m.shape)) for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _only_adapters_stored(orbax_dir) -> bool:
  paths = [p for p, _ in _stored(orbax_dir)]
  return bool(paths) and all(params_lib.is_adapter_path(p) for p in paths)


def _params_size(model_dir) -> int:
  return files.dir_size(os.path.join(str(model_dir), "params"))


# ------------------------------------------------------------------------------------------------
# Adapters-only model dirs


def test_adapter_dir_records_its_base_and_loads_base_plus_adapters(tiny_cfg, tiny_params,
                                                                    tiny_model_dir, tmp_path):
  """What LoRA training writes: the adapters alone (no base weight in its params/) and the base's
  record; loading gives the base's parameters with the adapters attached, in the dtypes asked
  for."""
  base = str(shutil.copytree(tiny_model_dir, tmp_path / "base"))
  cfg = with_lora(tiny_cfg, LORA)
  full = lora_lib.attach_adapters(jax.tree.map(np.asarray, tiny_params), _adapters(cfg))
  out = checkpoint.write_trained_dir(str(tmp_path / "trained"), cfg, full, base)
  record = json.loads((tmp_path / "trained" / checkpoint.BASE_FILE).read_text())
  assert record["path"] == base and record["identity"] == checkpoint.base_identity(base)
  assert (tmp_path / "trained" / "tokenizer.json").is_file()  # the source's files go along
  assert _only_adapters_stored(tmp_path / "trained" / "params")
  assert _params_size(out) < _params_size(base) / 4
  got_cfg, got = checkpoint.load_model_dir(out)
  assert got_cfg == cfg
  _assert_trees_equal(got, full)
  _, got = checkpoint.load_model_dir(out, dtype="bfloat16", adapter_dtype="float32")
  assert _dtypes(got) == {True: {"float32"}, False: {"bfloat16"}}
  # the inference loader and the config checks take it as any model dir
  model = loaded_model.load_model(out)
  assert model.cfg == cfg and lora_lib.has_adapters(model.params)
  model_keys.check_converted_dir(out, "model.dir")
  # trained again from the adapters-only dir: the new dir points at the same base (no chains)
  again = checkpoint.write_trained_dir(str(tmp_path / "again"), cfg, full, out)
  assert json.loads((tmp_path / "again" / checkpoint.BASE_FILE).read_text())["path"] == base
  assert checkpoint.base_of(again) == checkpoint.base_of(out) == checkpoint.base_of(base) == base
  # without adapters (a full fine-tune) the trained model is a full dir
  plain = checkpoint.write_trained_dir(str(tmp_path / "plain"), tiny_cfg, tiny_params, out)
  assert checkpoint.read_base_record(plain) is None and checkpoint.load_config(plain) == tiny_cfg


def test_adapter_dir_finds_a_moved_base_and_refuses_a_changed_one(tiny_cfg, tiny_params,
                                                                  tiny_model_dir, tmp_path):
  """A workdir moved as a whole still loads (the base's relative path); a base saved again (or
  gone) is a user error naming it, before any parameter is read."""
  work = tmp_path / "work"
  base = str(shutil.copytree(tiny_model_dir, work / "converted_model"))
  cfg = with_lora(tiny_cfg, LORA)
  full = lora_lib.attach_adapters(jax.tree.map(np.asarray, tiny_params), _adapters(cfg))
  checkpoint.write_trained_dir(str(work / "round_0" / "model"), cfg, full, base)
  shutil.move(str(work), str(tmp_path / "moved"))
  moved = str(tmp_path / "moved" / "round_0" / "model")
  assert checkpoint.resolve_base(moved) == str(tmp_path / "moved" / "converted_model")
  _assert_trees_equal(checkpoint.load_model_dir(moved)[1], full)
  # the base saved again: another model for all the adapters know
  checkpoint.save_model_dir(str(tmp_path / "moved" / "converted_model"), tiny_cfg, tiny_params)
  with pytest.raises(UserError, match="saved again"):
    checkpoint.load_model_dir(moved)
  with pytest.raises(UserError, match="base model"):
    model_keys.check_converted_dir(moved, "model.dir")


def test_export_merges_or_separates_an_adapter_dir(tiny_cfg, tiny_params, tiny_model_dir,
                                                   tmp_path):
  """`python -m srum_jax export` on an adapters-only dir: merged, the official kernels are
  W + A B alpha / r (fp32 files: what `merge_adapters` gives); separate, the base's official files
  plus PEFT's adapter files."""
  cfg = with_lora(tiny_cfg, LORA)
  ad = _adapters(cfg)
  full = lora_lib.attach_adapters(jax.tree.map(np.asarray, tiny_params), ad)
  src = checkpoint.write_trained_dir(str(tmp_path / "trained"), cfg, full, tiny_model_dir)
  merged = str(tmp_path / "merged")
  assert flax_to_hf.main(["--src", src, "--dst", merged, "--adapters", "merge"]) == 0
  got_cfg, got = hf_to_flax.load_official(merged, dtype="fp32")
  assert got_cfg.llm.lora is None
  want, got = _leaves(lora_lib.merge_adapters(full, cfg.llm.lora)), _leaves(got)
  assert sorted(got) == sorted(want)
  for k in want:  # the exporter folds one layer at a time: fp32 matmuls of another shape
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
  sep = str(tmp_path / "sep")
  assert flax_to_hf.main(["--src", src, "--dst", sep, "--adapters", "separate"]) == 0
  lora, read = adapters_io.read_adapters(sep, tiny_cfg)
  assert lora == LORA
  _assert_trees_equal(read, ad)
  _assert_trees_equal(hf_to_flax.load_official(sep, dtype="fp32")[1], tiny_params)


def test_for_training_adds_keeps_or_merges_adapters(tiny_cfg, tiny_params):
  key = jax.random.key(0)
  cfg, params = lora_lib.for_training(tiny_cfg, tiny_params, LORA, key)  # fresh: B = 0
  assert cfg.llm.lora == LORA
  assert all(not np.any(np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(params)
             if p[-1].key == "lora_b")
  trained = lora_lib.attach_adapters(tiny_params, _adapters(cfg))
  again_cfg, again = lora_lib.for_training(cfg, trained, LoraConfig(4, 8.0, dropout=0.1), key)
  assert again_cfg.llm.lora.dropout == 0.1 and again is trained  # its own adapters train on
  reordered = LoraConfig(4, 8.0, targets=tuple(reversed(LORA.targets)))
  assert lora_lib.for_training(cfg, trained, reordered, key)[1] is trained
  with pytest.raises(ValueError, match="not the"):
    lora_lib.for_training(cfg, trained, LoraConfig(rank=8, alpha=8.0), key)
  full_cfg, merged = lora_lib.for_training(cfg, trained, None, key)  # full fine-tune: merged
  assert full_cfg == tiny_cfg
  _assert_trees_equal(merged, lora_lib.merge_adapters(trained, LORA))
  assert lora_lib.for_training(tiny_cfg, tiny_params, None, key) == (tiny_cfg, tiny_params)


def test_a_lora_training_is_another_train_unit():
  """The train stage's fingerprint (the trained model's identity) names the LoRA settings when they
  are on, so a workdir trained with other adapters (or none) is stale; off, they change nothing."""
  cfg = defaults.base_config()

  def print_of(c):
    return provenance.train_unit(c, "unused", model="m", records={"rewards": "r"},
                                 objective="srum").fingerprint
  full = print_of(cfg)
  cfg.model.lora.alpha = 3.0
  assert print_of(cfg) == full  # rank 0: no adapters, the settings are unused
  cfg.model.lora.rank = 4
  lora4 = print_of(cfg)
  cfg.model.lora.rank = 8
  assert len({full, lora4, print_of(cfg)}) == 3

# ------------------------------------------------------------------------------------------------
# The train stage with LoRA (slow: several trainings)

STEPS = 4


class WordTokenizer:
  def encode(self, text):
    return [zlib.crc32(w.encode()) % 100 for w in text.split()]


def _records(root):
  img = root / "images"
  img.mkdir(parents=True)
  rng = np.random.default_rng(0)
  lines = []
  for i in range(4):
    pixels = rng.integers(0, 256, (32, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(img / f"img_{i}.png")
    lines.append(json.dumps({
        "schema_version": 1, "image_file": f"img_{i}.png",
        "prompt": f"a red cube {i} left of a ball",
        "global_score": float(rng.uniform(-1, 1)),
        "regions": [{"box": [2, 3, 14, 20], "score": float(rng.uniform(-1, 1))}]}))
  (root / "records.jsonl").write_text("\n".join(lines) + "\n")
  return str(root / "records.jsonl"), str(img)


def _train_config(steps=STEPS):
  """The train stage at the golden tiny model's size: a bf16 frozen base, fp32 adapters, an EMA."""
  c = defaults.base_config()
  c.seed = 0
  c.model.compute_dtype = "float32"
  c.model.param_dtype = "bfloat16"
  c.model.lora.update(dict(rank=LORA.rank, alpha=LORA.alpha, dtype="float32"))
  t = c.train
  t.steps, t.batch_size, t.samples_per_row = steps, 2, 1
  t.image_hw, t.num_tokens, t.text_capacity, t.max_regions = (32, 24), 24, 12, 3
  t.image_resize = "fixed"  # the records' one image size
  t.lr, t.warmup_steps, t.ema_decay = 1e-2, 1, 0.5
  t.save_every, t.keep_checkpoints, t.log_every, t.sample_every = 2, 3, 1, 0
  t.data_threads = 1
  return c


def _train(config, model_dir, records, images, workdir, stop_after=None):
  """The train stage on 2 devices from `model_dir` (base in bf16, adapters in fp32); `stop_after`:
  raise the stop flag after that step (the loop saves there and returns preempted)."""
  cfg, params = checkpoint.load_model_dir(model_dir, dtype=config.model.param_dtype,
                                          adapter_dtype=config.model.lora.dtype)
  flag = preemption.PreemptionFlag(signals=())
  hook = None if stop_after is None else (lambda step: flag.set() if step == stop_after else None)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
  return train_stage.train(config, cfg=cfg, params=params, tokenizer=WordTokenizer(),
                           records_path=records, images_root=images, workdir=str(workdir),
                           mesh=mesh, step_hook=hook, stop=flag)


@pytest.fixture(scope="module")
def trainings(tmp_path_factory, tiny_model_dir):
  """A: 4 steps uninterrupted; B: stopped after step 2, then resumed to 4; C: 2 more steps from
  A's adapters-only model dir (a second round)."""
  root = tmp_path_factory.mktemp("lora_train")
  records, images = _records(root)
  a = _train(_train_config(), tiny_model_dir, records, images, root / "a")
  a_dir = checkpoint.write_trained_dir(str(root / "a" / "model"), a["cfg"], a["params"],
                                       tiny_model_dir)
  b_stopped = _train(_train_config(), tiny_model_dir, records, images, root / "b", stop_after=2)
  b = _train(_train_config(), tiny_model_dir, records, images, root / "b")
  c = _train(_train_config(steps=2), a_dir, records, images, root / "c")
  return dict(root=root, a=a, a_dir=a_dir, b_stopped=b_stopped, b=b, c=c)


@pytest.mark.slow
def test_lora_training_moves_only_fp32_adapters_over_a_bf16_base(trainings, tiny_params):
  a = trainings["a"]
  assert a["steps"] == STEPS and a["compiles"] == 1 and np.isfinite(a["final_loss"])
  assert a["cfg"].llm.lora == LORA
  state = a["state"]
  assert _dtypes(state.params) == {True: {"float32"}, False: {"bfloat16"}}
  base = lora_lib.split_adapters(jax.device_get(state.params))[0]
  _assert_trees_equal(base, jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)),
                                         tiny_params))
  assert any(np.any(x) for p, x in jax.tree_util.tree_leaves_with_path(_adapter_part(state.params))
             if p[-1].key == "lora_b")
  # the EMA (the summary's params) tracks the adapters alone; the base passes through
  ema_paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(state.ema)]
  assert all(params_lib.is_adapter_path(p) for p in ema_paths)
  _assert_trees_equal(_adapter_part(a["params"]), _adapter_part(state.ema))


@pytest.mark.slow
def test_lora_checkpoints_hold_the_adapters_alone(trainings, tiny_model_dir):
  """Every checkpoint holds the adapters, their Adam moments and EMA, no base weight: a small
  fraction of the model's size."""
  ckpts = trainings["root"] / "a" / "checkpoints"
  assert sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) == [2, 4]
  stored = _stored(ckpts / "4" / "state")
  params = [p for p, _ in stored if p[0].key == "params"]
  assert params and all(params_lib.is_adapter_path(p) for p in params)
  assert any(p[0].key == "key" for p, _ in stored)  # the RNG key: a bit-exact resume needs it
  tensors = [p for p, shape in stored if shape and p[0].key != "key"]  # all but counters and key
  assert [p for p in tensors if not params_lib.is_adapter_path(p)] == []
  assert len(tensors) == 4 * len(params)  # the adapters, Adam's two moments, the EMA
  # the arrays' bytes (orbax's data files; its tree metadata lists every frozen leaf by name)
  data = sum(f.stat().st_size for f in (ckpts / "4").rglob("*") if f.is_file() and f.parent.name == "d")
  assert 0 < data < _params_size(tiny_model_dir) / 4


@pytest.mark.slow
def test_lora_resume_reproduces_the_uninterrupted_training(trainings):
  b_stopped, a, b = trainings["b_stopped"], trainings["a"], trainings["b"]
  assert b_stopped["preempted"] and b_stopped["steps"] == 2
  assert b["resumed_from"] == 2 and b["steps"] == STEPS and not b["preempted"]
  _assert_trees_equal(b["state"], a["state"])  # bit-exact, the optimizer state included
  assert b["final_loss"] == a["final_loss"]


@pytest.mark.slow
def test_a_second_round_trains_the_adapters_further(trainings, tiny_model_dir):
  """From an adapters-only dir the train stage goes on with its adapters (not fresh ones) over the
  same base, and what it writes points at the first round's base."""
  a, c, a_dir = trainings["a"], trainings["c"], trainings["a_dir"]
  loaded_cfg, loaded = checkpoint.load_model_dir(a_dir)
  a_ad = _adapter_part(loaded)
  _assert_trees_equal(a_ad, _adapter_part(a["params"]))
  assert c["steps"] == 2 and c["cfg"] == loaded_cfg
  c_dir = checkpoint.write_trained_dir(str(trainings["root"] / "c" / "model"), c["cfg"],
                                       c["params"], a_dir)
  assert checkpoint.resolve_base(c_dir) == tiny_model_dir
  # two steps from round 1's adapters end near them, far from where round 1 started
  key = jax.random.fold_in(jax.random.key(0), train_stage.ADAPTER_INIT_STREAM)
  fresh = lora_lib.init_adapters(loaded_cfg, key)
  c_ad = _adapter_part(c["params"])

  def dist(x, y):
    return sum(float(np.abs(np.asarray(u) - np.asarray(v)).sum())
               for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
  assert dist(c_ad, a_ad) < dist(c_ad, fresh)


def _velocities(params, cfg, seed=5):
  """The generation path's velocities of two T2I rows (text, then a 2x3 noisy latent image)."""
  rng = np.random.default_rng(seed)
  rows = [[[[cfg.tokens.bos] + list(rng.integers(0, 100, 3 + b)) + [cfg.tokens.eos],
            ImageTokens("vae_noise", (2, 3), raw_t=0.3,
                        x_bad=rng.normal(size=(6, cfg.patch_latent_dim)).astype(np.float32))]]
          for b in range(2)]
  inputs, slots = bagel.build_packed_inputs(cfg, rows, num_tokens=20, text_capacity=10,
                                            latent_capacity=6)
  t = jnp.asarray(rng.uniform(0.1, 0.9, slots.raw_t.shape), jnp.float32)
  v = bagel.forward_gen(params["bagel"], inputs, jnp.asarray(slots.x_bad), t, cfg=cfg)
  return np.asarray(v)


@pytest.mark.slow
def test_resumed_adapters_save_load_merge_and_load_back(trainings, tiny_model_dir, tiny_params):
  """The whole life of trained adapters in the stage path: the resumed training's adapters are
  saved as an adapters-only dir, load back exactly (training's dtypes and the stored ones), and
  export merged (official files: the same velocities as base + adapters, fp32 to 1e-4 of their
  scale) or separate (PEFT files holding exactly those adapters)."""
  b, root = trainings["b"], trainings["root"]
  b_dir = checkpoint.write_trained_dir(str(root / "b" / "model"), b["cfg"], b["params"],
                                       tiny_model_dir)
  assert _only_adapters_stored(root / "b" / "model" / "params")
  _assert_trees_equal(checkpoint.load_model_dir(b_dir, dtype="bfloat16",
                                                adapter_dtype="float32")[1], b["params"])
  model = loaded_model.load_model(b_dir)  # the inference loader: fp32 base + fp32 adapters
  assert model.cfg == b["cfg"] and model.cfg.llm.lora == LORA
  _assert_trees_equal(_adapter_part(model.params), _adapter_part(b["params"]))
  want = _velocities(model.params, model.cfg)
  scale = np.abs(want).max()
  base_v = _velocities(jax.tree.map(jnp.asarray, tiny_params), with_lora(model.cfg, None))
  assert np.abs(want - base_v).max() > 1e-3 * scale  # the trained adapters change the model
  merged = str(root / "b" / "merged")
  assert flax_to_hf.main(["--src", b_dir, "--dst", merged, "--adapters", "merge"]) == 0
  got_cfg, got = hf_to_flax.load_official(merged, dtype="fp32")
  assert got_cfg == with_lora(model.cfg, None) and not lora_lib.has_adapters(got)
  np.testing.assert_allclose(_velocities(got, got_cfg), want, atol=1e-4 * scale)
  sep = str(root / "b" / "separate")
  assert flax_to_hf.main(["--src", b_dir, "--dst", sep, "--adapters", "separate"]) == 0
  lora, read = adapters_io.read_adapters(sep, got_cfg)
  assert lora == LORA
  _assert_trees_equal(read, _adapter_part(b["params"]))

# ------------------------------------------------------------------------------------------------
# `run` with LoRA: rounds chained, evals and the SFT control on base + adapters


@pytest.mark.slow
def test_run_with_lora_chains_rounds_over_one_base(tiny_model_dir, tmp_path):
  cfg = config_utils.load_config(os.path.join(ROOT, "experiments/tiny_pipeline.py"), {
      "model.dir": tiny_model_dir, "workdir": str(tmp_path), "run.rounds": 2,
      "model.lora.rank": 4, "model.lora.alpha": 8.0, "train.lr": 1e-2})
  config_validation.validate(cfg, "run")
  report = run.run(cfg)
  assert list(report["tables"]) == ["base", "sft", "srum_r2"]
  for d in ("round_0/model", "round_1/model", "sft_model"):
    assert checkpoint.resolve_base(str(tmp_path / d)) == tiny_model_dir, d
    assert _only_adapters_stored(tmp_path / d / "params"), d
  # round 1 trains round 0's adapters further (the model it loads for training holds them)
  _, r0 = checkpoint.load_model_dir(str(tmp_path / "round_0/model"))
  _, start, _ = train_stage.default_load_model(cfg, str(tmp_path / "round_0/model"))
  _assert_trees_equal(_adapter_part(start), _adapter_part(r0))
  _, r1 = checkpoint.load_model_dir(str(tmp_path / "round_1/model"))
  b0, b1 = (t["bagel"]["llm"]["layers"]["gen"]["q_proj"]["lora_b"] for t in (r0, r1))
  assert np.any(np.asarray(b0)) and not np.array_equal(np.asarray(b0), np.asarray(b1))
  assert report["rounds"][1]["train"]["steps"] == cfg.train.steps
