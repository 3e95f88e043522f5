"""PIL-only pictures: grid layout, overlay colours, loss-curve PNG, atomic writes."""
import os

import numpy as np
import pytest
from PIL import Image

from srum_jax import files, viz


def test_image_grid_layout_and_pixels():
  imgs = np.zeros((5, 6, 4, 3), np.uint8)
  for i in range(5):
    imgs[i] = (40 * i, 255 - 40 * i, 9)
  imgs[4, 2, 1] = (1, 2, 3)
  g = viz.image_grid(imgs, ncols=3, pad=2, background=(255, 255, 255))
  assert g.size == (2 + 3 * (4 + 2), 2 + 2 * (6 + 2))
  a = np.asarray(g)
  assert tuple(a[0, 0]) == (255, 255, 255)  # padding
  assert tuple(a[2, 2]) == (0, 255, 9)  # image 0 top-left
  assert tuple(a[2, 2 + 2 * 6]) == (80, 175, 9)  # image 2: third column
  assert tuple(a[2 + 8 + 2, 2 + 6 + 1]) == (1, 2, 3)  # image 4 (row 1, col 1), pixel (2, 1)
  assert tuple(a[-1, -1]) == (255, 255, 255)  # the empty sixth cell stays background
  wide = np.zeros((2, 6, 40, 3), np.uint8)
  capped = np.asarray(viz.image_grid(wide, ncols=2, pad=1, captions=["a long caption that is cut", "b"]))
  assert capped.shape[0] > 6 + 2 and capped.shape[1] == 1 + 2 * 41
  assert (capped[1 + 6:-1, 1:41] != 255).any()  # caption text drawn under the first tile
  assert (capped[1 + 6:, 41] == 255).all()  # ... and cut to the tile width (the gap stays clear)
  with pytest.raises(ValueError):
    viz.image_grid(imgs.astype(np.float32), ncols=2)


def test_overlay_colours_at_known_pixels():
  img = np.full((8, 10, 3), 100, np.uint8)
  rmap = np.zeros((8, 10), np.float32)
  rmap[:, 5:] = 1.0
  out = viz.overlay_reward_map(img, rmap, alpha=0.5)
  assert out.shape == (8, 10, 3) and out.dtype == np.uint8
  assert tuple(out[0, 0]) == (178, 50, 50)  # 0 -> red: 0.5*100 + 0.5*(255, 0, 0), rounded
  assert tuple(out[0, 9]) == (50, 178, 50)  # 1 -> green
  signed = viz.overlay_reward_map(img, rmap * 2 - 1, alpha=1.0)  # [-1, 1] detected as signed
  assert tuple(signed[0, 0]) == (255, 0, 0) and tuple(signed[0, 9]) == (0, 255, 0)
  half = viz.overlay_reward_map(img, np.full((8, 10), 0.5, np.float32), alpha=1.0)
  assert tuple(half[3, 3]) == (128, 128, 0)
  boxed = viz.overlay_reward_map(img, np.zeros((8, 10), np.float32), boxes=[[2, 1, 8, 7]], scores=[1.0],
                                 alpha=0.0)
  assert tuple(boxed[1, 5]) == (0, 255, 0)  # top edge in the score's colour (score 1 -> green)
  assert tuple(boxed[6, 2]) == (0, 255, 0)  # bottom-left corner (x_max, y_max exclusive)
  assert tuple(boxed[0, 0]) == (100, 100, 100)  # outside untouched
  with pytest.raises(ValueError):
    viz.overlay_reward_map(img, rmap[:4])


def test_loss_curve_png(tmp_path):
  p = tmp_path / "sub" / "loss.png"
  series = {"loss": [(s, 1.0 / (s + 1)) for s in range(20)],
            "loss_reward": [(s, 0.5 / (s + 1)) for s in range(20)] + [(20, float("nan"))]}
  img = viz.loss_curve_png(series, str(p), width=320, height=200)
  assert p.is_file() and Image.open(p).size == (320, 200)
  a = np.asarray(img)
  blue = np.all(a == viz.PALETTE[0], axis=-1)
  red = np.all(a == viz.PALETTE[1], axis=-1)
  assert blue.sum() > 50 and red.sum() > 50  # both lines (and legend swatches) drawn
  # the loss line starts at the top-left of the plot area and falls to the right
  cols = np.nonzero(blue[:, 64:70].any(axis=0))[0]
  assert cols.size and blue[:, 64 + cols[0]].nonzero()[0].min() < 40
  assert (a[:, 0] == 255).all()  # left margin blank
  assert not any(f.startswith(".") for f in os.listdir(p.parent))  # no temporary left behind
  viz.loss_curve_png({}, str(tmp_path / "empty.png"))  # nothing logged yet: axes only
  assert (tmp_path / "empty.png").is_file()


def test_save_png_atomic(tmp_path):
  p = tmp_path / "x.png"
  arr = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
  files.save_png(str(p), arr)
  np.testing.assert_array_equal(np.asarray(Image.open(p)), arr)
  files.save_png(str(p), Image.fromarray(arr[:, ::-1]))  # replaces in place
  np.testing.assert_array_equal(np.asarray(Image.open(p)), arr[:, ::-1])
  assert os.listdir(tmp_path) == ["x.png"]
  assert viz.to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])).tolist() == [0, 127, 255, 255]
