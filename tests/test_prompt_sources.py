"""Prompt sources: TXT / JSON / JSONL files, Python functions, the T2I-CompBench tfds builder."""
import json
import pathlib
import sys
import textwrap

import pytest

from srum_jax.data.prompt_sources import LoadReport, PromptItem, PromptList, load_prompts, prompt_id
from srum_jax.data.t2i_compbench import T2iCompbench

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "prompts"
SIX = ("color", "shape", "texture", "spatial", "non_spatial", "complex")


def test_txt_empty_lines_counted_ids_stable(tmp_path):
  path = tmp_path / "color_val.txt"
  path.write_text("a red apple\n\n   \na blue car  \na red apple\n\t\n")
  items = load_prompts(str(path))
  assert isinstance(items, PromptList) and isinstance(items.report, LoadReport)
  assert [(it.prompt, it.category) for it in items] == [("a red apple", "color"), ("a blue car", "color"),
                                                        ("a red apple", "color")]
  r = items.report
  assert r.seen == 6 and r.loaded == 3 and r.empty == [2, 3, 6] and r.malformed == []
  assert [it.id for it in items] == [prompt_id("color_val.txt", n, p) for n, p in
                                     [(1, "a red apple"), (4, "a blue car"), (5, "a red apple")]]
  assert len({it.id for it in items}) == 3  # same prompt on two lines: two ids
  assert r.duplicate_prompts == [(5, items[2].id)]
  assert [it.id for it in load_prompts({"path": str(path)})] == [it.id for it in items]  # stable
  flagged = load_prompts({"source": "file", "path": str(path), "category": "attribute"})
  assert {it.category for it in flagged} == {"attribute"}


def test_srum_json_excerpt():
  for split, first_id in (("train", "1"), ("val", "701")):
    path = FIXTURES / f"srum_{split}_comp_excerpt.json"
    raw = json.loads(path.read_text())
    items = load_prompts({"source": "file", "path": str(path)})
    assert len(raw) == 30 and len(items) == 30 and items[0].id == first_id
    assert items == [PromptItem(str(e["Question_id"]), e["Question"], e["Category"]) for e in raw]
    assert len({it.category for it in items}) == 10
    r = items.report
    assert (r.seen, r.loaded, r.empty, r.malformed, r.duplicate_ids) == (30, 30, [], [], [])
  only = load_prompts({"path": str(FIXTURES / "srum_val_comp_excerpt.json"), "categories": ["color", "shape"],
                       "limit": 4})
  assert [it.category for it in only] == ["color"] * 3 + ["shape"]
  assert only.report.filtered == 26


def test_json_strings_and_malformed_entries(tmp_path):
  path = tmp_path / "mixed_train.json"
  path.write_text(json.dumps([
    "a cat", 7, {"Category": "x"}, {"prompt": 3}, {"prompt": "ok", "id": 1.5}, {"prompt": "  "},
    {"prompt": "a dog", "category": "animals", "id": "d1"}, {"prompt": "a dog again", "id": "d1"}, ""]))
  items = load_prompts(str(path))
  assert [(it.prompt, it.category) for it in items] == [("a cat", "mixed"), ("a dog", "animals")]
  assert items[0].id == prompt_id("mixed_train.json", 1, "a cat") and items[1].id == "d1"
  r = items.report
  assert [pos for pos, _ in r.malformed] == [2, 3, 4, 5]
  assert r.empty == [6, 9] and r.duplicate_ids == [(8, "d1")] and r.seen == 9 and r.loaded == 2
  bad = tmp_path / "bad.json"
  bad.write_text("[{")
  with pytest.raises(ValueError, match="invalid JSON"):
    load_prompts(str(bad))
  bad.write_text('{"prompt": "not a list"}')
  with pytest.raises(ValueError, match="list"):
    load_prompts(str(bad))


def test_jsonl_malformed_lines_with_line_numbers(tmp_path):
  path = tmp_path / "prompts.jsonl"
  path.write_text(textwrap.dedent("""\
    {"Question": "two cups", "Category": "numeracy", "Question_id": 5}
    {"prompt": "a tree", "id": "t"}
    {"prompt": "broken",

    "a plain string"
    {"prompt": "another tree", "id": "t"}
    [1, 2]
    {"prompt": "\\t"}
    """))
  items = load_prompts({"path": str(path), "category": "misc"})
  assert [(it.id, it.prompt, it.category) for it in items] == [
    ("5", "two cups", "numeracy"), ("t", "a tree", "misc"),
    (prompt_id("prompts.jsonl", 5, "a plain string"), "a plain string", "misc")]
  r = items.report
  assert [pos for pos, _ in r.malformed] == [3, 7] and "invalid JSON" in r.malformed[0][1]
  assert r.empty == [4, 8] and r.duplicate_ids == [(6, "t")] and r.seen == 8
  assert "3 loaded of 8" in r.summary()


def test_python_source(tmp_path, monkeypatch):
  (tmp_path / "my_prompt_mod.py").write_text(textwrap.dedent("""\
    from srum_jax.data.prompt_sources import PromptItem

    def make(n, prefix="p"):
      for i in range(n):
        yield PromptItem(id=f"{prefix}{i}", prompt=f"prompt {i}", category="gen")
      yield {"Question": "from a dict", "Category": "d"}
      yield "a string"
      yield None
      yield {"prompt": ""}
    """))
  monkeypatch.syspath_prepend(str(tmp_path))
  items = load_prompts({"source": "python", "function": "my_prompt_mod:make", "kwargs": {"n": 2, "prefix": "q"}})
  assert [(it.id, it.prompt, it.category) for it in items[:3]] == [
    ("q0", "prompt 0", "gen"), ("q1", "prompt 1", "gen"),
    (prompt_id("my_prompt_mod:make", 3, "from a dict"), "from a dict", "d")]
  assert items[3].category == "uncategorized"
  assert items.report.malformed[0][0] == 5 and items.report.empty == [6]
  with pytest.raises(ValueError, match="module.path:function"):
    load_prompts({"source": "python", "function": "my_prompt_mod.make"})


def test_config_errors(tmp_path):
  import ml_collections

  with pytest.raises(FileNotFoundError):
    load_prompts(str(tmp_path / "missing.txt"))
  (tmp_path / "p.csv").write_text("a\n")
  with pytest.raises(ValueError, match="format"):
    load_prompts(str(tmp_path / "p.csv"))
  assert [it.prompt for it in load_prompts({"path": str(tmp_path / "p.csv"), "format": "txt"})] == ["a"]
  cfg = ml_collections.ConfigDict({"source": "file", "path": str(tmp_path / "p.csv"), "format": "txt"})
  assert len(load_prompts(cfg)) == 1
  with pytest.raises(ValueError, match="unknown prompt source"):
    load_prompts({"source": "web"})


def _write_compbench(root: pathlib.Path):
  """Six categories x {train, val}: two prompts each, with blank lines in between."""
  root.mkdir(parents=True, exist_ok=True)
  for cat in SIX:
    for split in ("train", "val"):
      (root / f"{cat}_{split}.txt").write_text(f"{cat} {split} first\n\n  \n{cat} {split} second\n")


def test_tfds_builder_from_local_files(tmp_path):
  import tensorflow_datasets as tfds

  local = tmp_path / "dataset"
  _write_compbench(local)
  data_dir = tmp_path / "tfds"
  items = load_prompts({"source": "tfds", "split": "val", "data_dir": str(data_dir), "local_dir": str(local)})
  expected = [(f"{c}_val:{n:05d}", f"{c} val {w}", c) for c in SIX for n, w in ((1, "first"), (4, "second"))]
  assert [(it.id, it.prompt, it.category) for it in items] == expected
  assert items.report.loaded == 12 and items.report.malformed == [] and items.report.empty == []
  assert list((data_dir / "t2i_compbench" / "original" / "1.0.0").glob("*.array_record*"))
  # prepared data reads back without rebuilding (no local files, no network) and without tensorflow
  train = load_prompts({"source": "tfds", "split": "train", "data_dir": str(data_dir), "prepare": False,
                        "categories": ["shape"]})
  assert [it.id for it in train] == ["shape_train:00001", "shape_train:00004"] and train.report.filtered == 10
  source = tfds.data_source("t2i_compbench", split="train", data_dir=str(data_dir), download=False)
  assert len(source) == 12 and source[0]["prompt"] == b"color train first"
  assert "tensorflow" not in sys.modules


def test_tfds_builder_manual_dir_and_missing_files(tmp_path):
  import tensorflow_datasets as tfds


  manual = tmp_path / "manual"
  _write_compbench(manual)
  for name in ("3d_spatial", "numeracy"):
    for split in ("train", "val"):
      (manual / f"{name}_{split}.txt").write_text(f"{name} {split}\n")
  builder = T2iCompbench(config="plus", data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  val = builder.as_data_source(split="val")
  assert len(val) == 14 and val[13] == {"prompt": b"numeracy val", "category": b"numeracy",
                                        "id": b"numeracy_val:00001"}
  (manual / "texture_val.txt").unlink()
  with pytest.raises(FileNotFoundError, match="texture_val.txt"):
    T2iCompbench(data_dir=str(tmp_path / "tfds2"), local_dir=str(manual)).download_and_prepare()
  with pytest.raises(FileNotFoundError, match="local_dir"):
    T2iCompbench(data_dir=str(tmp_path / "tfds3"), local_dir=str(tmp_path / "nope")).download_and_prepare()
