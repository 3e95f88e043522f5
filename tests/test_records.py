"""Reward records: JSONL round trip, malformed lines skipped with line numbers, official format both ways,
the formatting filter and padded arrays."""
import json

import numpy as np
import pytest

from srum_jax.rewards import records


def _rec(i=0, g=0.5, regions=((0, 0, 10, 10, 0.5, "dog"),), **kw):
  regions = tuple(records.RegionReward((x0, y0, x1, y1), s, o) for x0, y0, x1, y1, s, o in regions)
  return records.RewardRecord(image_file=f"{i:05d}.png", prompt=f"prompt {i}", global_score=g, regions=regions, **kw)


def test_round_trip(tmp_path):
  recs = [_rec(0), _rec(1, g=None, regions=()), _rec(2, g=-1.0, global_reason="bad", image_size=(1024, 768),
                                                     metadata={"seed": 3, "tags": ["a"]}),
          _rec(3, regions=((1.5, -2, 30, 40.25, -0.25, None), (0, 0, 1, 1, 1.0, "ünïcode")))]
  path = tmp_path / "r.jsonl"
  assert records.write_records(path, recs[:2]) == 2
  for r in recs[2:]:
    records.append_record(path, r)
  got, report = records.read_records(path)
  assert got == recs
  assert report.lines == 4 and report.records == 4 and report.skipped == []
  assert json.loads(path.read_text().splitlines()[0])["schema_version"] == records.SCHEMA_VERSION


def test_malformed_lines_skipped_with_line_numbers(tmp_path):
  good = json.dumps(_rec(0).to_dict())
  bad = {
    2: "{not json",
    3: json.dumps([1, 2]),
    4: json.dumps({**_rec(0).to_dict(), "schema_version": 99}),
    5: json.dumps({k: v for k, v in _rec(0).to_dict().items() if k != "prompt"}),
    6: json.dumps({**_rec(0).to_dict(), "global_score": "high"}),
    7: good.replace('"global_score": 0.5', '"global_score": NaN'),
    8: json.dumps({**_rec(0).to_dict(), "regions": [{"box": [0, 0, 1], "score": 0.1}]}),
    9: json.dumps({**_rec(0).to_dict(), "regions": [{"box": [0, 0, 1, 2], "score": 1.5}]}),
    10: json.dumps({**_rec(0).to_dict(), "regions": [{"box": [0, 0, "a", 2], "score": 0.1}]}),
    11: json.dumps({**_rec(0).to_dict(), "image_file": 7}),
    12: json.dumps({**_rec(0).to_dict(), "global_score": True}),
    13: good.replace('"score": 0.5', '"score": Infinity'),
    14: json.dumps({**_rec(0).to_dict(), "regions": [{"box": [0, 0, 10 ** 400, 2], "score": 0.1}]}),
    16: "[" * 100000,
  }
  lines = [good] + [bad.get(n, good if n != 15 else "   ") for n in range(2, 17)] + [good]
  path = tmp_path / "m.jsonl"
  path.write_text("\n".join(lines) + "\n")
  got, report = records.read_records(path)
  assert [n for n, _ in report.skipped] == sorted(bad)
  assert len(got) == report.records == 2 and report.lines == 16  # line 15 is blank: not counted
  assert all(isinstance(why, str) and why for _, why in report.skipped)


def test_official_format_in_and_out(tmp_path, golden_manifest):
  lists = golden_manifest["cases"]["srum"]["reward_lists"]
  official = {"bad_image_file": "a.png", "good_image_file": "a.png", "prompt": "p", "vlm_rewards": lists[0]}
  r = records.from_official(official)
  assert r.global_score == 0.6 and r.image_size == (24, 32) and len(r.regions) == 4
  assert r.regions[1] == records.RegionReward((10.0, 0.0, 24.0, 12.0), -0.5, "b")
  back = records.to_official(r)
  assert back["bad_image_file"] == back["good_image_file"] == "a.png"
  assert [e["object"] for e in back["vlm_rewards"]] == [e["object"] for e in lists[0]]
  assert [e["bbox"] for e in back["vlm_rewards"]] == [e["bbox"] for e in lists[0]]
  assert [e["score"] for e in back["vlm_rewards"]] == [e["score"] for e in lists[0]]
  assert records.from_official(back) == r
  # entries the official map ignores are dropped; file differences kept in metadata
  odd = {"bad_image_file": "b.png", "good_image_file": "g.png", "prompt": "q",
         "vlm_rewards": [{"object": "x", "bbox": [1, 2, 3], "score": 0.5}, {"object": "y", "bbox": [0, 0, 4, 4]},
                         {"object": "z", "bbox": [0, 0, 4, 4], "score": -0.2},
                         {"object": records.GLOBAL_OBJECT, "bbox": [0, 0, 4, 4], "reason": "no score"}]}
  r2 = records.from_official(odd)
  assert r2.global_score is None and [x.object for x in r2.regions] == ["z"]
  assert records.to_official(r2)["good_image_file"] == "g.png"
  # file I/O with a malformed official line
  path = tmp_path / "o.jsonl"
  records.write_official_records(path, [r, r2])
  with open(path, "a") as f:
    f.write(json.dumps({"bad_image_file": "c.png", "prompt": "p", "vlm_rewards": [{"object": "k", "bbox": [0, 0, 1, 1],
                                                                                   "score": "bad"}]}) + "\n")
  got, report = records.read_official_records(path)
  assert got == [r, r2] and [n for n, _ in report.skipped] == [3]
  with pytest.raises(ValueError):
    records.from_official({"prompt": "p", "vlm_rewards": []})


def test_formatting_filter_counts():
  recs = [_rec(0, g=0.0), _rec(1, g=None), _rec(2, g=None, regions=()), _rec(3, g=0.4), _rec(4, g=-0.3, regions=())]
  kept, rep = records.formatting_filter(recs)
  assert [r.image_file for r in kept] == ["00003.png", "00004.png"]
  assert (rep.total, rep.kept, rep.dropped_zero_global, rep.dropped_missing_global, rep.dropped_empty) == (5, 2, 1, 2, 0)
  kept, rep = records.formatting_filter(recs, drop_zero_global=False)
  assert [r.image_file for r in kept] == ["00000.png", "00001.png", "00003.png", "00004.png"]
  assert (rep.kept, rep.dropped_zero_global, rep.dropped_missing_global, rep.dropped_empty) == (4, 0, 0, 1)


def test_records_to_arrays():
  recs = [_rec(0, g=None, regions=((-0.5, 1.9, 13.99999999, 4, 0.5, "a"), (0, 0, 1, 1, -1.0, "b"),
                                   (2, 2, 3, 3, 0.3, "c"))),
          _rec(1, g=0.25, regions=())]
  stats = records.ArrayStats()
  boxes, scores, valid, g = records.records_to_arrays(recs, max_regions=2, stats=stats)
  assert boxes.shape == (2, 2, 4) and boxes.dtype == np.float32 and valid.dtype == bool
  np.testing.assert_array_equal(boxes[0, 0], [0, 1, 13, 4])  # int() truncation, done in float64
  np.testing.assert_array_equal(scores, [[0.5, -1.0], [0, 0]])
  np.testing.assert_array_equal(valid, [[True, True], [False, False]])
  np.testing.assert_array_equal(g, np.array([0.0, 0.25], np.float32))
  assert stats.missing_global == 1 and stats.dropped_regions == 1
