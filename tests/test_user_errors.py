"""User errors end in one clear line and exit code 2 before any work; prompt length cap; non-finite weights are
caught at the edges (generate, score). Converter NaN checks: tests/test_convert.py."""
import concurrent.futures
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from srum_jax import cli, config_utils, config_validation, errors
from srum_jax.data.prompt_sources import PromptItem, load_prompts
from srum_jax.engine import loaded_model
from srum_jax.pipeline import generate, propose, score, train
from srum_jax.rewards.texts import own_texts
from srum_jax.workdir import layout, locking, logs

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
      ("SAM proposer without weights", ["propose", f"--config={PAPER}", w],
       ["propose.options.weights", "sam_vit_h_4b8939.pth", "convert-sam"]),
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
  sam = tmp_path / "sam_vit_h_4b8939.pth"  # the proposer's weights: only their existence is checked
  sam.touch()
  return config_utils.load_config(PAPER, {"model.official_dir": str(SHIPPED), "workdir": str(tmp_path),
                                          "propose.options.weights": str(sam), "texts.file": "own",
                                          **overrides})


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
         "propose.options.weights": str(tmp_path / "nope.pth"), "propose.options.preset": "vit_x",
         "propose.batch_size": 0, "propose.options.device": "cuda",
         "score.vit_image_size": 30, "train.lr": 0.0, "train.num_tokens": 4096, "eval.judge": "oracel",
         "train.microbatch_rows": 32, "generate.max_prompt_tokens": 40000, "mesh.fsdp": 0,
         "train.image_resize": "fix", "train.official_resize": (1024, 512, 100), "train.image_hw": (512, 512),
         "train.records_format": "parquet"}
  for key, value in bad.items():
    cfg = _paper_config(tmp_path, **{"prompts.train.path": str(prompts), "prompts.val.path": str(prompts),
                                     key: value})
    with pytest.raises(errors.UserError, match=key.replace(".", r"\.")):
      config_validation.validate(cfg, "run")
  # the anchor's prompts are checked only when the anchor is on; eval-only prompt sets are prompt
  # sources
  cases = {"srum.anchor_weight": {"srum.anchor_weight": -1.0},
           "prompts.anchor.function": {"prompts.anchor.function": "x", "srum.anchor_weight": 1.0},
           "prompts.eval_extra.gen.function": {"prompts.eval_extra.gen.function": "x"}}
  for key, overrides in cases.items():
    with pytest.raises(errors.UserError, match=key.replace(".", r"\.")):
      config_validation.validate(config_utils.load_config(WORLD, overrides), "run")
  config_validation.validate(config_utils.load_config(WORLD, {"prompts.anchor.function": "x"}),
                             "run")


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


def _in_process(capsys, *args):
  """(exit code, stderr lines) of `python -m srum_jax <args>` run in this process (no traceback may escape)."""
  rc = cli.main(["srum_jax", *args])
  return rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def _official_copy(src, dst, edit=None):
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  if edit:
    edit(dst)
  return dst


def _damage(name, how):
  def edit(d):
    blob = (d / name).read_bytes()
    (d / name).write_bytes({"truncated": blob[:len(blob) // 2], "empty": b"",
                            "garbled": blob[:8] + b"\xff" * 40 + blob[48:]}[how])
  return edit


def test_each_listed_traceback_is_one_line_and_exit_2(tmp_path, capsys):
  """The issue's list, through the CLI's entry in this process: broken config files and sweeps, unknown
  config args, a bad prompt-source argument, an empty images folder, official checkpoints without
  vit_config.json / with a wrong tokenizer.json / with a damaged ema.safetensors, folders where files belong
  and the reverse, an empty lock file, converter destinations, a batch the devices cannot split."""
  cfgs = tmp_path / "cfgs"
  cfgs.mkdir()
  sweep_base = f"import sys; sys.path.insert(0, {str(ROOT / 'experiments')!r})\nimport tiny_world\n" \
               "def get_config(arg=None):\n  return tiny_world.get_config()\n"
  for name, text in {"syntax.py": "def get_config(arg=None)\n  return 1\n",
                     "raises.py": "def get_config(arg=None):\n  raise RuntimeError('boom')\n",
                     "dict.py": "def get_config(arg=None):\n  return {'a': 1}\n",
                     "sweep_unknown.py": sweep_base + "def get_sweep(arg=None):\n  return [{'train.lrr': 1}]\n",
                     "sweep_dict.py": sweep_base + "def get_sweep(arg=None):\n  return {'train.lr': 1e-4}\n",
                     "sweep_raises.py": sweep_base + "def get_sweep(arg=None):\n  raise KeyError('x')\n",
                     "sweep_invalid.py": sweep_base + "def get_sweep(arg=None):\n"
                                                      "  return [{'train.lr': 1e-4}, {'train.lr': -1.0}]\n"}.items():
    (cfgs / name).write_text(text)
  (tmp_path / "empty_images").mkdir()
  no_vit = _official_copy(SHIPPED, tmp_path / "no_vit", lambda d: (d / "vit_config.json").unlink())
  bad_tok = _official_copy(SHIPPED, tmp_path / "bad_tok", lambda d: (d / "tokenizer.json").write_text(
      '{"model": {"type": "WordLevel"}, "hello": 1}'))
  damaged = {how: _official_copy(SHIPPED, tmp_path / f"ema_{how}", _damage("ema.safetensors", how))
             for how in ("truncated", "garbled", "empty")}
  w = lambda name: f"--config.workdir={tmp_path / name}"  # noqa: E731
  (tmp_path / "w_meta" / "generate" / "metadata.jsonl").mkdir(parents=True)
  (tmp_path / "w_lock" / locking.LOCK_NAME).mkdir(parents=True)
  (tmp_path / "w_images" / "generate").mkdir(parents=True)
  (tmp_path / "w_images" / "generate" / "images").write_text("not a folder")
  (tmp_path / "w_empty_lock").mkdir()
  (tmp_path / "w_empty_lock" / locking.LOCK_NAME).write_text("")
  (tmp_path / "w_rewards" / "score" / "rewards.jsonl").mkdir(parents=True)
  model = tmp_path / "model"
  model.mkdir()
  (model / "params").mkdir()
  (model / "params" / "x").write_text("untouched")
  (tmp_path / "dst_file").write_text("a file")
  records = tmp_path / "rewards.jsonl"
  records.write_text(json.dumps({"schema_version": 1, "image_file": "0.png", "prompt": "p", "global_score": 0.5, "regions": []}) + "\n")
  small = ["--config.prompts.train.kwargs.per_category=1"]
  cases = [
      (["show-config", f"--config={cfgs / 'syntax.py'}"], ["syntax.py does not import: SyntaxError"]),
      (["show-config", f"--config={cfgs / 'raises.py'}"], ["raises.py: get_config() raised RuntimeError: boom"]),
      (["show-config", f"--config={cfgs / 'dict.py'}"], ["get_config returned dict, not an ml_collections"]),
      (["show-config", f"--config={TINY}:bogus"], ["unknown config arg 'bogus'"]),
      (["show-config", f"--config={PAPER}:x"], ["unknown config arg 'x'"]),
      (["sweep", f"--config={cfgs / 'sweep_unknown.py'}", "--dry_run"], ["sweep point 1", "train.lrr"]),
      (["sweep", f"--config={cfgs / 'sweep_dict.py'}", "--dry_run"], ["must return a non-empty list", "not dict"]),
      (["sweep", f"--config={cfgs / 'sweep_raises.py'}", "--dry_run"], ["get_sweep() raised KeyError"]),
      (["sweep", f"--config={TINY}", "--dry_run"], ["tiny_pipeline.py defines no get_sweep"]),
      (["sweep", f"--config={cfgs / 'sweep_invalid.py'}", "--dry_run", "--sweep_command=train"],
       ["sweep point 2/2", "train.lr=-1.0", "must be > 0"]),
      (["generate", f"--config={WORLD}", "--config.prompts.train.kwargs.split=bogus", w("w_split")],
       ["prompts.train", "unknown split 'bogus'"]),
      (["eval", f"--config={WORLD}", f"--config.eval.images_dir={tmp_path / 'empty_images'}", w("w_ev")],
       ["eval.images_dir", "empty folder"]),
      (["generate", f"--config={WORLD}", f"--config.model.official_dir={no_vit}", w("w_vit")],
       ["model.official_dir", "no vit_config.json"]),
      (["generate", f"--config={WORLD}", f"--config.model.official_dir={bad_tok}", w("w_tok")],
       ["tokenizer.json is not a tokenizer"]),
      *[(["generate", f"--config={WORLD}", f"--config.model.official_dir={d}", w(f"w_{how}")],
         [f"file damaged: {d / 'ema.safetensors'}"]) for how, d in damaged.items()],
      (["propose", f"--config={WORLD}", w("w_meta")], ["metadata.jsonl is a folder"]),
      (["propose", f"--config={WORLD}", w("w_lock")], [".srum_lock.json is a folder, not a lock file"]),
      (["generate", f"--config={WORLD}", *small, w("w_images")], ["images: a file is in the way"]),
      (["propose", f"--config={WORLD}", w("w_empty_lock")], ["unreadable lock file", "delete"]),
      (["train", f"--config={WORLD}", w("w_rewards")], ["rewards.jsonl is a folder, not a file"]),
      (["export", "--src", str(model), "--dst", str(model)], ["--dst", "is --src"]),
      (["export", "--src", str(model), "--dst", str(model / "params")], ["lies in it"]),
      (["convert", "--src", str(SHIPPED), "--dst", str(tmp_path / "dst_file")], ["dst_file is a file"]),
      (["train", f"--config={WORLD}", "--config.train.batch_size=3", f"--config.train.records={records}",
        w("w_batch")], ["train.batch_size=3", "8 devices"]),
  ]
  for args, needles in cases:
    rc, lines = _in_process(capsys, *args)
    text = "\n".join(lines)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(("error: ", f"{args[0]}: error: ")), (args, text)
    for needle in needles:
      assert needle in lines[0], (args, needle, text)
  assert sorted(p.name for p in model.rglob("*")) == ["params", "x"]  # export refused before writing
  assert not (tmp_path / "w_batch" / "converted_model").exists()  # refused before any model is converted
  assert not (tmp_path / "w_split" / "generate").exists() and not (tmp_path / "w_vit").exists()


def test_partial_prompt_blocks_take_defaults_or_fail_in_one_line(tmp_path):
  """A config file may assign any part of a prompt source (the other keys take their defaults); a block with
  an unknown key or a value of the wrong type is one line naming the key."""
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"prompt": "a red circle", "category": "color"}) + "\n")
  cfg = config_utils.load_config(WORLD)
  cfg.prompts.val = {"source": "file", "path": str(prompts), "format": "jsonl"}
  cfg.prompts.train = {"function": "srum_jax.worlds.shapes.sources:prompts", "kwargs": {"split": "train"}}
  config_validation.validate(cfg, "eval")
  config_validation.validate(cfg, "generate")
  assert [it.prompt for it in load_prompts(cfg.prompts.val)] == ["a red circle"]
  for block, needle in (({"path": str(prompts), "bogus": 1}, r"prompts\.val: unknown prompt source keys \['bogus'\]"),
                        ({"path": 5}, r"prompts\.val\.path=5: must be a string"),
                        ({"source": "file", "path": str(prompts), "limit": "3"}, r"prompts\.val\.limit='3'"),
                        ({"source": "fil", "path": str(prompts)}, r"did you mean 'file'")):
    bad = config_utils.load_config(WORLD)
    bad.prompts.val = block
    with pytest.raises(errors.UserError, match=needle):
      config_validation.validate(bad, "eval")
  override = config_utils.load_config(WORLD)
  assert cli._parse("eval", ["srum_jax", f"--config={WORLD}", "--config.prompts.val.limit=3"])[0].prompts.val.limit == 3
  assert override.prompts.val.limit is None


@pytest.mark.slow
def test_pipes_full_disks_and_signals_end_in_one_line_or_75(tiny_model_dir, tmp_path):
  """Real processes: `show-config | head` ends quietly; a disk that fills during `generate` is one line and
  exit 2, nothing torn, and the same command then finishes every item once; `train` stopped by SIGTERM saves
  and exits 75, and the same command resumes to the end."""
  p = subprocess.Popen([sys.executable, "-m", "srum_jax", "show-config", f"--config={WORLD}"], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  p.stdout.readline()
  p.stdout.close()  # `| head -1`
  # exit 2 when a write met the closed pipe, 0 when the whole config fit in the pipe's buffer first
  assert p.wait(timeout=120) in (0, 2) and p.stderr.read() == b""
  w = tmp_path / "w"
  gen = ["generate", f"--config={TINY}", f"--config.model.dir={tiny_model_dir}", f"--config.workdir={w}"]

  full = subprocess.run(["bash", "-c", 'ulimit -f 1 && exec "$0" "$@"', sys.executable, "-m", "srum_jax", *gen],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)  # writes past 1 KiB fail: EFBIG
  lines = [ln for ln in full.stderr.splitlines() if ln.startswith("error: ")]
  assert full.returncode == 2 and "Traceback" not in full.stderr and len(lines) == 1, full.stderr[-3000:]
  assert "File too large" in lines[0] and "run the same command again" in lines[0]
  assert not list(w.rglob("*.tmp*"))  # nothing torn
  rc, text = _cli(gen)
  assert rc == 0, text
  ids = [r["id"] for r in logs.JsonlLog(str(w / "generate" / "metadata.jsonl")).rows()]
  assert len(ids) == len(set(ids)) == 5 and all(r for r in layout.read_metadata(str(w / "generate")))
  records = tmp_path / "rewards.jsonl"
  records.write_text("".join(json.dumps({"schema_version": 1, "image_file": f"w/generate/{r['image_file']}",
                                         "prompt": r["prompt"], "global_score": 0.5, "regions": []}) + "\n"
                             for r in layout.read_metadata(str(w / "generate"))))
  train = ["train", f"--config={TINY}", f"--config.model.dir={tiny_model_dir}", f"--config.workdir={w}",
           f"--config.train.records={records}", "--config.train.steps=12", "--config.train.sample_every=0",
           "--config.train.save_every=1"]
  t = subprocess.Popen([sys.executable, "-m", "srum_jax", *train], cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 400
  while time.time() < deadline and t.poll() is None and not (w / "train" / "checkpoints" / "1").is_dir():
    time.sleep(0.2)
  t.send_signal(signal.SIGTERM)
  out, _ = t.communicate(timeout=300)
  assert t.returncode == 75 and "run the same command again to resume" in out, out[-3000:]
  rc, text = _cli(train)
  assert rc == 0 and "done, step 12/12" in text, text[-3000:]
