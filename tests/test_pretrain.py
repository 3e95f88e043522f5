"""Pretraining the tiny shapes-world BAGEL (`srum_jax.pretrain`): labels, tokenizer, batches, the start-mode
decision, a short run of the default chain, and stop + resume == uninterrupted.

The short run (a few AE and UMM steps on CPU, ~40 s with compilation) checks that pretraining writes a model
directory that `engine.loaded_model.load_model` loads, whose tokenizer agrees with the model's special ids and
the judge prompts, and that the losses go down.
"""
import json
import pathlib

import jax
import numpy as np
import pytest

from srum_jax import pretrain
from srum_jax.convert import checkpoint
from srum_jax.engine import loaded_model
from srum_jax.models.config import get_preset
from srum_jax.pretrain import batches, heldout, stages, vocab
from srum_jax.rewards import parsing, texts as texts_lib
from srum_jax.training import optimizer
from srum_jax.worlds.shapes import grammar, scene as scene_lib, truth

from helpers import StopAfter, load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _experiment():
  return load_script("experiments/tiny_world.py")


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
  cfg = get_preset("tiny_world")
  tok = vocab.build_tokenizer(tmp_path_factory.mktemp("tok"), cfg)
  return batches.PretrainSampler(cfg, tok, _experiment().get_config().pretrain.data, vit_size=28)


def test_scene_truth_matches_construction():
  """Scenes made for a prompt satisfy it; every hard negative falsifies it; region scores follow."""
  rng = np.random.default_rng(0)
  train, _ = grammar.split_prompts(0)
  for p in rng.choice(train, 150, replace=False):
    scene = grammar.sample_scene(rng, p)
    ok, scores = truth.scene_truth(p.spec, scene)
    assert ok and scores == [1.0] * len(scene.objects), p.text
    for kind in grammar.negative_kinds(p, scene):
      neg, _ = grammar.hard_negative(rng, p, scene, kind=kind)
      ok, scores = truth.scene_truth(p.spec, neg)
      assert not ok, (p.text, kind)
      assert len(scores) == len(neg.objects)
      if kind in ("roles", "relation"):  # (a recoloured object may still be of another named kind)
        assert min(scores) == -1.0, (p.text, kind, scores)


def test_scene_truth_examples():
  spec = grammar.parse_prompt("two red circles above a blue square")
  circle = lambda x, y: scene_lib.Obj("circle", "red", x, y, 10)  # noqa: E731
  square = scene_lib.Obj("square", "blue", 16, 24, 10)
  assert truth.scene_truth(spec, scene_lib.Scene((circle(8, 8), circle(24, 8), square))) == (True, [1.0, 1.0, 1.0])
  # One circle below the square: the relation fails for that circle and the square.
  ok, scores = truth.scene_truth(spec, scene_lib.Scene((circle(8, 8), circle(24, 30), scene_lib.Obj("square", "blue", 16, 16, 8))))
  assert not ok and scores == [1.0, -1.0, -1.0]
  # Three circles: wrong count (-0.5) for the circles; an unnamed green triangle is -1 but does not falsify.
  ok, scores = truth.scene_truth(spec, scene_lib.Scene((circle(4, 6), circle(16, 6), circle(28, 6), square)))
  assert not ok and scores == [-0.5, -0.5, -0.5, 1.0]
  ok, scores = truth.scene_truth(spec, scene_lib.Scene((circle(8, 8), circle(24, 8), square,
                                             scene_lib.Obj("triangle", "green", 28, 28, 6))))
  assert ok and scores == [1.0, 1.0, 1.0, -1.0]


def test_tokenizer_words_and_judge_prompts(tmp_path):
  cfg = get_preset("tiny_world")
  tok = vocab.build_tokenizer(tmp_path, cfg)
  tok.check(cfg.tokens)
  vocab.check_tokenizer(tok)
  assert len(vocab.world_words()) + 1 < cfg.tokens.bos < cfg.llm.vocab_size
  ids = [tok.encode(w) for w in vocab.world_words()]
  assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids)
  for t in vocab.SCORE_TOKENS:  # the logits judge needs single-token candidates
    assert len(tok.encode(t)) == 1
  unk = tok.encode("<unk>")[0]
  for p in grammar.all_prompts():
    assert unk not in tok.encode(p.text) and tok.decode(tok.encode(p.text)) == p.text
  answer = "Region ID: 2\nIdentified Object: red circle\nScore: -0.5"
  assert parsing.parse_region_scores(tok.decode(tok.encode(answer)), 2) == {2: -0.5}


@pytest.fixture(scope="module")
def think_sampler(tmp_path_factory):
  """The think stage's data mix (stage D: C's judge mix + plans, think-mode generation samples)."""
  cfg = get_preset("tiny_world")
  tok = vocab.build_tokenizer(tmp_path_factory.mktemp("tok"), cfg)
  return batches.PretrainSampler(cfg, tok, _experiment().get_config().pretrain.then.then.data, vit_size=28)


@pytest.mark.parametrize("which", ["sampler", "think_sampler"])
def test_und_batch_targets_are_next_tokens(which, request):
  sampler = request.getfixturevalue(which)
  rng = np.random.default_rng(1)
  ub = sampler.und_batch(rng, rows=6, num_tokens=128, samples_per_row=2, logit_capacity=64)
  gb = ub.inputs
  unk = sampler.encode("<unk>")[0]
  assert unk not in gb.text_ids[gb.text_index < 128]
  for b in range(6):
    slot_id = {int(s): int(i) for s, i in zip(gb.text_index[b], gb.text_ids[b]) if s < 128}
    n = int(ub.mask[b].sum())
    assert n > 0 and not ub.mask[b, n:].any()
    for k in range(n):
      s = int(ub.logit_index[b, k])
      assert slot_id[s + 1] == ub.targets[b, k]  # the answer split's next token
      assert gb.meta.sample_id[b, s] == gb.meta.sample_id[b, s + 1]
    # Every scored slot is in a causal text split after the image and the question of its sample.
    assert (gb.meta.split_id[b, ub.logit_index[b, :n]] % 3 == 2).all()
  scores = {sampler.encode(t)[0] for t in vocab.SCORE_TOKENS}
  assert all((t in scores) == m for t, m in zip(ub.targets[ub.mask], ub.score_mask[ub.mask]))


def test_plan_examples_and_think_generation_samples(think_sampler):
  """Plan questions are [think system prompt] [prompt] -> a valid plan of that prompt; think-mode generation
  samples carry [system prompt] [prompt] [plan of the rendered scene] (or the system prompt alone)."""
  rng = np.random.default_rng(2)
  tok = think_sampler.tokenizer
  marker = tok.encode(texts_lib.own_texts().gen_think_system)
  assert tok.hf.convert_ids_to_tokens(marker) == [vocab.THINK_GEN]
  for _ in range(20):
    image, question, plan, info = think_sampler.und_example(rng, task="plan")
    assert image is None and info["task"] == "plan" and question[0] == texts_lib.own_texts().gen_think_system
    assert heldout.plan_valid(plan, question[1]) == (True, True)
  gb = think_sampler.gen_batch(rng, rows=8, samples_per_row=4, text_len=26)
  meta = gb.inputs.meta
  kinds = {"plain": 0, "think": 0, "uncond": 0}
  for b in range(8):
    for s in range(4):
      t = get_preset("tiny_world").tokens
      ids = [int(i) for i, slot in zip(gb.inputs.text_ids[b], gb.inputs.text_index[b])
             if slot < meta.sample_id.shape[1] and meta.sample_id[b, slot] == s
             and i not in (t.start_of_image, t.end_of_image)]
      bos, eos = t.bos, t.eos
      segments = " ".join(str(i) for i in ids).replace(f" {eos} {bos} ", f" {eos} | {bos} ").split(" | ")
      if len(segments) == 1 and ids[1:-1] == marker:
        kinds["uncond"] += 1
      elif len(segments) == 1:
        kinds["plain"] += 1
      else:
        assert len(segments) == 3 and [int(i) for i in segments[0].split()][1:-1] == marker
        prompt = tok.decode([int(i) for i in segments[1].split()][1:-1])
        plan = tok.decode([int(i) for i in segments[2].split()][1:-1])
        assert grammar.parse_prompt(prompt) and heldout.plan_valid(plan, prompt) == (True, True)
        kinds["think"] += 1
  assert kinds["plain"] and kinds["think"] and sum(kinds.values()) == 32, kinds


def test_chain_of_three_stages_derives_each_stage_from_the_one_before(tmp_path):
  """The default command chains A+B -> position -> think: each stage's out and init_from derive from the stage
  before, and the last one ends the chain."""
  c = _experiment().get_config()
  c.pretrain.out = str(tmp_path / "pre")
  second = stages.next_stage(c)
  third = stages.next_stage(second)
  assert (second.pretrain.name, second.pretrain.out) == ("position", str(tmp_path / "pre" / "position"))
  assert second.pretrain.init_from == str(tmp_path / "pre" / "model")
  assert (third.pretrain.name, third.pretrain.out) == ("think", str(tmp_path / "pre" / "position" / "think"))
  assert third.pretrain.init_from == str(tmp_path / "pre" / "position" / "model")
  assert third.pretrain.data.think > 0 and third.pretrain.data.tasks.plan > 0 and third.pretrain.eval.think
  assert stages.next_stage(third) is None


def _short(c, out):
  """A few steps per stage, no evaluation."""
  p = c.pretrain
  p.out = str(out)
  p.ae.steps, p.ae.batch, p.ae.warmup_steps, p.ae.check_images = 8, 8, 1, 0
  p.umm.steps, p.umm.warmup_steps, p.umm.und_rows, p.log_every = 8, 1, 4, 1
  p.eval.enabled = False
  return c


def test_start_mode_is_decided_once(tmp_path):
  """fresh | reuse_ae | warm_start | resume, from the config and what <out> holds."""
  p = _experiment().get_config().pretrain
  p.out = str(tmp_path / "stage")
  assert stages.start_mode(p) == stages.StartMode.FRESH
  p.ae.from_dir = "some/model"
  assert stages.start_mode(p) == stages.StartMode.REUSE_AE
  p.init_from = "other/model"
  assert stages.start_mode(p) == stages.StartMode.WARM_START  # init_from wins: it brings its AE too
  (tmp_path / "stage" / stages.STATE_DIR / "5").mkdir(parents=True)
  assert stages.start_mode(p) == stages.StartMode.WARM_START  # an unfinished checkpoint is not a state
  (tmp_path / "stage" / stages.STATE_DIR / "5" / "_CHECKPOINT_METADATA").write_text("{}")
  assert stages.start_mode(p) == stages.StartMode.RESUME
  p.resume = False
  assert stages.start_mode(p) == stages.StartMode.WARM_START


@pytest.mark.slow
def test_pretrain_short_run(tmp_path):
  """The default command's chain on CPU, a few steps per stage: A+B from scratch (a loadable model directory,
  consistent ids, falling losses), then the position stage as a warm start from B's model; a rerun keeps B."""
  c = _short(_experiment().get_config(), tmp_path / "pre")
  c.pretrain.max_seconds = 300.0
  t = c.pretrain.then
  t.umm.steps, t.umm.und_rows, t.phases, t.eval.enabled = 1, 4, (), False
  t.then.name = ""  # the think stage: its chaining and data are tested above, its step is stage C's
  summary, warm = pretrain.pretrain_chain(c)
  assert summary["start_mode"] == "fresh" and warm["start_mode"] == "warm_start"
  model = loaded_model.load_model(summary["model_dir"])
  model.tokenizer.check(model.cfg.tokens)
  vocab.check_tokenizer(model.tokenizer)
  assert model.cfg.ae.scale_factor != 1.0 and model.cfg.ae.shift_factor != 0.0  # fitted latent statistics
  assert summary["umm"]["steps"] == 8 and summary["ae"]["steps"] == 8
  assert summary["model_dir_bytes"] <= 10 * 2 ** 20
  rows = [json.loads(line) for line in (tmp_path / "pre" / "log.jsonl").read_text().splitlines()]
  ae = [r["loss"] for r in rows if r["stage"] == "ae"]
  ce = [r["ce"] for r in rows if r["stage"] == "umm"]
  assert np.mean(ae[-3:]) < 0.8 * np.mean(ae[:2]), ae
  assert np.mean(ce[-3:]) < 0.8 * np.mean(ce[:2]), ce
  assert all(np.isfinite(r["flow"]) and r["skipped"] == 0 for r in rows if r["stage"] == "umm")
  # the learning rate is the step's (the shared schedule): warm-up from 0, then a cosine decay
  schedule = optimizer.lr_schedule(c.pretrain.umm, c.pretrain.umm.steps)
  umm_rows = [r for r in rows if r["stage"] == "umm"]
  assert [r["lr"] for r in umm_rows] == pytest.approx([float(schedule(r["step"])) for r in umm_rows])
  assert umm_rows[0]["lr"] == 0.0 and np.all(np.diff([r["lr"] for r in umm_rows[1:]]) < 0)
  # stage C: a warm start from that model dir (its AE and UMM weights, a fresh optimizer); one step moves the UMM
  assert warm["name"] == "position" and warm["out"] == str(tmp_path / "pre" / "position")
  assert warm["init_from"] == summary["model_dir"] and warm["umm"]["steps"] == 1
  assert warm["ae"]["scale_factor"] == model.cfg.ae.scale_factor
  after = loaded_model.load_model(warm["model_dir"])
  same_ae = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), model.params["ae"], after.params["ae"]))
  assert all(same_ae)
  emb0 = np.asarray(model.params["bagel"]["llm"]["embed_tokens"]["embedding"])
  emb1 = np.asarray(after.params["bagel"]["llm"]["embed_tokens"]["embedding"])
  assert np.array_equal(emb0, emb1)  # the one step of stage C is warm-up update 0: lr 0
  table = np.asarray(after.params["bagel"]["vit"]["position_embedding"]["embedding"])
  assert 3.5 < table.std() < 4.5  # redrawn at std 4, not the saved small table
  chain = json.loads((tmp_path / "pre" / "chain_summary.json").read_text())
  assert [s["name"] for s in chain["stages"]] == ["AB", "position"]
  # rerunning the command keeps the finished stage B (same model files) and runs the last stage again
  mtime = (tmp_path / "pre" / "model" / "model_config.json").stat().st_mtime_ns
  again = pretrain.pretrain_chain(c)
  assert again[0]["umm"]["steps"] == 8 and again[1]["umm"]["steps"] == 1
  assert (tmp_path / "pre" / "model" / "model_config.json").stat().st_mtime_ns == mtime



@pytest.mark.slow
def test_pretrain_stopped_and_resumed_equals_uninterrupted(tmp_path):
  """A stop signal mid stage B saves the state; the same command then resumes and ends with the parameters of
  an uninterrupted run, bit for bit (data, noise and the learning rate are functions of the step)."""

  def config(out):
    c = _short(_experiment().get_config(), out)
    c.pretrain.max_seconds, c.pretrain.snapshot_every_seconds = 1e6, 0.0
    c.pretrain.ae.steps, c.pretrain.ae.batch = 3, 4
    c.pretrain.umm.steps, c.pretrain.umm.und_rows = 6, 2
    return c

  full = pretrain.run_stage(config(tmp_path / "full"))
  assert full["umm"]["steps"] == 6
  part = pretrain.run_stage(config(tmp_path / "part"), stop=StopAfter(3))
  assert part["preempted"] and part["umm"]["steps"] == 3 and (tmp_path / "part" / stages.STATE_DIR).is_dir()
  assert not (tmp_path / "part" / "model").exists()
  done = pretrain.run_stage(config(tmp_path / "part"))
  assert done["start_mode"] == "resume" and done["umm"]["steps"] == 6 and done["umm"]["resumed_at"] == 3
  assert not (tmp_path / "part" / stages.STATE_DIR).exists()
  _, a = checkpoint.load_model_dir(full["model_dir"])
  _, b = checkpoint.load_model_dir(done["model_dir"])
  diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b))
  assert max(diffs) == 0.0


def test_locate_examples_give_the_box_of_the_named_object(sampler):
  """The grounding task: "<locate> red circle" -> the official box of the one red circle in the scene."""
  rng = np.random.default_rng(3)
  seen = 0
  for _ in range(60):
    image, q, a, info = sampler.und_example(rng, task="locate")
    if not q.startswith(vocab.LOCATE):
      continue  # no object of a unique kind: the global question instead
    seen += 1
    color, shape = q.split()[1:]
    box = vocab.parse_box(a)
    assert box is not None and box[2] > box[0] and box[3] > box[1]
    inside = image[box[1]:box[3] + 1, box[0]:box[2] + 1].reshape(-1, 3).astype(float)  # (sometimes blurred)
    names = list(scene_lib.PALETTE)
    nearest = np.argmin([np.abs(inside - np.array(scene_lib.PALETTE[c])).sum(-1) for c in names], axis=0)
    lit = inside.max(-1) > 128
    assert (lit & (nearest == names.index(color))).sum() >= 15, (q, a)
    assert sampler.encode(q)[0] == sampler.encode(vocab.LOCATE)[0]
    assert sampler.encode("<unk>")[0] not in sampler.encode(a)
  assert seen >= 40


def test_locate_metrics():
  want = [(2, 2, 11, 11), (20, 2, 29, 11), (2, 20, 11, 29)]
  got = [(2, 2, 11, 11), (4, 2, 13, 11), None]  # exact; the right shape in the wrong cell; unparsable
  m = heldout.locate_metrics(got, want)
  assert m["n"] == 3 and m["parsed"] == 2 / 3 and m["iou50"] == 1 / 3 and m["cell"] == 1 / 3
  assert vocab.parse_box("4 5 12 13") == (4, 5, 12, 13) and vocab.parse_box("4 five") is None


def test_curriculum_phases_switch_the_judge_data(sampler):
  """`pretrain.phases`: each phase replaces `data` keys for its steps, then `data` itself; generation batches
  always come from the main sampler; relations_only keeps judge questions on prompts with a relation."""
  p = _experiment().get_config("position").pretrain
  phases = batches.curriculum_data(p)
  starts = [s for s, _ in phases]
  assert starts == [0, 2000, 3500, 5000, 7000] and phases[-1][1] == p.data.to_dict()
  assert phases[0][1]["tasks"] == {"locate": 1.0} and phases[0][1]["negatives"] == p.data.negatives
  assert phases[1][1]["relations_only"] and not phases[2][1]["relations_only"]
  bad = _experiment().get_config().pretrain
  bad.phases = (dict(steps=5, task={"locate": 1.0}),)
  with pytest.raises(ValueError, match="unknown data keys"):
    batches.curriculum_data(bad)
  cfg, tok = sampler.cfg, sampler.tokenizer
  rel = batches.PretrainSampler(cfg, tok, phases[1][1], vit_size=28)
  rng = np.random.default_rng(0)
  asked = 0
  for _ in range(40):
    _, q, _, _ = rel.und_example(rng)
    if '"' in q:  # judge questions quote the prompt (grounding questions name one object)
      asked += 1
      assert grammar.parse_prompt(q.split('"')[1]).relations, q
  assert asked >= 20
  curriculum = [(0, batches.PretrainSampler(cfg, tok, phases[0][1], vit_size=28)), (2, sampler)]
  budgets = batches.BatchBudgets(gen_rows=1, gen_samples_per_row=2, gen_text_len=13, und_rows=2, und_tokens=128,
                              und_samples_per_row=3, logit_capacity=64, vit_size=28)
  loc = sampler.encode(vocab.LOCATE)[0]
  g0, u0 = batches.make_batches(curriculum, budgets, 0, 0)
  g2, u2 = batches.make_batches(curriculum, budgets, 0, 2)
  assert (np.asarray(u0.inputs.text_ids) == loc).sum() >= 1 and (np.asarray(u2.inputs.text_ids) == loc).sum() == 0
  gm, _ = batches.make_batches([(0, sampler)], budgets, 0, 0)
  assert np.array_equal(g0.images, gm.images)  # generation data does not depend on the phase
