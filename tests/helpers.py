"""Small helpers shared by test files (imported as `helpers`; tests/ is on sys.path under pytest)."""
import importlib.util
import pathlib

import numpy as np

from srum_jax.training.preemption import PreemptionFlag

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


def hf_sam_config(cfg):
  """transformers' SamConfig for a `srum_jax.models.sam_config.SamConfig`."""
  from transformers import SamConfig

  from srum_jax.convert import sam_to_flax
  return SamConfig(**sam_to_flax.transformers_config(cfg))


def random_sam(cfg, seed: int = 0, positions: bool = True, mask_scale: float = 1.0):
  """A transformers SamModel of `cfg` with O(1) random weights (transformers' own init makes the
  image encoder ~1e-10): weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1), norm scales ~ 1 + N(0, 0.1),
  the Fourier matrix ~ N(0, 1); position tables ~ N(0, 0.5) with `positions`, else 0.

  `positions=False` plus a `mask_scale` > 1 gives an image model whose masks follow the image
  content (a translation-equivariant encoder, upscaling kernels equal over their 2x2 taps, mask
  logits scaled): on shapes-world scenes its masks are object / background blobs with varied
  boxes."""
  import torch
  from transformers import SamModel
  torch.manual_seed(seed)
  model = SamModel(hf_sam_config(cfg)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "rel_pos" in name or "pos_embed" in name:
        p.normal_(0, 0.5) if positions else p.zero_()
      elif "positional_embedding" in name:
        p.normal_(0, 1.0)
      elif p.ndim >= 2:
        p.normal_(0, 1 / np.sqrt(int(np.prod(p.shape[1:]))))
      elif name.endswith("bias"):
        p.normal_(0, 0.1)
      else:
        p.copy_(1 + 0.1 * torch.randn_like(p))
    if not positions:
      for name, p in model.named_parameters():
        if "upscale_conv" in name and name.endswith("weight"):
          p.copy_(p[:, :, :1, :1].expand_as(p))
        if "hypernetworks" in name and "proj_out" in name:
          p.mul_(mask_scale)
  return model


def save_sam_dir(model, path, image_size: int) -> str:
  """`save_pretrained` of the model and its image processor (longest side `image_size`)."""
  from transformers import SamImageProcessorPil, SamProcessor
  model.save_pretrained(path)
  processor = SamImageProcessorPil(size={"longest_edge": image_size},
                                   pad_size={"height": image_size, "width": image_size})
  SamProcessor(image_processor=processor).save_pretrained(path)
  return str(path)


class StopAfter(PreemptionFlag):
  """A preemption flag that reads as raised from its (k+1)-th check on (the training loop checks it
  before each step and once after)."""

  def __init__(self, k):
    super().__init__(signals=())
    self.k, self.checks = k, 0

  def is_set(self):
    self.checks += 1
    return self.checks > self.k
