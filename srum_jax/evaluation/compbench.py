"""T2I-CompBench's metrics (Huang et al., github.com/Karine-Huang/T2I-CompBench), per category:

| category | metric | per-image score |
|---|---|---|
| color, shape, texture | BLIP-VQA | product over the prompt's noun chunks of P(yes) / (P(yes) + P(no)) for "<chunk>?" |
| spatial | detector | 0.25 s1 + 0.25 s2 + position/2 (both objects found), 0.25 s (one), 0; below 0.5 -> 0 |
| numeracy | detector | per counted object (weight 1/n): +0.5 if detected, +0.5 more if the count is exact |
| non-spatial | CLIPScore | cosine of CLIP ViT-B/32 image and prompt features |
| complex (3-in-1) | all three | mean of BLIP-VQA, spatial, CLIPScore (see `three_in_one`) |
| 3d_spatial | - | needs a depth expert: counted as skipped |

`position` is `determine_position` of the benchmark (centres, IoU 0.1, distance 150 px), computed on
boxes scaled to the detector's frame in the benchmark (long side 480 px, `frame_size`). Objects and
counts come from the prompt (`text`), the detector is an open-vocabulary one from transformers
(`detectors`). Rules are pure functions below; `CompBenchScorer` runs the models over images.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from srum_jax.evaluation import detectors, text, torch_models

__all__ = [
    "CATEGORY_METRICS", "category_key", "blip_vqa_score", "determine_position", "spatial_score",
    "same_object", "distinct_boxes", "numeracy_score", "three_in_one", "to_frame", "CompBenchScorer"
]

CATEGORY_METRICS = {
    "color": "blip_vqa",
    "shape": "blip_vqa",
    "texture": "blip_vqa",
    "spatial": "spatial",
    "numeracy": "numeracy",
    "non-spatial": "clip",
    "complex": "three_in_one",
    "complex_spatial": "three_in_one",
    "complex_action": "three_in_one",
    "3d_spatial": None
}
_ALIASES = {
    "colour": "color",
    "non_spatial": "non-spatial",
    "nonspatial": "non-spatial",
    "3d-spatial": "3d_spatial",
    "complex-spatial": "complex_spatial",
    "complex-action": "complex_action"
}
Box = Tuple[float, float, float, float]


def category_key(category: str) -> str:
  """A benchmark category name in the form of CATEGORY_METRICS ("Non Spatial" -> "non-spatial")."""
  key = str(category).strip().lower().replace(" ", "_")
  return _ALIASES.get(key, key)


def blip_vqa_score(yes_probabilities: Sequence[float]) -> float:
  """Product of the per-noun-phrase answers (an absent question counts 1, as in the benchmark)."""
  return float(np.prod(np.asarray(yes_probabilities, np.float64)))


def determine_position(relation: Optional[str], box1: Box, box2: Box, iou_threshold: float = 0.1,
                       distance_threshold: float = 150.0) -> float:
  """The benchmark's soft position score of object 1 relative to object 2 (boxes x_min, y_min,
  x_max, y_max).

  "next to" / "on side of" / "near": 1 when the centres are within `distance_threshold` along x or
  y, else threshold / the larger offset. Left / right / top / bottom: 1 when the centre offset
  points that way along its dominant axis and IoU < `iou_threshold`, `iou_threshold / IoU` when they
  overlap more, else 0. Any other relation ("on top of" included, as in the benchmark) scores 0.
  """
  dx = (box2[0] + box2[2]) / 2 - (box1[0] + box1[2]) / 2
  dy = (box2[1] + box2[3]) / 2 - (box1[1] + box1[3]) / 2
  inter = (max(0.0, min(box1[2], box2[2]) - max(box1[0], box2[0]))
           * max(0.0, min(box1[3], box2[3]) - max(box1[1], box2[1])))
  union = (box1[2] - box1[0]) * (box1[3] - box1[1]) + (box2[2] - box2[0]) * (box2[3] -
                                                                             box2[1]) - inter
  iou = inter / union if union > 0 else 0.0
  if relation in ("next to", "on side of", "near"):
    if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
      return 1.0
    return distance_threshold / max(abs(dx), abs(dy))
  toward = {
      "on the right of": (dx < 0, abs(dx) > abs(dy)),
      "on the left of": (dx > 0, abs(dx) > abs(dy)),
      "on the bottom of": (dy < 0, abs(dy) > abs(dx)),
      "on the top of": (dy > 0, abs(dy) > abs(dx))
  }
  if relation not in toward or not all(toward[relation]):
    return 0.0
  return 1.0 if iou < iou_threshold else iou_threshold / iou


def spatial_score(relation: Optional[str], first: Optional[Tuple[float, Box]],
                  second: Optional[Tuple[float, Box]]) -> float:
  """The spatial image score from the best detection (confidence, box) of each object (None: not
  found)."""
  if first is not None and second is not None:
    score = 0.25 * first[0] + 0.25 * second[0] + determine_position(relation, first[1],
                                                                    second[1]) / 2
  elif first is not None or second is not None:
    score = 0.25 * (first or second)[0]
  else:
    score = 0.0
  return 0.0 if score < 0.5 else float(score)


def same_object(box1: Box, box2: Box) -> bool:
  """The numeracy script's duplicate test: IoU > 0.9 or either box > 90% inside the other
  (+1-pixel areas)."""
  iw = max(0.0, min(box1[2], box2[2]) - max(box1[0], box2[0]) + 1)
  ih = max(0.0, min(box1[3], box2[3]) - max(box1[1], box2[1]) + 1)
  inter = iw * ih
  a1 = (box1[2] - box1[0] + 1) * (box1[3] - box1[1] + 1)
  a2 = (box2[2] - box2[0] + 1) * (box2[3] - box2[1] + 1)
  return inter / (a1 + a2 - inter) > 0.9 or inter / a1 > 0.9 or inter / a2 > 0.9


def distinct_boxes(boxes: Sequence[Box]) -> List[Box]:
  """Boxes in order, each dropped when it duplicates one already kept."""
  kept: List[Box] = []
  for b in boxes:
    if not any(same_object(b, k) for k in kept):
      kept.append(b)
  return kept


def numeracy_score(targets: Sequence[Tuple[str, int]], found: Dict[str, Sequence[Box]]) -> float:
  """sum over targets of (0.5 if found else 0) + (0.5 if exactly `count` distinct boxes), divided
  by their number."""
  if not targets:
    raise ValueError("no counted objects")
  score = 0.0
  for name, count in targets:
    boxes = distinct_boxes(found.get(name, ()))
    if boxes:
      score += 0.5 + (0.5 if len(boxes) == count else 0.0)
  return score / len(targets)


def three_in_one(kind: str, attribute: float, spatial: float, action: float) -> float:
  """The complex category's score from BLIP-VQA (attribute), the spatial score of the objects around
  the relation and CLIPScore of the prompt without adjectives (action): (attribute + spatial) / 2
  for prompts of the spatial subset, (attribute + action) / 2 for the action subset, else the mean
  of all three."""
  if kind == "spatial":
    return (attribute + spatial) / 2
  if kind == "action":
    return (attribute + action) / 2
  return (attribute + spatial + action) / 3


def complex_subset_key(prompt: str) -> str:
  """How the 3-in-1 script matches a prompt to the spatial / action lists: lowercase, up to the
  first '.'."""
  return prompt.split(".")[0].lower()


def to_frame(box: Box, image_hw: Tuple[int, int], frame_size: float) -> Box:
  """A pixel box rescaled so that the image's long side is `frame_size` pixels."""
  s = float(frame_size) / max(image_hw)
  return tuple(float(v) * s for v in box)


_MODEL_USERS = {"blip": {"blip_vqa", "three_in_one"}, "clip": {"clip", "three_in_one"},
                "detector": {"spatial", "numeracy", "three_in_one"}}


def models_needed(categories) -> set:
  """Which of blip / clip / detector the categories' metrics use."""
  metrics = {CATEGORY_METRICS.get(category_key(c)) for c in categories}
  return {model for model, users in _MODEL_USERS.items() if metrics & users}


@dataclasses.dataclass
class _Needs:
  """What one image asks the models for."""
  questions: List[str] = dataclasses.field(default_factory=list)
  clip_text: Optional[str] = None
  queries: List[str] = dataclasses.field(default_factory=list)
  objects: Tuple[Optional[str], Optional[str]] = (None, None)
  relation: Optional[str] = None
  targets: List[Tuple[str, int]] = dataclasses.field(default_factory=list)
  kind: str = "all"


class CompBenchScorer:
  """Scores images with T2I-CompBench's metric of their category (module docstring)."""
  name = "compbench"

  def __init__(self, ccfg, *, device: str, dtype, items: Sequence):
    self.cfg = ccfg
    self.parser = text.make_parser(ccfg.text_parser)
    subsets = {"complex_spatial": set(), "complex_action": set()}
    for it in items:
      if category_key(it.category) in subsets:
        subsets[category_key(it.category)].add(complex_subset_key(it.prompt))
    self.spatial_subset, self.action_subset = subsets["complex_spatial"], subsets["complex_action"]
    needed = models_needed(it.category for it in items)
    self.blip = (torch_models.BlipVqa(ccfg.blip_dir, device, dtype, "eval.compbench.blip_dir")
                 if "blip" in needed else None)
    self.clip = torch_models.Clip(ccfg.clip_dir, device, dtype,
                                  "eval.compbench.clip_dir") if "clip" in needed else None
    self.detector = (
        detectors.load_detector(ccfg.detector, ccfg.detector_dir, device, dtype,
                                "eval.compbench.detector_dir") if "detector" in needed else None)

  @staticmethod
  def required_dirs(ccfg, categories) -> Dict[str, str]:
    """{config key: directory} of the models the categories need (checked before any work)."""
    return {
        f"eval.compbench.{m}_dir": getattr(ccfg, f"{m}_dir")
        for m in sorted(models_needed(categories))
    }

  def _needs(self, metric: str, row: dict) -> _Needs:
    p, prompt = self.parser, row["prompt"]
    n = _Needs()
    if metric in ("blip_vqa", "three_in_one"):
      n.questions = text.vqa_questions(p, prompt, int(self.cfg.np_num))
    if metric == "clip":
      n.clip_text = prompt
    if metric == "spatial":
      n.objects, n.relation = text.simple_spatial_objects(p, prompt), text.relation(prompt)
    if metric == "three_in_one":
      n.clip_text = text.without_adjectives(p, prompt)
      n.objects, n.relation = text.complex_spatial_objects(p, prompt), text.relation(prompt)
      key, cat = complex_subset_key(prompt), category_key(row["category"])
      n.kind = ("spatial" if cat == "complex_spatial" or
                (cat == "complex" and key in self.spatial_subset) else
                "action" if cat == "complex_action" or
                (cat == "complex" and key in self.action_subset) else "all")
    if metric == "numeracy":
      n.targets = text.numeracy_targets(p, prompt)
      n.queries = [name for name, _ in n.targets]
    if n.objects[0] is not None:
      n.queries = list(dict.fromkeys(n.objects))
    return n

  def __call__(self, images: Sequence[np.ndarray], rows: Sequence[dict]) -> List[dict]:
    metrics = [CATEGORY_METRICS.get(category_key(r["category"]), "unknown") for r in rows]
    needs = [
        self._needs(m, r) if m not in (None, "unknown") else _Needs()
        for m, r in zip(metrics, rows)
    ]
    answers = self._vqa(images, needs)
    cosines = self._clip(images, needs)
    found = self._detect(images, needs)
    return [self._score(m, r, n, a, c, f, im.shape[:2])
            for m, r, n, a, c, f, im in zip(metrics, rows, needs, answers, cosines, found, images)]

  def _vqa(self, images, needs: List[_Needs]) -> List[List[float]]:
    pairs = [(i, q) for i, n in enumerate(needs) for q in n.questions]
    probs: List[float] = []
    bs = int(self.cfg.batch_size)
    for k in range(0, len(pairs), bs):
      chunk = pairs[k:k + bs]
      probs += self.blip.yes_probability([images[i] for i, _ in chunk],
                                         [q for _, q in chunk]).tolist()
    out: List[List[float]] = [[] for _ in needs]
    for (i, _), prob in zip(pairs, probs):
      out[i].append(float(prob))
    return out

  def _clip(self, images, needs: List[_Needs]) -> List[Optional[float]]:
    idx = [i for i, n in enumerate(needs) if n.clip_text is not None]
    out: List[Optional[float]] = [None] * len(needs)
    if idx:
      sims = self.clip.cosine([images[i] for i in idx], [needs[i].clip_text for i in idx])
      for i, s in zip(idx, sims):
        out[i] = float(s)
    return out

  def _detect(self, images, needs: List[_Needs]) -> List[Dict[str, List[Tuple[float, Box]]]]:
    idx = [i for i, n in enumerate(needs) if n.queries]
    out: List[Dict[str, List[Tuple[float, Box]]]] = [{} for _ in needs]
    if idx:
      dets = self.detector([images[i] for i in idx], [needs[i].queries for i in idx],
                           float(self.cfg.detector_threshold))
      for i, image_dets in zip(idx, dets):
        hw = images[i].shape[:2]
        for d in image_dets:
          out[i].setdefault(d.label, []).append((d.score, to_frame(d.box, hw, self.cfg.frame_size)))
    return out

  def _score(self, metric, row, n: _Needs, answers, cosine, found, hw) -> dict:
    base = {"id": row["id"], "prompt": row["prompt"], "category": row["category"], "metric": metric,
            "parser": self.parser.name}
    if metric is None:
      return {**base, "score": None, "skipped": "3d_spatial needs a depth expert (not implemented)"}
    if metric == "unknown":
      return {
          **base, "score": None,
          "skipped": f"no T2I-CompBench metric for category {row['category']!r}"
      }
    parts: Dict[str, float] = {}
    if metric in ("blip_vqa", "three_in_one"):
      parts["blip_vqa"] = blip_vqa_score(answers)
    if metric in ("clip", "three_in_one"):
      parts["clip"] = cosine
    if metric in ("spatial", "three_in_one"):
      best = [found.get(o, [None])[0] if o is not None else None for o in n.objects]
      parts["spatial"] = spatial_score(n.relation, best[0], best[1])
    if metric == "numeracy":
      if not n.targets:
        return {**base, "score": None, "skipped": "no counted object in the prompt"}
      boxes = {k: [b for _, b in v] for k, v in found.items()}
      parts["numeracy"] = numeracy_score(n.targets, boxes)
    score = (
        three_in_one(n.kind, parts["blip_vqa"], parts["spatial"], parts["clip"])
        if metric == "three_in_one" else parts[metric])
    detail = {
        "questions": n.questions,
        "answers": answers,
        "objects": list(n.objects),
        "relation": n.relation,
        "targets": n.targets,
        "kind": n.kind if metric == "three_in_one" else None,
        "detections": {
            k: [[round(s, 4)] + [round(x, 1) for x in b] for s, b in v] for k, v in found.items()
        }
    }
    return {**base, "score": float(score), "parts": parts, "detail": detail}
