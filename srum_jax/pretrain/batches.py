"""Pretraining data (host, NumPy): judge examples and T2I pairs from the shapes world's train
prompts.

Labels come from the scene's ground truth (`worlds.shapes.truth.scene_truth`), never from the
oracle. Judge examples are [ViT image] [question] [answer] exactly as
`inference.decoding.judge_context` builds the decoding context; about half of the scenes are hard
negatives (`grammar.hard_negative`), a few are scenes of another prompt or carry an extra object.
Questions are the project's own texts (`vocab.OWN_TEXTS`, through `rewards.texts.render_global` /
`render_regions`). Tasks and their answers:

    global    `render_global(prompt)`               -> "Score: 1.0" / "Score: -1.0"
    region1   `render_regions(prompt, [box])`       -> "Score: s" (the logits judge) or the block
                            "Region ID: 1 Identified Object: red circle Score: s"
    regions   `render_regions(prompt, boxes)`       -> one block per region (all objects, sometimes
              a
                                                       background box, random order)
    describe  "<describe>" (auxiliary)              -> `grammar.describe(scene)`
    locate    "<locate> red circle" (auxiliary)     -> "x0 y0 x1 y1", the box of the one object of
              that kind
    plan      [think system prompt] [prompt] (no image) -> `grammar.plan_text(scene)` of a scene of
              the prompt (think mode: the layout plan the model writes before it draws)

s = 1.0 for an object the prompt asks for, -0.5 for the right kind in a wrong count, -1.0 for an
object that contradicts the prompt and 0.0 for a background box. Boxes follow the proposer's
"official" convention, jittered by a pixel half the time; images are blurred a little sometimes
(generated images are soft).

Generation batches: (prompt, rendered scene) pairs; a fraction `think` of them in think mode: the
text is [think system prompt] [prompt] [plan of that scene], or (a fraction `think_uncond` of those)
the system prompt alone, the context think mode's classifier-free guidance compares against.

Every batch is a pure function of (seed, step), so a resumed run draws the data of an uninterrupted
one.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from srum_jax.convert import checkpoint
from srum_jax.models import bagel, image_transforms
from srum_jax.pretrain import vocab
from srum_jax.rewards import texts as texts_lib
from srum_jax.tokenizer import load_tokenizer
from srum_jax.training import objective, train_step
from srum_jax.worlds.shapes import grammar, scene as scene_lib, truth

IMAGE_HW = (32, 32)
MAX_REGIONS = 5  # the proposer's default max_regions
# understanding tasks (`pretrain.data.tasks`)
TASKS = ("global", "region1", "regions", "describe", "locate", "plan")


@dataclasses.dataclass(frozen=True)
class BatchBudgets:
  """Static sizes of one pretraining step's two batches (and the judge's square view)."""
  gen_rows: int
  gen_samples_per_row: int
  gen_text_len: int
  und_rows: int
  und_tokens: int
  und_samples_per_row: int
  logit_capacity: int
  vit_size: int

  @classmethod
  def from_config(cls, umm, vit_size: int) -> "BatchBudgets":
    return cls(
        gen_rows=int(umm.gen_rows), gen_samples_per_row=int(umm.gen_samples_per_row),
        gen_text_len=int(umm.gen_text_len), und_rows=int(umm.und_rows), und_tokens=int(
            umm.und_tokens), und_samples_per_row=int(umm.und_samples_per_row), logit_capacity=int(
                umm.logit_capacity), vit_size=int(vit_size))


class UndBatch(NamedTuple):
  """Understanding batch: packed rows (`bagel.PackedInputs`, no latents), the slots whose logits are
  scored [B, A], their target ids [B, A], a mask [B, A] and which targets are score values [B, A].
  """
  inputs: Any
  logit_index: np.ndarray
  targets: np.ndarray
  mask: np.ndarray
  score_mask: np.ndarray


def vit_view(image_uint8: np.ndarray, size: int) -> np.ndarray:
  """What the judge sees (`image_transforms.square_view`, the judge's view), in [-1, 1]."""
  return image_transforms.to_model_range(image_transforms.square_view(image_uint8, size))


def blur(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
  """A light Gaussian blur (sigma 0.4..0.9 px), rounded back to uint8."""
  sigma = float(rng.uniform(0.4, 0.9))
  x = ndimage.gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0))
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def rendered(scene) -> np.ndarray:
  """A scene as the model's float image in [-1, 1]."""
  return scene_lib.render(scene).astype(np.float32) / 127.5 - 1.0


class PretrainSampler:
  """Draws pretraining examples and batches from the train prompt split (deterministic given the
  generator).

  mix: the data-mix keys of `pretrain.data` (tasks, negatives, easy_negatives, distractors, ...)."""

  def __init__(self, cfg, tokenizer, mix, *, vit_size: int, split_seed: int = 0):
    self.cfg, self.tokenizer = cfg, tokenizer
    self.mix = mix.to_dict() if hasattr(mix, "to_dict") else dict(mix)
    self.train, self.val = grammar.split_prompts(split_seed)
    self.index = grammar.prompt_index(self.train)  # generation batches: every train prompt
    # judge questions: every train prompt, or only those with a relation (a curriculum phase on
    # "where")
    self.und_index = (grammar.prompt_index([q for q in self.train if q.spec.relations])
                      if self.mix["relations_only"] else self.index)
    self.vit_size = int(vit_size)
    self.encode = functools.lru_cache(maxsize=1 << 16)(lambda s: tuple(self.tokenizer.encode(s)))
    tasks = self.mix["tasks"]
    self.task_names = tuple(tasks)
    weights = np.array([float(tasks[k]) for k in self.task_names])
    self.task_p = weights / weights.sum()

  # -- scenes
  # -----------------------------------------------------------------------------------------
  def scene_for(self, rng, prompt: grammar.Prompt) -> scene_lib.Scene:
    """A scene for a judge question: the prompt's scene, a hard negative, another prompt's scene or
    the scene with an extra object of a kind the prompt does not name."""
    scene = grammar.sample_scene(rng, prompt)
    r, m = rng.random(), self.mix
    if r < m["negatives"]:
      kinds = grammar.negative_kinds(prompt, scene)
      w = np.array([float(m["negative_kind_weights"][k]) for k in kinds])
      scene, _ = grammar.hard_negative(rng, prompt, scene, kind=kinds[rng.choice(
          len(kinds), p=w / w.sum())])
    elif r < m["negatives"] + m["easy_negatives"]:
      scene = grammar.sample_scene(rng, grammar.sample_prompt(rng, prompts=self.index))
    elif r < m["negatives"] + m["easy_negatives"] + m["distractors"]:
      scene = self.with_distractor(rng, prompt, scene)
    return scene

  def with_distractor(self, rng, prompt: grammar.Prompt, scene: scene_lib.Scene) -> scene_lib.Scene:
    """The scene plus an object of a kind the prompt does not name, in a free cell (unchanged if
    none fits)."""
    named = {(g.color, g.shape) for g in prompt.spec.objects}
    kinds = [(c, s) for c in scene_lib.COLORS for s in scene_lib.SHAPES if (c, s) not in named]
    color, shape = kinds[rng.integers(len(kinds))]
    layout = grammar.DEFAULT_LAYOUT
    used = {grammar.cell_of(layout, o) for o in scene.objects}
    for cell in rng.permutation([c for c in range(layout.grid ** 2) if c not in used]):
      obj = grammar.place_object(rng, layout, int(cell), shape, color, scene.objects)
      if obj is not None:
        return scene_lib.Scene(scene.objects + (obj,), scene.height, scene.width)
    return scene

  # -- one judge example
  # --------------------------------------------------------------------------------
  def und_example(self, rng, prompt: Optional[grammar.Prompt] = None, task: Optional[str] = None):
    """(image uint8 [32, 32, 3], question, answer, info) for one judge question about a train
    prompt; for the plan task (image None, [think system prompt, prompt], plan, info)."""
    prompt = grammar.sample_prompt(rng, prompts=self.und_index) if prompt is None else prompt
    scene = self.scene_for(rng, prompt)
    ok, scores = truth.scene_truth(prompt.spec, scene)
    image = scene_lib.render(scene)
    if rng.random() < self.mix["blur"]:
      image = blur(rng, image)
    task = self.task_names[rng.choice(len(self.task_names),
                                      p=self.task_p)] if task is None else task
    # drawn here, after the scene, so the other tasks' random streams stay as they were
    if task == "plan":
      plan = grammar.plan_text(grammar.sample_scene(rng, prompt))
      return None, [vocab.OWN_TEXTS.gen_think_system, prompt.text], plan, dict(
          task=task, label=True)
    kinds = [(o.color, o.shape) for o in scene.objects]
    if task == "describe" and kinds and max(kinds.count(k) for k in kinds) <= max(
        grammar.NUMBER_WORDS):
      return image, vocab.DESCRIBE, grammar.describe(scene, rng), dict(task=task, label=ok)
    unique = truth.unique_objects(scene) if task == "locate" else []
    if unique:
      k = unique[rng.integers(len(unique))]
      box = truth.official_box(scene_lib.scene_boxes(scene)[k])
      return image, vocab.locate_question(*kinds[k]), " ".join(str(v) for v in box), dict(
          task=task, label=ok)
    if task in ("global", "describe", "locate"):
      answer = f"Score: {vocab.score_text(1.0 if ok else -1.0)}"
      return image, texts_lib.render_global(vocab.OWN_TEXTS, prompt.text), answer, dict(
          task=task, label=ok)
    regions = self.regions(rng, scene, scores, many=task == "regions")
    question = texts_lib.render_regions(vocab.OWN_TEXTS, prompt.text, [b for b, _, _ in regions])
    if task == "region1" and rng.random() < self.mix["short_region_answer"]:
      answer = f"Score: {vocab.score_text(regions[0][2])}"
    else:
      answer = "\n\n".join(
          vocab.region_block(k, what, s) for k, (_, what, s) in enumerate(regions, start=1))
    return image, question, answer, dict(task=task, label=ok, scores=[s for _, _, s in regions])

  def regions(self, rng, scene: scene_lib.Scene, scores: Sequence[float], many: bool):
    """[(box, identified object, score)]: every object (+ a background box with probability
    `background_box`, random order), or one region: a background box with that probability, else an
    object."""
    objs = []
    for o, box, s in zip(scene.objects, scene_lib.scene_boxes(scene), scores):
      b = truth.official_box(box)
      if rng.random() < self.mix["box_jitter"]:
        b = truth.jitter_box(rng, b)
      objs.append((b, f"{o.color} {o.shape}", s))
    bg = None
    if not objs or rng.random() < self.mix["background_box"]:
      b = truth.background_box(rng, scene)
      bg = None if b is None else (b, "background", 0.0)
    if many:
      items = objs + ([bg] if bg is not None else [])
      return [items[k] for k in rng.permutation(len(items))][:MAX_REGIONS]
    if bg is not None:
      return [bg]
    if not objs:
      raise ValueError("a scene without objects and without room for a background box")
    return [objs[rng.integers(len(objs))]]

  # -- batches
  # ------------------------------------------------------------------------------------------
  def wrap(self, text: str) -> List[int]:
    return [self.cfg.tokens.bos, *self.encode(text), self.cfg.tokens.eos]

  def _pack_examples(self, rng, rows: int, num_tokens: int, samples_per_row: int,
                     logit_capacity: int):
    """Judge examples packed row by row while tokens, samples and scored answer tokens fit: per row
    a list of samples, each (items for `bagel.build_packed_inputs`, answer ids, text entries before
    the answer)."""
    grid = (self.vit_size // self.cfg.vit.patch_size,) * 2
    n_vit = grid[0] * grid[1]
    packed = [[] for _ in range(rows)]
    r, used, used_logits = 0, 0, 0
    while r < rows:
      image, q, a, _ = self.und_example(rng)
      qs = [self.wrap(t) for t in ([q] if isinstance(q, str) else q)]
      ai = self.wrap(a)
      # text entries: <|vision_start|> and <|vision_end|> around an image, then the question segments
      before = (0 if image is None else 2) + sum(len(x) for x in qs)
      need, preds = (0 if image is None else n_vit) + before + len(ai), len(ai) - 1
      if need > num_tokens or preds > logit_capacity:
        raise ValueError(
            f"a judge example needs {need} tokens / {preds} answer logits; budgets are "
            f"{num_tokens} / {logit_capacity}")
      if packed[r] and (used + need > num_tokens or used_logits + preds > logit_capacity
                        or len(packed[r]) == samples_per_row):
        r, used, used_logits = r + 1, 0, 0
        if r == rows:
          break
      items = list(qs)
      if image is not None:
        patches = image_transforms.vit_patchify(
            vit_view(image, self.vit_size), self.cfg.vit.patch_size)
        items = [bagel.ImageTokens("vit", grid, patches=patches)] + items
      packed[r].append((items + [ai], ai, before))
      used, used_logits = used + need, used_logits + preds
    return packed, n_vit

  def und_batch(self, rng, rows: int, num_tokens: int, samples_per_row: int,
                logit_capacity: int) -> UndBatch:
    """`rows` packed rows of judge examples, each sample [ViT image] [question] [answer] (the
    decoding context; a plan example: [think system prompt] [prompt] [plan]); examples fill a row
    while its tokens, samples and scored answer tokens fit, then the next."""
    packed, n_vit = self._pack_examples(rng, rows, num_tokens, samples_per_row, logit_capacity)
    inputs, _ = bagel.build_packed_inputs(
        self.cfg, [[items for items, _, _ in row] for row in packed], num_tokens=num_tokens,
        text_capacity=num_tokens - n_vit, vit_capacity=n_vit * samples_per_row, latent_capacity=0)
    A = logit_capacity
    index = np.full((rows, A), num_tokens, np.int32)
    targets = np.zeros((rows, A), np.int32)
    mask = np.zeros((rows, A), bool)
    score_mask = np.zeros((rows, A), bool)
    score_ids = {self.encode(t)[0] for t in vocab.SCORE_TOKENS}
    for b, row in enumerate(packed):
      entry, j = 0, 0  # text entries of the row so far
      for _, ai, before in row:
        start, n = entry + before, len(ai) - 1
        index[b, j:j + n] = inputs.text_index[b, start:start + n]
        targets[b, j:j + n] = ai[1:]
        mask[b, j:j + n] = True
        score_mask[b, j:j + n] = [t in score_ids for t in ai[1:]]
        entry, j = start + len(ai), j + n
    return UndBatch(inputs, index, targets, mask, score_mask)

  def gen_batch(self, rng, rows: int, samples_per_row: int, text_len: int):
    """T2I flow-matching batch (`train_step.SrumBatch`, uniform rewards): (prompt, rendered minimal
    scene), some in think mode (module docstring)."""
    B, S = rows, samples_per_row
    ids, images = [], np.zeros((B, S) + IMAGE_HW + (3,), np.float32)
    for b in range(B):
      row = []
      for s in range(S):
        p = grammar.sample_prompt(rng, prompts=self.index)
        scene = grammar.sample_scene(rng, p)
        images[b, s] = rendered(scene)
        w = self.wrap(p.text)
        # one text run = the think-mode prefills
        if self.mix["think"] and rng.random() < self.mix["think"]:
          w = self.wrap(vocab.OWN_TEXTS.gen_think_system)
          if rng.random() >= self.mix["think_uncond"]:
            w = w + self.wrap(p.text) + self.wrap(grammar.plan_text(scene))
        if len(w) > text_len:
          raise ValueError(
              f"generation text of {p.text!r} has {len(w)} tokens > gen text_len {text_len}")
        row.append(w)
      ids.append(row)
    n_lat = (IMAGE_HW[0] // self.cfg.latent_downsample) * (
        IMAGE_HW[1] // self.cfg.latent_downsample)
    inputs = train_step.t2i_layout(self.cfg, ids, image_hw=IMAGE_HW,
                                   num_tokens=S * (text_len + n_lat + 2),
                                   text_capacity=S * (text_len + 2))
    rewards = objective.RegionRewards(
        boxes=np.zeros((B, S, 1, 4), np.float32), scores=np.zeros((B, S, 1), np.float32),
        valid=np.zeros((B, S, 1), bool), global_scores=np.ones((B, S), np.float32))
    return train_step.SrumBatch(inputs=inputs, images=images, rewards=rewards)

  def ae_images(self, rng, batch: int) -> np.ndarray:
    """Rendered scenes in [-1, 1] for the autoencoder: prompts' scenes and their hard negatives."""
    out = np.zeros((batch,) + IMAGE_HW + (3,), np.float32)
    for b in range(batch):
      p = grammar.sample_prompt(rng, prompts=self.index)
      scene = grammar.sample_scene(rng, p)
      if rng.random() < 0.5:
        scene, _ = grammar.hard_negative(rng, p, scene)
      out[b] = rendered(scene)
    return out


# --------------------------------------------------------------------------------------------------
# The curriculum and the per-step batches


def curriculum_data(p) -> List[Tuple[int, dict]]:
  """[(first step, data mix)] of the UMM stage's judge data: one per `pretrain.phases` entry
  (`p.data` with the phase's keys replaced; its `steps` is the phase's length), then `p.data` for
  the rest."""
  base = p.data.to_dict()
  out, start = [], 0
  for phase in p.phases:
    phase = dict(phase.to_dict() if hasattr(phase, "to_dict") else phase)
    steps = int(phase.pop("steps"))
    unknown = set(phase) - set(base)
    if unknown:
      raise ValueError(
          f"curriculum phase sets unknown data keys {sorted(unknown)}; known: {sorted(base)}")
    out.append((start, {**base, **phase}))
    start += steps
  return out + [(start, base)]


Curriculum = Sequence[Tuple[int, PretrainSampler]]


def make_batches(curriculum: Curriculum, budgets: BatchBudgets, seed: int, step: int):
  """Step `step`'s (generation, understanding) batches: generation from the last (main) sampler,
  judge questions from the sampler of the curriculum phase the step is in."""
  rng = np.random.default_rng([seed, step])
  b = budgets
  gen = curriculum[-1][1].gen_batch(rng, b.gen_rows, b.gen_samples_per_row, b.gen_text_len)
  sampler = [s for start, s in curriculum if start <= step][-1]
  und = sampler.und_batch(rng, b.und_rows, b.und_tokens, b.und_samples_per_row, b.logit_capacity)
  return gen, und


# Data workers (spawned processes: JAX is never initialised in them, nothing is forked after it is).
_WORKER: Dict[str, Any] = {}


def _worker_init(model_config: dict, tokenizer_dir: str, phases: list, budgets: BatchBudgets,
                 seed: int) -> None:
  os.environ["JAX_PLATFORMS"] = "cpu"
  cfg = checkpoint.config_from_dict(model_config)
  tok = load_tokenizer(tokenizer_dir)
  _WORKER.update(curriculum=[(start, PretrainSampler(cfg, tok, mix, vit_size=budgets.vit_size))
                             for start, mix in phases], budgets=budgets, seed=seed)


def _worker_batches(step: int):
  return make_batches(_WORKER["curriculum"], _WORKER["budgets"], _WORKER["seed"], step)


class BatchStream:
  """Batches for steps start, start+1, ...: in this process (workers=0) or prefetched by spawned
  workers."""

  def __init__(self, curriculum: Curriculum, budgets: BatchBudgets, seed: int, *, workers: int,
               model_config: dict, tokenizer_dir: str, start: int = 0):
    self.curriculum, self.budgets, self.seed, self.step = list(curriculum), budgets, seed, start
    self.pool, self.pending = None, []
    if workers > 0:
      ctx = multiprocessing.get_context("spawn")
      self.pool = concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=ctx, initializer=_worker_init,
          initargs=(model_config, tokenizer_dir, [(s, w.mix) for s, w in self.curriculum], budgets,
                    seed))
      self.depth = 2 * workers
      self.pending = [self.pool.submit(_worker_batches, start + k) for k in range(self.depth)]

  def next(self):
    if self.pool is None:
      out = make_batches(self.curriculum, self.budgets, self.seed, self.step)
    else:
      out = self.pending.pop(0).result()
      self.pending.append(self.pool.submit(_worker_batches, self.step + self.depth))
    self.step += 1
    return out

  def close(self):
    if self.pool is not None:
      for f in self.pending:
        f.cancel()
      self.pool.shutdown(wait=False, cancel_futures=True)
      self.pool = None
