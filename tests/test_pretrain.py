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
  """The default command's chain on CPU, a few steps per stage: A+B from scratch (a loadable model directory,
  consistent ids, falling losses), then the position stage as a warm start from B's model; a rerun keeps B."""
  from srum_jax.pipeline import common
  c = _experiment().get_config()
  p = c.pretrain
  p.out = str(tmp_path / "pre")
  p.max_seconds = 300.0
  p.ae.steps, p.ae.batch, p.ae.warmup_steps, p.ae.check_images = 8, 8, 1, 0
  p.steps, p.warmup_steps, p.und_rows, p.log_every = 8, 1, 4, 1
  p.eval.enabled = 0
  p.then.steps, p.then.und_rows, p.then.phases, p.then.eval.enabled = 1, 4, (), 0
  summary, warm = PT.pretrain_chain(c)
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
  # stage C: a warm start from that model dir (its AE and UMM weights, a fresh optimizer); one step moves the UMM
  assert warm["name"] == "position" and warm["out"] == str(tmp_path / "pre" / "position")
  assert warm["init_from"] == summary["model_dir"] and warm["umm"]["steps"] == 1
  assert warm["ae"]["scale_factor"] == model.cfg.ae.scale_factor
  after = common.load_model(warm["model_dir"])
  same_ae = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), model.params["ae"], after.params["ae"]))
  assert all(same_ae)
  emb0 = np.asarray(model.params["bagel"]["llm"]["embed_tokens"]["embedding"])
  emb1 = np.asarray(after.params["bagel"]["llm"]["embed_tokens"]["embedding"])
  assert 0 < np.max(np.abs(emb1 - emb0)) < 0.05  # started from the saved weights, then one small update
  table = np.asarray(after.params["bagel"]["vit"]["position_embedding"]["embedding"])
  assert 3.5 < table.std() < 4.5  # redrawn at std 4 (then one small update), not the saved small table
  chain = json.loads((tmp_path / "pre" / "chain_summary.json").read_text())
  assert [s["name"] for s in chain["stages"]] == ["AB", "position"]
  # rerunning the command keeps the finished stage B (same model files) and runs the last stage again
  mtime = (tmp_path / "pre" / "model" / "model_config.json").stat().st_mtime_ns
  again = PT.pretrain_chain(c)
  assert again[0]["umm"]["steps"] == 8 and again[1]["umm"]["steps"] == 1
  assert (tmp_path / "pre" / "model" / "model_config.json").stat().st_mtime_ns == mtime


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


def test_locate_examples_give_the_box_of_the_named_object(world):
  """The grounding task: "<locate> red circle" -> the official box of the one red circle in the scene."""
  rng = np.random.default_rng(3)
  seen = 0
  for _ in range(60):
    image, q, a, info = world.und_example(rng, task="locate")
    if not q.startswith(PT.LOCATE):
      continue  # no object of a unique kind: the global question instead
    seen += 1
    color, shape = q.split()[1:]
    box = PT.parse_box(a)
    assert box is not None and box[2] > box[0] and box[3] > box[1]
    inside = image[box[1]:box[3] + 1, box[0]:box[2] + 1].reshape(-1, 3).astype(float)  # (sometimes blurred)
    names = list(S.PALETTE)
    nearest = np.argmin([np.abs(inside - np.array(S.PALETTE[c])).sum(-1) for c in names], axis=0)
    lit = inside.max(-1) > 128
    assert (lit & (nearest == names.index(color))).sum() >= 15, (q, a)
    assert world.encode(q)[0] == world.encode(PT.LOCATE)[0] and world.encode("<unk>")[0] not in world.encode(a)
  assert seen >= 40


def test_locate_metrics():
  want = [(2, 2, 11, 11), (20, 2, 29, 11), (2, 20, 11, 29)]
  got = [(2, 2, 11, 11), (4, 2, 13, 11), None]  # exact; the right shape in the wrong cell; unparsable
  m = PT.locate_metrics(got, want)
  assert m["n"] == 3 and m["parsed"] == 2 / 3 and m["iou50"] == 1 / 3 and m["cell"] == 1 / 3
  assert PT.parse_box("4 5 12 13") == (4, 5, 12, 13) and PT.parse_box("4 five") is None


def test_connector_scale_helpers(world):
  """connector_norms = |embed_vit_tokens - position table| at the ViT slots; rescaling fc2 scales them; the
  penalty is 0 below the target and (n / target - 1)^2 above it."""
  import jax.numpy as jnp
  from srum_jax.models import embeddings, params as P, siglip
  cfg = world.cfg
  params = P.init_params(P.bagel_schema(cfg), jax.random.key(0))
  batch = jax.tree.map(jnp.asarray, world.und_batch(np.random.default_rng(0), 2, 128, 2, 64).batch)
  n, valid = PT.connector_norms(params, batch, cfg)
  tok = siglip.embed_vit_tokens(params, batch.vit_patches, batch.vit_pos, batch.vit_segment, cfg)
  table = np.asarray(embeddings.sincos_2d_table(cfg.vit_max_num_patch_per_side, cfg.llm.hidden_size))
  ref = np.linalg.norm(np.asarray(tok) - table[np.asarray(batch.vit_pos)], axis=-1)
  v = np.asarray(valid)
  assert v.sum() == 2 * 2 * 4  # 2 rows x 2 samples x 4 patches
  np.testing.assert_allclose(np.asarray(n)[v], ref[v], rtol=1e-4)
  n2, _ = PT.connector_norms(PT.rescale_connector(params, 0.25), batch, cfg)
  np.testing.assert_allclose(np.asarray(n2)[v], 0.25 * np.asarray(n)[v], rtol=1e-4)
  assert PT.position_table_norm(cfg) == pytest.approx(np.sqrt(cfg.llm.hidden_size / 2), rel=1e-5)
  mean = float(np.asarray(n)[v].mean())
  pen, m = PT.connector_penalty(params, batch, cfg, target=10 * float(np.asarray(n)[v].max()))
  assert float(pen) == 0.0 and float(m) == pytest.approx(mean, rel=1e-5)
  t = 0.5 * mean
  pen, _ = PT.connector_penalty(params, batch, cfg, target=t)
  want = np.mean(np.maximum(np.asarray(n)[v] / t - 1, 0) ** 2)
  assert float(pen) == pytest.approx(want, rel=1e-4)


def test_curriculum_phases_switch_the_judge_data(world):
  """`pretrain.phases`: each phase replaces `data` keys for its steps, then `data` itself; generation batches
  always come from the main world; relations_only keeps judge questions on prompts with a relation."""
  p = _experiment().get_config("position").pretrain
  phases = PT.curriculum_data(p)
  starts = [s for s, _ in phases]
  assert starts == [0, 2000, 3500, 5000, 7000] and phases[-1][1] == p.data.to_dict()
  assert phases[0][1]["tasks"] == {"locate": 1.0} and phases[0][1]["negatives"] == p.data.negatives
  assert phases[1][1]["relations_only"] and not phases[2][1].get("relations_only", False)
  bad = _experiment().get_config().pretrain
  bad.phases = (dict(steps=5, task={"locate": 1.0}),)
  with pytest.raises(ValueError, match="unknown data keys"):
    PT.curriculum_data(bad)
  cfg, tok = world.cfg, world.tok
  rel = PT.World(cfg, tok, phases[1][1])
  rng = np.random.default_rng(0)
  asked = 0
  for _ in range(40):
    _, q, _, _ = rel.und_example(rng)
    if '"' in q:  # judge questions quote the prompt (grounding questions name one object)
      asked += 1
      assert G.parse_prompt(q.split('"')[1]).relations, q
  assert asked >= 20
  curriculum = [(0, PT.World(cfg, tok, phases[0][1])), (2, world)]
  shapes = dict(gen_rows=1, gen_samples_per_row=2, gen_text_len=13, und_rows=2, und_tokens=128,
                und_samples_per_row=3, logit_capacity=64, vit_size=28)
  loc = world.encode(PT.LOCATE)[0]
  g0, u0 = PT._make_batches(curriculum, shapes, 0, 0)
  g2, u2 = PT._make_batches(curriculum, shapes, 0, 2)
  assert (np.asarray(u0.batch.text_ids) == loc).sum() >= 1 and (np.asarray(u2.batch.text_ids) == loc).sum() == 0
  gm, _ = PT._make_batches([(0, world)], shapes, 0, 0)
  assert np.array_equal(g0.images, gm.images)  # generation data does not depend on the phase
