"""Small helpers shared by test files (imported as `helpers`; tests/ is on sys.path under pytest)."""
import importlib.util
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(relpath: str):
  """A repo file that is not in a package (an experiment config, a benchmark script) as a fresh module."""
  path = ROOT / relpath
  spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class CharTokenizer:
  """Test stand-in for `srum_jax.tokenizer.Tokenizer` on the tiny 128-id vocabulary: one char per id."""
  bos, eos, start_of_image, end_of_image = 120, 121, 122, 123

  def encode(self, text):
    return [ord(c) - 0x100 if 0x100 <= ord(c) < 0x180 else ord(c) % 120 for c in text]

  def decode(self, ids):
    return "".join(chr(0x100 + int(i)) for i in ids)


def max_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
