"""Pretraining the tiny shapes-world BAGEL (`srum_jax.pretrain`): labels, tokenizer, batches, a short run.

The short run (a few AE and UMM steps on CPU, ~40 s with compilation) checks that `pretrain` writes a model
directory that `pipeline.common.load_model` loads, whose tokenizer agrees with the model's special ids and
the judge prompts, and that the losses go down.
"""
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from srum_jax import pretrain as PT
from srum_jax.models.config import get_preset
from srum_jax.worlds.shapes import grammar as G
from srum_jax.worlds.shapes import scene as S

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _experiment():
  spec = importlib.util.spec_from_file_location("tiny_world", ROOT / "experiments" / "tiny_world.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  cfg = get_preset("tiny_world")
  tok = PT.build_tokenizer(tmp_path_factory.mktemp("tok"), cfg)
  return PT.World(cfg, tok, _experiment().get_config().pretrain.data)


def test_scene_truth_matches_construction():
  """Scenes made for a prompt satisfy it; every hard negative falsifies it; region scores follow."""
  rng = np.random.default_rng(0)
  train, _ = G.split_prompts(0)
  for p in rng.choice(train, 150, replace=False):
    scene = G.sample_scene(rng, p)
    ok, scores = PT.scene_truth(p.spec, scene)
    assert ok and scores == [1.0] * len(scene.objects), p.text
    for kind in G.negative_kinds(p, scene):
      neg, _ = G.hard_negative(rng, p, scene, kind=kind)
      ok, scores = PT.scene_truth(p.spec, neg)
      assert not ok, (p.text, kind)
      assert len(scores) == len(neg.objects)
      if kind in ("roles", "relation"):  # (a recoloured object may still be of another named kind)
        assert min(scores) == -1.0, (p.text, kind, scores)


def test_scene_truth_examples():
  spec = G.parse_prompt("two red circles above a blue square")
  circle = lambda x, y: S.Obj("circle", "red", x, y, 10)  # noqa: E731
  square = S.Obj("square", "blue", 16, 24, 10)
  assert PT.scene_truth(spec, S.Scene((circle(8, 8), circle(24, 8), square))) == (True, [1.0, 1.0, 1.0])
  # One circle below the square: the relation fails for that circle and the square.
  ok, scores = PT.scene_truth(spec, S.Scene((circle(8, 8), circle(24, 30), S.Obj("square", "blue", 16, 16, 8))))
  assert not ok and scores == [1.0, -1.0, -1.0]
  # Three circles: wrong count (-0.5) for the circles; an unnamed green triangle is -1 but does not falsify.
  ok, scores = PT.scene_truth(spec, S.Scene((circle(4, 6), circle(16, 6), circle(28, 6), square)))
  assert not ok and scores == [-0.5, -0.5, -0.5, 1.0]
  ok, scores = PT.scene_truth(spec, S.Scene((circle(8, 8), circle(24, 8), square,
                                             S.Obj("triangle", "green", 28, 28, 6))))
  assert ok and scores == [1.0, 1.0, 1.0, -1.0]


def test_tokenizer_words_and_judge_prompts(tmp_path):
  cfg = get_preset("tiny_world")
  tok = PT.build_tokenizer(tmp_path, cfg)
  tok.check(cfg.tokens)
  PT.check_tokenizer(tok)
  assert len(PT.world_words()) + 1 < cfg.tokens.bos < cfg.llm.vocab_size
  ids = [tok.encode(w) for w in PT.world_words()]
  assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids)
  for t in PT.SCORE_TOKENS:  # the logits judge needs single-token candidates
    assert len(tok.encode(t)) == 1
  unk = tok.encode("<unk>")[0]
  for p in G.all_prompts():
    assert unk not in tok.encode(p.text) and tok.decode(tok.encode(p.text)) == p.text
  answer = "Region ID: 2\nIdentified Object: red circle\nScore: -0.5"
  from srum_jax.rewards import parsing
  assert parsing.parse_region_scores(tok.decode(tok.encode(answer)), 2) == {2: -0.5}


def test_und_batch_targets_are_next_tokens(world):
  rng = np.random.default_rng(1)
  ub = world.und_batch(rng, rows=6, num_tokens=128, samples_per_row=2, logit_capacity=64)
  gb = ub.batch
  unk = world.encode("<unk>")[0]
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
  scores = {world.encode(t)[0] for t in PT.SCORE_TOKENS}
  assert all((t in scores) == m for t, m in zip(ub.targets[ub.mask], ub.score_mask[ub.mask]))


def test_pretrain_short_run(tmp_path):
  """A few steps of both stages on CPU: a loadable model directory, consistent ids, falling losses."""
  from srum_jax.pipeline import common
  c = _experiment().get_config()
  p = c.pretrain
  p.out = str(tmp_path / "pre")
  p.max_seconds = 300.0
  p.ae.steps, p.ae.batch, p.ae.warmup_steps, p.ae.check_images = 8, 8, 1, 0
  p.steps, p.warmup_steps, p.und_rows, p.log_every = 8, 1, 4, 1
  p.eval.enabled = 0
  summary = PT.pretrain(c)
  model = common.load_model(summary["model_dir"])
  model.tokenizer.check(model.cfg.tokens)
  PT.check_tokenizer(model.tokenizer)
  assert model.cfg.ae.scale_factor != 1.0 and model.cfg.ae.shift_factor != 0.0  # fitted latent statistics
  assert summary["umm"]["steps"] == 8 and summary["ae"]["steps"] == 8
  assert summary["model_dir_bytes"] <= 10 * 2 ** 20
  rows = [json.loads(line) for line in (tmp_path / "pre" / "log.jsonl").read_text().splitlines()]
  ae = [r["loss"] for r in rows if r["stage"] == "ae"]
  ce = [r["ce"] for r in rows if r["stage"] == "umm"]
  assert np.mean(ae[-3:]) < 0.8 * np.mean(ae[:2]), ae
  assert np.mean(ce[-3:]) < 0.8 * np.mean(ce[:2]), ce
  assert all(np.isfinite(r["flow"]) and r["skipped"] == 0 for r in rows if r["stage"] == "umm")
  # warm start from that model dir: its AE and UMM weights, a fresh optimizer; one more step moves the UMM only
  p.out, p.init_from, p.steps = str(tmp_path / "warm"), summary["model_dir"], 1
  warm = PT.pretrain(c)
  assert warm["init_from"] == summary["model_dir"] and warm["umm"]["steps"] == 1
  assert warm["ae"]["scale_factor"] == model.cfg.ae.scale_factor
  after = common.load_model(warm["model_dir"])
  same_ae = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), model.params["ae"], after.params["ae"]))
  assert all(same_ae)
  emb0 = np.asarray(model.params["bagel"]["llm"]["embed_tokens"]["embedding"])
  emb1 = np.asarray(after.params["bagel"]["llm"]["embed_tokens"]["embedding"])
  assert 0 < np.max(np.abs(emb1 - emb0)) < 0.05  # started from the saved weights, then one small update


class _StopAfter:
  """Stands in for pretrain._StopFlag: reads as 'signalled' from the k-th check on."""

  def __init__(self, k):
    self.k, self.checks = k, 0

  @property
  def set(self):
    self.checks += 1
    return self.checks > self.k

  def restore(self):
    pass


def test_pretrain_stopped_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
  """A stop signal mid stage B saves the state; the same command then resumes and ends with the parameters of
  an uninterrupted run, bit for bit (data and noise are functions of the step; the wall-clock share of the LR
  schedule is negligible under a huge max_seconds)."""
  import jax
  from srum_jax.convert import checkpoint

  def config(out):
    c = _experiment().get_config()
    p = c.pretrain
    p.out, p.max_seconds, p.snapshot_every_seconds = str(out), 1e6, 0.0
    p.ae.steps, p.ae.batch, p.ae.warmup_steps, p.ae.check_images = 3, 4, 1, 0
    p.steps, p.warmup_steps, p.und_rows, p.log_every = 6, 1, 2, 1
    p.eval.enabled = 0
    return c

  full = PT.pretrain(config(tmp_path / "full"))
  assert full["umm"]["steps"] == 6
  monkeypatch.setattr(PT, "_StopFlag", lambda: _StopAfter(3))
  part = PT.pretrain(config(tmp_path / "part"))
  assert part["preempted"] and part["umm"]["steps"] == 3 and (tmp_path / "part" / PT.STATE_DIR).is_dir()
  assert not (tmp_path / "part" / "model").exists()
  monkeypatch.undo()
  done = PT.pretrain(config(tmp_path / "part"))
  assert done["umm"]["steps"] == 6 and done["umm"]["resumed_at"] == 3
  assert not (tmp_path / "part" / PT.STATE_DIR).exists()
  _, a = checkpoint.load_model_dir(full["model_dir"])
  _, b = checkpoint.load_model_dir(done["model_dir"])
  diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b))
  assert max(diffs) == 0.0
