"""T2I-ReasonBench (Sun et al., github.com/KaiyueSun98/T2I-ReasonBench) through the MLLM judge.

Inputs are the benchmark's files for one dimension: the prompts JSON (a list of {"prompt", ...};
entry k is image `k+1` as four digits, the benchmark's file names) and the question-criterion JSON
(a list of {"id": k+1, "<group>_evaluation": ...}). The protocol's texts are the texts'
`reasonbench` entry (read from the user's T2I-ReasonBench checkout by `texts import
--reasonbench_code`, or the own stand-ins): the judge describes the image (the `describe` turn),
then, in a second turn after its own description, scores each group's questions with 1, 0.5 or 0 and
answers JSON {"reason": ..., "score": [s1, s2, ...]}, up to 1000 new tokens a turn (the benchmark's
`eval_*.py`). Per image: accuracy = the weighted sum of the accuracy groups' means (`SCORING`:
idiom, textual: reason 1.0; entity, scientific: their group 0.7 + other details 0.3), quality = the
quality group's mean; a dimension's scores are the means x 100. An answer without a valid score list
is asked again like the 0-100 judge's, then counted as failed and left out.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Dict, List, Optional, Sequence, Tuple

from srum_jax import files
from srum_jax.data.prompt_sources import PromptItem, PromptList
from srum_jax.evaluation import mllm_judge, torch_models
from srum_jax.rewards import texts as texts_lib

__all__ = [
    "DIMENSIONS", "SCORING", "infer_dimension", "load_items", "parse_score_list", "image_scores",
    "ReasonBenchScorer"
]

DIMENSIONS = {
    "idiom": "idiom_interpretation",
    "textual": "textual_image_design",
    "entity": "entity_reasoning",
    "scientific": "scientific_reasoning"
}
# The benchmark's scoring per dimension (its eval_<dimension>.py and model_score): accuracy groups
# with their weights, and the quality group. The groups are `texts.REASONBENCH_GROUPS`.
SCORING = {
    "idiom_interpretation": {
        "accuracy": {
            "reason_evaluation": 1.0
        },
        "quality": "quality_evaluation"
    },
    "textual_image_design": {
        "accuracy": {
            "reason_evaluation": 1.0
        },
        "quality": "quality_evaluation"
    },
    "entity_reasoning": {
        "accuracy": {
            "entity_evaluation": 0.7,
            "other_details_evaluation": 0.3
        },
        "quality": "quality_evaluation"
    },
    "scientific_reasoning": {
        "accuracy": {
            "scientific_evaluation": 0.7,
            "other_details_evaluation": 0.3
        },
        "quality": "quality_evaluation"
    },
}
MAX_NEW_TOKENS = 1000  # the benchmark's ask_qw: model.generate(max_new_tokens=1000)


def infer_dimension(dimension: str, *paths: str) -> str:
  """`dimension` when given, else the one whose keyword (idiom, textual, entity, scientific) a
  file name has."""
  if dimension:
    return dimension
  for path in paths:
    for word, dim in DIMENSIONS.items():
      if word in pathlib.Path(path).name.lower():
        return dim
  raise ValueError(
      f"cannot tell the T2I-ReasonBench dimension from {list(paths)}; set "
      f"eval.reasonbench.dimension "
      f"to one of {sorted(DIMENSIONS.values())}")


def _read_list(path: str, key: str) -> list:
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"{key} {path!r} not found")
  data = files.read_json(p, key)
  if not isinstance(data, list):
    raise ValueError(f"{key} {path}: expected a JSON list, got {type(data).__name__}")
  return data


def groups_of(dimension: str) -> List[str]:
  """The criterion groups a dimension asks: its accuracy groups, then its quality group."""
  return list(SCORING[dimension]["accuracy"]) + [SCORING[dimension]["quality"]]


def load_items(prompts_path: str, questions_path: str, dimension: str, texts: texts_lib.Texts):
  """(PromptItems with ids "0001"..., {id: question-criterion entry}, dimension); every entry must
  carry the dimension's groups, and `texts` a question for each of them."""
  dim = infer_dimension(dimension, prompts_path, questions_path)
  if dim not in SCORING:
    raise ValueError(f"unknown T2I-ReasonBench dimension {dim!r}; known: {sorted(SCORING)}")
  groups = groups_of(dim)
  missing = [g for g in groups if g not in texts_lib.reasonbench_protocol(texts, dim)["questions"]]
  if missing:
    raise ValueError(f"the texts' T2I-ReasonBench protocol for {dim} has no question for {missing}")
  prompts = _read_list(prompts_path, "eval.reasonbench.prompts")
  by_id = {int(q["id"]): q for q in _read_list(questions_path, "eval.reasonbench.questions")
           if isinstance(q, dict) and "id" in q}
  items, questions = [], {}
  for k, entry in enumerate(prompts, start=1):
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
      raise ValueError(f"{prompts_path}: entry {k} has no 'prompt' string")
    q = by_id.get(k)
    if q is None or any(g not in q for g in groups):
      raise ValueError(f"{questions_path}: no entry with id {k} holding {groups}")
    items.append(PromptItem(id=f"{k:04d}", prompt=entry["prompt"].strip(), category=dim))
    questions[f"{k:04d}"] = q
  return PromptList(items), questions, dim


_FIRST_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)
_SCORE_LIST = re.compile(r'"score"\s*:\s*\[([^\]]*)\]')


def _scores(value) -> Optional[List[float]]:
  try:
    out = [float(v) for v in value]
  except (TypeError, ValueError):
    return None
  return out if out and all(0.0 <= v <= 1.0 for v in out) else None


def parse_score_list(text: str) -> Optional[List[float]]:
  """The answer's "score" list (each in [0, 1]): the benchmark's first-{...} JSON, else any JSON
  object with a score list, else the `"score": [...]` pattern; None when there is none."""
  text = str(text)
  m = _FIRST_OBJECT.search(text)
  candidates = []
  if m:
    try:
      candidates.append(json.loads(m.group(0)))
    except json.JSONDecodeError:
      pass
  candidates += list(mllm_judge.json_objects(text))
  for obj in candidates:
    if isinstance(obj, dict) and isinstance(obj.get("score"), list) and _scores(
        obj["score"]) is not None:
      return _scores(obj["score"])
  m = _SCORE_LIST.search(text)
  return _scores([v.strip().strip('"') for v in m.group(1).split(",")]) if m else None


def image_scores(group_scores: Dict[str, Sequence[float]], scoring: dict) -> Tuple[float, float]:
  """(accuracy, quality) in [0, 1] of one image from its groups' score lists (`scoring`: a
  `SCORING` entry)."""
  mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
  accuracy = sum(float(w) * mean(group_scores[g]) for g, w in scoring["accuracy"].items())
  return accuracy, mean(group_scores[scoring["quality"]])


class ReasonBenchScorer:
  """The `reasonbench` metric (module docstring)."""
  name = "reasonbench"

  def __init__(self, rcfg, mcfg, *, device: str, questions: Dict[str, dict], dimension: str,
               texts: texts_lib.Texts):
    self.cfg, self.mcfg, self.texts, self.dimension = rcfg, mcfg, texts, dimension
    self.dim, self.questions = SCORING[dimension], questions
    self.judge = mllm_judge.MLLMJudge(mcfg.model_dir, "eval.mllm.model_dir", device=device,
                                      dtype=torch_models.resolve_dtype(mcfg.torch_dtype),
                                      device_map=mcfg.device_map, batch_size=int(mcfg.batch_size))

  def __call__(self, images, rows: Sequence[dict]) -> List[dict]:
    known = [k for k, r in enumerate(rows) if r.get("prompt_id", r["id"]) in self.questions]
    scored = dict(zip(known, self._protocol([images[k] for k in known],
                                            [rows[k] for k in known]))) if known else {}
    return [
        scored.get(k) or {
            "id": r["id"],
            "prompt": r["prompt"],
            "category": r["category"],
            "score": None,
            "quality": None,
            "skipped": "no question-criterion entry for this prompt id"
        } for k, r in enumerate(rows)
    ]

  def _protocol(self, images, rows: Sequence[dict]) -> List[dict]:
    first = [mllm_judge.user_turn(texts_lib.reasonbench_describe(self.texts, self.dimension))]
    budget = int(self.mcfg.max_new_tokens) or MAX_NEW_TOKENS
    descriptions = self.judge.chat(images, [first] * len(rows), max_new_tokens=budget)
    groups = groups_of(self.dimension)
    found: Dict[str, tuple] = {}
    for g in groups:
      convs = [
          first + [{
              "role": "assistant",
              "content": d
          }, {
              "role": "user",
              "content": [{
                  "type": "text",
                  "text": texts_lib.render_reasonbench(
                      self.texts, self.dimension, g, self.questions[r.get("prompt_id", r["id"])][g])
              }]
          }] for r, d in zip(rows, descriptions)
      ]
      found[g] = mllm_judge.ask_until_parsed(
          self.judge, images, convs, parse_score_list, max_new_tokens=budget, max_retries=int(
              self.mcfg.max_retries), retry_temperature=float(self.mcfg.retry_temperature))
    out = []
    for k, r in enumerate(rows):
      lists = {g: found[g][0][k] for g in groups}
      row = {
          "id": r["id"],
          "prompt": r["prompt"],
          "category": r["category"],
          "description": descriptions[k],
          "groups": lists,
          "answers": {
              g: found[g][1][k] for g in groups
          }
      }
      failed = [g for g, v in lists.items() if v is None]
      if failed:
        out.append({**row, "score": None, "quality": None, "failed": f"no score list for {failed}"})
      else:
        accuracy, quality = image_scores(lists, self.dim)
        out.append({**row, "score": 100 * accuracy, "quality": 100 * quality})
    return out
