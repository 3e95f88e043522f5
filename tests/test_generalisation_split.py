"""The generalisation split (`worlds/shapes/generalisation.py`): forms outside every grammar
category, deterministic, parseable, placeable, and judged right by the oracle on true scenes and
hard negatives; the anchor's prompts (`worlds/shapes/anchors.py`)."""
import collections

import numpy as np
import pytest
from test_oracle import degrade

from srum_jax import config_utils
from srum_jax.data.prompt_sources import PromptItem, load_prompts, prompt_source
from srum_jax.errors import UserValueError
from srum_jax.pipeline import run
from srum_jax.worlds.shapes import (anchors, generalisation as gen, grammar, judge_text, oracle,
                                    scene as scene_lib)


def _kind(g):
  return (g.color, g.shape)


def test_split_is_deterministic_sized_and_outside_every_grammar_category():
  ps = gen.gen_prompts()
  assert [p.text for p in ps] == [p.text for p in gen.gen_prompts()]
  assert collections.Counter(p.category for p in ps) == {c: 100 for c in gen.GEN_CATEGORIES}
  assert len({p.text for p in ps}) == 400
  grammar_texts = {p.text for p in grammar.all_prompts()}
  grammar_keys = {grammar.canonical(p.spec) for p in grammar.all_prompts()}
  assert not {p.text for p in ps} & grammar_texts
  assert not {grammar.canonical(p.spec) for p in ps} & grammar_keys
  train, val = grammar.split_prompts(0)
  assert not {p.text for p in ps} & {p.text for p in train + val}
  assert {p.text for p in gen.gen_prompts(seed=1)} != {p.text for p in ps}
  assert gen.gen_sizes() == {"three_and": 156, "count_and": 720, "rel_shared": 120,
                             "count_rel": 1824}
  with pytest.raises(ValueError):
    gen.gen_prompts(per_category=121)  # rel_shared has 120 combinations


def test_prompts_parse_fit_the_vocabulary_and_have_their_category_traits():
  orders = collections.Counter()
  for p in gen.gen_prompts():
    assert grammar.parse_prompt(p.text) == p.spec and grammar.realize(p.spec) == p.text
    words = grammar.tokenize(p.text)
    assert set(words) <= set(grammar.VOCAB) and len(words) <= 11
    kinds = [_kind(g) for g in p.spec.objects]
    assert len(set(kinds)) == len(kinds) and sum(g.count for g in p.spec.objects) <= 4
    if p.category == "three_and":
      assert len(kinds) == 3 and not p.spec.relations and not any(g.exact for g in p.spec.objects)
      assert len({k[1] for k in kinds}) < 3  # a repeated shape
      orders[grammar.canonical(p.spec) == p.spec] += 1
    elif p.category == "count_and":
      assert len(kinds) == 2 and not p.spec.relations and any(g.exact for g in p.spec.objects)
      dets = sorted((g.count, g.exact) for g in p.spec.objects)
      a, b = kinds
      numeracy_pair = dets == [(1, True), (2, True)] and a[0] != b[0] and a[1] != b[1]
      assert not numeracy_pair
    elif p.category == "rel_shared":
      (a, b), (_,) = kinds, p.spec.relations  # one relation
      assert (a[0] == b[0]) != (a[1] == b[1]) and not any(g.exact for g in p.spec.objects)
    else:
      assert p.category == "count_rel" and p.spec.relations and any(g.exact for g in p.spec.objects)
      dets = {(g.count, g.exact) for g in p.spec.objects}
      a, b = kinds
      complex_form = dets == {(2, True), (1, False)} and a[0] != b[0] and a[1] != b[1]
      assert not complex_form
  assert orders[True] and orders[False]  # word orders vary, not only the canonical one


def test_prompt_source_serves_the_gen_split():
  items = load_prompts(
      prompt_source(source="python", function="srum_jax.worlds.shapes.sources:prompts",
                    kwargs={"split": "gen"}))
  assert len(items) == 400 and items[0].id == "gen/three_and/0" and items[1].category == "count_and"
  assert {i.prompt for i in items} == {p.text for p in gen.gen_prompts()}
  few = load_prompts(
      prompt_source(source="python", function="srum_jax.worlds.shapes.sources:prompts",
                    kwargs={"split": "gen", "per_category": 3}))
  assert [i.category for i in few] == list(gen.GEN_CATEGORIES) * 3


def _judged(prompts, seed, damage=None):
  """(accuracy on true scenes per category, rejection rate per hard-negative kind) as
  {name: [k, n]}."""
  rng = np.random.default_rng(seed)
  look = (lambda im: im) if damage is None else (lambda im: damage(im, rng))
  pos, neg = collections.defaultdict(lambda: [0, 0]), collections.defaultdict(lambda: [0, 0])
  for p in prompts:
    scene = grammar.sample_scene(rng, p)
    t = pos[p.category]
    t[0] += bool(oracle.judge(look(scene_lib.render(scene)), p.spec, value_range=(0, 255)))
    t[1] += 1
    for kind in grammar.negative_kinds(p, scene):
      bad, _ = grammar.hard_negative(rng, p, scene, kind)
      t = neg[kind]
      t[0] += not oracle.judge(look(scene_lib.render(bad)), p.spec, value_range=(0, 255))
      t[1] += 1
  return pos, neg


def test_oracle_accepts_true_scenes_of_gen_prompts_and_rejects_hard_negatives():
  ps = gen.gen_prompts()
  pos, neg = _judged(ps, seed=0)
  assert set(pos) == set(gen.GEN_CATEGORIES)
  for c, (k, n) in pos.items():
    assert n == 100 and k / n >= 0.99, (c, k, n)
  assert set(neg) == set(grammar.NEGATIVE_KINDS)
  for kind, (k, n) in neg.items():
    assert n >= 100 and k / n >= 0.99, (kind, k, n)
  assert all(judge_text(scene_lib.render(grammar.sample_scene(np.random.default_rng(1), p)), p.text)
             for p in ps[:20])  # the eval's text entry point


def test_oracle_on_gen_prompts_survives_blur_noise_and_colour_shift():
  pos, neg = _judged(gen.gen_prompts()[::2], seed=1, damage=degrade)
  for c, (k, n) in pos.items():
    assert k / n >= 0.95, (c, k, n)
  for kind, (k, n) in neg.items():
    assert k / n >= 0.95, (kind, k, n)


def test_anchor_prompts_recombine_train_parts_outside_train_val_and_gen():
  """The anchor's conditions: grammar texts of the train prompts' groups and connectors, none of
  them a train, val or gen text, deterministic, each placeable (a true scene exists)."""
  got = anchors.recombined_prompts(n=500)
  assert [p.text for p in got] == [p.text for p in anchors.recombined_prompts(n=500)]
  assert len({p.text for p in got}) == 500
  train, val = grammar.split_prompts(0)
  train_groups = {g for p in train for g in p.spec.objects}
  assert not {p.text for p in got} & {p.text for p in train + val + gen.gen_prompts()}
  gen_keys = {grammar.canonical(p.spec) for p in gen.gen_prompts()}
  # no gen combination, in any word order
  assert not {grammar.canonical(p.spec) for p in got} & gen_keys
  rng = np.random.default_rng(0)
  for p in got:
    assert grammar.parse_prompt(p.text) == p.spec and set(p.spec.objects) <= train_groups
    assert judge_text(scene_lib.render(grammar.sample_scene(rng, p)), p.text)
  items = load_prompts(
      prompt_source(source="python", function="srum_jax.worlds.shapes.sources:prompts",
                    kwargs={"split": "anchor"}))
  assert len(items) == 2000 and items[0].prompt == got[0].text and items[0].category == "anchor"


@pytest.mark.parametrize("arg", ["cpu", "cpu,quick"])
def test_nothing_of_the_gen_split_enters_training_or_candidate_generation(arg):
  """The world's configs: the candidates' prompts (`prompts.train`: the generate stage's only prompt
  source) and the anchor's prompts share no text and no combination (any word order) with the gen
  split, which is an eval-only set; the run refuses a config where they would."""
  config = config_utils.load_config(f"experiments/tiny_world.py:{arg}", {"srum.anchor_weight": 0.1})
  held = load_prompts(config.prompts.eval_extra.gen)
  assert {i.prompt for i in held} == {p.text for p in gen.gen_prompts()}
  held_keys = {grammar.canonical(grammar.parse_prompt(i.prompt)) for i in held}
  trained = load_prompts(config.prompts.train) + load_prompts(config.prompts.anchor)
  assert len(trained) > 3000
  assert not {i.prompt for i in trained} & {i.prompt for i in held}
  assert not {grammar.canonical(grammar.parse_prompt(i.prompt)) for i in trained} & held_keys
  run.check_eval_sets_unseen(config, load_prompts(config.prompts.train), {"gen": held})
  leak = [PromptItem(id="x", prompt=held[5].prompt, category="c")]
  with pytest.raises(UserValueError,
                     match="prompts.eval_extra.gen shares 1 prompt.* prompts.train"):
    run.check_eval_sets_unseen(config, leak, {"gen": held})
  config.prompts.anchor = prompt_source(source="python",
                                        function="srum_jax.worlds.shapes.sources:prompts",
                                        kwargs={"split": "gen"})
  with pytest.raises(UserValueError, match="shares 400 prompt.* prompts.anchor"):
    run.check_eval_sets_unseen(config, load_prompts(config.prompts.train), {"gen": held})
