"""BAGEL model configuration: frozen dataclasses and the size presets.

Values follow BAGEL-7B-MoT (docs/bagel.md, "Configuration"). `tiny` rebuilds the golden test model,
`bagel_7b_mot` is the paper's model, `mid` is a ~2.0B-parameter MoT model (Qwen2.5-1.5B widths, 16 layers) that trains on one 80 GB GPU.
`LoraConfig` adds low-rank adapters to the MoT experts' projections (`with_lora`); none by default.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

DTYPES = ("float32", "bfloat16")  # parameter and compute dtypes a model runs in


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_EXPERTS = ("gen", "und")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters (LoRA, as PEFT implements it) on projections of the MoT experts.

  A targeted projection y = x W + b becomes y = x W + b + (dropout(x) A) B * alpha / rank, with A [in, rank]
  and B [rank, out] trainable and W, b frozen. `targets`: projection names (attention q/k/v/o, MLP
  gate/up/down); `experts`: which experts carry them (the generation expert by default; add "und" for the
  understanding expert). `dropout` acts on the adapters' input in training only.
  """
  rank: int = 16
  alpha: float = 16.0
  dropout: float = 0.0
  targets: Tuple[str, ...] = LORA_TARGETS
  experts: Tuple[str, ...] = ("gen",)

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoRA rank must be an integer >= 1, not {self.rank!r}")
    if not float(self.alpha) > 0:
      raise ValueError(f"LoRA alpha must be > 0, not {self.alpha!r}")
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), not {self.dropout!r}")
    for name, value, known in (("targets", self.targets, LORA_TARGETS), ("experts", self.experts, LORA_EXPERTS)):
      if not isinstance(value, tuple) or not value or set(value) - set(known) or len(set(value)) != len(value):
        raise ValueError(f"LoRA {name} must be a non-empty tuple of distinct names from {known}, not {value!r}")

  @property
  def scale(self) -> float:
    """The factor on the low-rank update: alpha / rank."""
    return float(self.alpha) / self.rank


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """Qwen2 decoder with Mixture-of-Transformers layers."""
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 32768
  qk_norm: bool = True
  lora: Optional[LoraConfig] = None  # adapters on the experts' projections (None: none)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """SigLIP NaViT encoder. `num_hidden_layers` is the count actually used (json - 1)."""
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_hidden_layers: int = 26
  num_attention_heads: int = 16
  patch_size: int = 14
  image_size: int = 980
  layer_norm_eps: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def patch_dim(self) -> int:
    return 3 * self.patch_size * self.patch_size


@dataclasses.dataclass(frozen=True)
class AEConfig:
  """FLUX autoencoder."""
  resolution: int = 256
  in_channels: int = 3
  ch: int = 128
  out_ch: int = 3
  ch_mult: Tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 16
  scale_factor: float = 0.3611
  shift_factor: float = 0.1159

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  bos: int = 151644  # <|im_start|>
  eos: int = 151645  # <|im_end|>
  start_of_image: int = 151652  # <|vision_start|>
  end_of_image: int = 151653  # <|vision_end|>


@dataclasses.dataclass(frozen=True)
class BagelConfig:
  """The whole UMM: LLM + optional ViT/connector + generation heads + autoencoder."""
  llm: LLMConfig = LLMConfig()
  vit: Optional[ViTConfig] = ViTConfig()  # None: visual_und=False (SRUM training builds no ViT)
  ae: AEConfig = AEConfig()
  tokens: SpecialTokens = SpecialTokens()
  latent_patch_size: int = 2
  max_latent_size: int = 64
  vit_max_num_patch_per_side: int = 70
  connector_act: str = "gelu_pytorch_tanh"
  timestep_shift: float = 1.0
  timestep_embed_dim: int = 256

  @property
  def latent_channels(self) -> int:
    return self.ae.z_channels

  @property
  def patch_latent_dim(self) -> int:
    return self.latent_patch_size ** 2 * self.ae.z_channels

  @property
  def latent_downsample(self) -> int:
    """Pixels per latent token side (16 for BAGEL-7B)."""
    return self.ae.downsample * self.latent_patch_size

  def replace(self, **kw) -> "BagelConfig":
    return dataclasses.replace(self, **kw)


def bagel_7b_mot() -> BagelConfig:
  return BagelConfig()


def tiny() -> BagelConfig:
  """The golden fixture model (`tests/fixtures/bagel_tiny/config.json`)."""
  return BagelConfig(
      llm=LLMConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                    max_position_embeddings=512),
      vit=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    patch_size=14, image_size=112),
      ae=AEConfig(resolution=32, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=4),
      tokens=SpecialTokens(bos=120, eos=121, start_of_image=122, end_of_image=123),
      latent_patch_size=2, max_latent_size=8, vit_max_num_patch_per_side=8, timestep_shift=2.0)


def mid() -> BagelConfig:
  """~2.0B-parameter MoT model with the 7B's structure (no ViT), for single-GPU training benchmarks."""
  return BagelConfig(
      llm=LLMConfig(vocab_size=152064, hidden_size=1536, intermediate_size=8960, num_hidden_layers=16,
                    num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6),
      vit=None, max_latent_size=64)


def tiny_world() -> BagelConfig:
  """The shapes-world model pretrained from scratch by `srum_jax.pretrain` (32x32 images, ~2M parameters).

  FLUX AE ch 32, ch_mult (1, 1, 1): /4, z 4, so a 32x32 image is 8x8x4 latents and, with latent patch 2,
  4x4 = 16 latent tokens of 16 dims (one 2x2 token block per 16-px cell of the world's 2x2 layout). The
  judge sees the image bicubically resized to 28x28: 2x2 ViT patches of 14 px, again one per cell (objects
  sit centred in cells, so each patch sees one whole object). The word-level vocabulary
  (`pretrain.world_words` + <unk>, 72 ids) fits in 128; the four special ids sit at the top.
  `scale_factor` / `shift_factor` here are placeholders: pretraining measures the latent statistics and
  writes the fitted values into the model directory's `model_config.json`.
  """
  return BagelConfig(
      llm=LLMConfig(vocab_size=128, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                    max_position_embeddings=512),
      vit=ViTConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                    patch_size=14, image_size=28),
      ae=AEConfig(resolution=32, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=4, scale_factor=1.0,
                  shift_factor=0.0),
      tokens=SpecialTokens(bos=124, eos=125, start_of_image=126, end_of_image=127),
      latent_patch_size=2, max_latent_size=8, vit_max_num_patch_per_side=2, timestep_shift=1.0)


def with_lora(cfg: BagelConfig, lora: Optional[LoraConfig]) -> BagelConfig:
  """`cfg` with adapters `lora` on its LLM (None: without adapters)."""
  return cfg.replace(llm=dataclasses.replace(cfg.llm, lora=lora))


PRESETS = {"tiny": tiny, "mid": mid, "bagel_7b_mot": bagel_7b_mot, "tiny_world": tiny_world}


def get_preset(name: str) -> BagelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]()
