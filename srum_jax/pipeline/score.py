"""Stage `score`: the UMM judges its own images — global layout and per-region scores (the judge prompts of
the texts, `rewards.texts`: SRUM's `srum_data_infer/vlm.py` ones read from the user's checkout, or the own
wording; `rewards.parsing`; records in the official format, see `rewards.records`).

Two judge modes:
* `generate` (paper-faithful): decode an answer to the global-layout prompt and to the region prompt
  (optionally in think mode), parse it with `rewards.parsing`, retry unparsable answers up to
  `max_retries` times (retries sample at `retry_temperature`, since greedy decoding would repeat itself),
  and fall back to the official defaults (global 0.0, no regions) when every try fails.
* `logits`: one forward pass per query, no decoding. The answer is prefixed with "Score:" and the
  expected value of the next-token distribution restricted to the score tokens (`logit_candidates`,
  each a single token) is the score. Regions are asked one at a time with a one-box region prompt; with
  `region_identify` the model first names the object in the box (greedy, "Region ID: 1\nIdentified
  Object: ...", the official answer order) and the score is read after that name (`decoding.continue_then_logits`).

Writes `rewards.jsonl` (versioned `RewardRecord`s, image paths relative to the generate dir) and
`stats.json` (parse failures, retries, clamps, score histograms). Finished ids are skipped on restart.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from srum_jax import paths
from srum_jax.pipeline import common, generate, propose
from srum_jax.rewards import parsing, records
from srum_jax.rewards import texts as texts_lib


@dataclasses.dataclass
class ScoreReport:
  images: int = 0
  skipped_done: int = 0
  skipped_bad_image: int = 0
  skipped_no_proposals: int = 0
  skipped_log_lines: int = 0  # unreadable or incomplete lines of the metadata / regions / rewards logs
  scored: int = 0
  global_failures: int = 0
  region_failures: int = 0
  retries: int = 0
  regions_scored: int = 0
  nonfinite_answers: int = 0  # judge scores that were NaN / inf / outside [-1, 1]: counted as failures


def _histogram(values: Sequence[float]) -> Dict[str, int]:
  edges = np.linspace(-1, 1, 11)
  counts, _ = np.histogram(np.asarray(values, np.float64), bins=edges)
  return {f"[{edges[i]:.1f},{edges[i + 1]:.1f})": int(c) for i, c in enumerate(counts)}


def square_view(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 image -> PIL bicubic resize to size x size (a multiple of the ViT patch, 14): the judge's view of
  small synthetic images (`score.vit_image_size`), and what pretraining shows the judge."""
  from PIL import Image
  if size % 14:
    raise ValueError(f"score.vit_image_size must be a multiple of 14, got {size}")
  return np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((size, size), Image.BICUBIC))


class Judge:
  """The model's understanding branch as a scorer (both modes behind one interface); `texts` gives the judge
  questions and the think system prompt (`rewards.texts`)."""

  def __init__(self, scfg, model: common.Model, *, texts: texts_lib.Texts, seed: int = 0, compute_dtype="float32",
               attn_impl: str = "dense"):
    self.config = scfg
    self.model = model
    self.texts = texts
    self.attn_impl = attn_impl
    self.dtype = jnp.dtype(compute_dtype)
    self.stats = parsing.ParseStats()
    self.key = jax.random.key(seed)
    if scfg.mode not in ("generate", "logits"):
      raise ValueError(f"score.mode must be 'generate' or 'logits', got {scfg.mode!r}")
    self.system = texts.judge_think_system if scfg.think else None
    if scfg.mode == "logits":
      values, ids = [], []
      for text in scfg.logit_candidates:
        toks = model.tokenizer.encode(str(text))
        if len(toks) != 1:
          raise ValueError(f"logits mode needs single-token score candidates; {text!r} -> {toks}")
        ids.append(toks[0])
        values.append(float(text))
      if len(set(ids)) != len(ids):
        raise ValueError(f"score candidates share tokens: {list(scfg.logit_candidates)}")
      self.cand_ids, self.cand_values = jnp.asarray(ids), jnp.asarray(values, jnp.float32)

  def judge_view(self, image: np.ndarray):
    """What the understanding branch sees: the official transforms (PIL in) or, with `vit_image_size`,
    `square_view` at that size (for small synthetic images)."""
    from PIL import Image
    size = int(self.config.vit_image_size)
    if not size:
      return Image.fromarray(np.asarray(image, np.uint8))
    return square_view(image, size)

  def _placement(self, rows: int) -> dict:
    """Attention implementation, and the mesh to split `rows` over (rows are padded to divide: `_padded`)."""
    return dict(attn_impl=self.attn_impl, mesh=common.batch_rows_mesh(self.model, rows))

  def rows(self, n: int) -> int:
    """Rows a judge call on n items runs with: a multiple of `score.batch_size` (itself rounded up to the mesh's
    batch shards), so every call of a query kind has one shape (one compile per stage, not one per chunk size)."""
    ways = common.batch_ways(self.model)
    unit = -(-max(1, int(self.config.batch_size)) // ways) * ways
    return max(1, -(-n // unit)) * unit

  def _padded(self, *lists):
    """Each list with its last item repeated up to `rows` (rows are independent: the first len keep their
    results whatever the padding)."""
    return [list(x) + list(x)[-1:] * (self.rows(len(x)) - len(x)) for x in lists]

  # -- generate mode ---------------------------------------------------------------------------
  def answers(self, images, prompts_text, max_new, temperature=0.0) -> List[str]:
    """Greedy (or sampled) free-text answers to `prompts_text` about `images`, think blocks stripped."""
    from srum_jax.inference import decoding
    self.key, k = jax.random.split(self.key)
    n = len(images)
    # sampled retries draw per-row noise from the batch's shape: only the mesh's padding here (as always)
    ways = common.batch_ways(self.model)
    images, prompts_text = (common.pad_rows(x, ways) for x in ([self.judge_view(im) for im in images], prompts_text))
    answer_text = common.on_mesh(self.model, decoding.answer_text)
    raw = answer_text(self.model.params["bagel"], self.model.tokenizer, images, prompts_text,
                      cfg=self.model.cfg, system_prompt=self.system, max_new_tokens=int(max_new),
                      temperature=temperature, key=k, dtype=self.dtype,
                      text_budget=int(self.config.text_budget) or None, **self._placement(len(images)))
    return [parsing.strip_think(t) for t in raw[:n]]

  def _with_retries(self, images, texts, max_new, parse, rep: ScoreReport):
    """Parse each answer; re-ask the unparsable ones (sampled) up to max_retries times."""
    results: List[Optional[object]] = [None] * len(texts)
    pending = list(range(len(texts)))
    for attempt in range(int(self.config.max_retries) + 1):
      if not pending:
        break
      temp = 0.0 if attempt == 0 else float(self.config.retry_temperature)
      answers = self.answers([images[i] for i in pending], [texts[i] for i in pending], max_new, temp)
      rep.retries += len(pending) if attempt else 0
      still = []
      for i, a in zip(pending, answers):
        results[i] = parse(i, a)
        if results[i] is None:
          still.append(i)
      pending = still
    return results

  # -- logits mode -----------------------------------------------------------------------------
  def _expected(self, images, texts) -> List[float]:
    from srum_jax.inference import decoding
    n = len(images)
    images, texts = self._padded([self.judge_view(im) for im in images], texts)
    next_token_logits = common.on_mesh(self.model, decoding.next_token_logits)
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
    from srum_jax.inference import decoding
    n = len(images)
    images, texts = self._padded([self.judge_view(im) for im in images], texts)
    names, logits = common.on_mesh(self.model, decoding.continue_then_logits)(
        self.model.params["bagel"], self.model.tokenizer, images, texts, "Region ID: 1\nIdentified Object:", "\nScore:",
        cfg=self.model.cfg, max_new_tokens=int(self.config.max_identify_tokens), dtype=self.dtype,
        text_budget=int(self.config.text_budget) or None, **self._placement(len(images)))
    return list(zip(self._expectation(logits)[:n], names[:n]))

  # -- both ------------------------------------------------------------------------------------
  def global_scores(self, images, prompts_text, rep: ScoreReport) -> List[Optional[float]]:
    qs = [texts_lib.render_global(self.texts, p) for p in prompts_text]
    if self.config.mode == "logits":
      return self._expected(images, qs)
    out = self._with_retries(images, qs, self.config.max_new_tokens_global,
                             lambda i, a: parsing.parse_global_score(a, self.stats), rep)
    return out

  def region_scores(self, images, prompts_text, boxes_list, rep: ScoreReport) -> List[Dict[int, tuple]]:
    """Per image {region index (1-based): (score, object)}."""
    if self.config.mode == "logits":
      flat = [(i, k) for i, bs in enumerate(boxes_list) for k in range(len(bs))]
      out: List[Dict[int, tuple]] = [dict() for _ in images]
      for chunk in common.batched(flat, self.rows(1)):  # full chunks: one shape
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
        lambda i, a: parsing.parse_region_answers(a, len(boxes_list[i]), self.stats) or None, rep)
    return [{} if r is None else {k: (v.score, v.object) for k, v in r.items()} for r in parsed]


def _checked(value: Optional[float], rep: ScoreReport) -> Optional[float]:
  """A judge's score as a record may hold it (finite, in [-1, 1]); anything else is a counted failure (None)."""
  if value is None:
    return None
  ok = records.valid_score(value)
  if ok is None:
    rep.nonfinite_answers += 1
  return ok


def score(scfg, model: common.Model, gen_dir: str, propose_dir: str, out_dir: str, *, seed: int,
          texts: texts_lib.Texts, compute_dtype="float32", attn_impl: str = "dense") -> ScoreReport:
  rep = ScoreReport()
  judge = Judge(scfg, model, texts=texts, seed=seed, compute_dtype=compute_dtype, attn_impl=attn_impl)
  paths.path(out_dir).mkdir(parents=True, exist_ok=True)
  log = common.process_log(out_dir, "rewards")  # record fields + the item id (extra key, tolerated)
  log_rep = common.LogReport()
  done = {r["id"] for r in common.read_rows(out_dir, "rewards", report=log_rep)}
  regions = {r["id"]: r for r in propose.read_regions(propose_dir, log_rep)}
  rows = common.process_shard(generate.read_metadata(gen_dir, log_rep))
  rep.skipped_log_lines = log_rep.skipped
  todo = []
  for row in rows:
    rep.images += 1
    if row["id"] in done:
      rep.skipped_done += 1
    elif row["id"] not in regions and scfg.use_regions:
      rep.skipped_no_proposals += 1
    else:
      todo.append(row)
  g_values, r_values = [], []
  bar = common.progress(len(todo), f"score[{scfg.mode}]")
  for chunk in common.batched(todo, int(scfg.batch_size)):
    imgs, keep = [], []
    for row in chunk:
      im, why = common.load_rgb(paths.join(gen_dir, row["image_file"]))
      if im is None:
        rep.skipped_bad_image += 1
      else:
        imgs.append(im)
        keep.append(row)
    bar.update(len(chunk))
    if not keep:
      continue
    texts = [r["prompt"] for r in keep]
    g = judge.global_scores(imgs, texts, rep) if scfg.use_global else [None] * len(keep)
    g = [_checked(v, rep) for v in g]
    boxes = [[reg["box"] for reg in regions.get(r["id"], {}).get("regions", [])] for r in keep]
    with_boxes = [i for i, b in enumerate(boxes) if b]
    rs: List[Dict[int, tuple]] = [dict() for _ in keep]
    if scfg.use_regions and with_boxes:
      got = judge.region_scores([imgs[i] for i in with_boxes], [texts[i] for i in with_boxes],
                                [boxes[i] for i in with_boxes], rep)
      for i, r in zip(with_boxes, got):
        rs[i] = {k: (s, o) for k, (s, o) in r.items() if _checked(s, rep) is not None}
    done_rows = []
    for i, row in enumerate(keep):
      gs = g[i]
      if scfg.use_global and gs is None:
        rep.global_failures += 1
        gs = float(scfg.global_default)
      if scfg.use_regions and boxes[i] and not rs[i]:
        rep.region_failures += 1
      regs = tuple(records.RegionReward(box=tuple(float(v) for v in boxes[i][k - 1]), score=float(s), object=o)
                   for k, (s, o) in sorted(rs[i].items()))
      rec = records.RewardRecord(image_file=row["image_file"], prompt=row["prompt"],
                                 global_score=None if gs is None else float(gs), regions=regs,
                                 image_size=(int(imgs[i].shape[1]), int(imgs[i].shape[0])),
                                 metadata={"id": row["id"], "category": row.get("category"), "mode": scfg.mode})
      done_rows.append(dict(rec.to_dict(), id=row["id"], seq=row.get("seq")))
      rep.scored += 1
      rep.regions_scored += len(regs)
      if gs is not None:
        g_values.append(gs)
      r_values += [r.score for r in regs]
    log.extend(done_rows)  # the chunk's records in one write
  bar.close()
  stats = {"report": dataclasses.asdict(rep), "parse": dataclasses.asdict(judge.stats),
           "global_histogram": _histogram(g_values), "region_histogram": _histogram(r_values),
           "global_mean": float(np.mean(g_values)) if g_values else None,
           "region_mean": float(np.mean(r_values)) if r_values else None}
  common.write_json(paths.join(out_dir, "stats.json" if jax.process_count() == 1 else f"stats.{jax.process_index()}.json"),
                    stats)
  common.merge_process_logs(out_dir, "rewards")  # training reads <out>/rewards.jsonl: every process's records
  common.summary_line("score", **dataclasses.asdict(rep), out=out_dir)
  return rep
