"""The Qwen2 tokenizer with BAGEL's special tokens (docs/bagel.md, "Special tokens"), through `transformers`.

`load_tokenizer(model_dir)` reads `tokenizer.json` (a `tokenizers` byte-level BPE file, as shipped with
Qwen2.5 / BAGEL) into a `PreTrainedTokenizerFast`, adds `<|im_start|>`, `<|im_end|>`, `<|vision_start|>`,
`<|vision_end|>` as special tokens when absent (with the Qwen2.5 vocabulary they already exist, so the ids
do not change), and wraps it so that `encode` never inserts special tokens by itself: the context builders
add `<|im_start|>` / `<|im_end|>` around each text split explicitly.

(With transformers 5 the tokenizer must come from `tokenizer_file=`; building from `vocab_file=` /
`merges_file=` silently gives a tokenizer that encodes everything to no ids.)
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional, Sequence

from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from srum_jax import paths
from srum_jax.errors import UserFileNotFoundError, UserValueError

BOS, EOS, START_OF_IMAGE, END_OF_IMAGE = "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"
SPECIAL_TOKENS = (BOS, EOS, START_OF_IMAGE, END_OF_IMAGE)


@dataclasses.dataclass
class Tokenizer:
  """Thin wrapper: plain-text `encode` / `decode` and the four special ids."""
  hf: object  # transformers.PreTrainedTokenizerFast
  bos: int
  eos: int
  start_of_image: int
  end_of_image: int

  def encode(self, text: str) -> list:
    """Token ids of `text` (no special tokens added)."""
    return list(self.hf.encode(text, add_special_tokens=False))

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def __len__(self) -> int:
    return len(self.hf)

  def check(self, tokens) -> None:
    """Raise if the ids differ from a model config's `SpecialTokens`."""
    want = dict(bos=tokens.bos, eos=tokens.eos, start_of_image=tokens.start_of_image,
                end_of_image=tokens.end_of_image)
    got = {k: getattr(self, k) for k in want}
    if got != want:
      raise UserValueError(f"tokenizer special ids {got} differ from the model's {want}")


def _token_id(hf, token: str) -> Optional[int]:
  """Id of an exact vocabulary / added token, None if absent (never the unknown token's id)."""
  tid = hf.get_vocab().get(token)
  return None if tid is None else int(tid)


def from_hf(hf) -> Tokenizer:
  """Wrap a transformers tokenizer, adding BAGEL's special tokens that it lacks."""
  missing = [t for t in SPECIAL_TOKENS if _token_id(hf, t) is None]
  if missing:
    hf.add_special_tokens({"additional_special_tokens": missing})
  ids = {t: _token_id(hf, t) for t in SPECIAL_TOKENS}
  if any(v is None for v in ids.values()):
    raise ValueError(f"could not add special tokens: {ids}")
  return Tokenizer(hf=hf, bos=ids[BOS], eos=ids[EOS], start_of_image=ids[START_OF_IMAGE],
                   end_of_image=ids[END_OF_IMAGE])


def load_tokenizer(model_dir) -> Tokenizer:
  """Tokenizer of a model directory holding `tokenizer.json` (+ optional `tokenizer_config.json`). A remote
  model dir (gs://) has its tokenizer.json copied to the local cache first (`tokenizer_file=` takes a file name)."""
  from transformers import PreTrainedTokenizerFast

  path = paths.path(paths.join(model_dir, "tokenizer.json"))
  if not path.is_file():
    raise UserFileNotFoundError(f"{path} not found (a Qwen2-style tokenizer.json is required)")
  try:
    hf = PreTrainedTokenizerFast(tokenizer_file=paths.local_copy(str(path)))
  except Exception as e:  # the tokenizers library's own errors: a JSON file that is not a tokenizer
    text = " ".join(str(e).split())
    raise UserValueError(f"tokenizer file {path} is not a tokenizer this code reads "
                         f"({type(e).__name__}: {text})") from None
  return from_hf(hf)


def build_word_level(words: Sequence[str], directory, *, special_ids: dict, unk: str = "<unk>",
                     normalizer=None) -> Tokenizer:
  """A whitespace word-level tokenizer (for small synthetic worlds), saved as `tokenizer.json` in `directory`.

  `words` get ids 0.. in order, then `<unk>`; `special_ids` maps BAGEL's special tokens to fixed ids (e.g.
  the tiny model's 120..123). Splitting is on whitespace only, so "Score:" and "-0.5" stay single tokens.
  `normalizer`: an optional `tokenizers.normalizers` object applied before splitting.
  """
  from transformers import PreTrainedTokenizerFast

  vocab = {}
  for w in list(words) + [unk]:
    if w not in vocab:
      vocab[w] = len(vocab)
  taken = set(special_ids.values())
  if taken & set(vocab.values()):
    raise ValueError(f"{len(vocab)} words collide with the special ids {sorted(taken)}")
  for name, tid in special_ids.items():
    vocab[name] = int(tid)
  tok = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
  if normalizer is not None:
    tok.normalizer = normalizer
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
  tok.add_special_tokens(list(special_ids))
  path = pathlib.Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  return from_hf(PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json")))
