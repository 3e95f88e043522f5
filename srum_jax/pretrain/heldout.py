"""Judge and generation metrics of a pretrained tiny model on the shapes world's VAL prompts only.

    res = evaluate_model(model_dir, EvalSettings(num_pairs=400), vit_image_size=28)
    res["judge"]["accuracy"], res["regions"]["sign_correct"], res["generation"]["oracle_accuracy"]

judge: (val prompt, ground-truth render) pairs, half hard negatives (kinds cycled), scored by the
logits-mode global judge (`engine.judge.Judge`): accuracy of score > 0, per kind, AUC. regions: one
ground-truth box per pair (every 5th a background box), the one-box region prompt: object boxes
sign-correct, background boxes |s| < 0.5, the rate of naming the boxed object; `regions` with the
shapes world's scoring (name the object, then score it: `score.region_identify`), `regions_direct`
with the one-step "Score:" answer; `regions_generate_mode`: multi-box prompts answered by greedy
decoding and parsed. locate: the grounding question for an object of a unique kind, decoded
greedily: parse rate, IoU >= 0.5, predicted centre in the right layout cell. generation:
`text_to_image` for the val prompts, oracle accuracy per category; the global judge on those images
vs the oracle: ROC AUC and accuracy. generation_think (`think`): the same prompts in think mode: the
greedy plans (parsed, and valid: a scene laid out by the plan satisfies the prompt), the oracle
accuracy of the images drawn from them and of images drawn from true plans; generation_think_train:
the same on the train prompts (where SRUM's candidates come from).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from srum_jax import files, metrics
from srum_jax.engine import loaded_model
from srum_jax.engine.judge import Judge, JudgeOptions
from srum_jax.inference import sampling
from srum_jax.models import autoencoder
from srum_jax.pretrain import batches, vocab
from srum_jax.workdir import layout
from srum_jax.worlds.shapes import grammar, judge_text, oracle, scene as scene_lib, sources, truth


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """The `pretrain.eval` keys (`enabled` aside)."""
  seed: int = 0
  num_pairs: int = 400
  num_generate_mode: int = 32
  num_locate: int = 0
  num_gen_per_category: int = 0  # 0: every val prompt
  gen_steps: int = 16
  gen_cfg_scale: float = 3.0
  gen_timestep_shift: float = 1.0
  gen_cfg_interval: Tuple[float, float] = (0.0, 1.0)
  batch_size: int = 32
  think: bool = False
  max_think_tokens: int = 9

  @classmethod
  def from_config(cls, ecfg) -> "EvalSettings":
    values = {f.name: ecfg[f.name] for f in dataclasses.fields(cls)}
    values["gen_cfg_interval"] = tuple(values["gen_cfg_interval"])
    return cls(**values)


def judge_options(vit_image_size: int, mode: str = "logits",
                  region_identify: bool = False) -> JudgeOptions:
  """The shapes world's judge: its score words, the square view at `vit_image_size`, short
  answers."""
  return JudgeOptions(mode=mode, think=False, logit_candidates=tuple(vocab.SCORE_TOKENS),
                      vit_image_size=int(vit_image_size), max_retries=1, max_new_tokens_global=8,
                      max_new_tokens_regions=64, region_identify=region_identify)


def _chunks(items: Sequence, size: int):
  for i in range(0, len(items), size):
    yield items[i:i + size]


def ae_reconstruction_accuracy(params_ae, cfg, sampler: batches.PretrainSampler, *, seed: int,
                               n: int = 128) -> Optional[float]:
  """Oracle accuracy of AE reconstructions (posterior mean) of val-prompt scenes: is the AE crisp
  enough? (Evaluation only: the oracle never labels training batches.) None for n = 0."""
  if n <= 0:
    return None

  rng = np.random.default_rng([seed, 5])
  vindex = grammar.prompt_index(sampler.val)
  prompts = [grammar.sample_prompt(rng, prompts=vindex) for _ in range(n)]
  images = np.stack([batches.rendered(grammar.sample_scene(rng, q)) for q in prompts])

  @jax.jit
  def roundtrip(p, x):
    return autoencoder.to_uint8(autoencoder.decode(p, autoencoder.encode(p, x, cfg.ae), cfg.ae))

  rec = np.asarray(roundtrip(params_ae, jnp.asarray(images)))
  return float(
      np.mean([oracle.judge(r, q.spec, value_range=(0, 255)) for r, q in zip(rec, prompts)]))


@dataclasses.dataclass
class Pair:
  prompt: grammar.Prompt
  scene: scene_lib.Scene
  image: np.ndarray
  kind: str  # "positive" or the hard-negative kind
  label: bool
  region_scores: List[float]


def held_out_pairs(rng, num_pairs: int) -> List[Pair]:
  """(val prompt, ground-truth render) pairs; every second one a hard negative, kinds cycled."""
  _, val = grammar.split_prompts(0)
  vindex = grammar.prompt_index(val)
  pairs = []
  for i in range(num_pairs):
    q = grammar.sample_prompt(rng, prompts=vindex)
    scene = grammar.sample_scene(rng, q)
    kind = "positive"
    if i % 2 == 1:
      kinds = grammar.negative_kinds(q, scene)
      kind = kinds[(i // 2) % len(kinds)]
      scene, _ = grammar.hard_negative(rng, q, scene, kind=kind)
    ok, scores = truth.scene_truth(q.spec, scene)
    pairs.append(Pair(q, scene, scene_lib.render(scene), kind, ok, scores))
  return pairs


def judge_metrics(judge, pairs: Sequence[Pair], batch: int) -> Dict[str, Any]:
  scores = []
  for chunk in _chunks(pairs, batch):
    scores += judge.global_scores([x.image for x in chunk], [x.prompt.text for x in chunk])
  labels = [x.label for x in pairs]
  by_kind: Dict[str, List[bool]] = {}
  for x, s in zip(pairs, scores):
    by_kind.setdefault(x.kind, []).append((s > 0) == x.label)
  return dict(accuracy=float(np.mean([(s > 0) == y for s, y in zip(scores, labels)])),
              auc=metrics.roc_auc(scores, labels), n=len(pairs), positives=int(np.sum(labels)),
              by_kind={k: float(np.mean(v)) for k, v in sorted(by_kind.items())})


def region_items(rng, pairs: Sequence[Pair]) -> List[tuple]:
  """One box per pair: (image, prompt, box, true score, pair kind, object name); every 5th a
  background box."""
  items = []
  for i, x in enumerate(pairs):
    bg = truth.background_box(rng, x.scene) if i % 5 == 4 else None
    if bg is not None:
      items.append((x.image, x.prompt.text, bg, 0.0, x.kind, "background"))
    elif x.scene.objects:
      k = int(rng.integers(len(x.scene.objects)))
      o = x.scene.objects[k]
      items.append((x.image, x.prompt.text, truth.official_box(scene_lib.scene_boxes(
          x.scene)[k]), x.region_scores[k], x.kind, f"{o.color} {o.shape}"))
  return items


def region_metrics(judge, items: Sequence[tuple], batch: int) -> Dict[str, Any]:
  scores, names = [], []
  for chunk in _chunks(items, batch):
    got = judge.region_scores([x[0] for x in chunk], [x[1] for x in chunk], [[x[2]] for x in chunk])
    scores += [d[1][0] for d in got]
    names += [d[1][1] for d in got]
  obj = [(s, x[3]) for s, x in zip(scores, items) if x[3] != 0]
  background = [s for s, x in zip(scores, items) if x[3] == 0]
  by_kind: Dict[str, List[bool]] = {}
  for s, x in zip(scores, items):
    if x[3] != 0:
      by_kind.setdefault(x[4], []).append(bool(np.sign(s) == np.sign(x[3])))
  out = dict(
      sign_correct=float(np.mean([np.sign(s) == np.sign(y) for s, y in obj])) if obj else None,
      by_kind={
          k: float(np.mean(v)) for k, v in sorted(by_kind.items())
      }, auc=metrics.roc_auc([s for s, _ in obj], [y > 0 for _, y in obj]), n_objects=len(obj),
      background_near_zero=float(np.mean([abs(s) < 0.5 for s in background]))
      if background else None, n_background=len(background))
  if any(n is not None for n in names):
    out["identified"] = float(np.mean([n == x[5] for n, x in zip(names, items)]))
  return out


def generate_mode_metrics(judge, pairs: Sequence[Pair], batch: int) -> Dict[str, Any]:
  """Multi-box region prompts (every object of the scene) answered by greedy decoding and parsed."""
  boxes = [[truth.official_box(b) for b in scene_lib.scene_boxes(x.scene)] for x in pairs]
  keep = [i for i, b in enumerate(boxes) if b]
  hits, parsed, named = [], 0, []
  for idx in _chunks(keep, batch):
    got = judge.region_scores([pairs[i].image for i in idx], [pairs[i].prompt.text for i in idx],
                              [boxes[i] for i in idx])
    for i, d in zip(idx, got):
      parsed += int(len(d) == len(boxes[i]))
      hits += [np.sign(d[k + 1][0]) == np.sign(y) for k, y in enumerate(pairs[i].region_scores)
               if k + 1 in d and y != 0]
      named += [(d[k + 1][1] or "").split()[:2] == [o.color, o.shape]
                for k, o in enumerate(pairs[i].scene.objects)
                if k + 1 in d]
  return dict(n=len(keep), parsed=parsed, sign_correct=float(np.mean(hits)) if hits else None,
              identified=float(np.mean(named)) if named else None)


def locate_metrics(got: Sequence[Optional[Tuple[int, ...]]], want: Sequence[Tuple[int, ...]],
                   layout: grammar.Layout = grammar.DEFAULT_LAYOUT) -> Dict[str, Any]:
  """Parse rate, IoU >= 0.5 rate and the rate of predicted centres in the right layout cell
  (inclusive boxes)."""
  ok = [(g, w) for g, w in zip(got, want) if g is not None and g[2] >= g[0] and g[3] >= g[1]]
  n = max(len(want), 1)
  cell = lambda b: metrics.box_cell(b, layout.grid, layout.width, layout.height)  # noqa: E731
  return dict(
      n=len(want), parsed=len(ok) / n,
      iou50=sum(metrics.box_iou_inclusive(g, w) >= 0.5 for g, w in ok) / n,
      cell=sum(cell(g) == cell(w) for g, w in ok) / n)


def grounding_metrics(judge, pairs: Sequence[Pair], batch: int) -> Dict[str, Any]:
  """The locate question for one object of a unique kind per pair, answered greedily."""
  questions = []
  for x in pairs:
    unique = truth.unique_objects(x.scene)
    if unique:
      o = x.scene.objects[unique[0]]
      questions.append((x.image, vocab.locate_question(o.color, o.shape),
                        truth.official_box(scene_lib.scene_boxes(x.scene)[unique[0]])))
  got = []
  for chunk in _chunks(questions, batch):
    got += [
        vocab.parse_box(t) for t in judge.answers([x[0] for x in chunk], [x[1] for x in chunk], 4)
    ]
  return locate_metrics(got, [x[2] for x in questions])


def _generate(model, rows, settings: EvalSettings, compute_dtype: str, think: bool, plans=None):
  """(uint8 images, plans or None) for the prompt rows, in batches (the eval's sampler settings);
  `plans`: think mode from these plans instead of the model's own."""

  images, written = [], []
  for k, chunk in enumerate(_chunks(rows, settings.batch_size)):
    given = None if plans is None else plans[k * settings.batch_size:(k + 1) * settings.batch_size]
    out = sampling.text_to_image(
        model.params["bagel"], model.params["ae"], model.tokenizer,
        [r["prompt"] for r in chunk], cfg=model.cfg, seeds=settings.seed, image_ids=[
            layout.stable_int(r["id"]) for r in chunk
        ], height=batches.IMAGE_HW[0], width=batches.IMAGE_HW[1], num_timesteps=settings.gen_steps,
        timestep_shift=settings.gen_timestep_shift, cfg_text_scale=settings.gen_cfg_scale,
        cfg_interval=tuple(settings.gen_cfg_interval), dtype=jnp.dtype(compute_dtype), think=think,
        max_think_tokens=settings.max_think_tokens, plans=given,
        system_prompt=vocab.OWN_TEXTS.gen_think_system if think else None)
    images += list(out.images)
    written += out.think_texts or []
  return images, (written if think else None)


def _by_category(rows, oks) -> Dict[str, float]:
  cats: Dict[str, List[bool]] = {}
  for r, ok in zip(rows, oks):
    cats.setdefault(r["category"], []).append(bool(ok))
  return {c: float(np.mean(v)) for c, v in sorted(cats.items())}


def plan_valid(plan: str, prompt_text: str, seed: int = 0) -> Tuple[bool, bool]:
  """(parsed, valid) of a written plan: a scene laid out by it satisfies the prompt
  (`truth.scene_truth`)."""
  cells = grammar.parse_plan(plan)
  if cells is None:
    return False, False
  scene = grammar.plan_scene(np.random.default_rng(seed), cells)
  return True, scene is not None and truth.scene_truth(grammar.parse_prompt(prompt_text), scene)[0]


def generation_metrics(model, judge, settings: EvalSettings, compute_dtype: str) -> Dict[str, Any]:
  """The model's own images for the val prompts: oracle accuracy per category, and the global judge
  on them against the oracle (AUC, accuracy)."""
  rows = list(sources.prompts("val", per_category=int(settings.num_gen_per_category) or None))
  images, _ = _generate(model, rows, settings, compute_dtype, think=False)
  oracle_ok = [judge_text(im, r["prompt"]) for im, r in zip(images, rows)]
  scores = []
  for i in range(0, len(rows), settings.batch_size):
    scores += judge.global_scores(images[i:i + settings.batch_size],
                                  [r["prompt"] for r in rows[i:i + settings.batch_size]])
  return dict(
      oracle_accuracy=float(np.mean(oracle_ok)), n=len(rows), by_category=_by_category(
          rows, oracle_ok), judge_auc=metrics.roc_auc(scores, oracle_ok), judge_accuracy=float(
              np.mean([(s > 0) == ok for s, ok in zip(scores, oracle_ok)])),
      judge_mean_score=float(np.mean(scores)), settings=dict(
          steps=settings.gen_steps, cfg_text_scale=settings.gen_cfg_scale,
          timestep_shift=settings.gen_timestep_shift, cfg_interval=list(settings.gen_cfg_interval)))


def think_generation_metrics(model, settings: EvalSettings, compute_dtype: str, split: str = "val",
                             per_category: Optional[int] = None) -> Dict[str, Any]:
  """Think mode on a split's prompts: plan parse / validity rates and the oracle accuracy of the
  images drawn from the model's own plans, and (`oracle_accuracy_true_plans`) from plans of true
  scenes of the prompts (what a perfect planner would give: separates the planner from the
  plan-conditioned generator)."""
  per_category = per_category or int(settings.num_gen_per_category) or None
  rows = list(sources.prompts(split, per_category=per_category))
  images, plans = _generate(model, rows, settings, compute_dtype, think=True)
  oracle_ok = [judge_text(im, r["prompt"]) for im, r in zip(images, rows)]
  checks = [plan_valid(p, r["prompt"]) for p, r in zip(plans, rows)]
  rng = np.random.default_rng([settings.seed, 5])
  true_plans = [
      grammar.plan_text(grammar.sample_scene(rng, grammar.parse_prompt(r["prompt"]))) for r in rows
  ]
  images_true, _ = _generate(model, rows, settings, compute_dtype, think=True, plans=true_plans)
  ok_true = [judge_text(im, r["prompt"]) for im, r in zip(images_true, rows)]
  return dict(
      split=split, oracle_accuracy=float(np.mean(oracle_ok)), n=len(rows), by_category=_by_category(
          rows, oracle_ok), plan_parsed=float(np.mean([c[0] for c in checks])), plan_valid=float(
              np.mean([c[1] for c in checks])), plan_valid_by_category=_by_category(
                  rows, [c[1] for c in checks]), oracle_accuracy_true_plans=float(np.mean(ok_true)),
      by_category_true_plans=_by_category(rows, ok_true), examples=[
          dict(prompt=r["prompt"], plan=p)
          for r, p in list(zip(rows, plans))[::max(1,
                                                   len(rows) // 8)]
      ])


def evaluate_model(model_dir: str, settings: EvalSettings = EvalSettings(), *,
                   vit_image_size: int = 28, compute_dtype: str = "float32",
                   out_path: Optional[str] = None, extra: Optional[dict] = None) -> Dict[str, Any]:
  """Every metric of the module docstring for a model directory; written to `out_path` when
  given."""
  t0, s = time.time(), settings
  model = loaded_model.load_model(model_dir, dtype="float32")
  make = lambda mode="logits", identify=False: Judge(  # noqa: E731
      judge_options(vit_image_size, mode, identify), model, texts=vocab.OWN_TEXTS, seed=s.seed,
      compute_dtype=compute_dtype)
  judge = make()
  rng = np.random.default_rng([s.seed, 1])
  pairs = held_out_pairs(rng, s.num_pairs)
  res: Dict[str, Any] = dict(model_dir=model_dir, judge=judge_metrics(judge, pairs, s.batch_size))
  items = region_items(rng, pairs)
  res["regions"] = region_metrics(make(identify=True), items, s.batch_size)
  res["regions_direct"] = region_metrics(judge, items, s.batch_size)
  res["regions_generate_mode"], res["parse_stats"] = dict(n=0, parsed=0, sign_correct=None), None
  if s.num_generate_mode:
    generate_judge = make("generate")
    res["regions_generate_mode"] = generate_mode_metrics(generate_judge,
                                                         pairs[:s.num_generate_mode], s.batch_size)
    res["parse_stats"] = dataclasses.asdict(generate_judge.stats)
  res["locate"] = grounding_metrics(judge, pairs[:s.num_locate], s.batch_size)
  res["generation"] = generation_metrics(model, judge, s, compute_dtype)
  if s.think:
    res["generation_think"] = think_generation_metrics(model, s, compute_dtype)
    res["generation_think_train"] = think_generation_metrics(
        model, s, compute_dtype, split="train", per_category=int(s.num_gen_per_category) or 60)
  res.update(seconds=time.time() - t0, model_dir_bytes=files.dir_size(model_dir), **(extra or {}))
  if out_path:
    files.write_json(out_path, res)
  return res
