"""Flow sampling with KV-cache contexts and CFG against the official golden case `flow`."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srum_jax.inference import context, decoding, sampling
from srum_jax.models import autoencoder, embeddings

ATOL = RTOL = 1e-4  # fp32 golden tolerance (measured: cache K/V ~2e-6, velocities ~1e-6, CFG ~7e-6)
T = 64  # cache slots per row (the budgets of test_decoding: shared compilations)
GRID = (4, 3)  # the golden query image: 32x24 px -> 4x3 latent tokens
FLOW = dict(num_timesteps=4, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=1.5, cfg_interval=(0.4, 1.0),
            cfg_renorm_type="global", cfg_renorm_min=0.0)


from helpers import CharTokenizer, max_err as _err  # noqa: E402


def _close(name, got, want):
  print(f"{name}: max abs err {_err(got, want):.2e}")
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=RTOL, err_msg=name)


def build_contexts(params, params_ae, cfg, rows):
  """The golden case's contexts for rows of (vae image | None, vit image | None, prompt ids):
  gen = VAE image + ViT image + text; cfg_text = gen before the text; cfg_img = the text alone."""
  ctx = context.init_context(cfg, len(rows), T)
  lat, lat_grid = context.vae_inputs(params_ae, [r[0] for r in rows], cfg, budget=16)
  gen = context.prefill_vae_image(params, ctx, lat, lat_grid, cfg=cfg)
  gen = context.add_vit_images(params, gen, [r[1] for r in rows], cfg, budget=8)
  cfg_text = gen
  gen = context.add_texts(params, gen, [r[2] for r in rows], cfg, length=16)
  cfg_img = context.add_texts(params, ctx, [r[2] for r in rows], cfg, length=16)
  return gen, cfg_text, cfg_img


@pytest.fixture(scope="module")
def golden(golden_cases):
  c = {k[len("flow."):]: v for k, v in golden_cases.items() if k.startswith("flow.")}
  c["row"] = (c["ctx_vae_image"].transpose(1, 2, 0), c["ctx_vit_image"].transpose(1, 2, 0), c["prompt_ids"])
  return c


@pytest.fixture(scope="module")
def contexts(tiny_params, tiny_cfg, golden):
  return build_contexts(tiny_params["bagel"], tiny_params["ae"], tiny_cfg, [golden["row"]])


@functools.partial(jax.jit, static_argnames=("cfg", "grid"))
def _branches(params, ctxs, x, t, cfg, grid):
  return sampling.branch_velocities(params, ctxs, x, t, cfg=cfg, grid=grid)


def test_golden_flow_contexts(contexts, golden):
  for name, ctx in zip(("gen", "cfg_text", "cfg_img"), contexts):
    np.testing.assert_array_equal(np.asarray(ctx.kv_len), golden[f"{name}_kv_len"], err_msg=name)  # 21, 14, 7
    np.testing.assert_array_equal(np.asarray(ctx.rope), golden[f"{name}_rope"], err_msg=name)  # 9, 2, 7
  gen = contexts[0]
  for layer in range(2):
    _close(f"gen cache key layer {layer}", gen.cache.k[layer, 0, :21], golden[f"gen_cache_key_layer{layer}"])
    _close(f"gen cache value layer {layer}", gen.cache.v[layer, 0, :21], golden[f"gen_cache_value_layer{layer}"])
  assert not np.asarray(gen.cache.k[:, 0, 21:]).any()  # nothing written past the context


def test_golden_flow_velocities_and_cfg(tiny_params, tiny_cfg, contexts, golden):
  np.testing.assert_array_equal(np.asarray(sampling.shifted_timesteps(4, 3.0)), golden["timesteps_shifted"])
  x = jnp.asarray(golden["init_noise"])[None]
  vs = _branches(tiny_params["bagel"], contexts, x, golden["t0"][0], tiny_cfg, GRID)
  for name, v in zip(("v_cond", "v_text_uncond", "v_img_uncond"), vs):
    _close(name, v[0], golden[name])
  for rt in sampling.RENORM_TYPES:
    v = sampling.cfg_combine(*vs, cfg_text_scale=4.0, cfg_img_scale=1.5, cfg_renorm_type=rt, cfg_renorm_min=0.0)
    _close(f"v_cfg_{rt}", v[0], golden[f"v_cfg_{rt}"])
  # Scale 1 for text: no guidance at all, whatever the image scale.
  v1 = sampling.cfg_combine(*vs, cfg_text_scale=1.0, cfg_img_scale=1.5)
  np.testing.assert_array_equal(np.asarray(v1), np.asarray(vs[0]))


def test_golden_flow_euler_and_decode(tiny_params, tiny_cfg, contexts, golden):
  params, params_ae, cfg = tiny_params["bagel"], tiny_params["ae"], tiny_cfg
  x0 = jnp.asarray(golden["init_noise"])[None]
  tokens = sampling.sample_latents(params, contexts, x0, cfg=cfg, grid=GRID, **FLOW)
  _close("final latent tokens", tokens[0], golden["final_latent_tokens"])
  latent = embeddings.unpatchify_latent(tokens, *GRID, cfg.latent_patch_size)  # NHWC
  _close("final latent image", np.asarray(latent[0]).transpose(2, 0, 1), golden["final_latent_image"][0])
  decoded = sampling.decode_latents(params_ae, tokens, cfg=cfg, grid=GRID)
  _close("decoded", np.asarray(decoded[0]).transpose(2, 0, 1), golden["decoded"][0])
  images = sampling.sample_images(params, params_ae, cfg, contexts, height=32, width=24, x0=x0, **FLOW)
  assert images.dtype == jnp.uint8 and images.shape == (1, 32, 24, 3)
  want = np.asarray(autoencoder.to_uint8(jnp.asarray(golden["decoded"].transpose(0, 2, 3, 1))))
  assert np.abs(np.asarray(images, np.int32) - want).max() <= 1  # truncation may flip at a boundary
  assert (np.asarray(images) == want).mean() > 0.99


def test_rows_batched_with_other_rows(tiny_params, tiny_cfg, contexts, golden):
  """Row 0 = golden case, row 1 = no VAE image, a smaller ViT image, a longer prompt: row 0 keeps the golden
  caches and velocities, row 1 equals its own single-row run."""
  params, params_ae, cfg = tiny_params["bagel"], tiny_params["ae"], tiny_cfg
  vae, vit, _ = golden["row"]
  other = (None, vit[:14, :28], list(range(40, 49)))
  batched = build_contexts(params, params_ae, cfg, [golden["row"], other])
  np.testing.assert_array_equal(np.asarray(batched[0].kv_len), [21, 4 + 11])
  np.testing.assert_array_equal(np.asarray(batched[0].rope), [9, 1 + 11])
  for layer in range(2):
    _close(f"batched gen cache key layer {layer}", batched[0].cache.k[layer, 0, :21],
           golden[f"gen_cache_key_layer{layer}"])
  x = jnp.asarray(np.stack([golden["init_noise"], golden["init_noise"][::-1]]))
  vs = _branches(params, batched, x, golden["t0"][0], cfg, GRID)
  for name, v in zip(("v_cond", "v_text_uncond", "v_img_uncond"), vs):
    _close(f"batched {name}", v[0], golden[name])
  alone = _branches(params, build_contexts(params, params_ae, cfg, [other]), x[1:], golden["t0"][0], cfg, GRID)
  for a, b in zip(alone, vs):
    np.testing.assert_allclose(np.asarray(b[1]), np.asarray(a[0]), atol=1e-5, rtol=1e-5)


def test_cfg_scale_one_and_outside_interval_reduce_to_conditional(tiny_params, tiny_cfg, contexts, golden):
  params, cfg = tiny_params["bagel"], tiny_cfg
  x0 = jnp.asarray(golden["init_noise"])[None]
  ts = np.asarray(sampling.shifted_timesteps(4, 3.0))
  x = x0
  for i in range(3):  # plain Euler with the conditional velocity only
    x = x - _branches(params, contexts[:1], x, ts[i], cfg, GRID)[0] * (ts[i] - ts[i + 1])
  no_cfg = sampling.sample_latents(params, contexts, x0, cfg=cfg, grid=GRID, **{**FLOW, "cfg_text_scale": 1.0})
  np.testing.assert_allclose(np.asarray(no_cfg), np.asarray(x), atol=1e-5, rtol=1e-5)
  outside = sampling.sample_latents(params, contexts, x0, cfg=cfg, grid=GRID, **{**FLOW, "cfg_interval": (1.0, 1.0)})
  np.testing.assert_allclose(np.asarray(outside), np.asarray(x), atol=1e-5, rtol=1e-5)
  guided = sampling.sample_latents(params, contexts, x0, cfg=cfg, grid=GRID, **FLOW)
  assert _err(guided, x) > 1e-2  # guidance does change the result


def test_sampler_does_not_recompile_for_new_content(tiny_params, tiny_cfg, contexts, golden):
  params, params_ae, cfg = tiny_params["bagel"], tiny_params["ae"], tiny_cfg
  x0 = jnp.asarray(golden["init_noise"])[None]
  sampling.sample_latents(params, contexts, x0, cfg=cfg, grid=GRID, **FLOW)
  before = dict(context.TRACES)
  vae, vit, _ = golden["row"]
  other = build_contexts(params, params_ae, cfg, [(vae[:8, :8], None, [7, 8, 9])])
  out = sampling.sample_latents(params, other, x0[:, ::-1], cfg=cfg, grid=GRID, **FLOW)
  assert np.isfinite(np.asarray(out)).all()
  for name in ("prefill_text", "prefill_vit_image", "prefill_vae_image", "sample_latents"):
    assert context.TRACES[name] == before[name], name


def test_text_to_image_contexts(tiny_params, tiny_cfg, monkeypatch):
  """think=True: gen = [system] + prompt + decoded plan; cfg_text = [system]; cfg_img = [system] + prompt."""
  params, cfg = tiny_params["bagel"], tiny_cfg
  tok = CharTokenizer()
  seen = {}

  def fake_sample_images(params, params_ae, cfg, contexts, **kw):
    seen["contexts"], seen["kw"] = contexts, kw
    return np.zeros((len(kw["keys"]), kw["height"], kw["width"], 3), np.uint8), None

  monkeypatch.setattr(sampling, "sample_images", fake_sample_images)
  prompts = ["a cat", "two red boxes"]
  out = sampling.text_to_image(params, None, tok, prompts, cfg=cfg, think=True, system_prompt="plan it",
                               max_think_tokens=6, height=16, width=16, seeds=[1, 2], image_ids=[5, 9])
  gen, cfg_text, cfg_img = seen["contexts"]
  sys_len = len("plan it") + 2
  think_ids = [tok.encode(t) for t in out.think_texts]
  assert all(len(t) <= 6 for t in think_ids)
  p_lens = np.array([len(p) + 2 for p in prompts])
  np.testing.assert_array_equal(np.asarray(cfg_text.kv_len), [sys_len] * 2)
  np.testing.assert_array_equal(np.asarray(cfg_img.kv_len), sys_len + p_lens)
  np.testing.assert_array_equal(np.asarray(gen.kv_len), sys_len + p_lens + [len(t) + 2 for t in think_ids])
  np.testing.assert_array_equal(np.asarray(gen.rope), np.asarray(gen.kv_len))

  # The plan is what greedy decoding gives after [system] + prompt, and gen's cache is those three splits
  # (built by hand with the budgets text_to_image uses: one compilation for both).
  ctx = context.init_context(cfg, 2, 64)
  ctx = context.add_texts(params, ctx, [tok.encode("plan it")] * 2, cfg)
  ctx = context.add_texts(params, ctx, [tok.encode(p) for p in prompts], cfg)
  plans = decoding.generated_ids(decoding.generate_text(params, ctx, cfg, max_new_tokens=6))
  assert [tok.decode(p) for p in plans] == out.think_texts
  ctx = context.add_texts(params, ctx, plans, cfg)
  for b in range(2):
    n = int(ctx.kv_len[b])
    np.testing.assert_allclose(np.asarray(gen.cache.k[:, b, :n]), np.asarray(ctx.cache.k[:, b, :n]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(gen.cache.v[:, b, :n]), np.asarray(ctx.cache.v[:, b, :n]), atol=1e-5)
  keys = np.asarray(seen["kw"]["keys"])
  want = np.asarray(sampling.prompt_keys([1, 2], [5, 9]))
  np.testing.assert_array_equal(keys, want)
  assert out.images.shape == (2, 16, 16, 3)

  # Given plans (the decoded ones) skip decoding and build the same gen context.
  given = sampling.text_to_image(params, None, tok, prompts, cfg=cfg, think=True, system_prompt="plan it",
                                 max_think_tokens=6, height=16, width=16, seeds=[1, 2], image_ids=[5, 9],
                                 plans=out.think_texts)
  assert given.think_texts == out.think_texts
  np.testing.assert_allclose(np.asarray(seen["contexts"][0].cache.k), np.asarray(gen.cache.k), atol=1e-6)
  with pytest.raises(ValueError, match="one plan per prompt"):
    sampling.text_to_image(params, None, tok, prompts, cfg=cfg, think=True, system_prompt="plan it", plans=["x"],
                           height=16, width=16)
  with pytest.raises(ValueError, match="generation think system prompt"):  # never a built-in wording
    sampling.text_to_image(params, None, tok, prompts, cfg=cfg, think=True, height=16, width=16)

  plain = sampling.text_to_image(params, None, tok, prompts, cfg=cfg, height=16, width=16)
  gen, cfg_text, cfg_img = seen["contexts"]
  assert plain.think_texts is None
  np.testing.assert_array_equal(np.asarray(cfg_text.kv_len), [0, 0])  # plain T2I: empty text-dropped context
  np.testing.assert_array_equal(np.asarray(gen.kv_len), p_lens)
  np.testing.assert_array_equal(np.asarray(cfg_img.kv_len), p_lens)


def test_text_to_image_seeded_per_image(tiny_params, tiny_cfg):
  """The same (seed, image id) gives the same image in any batch position and company; another seed differs."""
  params, params_ae, cfg = tiny_params["bagel"], tiny_params["ae"], tiny_cfg
  tok = CharTokenizer()
  kw = dict(cfg=cfg, height=16, width=16, num_timesteps=3, cfg_text_scale=3.0, text_budget=16)
  first = sampling.text_to_image(params, params_ae, tok, ["a cat", "a dog"], seeds=[7, 8], image_ids=[0, 1], **kw)
  second = sampling.text_to_image(params, params_ae, tok, ["a dog", "a dog"], seeds=[8, 9], image_ids=[1, 1], **kw)
  assert first.images.dtype == np.uint8 and first.images.shape == (2, 16, 16, 3)
  diff = np.abs(first.images[1].astype(int) - second.images[0].astype(int))
  assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # equal (up to float rounding)
  assert np.abs(second.images[1].astype(int) - second.images[0].astype(int)).mean() > 1.0
  x = [sampling.initial_noise(sampling.prompt_keys(s, i), cfg, (2, 2)) for s, i in (([7, 8], [0, 1]), ([8], [1]))]
  np.testing.assert_array_equal(np.asarray(x[0][1]), np.asarray(x[1][0]))


def test_prompt_keys_one_call_equals_fold_in_per_key():
  """`prompt_keys` folds a batch's ids in one jitted call: the keys (hence the images) of the per-key loop."""
  ids = [0, 1, 5, 123456789, 2 ** 31 - 1]
  for seed in (0, 3, 2024):
    want = np.stack([np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), i)) for i in ids])
    np.testing.assert_array_equal(np.asarray(sampling.prompt_keys(seed, ids)), want)
  np.testing.assert_array_equal(np.asarray(sampling.prompt_keys([4, 5], [7, 8])),
                                np.stack([np.asarray(jax.random.fold_in(jax.random.PRNGKey(s), i)) for s, i in ((4, 7), (5, 8))]))
