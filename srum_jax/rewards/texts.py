"""The texts sent to the model and to the metric judges: one `Texts` value, own or official.

A `Texts` holds the two think system prompts (BAGEL's generation and understanding prompts), SRUM's
judge prompts as templates, and the evaluation rubrics (SRUM's T2I-CompBench question,
T2I-ReasonBench's two-turn protocol). Two sets exist:

* `own_texts()`: the project's own wording (written here). The shapes world's model was trained on
  it, so its renders stay byte-identical; tests and the random-model plumbing use it too.
* a texts file (JSON, `load_texts`): the official sentences, written by `python -m srum_jax texts
  import` from the user's checkouts of BAGEL, SRUM and T2I-ReasonBench (`rewards.official_texts`).
  The repository never holds them.

Templates use `str.format` syntax with named placeholders (literal braces doubled), the formatting
rules of the f-strings they come from, so rendering an official template gives the official
function's string byte for byte:

    global        {prompt}
    regions       {prompt} {regions}; {regions} = `region_joiner`.join(block per box), where
    region_block  {region_id} (1, 2, ... in the given order) {bbox} (written as `box_format` says)
    compbench     {prompt}
    reasonbench   per dimension: `describe` (no placeholder), one question per criterion group
                  {criteria}

`prompt_rule` says what the prompt goes through first ("verbatim" or "collapse_whitespace").
`box_format`: "python_list" (`str()` of the box as a Python list of the coordinates as given: SRUM's
SAM boxes and the proposers' are ints, "[12, 40, 300, 512]") or "compact" (integral values as ints,
other floats with `g`: "[5.5, 1, 7, 8]").

File layout (`FORMAT`): {"format", "origin", "gen_think_system", "judge_think_system", "global",
"regions": {"template", "block", "joiner", "box"}, "prompt_rule", "compbench_question",
"reasonbench": {dimension: {"describe", "questions": {group: template}}} (may be {}),
"sources": {role: {"path", "sha256", "checkout"}}}.
"""
from __future__ import annotations

import dataclasses
import json
import string
from typing import Any, Dict, Mapping, Optional, Sequence

from srum_jax import paths
from srum_jax.errors import UserFileNotFoundError, UserValueError

FORMAT = "srum_jax.texts/1"
OWN = "own"
BOX_FORMATS = ("python_list", "compact")
PROMPT_RULES = ("verbatim", "collapse_whitespace")
# template -> (placeholders it may use, placeholders it must use)
FIELDS = {
    "global": ({"prompt"}, {"prompt"}),
    "regions.template": ({"prompt", "regions"}, {"prompt", "regions"}),
    "regions.block": ({"region_id", "bbox"}, {"region_id", "bbox"}),
    "compbench_question": ({"prompt"}, {"prompt"}),
    "reasonbench.describe": (set(), set()),
    "reasonbench.question": ({"criteria"}, {"criteria"}),
}
IMPORT_HINT = ("run `python -m srum_jax texts import --bagel_code=<BAGEL checkout> "
               "--srum_code=<SRUM checkout> [--reasonbench_code=<T2I-ReasonBench checkout>] "
               "--out=texts.json` (README, 'Official texts')")


@dataclasses.dataclass(frozen=True)
class Texts:
  """Every text a stage sends (module docstring). `sources`: role -> {"path", "sha256", "checkout"}
  of the files the official texts were read from ({} for the own set, whose `origin` is "own")."""
  origin: str
  gen_think_system: str
  judge_think_system: str
  global_template: str
  region_template: str
  region_block: str
  region_joiner: str
  box_format: str
  prompt_rule: str
  compbench_question: str
  reasonbench: Mapping[str, Mapping[str, Any]]
  sources: Mapping[str, Mapping[str, str]]


# ------------------------------------------------------------------------------------------------
# The project's own words.

_SCORE_BANDS = (
    "Scoring guide (use a single number between -1.0 and 1.0):\n"
    "- 1.0: perfect, exactly what the prompt asks for.\n"
    "- 0.5 to 0.9: very good, only small flaws.\n"
    "- -0.4 to 0.4: neutral or mixed; use 0.0 when it is perfectly neutral.\n"
    "- -0.9 to -0.5: bad, clear mistakes.\n"
    "- -1.0: it contradicts the prompt."
)
_ABOUT = 'This image was generated from the text prompt: "{prompt}"\n\n'
_OWN_GLOBAL = (
    _ABOUT
    + "Judge only the layout: whether the positions, arrangement and composition of the things in "
    "the image agree with what the prompt says about space (left/right, above/below, in "
    "front/behind, inside, next to, counts arranged in a scene, and similar). Ignore drawing "
    "quality and style.\n\n"
    + _SCORE_BANDS + "\n"
    "If the prompt says nothing about placement or arrangement, give a neutral 0.0.\n\n"
    "Examples:\n"
    '- Prompt "a cup to the left of a laptop", the cup is clearly on the left: Score: 1.0\n'
    '- Prompt "a bird above a boat", the bird sits below the boat: Score: -1.0\n'
    '- Prompt "a red apple", no spatial request: Score: 0.0\n\n'
    "Answer in exactly this format:\n"
    "Score: <number between -1.0 and 1.0>\n"
    "Reason: <one or two sentences>"
)
_OWN_REGIONS = (
    _ABOUT
    + "The following regions of the image are given as pixel boxes "
    "[x_min, y_min, x_max, y_max]:\n\n"
    "{regions}\n\n"
    "For every region, say what object it shows and give one score that combines two things: how "
    "relevant and correct the region is for the prompt (the right object, attributes, count and "
    "place) and how good it looks (clean shapes, no distortions or artifacts). Be strict: reserve "
    "high scores for regions that are both correct and well drawn.\n\n"
    + _SCORE_BANDS + "\n\n"
    "Answer with one block per region, separated by a blank line, in this format:\n"
    "Region ID: <id>\nIdentified Object: <short description>\n"
    "Score: <number between -1.0 and 1.0>\n\n"
    "Example answer for two regions:\n"
    "Region ID: 1\nIdentified Object: a brown dog lying on the grass\nScore: 0.8\n\n"
    "Region ID: 2\nIdentified Object: a blurred, malformed bicycle\nScore: -0.6"
)
# Stand-ins for the evaluation rubrics (plumbing, tests): the same answer formats, our sentences.
_OWN_COMPBENCH = (
    "Rate how well this image matches the text prompt \"{prompt}\". Look at the objects, their "
    "attributes (colour, shape, texture), where they are and what they do. Use a whole number from "
    "0 to 100: 81-100 it matches fully; 61-80 small differences; 41-60 key parts are missing; "
    "21-40 little of the prompt is shown; 1-20 it does not show the prompt. Reply with JSON "
    "holding the keys score (a number) and explanation (at most 20 words)."
)
_OWN_DESCRIBE = "Write a description of what this image shows."
_OWN_QUESTION = (
    "Using the image and the description you gave, score each of the questions q1, q2, ... with "
    "1, 0.5 or 0 by its scoring criterion c1, c2, ...\n"
    "Questions and criteria: {criteria}\n"
    "Think about the image and every question, then answer in JSON:\n"
    '{{"reason": [your reasoning], "score": [s1, s2, ...]}}'
)
# T2I-ReasonBench's dimensions and the criterion groups each asks (its Qwen2.5-VL/eval_*.py).
REASONBENCH_GROUPS = {
    "idiom_interpretation": ("reason_evaluation", "quality_evaluation"),
    "textual_image_design": ("reason_evaluation", "quality_evaluation"),
    "entity_reasoning": ("entity_evaluation", "other_details_evaluation", "quality_evaluation"),
    "scientific_reasoning": ("scientific_evaluation", "other_details_evaluation",
                             "quality_evaluation"),
}


def own_texts() -> Texts:
  """The project's own wording of every text (the shapes world's model was trained on these)."""
  return Texts(
      origin=OWN,
      gen_think_system=(
          "You will be asked to create an image. First plan it: inside <think> and </think>, "
          "reason about what the request needs (the objects, how many, their attributes, where "
          "each one goes and how they relate) and turn it into a detailed description of the "
          "picture. After </think>, produce the image from that plan."),
      judge_think_system=(
          "Before answering, work through the problem step by step. Put all of that reasoning "
          "between <think> and </think>. After the closing </think> tag, write only the final "
          "answer, in the format the user asks for."),
      global_template=_OWN_GLOBAL, region_template=_OWN_REGIONS,
      region_block="Region ID: {region_id}\nBounding Box: {bbox}", region_joiner="\n\n",
      box_format="compact", prompt_rule="collapse_whitespace", compbench_question=_OWN_COMPBENCH,
      reasonbench={dim: {"describe": _OWN_DESCRIBE, "questions": {g: _OWN_QUESTION for g in groups}}
                   for dim, groups in REASONBENCH_GROUPS.items()},
      sources={})


# ------------------------------------------------------------------------------------------------
# Rendering: the exact strings the stages send.

def _prompt(texts: Texts, prompt: str) -> str:
  if texts.prompt_rule == "collapse_whitespace":
    return " ".join(str(prompt).split())
  return str(prompt)


def format_box(box: Sequence[float], box_format: str) -> str:
  """A box as the region prompt writes it (`box_format`, module docstring)."""
  if box_format == "python_list":  # the coordinates as given (NumPy scalars as Python numbers)
    return str([v.item() if hasattr(v, "item") else v for v in box])
  values = [int(float(v)) if float(v).is_integer() else float(v) for v in box]
  return "[" + ", ".join(str(v) if isinstance(v, int) else f"{v:g}" for v in values) + "]"


def render_global(texts: Texts, prompt: str) -> str:
  """The global-layout judge question for `prompt`."""
  return texts.global_template.format(prompt=_prompt(texts, prompt))


def render_regions(texts: Texts, prompt: str, boxes: Sequence[Sequence[float]]) -> str:
  """The region judge question for `prompt` and `boxes` ([x0, y0, x1, y1] pixels; ids 1..K in
  the given order)."""
  blocks = [texts.region_block.format(region_id=k, bbox=format_box(b, texts.box_format))
            for k, b in enumerate(boxes, start=1)]
  return texts.region_template.format(prompt=_prompt(texts, prompt),
                                      regions=texts.region_joiner.join(blocks))


def render_compbench(texts: Texts, prompt: str) -> str:
  """The 0-100 MLLM judge's question (SRUM's T2I-CompBench evaluation); the prompt goes in as it
  is."""
  return texts.compbench_question.format(prompt=prompt)


def reasonbench_protocol(texts: Texts, dimension: str) -> Mapping[str, Any]:
  """{"describe", "questions": {group: template}} of `dimension`; a user error when it is absent."""
  if dimension not in texts.reasonbench:
    raise UserValueError(f"the texts ({texts.origin}) hold no T2I-ReasonBench protocol for "
                         f"{dimension!r}; import them with --reasonbench_code: {IMPORT_HINT}")
  return texts.reasonbench[dimension]


def reasonbench_describe(texts: Texts, dimension: str) -> str:
  """T2I-ReasonBench's first turn (the judge describes the image) for `dimension`."""
  return reasonbench_protocol(texts, dimension)["describe"]


def render_reasonbench(texts: Texts, dimension: str, group: str, criteria: Any) -> str:
  """T2I-ReasonBench's second-turn question for one criterion group; `criteria` is the benchmark's
  entry as read from its JSON (written as Python's `str()` of it, as the benchmark's f-string)."""
  questions = reasonbench_protocol(texts, dimension)["questions"]
  if group not in questions:
    raise UserValueError(f"the texts have no T2I-ReasonBench question for {dimension}/{group}; "
                         f"{IMPORT_HINT}")
  return questions[group].format(criteria=criteria)


def show(texts: Texts, prompt: str, boxes: Sequence[Sequence[float]]) -> Dict[str, str]:
  """What the stages would send for `prompt` and `boxes` (`python -m srum_jax texts show`)."""
  return {"gen_think_system": texts.gen_think_system,
          "judge_think_system": texts.judge_think_system,
          "global": render_global(texts, prompt), "regions": render_regions(texts, prompt, boxes)}


# ------------------------------------------------------------------------------------------------
# The texts file.

def to_json(texts: Texts) -> Dict[str, Any]:
  """The file layout of `texts` (module docstring)."""
  return {"format": FORMAT, "origin": texts.origin, "gen_think_system": texts.gen_think_system,
          "judge_think_system": texts.judge_think_system, "global": texts.global_template,
          "regions": {"template": texts.region_template, "block": texts.region_block,
                      "joiner": texts.region_joiner, "box": texts.box_format},
          "prompt_rule": texts.prompt_rule, "compbench_question": texts.compbench_question,
          "reasonbench": {d: {"describe": v["describe"], "questions": dict(v["questions"])}
                          for d, v in texts.reasonbench.items()},
          "sources": {k: dict(v) for k, v in texts.sources.items()}}


def save_texts(texts: Texts, path: str) -> None:
  """Check `texts` and write them as a texts file (UTF-8 JSON)."""
  check_texts(texts, path)
  data = json.dumps(to_json(texts), indent=1, ensure_ascii=False) + "\n"
  paths.write_bytes(path, data.encode("utf-8"))


def template_fields(template: str, where: str) -> set:
  """The placeholder names of a `str.format` template; a malformed template, a positional field or
  an attribute / index field is a user error naming `where`."""
  try:
    parsed = list(string.Formatter().parse(template))
  except ValueError as e:
    raise UserValueError(f"{where}: not a valid template ({e})") from None
  names = set()
  for _, name, spec, _ in parsed:
    if name is None:
      continue
    if not name.isidentifier() or "{" in (spec or ""):
      raise UserValueError(f"{where}: placeholder {{{name}}} is not a plain name")
    names.add(name)
  return names


def _check_template(template: Any, kind: str, where: str) -> None:
  if not isinstance(template, str):
    raise UserValueError(f"{where}: expected a string, got {type(template).__name__}")
  allowed, required = FIELDS[kind]
  names = template_fields(template, where)
  if names - allowed or required - names:
    also = f" (may also use {sorted(allowed - required)})" if allowed - required else ""
    raise UserValueError(f"{where}: placeholders {sorted(names)}; expected "
                         f"{sorted(required)}{also}")


def check_texts(texts: Texts, where: str = "texts") -> None:
  """Raise a one-line `UserValueError` unless every template has its placeholders and every rule
  is known."""
  for key in ("gen_think_system", "judge_think_system"):
    value = getattr(texts, key)
    if not isinstance(value, str) or not value:
      raise UserValueError(f"{where}: {key} must be a non-empty string")
  _check_template(texts.global_template, "global", f"{where}: global")
  _check_template(texts.region_template, "regions.template", f"{where}: regions.template")
  _check_template(texts.region_block, "regions.block", f"{where}: regions.block")
  _check_template(texts.compbench_question, "compbench_question", f"{where}: compbench_question")
  if not isinstance(texts.region_joiner, str):
    raise UserValueError(f"{where}: regions.joiner must be a string")
  if texts.box_format not in BOX_FORMATS:
    raise UserValueError(f"{where}: regions.box {texts.box_format!r} is not one of {BOX_FORMATS}")
  if texts.prompt_rule not in PROMPT_RULES:
    raise UserValueError(f"{where}: prompt_rule {texts.prompt_rule!r} is not one of {PROMPT_RULES}")
  for dim, entry in texts.reasonbench.items():
    if not isinstance(entry, Mapping) or not isinstance(entry.get("questions"), Mapping):
      raise UserValueError(f"{where}: reasonbench.{dim} needs 'describe' and 'questions'")
    _check_template(entry.get("describe"), "reasonbench.describe",
                    f"{where}: reasonbench.{dim}.describe")
    for group, q in entry["questions"].items():
      _check_template(q, "reasonbench.question", f"{where}: reasonbench.{dim}.questions.{group}")


def from_json(data: Any, where: str = "texts") -> Texts:
  """A `Texts` from the file layout, checked (`check_texts`)."""
  if not isinstance(data, dict) or data.get("format") != FORMAT:
    raise UserValueError(f"{where}: not a texts file (expected \"format\": {FORMAT!r}); "
                         f"{IMPORT_HINT}")
  try:
    regions = data["regions"]
    texts = Texts(origin=str(data["origin"]), gen_think_system=data["gen_think_system"],
                  judge_think_system=data["judge_think_system"], global_template=data["global"],
                  region_template=regions["template"], region_block=regions["block"],
                  region_joiner=regions["joiner"], box_format=regions["box"],
                  prompt_rule=data["prompt_rule"], compbench_question=data["compbench_question"],
                  reasonbench=dict(data.get("reasonbench") or {}),
                  sources=dict(data.get("sources") or {}))
  except (KeyError, TypeError) as e:
    raise UserValueError(f"{where}: missing or malformed entry {e}") from None
  check_texts(texts, where)
  return texts


def load_texts(path: str) -> Texts:
  """The texts file at `path` (written by `texts import`), checked."""
  if not paths.path(path).is_file():
    raise UserFileNotFoundError(f"texts file {path!r} not found; {IMPORT_HINT}")
  try:
    data = json.loads(paths.path(path).read_bytes().decode("utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    why = " ".join(str(e).split())
    raise UserValueError(f"texts file {path}: not valid JSON ({why})") from None
  return from_json(data, f"texts file {path}")


def from_setting(value: Optional[str]) -> Texts:
  """The texts a config names (`texts.file`): "" or "own" -> `own_texts()`, else the file."""
  return own_texts() if value in ("", None, OWN) else load_texts(str(value))
