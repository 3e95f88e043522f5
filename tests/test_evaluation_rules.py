"""The benchmarks' rules on hand-built inputs: every expected value below is worked out by hand from the
published definitions (T2I-CompBench's scripts, GenEval's evaluate_images.py, T2I-ReasonBench's eval_*.py,
SRUM's qwen_eval.py); no model is involved."""
import dataclasses
import json

import numpy as np
import pytest

from srum_jax import errors
from srum_jax.data.prompt_sources import PromptItem
from srum_jax.evaluation import (compbench, geneval, image_folders, mllm_judge, reasonbench, report,
                                 text)
from srum_jax.evaluation.detectors import Detection, mask_box
from srum_jax.evaluation.torch_models import yes_no_ratio
from srum_jax.pipeline import evaluate
from srum_jax.rewards import texts as texts_lib


def test_blip_vqa_score_is_the_product_of_yes_over_yes_plus_no():
  logits = np.array([0.3, 2.0, -1.0, 0.5])  # vocabulary of 4; "yes" = 1, "no" = 2
  p = np.exp(logits) / np.exp(logits).sum()
  assert yes_no_ratio(logits[1], logits[2]) == pytest.approx(p[1] / (p[1] + p[2]), abs=1e-12)
  assert compbench.blip_vqa_score([0.9, 0.5, 0.8]) == pytest.approx(0.36, abs=1e-12)
  assert compbench.blip_vqa_score([]) == 1.0  # no question: the benchmark's factor 1


@pytest.mark.parametrize("relation,box1,box2,expected", [
    ("on the left of", (0, 0, 10, 10), (30, 0, 40, 10), 1.0),  # dx = 30 > 0, dominant, no overlap
    ("on the left of", (0, 0, 20, 10), (10, 0, 30, 10), 0.3),  # IoU = 100 / 300 -> 0.1 / (1/3)
    ("on the right of", (0, 0, 20, 10), (10, 0, 30, 10), 0.0),  # points the other way
    ("on the bottom of", (0, 90, 10, 110), (0, 0, 10, 20), 1.0),  # dy = 10 - 100 < 0, dominant
    ("on the top of", (0, 90, 10, 110), (0, 0, 10, 20), 0.0),
    ("next to", (0, 0, 10, 10), (300, 400, 310, 410), 0.375),  # 150 / max(300, 400)
    ("near", (0, 0, 10, 10), (100, 400, 110, 410), 1.0),  # |dx| = 100 < 150
    ("on top of", (0, 0, 10, 10), (30, 0, 40, 10), 0.0),  # in the vocabulary, scored 0 by the benchmark
    (None, (0, 0, 10, 10), (30, 0, 40, 10), 0.0),
])
def test_determine_position(relation, box1, box2, expected):
  assert compbench.determine_position(relation, box1, box2) == pytest.approx(expected, abs=1e-12)


def test_spatial_score_weights_confidences_and_cuts_below_half():
  left = ((0, 0, 10, 10), (30, 0, 40, 10))
  assert compbench.spatial_score("on the left of", (0.8, left[0]), (0.6, left[1])) == pytest.approx(0.85)
  assert compbench.spatial_score("on the right of", (0.8, left[0]), (0.6, left[1])) == 0.0  # 0.35 < 0.5
  assert compbench.spatial_score("on the left of", (0.9, left[0]), None) == 0.0  # 0.225 < 0.5
  assert compbench.spatial_score("on the left of", None, None) == 0.0
  assert compbench.spatial_score("on the left of", (0.0, left[0]), (0.0, left[1])) == 0.5  # 0.5 is kept


def test_numeracy_counts_distinct_boxes():
  assert compbench.same_object((0, 0, 9, 9), (0, 0, 9, 9))
  assert compbench.same_object((0, 0, 99, 99), (0, 0, 95, 99))  # 96 x 100 inside: 100% of the smaller box
  assert not compbench.same_object((0, 0, 9, 9), (20, 0, 29, 9))
  apples = [(0, 0, 9, 9), (20, 0, 29, 9), (40, 0, 49, 9)]
  bees = [(0, 50, 9, 59), (0, 50, 9, 58), (20, 50, 29, 59)]  # the second duplicates the first
  assert compbench.distinct_boxes(bees) == [bees[0], bees[2]]
  targets = [("apple", 3), ("bee", 2)]
  assert compbench.numeracy_score(targets, {"apple": apples, "bee": bees}) == 1.0
  assert compbench.numeracy_score(targets, {"apple": apples, "bee": bees[:1]}) == 0.75  # (1 + 0.5) / 2
  assert compbench.numeracy_score(targets, {"apple": apples[:2]}) == 0.25  # (0.5 + 0) / 2
  with pytest.raises(ValueError):
    compbench.numeracy_score([], {})


def test_three_in_one_and_frame():
  assert compbench.three_in_one("spatial", 0.6, 0.8, 0.2) == pytest.approx(0.7)
  assert compbench.three_in_one("action", 0.6, 0.8, 0.2) == pytest.approx(0.4)
  assert compbench.three_in_one("all", 0.6, 0.8, 0.2) == pytest.approx(1.6 / 3)
  assert compbench.to_frame((0, 0, 512, 256), (256, 512), 480) == (0.0, 0.0, 480.0, 240.0)
  assert compbench.category_key("Non Spatial") == "non-spatial" and compbench.category_key("colour") == "color"


def test_rule_parser_reads_benchmark_prompts():
  p = text.RuleParser()
  assert text.vqa_questions(p, "a green bench and a red car", 8) == ["a green bench?", "a red car?"]
  assert p.noun_chunks("a plastic chair and leather gloves") == ["a plastic chair", "leather gloves"]
  assert p.noun_chunks("a blue square and a green circle") == ["a blue square", "a green circle"]
  assert p.noun_chunks("The striped rug was next to the wooden bench.") == ["The striped rug", "the wooden bench"]
  assert text.simple_spatial_objects(p, "a girl on the bottom of a horse") == ("girl", "horse")
  assert text.relation("a girl on the bottom of a horse") == "on the bottom of"
  assert text.relation("a cat near a dog") == "near" and text.relation("a cat and a dog") is None
  assert text.complex_spatial_objects(p, "The green plant was on the left of the white lamp.") == ("plant", "lamp")
  assert text.complex_spatial_objects(p, "The shiny blue car drove past the dusty brown barn.") == (None, None)
  assert text.without_adjectives(p, "The shiny blue car drove past the barn.") == "The car drove past the barn ."
  assert text.numeracy_targets(p, "three bananas, two bees, an egg, a painting, and a goldfish adorned the room") \
      == [("banana", 3), ("bee", 2), ("egg", 1), ("painting", 1), ("goldfish", 1)]
  assert text.numeracy_targets(p, "one blue circle and two yellow triangles") == [("circle", 1), ("triangle", 2)]
  assert [text.singular(w) for w in ("butterflies", "benches", "mice", "tomatoes", "glass", "cats")] == \
      ["butterfly", "bench", "mouse", "tomato", "glass", "cat"]


def test_spacy_parser_path_uses_the_nlp_object():
  class Tok:
    def __init__(self, t, pos):
      self.text, self.pos_ = t, pos

  class Doc(list):
    noun_chunks = [type("Span", (), {"text": "a cat"})(), type("Span", (), {"text": "a dog"})()]

  words = [("a", "DET"), ("cat", "NOUN"), ("near", "ADP"), ("a", "DET"), ("dog", "NOUN")]
  p = text.SpacyParser(lambda s: Doc([Tok(w, pos) for w, pos in words]))
  assert text.vqa_questions(p, "a cat near a dog", 1) == ["a cat?"]
  assert text.simple_spatial_objects(p, "a cat near a dog") == ("cat", "dog")


def test_geneval_relative_position_and_iou():
  assert geneval.relative_position((0, 0, 10, 10), (50, 0, 60, 10)) == {"left of"}  # dx = -48 / 50
  assert geneval.relative_position((50, 0, 60, 10), (0, 0, 10, 10)) == {"right of"}
  assert geneval.relative_position((0, 80, 10, 90), (0, 0, 10, 10)) == {"below"}
  assert geneval.relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()  # within 0.1 x (10 + 10)
  assert geneval.relative_position((0, 0, 10, 10), (40, 40, 50, 50)) == {"left of", "above"}  # -0.68, -0.68
  assert geneval.compute_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
  assert geneval.compute_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)


def _det(label, score, box):
  return Detection(label, score, box)


def test_geneval_keep_detections_and_verdicts():
  dets = [_det("cat", 0.5, (0, 0, 10, 10)), _det("cat", 0.95, (40, 0, 50, 10)), _det("cat", 0.2, (5, 5, 8, 8)),
          _det("dog", 0.92, (80, 0, 90, 10))]
  kept = geneval.keep_detections(dets, threshold=0.3, max_objects=16, nms_threshold=1.0)
  assert [d.score for d in kept["cat"]] == [0.95, 0.5] and len(kept["dog"]) == 1
  assert geneval.keep_detections(dets, threshold=0.9, max_objects=16, nms_threshold=1.0)["cat"][0].score == 0.95
  assert len(geneval.keep_detections(dets, threshold=0.3, max_objects=1, nms_threshold=1.0)["cat"]) == 1
  no_colour = lambda name, found: []  # noqa: E731
  two = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
  assert geneval.evaluate(kept, two, no_colour) == (True, "")
  ok, why = geneval.evaluate({"cat": kept["cat"]}, two, no_colour)
  assert not ok and why == "expected dog>=1, found 0"
  counting = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
  assert geneval.evaluate(kept, counting, no_colour)[0]
  three = {"cat": kept["cat"] + [_det("cat", 0.4, (60, 60, 70, 70))]}
  assert geneval.evaluate(three, counting, no_colour) == (False, "expected cat<3, found 3")
  red = {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}]}
  assert geneval.evaluate(kept, red, lambda name, found: ["red"])[0]
  assert not geneval.evaluate(kept, red, lambda name, found: ["blue"])[0]
  # position: the cat (best: x 40-50) must be left of the dog (x 80-90), the group at index 0
  left = {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1,
                                                                           "position": ["left of", 0]}]}
  assert geneval.evaluate(kept, left, no_colour)[0]
  right = json.loads(json.dumps(left).replace("left of", "right of"))
  ok, why = geneval.evaluate(kept, right, no_colour)
  assert not ok and why == "expected cat right of target, found left of target"
  no_target = {"tag": "position", "include": [{"class": "bird", "count": 1}, {"class": "cat", "count": 1,
                                                                                "position": ["left of", 0]}]}
  assert "no target for cat to be left of" in geneval.evaluate(kept, no_target, no_colour)[1]


def test_geneval_metadata_items(tmp_path):
  f = tmp_path / "evaluation_metadata.jsonl"
  f.write_text('{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}\n'
               '\n{"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"}\n')
  items, meta = geneval.load_items(str(f))
  assert [(i.id, i.category) for i in items] == [("00000", "single_object"), ("00001", "counting")]
  assert meta["00001"]["include"][0]["count"] == 2
  assert mask_box(np.pad(np.ones((2, 3), bool), ((4, 1), (5, 0)))) == (5.0, 4.0, 8.0, 6.0)


@pytest.mark.parametrize("answer,expected", [
    ('```json\n{"score": 85, "explanation": "matches"}\n```', 85.0),
    ('{"score": "72", "explanation": "string score"}', 72.0),
    ('Here: {"explanation": "no key"} and "score": 64 later', 64.0),
    ('{"score": 150}', None),  # outside 0-100
    ("I think it is good", None),
    ('{"explanation": {"nested": 1}, "score": 40}', 40.0),
])
def test_mllm_parse_score(answer, expected):
  assert mllm_judge.parse_score(answer, (0, 100)) == expected


def test_rubric_stand_ins_and_scoring_tables():
  own = texts_lib.own_texts()
  question = texts_lib.render_compbench(own, 'a red car named "Bo"')
  assert '"a red car named "Bo""' in question and "0 to 100" in question and mllm_judge.MAX_NEW_TOKENS == 512
  assert set(reasonbench.SCORING) == set(reasonbench.DIMENSIONS.values()) == set(own.reasonbench)
  for dim in reasonbench.SCORING:  # the groups the scoring reads are the groups the texts ask
    assert reasonbench.groups_of(dim) == list(texts_lib.REASONBENCH_GROUPS[dim])
    assert sum(reasonbench.SCORING[dim]["accuracy"].values()) == pytest.approx(1.0)


def test_reasonbench_parse_and_weights(tmp_path):
  assert reasonbench.parse_score_list('{"reason": ["a {b}"], "score": [1, 0.5, 0]}') == [1.0, 0.5, 0.0]
  assert reasonbench.parse_score_list('{"reason": ["x"], "score": [1, 0.5]"}') == [1.0, 0.5]  # the template's quote
  assert reasonbench.parse_score_list('{"score": [2, 1]}') is None and reasonbench.parse_score_list("no") is None
  acc, quality = reasonbench.image_scores({"entity_evaluation": [1, 0.5], "other_details_evaluation": [0, 1],
                                           "quality_evaluation": [1, 1, 0]}, reasonbench.SCORING["entity_reasoning"])
  assert acc == pytest.approx(0.7 * 0.75 + 0.3 * 0.5) and quality == pytest.approx(2 / 3)
  prompts, qs = tmp_path / "entity_reasoning.json", tmp_path / "evaluation_entity.json"
  prompts.write_text(json.dumps([{"prompt": "the tallest animal"}, {"prompt": "a famous bridge"}]))
  qs.write_text(json.dumps([{"id": k, "entity_evaluation": ["q"], "other_details_evaluation": ["d"],
                             "quality_evaluation": ["q"]} for k in (1, 2)]))
  own = texts_lib.own_texts()
  items, questions, dim = reasonbench.load_items(str(prompts), str(qs), "", own)
  assert dim == "entity_reasoning" and [i.id for i in items] == ["0001", "0002"] and questions["0002"]["id"] == 2
  without = dataclasses.replace(own, reasonbench={})  # texts imported without --reasonbench_code
  with pytest.raises(errors.UserError, match="reasonbench_code"):
    reasonbench.load_items(str(prompts), str(qs), "", without)


def test_metric_table_means_and_markdown():
  rows = [{"category": "color", "score": 0.5}, {"category": "color", "score": 1.0},
          {"category": "spatial", "score": 0.0}, {"category": "spatial", "score": None}]
  t = report.metric_table(rows, "compbench", "CB", digits=3)
  assert t["categories"]["color"] == {"mean": 0.75, "n": 2, "unscored": 0}
  assert t["categories"]["spatial"] == {"mean": 0.0, "n": 1, "unscored": 1}
  assert t["overall"] == {"mean": 0.375, "n": 3, "unscored": 1}  # mean of the category means
  judge = report.judge_columns({"color": {"correct": 1, "total": 2, "accuracy": 0.5},
                                "overall": {"correct": 1, "total": 2, "accuracy": 0.5}}, "oracle")
  md = report.markdown([judge, t])
  assert "| spatial | - | 0.000 (n=1, 1 unscored) |" in md
  assert "| overall | 50.0 (n=2) | 0.375 (n=3, 1 unscored) |" in md


def test_mllm_overall_is_srum_rule_with_the_plain_mean_beside_it():
  """SRUM's CompBench_eval/qwen_eval.sh: the three complex categories average into one composite that counts as
  one category beside the base ones; the mean of all category means is kept, named, under it."""
  means = {"color": 80.0, "shape": 70.0, "3d_spatial": 60.0, "complex": 90.0, "complex_action": 60.0,
           "complex_spatial": 30.0}
  rows = [{"category": c, "score": m} for c, m in means.items()] + [{"category": "color", "score": None}]
  t = report.metric_table(rows, "mllm", *report.COLUMNS["mllm"][0])
  composite = (90.0 + 60.0 + 30.0) / 3  # 60
  assert t["summary_rows"]["complex composite"]["mean"] == pytest.approx(composite)
  assert t["overall"]["mean"] == pytest.approx((80.0 + 70.0 + 60.0 + composite) / 4)  # 67.5
  assert t["summary_rows"]["mean of categories"]["mean"] == pytest.approx(sum(means.values()) / 6)  # 65
  assert (t["overall"]["n"], t["overall"]["unscored"]) == (6, 1)
  md = report.markdown([t])
  assert "| overall | 67.5 (n=6, 1 unscored) |" in md
  assert "| complex composite | 60.0 (n=3) |" in md and "| mean of categories | 65.0 (n=6, 1 unscored) |" in md
  assert "overall (MLLM judge (0-100)): SRUM's qwen_eval.sh" in md
  # the script's spelling ("complex action") and the prompt file's (complex_action) are the same category
  spaced = report.srum_overall({"complex action": {"mean": 10.0, "n": 1, "unscored": 0},
                                "color": {"mean": 50.0, "n": 1, "unscored": 0}})
  assert spaced["overall"]["mean"] == pytest.approx(30.0)
  # no complex category: no composite, the base categories alone
  assert report.srum_overall({"color": {"mean": 50.0, "n": 2, "unscored": 0},
                              "shape": {"mean": None, "n": 0, "unscored": 2}})["overall"] == {
                                  "mean": 50.0, "n": 2, "unscored": 2}
  other = report.metric_table(rows, "compbench", *report.COLUMNS["compbench"][0])
  assert "summary_rows" not in other and other["overall"]["mean"] == pytest.approx(65.0)
  both = report.markdown([other, t])
  assert "| complex composite | - | 60.0 (n=3) |" in both


def test_srum_overall_on_the_categories_of_srums_val_prompts():
  """SRUM's val_comp.json categories (an excerpt of the file, as shipped): seven base categories and the
  three complex ones averaged into one composite: the overall averages eight numbers."""
  import pathlib
  from srum_jax.data.prompt_sources import load_prompts

  excerpt = pathlib.Path(__file__).parent / "fixtures" / "prompts" / "srum_val_comp_excerpt.json"
  cats = sorted({it.category for it in load_prompts({"source": "file", "path": str(excerpt)})})
  assert len(cats) == 10
  values = {c: float(10 * k) for k, c in enumerate(cats)}
  rows = [{"category": c, "score": v} for c, v in values.items()]
  t = report.metric_table(rows, "mllm", *report.COLUMNS["mllm"][0])
  complex_ = [values[c] for c in ("complex", "complex_action", "complex_spatial")]
  base = [v for c, v in values.items() if not c.startswith("complex")]
  assert len(base) == 7
  assert t["overall"]["mean"] == pytest.approx((sum(base) + np.mean(complex_)) / 8)
  assert t["summary_rows"]["mean of categories"]["mean"] == pytest.approx(np.mean(list(values.values())))


def test_grid_spreads_over_categories():
  rows = [{"id": f"{c}{k}#{s}", "prompt_id": f"{c}{k}", "category": c}
          for c in "abc" for k in range(3) for s in range(2)]
  assert [r["id"] for r in report.spread(rows, 5)] == ["a0#0", "b0#0", "c0#0", "a1#0", "b1#0"]


def test_collect_images_made_elsewhere(tmp_path):
  from PIL import Image
  items = [PromptItem("val/color/0", "a red car", "color"), PromptItem("7", "a blue bench", "color"),
           PromptItem("8", "two cats", "numeracy")]
  flat = tmp_path / "flat"
  flat.mkdir()
  for name in ("val_color_0.png", "7#1.png", "two cats_000002.png", "unrelated.png", "notes.txt"):
    Image.new("RGB", (4, 4)).save(flat / name) if name.endswith(".png") else (flat / name).write_text("x")
  rows, rep = image_folders.collect(str(flat), items)
  assert sorted((r["id"], r["prompt"]) for r in rows) == [("7#1", "a blue bench"), ("8#000002", "two cats"),
                                                          ("val/color/0", "a red car")]
  assert rep.layout == "flat" and rep.files == 4 and rep.unmatched_files == ["unrelated.png"]
  geneval_dir = tmp_path / "geneval"
  (geneval_dir / "00001" / "samples").mkdir(parents=True)
  Image.new("RGB", (4, 4)).save(geneval_dir / "00001" / "samples" / "0003.png")
  rows, rep = image_folders.collect(str(geneval_dir), [PromptItem("00001", "a photo of a bench", "single_object")])
  assert rep.layout == "geneval" and [r["id"] for r in rows] == ["00001#0003"] and rep.prompts_without_image == 0
  with pytest.raises(FileNotFoundError):
    image_folders.collect(str(tmp_path / "nope"), items)


def test_run_metric_resumes_and_retries_skipped_rows(tmp_path):
  from PIL import Image

  for name in ("a", "b"):
    Image.new("RGB", (4, 4)).save(tmp_path / f"{name}.png")
  rows = [{"id": i, "prompt": i, "category": "c", "image_file": str(tmp_path / f"{i}.png")} for i in "abc"]
  calls = []

  class Scorer:
    name = "fake"
    metadata_ready = False

    def __call__(self, images, chunk):
      calls.append([r["id"] for r in chunk])
      base = lambda r: {"id": r["id"], "prompt": r["prompt"], "category": "c"}  # noqa: E731
      return [dict(base(r), score=1.0) if r["id"] == "a" or self.metadata_ready else
              dict(base(r), score=None, skipped="no metadata") for r in chunk]

  first = {r["id"]: r for r in evaluate.run_metric(Scorer(), rows, str(tmp_path), "fake", 2)}
  assert first["a"]["score"] == 1.0 and "skipped" in first["b"] and first["c"]["skipped"] == "image missing"
  scorer = Scorer()
  scorer.metadata_ready = True
  again = {r["id"]: r for r in evaluate.run_metric(scorer, rows, str(tmp_path), "fake", 2)}
  assert calls == [["a", "b"], ["b"]] and again["b"]["score"] == 1.0 and again["a"] == first["a"]
