"""GenEval (Ghosh et al., github.com/djghosh13/geneval): object-focused checks over a detector's
output.

Prompts come from GenEval's `evaluation_metadata.jsonl`, one object per line:

    {"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "cat", "count": 1}],
     "prompt": "a photo of a bench and a cat"}

with optional `exclude` ([{"class", "count"}]: at least `count` of them fails), `color` (checked by
CLIP on the object's crop) and `position` ([relation, index of an earlier include group]) in include
clauses. Tags: single_object, two_object, counting, colors, position, color_attr. An image is
correct when every include clause holds and no exclude clause does (`evaluate`); a tag's score is
the share of correct images, the overall score the mean over tags.

Detections per class (`keep_detections`): scores above 0.3 (0.9 for the counting tag), best first,
at most 16, no NMS (GenEval's `max_overlap` 1.0). Colour: CLIP zero-shot over GenEval's ten colours
with the templates "a photo of a {c} {object}", "a photo of a {c}-colored {object}", "a photo of a
{c} object" (class embedding = the normalised mean of the three), on the detection's box crop with
the pixels outside its mask grey (#999). Position: `relative_position` with the 0.1 threshold.
Defaults are GenEval's, for its detector (Mask2Former on COCO, `detectors.Mask2FormerDetector`).
"""
from __future__ import annotations

import json
import pathlib
from typing import Callable, Dict, List, Sequence, Set, Tuple

import numpy as np
from PIL import Image

from srum_jax.data.prompt_sources import PromptItem, PromptList
from srum_jax.evaluation import detectors, torch_models

__all__ = [
    "COLORS", "load_items", "compute_iou", "relative_position", "keep_detections", "evaluate",
    "GenEvalScorer"
]

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}",
                   "a photo of a {c} object")
BACKGROUND = (153, 153, 153)  # "#999"


def load_items(path: str):
  """(PromptItems, {id: metadata}) from GenEval's metadata JSONL; id = the line's 0-based index as
  five digits (GenEval's folder names), category = the tag. Malformed lines raise (the file is the
  benchmark's)."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"GenEval metadata {path!r} not found (eval.geneval.metadata)")
  items, meta = [], {}
  for k, line in enumerate(l for l in p.read_text(encoding="utf-8").splitlines() if l.strip()):
    m = json.loads(line)
    if not isinstance(m, dict) or not isinstance(m.get("prompt"), str) or "tag" not in m:
      raise ValueError(
          f"{path}: entry {k} is not a GenEval metadata object with 'prompt' and 'tag'")
    item_id = f"{k:05d}"
    items.append(PromptItem(id=item_id, prompt=m["prompt"].strip(), category=str(m["tag"])))
    meta[item_id] = m
  return PromptList(items), meta


def compute_iou(box_a, box_b) -> float:
  """GenEval's box IoU (inclusive pixel areas)."""
  area = lambda b: max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)  # noqa: E731
  inter = area([
      max(box_a[0], box_b[0]),
      max(box_a[1], box_b[1]),
      min(box_a[2], box_b[2]),
      min(box_a[3], box_b[3])
  ])
  union = area(box_a) + area(box_b) - inter
  return inter / union if union else 0.0


def relative_position(box_a, box_b, threshold: float = 0.1) -> Set[str]:
  """Where A is relative to B: the centre offset, each axis shrunk by `threshold` x (sum of the two
  sizes), divided by the offset's length; a component beyond +-0.5 names the relation. Empty when
  both shrink to 0."""
  boxes = np.asarray([box_a[:4], box_b[:4]], np.float64).reshape(2, 2, 2)
  center_a, center_b = boxes.mean(axis=-2)
  dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
  offset = center_a - center_b
  revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
  if np.all(np.abs(revised) < 1e-3):
    return set()
  dx, dy = revised / np.linalg.norm(offset)
  rel = set()
  if dx < -0.5:
    rel.add("left of")
  if dx > 0.5:
    rel.add("right of")
  if dy < -0.5:
    rel.add("above")
  if dy > 0.5:
    rel.add("below")
  return rel


def keep_detections(dets: Sequence[detectors.Detection], *, threshold: float, max_objects: int,
                    nms_threshold: float) -> Dict[str, List[detectors.Detection]]:
  """{class: detections above `threshold`, best first, at most `max_objects`, greedy NMS unless
  it is 1}."""
  out: Dict[str, List[detectors.Detection]] = {}
  for label in dict.fromkeys(d.label for d in dets):
    order = sorted((d for d in dets if d.label == label and d.score > threshold),
                   key=lambda d: -d.score)
    order = order[:int(max_objects)]
    kept = []
    while order:
      best = order.pop(0)
      kept.append(best)
      order = [
          d for d in order if nms_threshold == 1 or compute_iou(best.box, d.box) < nms_threshold
      ]
    if kept:
      out[label] = kept
  return out


def evaluate(objects: Dict[str, List[detectors.Detection]], metadata: dict,
             colors_of: Callable[[str, List[detectors.Detection]], List[str]],
             position_threshold: float = 0.1) -> Tuple[bool, str]:
  """GenEval's verdict on one image: (correct, reasons). Include clauses are ANDed (colour and
  position are judged on the `count` most confident objects), exclude clauses ORed."""
  correct, reason, groups = True, [], []
  for req in metadata.get("include", []):
    name, count, matched = req["class"], int(req["count"]), True
    found = objects.get(name, [])[:count]
    if len(found) < count:
      correct = matched = False
      reason.append(f"expected {name}>={count}, found {len(found)}")
    else:
      if "color" in req:
        colors = colors_of(name, found)
        if colors.count(req["color"]) < count:
          correct = matched = False
          reason.append(
              f"expected {req['color']} {name}>={count}, found {colors.count(req['color'])} "
              f"{req['color']}; and " +
              ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors))
      if "position" in req and matched:
        expected, target = req["position"]
        if groups[target] is None:
          correct = matched = False
          reason.append(f"no target for {name} to be {expected}")
        else:
          for obj in found:
            for tgt in groups[target]:
              rels = relative_position(obj.box, tgt.box, position_threshold)
              if expected not in rels:
                correct = matched = False
                reason.append(
                    f"expected {name} {expected} target, found {' and '.join(rels)} target")
                break
            if not matched:
              break
    groups.append(found if matched else None)
  for req in metadata.get("exclude", []):
    name = req["class"]
    if len(objects.get(name, [])) >= int(req["count"]):
      correct = False
      reason.append(f"expected {name}<{req['count']}, found {len(objects[name])}")
  return correct, "\n".join(reason)


def object_crop(image: np.ndarray, det: detectors.Detection):
  """The detection's box crop, pixels outside its mask (when it has one) set to GenEval's grey."""
  im = np.asarray(image, np.uint8)
  if det.mask is not None:
    im = np.where(det.mask[..., None], im, np.asarray(BACKGROUND, np.uint8))
  x0, y0, x1, y1 = (int(round(v)) for v in det.box)
  return Image.fromarray(im).crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))


class GenEvalScorer:
  """The `geneval` metric: detector + CLIP colour classifier + `evaluate` (module docstring)."""
  name = "geneval"

  def __init__(self, gcfg, *, device: str, dtype, metadata: Dict[str, dict]):
    self.cfg, self.metadata = gcfg, metadata
    self.detector = detectors.load_detector(gcfg.detector, gcfg.detector_dir, device, dtype,
                                            "eval.geneval.detector_dir")
    self.clip = torch_models.Clip(gcfg.clip_dir, device, dtype, "eval.geneval.clip_dir")
    self._classifiers: Dict[str, np.ndarray] = {}
    if self.detector.labels is not None:
      names = {
          c["class"]
          for m in metadata.values()
          for c in m.get("include", []) + m.get("exclude", [])
      }
      unknown = sorted(names - self.detector.labels)
      if unknown:
        raise ValueError(f"eval.geneval.detector_dir: the detector has no class {unknown}")

  def _classifier(self, name: str) -> np.ndarray:
    if name not in self._classifiers:
      feats = [
          self.clip.text_features([t.format(c=c, obj=name)
                                   for t in COLOR_TEMPLATES]).mean(0)
          for c in COLORS
      ]
      w = np.stack(feats)
      self._classifiers[name] = w / np.linalg.norm(w, axis=-1, keepdims=True)
    return self._classifiers[name]

  def colors_of(self, image: np.ndarray, name: str, found: List[detectors.Detection]) -> List[str]:
    feats = self.clip.image_features([object_crop(image, d) for d in found])
    return [COLORS[i] for i in (feats @ self._classifier(name).T).argmax(-1)]

  def __call__(self, images, rows: Sequence[dict]) -> List[dict]:
    metas = [self.metadata.get(r.get("prompt_id", r["id"])) for r in rows]
    queries = [
        sorted({c["class"]
                for c in (m or {}).get("include", []) + (m or {}).get("exclude", [])})
        for m in metas
    ]
    dets = self.detector(images, queries,
                         min(float(self.cfg.threshold), float(self.cfg.counting_threshold)))
    out = []
    for im, r, m, d in zip(images, rows, metas, dets):
      base = {"id": r["id"], "prompt": r["prompt"], "category": r["category"]}
      if m is None:
        out.append({**base, "score": None, "skipped": "no GenEval metadata for this prompt id"})
        continue
      threshold = float(self.cfg.counting_threshold if m["tag"] ==
                        "counting" else self.cfg.threshold)
      objects = keep_detections(d, threshold=threshold, max_objects=int(self.cfg.max_objects),
                                nms_threshold=float(self.cfg.nms_threshold))
      ok, why = evaluate(objects, m, lambda name, found: self.colors_of(im, name, found),
                         float(self.cfg.position_threshold))
      out.append({**base, "score": float(ok), "correct": bool(ok), "reason": why,
                  "detections": {k: [[round(x.score, 4)] + [round(v, 1) for v in x.box] for x in v]
                                 for k, v in objects.items()}})
    return out
