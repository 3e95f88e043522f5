"""Grouped-query attention over packed sequences, masked from token metadata (BAGEL's
packed-sequence mask rule, docs/bagel.md "Packed sequence layout and attention mask").

Query head h uses kv head h // (Hq / Hkv) (consecutive query heads share a kv head); scale
1/sqrt(d); scores and softmax in fp32; no dropout. A query with no visible key (padding) returns 0,
never NaN.

Implementations of the same function (`attention(..., impl=)`; `resolve_impl` turns a config's
choice, `auto` included, into one of them for a platform):
* `dense`: one [B, H, Nq, Nk] score tensor; simplest, for short sequences and the reference of the
  others.
* `chunked`: query blocks through `lax.map`, each block's mask built from metadata, so memory is
  O(block * Nk) instead of O(Nq * Nk); each block is rematerialised in the backward pass so
  gradients do not store the scores of all blocks either.
* `xla`: `chunked` with the softmax's row maximum under `stop_gradient` (the softmax does not depend
  on the
  shift, so gradients are the same; the backward pass no longer routes a gradient through the max).
* `splash`: Pallas TPU splash attention with a dynamic mask built from the metadata: blocks with no
  visible
  key are skipped, so BAGEL's block-sparse mask costs about its density. Pallas kernels cannot be
  partitioned by GSPMD: under a mesh (`jax.set_mesh`) the kernel runs per shard through
  `jax.shard_map`, rows over the mesh's batch axes and heads over `tensor` where they divide.
  (Splash's static mask + segment ids mode does not fit: within a sample the split boundaries move
  with each prompt's length, so no single static mask serves every row; it would take fixed
  per-sample text budgets in the packing.)
* `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` with the mask as a dense bias (no
  block
  skipping); bf16/fp16 only, other dtypes take XLA's path of the same call. Per shard like `splash`.
* `tokamax`: `tokamax.dot_product_attention` (GPU Pallas kernels; needs Python >= 3.12 and jax >=
  0.11.1),
  imported only when chosen. Per shard like `splash`.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from srum_jax.models.packing import TokenMeta, attention_mask

IMPLS = ("dense", "chunked", "xla", "splash", "cudnn", "tokamax")
CONFIG_CHOICES = ("auto",) + IMPLS  # model.attn_impl
# The splash kernel run by the Pallas interpreter (tests on CPU); not a config choice.
SPLASH_INTERPRET = "splash_interpret"
KERNELS = ("splash", SPLASH_INTERPRET, "cudnn", "tokamax")
GPU_PLATFORMS = ("gpu", "cuda")
# Mesh axes the kernels' rows and heads are split over (sharding.DEFAULT_RULES: batch -> data, fsdp;
# heads -> tensor).
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
LANES = 128  # splash blocks are multiples of the TPU lane width
_KERNEL_MESH = contextvars.ContextVar("kernel_mesh", default=None)

_NEG = -1e30  # finite "minus infinity": keeps fully-masked rows NaN-free


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                     stop_max_grad: bool = False) -> jax.Array:
  """q [B, Nq, Hq, d], k/v [B, Nk, Hkv, d], mask bool [B, Nq, Nk] -> [B, Nq, Hq, d] in q's dtype.

  stop_max_grad: no gradient through the row maximum subtracted before `exp` (same gradients, less
  work).
  """
  B, Nq, Hq, d = q.shape
  Hkv = k.shape[2]
  if Hq % Hkv:
    raise ValueError(f"query heads {Hq} not a multiple of kv heads {Hkv}")
  qg = q.reshape(B, Nq, Hkv, Hq // Hkv, d)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
  s = s.astype(jnp.float32) * (1.0 / math.sqrt(d))
  m = mask[:, None, None, :, :]
  s = jnp.where(m, s, _NEG)
  mx = jnp.max(s, axis=-1, keepdims=True)
  if stop_max_grad:
    mx = jax.lax.stop_gradient(mx)
  e = jnp.where(m, jnp.exp(s - mx), 0.0)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  p = e / jnp.where(denom > 0, denom, 1.0)
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o.reshape(B, Nq, Hq, d).astype(q.dtype)


def _pad_meta(meta: TokenMeta, n: int) -> TokenMeta:
  """Append n padding slots (sample_id -1) along the token axis."""
  def pad(x, value):
    return jnp.pad(x, ((0, 0), (0, n)), constant_values=value)

  return TokenMeta(
      sample_id=pad(meta.sample_id, -1), split_id=pad(meta.split_id, 0), mode=pad(meta.mode, 0),
      index=pad(meta.index, 0), position=pad(meta.position, 0), is_gen=pad(meta.is_gen, False))


def _pad_tokens(x: jax.Array, n: int) -> jax.Array:
  """Append n zero slots along axis 1."""
  return jnp.pad(x, ((0, 0), (0, n)) + ((0, 0),) * (x.ndim - 2)) if n else x


def _zero_empty_rows(out: jax.Array, mask: jax.Array) -> jax.Array:
  """0 where a query sees no key (kernels fill such rows with a uniform average or leave them
  undefined)."""
  return jnp.where(jnp.any(mask, axis=-1)[..., None, None], out, 0).astype(out.dtype)


def _chunked(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, block_q: int,
             stop_max_grad: bool) -> jax.Array:
  B, Nq, Hq, d = q.shape
  if Nq <= block_q:
    return masked_attention(q, k, v, attention_mask(q_meta, k_meta), stop_max_grad=stop_max_grad)
  nb = -(-Nq // block_q)
  pad = nb * block_q - Nq
  q, q_meta = _pad_tokens(q, pad), _pad_meta(q_meta, pad)

  def blocks(x):  # [B, nb*bq, ...] -> [nb, B, bq, ...]
    return jnp.moveaxis(x.reshape(B, nb, block_q, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def one_block(args):
    qb, mb = args
    return masked_attention(qb, k, v, attention_mask(mb, k_meta), stop_max_grad=stop_max_grad)

  out = jax.lax.map(one_block, (blocks(q), jax.tree.map(blocks, q_meta)))
  out = jnp.moveaxis(out, 0, 1).reshape(B, nb * block_q, Hq, d)
  return out[:, :Nq]


def _per_window(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, window: int, attend: Callable):
  """`attend` on each window of `window` slots as a row of its own; [B, N, ...] in and out."""
  B, N = q.shape[:2]
  if k.shape[1] != N or N % window:
    raise ValueError(f"window attention needs self-attention over rows of a multiple of "
                     f"{window} slots; got {N} queries and {k.shape[1]} keys")

  def cut(x):
    return x.reshape((B * (N // window), window) + x.shape[2:])

  out = attend(cut(q), cut(k), cut(v), jax.tree.map(cut, q_meta), jax.tree.map(cut, k_meta))
  return out.reshape(q.shape[:3] + out.shape[3:])


# ----------------------------------------------------------------------------------------------
# Kernels: splash (TPU), cuDNN and tokamax (GPU), each run per shard of the mesh


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _splash_local(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block: int,
                  interpret: bool) -> jax.Array:
  """Splash attention on one shard: both token axes padded to whole blocks, one dynamic mask per
  row."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  Nq, d, Nk = q.shape[1], q.shape[3], k.shape[1]
  bq, bkv = min(block, _round_up(Nq, LANES)), min(block, _round_up(Nk, LANES))
  pq, pk = _round_up(Nq, bq) - Nq, _round_up(Nk, bkv) - Nk
  q, k, v = _pad_tokens(q, pq), _pad_tokens(k, pk), _pad_tokens(v, pk)
  # padding slots see and are seen by nothing
  mask = attention_mask(_pad_meta(q_meta, pq), _pad_meta(k_meta, pk))
  # One fused backward kernel (dq, dk and dv from one recomputation of the scores: 5 block matmuls
  # instead of 3 + 4 in separate dq and dkv kernels); dq is summed over the kv blocks outside it.
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                            block_kv_dkv=bkv, block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)

  def one_row(q, k, v, row_mask):  # q [Hq, Nq, d], k/v [Hkv, Nk, d], row_mask [Nq, Nk]
    kernel = splash.make_splash_mha(row_mask[None], block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
    # make_splash_mha turns the mask infos' `is_dynamic_mask` flag into an array (a tracer under
    # jit), which the kernel then tests with `if`: put the Python bool back.
    for name in ("fwd_mask_info", "dq_mask_info", "dkv_mask_info"):
      info = getattr(kernel, name)
      if info is not None:
        setattr(kernel, name, info._replace(is_dynamic_mask=True))
    return kernel(q, k, v)

  # The kernel does not scale the scores: scale q (in fp32, then back to q's dtype).
  qs = (q.astype(jnp.float32) * (1.0 / math.sqrt(d))).astype(q.dtype)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, N, H, d] <-> [B, H, N, d]
  out = jax.vmap(one_row)(heads_first(qs), heads_first(k), heads_first(v), mask)
  return _zero_empty_rows(heads_first(out), mask)[:, :Nq]


def _sdpa_local(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *,
                implementation: Optional[str]) -> jax.Array:
  """`jax.nn.dot_product_attention` with the packed mask (cuDNN takes it as a dense bias)."""
  mask = attention_mask(q_meta, k_meta)
  if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
    implementation = "xla"  # cuDNN's flash attention runs bf16 / fp16 only
  out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None],
                                     implementation=implementation)
  return _zero_empty_rows(out, mask)


def _tokamax_local(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta) -> jax.Array:
  tokamax = import_tokamax()
  mask = attention_mask(q_meta, k_meta)
  out = tokamax.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None])
  return _zero_empty_rows(out, mask)


def kernel_axes(mesh, batch: int, kv_heads: int):
  """Mesh axes a kernel's rows and heads are split over: the batch axes (in order) whose product
  divides `batch`, and `tensor` when it divides the kv heads (else heads stay whole: replicated over
  it)."""
  rows, n = [], 1
  for a in BATCH_AXES:
    size = dict(mesh.shape).get(a, 1)
    if size > 1 and batch % (n * size) == 0:
      rows.append(a)
      n *= size
  t = dict(mesh.shape).get(HEAD_AXIS, 1)
  head = HEAD_AXIS if t > 1 and kv_heads % t == 0 else None
  return tuple(rows) or None, head


@contextlib.contextmanager
def kernel_mesh(mesh):
  """While tracing: the (concrete) mesh the kernels run per shard of (`sharding.under_mesh` sets it
  around a function jitted with shardings on that mesh; a concrete mesh, unlike an abstract one
  inside jit, also lowers when the kernel sits in a scanned or rematerialised layer)."""
  token = _KERNEL_MESH.set(mesh)
  try:
    yield
  finally:
    _KERNEL_MESH.reset(token)


def _per_shard(local: Callable, q, k, v, q_meta: TokenMeta, k_meta: TokenMeta) -> jax.Array:
  """Run `local` on each shard of the kernel mesh (`kernel_mesh`) or of the ambient one
  (`jax.set_mesh`), or directly without either."""
  mesh = _KERNEL_MESH.get()
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return local(q, k, v, q_meta, k_meta)
  rows, head = kernel_axes(mesh, q.shape[0], k.shape[2])
  x_spec, meta_spec = P(rows, None, head, None), P(rows, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, meta_spec, meta_spec),
                       out_specs=x_spec, check_vma=False)(q, k, v, q_meta, k_meta)


def splash_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block: int = 512,
                     interpret: bool = False) -> jax.Array:
  """`attention` through the splash kernel (per shard under a mesh); `interpret`: the Pallas
  interpreter."""
  if block % LANES:
    raise ValueError(f"splash attention needs a block that is a multiple of {LANES}, got {block}")
  local = functools.partial(_splash_local, block=block, interpret=interpret)
  return _per_shard(local, q, k, v, q_meta, k_meta)


def sdpa_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *,
                   implementation: Optional[str]) -> jax.Array:
  """`attention` through `jax.nn.dot_product_attention(implementation=...)` ("cudnn"; "xla" / None
  run the same call on any backend), per shard under a mesh."""
  local = functools.partial(_sdpa_local, implementation=implementation)
  return _per_shard(local, q, k, v, q_meta, k_meta)


# ----------------------------------------------------------------------------------------------
# Selection


def import_tokamax():
  """The tokamax module, or ImportError with what it needs."""
  try:
    return importlib.import_module("tokamax")
  except ImportError as e:
    raise ImportError(
        f"attn_impl 'tokamax' needs the tokamax package (pip install tokamax; Python >= 3.12, "
        f"jax >= 0.11.1): {e}") from None


def tokamax_available() -> bool:
  try:
    import_tokamax()
    return True
  except ImportError:
    return False


def resolve_impl(name: str, platform: Optional[str] = None) -> str:
  """A config's `model.attn_impl` -> the implementation to run on `platform` (default: JAX's
  backend).

  auto: tpu -> splash; gpu -> tokamax when importable, else cudnn; other platforms -> xla. An
  explicit choice is checked against the platform (one clear error line instead of a compiler
  failure later).
  """
  platform = platform or jax.default_backend()
  if name == "auto":
    if platform == "tpu":
      return "splash"
    if platform in GPU_PLATFORMS:
      return "tokamax" if tokamax_available() else "cudnn"
    return "xla"
  if name not in IMPLS and name != SPLASH_INTERPRET:
    raise ValueError(f"unknown attention impl {name!r}; choose one of {CONFIG_CHOICES}")
  if name == "splash" and platform != "tpu":
    raise ValueError(
        f"attn_impl 'splash' is a TPU kernel but the platform is {platform!r}; choose auto or xla")
  if name == "cudnn" and platform not in GPU_PLATFORMS:
    raise ValueError(
        f"attn_impl 'cudnn' needs an NVIDIA GPU but the platform is {platform!r}; choose auto or "
        f"xla"
    )
  if name == "tokamax":
    import_tokamax()
  return name


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_meta: TokenMeta, k_meta: TokenMeta, *,
              impl: str = "dense", block_q: int = 512, window: int = 0) -> jax.Array:
  """GQA attention of q [B, Nq, Hq, d] over k/v [B, Nk, Hkv, d] with the packed-sequence mask from
  metadata.

  impl: one of `IMPLS` or "auto" (see the module docstring; all give the same result). block_q: the
  query block of `chunked` / `xla` and the block of both token axes of `splash` (a multiple of 128).
  Under the kernels (splash, cudnn, tokamax), fewer than 128 queries (a decoding step) take the
  `xla` path: a kernel tile would be mostly padding.
  window > 0 (self-attention over rows packed with `packing.pack(sample_stride=window)`): every
  sample lies inside one window of `window` slots, so no query sees a key of another window, and
  the rows are cut into windows before the attention: the same result for a (N / window)-th of the
  score work.
  """
  if window and window < q.shape[1]:
    return _per_window(q, k, v, q_meta, k_meta, window,
                       functools.partial(attention, impl=impl, block_q=block_q))
  if impl == "auto":
    impl = resolve_impl(impl)
  if impl == "dense":
    return masked_attention(q, k, v, attention_mask(q_meta, k_meta))
  if impl in ("chunked", "xla") or (impl in KERNELS and q.shape[1] < LANES):
    return _chunked(q, k, v, q_meta, k_meta, block_q, stop_max_grad=impl != "chunked")
  if impl in ("splash", SPLASH_INTERPRET):
    return splash_attention(q, k, v, q_meta, k_meta, block=block_q,
                            interpret=impl == SPLASH_INTERPRET)
  if impl == "cudnn":
    return sdpa_attention(q, k, v, q_meta, k_meta, implementation="cudnn")
  if impl == "tokamax":
    return _per_shard(_tokamax_local, q, k, v, q_meta, k_meta)
  raise ValueError(f"unknown attention impl {impl!r}; choose one of {CONFIG_CHOICES}")
