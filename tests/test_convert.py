"""Checkpoint converter: key table vs the 7B shape table, tiny golden round trip, sharding, errors, streaming."""
import json
import os
import shutil
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from srum_jax import sharding
from srum_jax.convert import checkpoint, flax_to_hf, hf_to_flax, keymap
from srum_jax.models import config, params as params_lib
from srum_jax.models.embeddings import sincos_2d_table

from conftest import FIXTURES, GOLDEN

TINY_FLAGS = dict(timestep_shift=2.0, ae_resolution=32, tokens=config.SpecialTokens(120, 121, 122, 123))
VIT_PREFIXES = ("vit_model.", "connector.", "vit_pos_embed.")


def _header(path):
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return n, json.loads(f.read(n))


def _official_dir(tmp_path, weights=None, ae=None, name="ema.safetensors", vit_json=True, sub="official"):
  """A checkpoint dir laid out like the real one, from the tiny golden files (or replacement dicts)."""
  cfg = json.loads((GOLDEN / "config.json").read_text())
  src = tmp_path / sub
  src.mkdir()
  (src / "llm_config.json").write_text(json.dumps(cfg["llm_config"]))
  if vit_json:
    (src / "vit_config.json").write_text(json.dumps(cfg["vit_config_as_in_json"]))
  (src / "tokenizer.json").write_text('{"model": "stand-in"}')
  if weights is None:
    os.symlink(GOLDEN / "weights.safetensors", src / name)
  else:
    save_file(weights, str(src / name))
  if ae is None:
    os.symlink(GOLDEN / "ae.safetensors", src / "ae.safetensors")
  else:
    save_file(ae, str(src / "ae.safetensors"))
  return src


def _bits(x):
  x = np.asarray(x)
  return x.view(np.dtype(f"u{x.dtype.itemsize}"))


# ----------------------------------------------------------------------------------------------
# key table

def test_expected_shapes_equal_7b_table(monkeypatch):
  """Schema-derived official keys/shapes == the table built from the official module tree (1223 + 244)."""
  def no_init(*a, **k):
    raise AssertionError("expected_official_shapes must not initialise weights")
  monkeypatch.setattr(params_lib, "init_params", no_init)
  table = json.loads((FIXTURES / "bagel_7b_state_dict_shapes.json").read_text())
  got = keymap.expected_official_shapes(config.bagel_7b_mot())
  for part, n in (("bagel", 1223), ("ae", 244)):
    want = {k: tuple(v) for k, v in table[part].items()}
    assert len(got[part]) == len(want) == n
    assert got[part] == want
  assert sum(int(np.prod(s)) for s in got["bagel"].values()) == table["bagel_num_params"]
  assert sum(int(np.prod(s)) for s in got["ae"].values()) == table["ae_num_params"]


def test_expected_shapes_without_vit():
  table = json.loads((FIXTURES / "bagel_7b_state_dict_shapes.json").read_text())
  got = keymap.expected_official_shapes(config.bagel_7b_mot().replace(vit=None))
  want = {k: tuple(v) for k, v in table["bagel"].items() if not k.startswith(VIT_PREFIXES)}
  # 26 ViT layers x 16 tensors, patch w/b + position, post_layernorm w/b, connector 4, vit_pos_embed
  assert got["bagel"] == want and len(want) == 1223 - 26 * 16 - 3 - 2 - 4 - 1


def test_keymap_transforms_by_hand():
  """Spot checks written independently of the schema walk (und/gen, layer index, transpose kind)."""
  k = keymap.official_keys(config.tiny())
  b, a = k["bagel"], k["ae"]
  assert b["language_model.model.layers.1.self_attn.q_proj_moe_gen.weight"] == (
      ("llm", "layers", "gen", "q_proj", "kernel"), 1, "linear")
  assert b["language_model.model.layers.0.mlp_moe_gen.down_proj.weight"] == (
      ("llm", "layers", "gen", "mlp", "down_proj", "kernel"), 0, "linear")
  assert b["language_model.model.layers.1.post_attention_layernorm.weight"] == (
      ("llm", "layers", "und", "post_norm", "scale"), 1, "identity")
  assert b["language_model.model.norm_moe_gen.weight"] == (("llm", "norm_gen", "scale"), None, "identity")
  assert b["time_embedder.mlp.2.bias"] == (("time_embedder", "fc2", "bias"), None, "identity")
  assert b["vit_model.vision_model.encoder.layers.1.self_attn.out_proj.weight"] == (
      ("vit", "layers", "out_proj", "kernel"), 1, "linear")
  assert b["vit_model.vision_model.embeddings.patch_embedding.weight"] == (
      ("vit", "patch_embedding", "kernel"), None, "linear")
  assert a["encoder.down.0.block.0.norm1.weight"] == (("encoder", "down", "0", "block", "0", "norm1", "scale"),
                                                      None, "identity")
  assert a["decoder.up.1.upsample.conv.weight"] == (("decoder", "up", "1", "upsample", "conv", "kernel"),
                                                    None, "conv")
  x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # official conv [out, in, kh, kw]
  np.testing.assert_array_equal(keymap.to_flax(x, "conv")[3, 4, 2, 1], x[1, 2, 3, 4])
  np.testing.assert_array_equal(keymap.to_official(keymap.to_flax(x, "conv"), "conv"), x)


def test_config_dict_round_trip():
  for name in config.PRESETS:
    cfg = config.get_preset(name)
    assert checkpoint.config_from_dict(json.loads(json.dumps(checkpoint.config_to_dict(cfg)))) == cfg
  with pytest.raises(ValueError, match="bogus"):
    checkpoint.config_from_dict({"bogus": 1})


# ----------------------------------------------------------------------------------------------
# tiny golden checkpoint

def test_tiny_round_trip_bit_exact(tmp_path, golden_weights, golden_ae_weights):
  """official -> model dir -> official: every key and value bit-exact in fp32; config fully inferred."""
  src = _official_dir(tmp_path)
  cfg, params = hf_to_flax.convert(str(src), str(tmp_path / "model"), dtype="fp32", **TINY_FLAGS)
  assert cfg == config.tiny()  # max_latent_size 8, vit_max_num_patch_per_side 8, AE structure: from shapes
  assert (tmp_path / "model" / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()

  cfg2, loaded = checkpoint.load_model_dir(str(tmp_path / "model"))
  assert cfg2 == cfg
  # values by hand-written correspondences (not through the key table)
  llm, lw = loaded["bagel"]["llm"], golden_weights
  np.testing.assert_array_equal(llm["layers"]["gen"]["q_proj"]["kernel"][1],
                                lw["language_model.model.layers.1.self_attn.q_proj_moe_gen.weight"].T)
  np.testing.assert_array_equal(llm["layers"]["und"]["mlp"]["down_proj"]["kernel"][0],
                                lw["language_model.model.layers.0.mlp.down_proj.weight"].T)
  np.testing.assert_array_equal(llm["layers"]["gen"]["k_norm"]["scale"][1],
                                lw["language_model.model.layers.1.self_attn.k_norm_moe_gen.weight"])
  np.testing.assert_array_equal(llm["embed_tokens"]["embedding"], lw["language_model.model.embed_tokens.weight"])
  np.testing.assert_array_equal(llm["lm_head"]["kernel"], lw["language_model.lm_head.weight"].T)
  np.testing.assert_array_equal(loaded["bagel"]["time_embedder"]["fc1"]["kernel"], lw["time_embedder.mlp.0.weight"].T)
  np.testing.assert_array_equal(loaded["bagel"]["vit"]["patch_embedding"]["kernel"],
                                lw["vit_model.vision_model.embeddings.patch_embedding.weight"].T)
  np.testing.assert_array_equal(loaded["bagel"]["vit"]["layers"]["fc2"]["bias"][1],
                                lw["vit_model.vision_model.encoder.layers.1.mlp.fc2.bias"])
  np.testing.assert_array_equal(loaded["ae"]["decoder"]["conv_in"]["kernel"],
                                golden_ae_weights["decoder.conv_in.weight"].transpose(2, 3, 1, 0))
  assert loaded["bagel"]["llm"]["norm"]["scale"].dtype == np.float32

  out = tmp_path / "exported"
  flax_to_hf.export(str(tmp_path / "model"), str(out))
  for name, ref in (("ema.safetensors", golden_weights), ("ae.safetensors", golden_ae_weights)):
    got = load_file(str(out / name))
    assert sorted(got) == sorted(ref)
    for k in ref:
      assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
      assert np.array_equal(_bits(got[k]), _bits(ref[k])), k
  assert _header(out / "ema.safetensors")[1]["__metadata__"] == {"format": "pt"}
  golden_cfg = json.loads((GOLDEN / "config.json").read_text())
  assert json.loads((out / "llm_config.json").read_text()) == golden_cfg["llm_config"]
  assert json.loads((out / "vit_config.json").read_text()) == golden_cfg["vit_config_as_in_json"]

  # from an in-memory (cfg, params) pair without metadata: the files are byte-identical to the golden ones
  out2 = tmp_path / "exported2"
  flax_to_hf.export((cfg, params), str(out2), metadata=None)
  assert (out2 / "ema.safetensors").read_bytes() == (GOLDEN / "weights.safetensors").read_bytes()
  assert (out2 / "ae.safetensors").read_bytes() == (GOLDEN / "ae.safetensors").read_bytes()
  assert json.loads((out2 / "vit_config.json").read_text()) == golden_cfg["vit_config_as_in_json"]


def test_cli_bf16(tmp_path, golden_weights):
  """`main` converts to bf16 (round-to-nearest-even, as torch does) and exports back; both return 0."""
  src = _official_dir(tmp_path)
  model, out = tmp_path / "model", tmp_path / "out"
  assert hf_to_flax.main(["--src", str(src), "--dst", str(model), "--dtype", "bf16", "--timestep_shift", "2.0",
                          "--ae_resolution", "32", "--bos_token_id", "120", "--eos_token_id", "121",
                          "--start_of_image_id", "122", "--end_of_image_id", "123"]) == 0
  cfg, params = checkpoint.load_model_dir(str(model))
  assert cfg == config.tiny()
  assert all(x.dtype == ml_dtypes.bfloat16 for x in jax.tree.leaves(params))
  assert flax_to_hf.main(["--src", str(model), "--dst", str(out)]) == 0
  got = load_file(str(out / "ema.safetensors"))
  for k, v in golden_weights.items():
    assert got[k].dtype == ml_dtypes.bfloat16
    assert np.array_equal(_bits(got[k]), _bits(v.astype(ml_dtypes.bfloat16))), k
  # restore with a dtype cast
  _, p32 = checkpoint.load_model_dir(str(model), dtype=np.float32)
  assert p32["bagel"]["llm"]["norm"]["scale"].dtype == np.float32


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 8}, {"data": 2, "fsdp": 4}])
def test_sharded_convert(tmp_path, golden_weights, mesh_shape):
  """Converting onto a mesh puts every leaf on its schema sharding with unchanged values."""
  src = _official_dir(tmp_path)
  mesh = sharding.make_mesh(mesh_shape)
  fsdp = mesh_shape["fsdp"]
  cfg, ref = hf_to_flax.load_official(str(src), dtype="fp32", **TINY_FLAGS)
  cfg_s, params = hf_to_flax.convert(str(src), str(tmp_path / "model"), dtype="fp32", mesh=mesh, **TINY_FLAGS)
  schema = params_lib.model_schema(cfg)
  want = sharding.logical_to_sharding(params_lib.logical_axes(schema), mesh, sharding.DEFAULT_RULES,
                                      shapes=params_lib.abstract_params(schema))
  for (path, x), s, r in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want),
                             jax.tree.leaves(ref)):
    assert x.sharding == s, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(r))
  q = params["bagel"]["llm"]["layers"]["und"]["q_proj"]["kernel"]  # [L, embed, heads]: fsdp on embed
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (2, 64 // fsdp, 64)
  assert params["bagel"]["llm"]["norm"]["scale"].sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(q[1]).T,
                                golden_weights["language_model.model.layers.1.self_attn.q_proj.weight"])
  # the saved dir restores onto the same shardings
  _, restored = checkpoint.load_model_dir(str(tmp_path / "model"), mesh=mesh)
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
    assert x.sharding == s


def test_streaming_reads_shard_blocks(tmp_path, monkeypatch):
  """Each callback reads one layer's shard block per official tensor, never a whole (stacked) tensor."""
  src = _official_dir(tmp_path)
  reads = []
  orig = hf_to_flax.SafetensorsReader.read

  def counting_read(self, key, index):
    x = orig(self, key, index)
    reads.append((key, x.nbytes))
    return x

  monkeypatch.setattr(hf_to_flax.SafetensorsReader, "read", counting_read)
  _, params = hf_to_flax.load_official(str(src), dtype="fp32", mesh=sharding.make_mesh({"data": 2, "fsdp": 4}),
                                       **TINY_FLAGS)
  # gate_proj kernel [L=2, embed=64, mlp=128], embed sharded 4 ways: the official [128, 64] weight of each
  # layer is read as four [128, 16] column blocks (8 KiB), once per distinct shard (data replicas share)
  for layer in (0, 1):
    key = f"language_model.model.layers.{layer}.mlp.gate_proj.weight"
    sizes = [n for k, n in reads if k == key]
    assert sizes == [128 * 16 * 4] * 4, sizes
  leaf = params["bagel"]["llm"]["layers"]["und"]["mlp"]["gate_proj"]["kernel"]
  total = sum(n for k, n in reads if k.endswith(".mlp.gate_proj.weight"))
  assert total == leaf.nbytes  # every element read exactly once
  whole = {k: int(np.prod(s)) * 4 for k, s in keymap.expected_official_shapes(config.tiny())["bagel"].items()}
  stacked_matrices = {k for k, e in keymap.bagel_keys(config.tiny()).items()
                      if e.layer is not None and e.transform == "linear"}
  assert len(stacked_matrices) == 2 * 2 * 7 + 2 * 6
  big = [(k, n) for k, n in reads if k in stacked_matrices and n >= whole[k]]
  assert not big, big


# ----------------------------------------------------------------------------------------------
# errors

def test_truncated_file_names_every_cut_tensor(tmp_path, capsys):
  src = _official_dir(tmp_path)
  blob = (GOLDEN / "weights.safetensors").read_bytes()
  cut = int(len(blob) * 0.6)
  os.remove(src / "ema.safetensors")
  (src / "ema.safetensors").write_bytes(blob[:cut])
  n, header = _header(GOLDEN / "weights.safetensors")
  lost = sorted(k for k, v in header.items() if k != "__metadata__" and 8 + n + v["data_offsets"][1] > cut)
  assert len(lost) > 10
  with pytest.raises(hf_to_flax.CheckpointMismatchError) as err:
    hf_to_flax.load_official(str(src), dtype="fp32", **TINY_FLAGS)
  msg = str(err.value)
  assert f"{len(lost)} truncated keys" in msg and all(k in msg for k in lost)
  assert hf_to_flax.main(["--src", str(src), "--dst", str(tmp_path / "m")]) != 0
  assert "truncated" in capsys.readouterr().err
  (src / "ema.safetensors").write_bytes(blob[:100])  # header itself cut
  with pytest.raises(ValueError, match="header .* truncated"):
    hf_to_flax.load_official(str(src), dtype="fp32", **TINY_FLAGS)


def test_layout_errors_listed_together(tmp_path, capsys, golden_weights, golden_ae_weights):
  """Missing, unexpected and mis-shaped keys in both files come back in one error naming each key."""
  w = dict(golden_weights)
  del w["language_model.model.layers.1.mlp_moe_gen.up_proj.weight"]
  w["language_model.model.layers.2.input_layernorm.weight"] = np.ones(64, np.float32)
  w["connector.fc2.weight"] = np.zeros((64, 32), np.float32)
  ae = dict(golden_ae_weights)
  del ae["decoder.mid.attn_1.q.bias"]
  src = _official_dir(tmp_path, weights=w, ae=ae)
  with pytest.raises(hf_to_flax.CheckpointMismatchError) as err:
    hf_to_flax.load_official(str(src), dtype="fp32", **TINY_FLAGS)
  msg = str(err.value)
  for needle in ("ema.safetensors: 1 missing keys", "language_model.model.layers.1.mlp_moe_gen.up_proj.weight",
                 "ema.safetensors: 1 unexpected keys", "language_model.model.layers.2.input_layernorm.weight",
                 "ema.safetensors: 1 mis-shaped keys", "connector.fc2.weight: file [64, 32], expected [64, 64]",
                 "ae.safetensors: 1 missing keys", "decoder.mid.attn_1.q.bias"):
    assert needle in msg, needle
  assert hf_to_flax.main(["--src", str(src), "--dst", str(tmp_path / "m"), "--timestep_shift", "2.0"]) == 2  # a user error
  err_text = capsys.readouterr().err
  assert "connector.fc2.weight" in err_text and "decoder.mid.attn_1.q.bias" in err_text
  assert not (tmp_path / "m").exists()


def test_nan_and_inf_weights_refused_naming_the_tensors(tmp_path, capsys, golden_weights, golden_ae_weights):
  """NaN / inf anywhere (one layer of a stacked leaf, the AE, a bf16 file) stops the conversion before anything
  is written, naming each tensor (read in the file's own dtype: bf16 too)."""
  w = {k: v.copy() for k, v in golden_weights.items()}
  w["language_model.model.layers.1.mlp_moe_gen.up_proj.weight"][3, 5] = np.nan
  w["connector.fc2.weight"][0, 0] = np.inf
  ae = {k: v.copy() for k, v in golden_ae_weights.items()}
  ae["decoder.mid.attn_1.q.bias"][0] = -np.inf
  src = _official_dir(tmp_path, weights=w, ae=ae)
  with pytest.raises(hf_to_flax.NonFiniteWeightsError) as err:
    hf_to_flax.load_official(str(src), dtype="fp32", **TINY_FLAGS)
  msg = str(err.value)
  assert msg.startswith("3 tensors hold NaN or inf")
  for key in ("language_model.model.layers.1.mlp_moe_gen.up_proj.weight", "connector.fc2.weight",
              "decoder.mid.attn_1.q.bias"):
    assert key in msg, key
  assert "layers.0.mlp_moe_gen.up_proj" not in msg  # the other layers of the stacked leaf are fine
  assert hf_to_flax.main(["--src", str(src), "--dst", str(tmp_path / "m"), "--timestep_shift", "2.0"]) == 2  # a user error
  assert "connector.fc2.weight" in capsys.readouterr().err
  assert not (tmp_path / "m").exists()
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in golden_weights.items()}
  bf16["connector.fc2.weight"][1, 1] = np.nan
  src = _official_dir(tmp_path, weights=bf16, sub="bf16")
  with pytest.raises(hf_to_flax.NonFiniteWeightsError, match="^1 tensors .*connector.fc2.weight"):
    hf_to_flax.load_official(str(src), dtype="bf16", **TINY_FLAGS)


def test_pos_table_mismatch_warns_and_flags_override(tmp_path, golden_weights):
  w = dict(golden_weights)
  w["latent_pos_embed.pos_embed"] = w["latent_pos_embed.pos_embed"] + np.float32(1e-3)
  src = _official_dir(tmp_path, weights=w)
  with pytest.warns(UserWarning, match=r"latent_pos_embed.pos_embed differs .* up to 0.001"):
    cfg, _ = hf_to_flax.load_official(str(src), dtype="fp32", **TINY_FLAGS)
  assert cfg.max_latent_size == 8
  src = _official_dir(tmp_path, sub="unchanged")
  with pytest.warns(UserWarning, match="max_latent_size=16 given, checkpoint implies 8"):
    cfg, params = hf_to_flax.load_official(str(src), dtype="fp32", max_latent_size=16, **TINY_FLAGS)
  assert cfg.max_latent_size == 16
  flax_to_hf.export((cfg, params), str(tmp_path / "out"))
  got = load_file(str(tmp_path / "out" / "ema.safetensors"))
  np.testing.assert_array_equal(got["latent_pos_embed.pos_embed"], sincos_2d_table(16, 64))


def test_srum_model_without_vit(tmp_path, golden_weights):
  """A SRUM-trained model.safetensors (no vit_model / connector / vit_pos_embed) converts with vit=None."""
  w = {k: v for k, v in golden_weights.items() if not k.startswith(VIT_PREFIXES)}
  src = _official_dir(tmp_path, weights=w, name="model.safetensors", vit_json=False)
  cfg, params = hf_to_flax.convert(str(src), str(tmp_path / "model"), dtype="fp32", **TINY_FLAGS)
  # without vit_pos_embed the ViT grid keeps the official default (70); it is unused without a ViT
  assert cfg == config.tiny().replace(vit=None, vit_max_num_patch_per_side=70) and "vit" not in params["bagel"]
  flax_to_hf.export(str(tmp_path / "model"), str(tmp_path / "out"), weights_name="model.safetensors")
  got = load_file(str(tmp_path / "out" / "model.safetensors"))
  assert sorted(got) == sorted(w)
  assert all(np.array_equal(_bits(got[k]), _bits(w[k])) for k in w)
  assert not (tmp_path / "out" / "vit_config.json").exists()
  # ViT weights without a vit_config.json cannot be converted
  shutil.rmtree(src)
  src = _official_dir(tmp_path, vit_json=False)
  with pytest.raises(ValueError, match="vit_config.json"):
    hf_to_flax.load_official(str(src), dtype="fp32", **TINY_FLAGS)


def test_infer_7b_config_from_shapes():
  """The 7B configuration is recovered from HF json + the 7B shape table (no weights), and it validates."""
  table = json.loads((FIXTURES / "bagel_7b_state_dict_shapes.json").read_text())
  shapes = {part: {k: tuple(v) for k, v in table[part].items()} for part in ("bagel", "ae")}
  llm_json = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0, rms_norm_eps=1e-06,
                  max_position_embeddings=32768, hidden_act="silu", sliding_window=131072)
  vit_json = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  patch_size=14, image_size=384)  # the so400m-384 value: 4900 positions imply 980
  with pytest.warns(UserWarning, match="using image_size 980"):
    cfg, problems = hf_to_flax.infer_config(llm_json, vit_json, shapes["bagel"], shapes["ae"])
  assert problems == [] and cfg == config.bagel_7b_mot()
  assert hf_to_flax.check_layout(cfg, shapes, {"bagel": "ema.safetensors", "ae": "ae.safetensors"}) == []
  # one layer too many in the json -> every key of the phantom ViT layer is reported missing
  cfg, _ = hf_to_flax.infer_config(llm_json, dict(vit_json, num_hidden_layers=28, image_size=980),
                                   shapes["bagel"], shapes["ae"])
  problems = hf_to_flax.check_layout(cfg, shapes, {"bagel": "ema.safetensors", "ae": "ae.safetensors"})
  assert len(problems) == 1 and "16 missing keys" in problems[0]
  assert "vit_model.vision_model.encoder.layers.26.mlp.fc2.bias" in problems[0]


def test_bf16_source_checkpoint(tmp_path, golden_weights, golden_ae_weights, recwarn):
  """A bf16 official file (the 7B storage dtype) converts to fp32 exactly and exports back bit-exact."""
  w = {k: v.astype(ml_dtypes.bfloat16) for k, v in golden_weights.items()}
  ae = {k: v.astype(ml_dtypes.bfloat16) for k, v in golden_ae_weights.items()}
  src = _official_dir(tmp_path, weights=w, ae=ae)
  cfg, params = hf_to_flax.load_official(str(src), dtype="fp32", **TINY_FLAGS)
  assert not [x for x in recwarn if "sin-cos" in str(x.message)]  # bf16-rounded tables are within one ulp
  np.testing.assert_array_equal(params["bagel"]["llm"]["layers"]["gen"]["o_proj"]["kernel"][0],
                                w["language_model.model.layers.0.self_attn.o_proj_moe_gen.weight"].astype(np.float32).T)
  flax_to_hf.export((cfg, params), str(tmp_path / "out"), dtype="bf16")
  got = load_file(str(tmp_path / "out" / "ema.safetensors"))
  assert sorted(got) == sorted(w) and all(np.array_equal(_bits(got[k]), _bits(w[k])) for k in w)
