"""The evaluation's plumbing on tiny randomly initialised models of the real transformers classes (built from
small configs: `srum_jax.evaluation.random_models`): each wrapper against an independent computation with the
same model, the scorers' rows, parse failures counted and retried, and the `eval` command on the tiny BAGEL
(generated images and the same images as a folder made elsewhere)."""
import json
import pathlib
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from srum_jax import config_utils  # noqa: E402
from srum_jax.data.prompt_sources import PromptItem  # noqa: E402
from srum_jax.evaluation import (compbench, detectors, geneval, mllm_judge,  # noqa: E402
                                 random_models, reasonbench, torch_models)
from srum_jax.pipeline import commands, evaluate  # noqa: E402
from srum_jax.rewards import texts as texts_lib  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
F32 = torch.float32


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
  return random_models.write_all(str(tmp_path_factory.mktemp("metric_models")))


def _images(n, seed=0, hw=(40, 48)):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for _ in range(n)]


def test_blip_yes_probability_matches_the_models_own_first_decoding_step(metric_models):
  vqa = torch_models.BlipVqa(metric_models["blip"], "cpu", F32, "k")
  ims, q = _images(2), ["a red car?", "a green bench?"]
  got = vqa.yes_probability(ims, q)
  for k in range(2):  # one question at a time: no padding, so generate's all-ones question mask is the same
    enc = vqa.tokenizer([q[k]], return_tensors="pt")
    ids = enc["input_ids"].clone()
    ids[:, 0] = vqa.enc
    pix = vqa.image_processor(images=torch_models.pil_images(ims[k:k + 1]), return_tensors="pt")["pixel_values"]
    out = vqa.model.generate(input_ids=ids, pixel_values=pix, max_new_tokens=1, output_scores=True,
                             return_dict_in_generate=True)
    p = torch.softmax(out.scores[0][0].double(), -1)
    assert got[k] == pytest.approx(float(p[vqa.yes] / (p[vqa.yes] + p[vqa.no])), abs=1e-5)


def test_clip_cosine_matches_logits_per_image(metric_models):
  clip = torch_models.Clip(metric_models["clip"], "cpu", F32, "k")
  ims, texts = _images(3), ["a red car", "two cats", "a photo of a bench"]
  inputs = clip.image_processor(images=torch_models.pil_images(ims), return_tensors="pt")
  enc = clip.tokenizer(texts, padding=True, return_tensors="pt")
  with torch.no_grad():
    logits = clip.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        pixel_values=inputs["pixel_values"]).logits_per_image
  ref = (logits / clip.model.logit_scale.exp()).diagonal().detach().numpy()
  np.testing.assert_allclose(clip.cosine(ims, texts), ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["owlv2", "owlvit", "mask2former"])
def test_detectors_return_sorted_boxes_inside_the_image(metric_models, kind):
  det = detectors.load_detector(kind, metric_models[kind], "cpu", F32, "k")
  ims = _images(2, hw=(40, 48))
  out = det(ims, [["cat", "dog"], ["person"]], 0.0)
  assert len(out) == 2 and any(out)
  for dets, wanted in zip(out, (["cat", "dog"], ["person"])):
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    for d in dets:
      assert d.label in wanted and 0 <= d.box[0] <= d.box[2] <= 48 and 0 <= d.box[1] <= d.box[3] <= 40
      if d.mask is not None:
        assert d.mask.shape == (40, 48) and detectors.mask_box(d.mask) == d.box


def test_compbench_scorer_rows(metric_models):
  cfg = config_utils.load_config(str(ROOT / "experiments/tiny_pipeline.py"), {}).eval.compbench
  cfg.blip_dir, cfg.clip_dir, cfg.detector_dir = (metric_models[k] for k in ("blip", "clip", "owlv2"))
  items = [PromptItem("1", "a green bench and a red car", "color"),
           PromptItem("2", "a cat on the left of a dog", "spatial"),
           PromptItem("3", "three cats and two dogs", "numeracy"), PromptItem("4", "A man holds a map.", "non-spatial"),
           PromptItem("5", "The green plant was on the left of the white lamp.", "complex"),
           PromptItem("6", "a horse hidden by a car", "3d_spatial")]
  scorer = compbench.CompBenchScorer(cfg, device="cpu", dtype=F32, items=items)
  ims = _images(len(items))
  rows = scorer(ims, [it.to_dict() for it in items])
  assert [r["metric"] for r in rows] == ["blip_vqa", "spatial", "numeracy", "clip", "three_in_one", None]
  assert rows[5]["score"] is None and "depth" in rows[5]["skipped"]
  answers = scorer.blip.yes_probability([ims[0]] * 2, ["a green bench?", "a red car?"])
  assert rows[0]["score"] == pytest.approx(float(np.prod(answers)), abs=1e-6)
  assert rows[3]["score"] == pytest.approx(float(scorer.clip.cosine(ims[3:4], ["A man holds a map."])[0]), abs=1e-6)
  p = rows[4]["parts"]
  assert rows[4]["score"] == pytest.approx((p["blip_vqa"] + p["spatial"] + p["clip"]) / 3)
  assert [tuple(t) for t in rows[2]["detail"]["targets"]] == [("cat", 3), ("dog", 2)]


def test_mllm_judge_counts_failures_and_retries(metric_models, monkeypatch):
  cfg = config_utils.load_config(str(ROOT / "experiments/tiny_pipeline.py"), {}).eval.mllm
  cfg.model_dir, cfg.max_new_tokens, cfg.max_retries = metric_models["qwen2_5_vl"], 6, 1
  scorer = mllm_judge.MLLMScorer(cfg, device="cpu", texts=texts_lib.own_texts())
  rows = [{"id": str(k), "prompt": p, "category": "color"} for k, p in enumerate(["a red car", "two cats", "a bench"])]
  out = scorer(_images(3), rows)  # a random model writes no score: every answer fails, is asked twice, counted
  assert [(r["score"], r["tries"]) for r in out] == [(None, 2)] * 3 and all("failed" in r for r in out)
  answers = iter([["no score here", '{"score": 77}', "```json\n{\"score\": 12}\n```"], ['{"score": 55}']])
  calls = []

  def fake_chat(images, conversations, *, max_new_tokens, temperature=0.0):
    calls.append((len(conversations), temperature))
    return next(answers)

  monkeypatch.setattr(scorer.judge, "chat", fake_chat)
  out = scorer(_images(3), rows)
  assert [(r["score"], r["tries"]) for r in out] == [(55.0, 2), (77.0, 1), (12.0, 1)]
  assert calls == [(3, 0.0), (1, 0.7)]  # only the failed answer is asked again, sampling


def test_reasonbench_protocol(metric_models, tmp_path, monkeypatch):
  cfg = config_utils.load_config(str(ROOT / "experiments/tiny_pipeline.py"), {}).eval
  cfg.mllm.model_dir, cfg.mllm.max_new_tokens, cfg.mllm.max_retries = metric_models["qwen2_5_vl"], 4, 0
  questions = {"0001": {"id": 1, "reason_evaluation": ["q1", "q2"], "quality_evaluation": ["q3"]}}
  own = texts_lib.own_texts()
  scorer = reasonbench.ReasonBenchScorer(cfg.reasonbench, cfg.mllm, device="cpu", questions=questions,
                                         dimension="idiom_interpretation", texts=own)
  row = {"id": "0001#0", "prompt_id": "0001", "prompt": "a piece of cake", "category": "idiom_interpretation"}
  other = {"id": "0002", "prompt": "a storm in a teacup", "category": "idiom_interpretation"}
  first = scorer(_images(2), [row, other])  # the random model's answers fail; an unknown prompt id is skipped
  assert first[0]["score"] is None and "failed" in first[0] and "skipped" in first[1]
  seen = []

  def fake_chat(images, conversations, *, max_new_tokens, temperature=0.0):
    seen.append(conversations[0])
    return [["An easy task."], ['{"reason": ["r"], "score": [1, 0.5]}'], ['{"reason": ["r"], "score": [0.5]}']][
        len(seen) - 1]

  monkeypatch.setattr(scorer.judge, "chat", fake_chat)
  out = scorer(_images(1), [row])[0]
  assert out["score"] == pytest.approx(75.0) and out["quality"] == pytest.approx(50.0)
  second = seen[1]
  assert seen[0][0]["content"][1]["text"] == texts_lib.reasonbench_describe(own, "idiom_interpretation")
  assert second[1] == {"role": "assistant", "content": "An easy task."}  # the description, then the criteria
  assert second[2]["content"][0]["text"] == texts_lib.render_reasonbench(own, "idiom_interpretation",
                                                                         "reason_evaluation", ["q1", "q2"])
  assert "['q1', 'q2']" in second[2]["content"][0]["text"]  # Python's str() of the entry, as the benchmark


def test_geneval_scorer_rows(metric_models, tmp_path):
  cfg = config_utils.load_config(str(ROOT / "experiments/tiny_pipeline.py"), {}).eval.geneval
  cfg.detector_dir, cfg.clip_dir = metric_models["mask2former"], metric_models["clip"]
  cfg.threshold = cfg.counting_threshold = 0.0
  meta = {"00000": {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a red cat"},
          "00001": {"tag": "counting", "include": [{"class": "dog", "count": 2}],
                    "exclude": [{"class": "dog", "count": 3}],
                    "prompt": "two dogs"}}
  scorer = geneval.GenEvalScorer(cfg, device="cpu", dtype=F32, metadata=meta)
  rows = [{"id": f"{k}#0", "prompt_id": k, "prompt": m["prompt"], "category": m["tag"]} for k, m in meta.items()]
  rows.append({"id": "99999", "prompt": "x", "category": "colors"})
  out = scorer(_images(3), rows)
  assert all(isinstance(r["correct"], bool) and r["score"] == float(r["correct"]) for r in out[:2])
  assert out[2]["score"] is None and "metadata" in out[2]["skipped"]
  with pytest.raises(ValueError, match="no class"):  # Mask2Former's label set is closed
    geneval.GenEvalScorer(cfg, device="cpu", dtype=F32,
                          metadata={"0": {"tag": "single_object", "include": [{"class": "zebra", "count": 1}]}})


def _eval_config(tiny_model_dir, workdir, metric_models, **extra):
  m = metric_models
  return config_utils.load_config(str(ROOT / "experiments/tiny_pipeline.py"), {
      "model.dir": tiny_model_dir, "workdir": str(workdir), "eval.metrics": "judge,compbench,mllm",
      "eval.device": "cpu", "eval.compbench.blip_dir": m["blip"], "eval.compbench.clip_dir": m["clip"],
      "eval.compbench.detector_dir": m["owlv2"], "eval.mllm.model_dir": m["qwen2_5_vl"],
      "eval.mllm.max_new_tokens": 4, "eval.mllm.max_retries": 0, "eval.mllm.torch_dtype": "float32", **extra})


@pytest.mark.slow
def test_eval_command_tables_on_the_tiny_model_and_on_a_folder(tiny_model_dir, metric_models, tmp_path):
  cfg = _eval_config(tiny_model_dir, tmp_path, metric_models)
  assert commands.eval_main(cfg, None) == 0
  out = tmp_path / "eval" / "model"
  tables = json.loads((out / "table.json").read_text())
  assert set(tables) == {"oracle judge accuracy (%)", "T2I-CompBench (0-1)", "MLLM judge (0-100)"}
  assert tables["oracle judge accuracy (%)"]["overall"]["n"] == 5  # one image per shapes-world prompt
  assert tables["MLLM judge (0-100)"]["overall"] == {"mean": None, "n": 0, "unscored": 5}
  md = (out / "table.md").read_text()
  assert "| overall |" in md and "oracle judge accuracy" in md and "T2I-CompBench" in md
  assert (out / "grid.png").is_file() and (tmp_path / "eval" / "summary.md").is_file()
  scored = (out / "metrics" / "compbench.jsonl").read_text()
  assert commands.eval_main(cfg, None) == 0  # resumed: nothing is scored twice
  assert (out / "metrics" / "compbench.jsonl").read_text() == scored
  # the same images as a folder made elsewhere (flat, named by prompt id) give the same scores
  flat = tmp_path / "elsewhere"
  flat.mkdir()
  for png in (out / "images").glob("*.png"):
    shutil.copy(png, flat / png.name)
  folder_cfg = _eval_config(tiny_model_dir, tmp_path, metric_models, **{
      "eval.images_dir": str(flat), "eval.name": "folder", "eval.metrics": "judge,compbench"})
  assert commands.eval_main(folder_cfg, None) == 0
  again = json.loads((tmp_path / "eval" / "folder" / "table.json").read_text())
  for column in ("oracle judge accuracy (%)", "T2I-CompBench (0-1)"):
    assert again[column]["categories"] == tables[column]["categories"]
  summary = (tmp_path / "eval" / "summary.md").read_text()
  assert "| category | folder | model |" in summary


def test_eval_checks_metric_folders_before_work(tiny_model_dir, metric_models, tmp_path):
  cfg = _eval_config(tiny_model_dir, tmp_path, metric_models, **{"eval.compbench.blip_dir": str(tmp_path / "nope")})
  with pytest.raises(FileNotFoundError, match="eval.compbench.blip_dir"):
    commands.eval_main(cfg, None)
  assert not (tmp_path / "eval" / "model" / "images").exists()
  with pytest.raises(ValueError, match="unknown"):
    evaluate.parse_metrics("judge,clipscore")
