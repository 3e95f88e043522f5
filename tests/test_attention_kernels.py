"""The attention implementations against `masked_attention` (the dense reference), forward and gradients, on
BAGEL's layouts built by the packing code: general (random splits and modes), T2I (SRUM's rows of prompt +
noise image), T2I with text dropout, understanding (ViT image + text), and a KV-cache shape (fewer queries
than keys). `xla` and the `jax.nn.dot_product_attention` wrapper (the cuDNN path's call, run by XLA here) at
full size; splash in the Pallas interpreter at a tiny size (it is slow). Then the kernels per shard of an
8-device mesh, and the resolver behind `model.attn_impl`."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from test_attention import _random_meta

from srum_jax import defaults, sharding
from srum_jax.engine import loaded_model
from srum_jax.models import attention as attn_lib, config, packing, params, qwen2_mot
from srum_jax.models.packing import Split, TokenMeta
from srum_jax.pipeline import train
from srum_jax.training import train_step

N = 256  # two 128-blocks of splash


def _t2i(seed: int, text_dropout: bool = False) -> TokenMeta:
  """SRUM's layout: rows of [BOS prompt EOS] + one noise image; with text dropout, the text of some samples
  hidden the way the train step does it (its queries then see nothing: output 0)."""
  rng = np.random.default_rng(seed)
  rows = [[[packing.text(int(rng.integers(5, 18))), Split("vae_noise", 64)] for _ in range(n)] for n in (3, 2)]
  meta = packing.to_device(packing.pack(rows, N, text_capacity=N, latent_capacity=N).meta)
  if text_dropout:
    dropped = train_step.drop_text_condition(meta, jax.random.key(seed), 0.5)
    hidden = np.asarray((dropped.sample_id < 0) & (meta.sample_id >= 0))
    assert hidden.any() and not hidden.all()
    meta = dropped
  return meta


def _understanding(seed: int) -> TokenMeta:
  """The judge's layout: ViT image then a causal prompt (several samples per row), and an edit sample."""
  rng = np.random.default_rng(seed)
  und = lambda: [Split("vit", 49), packing.text(int(rng.integers(8, 30)))]  # noqa: E731
  edit = [Split("vae_clean", 16), Split("vit", 16), packing.text(12), Split("vae_noise", 16)]
  rows = [[und(), und(), und()], [edit, und()]]
  return packing.to_device(packing.pack(rows, N, text_capacity=N, vit_capacity=N, latent_capacity=N).meta)


LAYOUTS = {
    "general": lambda: packing.to_device(_random_meta(np.random.default_rng(3), 2, N)),
    "t2i": lambda: _t2i(4),
    "t2i_text_dropout": lambda: _t2i(5, text_dropout=True),
    "understanding": lambda: _understanding(6),
}
ROWS = 2  # per layout; the layouts are stacked into one batch (rows are independent: one compile for all)


def _qkv(seed, B, Nq, Nk, Hq=4, Hkv=2, d=16, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(B, n, h, d)), dtype) for n, h in ((Nq, Hq), (Nk, Hkv), (Nk, Hkv)))


@functools.lru_cache(maxsize=None)
def _case(kv_cache: bool = False):
  """(q, k, v, q_meta, k_meta) of every layout's rows, in LAYOUTS order; with kv_cache the queries are the last
  128 slots of each row and the keys all of them (a prefill over a cache)."""
  metas = [LAYOUTS[name]() for name in LAYOUTS]
  meta = TokenMeta(*(jnp.concatenate(fields, 0) for fields in zip(*metas)))
  B = meta.sample_id.shape[0]
  if not kv_cache:
    return (*_qkv(0, B, N, N), meta, meta)
  q_meta = TokenMeta(*(x[:, N - 128:] for x in meta))
  return (*_qkv(0, B, 128, N), q_meta, meta)


def _fwd_and_grads(fn, q, k, v, q_meta, k_meta):
  """Output and d/d(q, k, v) of sum(sin(out)) (a cotangent that differs per element)."""
  def run(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, q_meta, k_meta), q, k, v)
    return out, vjp(jnp.cos(out.astype(jnp.float32)).astype(out.dtype))
  return jax.jit(run)(q, k, v)


def _reference(q, k, v, q_meta, k_meta):
  return attn_lib.masked_attention(q, k, v, packing.attention_mask(q_meta, k_meta))


def _errors(got, want, relative: bool = False):
  """{layout: [max |error| of out, dq, dk, dv]} (relative: over the reference's largest magnitude); asserts
  that everything is finite."""
  (o, g), (ro, rg) = got, want
  out, ref = [o] + list(g), [ro] + list(rg)
  errs = {}
  for i, name in enumerate(LAYOUTS):
    rows = slice(i * ROWS, (i + 1) * ROWS)
    errs[name] = []
    for a, b in zip(out, ref):
      a, b = np.asarray(a[rows], np.float32), np.asarray(b[rows], np.float32)
      assert np.isfinite(a).all(), name
      errs[name].append(float(np.abs(a - b).max() / (np.abs(b).max() if relative else 1.0)))
  return errs


def _worst(errs) -> float:
  return max(max(e) for e in errs.values())


def _check_padding_rows_zero(out, q_meta, k_meta):
  empty = ~np.asarray(packing.attention_mask(q_meta, k_meta)).any(-1)
  for i, name in enumerate(LAYOUTS):
    assert empty[i * ROWS:(i + 1) * ROWS].any(), name  # every layout has queries that see nothing
  assert not np.asarray(out, np.float32)[empty].any()


def test_xla_and_sdpa_match_masked_attention():
  """`xla` (chunked, stop-gradient max) and the cuDNN path's `jax.nn.dot_product_attention` call (run by XLA):
  fp32 forward and gradients within 1e-5 of the reference on every layout, and on the KV-cache shape."""
  impls = {"xla": functools.partial(attn_lib.attention, impl="xla", block_q=64),
           "sdpa": functools.partial(attn_lib.sdpa_attention, implementation=None)}
  for kv_cache in (False, True):
    case = _case(kv_cache)
    want = _fwd_and_grads(_reference, *case)
    for name, fn in impls.items():
      got = _fwd_and_grads(fn, *case)
      errs = _errors(got, want)
      assert _worst(errs) <= 1e-5, (name, kv_cache, errs)
      _check_padding_rows_zero(got[0], *case[3:])


def test_xla_stop_gradient_max_gives_the_same_gradients():
  """The stop-gradient on the row max changes nothing but the backward graph (blocks of 64 over 256 queries)."""
  case = _case()
  got = _fwd_and_grads(functools.partial(attn_lib.attention, impl="xla", block_q=64), *case)
  chunked = _fwd_and_grads(functools.partial(attn_lib.attention, impl="chunked", block_q=64), *case)
  assert _worst(_errors(got, chunked)) <= 1e-6


SPLASH = functools.partial(attn_lib.splash_attention, block=128, interpret=True)


def test_splash_matches_masked_attention_fp32():
  """Splash (Pallas interpreter, 128-blocks, dynamic mask from the metadata): fp32 forward and gradients within
  1e-5 of the reference on every layout and on the KV-cache shape (measured: <= 4e-6)."""
  for kv_cache in (False, True):
    case = _case(kv_cache)
    got = _fwd_and_grads(SPLASH, *case)
    errs = _errors(got, _fwd_and_grads(_reference, *case))
    assert _worst(errs) <= 1e-5, (kv_cache, errs)
    _check_padding_rows_zero(got[0], *case[3:])


def test_bf16_kernels_are_close_to_the_fp32_reference():
  """bf16 inputs: splash and the sdpa call within 2e-2 of the fp32 reference (output absolute; gradients
  relative to their largest magnitude), no worse than twice the dense reference's own bf16 error."""
  q, k, v, qm, km = _case()
  want = _fwd_and_grads(_reference, q, k, v, qm, km)
  bf = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
  own = _errors(_fwd_and_grads(_reference, *bf, qm, km), want, relative=True)
  for fn in (SPLASH, functools.partial(attn_lib.sdpa_attention, implementation="xla")):
    got = _fwd_and_grads(fn, *bf, qm, km)
    assert got[0].dtype == jnp.bfloat16
    errs = _errors(got, want, relative=True)
    out_abs = _errors(got, want)
    for name in LAYOUTS:
      assert out_abs[name][0] <= 2e-2 and max(errs[name]) <= 2e-2, (fn, name, errs[name], out_abs[name])
      assert max(errs[name]) <= 2 * max(own[name]) + 1e-3, (fn, name, errs[name], own[name])


def test_kernels_run_per_shard_under_a_mesh():
  """Under an ambient mesh (data 2 x fsdp 2 x tensor 2) the kernels run through shard_map, rows over data x
  fsdp and kv heads over tensor; the result and gradients equal the reference."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  metas = [_t2i(7), _understanding(8)]
  meta = TokenMeta(*(jnp.concatenate([a, b], 0) for a, b in zip(*metas)))  # 4 rows
  q, k, v = _qkv(1, 4, N, N)
  assert attn_lib.kernel_axes(mesh.abstract_mesh, 4, 2) == (("data", "fsdp"), "tensor")
  assert attn_lib.kernel_axes(mesh.abstract_mesh, 2, 1) == (("data",), None)
  xs = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  q, k, v = (jax.device_put(x, xs) for x in (q, k, v))
  meta = jax.device_put(meta, NamedSharding(mesh, P(("data", "fsdp"), None)))
  want = _fwd_and_grads(_reference, q, k, v, meta, meta)
  for fn in (SPLASH, functools.partial(attn_lib.sdpa_attention, implementation="xla")):
    got = _fwd_and_grads(sharding.under_mesh(fn, mesh), q, k, v, meta, meta)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5
  assert "shard_map" in str(jax.make_jaxpr(sharding.under_mesh(SPLASH, mesh))(q, k, v, meta, meta))
  sdpa = functools.partial(attn_lib.sdpa_attention, implementation="xla")
  with jax.set_mesh(mesh):  # the inference stages' way (`engine.loaded_model.on_mesh`)
    assert "shard_map" in str(jax.make_jaxpr(sdpa)(q, k, v, meta, meta))
    got = _fwd_and_grads(sdpa, q, k, v, meta, meta)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5
  assert "shard_map" not in str(jax.make_jaxpr(sdpa)(q, k, v, meta, meta))  # no mesh: the kernel as it is


def test_resolver_by_platform_and_errors(monkeypatch):
  assert attn_lib.resolve_impl("auto", "tpu") == "splash"
  assert attn_lib.resolve_impl("auto", "cpu") == "xla"
  assert attn_lib.resolve_impl("auto") == "xla"  # the test backend is the CPU
  assert attn_lib.resolve_impl("auto", "gpu") == "cudnn"  # tokamax is not installed here
  monkeypatch.setattr(attn_lib, "tokamax_available", lambda: True)
  assert attn_lib.resolve_impl("auto", "gpu") == "tokamax"
  monkeypatch.undo()
  for name in ("dense", "chunked", "xla"):
    assert attn_lib.resolve_impl(name, "tpu") == attn_lib.resolve_impl(name, "cpu") == name
  assert attn_lib.resolve_impl("splash", "tpu") == "splash"
  assert attn_lib.resolve_impl("cudnn", "gpu") == "cudnn"
  with pytest.raises(ValueError, match="TPU kernel"):
    attn_lib.resolve_impl("splash", "cpu")
  with pytest.raises(ValueError, match="NVIDIA GPU"):
    attn_lib.resolve_impl("cudnn", "tpu")
  with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
    attn_lib.resolve_impl("flash", "cpu")
  if not attn_lib.tokamax_available():
    with pytest.raises(ImportError, match="needs the tokamax package"):
      attn_lib.resolve_impl("tokamax", "gpu")
    q, k, v, qm, km = _case()
    with pytest.raises(ImportError, match="needs the tokamax package"):
      attn_lib.attention(q, k, v, qm, km, impl="tokamax")
  assert set(attn_lib.CONFIG_CHOICES) == {"auto", "xla", "dense", "chunked", "splash", "cudnn", "tokamax"}


def test_stages_resolve_the_config_the_same_way():
  """`model.attn_impl` (default auto) through `loaded_model.attn_impl`: what generate / score / eval get, and the
  train step's options, for this backend or a target platform (the AOT compile for TPU on a CPU host)."""
  c = defaults.base_config()
  assert c.model.attn_impl == "auto"
  assert loaded_model.attn_impl(c) == train.step_options(c).attn_impl == "xla"
  assert loaded_model.attn_impl(c, "tpu") == train.step_options(c, platform="tpu").attn_impl == "splash"
  c.model.attn_impl = "chunked"
  assert loaded_model.attn_impl(c, "tpu") == train.step_options(c).attn_impl == "chunked"
  c.model.attn_impl = "splash"
  with pytest.raises(ValueError, match="TPU kernel"):
    train.step_options(c)


@pytest.mark.slow
def test_decoder_with_splash_per_shard_equals_dense():
  """The MoT decoder (layers scanned, remat, routed experts) with splash on an 8-device mesh, traced under the
  mesh as the train step is (`sharding.under_mesh`): hidden states and parameter gradients equal `dense`."""
  cfg = config.tiny()
  meta = _t2i(9, text_dropout=True)
  p = params.init_params(params.llm_schema(cfg), jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, N, cfg.llm.hidden_size))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})  # rows over data, kv heads over tensor
  x = jax.device_put(x, NamedSharding(mesh, P("data")))
  meta = jax.device_put(meta, NamedSharding(mesh, P("data")))

  def loss(p, impl):
    h = qwen2_mot.decoder_forward(p, x, meta, cfg=cfg.llm, und_capacity=N, gen_capacity=N, attn_impl=impl,
                                  remat=True, block_q=128)
    return jnp.sum(jnp.sin(h)), h

  run = lambda impl: jax.jit(sharding.under_mesh(  # noqa: E731
      jax.grad(functools.partial(loss, impl=impl), has_aux=True), mesh))(p)
  g, h = run(attn_lib.SPLASH_INTERPRET)
  g_ref, h_ref = run("dense")
  np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_decoding_steps_skip_the_kernels():
  """Fewer than 128 queries (one decoded token over a cache) take the xla path under every kernel: splash and
  cuDNN, which cannot run on the CPU, give the reference here."""
  q, k, v, qm, km = _case(kv_cache=True)
  q1, qm1 = q[:, -1:], TokenMeta(*(x[:, -1:] for x in qm))
  want = np.asarray(_reference(q1, k, v, qm1, km))
  for impl in ("splash", "cudnn"):
    np.testing.assert_allclose(np.asarray(attn_lib.attention(q1, k, v, qm1, km, impl=impl)), want, atol=1e-6)
