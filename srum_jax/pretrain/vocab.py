"""The shapes world's word-level vocabulary and the text of pretraining's judge answers.

The tokenizer's normaliser turns each constant piece of the judge prompts into one marker word and
box punctuation into spaces, so a judge question is ~20 tokens, not ~220 (the template carries no
information for a model trained here).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from tokenizers import normalizers

from srum_jax.rewards import texts as texts_lib
from srum_jax.tokenizer import build_word_level
from srum_jax.worlds.shapes import grammar

SCORE_TOKENS = ("-1.0", "-0.5", "0.0", "0.5", "1.0")
JUDGE_WORDS = ("Score:", "Reason:", "Region", "ID:", "Identified", "Object:", "Bounding", "Box:",
               "background")
MAX_COORD = 32  # box coordinates 0..32 (32x32 images; "official" boxes stay <= 31)
SPECIAL_NAMES = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
MARKERS = ("<judge_prompt>", "<judge_global>", "<judge_regions>", "<judge_regions_end>")
# the question of the auxiliary captioning task (never asked by the pipeline)
DESCRIBE = "<describe>"
# the question of the auxiliary grounding task: "<locate> red circle" -> its box
LOCATE = "<locate>"
THINK_GEN = "<think_gen>"  # the generation think system prompt (the own texts' `gen_think_system`)
_PLACEHOLDER = "QQPROMPTQQ"
# the shapes world's model is trained on the project's own wording
OWN_TEXTS = texts_lib.own_texts()


def template_pieces() -> Dict[str, str]:
  """The constant text of the own judge prompts (`rewards.texts.own_texts`), cut around the prompt
  and the boxes: {marker: text}. Read from their renders, so the tokenizer follows their wording."""
  pre, g_suf = texts_lib.render_global(OWN_TEXTS, _PLACEHOLDER).split(_PLACEHOLDER)
  boxes = [[1, 2, 3, 4], [5, 6, 7, 8]]
  pre_r, rest = texts_lib.render_regions(OWN_TEXTS, _PLACEHOLDER, boxes).split(_PLACEHOLDER)
  one = texts_lib.render_regions(OWN_TEXTS, _PLACEHOLDER, boxes[:1]).split(_PLACEHOLDER)[1]
  first = "Region ID: 1\nBounding Box: [1, 2, 3, 4]"
  if pre_r != pre or first not in one or "Region ID: 2\nBounding Box: [5, 6, 7, 8]" not in rest:
    raise ValueError(
        "the judge prompts changed shape; update srum_jax.pretrain.vocab.template_pieces")
  r_mid, r_suf = one.split(first)
  return dict(zip(MARKERS, (pre, g_suf, r_mid, r_suf)))


def world_words() -> List[str]:
  """Every word the world's prompts and the judge's answers use, the box numbers and the markers."""
  words = list(grammar.VOCAB) + list(JUDGE_WORDS) + list(SCORE_TOKENS)
  words += [str(n) for n in range(MAX_COORD + 1)] + list(MARKERS) + [DESCRIBE, LOCATE]
  # think mode, appended: earlier words keep their ids
  return words + [THINK_GEN, *grammar.PLAN_WORDS]


def build_tokenizer(directory, cfg):
  """The world's word-level tokenizer (saved as `directory`/tokenizer.json), with the model's
  special ids.

  Normaliser: each constant piece of the judge prompts (and the generation think system prompt)
  becomes one marker word, then "[", "]" and "," become spaces (boxes read "1 2 13 14", region ids
  and coordinates share the number words). Pre-tokenizer: whitespace. Words outside the vocabulary
  map to <unk>.
  """

  t = cfg.tokens
  special = dict(zip(SPECIAL_NAMES, (t.bos, t.eos, t.start_of_image, t.end_of_image)))
  words = world_words()
  if len(words) + 1 > min(special.values()) or max(special.values()) >= cfg.llm.vocab_size:
    raise ValueError(
        f"{len(words) + 1} words and special ids {t} do not fit the vocabulary {cfg.llm.vocab_size}"
    )
  pieces = sorted(dict(template_pieces(), **{THINK_GEN: OWN_TEXTS.gen_think_system}).items(),
                  key=lambda kv: -len(kv[1]))
  normalizer = normalizers.Sequence([normalizers.Replace(text, f" {m} ") for m, text in pieces]
                                    + [normalizers.Replace(c, " ") for c in "[],"])
  out = build_word_level(words, directory, special_ids=special, normalizer=normalizer)
  out.check(t)
  return out


def check_tokenizer(tokenizer) -> None:
  """Raise unless the own judge prompts tokenize to markers + prompt + boxes (a model directory
  built for other prompt wording would see <unk> runs instead)."""
  words = tokenizer.hf.convert_ids_to_tokens(
      tokenizer.encode(texts_lib.render_global(OWN_TEXTS, "two red circles")))
  want = ["<judge_prompt>", "two", "red", "circles", "<judge_global>"]
  words_r = tokenizer.hf.convert_ids_to_tokens(
      tokenizer.encode(texts_lib.render_regions(OWN_TEXTS, "a red circle", [[1, 2, 13, 14]])))
  want_r = [
      "<judge_prompt>", "a", "red", "circle", "<judge_regions>", "Region", "ID:", "1", "Bounding",
      "Box:", "1", "2", "13", "14", "<judge_regions_end>"
  ]
  if words != want or words_r != want_r:
    raise ValueError(f"the tokenizer does not match the judge prompts: {words} / {words_r}")


def score_text(s: float) -> str:
  return f"{float(s):.1f}"


def region_block(k: int, what: str, s: float) -> str:
  """One region's answer in the official order: id, the object named, the score."""
  return f"Region ID: {k}\nIdentified Object: {what}\nScore: {score_text(s)}"


def locate_question(color: str, shape: str) -> str:
  return f"{LOCATE} {color} {shape}"


def parse_box(text: str) -> Optional[Tuple[int, ...]]:
  """"x0 y0 x1 y1" (the locate answer) -> 4 ints, or None."""
  try:
    box = tuple(int(v) for v in text.split()[:4])
  except ValueError:
    return None
  return box if len(box) == 4 else None
