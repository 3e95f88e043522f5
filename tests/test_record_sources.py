"""`train.records` from SRUM's own files: the formatted JSONL of `vlm_format_output.py` and a
downloaded folder of SRUM's released training data, told apart from this project's records by
content, images found beside them.

The files here are built the way SRUM's scripts lay them out (`t2i_multi_gpu.py`'s image folder with
its `output.jsonl`, `vlm_format_output.py`'s rows), with content of our own."""
import json

import numpy as np
import pytest
from PIL import Image

from srum_jax import config_utils, config_validation
from srum_jax.errors import UserError
from srum_jax.pipeline import train_data, train_records
from srum_jax.rewards import record_sources

SIZES = [(40, 24), (24, 40), (32, 32)]  # (width, height) of the generated images, in turn


def _color(i):
  return (20 * i + 10, 180 - 15 * i, 9 * i + 3)


def official_row(name, prompt, size, g=0.6, regions=((0.7, [0, 0, 16, 12]),), good=None):
  """One row as SRUM's vlm_format_output.py writes it: the global entry first, then the regions."""
  rewards = []
  if g is not None:
    rewards.append({"object": "global_layout_reward", "bbox": [0, 0, size[0], size[1]], "score": g,
                    "reason": "the layout follows the request"})
  rewards += [{"object": f"thing {k}", "bbox": box, "score": s} for k, (s, box) in enumerate(regions)]
  return {"bad_image_file": name, "good_image_file": good or name, "prompt": prompt, "vlm_rewards": rewards}


def released_folder(tmp_path, n=6, extra_lines=(), name="SRUM_6k_CompBench_Train"):
  """A downloaded training set: the formatted JSONL beside the image folder of the generation run
  (with the generation log `output.jsonl` in it) and a README."""
  root = tmp_path / name
  images = root / "bagel_base_7b_300_step_think"
  images.mkdir(parents=True)
  log, rows = [], []
  for i in range(n):
    file, size = f"image_{i:05d}.png", SIZES[i % 3]
    Image.new("RGB", size, _color(i)).save(images / file)
    prompt = f"a green cube beside {i} red balls"
    log.append({"original_index": i, "prompt_id": file[:-4], "image_file": file, "original_prompt": prompt,
                "detailed_prompt": "a plan", "think_output": "<think>a plan</think>"})
    rows.append(official_row(file, prompt, size, regions=((0.7, [0, 0, 16, 12]), (-0.4, [8, 4, size[0], 30]))))
  (images / "output.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
  lines = [json.dumps(r) for r in rows] + list(extra_lines)
  (root / "images_comp_base_7b_300_step_think_regional_rewards.jsonl").write_text("\n".join(lines) + "\n")
  (root / "README.md").write_text("training data\n")
  return root


def test_format_is_told_by_content(tmp_path):
  own = tmp_path / "own.jsonl"
  own.write_text('{"torn\n' + json.dumps({"schema_version": 1, "image_file": "a.png", "prompt": "p",
                                          "global_score": 0.5, "regions": []}) + "\n")
  official = tmp_path / "formatted.jsonl"
  official.write_text(json.dumps(official_row("a.png", "p", (8, 8))) + "\n")
  raw = tmp_path / "raw.jsonl"
  raw.write_text(json.dumps({"image_file": "a.png", "prompt": "p", "vlm_rewards": [],
                             "global_layout_reward": {"global_layout_score": 0.5}, "vlm_raw_output": ""}) + "\n")
  other = tmp_path / "other.jsonl"
  other.write_text(json.dumps({"image_file": "a.png", "original_prompt": "p"}) + "\n")
  assert record_sources.detect_format(str(own)) == "srum_jax"
  assert record_sources.detect_format(str(official)) == "official"
  with pytest.raises(UserError, match="vlm_format_output.py"):
    record_sources.detect_format(str(raw))
  with pytest.raises(UserError, match="train.records_format"):
    record_sources.detect_format(str(other))


def test_released_folder_resolves_to_its_jsonl_and_image_folder(tmp_path):
  root = released_folder(tmp_path)
  src = record_sources.resolve(str(root))
  assert src.path == str(root / "images_comp_base_7b_300_step_think_regional_rewards.jsonl")
  assert src.images_root == str(root / "bagel_base_7b_300_step_think") and src.format == "official"
  # the formatted file alone: its images are found beside it too; an explicit root wins
  assert record_sources.resolve(src.path).images_root == src.images_root
  assert record_sources.resolve(src.path, images_root=str(tmp_path)).images_root == str(tmp_path)
  # a raw score file beside the formatted one is not a second candidate
  (root / "regional_rewards").mkdir()
  (root / "regional_rewards" / "scores.jsonl").write_text(json.dumps(
      {"image_file": "image_00000.png", "prompt": "p", "vlm_rewards": [], "global_layout_reward": None}) + "\n")
  assert record_sources.resolve(str(root)).path == src.path


def test_released_folder_problems_are_one_line_errors(tmp_path):
  root = released_folder(tmp_path)
  jsonl = root / "images_comp_base_7b_300_step_think_regional_rewards.jsonl"
  (root / "copy.jsonl").write_text(jsonl.read_text())
  with pytest.raises(UserError, match="several reward records files"):
    record_sources.resolve(str(root))
  (root / "copy.jsonl").unlink()
  images = root / "bagel_base_7b_300_step_think"
  for p in images.glob("*.png"):
    p.unlink()
  (root / "images.zip").write_bytes(b"PK\x05\x06" + bytes(18))
  with pytest.raises(UserError, match="images.zip"):
    record_sources.resolve(str(root))
  (root / "images.zip").unlink()
  with pytest.raises(UserError, match="train.images_root"):
    record_sources.resolve(str(root))
  jsonl.unlink()
  with pytest.raises(UserError, match="no reward records"):
    record_sources.resolve(str(root))
  (root / "scores.jsonl").write_text(json.dumps(
      {"image_file": "image_00000.png", "prompt": "p", "vlm_rewards": [], "global_layout_reward": None}) + "\n")
  with pytest.raises(UserError, match="vlm_format_output.py"):
    record_sources.resolve(str(root))
  with pytest.raises(UserError, match="records_format"):
    record_sources.resolve(str(root), records_format="parquet")


def test_official_rows_validated_and_counted(tmp_path):
  """Bad rows are skipped and counted as for this project's records; SRUM's formatting filter is not
  applied again (its training reads every row: a global 0.0 or a missing global still trains, with g
  = 0)."""
  extra = [
      "{not json",
      json.dumps({"bad_image_file": "image_00000.png", "vlm_rewards": []}),  # no prompt
      json.dumps(official_row("image_00001.png", "p", (24, 40), regions=((1.5, [0, 0, 4, 4]),))),  # score > 1
      json.dumps(official_row("image_00002.png", "p", (32, 32))).replace("0.6", "NaN"),  # non-finite
      json.dumps(official_row("image_00003.png", "p", (40, 24), g=0.0)),  # kept
      json.dumps(official_row("image_00004.png", "p", (24, 40), g=None)),  # kept, g missing
      json.dumps(official_row("image_00005.png", "p", (32, 32), g=None, regions=())),  # no reward at all
      json.dumps(official_row("image_00000.png", "p", (40, 24), good="other.png")),  # another target image
      json.dumps(official_row("missing.png", "p", (40, 24))),
  ]
  root = released_folder(tmp_path, extra_lines=extra)
  src = record_sources.resolve(str(root))
  good, rep = train_records.validate_records(src.path, src.images_root, max_regions=3, threads=2)
  assert rep.records_format == "official" and rep.lines == 15
  assert (rep.malformed, rep.nonfinite, rep.other_good_image) == (3, 1, 1)
  assert (rep.filtered_zero_global, rep.filtered_missing_global, rep.filtered_empty) == (0, 0, 1)
  assert rep.missing_image == 1 and rep.missing_global == 1 and rep.kept == 8
  assert [g["global_score"] for g in good[-2:]] == [0.0, None]
  assert good[0]["regions"][1] == {"box": [8, 4, 40, 24], "score": -0.4, "object": "thing 1"}  # clamped
  assert rep.boxes_clamped == 2  # the second box of the two 40 x 24 images of the run


def test_train_command_validation_reads_the_folder(tmp_path):
  root = released_folder(tmp_path)
  c = config_utils.load_config("experiments/tiny_world.py")
  c.workdir = str(tmp_path / "work")
  c.train.records = str(root)
  config_validation.check_train_inputs(c)
  c.train.records = str(tmp_path / "nothing_here")
  with pytest.raises(UserError, match="train.records"):
    config_validation.check_train_inputs(c)
  c.train.records, c.train.records_format = "", "official"
  with pytest.raises(UserError, match="records_format"):
    config_validation.validate(c, "train")
  c.train.records = str(root)  # the loop trains on its own records: SRUM's format is for `train`
  with pytest.raises(UserError, match="records_format"):
    config_validation.validate(c, "run")


def test_images_of_several_aspects_in_the_official_transform(tmp_path, tiny_cfg):
  """The released data through the pipeline with SRUM's transform (here (32, 16, 8) on a 32 x 32
  canvas, the tiny model's stride): each image keeps its aspect at the top left of a zero canvas,
  its boxes follow its scaling, and its latent slots map to its own canvas tokens."""
  root = released_folder(tmp_path)
  src = record_sources.resolve(str(root))
  path, rep = train_records.prepare_records(src.path, src.images_root, str(tmp_path / "cache"), max_regions=3)
  assert rep.kept == 6
  spec = train_data.DataSpec(image_hw=(32, 32), rows=2, samples_per_row=2, num_tokens=2 * (16 + 12) + 4,
                             text_capacity=2 * 14, max_regions=3, resize=(32, 16, 8))

  class Words:
    def encode(self, text):
      return [len(w) for w in text.split()]

  hb = next(iter(train_data.make_dataset(path, src.images_root, spec, cfg=tiny_cfg, tokenizer=Words(), seed=0,
                                         read_threads=2)))
  b = hb.batch
  assert b.images.shape == (2, 2, 32, 32, 3) and b.latent_src.shape == (2, 2 * 16)
  trained = {(40, 24): (32, 16), (24, 40): (16, 32), (32, 32): (32, 32)}  # SRUM's resize rule, by hand
  grids = []
  for r in range(2):
    row = []
    for s in range(2):
      i = int(hb.indices[r, s])
      (w0, h0), (tw, th) = SIZES[i % 3], trained[SIZES[i % 3]]
      want = (np.array(_color(i), np.float32) / 255 - 0.5) / 0.5
      np.testing.assert_allclose(b.images[r, s, :th, :tw], np.broadcast_to(want, (th, tw, 3)), atol=1e-6)
      assert not b.images[r, s, th:].any() and not b.images[r, s, :, tw:].any()
      sx, sy = tw / w0, th / h0
      box1 = [8, 4, w0, min(30, h0)]
      scaled = [[0, 0, 16 * sx, 12 * sy], [box1[0] * sx, box1[1] * sy, box1[2] * sx, box1[3] * sy]]
      np.testing.assert_array_equal(b.rewards.boxes[r, s, :2], np.trunc(scaled))  # int() as SRUM's map
      row.append((th // 8, tw // 8))
    grids.append(row)
  from srum_jax.training import train_step
  np.testing.assert_array_equal(b.latent_src, train_step.latent_sources(grids, (4, 4)))
  n_latent = [(b.inputs.latent_index[r] < b.inputs.meta.sample_id.shape[1]).sum() for r in range(2)]
  assert n_latent == [sum(h * w for h, w in row) for row in grids]
  # stored moments come from the same canvases
  seen = []

  def encode(x):
    seen.append(x.copy())
    return np.zeros((x.shape[0], 16, 16, 2 * tiny_cfg.ae.z_channels), np.float32)

  train_data.prepare_moments(path, src.images_root, (32, 32), encode, encoder_id="probe", resize=(32, 16, 8))
  canvases = np.concatenate(seen)
  first = train_data.load_canvas(str(root / "bagel_base_7b_300_step_think" / "image_00001.png"), (32, 32),
                                 (32, 16, 8))[0]
  assert any(np.array_equal(c, first) for c in canvases) and canvases.shape == (6, 32, 32, 3)


@pytest.mark.slow
def test_train_command_on_a_released_folder(tiny_model_dir, tmp_path):
  """`python -m srum_jax train --config.train.records=<downloaded folder>`: SRUM's rows and images, SRUM's
  transform on the canvas, stored moments, training pictures; no hand-written Python."""
  import os
  import pathlib
  import subprocess
  import sys

  root = released_folder(tmp_path, n=8)
  work = tmp_path / "work"
  repo = pathlib.Path(__file__).resolve().parents[1]
  args = [sys.executable, "-m", "srum_jax", "train", "--config=experiments/tiny_pipeline.py",
          f"--config.model.dir={tiny_model_dir}", f"--config.workdir={work}", f"--config.train.records={root}",
          "--config.train.image_resize=official", "--config.train.official_resize=(32,16,8)",
          "--config.train.image_hw=(32,32)", "--config.train.steps=2", "--config.train.sample_every=1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "(official), images under" in out.stdout and "official records kept 8/8" in out.stdout
  summary = json.loads((work / "train" / "summary.json").read_text())
  assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
  assert summary["data"]["records_format"] == "official" and summary["data"]["kept"] == 8
  assert (work / "train" / "samples").is_dir() and any((work / "train" / "samples").iterdir())
  assert any("r32-16-8" in p.name for p in (work / "train" / "data").iterdir())  # moments of the canvases
