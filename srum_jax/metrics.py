"""Small evaluation metrics shared by the evaluators and benchmarks (pure NumPy)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["roc_auc", "box_iou_inclusive", "box_cell"]


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> Optional[float]:
  """Area under the ROC curve: P(score of a positive > score of a negative), ties counting half;
  None when one class is absent."""
  s, y = np.asarray(scores, np.float64), np.asarray(labels, bool)
  pos, neg = s[y], s[~y]
  if len(pos) == 0 or len(neg) == 0:
    return None
  greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return float(greater / (len(pos) * len(neg)))


def box_iou_inclusive(a: Sequence[int], b: Sequence[int]) -> float:
  """IoU of two integer boxes [x0, y0, x1, y1] whose max corner is inside the box (the proposer's
  boxes)."""
  ix = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
  iy = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
  area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
  inter = ix * iy
  return inter / max(area(a) + area(b) - inter, 1)


def box_cell(box: Sequence[int], grid: int, width: int, height: int) -> Tuple[int, int]:
  """(column, row) of the grid x grid cell holding the centre of an inclusive box."""
  cx, cy = (box[0] + box[2] + 1) / 2, (box[1] + box[3] + 1) / 2
  return min(int(cx * grid // width), grid - 1), min(int(cy * grid // height), grid - 1)
