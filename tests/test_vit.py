"""SigLIP NaViT encoder + connector against the official golden case `vit`."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srum_jax.models import config, image_transforms, params, siglip

ATOL = RTOL = 1e-4  # fp32 golden tolerance (measured max errors are ~1e-6)
CFG = config.tiny()
VIT_PREFIX = "vit_model.vision_model."


def _dense(sd, name):
  return {"kernel": sd[name + ".weight"].T, "bias": sd[name + ".bias"]}


def _ln(sd, name):
  return {"scale": sd[name + ".weight"], "bias": sd[name + ".bias"]}


def golden_to_tree(sd, cfg):
  """Official tiny state dict -> {'vit', 'connector'} trees in the `params.bagel_schema` layout."""
  def layer(i):
    pre = f"{VIT_PREFIX}encoder.layers.{i}."
    p = {n: _dense(sd, pre + "self_attn." + n) for n in ("q_proj", "k_proj", "v_proj", "out_proj")}
    p.update({n: _dense(sd, pre + "mlp." + n) for n in ("fc1", "fc2")})
    p.update({n: _ln(sd, pre + n) for n in ("layer_norm1", "layer_norm2")})
    return p

  layers_ = [layer(i) for i in range(cfg.vit.num_hidden_layers)]
  vit = {
      "patch_embedding": _dense(sd, VIT_PREFIX + "embeddings.patch_embedding"),
      "position_embedding": {"embedding": sd[VIT_PREFIX + "embeddings.position_embedding.weight"]},
      "layers": jax.tree.map(lambda *xs: np.stack(xs), *layers_),
      "post_layernorm": _ln(sd, VIT_PREFIX + "post_layernorm"),
  }
  connector = {"fc1": _dense(sd, "connector.fc1"), "fc2": _dense(sd, "connector.fc2")}
  return {"vit": vit, "connector": connector}


@pytest.fixture(scope="module")
def tree(golden_weights):
  return golden_to_tree(golden_weights, CFG)


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_tree_matches_schema(tree):
  schema = params.bagel_schema(CFG)
  want = params.abstract_params({"vit": schema["vit"], "connector": schema["connector"]})
  assert jax.tree.structure(want) == jax.tree.structure(tree)
  for w, t in zip(jax.tree.leaves(want), jax.tree.leaves(tree)):
    assert w.shape == t.shape


def test_position_ids_rule(golden_cases):
  np.testing.assert_array_equal(siglip.vit_position_ids(2, 3, 8), [0, 1, 2, 8, 9, 10])
  np.testing.assert_array_equal(siglip.vit_position_ids(3, 2, 70), [0, 1, 70, 71, 140, 141])
  packed = np.concatenate([siglip.vit_position_ids(2, 3, 8), siglip.vit_position_ids(3, 2, 8)])
  np.testing.assert_array_equal(packed, golden_cases["vit.packed_position_ids"])
  np.testing.assert_array_equal(siglip.vit_position_ids(2, 3, 8), golden_cases["gen_edit.packed_vit_position_ids"])


def test_golden_images_patchify_to_packed_pixels(golden_cases):
  a, b = (golden_cases[f"vit.image_{n}"].transpose(1, 2, 0) for n in "ab")
  packed = np.concatenate([image_transforms.vit_patchify(a), image_transforms.vit_patchify(b)])
  np.testing.assert_array_equal(packed, golden_cases["vit.packed_pixel_values"])


@functools.partial(jax.jit, static_argnames=("cfg",))
def _run(tree, patches, pos, seg, cfg):
  vit_out = siglip.vit_forward(tree["vit"], patches, pos, seg, cfg=cfg.vit)
  conn = siglip.connector_forward(tree["connector"], vit_out)
  tokens = siglip.embed_vit_tokens(tree, patches, pos, seg, cfg)
  return vit_out, conn, tokens


def _check_golden(golden_cases, got, rows):
  """Compare (vit_out, connector_out, token_embeds) at the given [B, Np] selection with the golden rows."""
  errs = {}
  for out, name in zip(got, ("vit_out", "connector_out", "token_embeds")):
    sel = np.concatenate([np.asarray(out)[b, idx] for b, idx in rows])
    want = golden_cases[f"vit.{name}"]
    np.testing.assert_allclose(sel, want, atol=ATOL, rtol=RTOL, err_msg=name)
    errs[name] = _max_err(sel, want)
  return errs


def test_vit_packed_golden(golden_cases, tree):
  """Both images packed into one row, separated by segment ids (official cu_seqlens = [0, 6, 12])."""
  cu = golden_cases["vit.cu_seqlens"]
  seg = np.repeat(np.arange(len(cu) - 1), np.diff(cu))[None].astype(np.int32)
  patches = golden_cases["vit.packed_pixel_values"][None]
  pos = golden_cases["vit.packed_position_ids"][None].astype(np.int32)
  got = _run(tree, patches, pos, seg, CFG)
  errs = _check_golden(golden_cases, got, [(0, np.arange(12))])
  print("vit packed max abs err:", errs)


def test_vit_two_padded_rows_golden(golden_cases, tree):
  """Same images as two rows (B=2) padded to 9 tokens with segment -1; padding stays finite."""
  pix, pos_all = golden_cases["vit.packed_pixel_values"], golden_cases["vit.packed_position_ids"]
  n, pad = 6, 3
  patches = np.zeros((2, n + pad, pix.shape[1]), np.float32)
  patches[:, n:] = 7.0  # junk in the padding must not leak into real tokens
  pos = np.zeros((2, n + pad), np.int32)
  seg = np.full((2, n + pad), -1, np.int32)
  for b in range(2):
    patches[b, :n] = pix[b * n:(b + 1) * n]
    pos[b, :n] = pos_all[b * n:(b + 1) * n]
    seg[b, :n] = 0
  got = _run(tree, patches, pos, seg, CFG)
  errs = _check_golden(golden_cases, got, [(0, np.arange(n)), (1, np.arange(n))])
  print("vit padded rows max abs err:", errs)
  for out in got:
    assert np.all(np.isfinite(np.asarray(out)))


def test_segments_do_not_interact(golden_cases, tree):
  """Changing image B leaves image A's features bit-for-bit unchanged; changing A's own patches does not."""
  patches = golden_cases["vit.packed_pixel_values"][None]
  pos = golden_cases["vit.packed_position_ids"][None].astype(np.int32)
  seg = np.repeat([0, 1], 6)[None].astype(np.int32)
  fwd = jax.jit(functools.partial(siglip.vit_forward, cfg=CFG.vit))
  base = np.asarray(fwd(tree["vit"], patches, pos, seg))
  other = patches.copy()
  other[0, 6:] = -other[0, 6:]
  moved = np.asarray(fwd(tree["vit"], other, pos, seg))
  np.testing.assert_array_equal(moved[0, :6], base[0, :6])
  assert _max_err(moved[0, 6:], base[0, 6:]) > 1e-2
  own = patches.copy()
  own[0, 0] = -own[0, 0]
  changed = np.asarray(fwd(tree["vit"], own, pos, seg))
  assert _max_err(changed[0, 1:6], base[0, 1:6]) > 1e-4


def test_bf16_compute_follows_input_dtype(golden_cases, tree):
  patches = jnp.asarray(golden_cases["vit.packed_pixel_values"][None], jnp.bfloat16)
  pos = golden_cases["vit.packed_position_ids"][None].astype(np.int32)
  seg = np.repeat([0, 1], 6)[None].astype(np.int32)
  vit_out, conn, tokens = _run(tree, patches, pos, seg, CFG)
  assert vit_out.dtype == conn.dtype == tokens.dtype == jnp.bfloat16
  # bf16 activations: ~0.03 max abs error measured against the fp32 reference.
  np.testing.assert_allclose(np.asarray(tokens, np.float32)[0], golden_cases["vit.token_embeds"], atol=0.06)
