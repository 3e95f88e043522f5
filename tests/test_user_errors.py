"""User errors end in one clear line and exit code 2 before any work; prompt length cap; non-finite weights are
caught at the edges (generate, score). Converter NaN checks: tests/test_convert.py."""
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from srum_jax import config_utils, config_validation, errors
from srum_jax.data.prompt_sources import PromptItem, load_prompts
from srum_jax.engine import loaded_model
from srum_jax.pipeline import generate, propose, score, train
from srum_jax.rewards.texts import own_texts
from srum_jax.workdir import layout, logs

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "experiments/tiny_pipeline.py"
WORLD = "experiments/tiny_world.py"
PAPER = "experiments/bagel_7b_compbench.py"
SHIPPED = ROOT / "srum_jax" / "worlds" / "shapes" / "checkpoint"
OWN = own_texts()


def _cli(args):
  """(exit code, stderr + stdout) of `python -m srum_jax <args>` run from the repo root."""
  p = subprocess.run([sys.executable, "-m", "srum_jax", *args], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  return p.returncode, p.stderr + p.stdout


def _cases(tmp: pathlib.Path):
  """(name, argv, substrings the message must hold) for each user error."""
  w = f"--config.workdir={tmp / 'work'}"
  (tmp / "empty_dir").mkdir()
  (tmp / "latin1.txt").write_bytes("a caf\xe9 with a red circle\n".encode("latin-1"))
  (tmp / "empty.txt").write_text("\n  \n")
  bad_official = tmp / "bad_official"
  bad_official.mkdir()
  for f in SHIPPED.iterdir():
    if f.name != "llm_config.json":
      os.symlink(f, bad_official / f.name)
  (bad_official / "llm_config.json").write_text('{"hidden_size": 64,')
  no_meta = tmp / "no_metadata"
  (no_meta / "params").mkdir(parents=True)
  (no_meta / "model_config.json").write_text("{}")
  (no_meta / "tokenizer.json").write_text("{}")
  file_src = ["--config.prompts.train.source=file"]
  return [
      ("typo key", ["show-config", f"--config={TINY}", "--config.trian.steps=3"], ["'trian'", "did you mean train"]),
      ("image_hw not a pair", ["train", f"--config={WORLD}", "--config.train.image_hw=32", w],
       ["train.image_hw", "pair"]),
      ("image_hw off the latent grid", ["train", f"--config={WORLD}", "--config.train.image_hw=(36,36)", w],
       ["train.image_hw", "multiple of 8"]),
      ("negative steps", ["train", f"--config={WORLD}", "--config.train.steps=-5", w], ["train.steps", ">= 1"]),
      ("config file missing: show-config", ["show-config", "--config=experiments/nope.py"],
       ["experiments/nope.py", "does not exist"]),
      ("config file missing: run", ["run", "--config=experiments/nope.py"], ["experiments/nope.py", "does not exist"]),
      ("config arg bad", ["show-config", f"--config={WORLD}:bad"], ["unknown config arg 'bad'"]),
      ("model dir unset", ["generate", f"--config={TINY}", w], ["model.dir is empty"]),
      ("model dir missing", ["generate", f"--config={TINY}", f"--config.model.dir={tmp / 'nope'}", w],
       ["model.dir", str(tmp / "nope")]),
      ("model dir empty", ["score", f"--config={TINY}", f"--config.model.dir={tmp / 'empty_dir'}", w],
       ["model.dir", "is empty"]),
      ("converted dir without _METADATA", ["generate", f"--config={TINY}", f"--config.model.dir={no_meta}", w],
       ["params/_METADATA", str(no_meta)]),
      ("invalid llm_config.json", ["run", f"--config={WORLD}", f"--config.model.official_dir={bad_official}", w],
       [str(bad_official / "llm_config.json"), "invalid JSON"]),
      ("bad enum before any stage", ["run", f"--config={WORLD}", "--config.score.mode=logit", w],
       ["score.mode='logit'", "did you mean 'logits'"]),
      ("non-UTF-8 prompt file", ["generate", f"--config={WORLD}", *file_src,
                                 f"--config.prompts.train.path={tmp / 'latin1.txt'}", w],
       [str(tmp / "latin1.txt"), "not UTF-8"]),
      ("paper config's prompt path is used (empty file)",
       ["generate", f"--config={PAPER}", f"--config.model.official_dir={SHIPPED}", "--config.texts.file=own",
        f"--config.prompts.train.path={tmp / 'empty.txt'}", w],
       ["prompts.train", "no prompts", "empty.txt"]),
      ("paper config without the official texts",
       ["score", f"--config={PAPER}", f"--config.model.official_dir={SHIPPED}", w],
       ["texts.file", "python -m srum_jax texts import --bagel_code=", "--config.texts.file=own"]),
      ("texts file missing", ["eval", f"--config={WORLD}", f"--config.texts.file={tmp / 'texts.json'}", w],
       ["texts file", str(tmp / "texts.json"), "not found"]),
      ("path on a python source", ["generate", f"--config={WORLD}", f"--config.prompts.train.path={tmp / 'x.txt'}", w],
       ["prompts.train.path", "source='python'", "source=file"]),
      ("train without records", ["train", f"--config={WORLD}", w], ["train.records", "rewards.jsonl"]),
  ]


@pytest.mark.slow
def test_each_user_error_is_one_line_and_exit_2(tmp_path):
  cases = _cases(tmp_path)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(lambda c: _cli(c[1]), cases))
  for (name, args, needles), (rc, text) in zip(cases, results):
    assert rc == 2, (name, rc, text)
    assert "Traceback" not in text, (name, text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, text)
    for needle in needles:
      assert needle in text, (name, needle, text)
  assert not (tmp_path / "work").exists()  # no stage started: nothing written


def _paper_config(tmp_path, **overrides):
  return config_utils.load_config(PAPER, {"model.official_dir": str(SHIPPED), "workdir": str(tmp_path),
                                          "texts.file": "own", **overrides})


def test_shipped_configs_validate_and_checks_name_keys(tmp_path):
  """The shipped configs pass every command's checks; a few more bad values, each naming its key."""
  world = config_utils.load_config(WORLD)
  for command in ("generate", "propose", "score", "eval", "run", "pretrain"):
    config_validation.validate(world, command)
  for key, value in {"pretrain.umm.steps": 0, "pretrain.then.data.negatives": 1.5, "pretrain.ae.from_dir": "nope",
                     "pretrain.then.then.data.think": 1.5, "pretrain.then.then.umm.gen_rows": 0}.items():
    with pytest.raises(errors.UserError, match=key.replace(".", r"\.")):
      config_validation.validate(config_utils.load_config(WORLD, {key: value}), "pretrain")
  typo = config_utils.load_config(WORLD)
  with typo.pretrain.data.tasks.unlocked():
    typo.pretrain.data.tasks.plans = 0.3  # a config file naming a task that does not exist
  with pytest.raises(errors.UserError, match=r"pretrain\.data\.tasks\.plans.*not a task"):
    config_validation.validate(typo, "pretrain")
  prompts = tmp_path / "p.json"
  prompts.write_text(json.dumps([{"Question": "a red cube", "Category": "color"}]))
  paper = _paper_config(tmp_path, **{"prompts.train.path": str(prompts), "prompts.val.path": str(prompts)})
  for command in ("generate", "score", "eval", "run"):
    config_validation.validate(paper, command)
  bad = {"generate.cfg_interval": (0.5, 0.2), "generate.height": 1000, "propose.name": "samm",
         "score.vit_image_size": 30, "train.lr": 0.0, "train.num_tokens": 4096, "eval.judge": "oracel",
         "train.microbatch_rows": 32, "generate.max_prompt_tokens": 40000, "mesh.fsdp": 0}
  for key, value in bad.items():
    cfg = _paper_config(tmp_path, **{"prompts.train.path": str(prompts), "prompts.val.path": str(prompts),
                                     key: value})
    with pytest.raises(errors.UserError, match=key.replace(".", r"\.")):
      config_validation.validate(cfg, "run")
  # the anchor's prompts are checked only when the anchor is on; eval-only prompt sets are prompt sources
  for key, overrides in {"srum.anchor_weight": {"srum.anchor_weight": -1.0},
                         "prompts.anchor.function": {"prompts.anchor.function": "x", "srum.anchor_weight": 1.0},
                         "prompts.eval_extra.gen.function": {"prompts.eval_extra.gen.function": "x"}}.items():
    with pytest.raises(errors.UserError, match=key.replace(".", r"\.")):
      config_validation.validate(config_utils.load_config(WORLD, overrides), "run")
  config_validation.validate(config_utils.load_config(WORLD, {"prompts.anchor.function": "x"}), "run")


def test_mesh_shapes_the_devices_cannot_take_name_the_key():
  """Device counts are known only once JAX runs: the meshes fail there, as user errors naming the key."""
  cfg = config_utils.load_config(TINY, {"inference_mesh.tensor": 3, "mesh.fsdp": 3})
  with pytest.raises(errors.UserError, match=r"inference_mesh=.*'tensor': 3.*8 devices"):
    loaded_model.inference_mesh(cfg)
  with pytest.raises(errors.UserError, match=r"config key mesh=.*'fsdp': 3"):
    train.train_mesh(cfg)


def test_long_prompts_are_skipped_and_counted(tiny_model_dir, tmp_path):
  """A 10,000-character prompt never reaches the sampler (positions stay below the model's 512): skipped,
  counted in the report and stats.json; `generate.max_prompt_tokens` lowers the cap."""
  cfg = config_utils.load_config(TINY, {"model.dir": tiny_model_dir, "workdir": str(tmp_path)})
  model = loaded_model.load_model(tiny_model_dir)
  short = load_prompts(cfg.prompts.train)[:2]  # the NaN test's prompts: one compiled sampler for both tests
  items = [PromptItem("long", " ".join(["red circle"] * 1700), "color"), *short]
  assert len(items[0].prompt) > 10_000
  out = tmp_path / "gen"
  rep = generate.generate(cfg.generate, model, items, str(out), seed=0, texts=OWN)
  assert rep.prompt_token_cap == model.cfg.llm.max_position_embeddings - 3
  assert (rep.skipped_too_long, rep.generated) == (1, 2)
  assert [r["id"] for r in layout.read_metadata(str(out))] == [it.id for it in short]
  assert json.loads((out / "stats.json").read_text())["report"]["skipped_too_long"] == 1
  capped = config_utils.load_config(TINY, {"model.dir": tiny_model_dir, "generate.max_prompt_tokens": 2})
  rep2 = generate.generate(capped.generate, model, items, str(tmp_path / "gen2"), seed=0, texts=OWN)
  assert rep2.prompt_token_cap == 2 and (rep2.skipped_too_long, rep2.generated) == (3, 0)


def _poisoned(model: loaded_model.Model, part: str) -> loaded_model.Model:
  """The model with every parameter of `part` ('bagel' or 'ae') set to NaN."""
  params = dict(model.params)
  params[part] = jax.tree.map(lambda x: jax.numpy.full_like(x, np.nan), params[part])  # placed as `x`
  return loaded_model.Model(cfg=model.cfg, params=params, tokenizer=model.tokenizer, path=model.path)


def test_nan_weights_flagged_in_generate_and_score(tiny_model_dir, tmp_path):
  """NaN weights: generate writes no PNG and no row (counted); score records keep only finite scores in
  [-1, 1], the NaN answers counted as failures."""
  cfg = config_utils.load_config(TINY, {"model.dir": tiny_model_dir, "workdir": str(tmp_path)})
  model = loaded_model.load_model(tiny_model_dir)
  items = load_prompts(cfg.prompts.train)[:2]
  bad_gen = tmp_path / "bad_gen"
  rep = generate.generate(cfg.generate, _poisoned(model, "bagel"), items, str(bad_gen), seed=0, texts=OWN)
  assert (rep.skipped_nonfinite, rep.generated) == (2, 0)
  assert layout.read_metadata(str(bad_gen)) == [] and not list(bad_gen.glob("images/*.png"))
  gen, prop, out = (str(tmp_path / k) for k in ("gen", "prop", "score"))
  assert generate.generate(cfg.generate, model, items, gen, seed=0, texts=OWN).generated == 2
  propose.propose(cfg.propose, gen, prop)
  srep = score.score(cfg.score, _poisoned(model, "bagel"), gen, prop, out, seed=0, texts=OWN)
  assert srep.scored == 2 and srep.global_failures == 2 and srep.nonfinite_answers >= 2
  recs = logs.JsonlLog(os.path.join(out, "rewards.jsonl")).rows()
  assert len(recs) == 2
  for r in recs:
    assert r["global_score"] == cfg.score.global_default  # the failure default, never NaN
    assert all(np.isfinite(reg["score"]) and -1 <= reg["score"] <= 1 for reg in r["regions"])
  stats = json.loads((tmp_path / "score" / "stats.json").read_text())
  assert stats["report"]["nonfinite_answers"] == srep.nonfinite_answers


def test_train_on_records_without_their_images_is_one_error_line(tmp_path):
  """Records that point at images that are not there (a wrong `train.images_root`): exit 2, one error line."""
  rec = {"schema_version": 1, "image_file": "0.png", "prompt": "a red circle", "global_score": 0.5,
         "regions": [{"box": [0, 0, 16, 16], "score": 0.8, "object": "red circle"}]}
  (tmp_path / "rewards.jsonl").write_text(json.dumps(rec) + "\n")
  rc, text = _cli(["train", f"--config={WORLD}", f"--config.workdir={tmp_path / 'work'}",
                   f"--config.train.records={tmp_path / 'rewards.jsonl'}"])
  assert rc == 2, text
  assert "Traceback" not in text, text
  errors_said = [ln for ln in text.splitlines() if ln.startswith("error: ")]
  assert len(errors_said) == 1, text
  assert "no usable training records" in errors_said[0] and "missing image 1" in errors_said[0], text
  assert "train.images_root" in errors_said[0], text
