"""Segment Anything (SAM) configuration: frozen dataclasses, the ViT-B / L / H presets, test sizes.

Values follow the released SAM models (segment_anything's `build_sam`): a 1024-pixel ViT image
encoder with 16-pixel patches, 14x14 windowed attention except in four global blocks, a 256-channel
neck; a 256-wide prompt encoder and a two-layer two-way-transformer mask decoder with three
multimask outputs. The global blocks must be periodic (the last block of every group of
`group_size`: true for B, L and H), so the encoder's blocks stack as [groups, group_size - 1]
windowed blocks plus [groups] global ones.

Two layer-norm epsilons differ between the two weight sources and are fields: the official mask
decoder's blocks use PyTorch's default 1e-5; transformers' `SamModel` uses its config's 1e-6 for the
four block norms (`block_norm_eps`) and 1e-5 for the final one.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Tuple

# ImageNet statistics on [0, 1] pixels (the released models' 123.675 / 58.395 ... on [0, 255]).
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class SamEncoderConfig:
  """ViT image encoder with windowed / global attention and decomposed relative positions."""
  hidden_size: int = 1280
  num_layers: int = 32
  num_heads: int = 16
  mlp_dim: int = 5120
  global_attn_indexes: Tuple[int, ...] = (7, 15, 23, 31)
  window_size: int = 14
  image_size: int = 1024
  patch_size: int = 16
  out_channels: int = 256
  layer_norm_eps: float = 1e-6

  def __post_init__(self):
    object.__setattr__(self, "global_attn_indexes", tuple(int(i) for i in self.global_attn_indexes))
    g = self.group_size
    if self.global_attn_indexes != tuple(range(g - 1, self.num_layers, g)):
      raise ValueError(f"global_attn_indexes {self.global_attn_indexes} are not the last of every "
                       f"{g} of {self.num_layers} blocks; only periodic layouts are supported")
    if self.hidden_size % self.num_heads or self.image_size % self.patch_size:
      raise ValueError("hidden_size must divide by num_heads and image_size by patch_size")

  @property
  def group_size(self) -> int:
    """Blocks per group: group_size - 1 windowed blocks, then one global block."""
    if not self.global_attn_indexes or self.num_layers % len(self.global_attn_indexes):
      raise ValueError(f"{len(self.global_attn_indexes)} global blocks do not split "
                       f"{self.num_layers} blocks into equal groups")
    return self.num_layers // len(self.global_attn_indexes)

  @property
  def num_groups(self) -> int:
    return len(self.global_attn_indexes)

  @property
  def grid(self) -> int:
    """Patches per side of the (padded, square) model input: the image embedding's side."""
    return self.image_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class SamDecoderConfig:
  """Prompt encoder + mask decoder (two-way transformer, hypernetwork MLPs, IoU head)."""
  hidden_size: int = 256  # prompt embedding width == the encoder's out_channels
  num_layers: int = 2
  num_heads: int = 8
  mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  mask_in_chans: int = 16  # mask-prompt embedding channels
  block_norm_eps: float = 1e-5
  final_norm_eps: float = 1e-5

  @property
  def num_mask_tokens(self) -> int:
    return self.num_multimask_outputs + 1


@dataclasses.dataclass(frozen=True)
class SamConfig:
  encoder: SamEncoderConfig = SamEncoderConfig()
  decoder: SamDecoderConfig = SamDecoderConfig()
  pixel_mean: Tuple[float, float, float] = PIXEL_MEAN
  pixel_std: Tuple[float, float, float] = PIXEL_STD

  def __post_init__(self):
    if self.encoder.out_channels != self.decoder.hidden_size:
      raise ValueError(f"encoder.out_channels {self.encoder.out_channels} != decoder.hidden_size "
                       f"{self.decoder.hidden_size}")
    object.__setattr__(self, "pixel_mean", tuple(float(v) for v in self.pixel_mean))
    object.__setattr__(self, "pixel_std", tuple(float(v) for v in self.pixel_std))

  @property
  def image_size(self) -> int:
    return self.encoder.image_size


def _official(hidden: int, layers: int, heads: int, global_idx: Tuple[int, ...]) -> SamConfig:
  return SamConfig(encoder=SamEncoderConfig(hidden_size=hidden, num_layers=layers, num_heads=heads,
                                            mlp_dim=4 * hidden, global_attn_indexes=global_idx))


def vit_h() -> SamConfig:
  """SAM ViT-H (`sam_vit_h_4b8939.pth`, SRUM's proposer): 32 blocks of width 1280, 16 heads."""
  return _official(1280, 32, 16, (7, 15, 23, 31))


def vit_l() -> SamConfig:
  """SAM ViT-L (`sam_vit_l_0b3195.pth`): 24 blocks of width 1024, 16 heads."""
  return _official(1024, 24, 16, (5, 11, 17, 23))


def vit_b() -> SamConfig:
  """SAM ViT-B (`sam_vit_b_01ec64.pth`): 12 blocks of width 768, 12 heads."""
  return _official(768, 12, 12, (2, 5, 8, 11))


def tiny() -> SamConfig:
  """A 64-pixel test model (8 x 8 image embedding padded to 3 x 3 windows, two blocks)."""
  return SamConfig(
      encoder=SamEncoderConfig(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
                               global_attn_indexes=(1,), window_size=3, image_size=64, patch_size=8,
                               out_channels=16),
      decoder=SamDecoderConfig(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
                               iou_head_hidden_dim=8, mask_in_chans=4))


def small() -> SamConfig:
  """A 256-pixel model with the released decoder (16 x 16 embedding, six blocks of width 192): the
  CPU benchmark's size."""
  return SamConfig(encoder=SamEncoderConfig(hidden_size=192, num_layers=6, num_heads=3, mlp_dim=768,
                                            global_attn_indexes=(2, 5), window_size=7,
                                            image_size=256))


PRESETS = {"vit_h": vit_h, "vit_l": vit_l, "vit_b": vit_b, "small": small, "tiny": tiny}


def get_preset(name: str) -> SamConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown SAM preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]()


def config_to_dict(cfg: SamConfig) -> Dict[str, Any]:
  """JSON-ready dict of a SamConfig (tuples become lists)."""
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(d: Dict[str, Any]) -> SamConfig:
  """Inverse of `config_to_dict`; missing fields take the defaults, unknown ones are errors."""
  def build(cls, values):
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    return cls(**values)
  d = dict(d)
  if "encoder" in d:
    d["encoder"] = build(SamEncoderConfig, d["encoder"])
  if "decoder" in d:
    d["decoder"] = build(SamDecoderConfig, d["decoder"])
  return build(SamConfig, d)
