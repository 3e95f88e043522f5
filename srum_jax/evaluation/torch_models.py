"""The PyTorch metric models (transformers) behind the evaluation: device and dtype, loading from a
local directory with a clear error, CLIP features, BLIP-VQA's yes-probability. Evaluation only: the
training path never imports torch.

Models are read with their tokenizer and image processor loaded separately (`AutoTokenizer`,
`AutoImageProcessor`), so a folder written by `save_pretrained` of the model, tokenizer and image
processor is enough (no torchvision-backed processor class is needed).
"""
from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "resolve_device", "resolve_dtype", "require_dir", "pil_images", "Clip", "BlipVqa",
    "yes_no_ratio"
]


def resolve_device(name: str) -> str:
  """"auto" -> "cuda" when a CUDA device is visible, else "cpu"; anything else as given ("cpu",
  "cuda:1")."""
  import torch
  if name == "auto":
    return "cuda" if torch.cuda.is_available() else "cpu"
  return name


def resolve_dtype(name: str):
  import torch
  dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
  if name not in dtypes:
    raise ValueError(f"unknown torch dtype {name!r}; choose one of {sorted(dtypes)}")
  return dtypes[name]


def require_dir(path: str, key: str, what: str) -> str:
  """`path` when it is a directory, else a FileNotFoundError naming the config key to set."""
  if not path or not pathlib.Path(path).is_dir():
    raise FileNotFoundError(
        f"{key} {path!r} is not a directory with {what} (a transformers save_pretrained "
        f"folder; no weights are downloaded)")
  return path


def pil_images(images) -> list:
  """uint8 HWC arrays (or PIL images) -> RGB PIL images."""
  return [
      im
      if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8)).convert("RGB")
      for im in images
  ]


def yes_no_ratio(logit_yes, logit_no):
  """P(yes) / (P(yes) + P(no)) of one softmax over the vocabulary: sigmoid(logit_yes - logit_no)."""
  return 1.0 / (1.0 + np.exp(np.asarray(logit_no, np.float64) - np.asarray(logit_yes, np.float64)))


class Clip:
  """A CLIP model (CLIPScore, GenEval's colour classifier): L2-normalised image and text
  features."""

  def __init__(self, path: str, device: str, dtype, key: str):
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
    require_dir(path, key, "a CLIP model")
    self.torch, self.device, self.dtype = torch, device, dtype
    self.model = CLIPModel.from_pretrained(path, dtype=dtype).to(device).eval()
    self.image_processor = AutoImageProcessor.from_pretrained(path)
    self.tokenizer = AutoTokenizer.from_pretrained(path)
    self.max_length = int(self.model.config.text_config.max_position_embeddings)

  def image_features(self, images) -> np.ndarray:
    pix = self.image_processor(images=pil_images(images), return_tensors="pt")["pixel_values"]
    with self.torch.no_grad():
      f = self.model.get_image_features(pixel_values=pix.to(self.device, self.dtype))
    f = getattr(f, "pooler_output", f).float()
    return (f / f.norm(dim=-1, keepdim=True)).cpu().numpy()

  def text_features(self, texts: Sequence[str]) -> np.ndarray:
    enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                         return_tensors="pt")
    with self.torch.no_grad():
      f = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                       attention_mask=enc["attention_mask"].to(self.device))
    f = getattr(f, "pooler_output", f).float()
    return (f / f.norm(dim=-1, keepdim=True)).cpu().numpy()

  def cosine(self, images, texts: Sequence[str]) -> np.ndarray:
    """Cosine similarity of image i and text i (T2I-CompBench's CLIPScore, not scaled)."""
    return np.sum(self.image_features(images) * self.text_features(texts), axis=-1)


class BlipVqa:
  """BLIP VQA answering "yes" vs "no" at the answer decoder's first step (T2I-CompBench's
  `vqa_prob`)."""

  def __init__(self, path: str, device: str, dtype, key: str):
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, BlipForQuestionAnswering
    require_dir(path, key, "a BLIP VQA model")
    self.torch, self.device, self.dtype = torch, device, dtype
    self.model = BlipForQuestionAnswering.from_pretrained(path, dtype=dtype).to(device).eval()
    self.image_processor = AutoImageProcessor.from_pretrained(path)
    self.tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = self.tokenizer.get_vocab()
    missing = [w for w in ("yes", "no") if w not in vocab]
    if missing:
      raise ValueError(f"{key}: the tokenizer has no token for {missing}")
    self.yes, self.no = vocab["yes"], vocab["no"]
    # BLIP's question encoder starts with [ENC] where the tokenizer has it
    self.enc = vocab.get("[ENC]")

  def yes_probability(self, images, questions: Sequence[str]) -> np.ndarray:
    torch = self.torch
    pix = self.image_processor(images=pil_images(images), return_tensors="pt")["pixel_values"]
    q = self.tokenizer(
        list(questions), padding="longest", truncation=True, max_length=35, return_tensors="pt")
    ids, mask = q["input_ids"].clone(), q["attention_mask"]
    if self.enc is not None:
      ids[:, 0] = self.enc
    m = self.model
    with torch.no_grad():
      image_states = m.vision_model(pixel_values=pix.to(self.device, self.dtype))[0]
      image_mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=self.device)
      q_states = m.text_encoder(
          input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
          encoder_hidden_states=image_states, encoder_attention_mask=image_mask)[0]
      # the answer decoder attends to every question position it is given (transformers' BLIP text
      # decoder
      # does not apply `encoder_attention_mask`): decode each question length without its padding
      lengths = mask.sum(-1).tolist()
      logits = np.zeros((len(ids), m.config.text_config.vocab_size), np.float32)
      for n in sorted(set(lengths)):
        rows = [i for i, k in enumerate(lengths) if k == n]
        start = torch.full((len(rows), 1), m.decoder_start_token_id, dtype=torch.long,
                           device=self.device)
        logits[rows] = m.text_decoder(
            input_ids=start,
            encoder_hidden_states=q_states[rows, :n]).logits[:, 0, :].float().cpu().numpy()
    return yes_no_ratio(logits[:, self.yes], logits[:, self.no])
