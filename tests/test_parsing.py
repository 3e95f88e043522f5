"""Judge-answer parsers: every tolerance, the blank-line fix, clamp counting, think stripping, never raising;
and the own judge prompts' contract."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from srum_jax.rewards import parsing, texts as texts_lib

# ---- global ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
  ("Score: 0.8\nReason: fine", 0.8),
  ("score: -0.5", -0.5),
  ("SCORE: +0.3", 0.3),
  ("**Score:** 0.8", 0.8),
  ("**Score**: -0.9", -0.9),
  ("Score: **0.7**", 0.7),
  ("Score = 0.25", 0.25),
  ("Score: .5", 0.5),
  ("Score: 0.8/1", 0.8),
  ("Score: -1/1", -1.0),
  ("Score: 8/10", 0.8),
  ("Score: 0.6.", 0.6),
  ("Final Score: 1", 1.0),
  ("Score: N/A\nScore: 0.4", 0.4),  # labels without a number are skipped, as official
  ("Score: 0.1 then Score: 0.9", 0.1),  # the first one wins
])
def test_global_tolerances(text, want):
  assert parsing.parse_global_score(text) == pytest.approx(want)


def test_global_think_stripping():
  text = "<think>Maybe Score: -1.0 ... </think>thinking again Score: 0.2</THINK>\nScore: 0.5\nReason: ok"
  assert parsing.parse_global_score(text) == 0.5
  assert parsing.parse_global_score("<think>Score: 0.9</think> no score here") is None
  assert parsing.strip_think("a</think>b</think>c") == "c"
  assert parsing.strip_think("no tags") == "no tags"


def test_global_reason():
  assert parsing.parse_global_answer("Score: 0.5\nReason: the cup is left") == (0.5, "the cup is left")
  assert parsing.parse_global_answer("**Reason:** wrong side\n**Score:** -0.5") == (-0.5, "wrong side")
  assert parsing.parse_global_answer("Score: 0.5 because it fits") == (0.5, "because it fits")
  assert parsing.parse_global_answer("Score: 0.5") == (0.5, None)


@pytest.mark.parametrize("text", ["Score: nan", "Score: inf", "Score: -Infinity", "Score: 1e999", "Score: 3/0",
                                  "Score: NaN/1", "no score", "", "Score:", "Score: abc", "Score: information"])
def test_global_garbage_is_none(text):
  stats = parsing.ParseStats()
  assert parsing.parse_global_score(text, stats) is None
  assert stats.missing == 1 and stats.scores == 0


def test_clamps_are_counted():
  stats = parsing.ParseStats()
  assert parsing.parse_global_score("Score: 5", stats) == 1.0
  assert parsing.parse_global_score("Score: -2.5", stats) == -1.0
  assert parsing.parse_global_score("Score: 1e3", stats) == 1.0
  assert parsing.parse_global_score("Score: 1.0", stats) == 1.0  # in range: not a clamp
  assert (stats.clamped, stats.scores, stats.texts) == (3, 4, 4)
  parsing.parse_region_scores("Region ID: 1\nScore: 9", 1, stats)
  assert stats.clamped == 4
  assert stats.merge(parsing.ParseStats(clamped=1)).clamped == 5


@pytest.mark.parametrize("bad", [None, 3, 0.5, b"Score: 0.5", ["Score: 0.5"], {"a": 1}])
def test_non_str_inputs(bad):
  assert parsing.parse_global_score(bad) is None
  assert parsing.parse_global_answer(bad) is None
  assert parsing.parse_region_scores(bad, 3) == {}
  assert parsing.parse_region_answers(bad, 3) == {}


# ---- regions ---------------------------------------------------------------------------------------------

REGIONS = """<think>Region ID: 1 looks like Score: -1.0</think>
Region ID: 1
Identified Object: a brown dog
Score: 0.8

Region ID: 2
Identified Object: **a red ball**
Score: -0.5
Reason: wrong colour

Region ID: 3
Identified Object: tree
Score: 0.1
"""


def test_regions_basic_with_objects():
  ans = parsing.parse_region_answers(REGIONS, 3)
  assert {k: a.score for k, a in ans.items()} == {1: 0.8, 2: -0.5, 3: 0.1}
  assert ans[1].object == "a brown dog" and ans[2].object == "a red ball" and ans[2].reason == "wrong colour"
  assert parsing.parse_region_scores(REGIONS, 3) == {1: 0.8, 2: -0.5, 3: 0.1}


def test_regions_without_blank_lines_are_all_kept():
  """Official splits on blank lines, so these three collapse into one block and only region 1 survives;
  we split on every 'Region ID:' instead."""
  text = "Region ID: 1\nScore: 0.5\nRegion ID: 2\nScore: -0.3\nRegion ID: 3\nIdentified Object: cat\nScore: 0.9"
  assert parsing.parse_region_scores(text, 3) == {1: 0.5, 2: -0.3, 3: 0.9}
  inline = "Region ID: 1, Score: 0.5; Region ID: 2, Score: 0.6"
  assert parsing.parse_region_scores(inline, 2) == {1: 0.5, 2: 0.6}


def test_regions_markdown_case_signs_fractions():
  text = ("**Region ID:** 1\n**Identified Object:** dog\n**Score:** +0.7\n"
          "region id: 2\nidentified object: cat\nscore: 0.9/1\n"
          "REGION ID 3\nScore: 6/10\n")
  ans = parsing.parse_region_answers(text, 3)
  assert {k: a.score for k, a in ans.items()} == pytest.approx({1: 0.7, 2: 0.9, 3: 0.6})
  assert ans[1].object == "dog" and ans[2].object == "cat" and ans[3].object is None


def test_regions_ids_duplicates_and_garbage():
  stats = parsing.ParseStats()
  text = ("Region ID: 0\nScore: 0.1\n\nRegion ID: 4\nScore: 0.2\n\nRegion ID: 2\nScore: 0.3\n\n"
          "Region ID: 2\nScore: 0.9\n\nRegion ID: 1\nScore: nan\n\nRegion ID: 3\nIdentified Object: x\n\n"
          "Region ID: 99999999999999999999999\nScore: 0.5")
  assert parsing.parse_region_scores(text, 3, stats) == {2: 0.3}  # first block of id 2 wins
  assert stats.ignored_ids == 3 and stats.duplicates == 1 and stats.garbage == 1 and stats.missing == 2


def test_regions_first_score_for_an_id_wins():
  text = "Region ID: 1\nIdentified Object: dog\n\nRegion ID: 1\nScore: 0.4\n\nRegion ID: 1\nScore: 0.9"
  assert parsing.parse_region_scores(text, 1) == {1: 0.4}
  assert parsing.parse_region_scores("Region ID: 1\nScore: inf\nRegion ID: 1\nScore: 0.9", 1) == {}


def test_regions_first_score_in_block_wins_and_clamped():
  stats = parsing.ParseStats()
  assert parsing.parse_region_scores("Region ID: 1\nScore: 3\nScore: 0.2", 1, stats) == {1: 1.0}
  assert stats.clamped == 1


@pytest.mark.parametrize("n", [0, -1, 2.0, "3", None])
def test_regions_bad_num_regions(n):
  assert parsing.parse_region_scores("Region ID: 1\nScore: 0.5", n) == {}


# ---- never raise -----------------------------------------------------------------------------------------

_TOKENS = ["Score:", "score :", "**Score:**", "Region ID:", "region id", "Identified Object:", "Reason:", "</think>",
           "<think>", "\n", "\n\n", " ", "*", "/", ".", "e", "E", "+", "-", "nan", "inf", "Infinity", "0", "1", "7",
           "0.5", "10", "1e999", "99999999999999999999", "=", ":"]
_texts = st.lists(st.one_of(st.sampled_from(_TOKENS), st.text(max_size=4)), max_size=40).map("".join)


@settings(max_examples=1000, deadline=None)
@given(_texts, st.integers(-2, 6))
def test_prop_parsers_never_raise_and_stay_in_range(text, n):
  stats = parsing.ParseStats()
  g = parsing.parse_global_score(text, stats)
  assert g is None or (-1.0 <= g <= 1.0 and not math.isnan(g))
  ga = parsing.parse_global_answer(text)
  assert ga is None or ga[0] == g
  regions = parsing.parse_region_answers(text, n, stats)
  assert all(1 <= k <= max(n, 0) for k in regions)
  assert all(-1.0 <= a.score <= 1.0 for a in regions.values())
  assert parsing.parse_region_scores(text, n) == {k: a.score for k, a in regions.items()}


# ---- prompts ---------------------------------------------------------------------------------------------

def test_prompts_contract():
  own = texts_lib.own_texts()
  g = texts_lib.render_global(own, "a cat  left of\na dog")
  assert '"a cat left of a dog"' in g and "Score: <" in g and "Reason: <" in g and "0.0" in g
  for band in ("1.0", "0.5 to 0.9", "-0.4 to 0.4", "-0.9 to -0.5", "-1.0"):
    assert band in g
  r = texts_lib.render_regions(own, "two cats", [[0, 0, 10, 20], [5.5, 1, 7, 8]])
  assert "Region ID: 1\nBounding Box: [0, 0, 10, 20]" in r and "Region ID: 2\nBounding Box: [5.5, 1, 7, 8]" in r
  assert "Identified Object:" in r and "strict" in r and "-0.9 to -0.5" in r
  for p in (own.judge_think_system, own.gen_think_system):
    assert "<think>" in p and "</think>" in p
  # the region prompt's own example answer parses to the advertised scores
  example = r.split("Example answer for two regions:\n", 1)[1]
  assert parsing.parse_region_scores(example, 2) == {1: 0.8, 2: -0.6}
