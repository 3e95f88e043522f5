"""SAM parameter schema: each weight's shape, logical axes and initialiser, in one table.

As `models.params` does for BAGEL, the tree drives random initialisation (`params.init_params`),
abstract shapes for ahead-of-time compiles (`params.abstract_params`), sharding
(`sharding.schema_shardings`) and the converter's key tables (`convert.sam_keymap`). Flax naming:
`kernel` [in, out] or [kh, kw, in, out], `bias`, `scale`, `embedding`; a bare ParamSpec is a raw
parameter. Layout:

  image_encoder   patch_embed, pos_embed [G, G, C], windowed blocks [groups, group_size - 1, ...]
                  and global blocks [groups, ...] (stacked; a block is norm1, qkv, proj, rel_pos_h,
                  rel_pos_w, norm2, mlp_in, mlp_out), neck (conv1 1x1, norm1, conv2 3x3, norm2;
                  the neck's convolutions have no bias)
  prompt_encoder  pe_gaussian [2, D/2] (random Fourier features), point_embed [4, D] (negative
                  point, positive point, two box corners), not_a_point_embed, no_mask_embed,
                  mask_embed (conv1, norm1, conv2, norm2, conv3)
  mask_decoder    iou_token, mask_tokens [T, D], layers [L, ...] (self_attn, norm1,
                  cross_token_to_image, norm2, mlp_in, mlp_out, norm3, norm4,
                  cross_image_to_token), final_attn, final_norm, upscale1 / upscale_norm /
                  upscale2 (2x2 stride-2 transposed convolutions), hyper_mlp (fc1..fc3 stacked
                  over the T mask tokens), iou_head {"0".."depth-1"}
"""
from __future__ import annotations

from typing import Any, Dict

from srum_jax.models import params
from srum_jax.models.params import ParamSpec, dense, norm
from srum_jax.models.sam_config import SamConfig

Tree = Dict[str, Any]


def _conv(k: int, c_in: int, c_out: int, bias: bool = True) -> Tree:
  p = {"kernel": ParamSpec((k, k, c_in, c_out), (None, None, None, None), "normal", fan_in_dims=3)}
  if bias:
    p["bias"] = ParamSpec((c_out,), (None,), "zeros")
  return p


def encoder_block(cfg: SamConfig, window: int) -> Tree:
  """One ViT block; `window` is the attention window side (the whole grid for a global block)."""
  e = cfg.encoder
  c = e.hidden_size
  return {
      "norm1": norm(c, "norm", bias=True),
      "qkv": dense(c, 3 * c, "vit_embed", "vit_heads"),
      "proj": dense(c, c, "vit_heads", "vit_embed"),
      "rel_pos_h": ParamSpec((2 * window - 1, e.head_dim), (None, None), "zeros"),
      "rel_pos_w": ParamSpec((2 * window - 1, e.head_dim), (None, None), "zeros"),
      "norm2": norm(c, "norm", bias=True),
      "mlp_in": dense(c, e.mlp_dim, "vit_embed", "vit_mlp"),
      "mlp_out": dense(e.mlp_dim, c, "vit_mlp", "vit_embed"),
  }


def image_encoder_schema(cfg: SamConfig) -> Tree:
  e = cfg.encoder
  c, o = e.hidden_size, e.out_channels
  return {
      "patch_embed": _conv(e.patch_size, 3, c),
      "pos_embed": ParamSpec((e.grid, e.grid, c), (None, None, "vit_embed"), "zeros"),
      "windowed": params.stack_layers(
          params.stack_layers(encoder_block(cfg, e.window_size), e.group_size - 1), e.num_groups),
      "global": params.stack_layers(encoder_block(cfg, e.grid), e.num_groups),
      "neck": {"conv1": _conv(1, c, o, bias=False), "norm1": norm(o, "norm", bias=True),
               "conv2": _conv(3, o, o, bias=False), "norm2": norm(o, "norm", bias=True)},
  }


def prompt_encoder_schema(cfg: SamConfig) -> Tree:
  d = cfg.decoder
  h, m = d.hidden_size, d.mask_in_chans
  return {
      "pe_gaussian": ParamSpec((2, h // 2), (None, None), "normal"),
      "point_embed": {"embedding": ParamSpec((4, h), ("layers", None), "embed")},
      "not_a_point_embed": {"embedding": ParamSpec((h,), (None,), "embed")},
      "no_mask_embed": {"embedding": ParamSpec((h,), (None,), "embed")},
      "mask_embed": {"conv1": _conv(2, 1, m // 4), "norm1": norm(m // 4, "norm", bias=True),
                     "conv2": _conv(2, m // 4, m), "norm2": norm(m, "norm", bias=True),
                     "conv3": _conv(1, m, h)},
  }


def _attention(d_model: int, internal: int) -> Tree:
  return {"q_proj": dense(d_model, internal, None, None),
          "k_proj": dense(d_model, internal, None, None),
          "v_proj": dense(d_model, internal, None, None),
          "out_proj": dense(internal, d_model, None, None)}


def mask_decoder_schema(cfg: SamConfig) -> Tree:
  d = cfg.decoder
  h, t = d.hidden_size, d.num_mask_tokens
  inner = h // d.attention_downsample_rate
  layer = {
      "self_attn": _attention(h, h), "norm1": norm(h, "norm", bias=True),
      "cross_token_to_image": _attention(h, inner), "norm2": norm(h, "norm", bias=True),
      "mlp_in": dense(h, d.mlp_dim, None, None), "mlp_out": dense(d.mlp_dim, h, None, None),
      "norm3": norm(h, "norm", bias=True), "norm4": norm(h, "norm", bias=True),
      "cross_image_to_token": _attention(h, inner),
  }
  widths = [h] + [d.iou_head_hidden_dim] * (d.iou_head_depth - 1) + [t]
  return {
      "iou_token": {"embedding": ParamSpec((h,), (None,), "embed")},
      "mask_tokens": {"embedding": ParamSpec((t, h), (None, None), "embed")},
      "layers": params.stack_layers(layer, d.num_layers),
      "final_attn": _attention(h, inner),
      "final_norm": norm(h, "norm", bias=True),
      "upscale1": _conv(2, h, h // 4),
      "upscale_norm": norm(h // 4, "norm", bias=True),
      "upscale2": _conv(2, h // 4, h // 8),
      "hyper_mlp": params.stack_layers({"fc1": dense(h, h, None, None),
                                        "fc2": dense(h, h, None, None),
                                        "fc3": dense(h, h // 8, None, None)}, t),
      "iou_head": {str(i): dense(widths[i], widths[i + 1], None, None)
                   for i in range(d.iou_head_depth)},
  }


def sam_schema(cfg: SamConfig) -> Tree:
  """The whole model's tree (what a converted SAM directory holds)."""
  return {"image_encoder": image_encoder_schema(cfg), "prompt_encoder": prompt_encoder_schema(cfg),
          "mask_decoder": mask_decoder_schema(cfg)}
