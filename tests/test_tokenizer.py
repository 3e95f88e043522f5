"""Tokenizer loading and BAGEL's special tokens on a tiny Qwen2-style byte-level BPE built here."""
import json

import pytest
from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers

from srum_jax import tokenizer
from srum_jax.models import config

CORPUS = ["a red cube on top of a blue sphere", "two cats and three dogs in a garden",
          "Score: 0.8\nReason: the layout matches", "<think>plan the picture</think> then answer"] * 20
TEXT = "A red cube, two cats — naïve 😀 layout!\nScore: -0.5"


def _write(tmp_path, specials):
  raw = RawTokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", *specials],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  raw.train_from_iterator(CORPUS, trainer)
  raw.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
  return raw


def test_existing_special_tokens_keep_their_ids(tmp_path):
  raw = _write(tmp_path, tokenizer.SPECIAL_TOKENS)
  tok = tokenizer.load_tokenizer(tmp_path)
  assert len(tok) == raw.get_vocab_size()  # nothing added
  assert (tok.bos, tok.eos, tok.start_of_image, tok.end_of_image) == tuple(
      raw.token_to_id(t) for t in tokenizer.SPECIAL_TOKENS) == (1, 2, 3, 4)
  tok.check(config.SpecialTokens(bos=1, eos=2, start_of_image=3, end_of_image=4))
  with pytest.raises(ValueError):
    tok.check(config.SpecialTokens())  # the 7B ids differ from this tiny vocabulary


def test_missing_special_tokens_are_added(tmp_path):
  raw = _write(tmp_path, [])
  n = raw.get_vocab_size()
  tok = tokenizer.load_tokenizer(tmp_path)
  assert len(tok) == n + 4
  assert sorted([tok.bos, tok.eos, tok.start_of_image, tok.end_of_image]) == list(range(n, n + 4))
  ids = tok.encode("<|im_start|>hi<|vision_end|>")  # special tokens are matched whole
  assert ids[0] == tok.bos and ids[-1] == tok.end_of_image and len(ids) >= 3


def test_round_trip_without_implicit_special_tokens(tmp_path):
  _write(tmp_path, tokenizer.SPECIAL_TOKENS)
  tok = tokenizer.load_tokenizer(tmp_path)
  ids = tok.encode(TEXT)
  assert ids and all(isinstance(i, int) for i in ids)
  assert not set(ids) & {tok.bos, tok.eos, tok.start_of_image, tok.end_of_image}
  assert tok.decode(ids) == TEXT
  assert tok.encode("") == []
  assert len(tok.encode("a red cube")) < len("a red cube")  # merges learnt from the corpus are used
  wrapped = [tok.bos, *ids, tok.eos]
  assert tok.decode(wrapped) == "<|im_start|>" + TEXT + "<|im_end|>"
  assert tok.decode(wrapped, skip_special_tokens=True) == TEXT


def test_missing_tokenizer_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    tokenizer.load_tokenizer(tmp_path)
