"""Object detectors from transformers, one interface: `detector(images, queries, threshold)` -> per
image a list of `Detection(label, score, box, mask)` sorted by score (best first), boxes in pixels
of that image.

* `owlv2` / `owlvit` (`Owlv2ForObjectDetection`, `OwlViTForObjectDetection`): open-vocabulary
  detectors
  queried with the prompt's own object words ("a photo of a <object>"). T2I-CompBench's UniDet (a
  detectron2 model over the COCO + Objects365 + OpenImages + Mapillary label spaces) is not in
  transformers; an open-vocabulary detector covers its objects without a label-space mapping. Each
  image patch predicts one box labelled with its best query.
* `mask2former` (`Mask2FormerForUniversalSegmentation`, a COCO instance checkpoint such as
  facebook/mask2former-swin-small-coco-instance): GenEval's detector (mmdet's Mask2Former Swin-S on
  COCO); closed vocabulary (`labels`), with instance masks. Detections follow mmdet's Mask2Former
  instance head: the top 100 (query, class) pairs by class probability, mask = sigmoid(mask logits)
  > 0.5 at the image's size, score = class probability x mean mask probability inside the mask, box
  = the mask's bounding box.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import numpy as np

from srum_jax.evaluation import torch_models

__all__ = [
    "Detection", "OwlDetector", "Mask2FormerDetector", "load_detector", "DETECTORS",
    "QUERY_TEMPLATE"
]

DETECTORS = ("owlv2", "owlvit", "mask2former")
QUERY_TEMPLATE = "a photo of a {}"  # the OWL-ViT paper's query form
MAX_PER_IMAGE = 100  # mmdet's Mask2Former test setting


@dataclasses.dataclass(frozen=True)
class Detection:
  label: str
  score: float
  box: Tuple[float, float, float, float]  # x_min, y_min, x_max, y_max in pixels
  mask: Optional[np.ndarray] = None  # bool [H, W] from segmenting detectors


class OwlDetector:
  """OWLv2 / OWL-ViT: free-text queries per image."""
  open_vocabulary = True

  def __init__(self, kind: str, path: str, device: str, dtype, key: str):
    import torch
    from transformers import (AutoImageProcessor, AutoTokenizer, Owlv2ForObjectDetection,
                              OwlViTForObjectDetection)
    torch_models.require_dir(path, key, f"an {kind} detector")
    cls = Owlv2ForObjectDetection if kind == "owlv2" else OwlViTForObjectDetection
    self.torch, self.device, self.dtype, self.kind = torch, device, dtype, kind
    self.model = cls.from_pretrained(path, dtype=dtype).to(device).eval()
    self.image_processor = AutoImageProcessor.from_pretrained(path)
    self.tokenizer = AutoTokenizer.from_pretrained(path)
    self.labels = None

  def __call__(self, images, queries: Sequence[Sequence[str]],
               threshold: float) -> List[List[Detection]]:
    torch = self.torch
    images = torch_models.pil_images(images)
    n = max(1, max(len(q) for q in queries))
    # repeats never win ties
    padded = [list(q) + [q[-1]] * (n - len(q)) if q else [""] * n for q in queries]
    enc = self.tokenizer([QUERY_TEMPLATE.format(q) for qs in padded for q in qs],
                         padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    pix = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
      out = self.model(input_ids=enc["input_ids"].to(self.device),
                       attention_mask=enc["attention_mask"].to(self.device), pixel_values=pix.to(
                           self.device, self.dtype))
    probs = torch.sigmoid(out.logits.float()).cpu().numpy()  # [B, patches, queries]
    boxes = out.pred_boxes.float().cpu().numpy()  # [B, patches, 4] (cx, cy, w, h) in [0, 1]
    result = []
    for b, im in enumerate(images):
      w, h = im.size
      # OWLv2 pads to a square (bottom / right) before resizing; OWL-ViT stretches to a square
      sx, sy = (max(w, h), max(w, h)) if self.kind == "owlv2" else (w, h)
      label, score = probs[b].argmax(-1), probs[b].max(-1)
      dets = []
      for p in np.nonzero((score > threshold) & (len(queries[b]) > 0))[0]:
        cx, cy, bw, bh = boxes[b, p]
        x0, x1 = np.clip([(cx - bw / 2) * sx, (cx + bw / 2) * sx], 0.0, w)
        y0, y1 = np.clip([(cy - bh / 2) * sy, (cy + bh / 2) * sy], 0.0, h)
        if x1 > x0 and y1 > y0:  # boxes in OWLv2's padding fall outside the image: dropped
          dets.append(
              Detection(padded[b][label[p]], float(score[p]),
                        (float(x0), float(y0), float(x1), float(y1))))
      result.append(sorted(dets, key=lambda d: -d.score))
    return result


def mask_box(mask: np.ndarray) -> Optional[Tuple[float, float, float, float]]:
  """Bounding box (x_min, y_min, x_max + 1, y_max + 1) of a bool mask; None when empty (mmdet's
  mask2bbox)."""
  xs, ys = np.nonzero(mask.any(axis=0))[0], np.nonzero(mask.any(axis=1))[0]
  if not len(xs) or not len(ys):
    return None
  return float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)


class Mask2FormerDetector:
  """Mask2Former instance segmentation with a fixed label set (`labels`); queries only select
  labels."""
  open_vocabulary = False

  def __init__(self, path: str, device: str, dtype, key: str):
    import torch
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation
    torch_models.require_dir(path, key, "a Mask2Former instance-segmentation model")
    self.torch, self.device, self.dtype = torch, device, dtype
    self.model = Mask2FormerForUniversalSegmentation.from_pretrained(path,
                                                                     dtype=dtype).to(device).eval()
    self.image_processor = AutoImageProcessor.from_pretrained(path)
    self.names = [self.model.config.id2label[i] for i in range(len(self.model.config.id2label))]
    self.labels = set(self.names)

  def __call__(self, images, queries: Sequence[Sequence[str]],
               threshold: float) -> List[List[Detection]]:
    torch = self.torch
    images = torch_models.pil_images(images)
    enc = self.image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
      out = self.model(pixel_values=enc["pixel_values"].to(self.device, self.dtype))
    return [
        self._instances(out, b, enc, im.size, set(queries[b]), threshold)
        for b, im in enumerate(images)
    ]

  def _instances(self, out, b: int, enc, size, wanted: set, threshold: float) -> List[Detection]:
    torch, functional = self.torch, self.torch.nn.functional
    w, h = size
    cls = out.class_queries_logits[b].float().softmax(-1)[:, :-1]  # drop "no object"
    num_classes = cls.shape[-1]
    scores, flat = cls.flatten().topk(min(MAX_PER_IMAGE, cls.numel()))
    keep = scores > threshold  # the final score is at most the class probability
    scores, flat = scores[keep], flat[keep]
    if not len(flat):
      return []
    logits = out.masks_queries_logits[b][flat // num_classes].float()[None]
    pad_h, pad_w = enc["pixel_values"].shape[-2:]
    valid = enc["pixel_mask"][b] if "pixel_mask" in enc else torch.ones(pad_h, pad_w)
    vh, vw = int(valid.any(dim=1).sum()), int(valid.any(dim=0).sum())
    logits = functional.interpolate(logits, size=(pad_h, pad_w), mode="bilinear",
                                    align_corners=False)
    logits = functional.interpolate(logits[:, :, :vh, :vw], size=(h, w), mode="bilinear",
                                    align_corners=False)[0]
    prob = logits.sigmoid()
    binary = prob > 0.5
    mask_score = (prob * binary).flatten(1).sum(-1) / (binary.flatten(1).sum(-1) + 1e-6)
    dets = []
    for k, label_id in enumerate((flat % num_classes).tolist()):
      name, mask = self.names[label_id], binary[k].cpu().numpy()
      box = mask_box(mask)
      score = float(scores[k] * mask_score[k])
      if name in wanted and box is not None and score > threshold:
        dets.append(Detection(name, score, box, mask))
    return sorted(dets, key=lambda d: -d.score)


def load_detector(kind: str, path: str, device: str, dtype, key: str):
  if kind in ("owlv2", "owlvit"):
    return OwlDetector(kind, path, device, dtype, key)
  if kind == "mask2former":
    return Mask2FormerDetector(path, device, dtype, key)
  raise ValueError(f"unknown detector {kind!r}; choose one of {DETECTORS}")
