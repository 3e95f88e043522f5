"""Model FLOPs by BAGEL's MFU formula: 6 * N * tokens + 12 * head_dim * heads * layers * sum(len^2).

N is the number of parameters one token passes through: one MoT expert's decoder weights plus the
generation heads (vae2llm, llm2vae, time embedder); `seq_lens` are the per-sample attention lengths.
"""
from __future__ import annotations

from typing import Sequence

from srum_jax.models.config import BagelConfig


def bagel_active_params(cfg: BagelConfig) -> int:
  c = cfg.llm
  d, f = c.hidden_size, c.intermediate_size
  q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
  per_layer = d * q + 2 * d * kv + q * d + 3 * d * f  # one expert
  return (c.num_hidden_layers * per_layer + cfg.patch_latent_dim * d * 2
          + cfg.timestep_embed_dim * d + d * d)


def bagel_flops(cfg: BagelConfig, tokens: int, seq_lens: Sequence[int]) -> float:
  c = cfg.llm
  return (6.0 * bagel_active_params(cfg) * tokens + 12.0 * c.head_dim * c.num_attention_heads *
          c.num_hidden_layers * sum(l * l for l in seq_lens))
