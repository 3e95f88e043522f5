"""Reading T2I-CompBench prompts: the noun phrases, nouns, relation and counts its metrics ask
about.

The benchmark's scripts read prompts with spaCy's `en_core_web_sm` (noun chunks for BLIP-VQA, NOUN
tokens for the detector's objects, ADJ tokens removed for the complex category's CLIPScore). Two
parsers give the same interface (`tokens(text)` -> [Token(text, pos)] with spaCy's universal POS
names, `noun_chunks(text)`):

* `SpacyParser`: spaCy itself (the benchmark's exact reading); needs `spacy` and `en_core_web_sm`
  installed.
* `RuleParser`: a deterministic tagger for the benchmark's prompt grammar (no model): closed word
  classes from
  lists, adjectives from a lexicon of attribute words (colours, shapes, materials, textures, sizes)
  and suffixes, -ed / -ing words are verbs after a noun and adjectives elsewhere, everything else is
  a noun. A noun chunk is a run of determiner / number / adjective / noun tokens (a determiner or
  number starts a new one), cut after its last noun. It agrees with spaCy on "a green bench and a
  red car"-style prompts and differs on free sentences (irregular verbs it does not list read as
  nouns; pronoun chunks such as "it" are dropped).

`make_parser("auto")` is spaCy when it loads, else the rules; the choice is recorded with every
score.
"""
from __future__ import annotations

import dataclasses
import re
from typing import List, Optional, Sequence, Tuple

__all__ = [
    "Token", "RuleParser", "SpacyParser", "make_parser", "relation", "vqa_questions",
    "simple_spatial_objects", "complex_spatial_objects", "without_adjectives", "numeracy_targets",
    "singular", "SPATIAL_RELATIONS"
]


@dataclasses.dataclass(frozen=True)
class Token:
  text: str
  pos: str  # spaCy's coarse tags: DET NUM ADJ NOUN VERB AUX ADP CCONJ ADV PRON PUNCT


# T2I-CompBench's relation words, searched as substrings in this order
# (UniDet_eval/2D_spatial_eval.py).
SPATIAL_RELATIONS = ("on side of", "next to", "near", "on the left of", "on the right of",
                     "on the bottom of", "on the top of", "on top of")
# The complex category's relation phrases (objects are the nouns around them).
COMPLEX_RELATIONS = ("on top of", "on bottom of", "on the left", "on the right", "next to",
                     "on side of", "near")
# Count words of the numeracy script (it stops at eight; nine and ten are read the same way here).
NUMBER_WORDS = {
    "a": 1,
    "an": 1,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10
}

_DET = {
    "a", "an", "the", "this", "that", "these", "those", "some", "each", "every", "his", "her",
    "its", "their", "my", "your", "our", "another", "no", "any", "all", "both", "several", "many"
}
_ADP = {
    "on", "in", "at", "of", "with", "by", "to", "from", "into", "onto", "near", "under", "over",
    "above", "below", "behind", "beside", "between", "against", "across", "through", "around",
    "for", "inside", "outside", "past", "beneath", "atop", "toward", "towards", "upon", "within",
    "without", "along", "among", "like", "underneath", "amid", "during", "after", "before", "about"
}
_CCONJ = {"and", "or", "but", "nor", "yet", "while", "as"}
_AUX = {
    "is", "are", "was", "were", "be", "been", "being", "am", "has", "have", "had", "does", "do",
    "did", "will", "would", "can", "could", "may", "might", "should", "must"
}
_PRON = {
    "it", "they", "them", "he", "she", "him", "we", "you", "i", "itself", "themselves", "who",
    "which", "something", "someone", "everything", "one's"
}
_ADV = {
    "together", "away", "very", "quite", "too", "also", "just", "here", "there", "now", "then",
    "still", "always", "never", "often", "not", "up", "down", "out", "off", "back", "almost", "next"
}
_LY_NOUNS = {
    "butterfly", "fly", "dragonfly", "firefly", "jelly", "belly", "family", "lily", "holly", "ally",
    "assembly", "supply", "reply", "italy", "bully", "rally", "anomaly"
}
_VERBS = {
    "drove", "sped", "shone", "shines", "shine", "told", "spun", "hold", "holds", "ate", "sat",
    "sits", "sit", "stood", "stands", "stand", "lay", "lies", "hung", "hangs", "flew", "flies",
    "ran", "runs", "grew", "grows", "swam", "swims", "rode", "rides", "took", "takes", "made",
    "makes", "gave", "gives", "saw", "sees", "built", "caught", "brought", "held", "wore", "wears",
    "threw", "fell", "falls", "rose", "broke", "rests", "floats", "plays", "reflects", "reflect",
    "looks", "sleeps", "eats", "drinks", "reads", "writes", "walks", "jumps", "embraced",
    "embraces", "adorn", "adorns", "leaps", "leapt", "dances", "sang", "sings", "glows", "glow",
    "hides", "sway", "sways", "swayed", "feel", "feels", "felt"
}
_COLORS = {
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray",
    "grey", "gold", "golden", "silver", "tan", "beige", "violet", "cyan", "magenta", "navy",
    "turquoise", "maroon", "teal", "dark", "light", "bright", "pale", "colorful", "colourful",
    "multicolored"
}
_SHAPES = {
    "round", "square", "circular", "rectangular", "triangular", "oval", "spherical", "cubic",
    "conical", "cylindrical", "oblong", "hexagonal", "pentagonal", "octagonal", "curved", "flat",
    "pointed", "teardrop", "diamond", "star", "heart"
}
_TEXTURES = {
    "wooden", "metallic", "metal", "plastic", "glass", "leather", "fabric", "fluffy", "rubber",
    "furry", "smooth", "rough", "soft", "hard", "shiny", "glossy", "matte", "translucent", "opaque",
    "transparent", "velvet", "silky", "woolen", "wool", "cotton", "ceramic", "stone", "marble",
    "paper", "wicker", "bamboo", "crystal", "porcelain", "denim", "silk", "fuzzy", "sleek", "dusty",
    "muddy", "wet", "dry"
}
_OTHER_ADJ = {
    "big", "small", "large", "tiny", "tall", "short", "long", "huge", "little", "giant", "thin",
    "thick", "wide", "narrow", "old", "new", "young", "ancient", "warm", "cold", "hot", "cozy",
    "cosy", "tired", "happy", "sad", "beautiful", "serene", "vibrant", "rich", "earthy", "fiery",
    "gentle", "quiet", "loud", "heavy", "empty", "full", "fresh", "ripe", "modern", "vintage",
    "comfortable", "elegant", "delicate", "sturdy", "fierce", "wild", "calm", "sharp", "dull",
    "clean", "dirty", "only", "intricate", "adventurous", "dizzying", "seasonal", "tranquil",
    "majestic", "lush"
}
_ADJ = _COLORS | _SHAPES | _TEXTURES | _OTHER_ADJ
_ADJ_SUFFIXES = ("-shaped", "-colored", "-coloured", "-like", "ful", "ous", "less")
_WORD = re.compile(r"[A-Za-z0-9]+(?:['\-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")


def _lexicon_tag(word: str) -> str:
  w = word.lower()
  if not w[0].isalnum():
    return "PUNCT"
  if w in _DET:
    return "DET"
  if w in NUMBER_WORDS or w.isdigit():
    return "NUM"
  for tag, words in (("ADP", _ADP), ("CCONJ", _CCONJ), ("AUX", _AUX), ("PRON", _PRON),
                     ("ADV", _ADV), ("VERB", _VERBS), ("ADJ", _ADJ)):
    if w in words:
      return tag
  if w.endswith("ly") and len(w) > 4 and w not in _LY_NOUNS:
    return "ADV"
  if w.endswith(_ADJ_SUFFIXES) and len(w) > 5:
    return "ADJ"
  if w.endswith(("ed", "ing")) and len(w) > 4:
    return "PARTICIPLE"  # resolved by its neighbour below
  if w in ("left", "right"):
    # a noun after a determiner ("on the left of"), else an adverb ("a square left of")
    return "SIDE"
  return "NOUN"


class RuleParser:
  """The deterministic stand-in for spaCy (module docstring)."""
  name = "rules"

  def tokens(self, text: str) -> List[Token]:
    words = _WORD.findall(text)
    tags = [_lexicon_tag(w) for w in words]
    for i, tag in enumerate(tags):  # -ed / -ing: a verb after a noun, auxiliary, pronoun or adverb
      if tag == "PARTICIPLE":
        tags[i] = "VERB" if i and tags[i - 1] in ("NOUN", "AUX", "PRON", "ADV", "VERB") else "ADJ"
      elif tag == "SIDE":
        tags[i] = "NOUN" if i and tags[i - 1] == "DET" else "ADV"
    # a phrase needs a head: its last adjective is the noun ("a blue square")
    for start, end in _runs(tags):
      if "NOUN" not in tags[start:end] and tags[end - 1] == "ADJ":
        tags[end - 1] = "NOUN"
    return [Token(w, t) for w, t in zip(words, tags)]

  def noun_chunks(self, text: str) -> List[str]:
    toks = self.tokens(text)
    chunks = []
    for start, end in _runs([t.pos for t in toks]):
      heads = [i for i in range(start, end) if toks[i].pos == "NOUN"]
      if heads:
        chunks.append(" ".join(t.text for t in toks[start:heads[-1] + 1]))
    return chunks


def _runs(tags: Sequence[str]) -> List[Tuple[int, int]]:
  """[start, end) spans of determiner / number / adjective / noun tokens; a determiner or number
  opens a new one."""
  spans, start = [], None
  for i, tag in enumerate(list(tags) + ["END"]):
    inside = tag in ("DET", "NUM", "ADJ", "NOUN")
    if start is not None and (not inside or tag in ("DET", "NUM")):
      spans.append((start, i))
      start = None
    if inside and start is None:
      start = i
  return spans


class SpacyParser:
  """spaCy's `en_core_web_sm`, as the benchmark's scripts call it."""
  name = "spacy"

  def __init__(self, nlp=None):
    if nlp is None:
      import spacy
      nlp = spacy.load("en_core_web_sm")
    self.nlp = nlp

  def tokens(self, text: str) -> List[Token]:
    return [Token(t.text, t.pos_) for t in self.nlp(text)]

  def noun_chunks(self, text: str) -> List[str]:
    return [c.text for c in self.nlp(text).noun_chunks]


def make_parser(name: str):
  """"spacy" | "rules" | "auto" (spaCy when `en_core_web_sm` loads, else the rules)."""
  if name == "rules":
    return RuleParser()
  if name == "spacy":
    return SpacyParser()
  if name == "auto":
    try:
      return SpacyParser()
    except (ImportError, OSError):
      return RuleParser()
  raise ValueError(f"unknown text parser {name!r}; choose auto, spacy or rules")


# ----------------------------------------------------------------------------------------------
# What each metric reads from a prompt (the official scripts' rules on a parser's output)


def relation(prompt: str) -> Optional[str]:
  """The first of SPATIAL_RELATIONS found in the prompt (substring search, as the official
  script)."""
  return next((r for r in SPATIAL_RELATIONS if r in prompt), None)


def vqa_questions(parser, prompt: str, np_num: int) -> List[str]:
  """BLIP-VQA's questions: "<noun chunk>?" for the first `np_num` noun chunks."""
  return [f"{c}?" for c in parser.noun_chunks(prompt)[:np_num]]


def simple_spatial_objects(parser, prompt: str) -> Tuple[Optional[str], Optional[str]]:
  """The first and the last NOUN token (the spatial category's two objects)."""
  nouns = [t.text for t in parser.tokens(prompt) if t.pos == "NOUN"]
  return (nouns[0], nouns[-1]) if nouns else (None, None)


def complex_spatial_objects(parser, prompt: str) -> Tuple[Optional[str], Optional[str]]:
  """The complex category's objects: the nearest NOUN (or PROPN) before a relation phrase and the
  first NOUN after it (a PROPN followed by a non-PROPN when no NOUN follows); (None, None) unless
  exactly two are found."""
  toks = parser.tokens(prompt)
  objects = []
  for i in range(len(toks)):
    k = next((n for n in (3, 2, 1) if " ".join(t.text for t in toks[i:i + n]) in COMPLEX_RELATIONS),
             0)
    if not k:
      continue
    before = next((toks[j].text for j in range(i - 1, -1, -1) if toks[j].pos in ("NOUN", "PROPN")),
                  None)
    if before is not None:
      objects.append(before)
    after = next((toks[j].text for j in range(i + k, len(toks)) if toks[j].pos == "NOUN"), None)
    if after is None:
      after = next((toks[j].text for j in range(i + k, len(toks) - 1)
                    if toks[j].pos == "PROPN" and toks[j + 1].pos != "PROPN"), None)
    if after is not None:
      objects.append(after)
  return (objects[0], objects[1]) if len(objects) == 2 else (None, None)


def without_adjectives(parser, prompt: str) -> str:
  """The prompt's tokens joined by spaces, adjectives removed (the complex category's CLIPScore
  text)."""
  return " ".join(t.text for t in parser.tokens(prompt) if t.pos != "ADJ")


_IRREGULAR = {
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "people": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "knives": "knife",
    "wives": "wife",
    "leaves": "leaf",
    "shelves": "shelf",
    "wolves": "wolf",
    "loaves": "loaf",
    "halves": "half",
    "calves": "calf",
    "oxen": "ox",
    "dice": "die",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
    "goldfish": "goldfish",
    "glasses": "glasses",
    "scissors": "scissors",
    "pants": "pants"
}


def singular(word: str) -> str:
  """English singular of a (lowercase) noun: irregular table, then -ies,
  -ches/-shes/-xes/-sses/-zes, -oes, -s."""
  w = word.lower()
  if w in _IRREGULAR:
    return _IRREGULAR[w]
  if w.endswith("ies") and len(w) > 4:
    return w[:-3] + "y"
  if w.endswith(("ches", "shes", "xes", "sses", "zes", "oes")):
    return w[:-2]
  if w.endswith("s") and not w.endswith(("ss", "us", "is")) and len(w) > 3:
    return w[:-1]
  return w


def numeracy_targets(parser, prompt: str) -> List[Tuple[str, int]]:
  """(object, count) pairs: a count word followed by one or two NOUN tokens (the object, singular);
  "a", "an" and "one" count 1. Adjectives between the count and the object are passed over ("two red
  apples": the benchmark's own prompts have none; its script would find no object there). Repeated
  objects keep their first count (the numeracy script's lists)."""
  toks = parser.tokens(prompt)
  out: List[Tuple[str, int]] = []
  for i, tok in enumerate(toks):
    word = tok.text.lower()
    count = NUMBER_WORDS.get(word, int(word) if word.isdigit() else None)
    j = i + 1
    while j < len(toks) and toks[j].pos == "ADJ":
      j += 1
    if count is None or j >= len(toks) or toks[j].pos != "NOUN":
      continue
    nouns = [toks[j].text.lower()]
    if j + 1 < len(toks) and toks[j + 1].pos == "NOUN":
      nouns.append(toks[j + 1].text.lower())
    name = " ".join(nouns[:-1] + [singular(nouns[-1])])
    if name not in [n for n, _ in out]:
      out.append((name, count))
  return out
