"""Tiny randomly initialised models of every transformers class the evaluation loads, written as the
folders its scorers read (model + tokenizer + image processor, `save_pretrained` layout). They check
the plumbing (loading, batching, parsing, tables) on a CPU without any weights; their scores mean
nothing.

    python -m srum_jax.evaluation.random_models outputs/random_metric_models
    # -> blip/ clip/ owlv2/ owlvit/ mask2former/ qwen2_5_vl/  (a few MB, seconds)
"""
from __future__ import annotations

import argparse
import pathlib
import string
from typing import Dict, Sequence

import tokenizers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

__all__ = [
    "write_blip", "write_clip", "write_owl", "write_mask2former", "write_qwen2_5_vl", "write_all"
]

DEFAULT_CLASSES = ("person", "bench", "cat", "dog", "car", "circle", "square", "triangle")
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               image_size=32, patch_size=8)


def _text(vocab_size: int, **extra) -> dict:
  return {**dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, max_position_embeddings=64), **extra}


def write_blip(dst: str, seed: int = 0) -> str:
  """BlipForQuestionAnswering with a WordPiece tokenizer that spells any lowercase word."""
  import torch
  from transformers import (BertTokenizerFast, BlipConfig, BlipForQuestionAnswering,
                            BlipImageProcessor)
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes", "no", "[DEC]", "[ENC]"]
  words += list(string.ascii_lowercase + string.digits +
                "?.,'-") + [f"##{c}" for c in string.ascii_lowercase]
  vocab = {w: i for i, w in enumerate(words)}
  tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2),
                                                                               ("[SEP]", 3)])
  tok.decoder = decoders.WordPiece()
  out = pathlib.Path(dst)
  out.mkdir(parents=True, exist_ok=True)
  tok.save(str(out / "tokenizer.json"))
  bert = BertTokenizerFast(
      tokenizer_file=str(out / "tokenizer.json"), unk_token="[UNK]", pad_token="[PAD]",
      cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
  torch.manual_seed(seed)
  cfg = BlipConfig(
      text_config=_text(len(words), bos_token_id=vocab["[DEC]"], pad_token_id=0, sep_token_id=3),
      vision_config=_VISION, projection_dim=16)
  BlipForQuestionAnswering(cfg).eval().save_pretrained(out)
  bert.save_pretrained(out)
  BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
  return str(out)


def _clip_tokenizer():
  from transformers import CLIPTokenizer
  alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
  # OWL reads a query whose first id is 0 as padding: the special tokens come last, as in CLIP's
  # vocabulary
  words = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
  return CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=[]), len(words)


def write_clip(dst: str, seed: int = 0) -> str:
  import torch
  from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
  tok, n = _clip_tokenizer()
  torch.manual_seed(seed)
  cfg = CLIPConfig(text_config=_text(n, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1),
                   vision_config=_VISION,
                   projection_dim=16)
  out = pathlib.Path(dst)
  CLIPModel(cfg).eval().save_pretrained(out)
  tok.save_pretrained(out)
  CLIPImageProcessor(size={
      "shortest_edge": 32
  }, crop_size={
      "height": 32,
      "width": 32
  }).save_pretrained(out)
  return str(out)


def write_owl(dst: str, kind: str = "owlv2", seed: int = 0) -> str:
  """Owlv2ForObjectDetection (kind "owlv2") or OwlViTForObjectDetection ("owlvit")."""
  import torch
  from transformers import (Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, OwlViTConfig,
                            OwlViTForObjectDetection, OwlViTImageProcessor)
  tok, n = _clip_tokenizer()
  text = _text(n, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)
  torch.manual_seed(seed)
  out = pathlib.Path(dst)
  if kind == "owlv2":
    Owlv2ForObjectDetection(
        Owlv2Config(text_config=text, vision_config=_VISION,
                    projection_dim=32)).eval().save_pretrained(out)
    Owlv2ImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
  else:
    OwlViTForObjectDetection(
        OwlViTConfig(text_config=text, vision_config=_VISION,
                     projection_dim=32)).eval().save_pretrained(out)
    OwlViTImageProcessor(size={
        "height": 32,
        "width": 32
    }, crop_size={
        "height": 32,
        "width": 32
    }).save_pretrained(out)
  tok.save_pretrained(out)
  return str(out)


def write_mask2former(dst: str, classes: Sequence[str] = DEFAULT_CLASSES, seed: int = 0) -> str:
  """Mask2FormerForUniversalSegmentation on a 2-stage-wide Swin with `classes` as its label set."""
  import torch
  from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                            Mask2FormerImageProcessor, SwinConfig)
  backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                        num_heads=[1, 1, 2, 2], window_size=2,
                        out_features=["stage1", "stage2", "stage3", "stage4"])
  torch.manual_seed(seed)
  cfg = Mask2FormerConfig(backbone_config=backbone, num_queries=10, hidden_dim=32,
                          mask_feature_size=32, feature_size=32, encoder_layers=1, decoder_layers=2,
                          num_attention_heads=2, dim_feedforward=64, encoder_feedforward_dim=64,
                          common_stride=4, num_labels=len(classes), id2label=dict(
                              enumerate(classes)), label2id={
                                  c: i for i, c in enumerate(classes)
                              })
  out = pathlib.Path(dst)
  Mask2FormerForUniversalSegmentation(cfg).eval().save_pretrained(out)
  Mask2FormerImageProcessor(size={
      "shortest_edge": 64,
      "longest_edge": 64
  }, size_divisor=32).save_pretrained(out)
  return str(out)


CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                 "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
                 "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
                 "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_qwen2_5_vl(dst: str, seed: int = 0) -> str:
  """Qwen2_5_VLForConditionalGeneration with a byte-level tokenizer, a Qwen-style chat template and
  images resized to 56 x 56 (4 image tokens)."""
  import torch
  from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer,
                            Qwen2VLImageProcessor)
  vocab = {c: i for i, c in enumerate(sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()))}
  special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
             "<|video_pad|>"]
  tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                       pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
  tok.add_special_tokens({"additional_special_tokens": special[1:]})
  ids = dict(zip(special, tok.convert_tokens_to_ids(special)))
  text = _text(len(tok), num_key_value_heads=1, max_position_embeddings=512, eos_token_id=ids["<|im_end|>"],
               pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|im_start|>"],
               rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
  vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                fullatt_block_indexes=[0])
  torch.manual_seed(seed)
  cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"])
  out = pathlib.Path(dst)
  Qwen2_5_VLForConditionalGeneration(cfg).eval().save_pretrained(out)
  tok.save_pretrained(out)
  Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2,
                        temporal_patch_size=2).save_pretrained(out)
  return str(out)


def write_all(dst: str, classes: Sequence[str] = DEFAULT_CLASSES) -> Dict[str, str]:
  """Every model under `dst`: {name: folder}."""
  root = pathlib.Path(dst)
  return {
      "blip": write_blip(str(root / "blip")),
      "clip": write_clip(str(root / "clip")),
      "owlv2": write_owl(str(root / "owlv2"), "owlv2"),
      "owlvit": write_owl(str(root / "owlvit"), "owlvit"),
      "mask2former": write_mask2former(str(root / "mask2former"), classes),
      "qwen2_5_vl": write_qwen2_5_vl(str(root / "qwen2_5_vl"))
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dst")
  parser.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                      help="Mask2Former's label set")
  args = parser.parse_args(argv)
  for name, path in write_all(args.dst, [c for c in args.classes.split(",") if c]).items():
    print(f"{name}: {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
