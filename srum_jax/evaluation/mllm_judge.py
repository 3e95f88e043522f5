"""An external MLLM judge as in SRUM's evaluation: a Qwen2.5-VL-class model from transformers scores
each image 0-100 against its prompt with a rubric (the paper: Qwen2.5-VL-72B-Instruct on
T2I-CompBench).

The question is the texts' `compbench_question` with the prompt in it
(`rewards.texts.render_compbench`): SRUM's `CompBench_eval/qwen_eval.py` question, read from the
user's SRUM checkout by `texts import`, or the project's stand-in in its own words (the own texts:
tests and plumbing). The image comes first in the user turn, then the text, answered greedily in up
to 512 new tokens (qwen_eval.py's). The answer's score is the number of its JSON "score" key (SRUM's
`extract_score`: the JSON object, else the `"score": N` pattern), kept only inside 0-100. Answers
without one are asked again (`max_retries` times, sampling at `retry_temperature`); what still fails
is counted as a parse failure and left out of the means, never a crash.

The model is any transformers image-text-to-text model whose tokenizer has a chat template and whose
image processor returns `image_grid_thw` (the Qwen2-VL family): the image placeholder token is
expanded to the image's patch count here, so no torchvision-backed processor is needed. bf16 by
default (`torch_dtype`); one device (`eval.device`) or, with `device_map = "auto"`, layers spread
over all visible GPUs (accelerate).
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import re
from typing import List, Optional, Sequence

from srum_jax.evaluation import torch_models
from srum_jax.rewards import texts as texts_lib

__all__ = ["SCORE_RANGE", "MAX_NEW_TOKENS", "parse_score", "MLLMJudge", "MLLMScorer"]

SCORE_RANGE = (0.0, 100.0)  # the question's scale
# SRUM's CompBench_eval/qwen_eval.py: model.generate(max_new_tokens=512, do_sample=False)
MAX_NEW_TOKENS = 512


_SCORE = re.compile(r'"?score"?\s*:\s*"?(-?\d+(?:\.\d+)?)"?')


def json_objects(text: str):
  """Every balanced {...} substring of `text` that parses as a JSON object, in order."""
  for start in [i for i, ch in enumerate(text) if ch == "{"]:
    depth = 0
    for end in range(start, len(text)):
      depth += {"{": 1, "}": -1}.get(text[end], 0)
      if depth == 0:
        try:
          obj = json.loads(text[start:end + 1])
        except json.JSONDecodeError:
          break
        if isinstance(obj, dict):
          yield obj
        break


def parse_score(text: str, score_range: Sequence[float] = (0, 100)) -> Optional[float]:
  """The answer's score: a JSON object's "score" (number or numeric string), else `"score": N`; None
  when absent or outside `score_range`."""
  cleaned = str(text).replace("```json", "").replace("```", "")
  value = None
  for obj in json_objects(cleaned):
    if "score" in obj:
      try:
        value = float(obj["score"])
      except (TypeError, ValueError):
        value = None
      break
  if value is None:
    m = _SCORE.search(cleaned)
    value = float(m.group(1)) if m else None
  if value is None or not (score_range[0] <= value <= score_range[1]):
    return None
  return value


class MLLMJudge:
  """A chat MLLM over (image, conversation) pairs; `chat` returns the assistant's next message
  per pair."""

  def __init__(self, model_dir: str, key: str, *, device: str, dtype, device_map: str = "",
               batch_size: int = 4):
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    torch_models.require_dir(model_dir, key, "a Qwen2.5-VL-class image-text-to-text model")
    self.torch, self.batch_size = torch, max(1, int(batch_size))
    if device_map:
      if importlib.util.find_spec("accelerate") is None:  # transformers places the layers with it
        raise ImportError(
            "eval.mllm.device_map needs the `accelerate` package; install it or set it to ''")
      self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype,
                                                               device_map=device_map)
      self.device = self.model.device
    else:
      self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device)
      self.device = device
    self.model.eval()
    self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
    self.tokenizer.padding_side = "left"
    if self.tokenizer.chat_template is None:
      for name in ("chat_template.jinja", "chat_template.json"):
        f = pathlib.Path(model_dir) / name
        if f.is_file():
          raw = f.read_text(encoding="utf-8")
          self.tokenizer.chat_template = json.loads(raw)["chat_template"] if name.endswith(
              ".json") else raw
          break
      else:
        raise ValueError(f"{key} {model_dir}: the tokenizer has no chat template")
    self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
    self.image_token = self.tokenizer.convert_ids_to_tokens(int(self.model.config.image_token_id))
    self.merge = int(getattr(self.image_processor, "merge_size", 1)) ** 2

  def chat(self, images, conversations: Sequence[List[dict]], *, max_new_tokens: int,
           temperature: float = 0.0) -> List[str]:
    """One image per conversation (its {"type": "image"} entry); answers in order, batched."""
    out: List[str] = []
    for i in range(0, len(conversations), self.batch_size):
      out += self._chat_batch(images[i:i + self.batch_size], conversations[i:i + self.batch_size],
                              max_new_tokens, temperature)
    return out

  def _chat_batch(self, images, conversations, max_new_tokens: int,
                  temperature: float) -> List[str]:
    torch = self.torch
    vision = self.image_processor(images=torch_models.pil_images(images), return_tensors="pt")
    grid = vision["image_grid_thw"]
    texts = []
    for k, conv in enumerate(conversations):
      t = self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
      texts.append(
          t.replace(self.image_token, self.image_token * int(grid[k].prod() // self.merge), 1))
    enc = self.tokenizer(texts, return_tensors="pt", padding=True)
    sample = temperature > 0
    with torch.no_grad():
      ids = self.model.generate(
          input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(
              self.device), pixel_values=vision["pixel_values"].to(self.device, self.model.dtype),
          image_grid_thw=grid.to(self.device), max_new_tokens=int(max_new_tokens), do_sample=sample,
          **({
              "temperature": float(temperature)
          } if sample else {}))
    return self.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def user_turn(question: str) -> dict:
  return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


def ask_until_parsed(judge: MLLMJudge, images, conversations, parse, *, max_new_tokens: int,
                     max_retries: int, retry_temperature: float):
  """Ask every conversation; ask the ones whose answer `parse` rejects (None) again, sampling, up to
  `max_retries` times. Returns (parsed values or None, last raw answers, tries per item)."""
  answers = judge.chat(images, conversations, max_new_tokens=max_new_tokens)
  values = [parse(a) for a in answers]
  tries = [1] * len(answers)
  for _ in range(int(max_retries)):
    todo = [i for i, v in enumerate(values) if v is None]
    if not todo:
      break
    again = judge.chat([images[i] for i in todo], [conversations[i] for i in todo],
                       max_new_tokens=max_new_tokens, temperature=retry_temperature)
    for i, a in zip(todo, again):
      answers[i], values[i], tries[i] = a, parse(a), tries[i] + 1
  return values, answers, tries


class MLLMScorer:
  """The `mllm` metric: one rubric score per image (module docstring)."""
  name = "mllm"

  def __init__(self, mcfg, *, device: str, texts: texts_lib.Texts):
    self.cfg = mcfg
    self.texts = texts
    self.judge = MLLMJudge(mcfg.model_dir, "eval.mllm.model_dir", device=device,
                           dtype=torch_models.resolve_dtype(mcfg.torch_dtype),
                           device_map=mcfg.device_map, batch_size=int(mcfg.batch_size))

  def __call__(self, images, rows: Sequence[dict]) -> List[dict]:
    convs = [[user_turn(texts_lib.render_compbench(self.texts, r["prompt"]))] for r in rows]
    values, answers, tries = ask_until_parsed(
        self.judge, images, convs, lambda a: parse_score(a, SCORE_RANGE),
        max_new_tokens=int(self.cfg.max_new_tokens) or MAX_NEW_TOKENS,
        max_retries=int(self.cfg.max_retries), retry_temperature=float(self.cfg.retry_temperature))
    return [{
        "id": r["id"],
        "prompt": r["prompt"],
        "category": r["category"],
        "score": v,
        "answer": a,
        "tries": t,
        **({
            "failed": "no score in the answer"
        } if v is None else {})
    } for r, v, a, t in zip(rows, values, answers, tries)]
