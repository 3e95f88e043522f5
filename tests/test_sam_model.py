"""SAM in JAX against transformers' PyTorch `SamModel` (tiny random config, fp32) and the official
checkpoint layout; the converter's sources (.pth, transformers dir, converted dir) and shardings.

Tolerances (fp32, values of order 1): image embeddings atol 2e-5, prompt embeddings atol 1e-5, mask
logits and IoU predictions atol 2e-5 (measured differences: ~2e-6, ~1e-7, ~1e-6).
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srum_jax import sharding
from srum_jax.convert import sam_keymap, sam_to_flax
from srum_jax.convert.hf_to_flax import CheckpointMismatchError, NonFiniteWeightsError
from srum_jax.models import params as params_lib, sam_config, sam_decoder, sam_encoder, sam_schema

import helpers

torch = pytest.importorskip("torch")
FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sam_vit_h_state_dict_shapes.json"


@pytest.fixture(scope="module")
def hf_tiny():
  """(SamModel with O(1) random weights of the tiny preset, its state dict as numpy, our tree)."""
  cfg = sam_config.tiny()
  model = helpers.random_sam(cfg, seed=0)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  return model, sd, sam_to_flax.tree_from_state_dict(cfg, sd, "transformers")


def test_vit_h_official_key_table():
  """The schema's official keys and shapes equal the table from segment_anything's modules."""
  ref = json.loads(FIXTURE.read_text())
  cfg = sam_config.vit_h()
  ours = {k: list(v) for k, v in sam_keymap.expected_shapes(cfg, "official").items()}
  assert ours == ref["shapes"]
  assert params_lib.count_params(params_lib.abstract_params(sam_schema.sam_schema(cfg))) == \
      ref["num_params"] == 641090864
  # and the architecture read back from those shapes is the preset
  shapes = {k: tuple(v) for k, v in ref["shapes"].items()}
  assert sam_to_flax.config_from_official_shapes(shapes) == cfg


@pytest.mark.parametrize("preset", ["vit_h", "tiny"])
def test_transformers_key_table(preset):
  """The schema's transformers keys and shapes equal a SamModel's state dict (built on meta)."""
  from transformers import SamModel
  cfg = sam_config.get_preset(preset)
  with torch.device("meta"):
    model = SamModel(helpers.hf_sam_config(cfg))
  have = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in sam_keymap.TIED_KEYS}
  assert have == sam_keymap.expected_shapes(cfg, "transformers")


def test_image_encoder_matches_transformers(hf_tiny):
  model, _, params = hf_tiny
  cfg = sam_config.tiny()
  pixels = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    ref = model.get_image_embeddings(torch.tensor(pixels)).numpy().transpose(0, 2, 3, 1)
  ours = sam_encoder.encode_images(params["image_encoder"], cfg,
                                   jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  assert np.abs(ref).max() > 1.0
  np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5, rtol=0)


def test_pixel_normalisation_matches_processor():
  from transformers import SamImageProcessorPil

  from srum_jax.inference import sam_masks
  cfg = sam_config.tiny()
  image = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
  proc = SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
  ref = proc(images=image, return_tensors="np")
  rh, rw = (int(v) for v in ref["reshaped_input_sizes"][0])
  assert (rh, rw) == sam_masks.input_size(40, 50, 64) == (51, 64)
  ours = sam_encoder.normalize_pixels(cfg, sam_masks.model_input(image, 64)[None], rh, rw)
  np.testing.assert_allclose(np.asarray(ours)[0], ref["pixel_values"][0].transpose(1, 2, 0),
                             atol=1e-6)


def test_prompt_encoder_matches_transformers(hf_tiny):
  model, _, params = hf_tiny
  cfg = sam_config.tiny()
  pe = params["prompt_encoder"]
  rng = np.random.default_rng(2)
  points = rng.uniform(0, 64, (2, 3, 4, 2)).astype(np.float32)
  labels = rng.choice([-1, 0, 1], (2, 3, 4))
  boxes = np.sort(rng.uniform(0, 64, (2, 3, 2, 2)), axis=2).reshape(2, 3, 4).astype(np.float32)
  masks = rng.normal(size=(2, 1, 32, 32)).astype(np.float32)
  with torch.no_grad():
    sparse, _ = model.prompt_encoder(torch.tensor(points), torch.tensor(labels), None, None)
    boxes_ref, _ = model.prompt_encoder(None, None, torch.tensor(boxes), None)
    _, dense = model.prompt_encoder(None, None, None, torch.tensor(masks))
    dense_pe = model.get_image_wide_positional_embeddings()[0].numpy().transpose(1, 2, 0)
  np.testing.assert_allclose(np.asarray(sam_decoder.embed_points(pe, cfg, points, labels)),
                             sparse.numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(sam_decoder.embed_boxes(pe, cfg, boxes)),
                             boxes_ref.numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(sam_decoder.embed_masks(pe, masks[:, 0])),
                             dense.numpy().transpose(0, 2, 3, 1), atol=1e-5)
  np.testing.assert_allclose(np.asarray(sam_decoder.image_positional_encoding(pe, cfg)), dense_pe,
                             atol=1e-5)


@pytest.mark.parametrize("multimask", [True, False])
def test_mask_decoder_matches_transformers(hf_tiny, multimask):
  model, _, params = hf_tiny
  cfg = sam_config.tiny()
  rng = np.random.default_rng(3)
  emb = rng.normal(size=(2, 16, 8, 8)).astype(np.float32)
  points = rng.uniform(0, 64, (2, 5, 2, 2)).astype(np.float32)
  labels = rng.choice([0, 1], (2, 5, 2))
  with torch.no_grad():
    out = model(image_embeddings=torch.tensor(emb), input_points=torch.tensor(points),
                input_labels=torch.tensor(labels), multimask_output=multimask)
  embeddings = jnp.asarray(emb.transpose(0, 2, 3, 1))[:, None]
  masks, iou = sam_decoder.decode(params, cfg, embeddings, points, labels, multimask=multimask)
  assert masks.shape == out.pred_masks.shape and iou.shape == out.iou_scores.shape
  assert np.abs(out.pred_masks.numpy()).max() > 0.5
  np.testing.assert_allclose(np.asarray(masks), out.pred_masks.numpy(), atol=2e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(iou), out.iou_scores.numpy(), atol=2e-5, rtol=0)


def _official_state_dict(cfg, tree):
  """The tiny model's weights under the released `.pth` key names."""
  state = sam_to_flax.checkpoint_state_dict(cfg, tree, "official")
  return {k: torch.tensor(v) for k, v in state.items()}


def test_official_pth_source(hf_tiny, tmp_path):
  """A `.pth` state dict: architecture read from its shapes, the same parameters; layout problems
  all listed at once; non-finite tensors refused."""
  _, sd, ref = hf_tiny
  cfg = sam_config.tiny()
  state = _official_state_dict(cfg, ref)
  hf_back = sam_to_flax.checkpoint_state_dict(cfg, ref, "transformers")
  assert hf_back.keys() <= sd.keys() and all(np.array_equal(hf_back[k], sd[k]) for k in hf_back)
  torch.save(state, tmp_path / "sam.pth")
  got_cfg, got = sam_to_flax.load_sam(str(tmp_path / "sam.pth"), preset="tiny", decoder_heads=2)
  assert got_cfg == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, ref)
  bad = dict(state)
  bad.pop("prompt_encoder.no_mask_embed.weight")
  bad["image_encoder.extra.weight"] = torch.zeros(3)
  bad["mask_decoder.transformer.layers.0.norm3.weight"] = torch.zeros(5)
  torch.save(bad, tmp_path / "bad.pth")
  with pytest.raises(CheckpointMismatchError) as e:
    sam_to_flax.load_sam(str(tmp_path / "bad.pth"), decoder_heads=2)
  for needle in ("1 missing", "1 unexpected", "1 mis-shaped"):
    assert needle in str(e.value)
  nan = dict(state)
  nan["mask_decoder.iou_token.weight"] = torch.full((1, 16), float("nan"))
  torch.save(nan, tmp_path / "nan.pth")
  with pytest.raises(NonFiniteWeightsError, match="iou_token"):
    sam_to_flax.load_sam(str(tmp_path / "nan.pth"), decoder_heads=2)
  with pytest.raises(ValueError, match="preset"):
    sam_to_flax.load_sam(str(tmp_path / "sam.pth"), preset="vit_b", decoder_heads=2)


def test_converted_dir_and_sharded_streaming(hf_tiny, tmp_path):
  """transformers dir -> `convert-sam` dir -> restored onto an 8-device mesh: the same values; the
  streaming converter places every leaf on its schema sharding."""
  model, _, ref = hf_tiny
  src = helpers.save_sam_dir(model, tmp_path / "hf", 64)
  assert sam_to_flax.main(["--src", src, "--dst", str(tmp_path / "conv")]) == 0
  cfg, restored = sam_to_flax.load_sam(str(tmp_path / "conv"))
  assert cfg == sam_config.tiny()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, ref)
  mesh = sharding.make_mesh({"fsdp": 8})
  _, streamed = sam_to_flax.load_sam(src, mesh=mesh)
  qkv = streamed["image_encoder"]["windowed"]["qkv"]["kernel"]
  assert qkv.sharding.spec[2] == "fsdp" and len(qkv.addressable_shards) == 8
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), streamed, ref)
  _, restored8 = sam_to_flax.load_sam(str(tmp_path / "conv"), mesh=mesh)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored8, ref)
