"""The inference commands `sample`, `edit`, `ask` on the golden tiny model: outputs, resume,
settings guard, config validation, and the CLI's table."""
import json

import numpy as np
import pytest
from PIL import Image

from srum_jax import cli, config_validation, defaults
from srum_jax.engine import loaded_model
from srum_jax.errors import UserError
from srum_jax.pipeline import inference_commands as commands


@pytest.fixture(scope="module")
def model(tiny_model_dir):
  return loaded_model.load_model(tiny_model_dir)


def _config(tiny_model_dir, workdir, **overrides):
  c = defaults.base_config()
  c.workdir = str(workdir)
  c.model.dir = tiny_model_dir
  c.model.compute_dtype = "float32"
  c.sample.update(dict(height=16, width=16, num_timesteps=2, batch_size=2, think=True,
                       max_think_tokens=3, prompts=("a red circle", "two blue squares")))
  for block in (c.edit, c.ask):  # a 24x16 input stays 24x16 (stride 8); the ViT sees it at 42x28
    block.update(dict(vae_transform=(24, 16, 8), vit_transform=(42, 28, 14)))
  c.edit.update(dict(num_timesteps=2, max_think_tokens=3))
  c.ask.max_new_tokens = 4
  for k, v in overrides.items():
    block, key = k.split(".")
    c[block][key] = v
  return c


def _image(path, seed=0):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(path)
  return str(path)


def test_sample_writes_images_plans_and_resumes(model, tiny_model_dir, tmp_path):
  c = _config(tiny_model_dir, tmp_path, **{"sample.seeds": (3, 4)})
  config_validation.validate(c, "sample")
  reports = commands.sample(c, model)
  assert sorted(reports) == [3, 4] and all(r.generated == 2 for r in reports.values())
  for seed in (3, 4):
    d = tmp_path / "sample" / f"seed_{seed}"
    rows = [json.loads(line) for line in (d / "metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red circle", "two blue squares"]
    assert {r["seed"] for r in rows} == {seed}
    for r in rows:
      assert np.asarray(Image.open(d / r["image_file"])).shape == (16, 16, 3)
      plan = (d / r["image_file"]).with_suffix(".txt").read_text()
      assert isinstance(r["think"], str) and plan == r["think"] + "\n"
  again = commands.sample(c, model)
  assert all(r.generated == 0 and r.skipped_done == 2 for r in again.values())
  c.sample.cfg_text_scale = 1.5  # other settings into the same folder: refused before any work
  with pytest.raises(UserError, match="cfg_text_scale"):
    commands.sample(c, model)


def test_edit_batches_by_size_and_resumes(model, tiny_model_dir, tmp_path):
  a = _image(tmp_path / "a.png", 0)
  _image(tmp_path / "b.png", 1)
  (tmp_path / "requests.jsonl").write_text(
      json.dumps({"image": "b.png", "prompt": "two blue squares", "id": "b"}))
  requests = str(tmp_path / "requests.jsonl")
  c = _config(tiny_model_dir, tmp_path / "w", **{"edit.image": a, "edit.prompt": "a red circle",
                                                 "edit.requests": requests, "edit.batch_size": 2})
  config_validation.validate(c, "edit")
  assert commands.edit(c, model) == {42: 2}
  d = tmp_path / "w" / "edit" / "seed_42"
  rows = [json.loads(line) for line in (d / "metadata.jsonl").read_text().splitlines()]
  rows = {r["id"]: r for r in rows}
  assert rows["b"]["image"] == str(tmp_path / "b.png") and rows["b"]["prompt"] == "two blue squares"
  for r in rows.values():
    assert np.asarray(Image.open(d / r["image_file"])).shape == (16, 24, 3) and r["think"] is None
  assert commands.edit(c, model) == {42: 0}


def test_edit_think_and_ask(model, tiny_model_dir, tmp_path):
  img = _image(tmp_path / "a.png")
  inputs = {"edit.image": img, "edit.prompt": "a red circle", "edit.think": True, "ask.image": img,
            "ask.question": "two blue squares"}
  c = _config(tiny_model_dir, tmp_path / "w", **inputs)
  commands.edit(c, model)
  d = tmp_path / "w" / "edit" / "seed_42"
  row = json.loads((d / "metadata.jsonl").read_text())
  assert isinstance(row["think"], str) and (d / row["image_file"]).with_suffix(".txt").exists()

  config_validation.validate(c, "ask")
  rows = commands.ask(c, model)
  assert len(rows) == 1 and rows[0]["question"] == "two blue squares"
  assert rows[0]["answer"] == rows[0]["text"]
  assert commands.ask(c, model) == []  # resumed: answered already
  c.ask.update(dict(think=True, out=str(tmp_path / "think")))
  think = commands.ask(c, model)[0]
  assert think["answer"] == commands.strip_think(think["text"])


def test_validation_of_the_command_blocks(tiny_model_dir, tmp_path):
  img = _image(tmp_path / "a.png")
  inputs = {"edit.image": img, "edit.prompt": "x", "ask.image": img, "ask.question": "y"}
  ok = _config(tiny_model_dir, tmp_path, **inputs)
  for command in ("sample", "edit", "ask"):
    config_validation.validate(ok, command)
  bad = [("sample", {"sample.prompts": ()}, "sample.prompts"),
         ("sample", {"sample.prompts": ("",)}, "sample.prompts"),
         ("sample", {"sample.seeds": (-1,)}, "sample.seeds"),
         ("sample", {"sample.height": 20}, "sample.height"),
         ("edit", {"edit.image": ""}, "edit.image"),
         ("edit", {"edit.prompt": ""}, "edit.prompt"),
         ("edit", {"edit.image": str(tmp_path / "none.png")}, "edit.image"),
         ("edit", {"edit.vae_transform": (24, 16, 12)}, "edit.vae_transform"),
         ("edit", {"edit.vit_transform": (42, 28, 15)}, "edit.vit_transform"),
         ("edit", {"edit.cfg_renorm_type": "text"}, "edit.cfg_renorm_type"),
         ("ask", {"ask.question": " "}, "ask.question"),
         ("ask", {"ask.requests": str(tmp_path / "none.jsonl")}, "ask.requests")]
  for command, overrides, key in bad:
    c = _config(tiny_model_dir, tmp_path, **{**inputs, **overrides})
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
      config_validation.validate(c, command)


def test_requests_file_errors_and_the_cli_table(tmp_path):
  (tmp_path / "r.jsonl").write_text('{"image": "a.png", "question": "q"}\nnot json\n')
  block = defaults.base_config().ask
  block.requests = str(tmp_path / "r.jsonl")
  with pytest.raises(UserError, match="line 2"):
    commands.read_requests(block, "question", "ask")
  for name in ("sample", "edit", "ask"):
    assert name in cli.CONFIG_COMMANDS and name in cli.usage()
  ask_main = cli._resolve(cli.CONFIG_COMMANDS["ask"][0])
  assert ask_main.__module__ == "srum_jax.pipeline.inference_commands"
