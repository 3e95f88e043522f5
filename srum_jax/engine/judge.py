"""The UMM as a judge of images: global-layout and per-region scores from its understanding branch.

Two modes (`JudgeOptions.mode`, the vocabulary `JUDGE_MODES`):
* `generate` (paper-faithful): decode an answer to the global-layout prompt and to the region prompt
  (optionally in think mode), parse it with `rewards.parsing`, ask unparsable ones again up to
  `max_retries` times at `retry_temperature` (0: greedy, as SRUM's `vlm.py` asks every attempt, where a
  deterministic model repeats itself; > 0 samples); an answer that never parses is None (the caller
  decides the fallback).
* `logits`: one forward pass per query, no decoding. The answer is prefixed with "Score:" and the
  expected value of the next-token distribution restricted to the score tokens (`logit_candidates`,
  each a single token) is the score. Regions are asked one at a time with a one-box region prompt; with
  `region_identify` the model first names the object in the box (greedy, "Region ID: 1\nIdentified
  Object: ...", the official answer order) and the score is read after that name (`decoding.continue_then_logits`).

    judge = Judge(JudgeOptions.from_config(config.score), model, texts=texts_lib.own_texts(), seed=0)
    g = judge.global_scores(images_uint8, prompts)                 # [score or None]
    r = judge.region_scores(images_uint8, prompts, boxes_lists)    # [{region (1-based): (score, object)}]
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from srum_jax import distributed
from srum_jax.engine import loaded_model
from srum_jax.engine.loaded_model import Model
from srum_jax.inference import decoding
from srum_jax.models.image_transforms import square_view
from srum_jax.rewards import parsing, texts as texts_lib

JUDGE_MODES = ("generate", "logits")


@dataclasses.dataclass(frozen=True)
class JudgeOptions:
  """How the judge asks and reads (the `score` block's judge keys; the score stage's own keys aside)."""
  mode: str = "generate"
  think: bool = True
  batch_size: int = 4
  max_retries: int = 3
  retry_temperature: float = 0.7
  max_new_tokens_global: int = 1024
  max_new_tokens_regions: int = 4096
  logit_candidates: Tuple[str, ...] = ("-1.0", "-0.5", "0.0", "0.5", "1.0")
  region_identify: bool = False
  max_identify_tokens: int = 16
  text_budget: int = 0
  vit_image_size: int = 0

  @classmethod
  def from_config(cls, scfg) -> "JudgeOptions":
    """The options from a `score` config block."""
    values = {f.name: scfg[f.name] for f in dataclasses.fields(cls)}
    values["logit_candidates"] = tuple(str(c) for c in values["logit_candidates"])
    return cls(**values)


class Judge:
  """The model's understanding branch as a scorer (both modes behind one interface); `texts` gives the judge
  questions and the think system prompt (`rewards.texts`)."""

  def __init__(self, options: JudgeOptions, model: Model, *, texts: texts_lib.Texts, seed: int = 0,
               compute_dtype="float32", attn_impl: str = "dense"):
    self.config = options
    self.model = model
    self.texts = texts
    self.attn_impl = attn_impl
    self.dtype = jnp.dtype(compute_dtype)
    self.stats = parsing.ParseStats()
    self.retries = 0  # re-asked questions (generate mode)
    self.key = jax.random.key(seed)
    if options.mode not in JUDGE_MODES:
      raise ValueError(f"judge mode must be one of {JUDGE_MODES}, got {options.mode!r}")
    self.system = texts.judge_think_system if options.think else None
    if options.mode == "logits":
      values, ids = [], []
      for text in options.logit_candidates:
        toks = model.tokenizer.encode(str(text))
        if len(toks) != 1:
          raise ValueError(f"logits mode needs single-token score candidates; {text!r} -> {toks}")
        ids.append(toks[0])
        values.append(float(text))
      if len(set(ids)) != len(ids):
        raise ValueError(f"score candidates share tokens: {list(options.logit_candidates)}")
      self.cand_ids, self.cand_values = jnp.asarray(ids), jnp.asarray(values, jnp.float32)

  def judge_view(self, image: np.ndarray):
    """What the understanding branch sees: the official transforms (PIL in) or, with `vit_image_size`,
    `square_view` at that size (for small synthetic images)."""
    size = int(self.config.vit_image_size)
    if not size:
      return Image.fromarray(np.asarray(image, np.uint8))
    return square_view(image, size)

  def _placement(self, rows: int) -> dict:
    """Attention implementation, and the mesh to split `rows` over (rows are padded to divide: `_padded`)."""
    return dict(attn_impl=self.attn_impl, mesh=loaded_model.batch_rows_mesh(self.model, rows))

  def rows(self, n: int) -> int:
    """Rows a judge call on n items runs with: a multiple of `score.batch_size` (itself rounded up to the mesh's
    batch shards), so every call of a query kind has one shape (one compile per stage, not one per chunk size)."""
    ways = loaded_model.batch_ways(self.model)
    unit = -(-max(1, int(self.config.batch_size)) // ways) * ways
    return max(1, -(-n // unit)) * unit

  def _padded(self, *lists):
    """Each list with its last item repeated up to `rows` (rows are independent: the first len keep their
    results whatever the padding)."""
    return [list(x) + list(x)[-1:] * (self.rows(len(x)) - len(x)) for x in lists]

  # -- generate mode ---------------------------------------------------------------------------
  def answers(self, images, prompts_text, max_new, temperature=0.0) -> List[str]:
    """Greedy (or sampled) free-text answers to `prompts_text` about `images`, think blocks stripped."""
    self.key, k = jax.random.split(self.key)
    n = len(images)
    # sampled retries draw per-row noise from the batch's shape: only the mesh's padding here (as always)
    ways = loaded_model.batch_ways(self.model)
    images, prompts_text = (loaded_model.pad_rows(x, ways) for x in ([self.judge_view(im) for im in images], prompts_text))
    answer_text = loaded_model.on_mesh(self.model, decoding.answer_text)
    raw = answer_text(self.model.params["bagel"], self.model.tokenizer, images, prompts_text,
                      cfg=self.model.cfg, system_prompt=self.system, max_new_tokens=int(max_new),
                      temperature=temperature, key=k, dtype=self.dtype,
                      text_budget=int(self.config.text_budget) or None, **self._placement(len(images)))
    return [parsing.strip_think(t) for t in raw[:n]]

  def _with_retries(self, images, texts, max_new, parse):
    """Parse each answer; re-ask the unparsable ones (sampled) up to max_retries times."""
    results: List[Optional[object]] = [None] * len(texts)
    pending = list(range(len(texts)))
    for attempt in range(int(self.config.max_retries) + 1):
      if not pending:
        break
      temp = 0.0 if attempt == 0 else float(self.config.retry_temperature)
      answers = self.answers([images[i] for i in pending], [texts[i] for i in pending], max_new, temp)
      self.retries += len(pending) if attempt else 0
      still = []
      for i, a in zip(pending, answers):
        results[i] = parse(i, a)
        if results[i] is None:
          still.append(i)
      pending = still
    return results

  # -- logits mode -----------------------------------------------------------------------------
  def _expected(self, images, texts) -> List[float]:
    n = len(images)
    images, texts = self._padded([self.judge_view(im) for im in images], texts)
    next_token_logits = loaded_model.on_mesh(self.model, decoding.next_token_logits)
    logits = next_token_logits(self.model.params["bagel"], self.model.tokenizer, images, texts, "Score:",
                               cfg=self.model.cfg, system_prompt=None, dtype=self.dtype,
                               text_budget=int(self.config.text_budget) or None,
                               **self._placement(len(images)))
    return self._expectation(logits)[:n]

  def _expectation(self, logits) -> List[float]:
    p = jax.nn.softmax(logits[:, self.cand_ids], axis=-1)
    return [float(v) for v in np.asarray(p @ self.cand_values)]

  def _identified_expected(self, images, texts) -> List[tuple]:
    """(score, identified object) per one-box region prompt: name the object, then the expected score."""
    n = len(images)
    images, texts = self._padded([self.judge_view(im) for im in images], texts)
    names, logits = loaded_model.on_mesh(self.model, decoding.continue_then_logits)(
        self.model.params["bagel"], self.model.tokenizer, images, texts, "Region ID: 1\nIdentified Object:", "\nScore:",
        cfg=self.model.cfg, max_new_tokens=int(self.config.max_identify_tokens), dtype=self.dtype,
        text_budget=int(self.config.text_budget) or None, **self._placement(len(images)))
    return list(zip(self._expectation(logits)[:n], names[:n]))

  # -- both ------------------------------------------------------------------------------------
  def global_scores(self, images, prompts_text) -> List[Optional[float]]:
    qs = [texts_lib.render_global(self.texts, p) for p in prompts_text]
    if self.config.mode == "logits":
      return self._expected(images, qs)
    out = self._with_retries(images, qs, self.config.max_new_tokens_global,
                             lambda i, a: parsing.parse_global_score(a, self.stats))
    return out

  def region_scores(self, images, prompts_text, boxes_list) -> List[Dict[int, tuple]]:
    """Per image {region index (1-based): (score, object)}."""
    if self.config.mode == "logits":
      flat = [(i, k) for i, bs in enumerate(boxes_list) for k in range(len(bs))]
      out: List[Dict[int, tuple]] = [dict() for _ in images]
      for chunk in distributed.batched(flat, self.rows(1)):  # full chunks: one shape
        qs = [texts_lib.render_regions(self.texts, prompts_text[i], [boxes_list[i][k]]) for i, k in chunk]
        ims = [images[i] for i, _ in chunk]
        if self.config.region_identify:
          vals = self._identified_expected(ims, qs)
        else:
          vals = [(v, None) for v in self._expected(ims, qs)]
        for (i, k), v in zip(chunk, vals):
          out[i][k + 1] = v
      return out
    qs = [texts_lib.render_regions(self.texts, p, bs) for p, bs in zip(prompts_text, boxes_list)]
    parsed = self._with_retries(
        images, qs, self.config.max_new_tokens_regions,
        lambda i, a: parsing.parse_region_answers(a, len(boxes_list[i]), self.stats) or None)
    return [{} if r is None else {k: (v.score, v.object) for k, v in r.items()} for r in parsed]
