"""Fuzzing the stage readers with generated input (hypothesis): resumable JSONL logs, reward records (garbage,
NaN/inf, bad boxes, random bytes), training-data validation, prompt files (txt, jsonl, json lists like
train_comp.json) and the judge's answer parsers. Nothing may raise (except a whole-file refusal the reader
documents), and every line is accounted for: kept + skipped == lines. 1,100 generated inputs in all."""
import json
import math
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from srum_jax.data.prompt_sources import load_prompts
from srum_jax.errors import UserValueError
from srum_jax.pipeline import train_records
from srum_jax.rewards import parsing, records
from srum_jax.workdir import layout, logs


def fuzz(n: int):
  """Settings of one fuzz test: n generated inputs, no deadline (file I/O), derandomized (the same inputs each
  run, so a CI failure reproduces), no example database written into the repository."""
  return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NUMBERS = st.one_of(st.integers(-10 ** 6, 10 ** 6), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 0.5, 1e308, -1e308, 2 ** 31, 1.0000001]))
JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=8)),
                       lambda inner: st.one_of(st.lists(inner, max_size=3),
                                               st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                       max_leaves=6)
WRONG = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.lists(st.integers(-2, 2), max_size=2),
                  st.dictionaries(st.text(max_size=3), st.integers(-2, 2), max_size=2))  # flat wrong types
BOXES = st.one_of(st.lists(NUMBERS, min_size=4, max_size=4), st.lists(NUMBERS, max_size=6), WRONG)
REGION = st.fixed_dictionaries({"box": BOXES, "score": st.one_of(NUMBERS, WRONG)},
                               optional={"object": st.one_of(st.none(), st.text(max_size=10), WRONG)})
IMAGE_FILES = st.sampled_from(["ok.png", "small.png", "corrupt.png", "missing.png", "../ok.png", ""])
RECORD = st.fixed_dictionaries(
    {"schema_version": st.sampled_from([1, 1, 1, 2, "1", None]),
     "image_file": st.one_of(IMAGE_FILES, WRONG), "prompt": st.one_of(st.text(max_size=20), WRONG),
     "global_score": st.one_of(NUMBERS, st.none(), WRONG),
     "regions": st.one_of(st.lists(REGION, max_size=4), WRONG)},
    optional={"image_size": st.one_of(st.lists(NUMBERS, min_size=2, max_size=2), WRONG),
              "metadata": st.one_of(st.fixed_dictionaries({"id": st.sampled_from(["a", "b", "c"])}), WRONG)})


def _dumps(obj) -> bytes:
  """JSON bytes that may hold NaN / Infinity (as a crashed or foreign writer could leave them)."""
  return json.dumps(obj, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


def _line(draw_obj):
  return st.one_of(draw_obj.map(_dumps), st.binary(max_size=40),  # garbage bytes (maybe invalid UTF-8)
                   draw_obj.map(lambda o: _dumps(o)[:max(1, len(_dumps(o)) // 2)]),  # torn
                   st.just(b"[" * 3000), st.just(b"1" * 5000), st.just("\u00fc".encode()[:1]))


def _file(lines, trailing_newline) -> bytes:
  return b"\n".join(lines) + (b"\n" if trailing_newline else b"")


def _nonblank(blob: bytes) -> int:
  return sum(1 for raw in blob.split(b"\n") if raw.strip())


LOG_ROW = st.fixed_dictionaries({"id": st.one_of(st.sampled_from(["a", "b", "c", "d"]), WRONG)},
                                optional={"image_file": st.one_of(st.text(max_size=8), WRONG),
                                          "prompt": st.one_of(st.text(max_size=8), WRONG),
                                          "regions": st.one_of(st.lists(REGION, max_size=3), WRONG),
                                          "seq": st.one_of(st.integers(-3, 3), WRONG)})


@fuzz(250)
@given(lines=st.lists(_line(LOG_ROW), max_size=8), trailing=st.booleans())
def test_resumable_logs_read_any_bytes(lines, trailing):
  blob = _file(lines, trailing)
  with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, "metadata.jsonl"), "wb") as f:
      f.write(blob)
    with open(os.path.join(d, "regions.jsonl"), "wb") as f:
      f.write(blob)
    rows, rep = logs.JsonlLog(os.path.join(d, "metadata.jsonl")).read()
    assert rep.rows + rep.undecodable + rep.malformed == _nonblank(blob) and rep.rows == len(rows)
    for reader in (layout.read_metadata, layout.read_regions):
      rep = logs.LogReport()
      got = reader(d, rep)
      assert rep.rows == len(got) and rep.rows + rep.skipped == _nonblank(blob)
      assert len({r["id"] for r in got}) == len(got)  # one row per id
    for r in layout.read_metadata(d):
      assert isinstance(r["image_file"], str) and isinstance(r["prompt"], str)
    # appending after whatever is there gives one more readable row
    logs.JsonlLog(os.path.join(d, "metadata.jsonl")).append({"id": "new", "image_file": "x", "prompt": "p"})
    assert "new" in logs.JsonlLog(os.path.join(d, "metadata.jsonl")).done()


@fuzz(250)
@given(lines=st.lists(_line(RECORD), max_size=6), trailing=st.booleans())
def test_reward_records_read_any_bytes(lines, trailing):
  blob = _file(lines, trailing)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "rewards.jsonl")
    with open(path, "wb") as f:
      f.write(blob)
    recs, rep = records.read_records(path)
    assert rep.records == len(recs) and rep.records + len(rep.skipped) == rep.lines == _nonblank(blob)
    for r in recs:  # what is accepted is finite and in range
      assert r.global_score is None or -1 <= r.global_score <= 1
      assert all(-1 <= g.score <= 1 and all(math.isfinite(v) for v in g.box) for g in r.regions)
    off, orep = records.read_official_records(path)
    assert orep.records + len(orep.skipped) == orep.lines == _nonblank(blob)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
  """A good image, a tiny one and a corrupt one (records may also name missing files)."""
  d = str(tmp_path_factory.mktemp("fuzz_images"))
  Image.new("RGB", (16, 12), (1, 2, 3)).save(os.path.join(d, "ok.png"))
  Image.new("RGB", (3, 2), (9, 9, 9)).save(os.path.join(d, "small.png"))
  with open(os.path.join(d, "corrupt.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + bytes(range(60)))
  return d


@fuzz(100)
@given(lines=st.lists(_line(RECORD), max_size=6), drop_zero=st.booleans())
def test_training_validation_accounts_for_every_line(image_dir, lines, drop_zero):
  blob = _file(lines, True)
  img = image_dir
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "records.jsonl")
    with open(path, "wb") as f:
      f.write(blob)
    good, rep = train_records.validate_records(path, img, max_regions=3, drop_zero_global=drop_zero, threads=1)
    assert rep.kept == len(good) and rep.kept + rep.skipped == rep.lines == _nonblank(blob)
    for g in good:
      w, h = g["image_size"]
      assert len(g["regions"]) <= 3
      for reg in g["regions"]:
        x0, y0, x1, y1 = reg["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and -1 <= reg["score"] <= 1


PROMPT_ENTRY = st.one_of(
    st.fixed_dictionaries({}, optional={"Question": st.one_of(st.text(max_size=15), JSONISH),
                                        "prompt": st.one_of(st.text(max_size=15), JSONISH),
                                        "Category": st.one_of(st.text(max_size=6), JSONISH),
                                        "Question_id": st.one_of(st.text(max_size=4), st.integers(0, 5), JSONISH),
                                        "id": st.one_of(st.text(max_size=4), JSONISH)}),
    st.text(max_size=15), JSONISH)


def _accounted(items) -> None:
  rep = items.report
  assert rep.loaded == len(items)
  assert rep.loaded + len(rep.empty) + len(rep.malformed) + len(rep.duplicate_ids) == rep.seen
  assert len({it.id for it in items}) == len(items)
  assert all(it.prompt == it.prompt.strip() and it.prompt for it in items)


@fuzz(200)
@given(fmt=st.sampled_from(["txt", "jsonl", "json"]), entries=st.lists(PROMPT_ENTRY, max_size=6),
       text=st.text(max_size=80), raw=st.one_of(st.none(), st.binary(max_size=40)), bom=st.booleans())
def test_prompt_files_load_or_refuse_clearly(fmt, entries, text, raw, bom):
  if raw is not None:
    blob = raw
  elif fmt == "txt":
    blob = text.encode("utf-8", "surrogatepass")
  elif fmt == "jsonl":
    blob = b"\n".join(_dumps(e) for e in entries) + b"\n" + text.encode("utf-8", "surrogatepass")
    blob += b"\n" + (b"[" * 3000 if len(entries) % 3 == 1 else b"1" * 5000 if len(entries) % 3 == 2 else b"")
  else:
    blob = _dumps(entries) if len(entries) % 4 else b"[" * 3000
  blob = (b"\xef\xbb\xbf" if bom else b"") + blob
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, f"color_train.{fmt}")
    with open(path, "wb") as f:
      f.write(blob)
    try:
      items = load_prompts(path)
    except UserValueError as e:  # a whole-file refusal naming the file (not UTF-8; for json: not a JSON list)
      assert path in str(e) and ("not UTF-8" in str(e) or fmt == "json"), e
      return
    _accounted(items)
    if fmt != "json":
      assert items.report.seen == len(blob.decode("utf-8-sig").splitlines())
    assert all(it.category for it in items)


ANSWER = st.one_of(
    st.text(max_size=60),
    st.builds(lambda pre, num, post: f"{pre}Score: {num}{post}", st.text(max_size=10),
              st.one_of(NUMBERS.map(str), st.sampled_from(["nan", "-inf", "1/0", "3/4", "0/0", "1e999", "+.5"])),
              st.text(max_size=10)),
    st.lists(st.builds(lambda i, s, o: f"Region ID: {i}\nIdentified Object: {o}\nScore: {s}\n",
                       st.integers(-2, 6), NUMBERS.map(str), st.text(max_size=6)), max_size=5).map("".join),
    JSONISH)


@fuzz(300)
@given(answer=ANSWER, num_regions=st.one_of(st.integers(-1, 5), JSONISH))
def test_judge_answer_parsing_never_raises_and_counts(answer, num_regions):
  stats = parsing.ParseStats()
  g = parsing.parse_global_score(answer, stats)
  if isinstance(answer, str):
    assert stats.texts == 1 and stats.scores + stats.missing == 1
  assert g is None or (math.isfinite(g) and -1 <= g <= 1)
  rstats = parsing.ParseStats()
  regions = parsing.parse_region_answers(answer, num_regions, rstats)
  for rid, a in regions.items():
    assert 1 <= rid and math.isfinite(a.score) and -1 <= a.score <= 1
  if isinstance(answer, str) and isinstance(num_regions, int) and not isinstance(num_regions, bool) \
      and num_regions >= 0:
    assert len(regions) + rstats.missing == num_regions and rstats.scores == len(regions)
  assert np.isfinite(list(parsing.parse_region_scores(answer, 3).values()) or [0.0]).all()
