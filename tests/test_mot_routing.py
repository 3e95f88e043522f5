"""MoT routing: capacity-routed experts equal the naive both-experts-then-select reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srum_jax.models import config, params, qwen2_mot
from srum_jax.models.packing import TokenMeta

LLM = config.tiny().llm
B, N = 3, 24


@pytest.fixture(scope="module")
def rand_params():
  """Tiny random LLM params with every leaf perturbed (norm scales and biases non-trivial, und != gen)."""
  p = params.init_params(params.llm_schema(config.tiny()), jax.random.PRNGKey(0))
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _meta(is_gen, used):
  """Rows of two samples (a causal split then a full split) followed by padding after `used[b]` slots."""
  sid = np.full((B, N), -1, np.int32)
  split = np.zeros((B, N), np.int32)
  mode = np.zeros((B, N), np.int32)
  for b, u in enumerate(used):
    h = u // 2
    sid[b, :h], sid[b, h:u] = 0, 1
    split[b, h // 2:h], split[b, h:u] = 1, 2
    split[b, h + (u - h) // 2:u] = 3
    mode[b, h // 2:h] = 1
    mode[b, h + (u - h) // 2:u] = 2
  pos = np.tile(np.arange(N, dtype=np.int32), (B, 1)) % 7
  return TokenMeta(sample_id=jnp.asarray(sid), split_id=jnp.asarray(split), mode=jnp.asarray(mode),
                   index=jnp.asarray(np.tile(np.arange(N, dtype=np.int32), (B, 1))), position=jnp.asarray(pos),
                   is_gen=jnp.asarray(is_gen & (sid >= 0)))


_fwd = jax.jit(qwen2_mot.decoder_forward,
               static_argnames=("cfg", "und_capacity", "gen_capacity", "attn_impl", "remat", "remat_policy",
                                "routing", "block_q"))

PATTERNS = ["random", "all_und", "all_gen", "blocks"]


def _is_gen(pattern, rng):
  if pattern == "random":
    return rng.random((B, N)) < 0.5
  if pattern == "all_und":
    return np.zeros((B, N), bool)
  if pattern == "all_gen":
    return np.ones((B, N), bool)
  g = np.zeros((B, N), bool)
  g[:, 5:15] = True
  return g


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("slack", [0, 3])
def test_routed_equals_naive(rand_params, pattern, slack):
  rng = np.random.default_rng(PATTERNS.index(pattern))
  meta = _meta(_is_gen(pattern, rng), used=[N, N - 5, N - 9])
  real = np.asarray(meta.sample_id) >= 0
  n_gen = (np.asarray(meta.is_gen) & real).sum(1)
  n_und = (~np.asarray(meta.is_gen) & real).sum(1)
  und_cap, gen_cap = int(n_und.max()) + slack, int(n_gen.max()) + slack  # slack 0: exactly the largest count
  if pattern == "all_und" and slack == 0:
    assert gen_cap == 0  # the gen expert is skipped entirely
  if pattern == "all_gen" and slack == 0:
    assert und_cap == 0
  x = jnp.asarray(rng.normal(size=(B, N, LLM.hidden_size)).astype(np.float32))
  ref = _fwd(rand_params, x, meta, cfg=LLM, und_capacity=0, gen_capacity=0, routing="naive")
  got = _fwd(rand_params, x, meta, cfg=LLM, und_capacity=und_cap, gen_capacity=gen_cap)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)
  assert not np.asarray(got)[~real].any()


def test_route_indices():
  is_gen = np.array([[0, 1, 1, 0, 0, 1], [1, 1, 0, 0, 0, 0]], bool)
  sid = np.array([[0, 0, 0, 0, 0, -1], [0, 0, 0, -1, -1, -1]])
  z = jnp.zeros((2, 6), jnp.int32)
  meta = TokenMeta(sample_id=jnp.asarray(sid), split_id=z, mode=z, index=z, position=z, is_gen=jnp.asarray(is_gen))
  r = jax.jit(qwen2_mot.route, static_argnums=(1, 2))(meta, 4, 3)
  np.testing.assert_array_equal(np.asarray(r.und_index), [[0, 3, 4, 6], [2, 6, 6, 6]])
  np.testing.assert_array_equal(np.asarray(r.gen_index), [[1, 2, 6], [0, 1, 6]])


@pytest.mark.slow
def test_routed_gradients_chunked_attention_and_remat(rand_params):
  rng = np.random.default_rng(7)
  meta = _meta(rng.random((B, N)) < 0.4, used=[N, N - 4, N - 11])
  x = jnp.asarray(rng.normal(size=(B, N, LLM.hidden_size)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(B, N, LLM.hidden_size)).astype(np.float32))
  caps = dict(und_capacity=N, gen_capacity=N)

  def loss(p, x, **kw):
    return jnp.sum(w * qwen2_mot.decoder_forward(p, x, meta, cfg=LLM, **caps, **kw))

  g_ref = jax.jit(jax.grad(lambda p, x: loss(p, x, routing="naive"), argnums=(0, 1)))(rand_params, x)
  g_rt = jax.jit(jax.grad(lambda p, x: loss(p, x, attn_impl="chunked", block_q=8, remat=True,
                                             remat_policy="nothing_saveable"), argnums=(0, 1)))(rand_params, x)
  for a, b in zip(jax.tree.leaves(g_rt), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
  # Both experts receive gradient (the routing does not cut either path).
  for e in ("und", "gen"):
    assert np.abs(np.asarray(g_rt[0]["layers"][e]["mlp"]["down_proj"]["kernel"])).max() > 0

  h_chunk = _fwd(rand_params, x, meta, cfg=LLM, **caps, attn_impl="chunked", block_q=8)
  h_dense = _fwd(rand_params, x, meta, cfg=LLM, **caps)
  np.testing.assert_allclose(np.asarray(h_chunk), np.asarray(h_dense), atol=1e-5, rtol=1e-5)


def test_bf16_compute_dtype(rand_params):
  rng = np.random.default_rng(3)
  meta = _meta(rng.random((B, N)) < 0.5, used=[N, N, N - 2])
  x = rng.normal(size=(B, N, LLM.hidden_size)).astype(np.float32)
  h32 = _fwd(rand_params, jnp.asarray(x), meta, cfg=LLM, und_capacity=N, gen_capacity=N)
  h16 = _fwd(rand_params, jnp.asarray(x, jnp.bfloat16), meta, cfg=LLM, und_capacity=N, gen_capacity=N)
  assert h16.dtype == jnp.bfloat16
  err = np.abs(np.asarray(h16, np.float32) - np.asarray(h32))
  assert np.isfinite(err).all() and err.mean() < 0.05, err.mean()
