"""benchmarks/hlo_ops.py: FLOPs, bytes, loop trip counts and op categories read from compiled HLO
text."""

import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import hlo_ops  # noqa: E402


def _compiled_text(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def test_loop_bodies_are_counted_per_iteration():
  """A fori_loop of 7 matmuls: XLA's cost analysis counts the body once, the walk counts it 7
  times."""
  a = jnp.ones((64, 96), jnp.float32)
  b = jnp.ones((96, 96), jnp.float32)

  def fn(a, b):
    return jax.lax.fori_loop(0, 7, lambda i, x: jnp.tanh(x @ b), a)

  lowered = jax.jit(fn).lower(a, b)
  once = lowered.compile().cost_analysis()
  once = once[0] if isinstance(once, (list, tuple)) else once
  s = hlo_ops.split(lowered.compile().as_text(), 1e12, 1e11, 1e10)
  per_matmul = 2 * 64 * 96 * 96
  assert s.flops["matmul/convolution"] == 7 * per_matmul
  assert s.loop_extra["flops"] == 6 * per_matmul
  np.testing.assert_allclose(float(once["flops"]) - 64 * 96 * 2, per_matmul,
                             rtol=0.05)  # (+ tanh etc.)


def test_trip_count_with_a_start_and_a_step():
  """A while loop from 3 to < 20 in steps of 4 runs 5 times (3, 7, 11, 15, 19)."""
  x = jnp.ones((32, 32), jnp.float32)

  def fn(x):
    def body(c):
      i, y = c
      return i + 4, y @ y
    return jax.lax.while_loop(lambda c: c[0] < 20, body, (jnp.int32(3), x))[1]

  s = hlo_ops.split(_compiled_text(fn, x), 1e12, 1e11, 1e10)
  assert s.flops["matmul/convolution"] == 5 * 2 * 32 ** 3


def test_categories_of_a_small_program():
  """A matmul, a transpose, a gather and an elementwise op land in their categories."""
  x = jnp.ones((128, 256), jnp.float32)
  w = jnp.ones((256, 64), jnp.float32)
  idx = jnp.arange(16, dtype=jnp.int32) * 3

  def fn(x, w, idx):
    y = jnp.sin(x @ w)
    return y.T.copy(), jnp.take(y, idx, axis=0), jnp.exp(x) * 2.0

  s = hlo_ops.split(_compiled_text(fn, x, w, idx), 1e12, 1e11, 1e10)
  assert s.flops["matmul/convolution"] == 2 * 128 * 256 * 64
  assert s.bytes["matmul/convolution"] > 0 and s.bytes["elementwise fusion"] > 0
  assert sum(s.flops.values()) == s.flops["matmul/convolution"]


def test_valid_taps_match_brute_force():
  for in_size, size, pad, stride, rd in itertools.product([1, 3, 7, 16], [1, 2, 5, 16],
                                                          [0, 1, 4, 15], [1, 2], [1, 2, 3]):
    w = dict(size=size, pad=pad, stride=stride, lhs_dilate=1, rhs_dilate=rd)
    out = (in_size + 2 * pad - ((size - 1) * rd + 1)) // stride + 1
    if out <= 0:
      continue
    want = sum(
        1 for o in range(out) for j in range(size) if 0 <= o * stride + j * rd - pad < in_size)
    assert hlo_ops._valid_taps(in_size, out, w) == want


def test_convolution_flops_count_real_taps():
  """XLA TPU writes some batched matmuls as a convolution whose window spans a padded batch dim (one
  real tap per output): the FLOPs are those of the matmul, not window-size times more."""
  layout = "{(bf16[3584,224,1]{2,1,0}, bf16[16,4096,3584]{2,1,0})->bf16[16,4096,224]{2,1,0}}"
  conv = ("convolution(%a, %b), window={size=16 pad=15_15 rhs_reversal=1}, "
          "dim_labels=fb0_0oi->0fb")
  text = "\n".join([
      "HloModule m, entry_computation_layout=" + layout, "",
      "ENTRY %main (a: bf16[3584,224,1], b: bf16[16,4096,3584]) -> bf16[16,4096,224] {",
      "  %a = bf16[3584,224,1]{2,1,0} parameter(0)",
      "  %b = bf16[16,4096,3584]{2,1,0} parameter(1)",
      "  ROOT %c = bf16[16,4096,224]{2,1,0} " + conv,
      "}", ""])
  s = hlo_ops.split(text, 1e12, 1e11, 1e10)
  assert s.flops["matmul/convolution"] == 2 * 16 * 4096 * 224 * 3584
  assert s.bytes["matmul/convolution"] == 2 * (3584 * 224 + 16 * 4096 * 3584 + 16 * 4096 * 224)


def test_a_conditional_counts_its_costliest_branch():
  """lax.cond between one matmul and three: a run takes one branch, the walk counts the costlier
  one."""
  x = jnp.ones((64, 64), jnp.float32)

  def fn(p, x):
    return jax.lax.cond(p, lambda y: y @ y @ y @ y, lambda y: y @ y, x)

  s = hlo_ops.split(_compiled_text(fn, jnp.bool_(True), x), 1e12, 1e11, 1e10)
  assert s.flops["matmul/convolution"] == 3 * 2 * 64 ** 3
