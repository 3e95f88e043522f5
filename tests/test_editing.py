"""Image editing against the official golden cases and formulas.

* `flow`: the official inferencer's editing contexts (VAE + ViT image, then the instruction;
  cfg_text = the image, cfg_img = the instruction alone) -> the three branch velocities, through
  `editing.edit_contexts`.
* `gen_edit`: the official packed training forward of the editing layout (clean VAE image, ViT
  image, text, noisy image); the same velocities come out of the KV-cache path (edit contexts, then
  the query block).
* The guidance rule: `sampling.cfg_combine` against BAGEL's `_forward_flow` combination written out
  in NumPy.

Tolerances: atol = rtol = 1e-4 against the fp32 goldens (measured ~1e-6); 1e-5 against the NumPy
formula (fp32 against float64).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from srum_jax import losses, sharding
from srum_jax.inference import context, editing, sampling
from srum_jax.models import embeddings, image_transforms

from helpers import CharTokenizer, max_err  # noqa: E402

ATOL = RTOL = 1e-4
T = 64  # cache slots per row


def _ids(ids):
  """Token ids as the CharTokenizer's text."""
  return "".join(chr(0x100 + int(i)) for i in ids)


def _wrapped(ids, cfg, length=16):
  return context.pad_ids([context.wrap_text(list(ids), cfg)], length)


@functools.partial(jax.jit, static_argnames=("cfg", "grid"))
def _branches(params, ctxs, x, t, cfg, grid):
  return sampling.branch_velocities(params, ctxs, x, t, cfg=cfg, grid=grid)


def test_edit_contexts_golden_flow(golden_cases, tiny_params, tiny_cfg):
  """The `flow` case is the official editing context: kv lengths, ropes, cached keys, velocities."""
  c = {k[len("flow."):]: v for k, v in golden_cases.items() if k.startswith("flow.")}
  params, cfg = tiny_params["bagel"], tiny_cfg
  lat, lat_grid = context.vae_inputs(tiny_params["ae"], [c["ctx_vae_image"].transpose(1, 2, 0)],
                                     cfg, budget=16)
  patches, vit_grid = context.vit_inputs([c["ctx_vit_image"].transpose(1, 2, 0)], cfg, budget=8)
  ids, lens = _wrapped(c["prompt_ids"], cfg)
  ctxs = editing.edit_contexts(params, context.init_context(cfg, 1, T), lat, lat_grid, patches,
                               vit_grid, ids, lens, cfg=cfg)
  for name, ctx in zip(("gen", "cfg_text", "cfg_img"), ctxs):
    np.testing.assert_array_equal(np.asarray(ctx.kv_len), c[f"{name}_kv_len"], err_msg=name)
    np.testing.assert_array_equal(np.asarray(ctx.rope), c[f"{name}_rope"], err_msg=name)
  np.testing.assert_allclose(
      np.asarray(ctxs[0].cache.k[0, 0, :21]), c["gen_cache_key_layer0"], atol=ATOL, rtol=RTOL)
  vs = _branches(params, ctxs, jnp.asarray(c["init_noise"])[None], c["t0"][0], cfg, (4, 3))
  for name, v in zip(("v_cond", "v_text_uncond", "v_img_uncond"), vs):
    print(f"{name}: max abs err {max_err(v[0], c[name]):.2e}")
    np.testing.assert_allclose(np.asarray(v[0]), c[name], atol=ATOL, rtol=RTOL, err_msg=name)
  v = sampling.cfg_combine(*vs, cfg_text_scale=4.0, cfg_img_scale=1.5,
                           cfg_renorm_type="text_channel")
  np.testing.assert_allclose(np.asarray(v[0]), c["v_cfg_text_channel"], atol=ATOL, rtol=RTOL)


def test_edit_contexts_reproduce_the_packed_gen_edit_forward(golden_cases, tiny_params, tiny_cfg):
  """`gen_edit`: the official packed forward of [clean VAE image][ViT image][text][noisy image] in
  one sample. The edit context (prefilled VAE, ViT and text splits) plus the query block give its
  velocities."""
  c = golden_cases
  params, cfg = tiny_params["bagel"], tiny_cfg
  (h0, w0), (h1, w1) = [tuple(s) for s in c["gen_edit.patchified_vae_latent_shapes"]]
  p = cfg.latent_patch_size
  nhwc = [img.transpose(1, 2, 0)[:p * h, :p * w]
          for img, (h, w) in zip(c["gen_edit.padded_latent"], ((h0, w0), (h1, w1)))]
  lat = [np.asarray(embeddings.patchify_latent(jnp.asarray(x), p)) for x in nhwc]
  latents = np.zeros((1, 8, cfg.patch_latent_dim), np.float32)
  latents[0, :h0 * w0] = lat[0]
  patches = np.zeros((1, 8, cfg.vit.patch_dim), np.float32)
  patches[0, :6] = c["gen_edit.packed_vit_tokens"]
  text = c["gen_edit.packed_text_ids"][4:10]  # [BOS, 21, 22, 23, 24, EOS], positions 2..7
  assert text[0] == cfg.tokens.bos and text[-1] == cfg.tokens.eos
  ids, lens = context.pad_ids([list(text)], 16)
  gen, _, _ = editing.edit_contexts(params, context.init_context(cfg, 1, T), latents,
                                    np.array([[h0, w0]]), patches, np.array([[2, 3]]), ids, lens,
                                    cfg=cfg)
  query_position = c["gen_edit.packed_position_ids"][-1]  # 8
  np.testing.assert_array_equal(np.asarray(gen.rope), [query_position])
  t = losses.timesteps_from_raw(
      jnp.asarray(c["gen_edit.packed_timesteps"][-1:]), cfg.timestep_shift)
  noise = c["gen_edit.noise"][h0 * w0:]  # the noisy image's rows (the clean one's are scaled by 0)
  x_t = losses.interpolate(jnp.asarray(lat[1])[None], jnp.asarray(noise)[None], t)
  v = sampling.velocity(params, gen, x_t, t, cfg=cfg, grid=(h1, w1))
  print(f"gen_edit v_pred: max abs err {max_err(v[0], c['gen_edit.v_pred']):.2e}")
  np.testing.assert_allclose(np.asarray(v[0]), c["gen_edit.v_pred"], atol=ATOL, rtol=RTOL)


def official_guidance(v, v_text, v_img, text_scale, img_scale, renorm_type, renorm_min):
  """BAGEL's `_forward_flow` guidance for one image ([N, C] arrays), statement by statement, in
  NumPy float64."""
  if not text_scale > 1.0:
    return v
  if renorm_type == "text_channel":
    v_text_ = v_text + text_scale * (v - v_text)
    norm_v = np.linalg.norm(v, axis=-1, keepdims=True)
    norm_v_text_ = np.linalg.norm(v_text_, axis=-1, keepdims=True)
    scale = np.clip(norm_v / (norm_v_text_ + 1e-8), renorm_min, 1.0)
    v_text_ = v_text_ * scale
    return v_img + img_scale * (v_text_ - v_img) if img_scale > 1.0 else v_text_
  v_text_ = v_text + text_scale * (v - v_text)
  v_ = v_img + img_scale * (v_text_ - v_img) if img_scale > 1.0 else v_text_
  if renorm_type == "global":
    norm_v, norm_v_ = np.linalg.norm(v), np.linalg.norm(v_)
  else:  # channel
    norm_v, norm_v_ = np.linalg.norm(v, axis=-1,
                                     keepdims=True), np.linalg.norm(v_, axis=-1, keepdims=True)
  return v_ * np.clip(norm_v / (norm_v_ + 1e-8), renorm_min, 1.0)


@pytest.mark.parametrize("renorm_type", sampling.RENORM_TYPES)
@pytest.mark.parametrize("text_scale,img_scale,renorm_min", [(4.0, 2.0, 0.0), (4.0, 1.0, 0.0),
                                                             (1.0, 2.0, 0.0), (3.0, 1.5, 0.6),
                                                             (0.5, 3.0, 0.0)])
def test_cfg_combine_is_the_official_rule(renorm_type, text_scale, img_scale, renorm_min):
  """Two images per batch, each combined on its own (the official rule is stated for batch 1)."""
  rng = np.random.default_rng(0)
  v, v_text, v_img = (rng.normal(size=(2, 12, 16)) * s for s in (1.0, 0.7, 1.3))
  got = sampling.cfg_combine(*(jnp.asarray(a, jnp.float32) for a in (v, v_text, v_img)),
                             cfg_text_scale=text_scale, cfg_img_scale=img_scale,
                             cfg_renorm_type=renorm_type, cfg_renorm_min=renorm_min)
  for b in range(2):
    want = official_guidance(v[b], v_text[b], v_img[b], text_scale, img_scale, renorm_type,
                             renorm_min)
    np.testing.assert_allclose(np.asarray(got[b]), want, atol=1e-5, rtol=1e-5)


def test_input_views_are_the_official_transforms():
  """The VAE view is the stride-16 resize; the ViT view is the ViT transform of that resized
  image."""
  rng = np.random.default_rng(1)
  pil = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))
  vae, vit = editing.input_views(pil, image_transforms.VAE_TRANSFORM,
                                 image_transforms.VIT_TRANSFORM)
  w, h = image_transforms.resize_dims(500, 300, *image_transforms.VAE_TRANSFORM)
  assert vae.shape == (h, w,
                       3) and vae.dtype == np.float32 and -1.0 <= vae.min() and vae.max() <= 1.0
  resized = image_transforms.resize_image(pil, *image_transforms.VAE_TRANSFORM)
  np.testing.assert_array_equal(
      vit, image_transforms.transform_image(resized, *image_transforms.VIT_TRANSFORM))


def test_edit_images_contexts_and_rows(tiny_params, tiny_cfg, monkeypatch):
  """think=True: gen = [system] + image (VAE, ViT) + instruction + plan; cfg_text = [system] +
  image; cfg_img = [system] + instruction. A row's image does not depend on the rest of its
  batch."""
  params, params_ae, cfg = tiny_params["bagel"], tiny_params["ae"], tiny_cfg
  tok = CharTokenizer()
  rng = np.random.default_rng(2)
  views = [(rng.uniform(-1, 1, (16, 24, 3)).astype(np.float32),
            rng.uniform(-1, 1, (28, 42, 3)).astype(np.float32)) for _ in range(2)]
  prompts = [_ids([31, 32, 33]), _ids([40, 41, 42, 43, 44])]
  seen = {}
  real = sampling.sample_images

  def spy(params, params_ae, cfg, contexts, **kw):
    seen["contexts"], seen["kw"] = contexts, kw
    return real(params, params_ae, cfg, contexts, **kw)

  monkeypatch.setattr(sampling, "sample_images", spy)
  kw = dict(cfg=cfg, num_timesteps=3, cfg_text_scale=3.0, cfg_img_scale=1.5, seeds=5,
            text_budget=16)
  out = editing.edit_images(params, params_ae, tok, views, prompts, think=True,
                            system_prompt=_ids([7, 8, 9]), max_think_tokens=4, image_ids=[0,
                                                                                          1], **kw)
  assert out.images.shape == (2, 16, 24, 3) and out.images.dtype == np.uint8
  gen, cfg_text, cfg_img = seen["contexts"]
  sys_len, image_len = 3 + 2, (2 * 3 + 2) + (2 * 3 + 2)
  p_lens = np.array([5, 7])
  plans = np.array([len(tok.encode(p)) + 2 for p in out.think_texts])
  np.testing.assert_array_equal(np.asarray(cfg_text.kv_len), [sys_len + image_len] * 2)
  np.testing.assert_array_equal(np.asarray(cfg_text.rope), [sys_len + 2] * 2)
  np.testing.assert_array_equal(np.asarray(cfg_img.kv_len), sys_len + p_lens)
  np.testing.assert_array_equal(np.asarray(gen.kv_len), sys_len + image_len + p_lens + plans)
  np.testing.assert_array_equal(np.asarray(gen.rope), sys_len + 2 + p_lens + plans)

  alone = editing.edit_images(params, params_ae, tok, views[1:], prompts[1:], image_ids=[1], **kw)
  pair = editing.edit_images(params, params_ae, tok, views, prompts, image_ids=[0, 1], **kw)
  np.testing.assert_allclose(np.asarray(pair.latents[1]), np.asarray(alone.latents[0]), atol=1e-5)
  assert pair.think_texts is None
  with pytest.raises(ValueError, match="system prompt"):
    editing.edit_images(params, params_ae, tok, views, prompts, think=True, **kw)
  with pytest.raises(ValueError, match="one size"):
    editing.edit_images(params, params_ae, tok, [views[0], (views[1][0][:8], views[1][1])], prompts,
                        **kw)


def test_edit_images_rows_split_over_a_mesh_equal_one_device(tiny_params, tiny_cfg):
  """Rows split over a 2-device data axis (contexts, inputs, keys) equal the one-device edit."""
  params, params_ae, cfg = tiny_params["bagel"], tiny_params["ae"], tiny_cfg
  rng = np.random.default_rng(3)
  views = [(rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32),
            rng.uniform(-1, 1, (28, 28, 3)).astype(np.float32)) for _ in range(2)]
  kw = dict(cfg=cfg, num_timesteps=2, cfg_text_scale=3.0, cfg_img_scale=1.5, seeds=1,
            image_ids=[4, 5], text_budget=16)
  prompts = [_ids([31, 32]), _ids([40, 41, 42])]
  one = editing.edit_images(params, params_ae, CharTokenizer(), views, prompts, **kw)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
  split = editing.edit_images(params, params_ae, CharTokenizer(), views, prompts, mesh=mesh, **kw)
  np.testing.assert_allclose(np.asarray(split.latents), np.asarray(one.latents), atol=1e-4)
