"""Judge prompts for SRUM's self-rewarding step (after SRUM's `srum_data_infer/vlm.py`), written in our own words.

The scorer is the model itself in understanding mode with the think system prompt. Every prompt asks for
answers in the exact line format the parsers in `srum_jax.rewards.parsing` read:

* global layout / sample level: ``Score: <x>`` then ``Reason: <text>``;
* regions: one block per region, ``Region ID: k``, ``Identified Object: ...``, ``Score: <x>``.

Scores live in [-1, 1] and all prompts share one five-band guide (`SCORE_BANDS`).
"""
from __future__ import annotations

from typing import Sequence

# Understanding with thinking: the judge reasons first, then answers after </think>.
JUDGE_THINK_SYSTEM_PROMPT = (
  "Before answering, work through the problem step by step. Put all of that reasoning between <think> and "
  "</think>. After the closing </think> tag, write only the final answer, in the format the user asks for."
)

# Generation with thinking (think mode): plan the picture in text, then produce the image.
GEN_THINK_SYSTEM_PROMPT = (
  "You will be asked to create an image. First plan it: inside <think> and </think>, reason about what the "
  "request needs (the objects, how many, their attributes, where each one goes and how they relate) and "
  "turn it into a detailed description of the picture. After </think>, produce the image from that plan."
)

SCORE_BANDS = (
  "Scoring guide (use a single number between -1.0 and 1.0):\n"
  "- 1.0: perfect, exactly what the prompt asks for.\n"
  "- 0.5 to 0.9: very good, only small flaws.\n"
  "- -0.4 to 0.4: neutral or mixed; use 0.0 when it is perfectly neutral.\n"
  "- -0.9 to -0.5: bad, clear mistakes.\n"
  "- -1.0: it contradicts the prompt."
)


def _clean(prompt: str) -> str:
  return " ".join(str(prompt).split())


def global_layout_prompt(prompt: str) -> str:
  """Asks for one layout score: does the arrangement of the image follow the prompt's spatial intent?"""
  return (
    f'This image was generated from the text prompt: "{_clean(prompt)}"\n\n'
    "Judge only the layout: whether the positions, arrangement and composition of the things in the image "
    "agree with what the prompt says about space (left/right, above/below, in front/behind, inside, next to, "
    "counts arranged in a scene, and similar). Ignore drawing quality and style.\n\n"
    f"{SCORE_BANDS}\n"
    "If the prompt says nothing about placement or arrangement, give a neutral 0.0.\n\n"
    "Examples:\n"
    '- Prompt "a cup to the left of a laptop", the cup is clearly on the left: Score: 1.0\n'
    '- Prompt "a bird above a boat", the bird sits below the boat: Score: -1.0\n'
    '- Prompt "a red apple", no spatial request: Score: 0.0\n\n'
    "Answer in exactly this format:\n"
    "Score: <number between -1.0 and 1.0>\n"
    "Reason: <one or two sentences>"
  )


def _box_text(box: Sequence[float]) -> str:
  vals = []
  for v in box:
    f = float(v)
    vals.append(str(int(f)) if f.is_integer() else f"{f:g}")
  return "[" + ", ".join(vals) + "]"


def region_prompt(prompt: str, boxes: Sequence[Sequence[float]]) -> str:
  """Asks for a score per proposed region (boxes [x0, y0, x1, y1] in pixels, ids 1..K in the given order)."""
  regions = "\n\n".join(f"Region ID: {k}\nBounding Box: {_box_text(b)}" for k, b in enumerate(boxes, start=1))
  example = "\n\n".join(
    f"Region ID: {k}\nIdentified Object: {obj}\nScore: {s}"
    for k, (obj, s) in enumerate([("a brown dog lying on the grass", "0.8"), ("a blurred, malformed bicycle", "-0.6")],
                                 start=1))
  return (
    f'This image was generated from the text prompt: "{_clean(prompt)}"\n\n'
    "The following regions of the image are given as pixel boxes [x_min, y_min, x_max, y_max]:\n\n"
    f"{regions}\n\n"
    "For every region, say what object it shows and give one score that combines two things: how relevant "
    "and correct the region is for the prompt (the right object, attributes, count and place) and how good "
    "it looks (clean shapes, no distortions or artifacts). Be strict: reserve high scores for regions that "
    "are both correct and well drawn.\n\n"
    f"{SCORE_BANDS}\n\n"
    "Answer with one block per region, separated by a blank line, in this format:\n"
    "Region ID: <id>\nIdentified Object: <short description>\nScore: <number between -1.0 and 1.0>\n\n"
    f"Example answer for two regions:\n{example}"
  )


def sample_level_prompt(prompt: str) -> str:
  """Asks for one overall score of the whole image against the prompt (not used by the shipped SRUM scripts)."""
  return (
    f'This image was generated from the text prompt: "{_clean(prompt)}"\n\n'
    "Give your overall impression of the whole image: does it show everything the prompt asks for, with the "
    "right attributes and arrangement, and is it of good visual quality?\n\n"
    f"{SCORE_BANDS}\n\n"
    "Answer in exactly this format:\n"
    "Score: <number between -1.0 and 1.0>\n"
    "Reason: <one or two sentences>"
  )
