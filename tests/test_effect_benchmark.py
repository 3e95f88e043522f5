"""The effect benchmark's diagnostics read a run's round-0 candidates as the run left them (records +
images): the oracle's verdict, the self-judge's separation and the reward maps of the loss."""
import json

import numpy as np
import pytest
from PIL import Image

from srum_jax import config_utils
from srum_jax.rewards import records as records_lib
from srum_jax.training import objective
from srum_jax.worlds.shapes import grammar, judge_text, scene as scene_lib

from helpers import load_script


def _benchmark():
  return load_script("benchmarks/tiny_world_effect.py")


def test_candidate_diagnostics_on_a_written_round(tmp_path):
  """Two candidates of one prompt: a ground-truth render (judged +0.8, one region +1) and an empty canvas
  (judged -0.6, no region). Oracle: right / wrong; AUC 1; reward means from the map formula by hand."""
  prompt = "a red circle"
  rd = tmp_path / "round_0"
  (rd / "generate" / "images").mkdir(parents=True)
  (rd / "score").mkdir(parents=True)
  good = scene_lib.render(grammar.sample_scene(np.random.default_rng(0), grammar.parse_prompt(prompt)))
  Image.fromarray(good).save(rd / "generate" / "images" / "good.png")
  Image.fromarray(np.zeros_like(good)).save(rd / "generate" / "images" / "bad.png")
  h, w = good.shape[:2]
  rows = [{"schema_version": 1, "id": "good", "image_file": "images/good.png", "prompt": prompt,
           "global_score": 0.8, "image_size": [w, h], "regions": [{"box": [0, 0, w // 2, h], "score": 1.0}]},
          {"schema_version": 1, "id": "bad", "image_file": "images/bad.png", "prompt": prompt,
           "global_score": -0.6, "image_size": [w, h], "regions": []}]
  (rd / "score" / "rewards.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = _benchmark().candidate_diagnostics(str(tmp_path), objective.RewardLevers())
  assert out["n"] == 2 and out["oracle_correct"] == pytest.approx(0.5)
  assert out["judge_auc"] == pytest.approx(1.0) and out["judge_accuracy"] == pytest.approx(1.0)
  # map: neutral 0.5 outside boxes, (s+1)/2 = 1 inside, times (g+1)/2
  assert out["reward_mean_correct"] == pytest.approx((0.5 * 1.0 + 0.5 * 0.5) * 0.9, abs=1e-5)
  assert out["reward_mean_wrong"] == pytest.approx(0.5 * 0.2, abs=1e-5)


def test_table_text_pairs_differences_over_seeds():
  acc = lambda a: {"overall": {"accuracy": a}}  # noqa: E731
  tables = {0: {"base": acc(0.5), "sft": acc(0.4), "srum": acc(0.6)},
            1: {"base": acc(0.7), "sft": acc(0.6), "srum": acc(0.7)}}
  text, per = _benchmark().table_text(tables, "t")
  np.testing.assert_allclose(per["srum"]["overall"], [60.0, 70.0])
  assert "| overall | 60.0 +- 10.0 | 50.0 +- 10.0 | 65.0 +- 5.0 | +5.0 +- 5.0 | +15.0 +- 5.0 |" in text


def test_recipe_diagnostics_truth_records_are_correct_renders(tmp_path):
  """The perfect-data control: one record per (train prompt, k), each image a true render the oracle accepts,
  global score 1, readable by the train stage's record reader."""
  script = load_script("benchmarks/recipe_diagnostics.py")
  cfg = config_utils.load_config("experiments/tiny_world.py", {"prompts.train.kwargs.per_category": 2})
  path = script.truth_records(cfg, str(tmp_path), per_prompt=2, seed=0)
  recs = [records_lib.record_from_dict(json.loads(line)) for line in open(path)]
  assert len(recs) == 5 * 2 * 2 and len({r.metadata["id"] for r in recs}) == len(recs)
  for r in recs:
    image = np.asarray(Image.open(tmp_path / "images" / r.image_file))
    assert r.global_score == 1.0 and judge_text(image, r.prompt), r.prompt
  assert config_utils.parse_overrides(["train.lr=3e-4", "generate.think=False", "run.name=x"]) == {
      "train.lr": 3e-4, "generate.think": False, "run.name": "x"}
  with pytest.raises(ValueError, match="not key=value"):
    config_utils.parse_overrides(["train.lr"])
