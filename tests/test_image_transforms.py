"""ImageTransform resize rule, [-1, 1] range and ViT patchify (docs/bagel.md, "Image transforms")."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from srum_jax.models import image_transforms

VIT, VAE, SRUM = image_transforms.VIT_TRANSFORM, image_transforms.VAE_TRANSFORM, image_transforms.SRUM_VAE_TRANSFORM

# (w, h), (max_size, min_size, stride), max_pixels, expected (new_w, new_h); each derived by hand from the resize rule.
CASES = [
    # no scaling: 640/14 = 45.71 -> 46*14 = 644, 480/14 = 34.29 -> 34*14 = 476
    ((640, 480), VIT, image_transforms.VIT_MAX_PIXELS, (644, 476)),
    # long edge capped: scale 1024/2000 = 0.512 (also = 512/1000) -> 1024 x 512
    ((2000, 1000), VAE, image_transforms.VIT_MAX_PIXELS, (1024, 512)),
    # short edge raised: scale max(1, 512/50 = 10.24) -> 1024 x 512, not above max_size
    ((100, 50), VAE, image_transforms.VIT_MAX_PIXELS, (1024, 512)),
    # round half to even on the scaled size: scale 1.5 -> round(4.5) = 4 (half-up would give 5)
    ((3, 2), (100, 3, 1), image_transforms.VIT_MAX_PIXELS, (4, 3)),
    # round half to even in make_div: 24/16 = 1.5 -> 2 -> 32; 40/16 = 2.5 -> 2 -> 32
    ((24, 40), (1024, 16, 16), image_transforms.VIT_MAX_PIXELS, (32, 32)),
    # make_div never goes below the stride: 5/16 -> 0 -> 16
    ((5, 5), (1024, 1, 16), image_transforms.VIT_MAX_PIXELS, (16, 16)),
    # final long-edge cap: scale 2.24 -> 224 x 2240 (501760 px, under budget) > 980 -> scale 0.4375 -> 98 x 980
    ((100, 1000), VIT, image_transforms.VIT_MAX_PIXELS, (98, 980)),
    # pixel budget: 980x980 = 960400 > 500000 -> linear factor 0.52062 (the area ratio): 510.2 -> 510 -> 36*14
    ((1800, 1800), VIT, 500000, (504, 504)),
    # both later branches: scale 1.024 -> 512 x 4096 = 2097152 px > 1806336 -> factor 0.861328125 ->
    # (441 -> 27.56 -> 448, 3528 -> 220.5 -> 220 (half-even) -> 3520); 3520 > 1024 -> 1024/3520 ->
    # (130.3 -> 130 -> 8*16 = 128, 1024)
    ((500, 4000), VAE, image_transforms.VIT_MAX_PIXELS, (128, 1024)),
    # SRUM stride 256: 1000/256 = 3.9 -> 1024, 700/256 = 2.7 -> 768
    ((1000, 700), SRUM, image_transforms.VIT_MAX_PIXELS, (1024, 768)),
]


@pytest.mark.parametrize("wh,preset,max_pixels,want", CASES)
def test_resize_dims(wh, preset, max_pixels, want):
  assert image_transforms.resize_dims(*wh, *preset, max_pixels=max_pixels) == want


def test_resize_image_size_and_constant():
  img = Image.new("RGB", (640, 480), (10, 200, 77))
  out = image_transforms.resize_image(img, *VIT)
  assert out.size == (644, 476)
  np.testing.assert_array_equal(np.unique(np.asarray(out).reshape(-1, 3), axis=0), [[10, 200, 77]])


def test_resize_image_is_antialiased():
  """A 4x downscale of stripes [255, 0, 0, 0] averages to ~64; point-sampled bicubic would give ~0."""
  row = np.tile(np.array([255, 0, 0, 0], np.uint8), 56)
  img = Image.fromarray(np.stack([np.tile(row, (224, 1))] * 3, axis=-1))
  out = np.asarray(image_transforms.resize_image(img, 56, 14, 14)).astype(np.float64)
  assert out.shape == (56, 56, 3)
  np.testing.assert_allclose(out[:, 2:-2].mean(), 63.75, atol=2.0)
  assert out[:, 2:-2].std() < 3.0


def test_to_model_range_and_transform():
  x = image_transforms.to_model_range(np.array([[[0, 255, 128]]], np.uint8))
  assert x.dtype == np.float32
  np.testing.assert_allclose(x, [[[-1.0, 1.0, 1.0 / 255.0]]], atol=1e-7)
  arr = image_transforms.transform_image(Image.new("RGB", (30, 20), (255, 0, 255)), 28, 14, 14)
  assert arr.shape == (14, 28, 3) and arr.dtype == np.float32
  np.testing.assert_allclose(arr[0, 0], [1.0, -1.0, 1.0])


def test_vit_patchify_golden(golden_cases):
  image = golden_cases["gen_edit.vit_image"].transpose(1, 2, 0)  # CHW -> HWC
  want = golden_cases["gen_edit.packed_vit_tokens"]
  got = image_transforms.vit_patchify(image)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  got_jit = jax.jit(image_transforms.vit_patchify)(jnp.asarray(image))
  np.testing.assert_allclose(np.asarray(got_jit), want, atol=1e-6, rtol=0)


def test_vit_patchify_feature_order():
  """Feature index (row * 14 + col) * 3 + channel of patch (pr, pc) reads pixel (14 pr + row, 14 pc + col)."""
  H, W = 28, 42
  img = np.arange(H * W * 3, dtype=np.float32).reshape(H, W, 3)
  toks = image_transforms.vit_patchify(img)
  assert toks.shape == (6, 588)
  pr, pc, row, col, ch = 1, 2, 5, 11, 2
  assert toks[pr * 3 + pc, (row * 14 + col) * 3 + ch] == img[14 * pr + row, 14 * pc + col, ch]


@pytest.mark.parametrize("case", ["border", "black", "full", "one_pixel", "red_only"])
def test_crop_to_content_is_pil_getbbox(case):
  """SRUM's t2i.py saves `image.crop(image.getbbox())` when the box exists: the same crop, from NumPy."""
  rng = np.random.default_rng(3)
  x = np.zeros((20, 30, 3), np.uint8)
  if case == "border":
    x[3:15, 5:27] = rng.integers(0, 255, (12, 22, 3), dtype=np.uint8)
  elif case == "full":
    x[:] = rng.integers(1, 255, x.shape, dtype=np.uint8)
  elif case == "one_pixel":
    x[7, 11, 2] = 1
  elif case == "red_only":
    x[2:4, 20:29, 0] = 200
  img = Image.fromarray(x)
  box = img.getbbox()
  want = np.asarray(img.crop(box)) if box else x
  got = image_transforms.crop_to_content(x)
  assert image_transforms.content_box(x) == box
  np.testing.assert_array_equal(got, want)
