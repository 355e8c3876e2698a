"""The C++ decode kernels (ops/decode_kernels.py) against numpy: the matmul dequantizes with the
formula in ops/quantized.py's docstring (written again here in numpy) and multiplies in float64; the
attention is a softmax per head over the visible slots."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_gguf_export import tiny_llama

from lmjax import model
from lmjax.model import quantize
from lmjax.ops import decode_kernels, quantized


def numpy_weight(values, scale, offset, bits, group_size):
  """w[n, k] = q[n, k] * scale[n, k // G] + offset[n, k // G], in float64; int4: element 2i in a
  byte's low nibble, 2i+1 in its high one, both signed."""
  values = np.asarray(values)
  if bits == 32:
    return values.astype(np.float64)
  if bits == 4:
    byte = values.astype(np.int16)
    low = ((byte & 0xF) ^ 8) - 8
    high = byte >> 4
    values = np.stack([low, high], axis=-1).reshape(values.shape[0], 2 * values.shape[1])
  N, K = values.shape
  scale_NK = np.repeat(np.asarray(scale, np.float64), group_size, axis=1)
  offset_NK = 0.0 if offset is None else np.repeat(np.asarray(offset, np.float64), group_size, axis=1)
  return values.astype(np.float64) * scale_NK + offset_NK


def quantized_x(x, block=32):
  """The integer path's x (ops/decode_matmul_int_dots.h): per row, blocks of 32 inputs, xq = rint(x * 127 /
  max|x|) times max|x| / 127, in fp32 as the kernel computes them."""
  x_blocks = x.reshape(x.shape[0], -1, block)
  top = np.abs(x_blocks).max(-1, keepdims=True)
  inverse = np.where(top > 0, np.float32(127) / np.where(top > 0, top, 1), 0).astype(np.float32)
  q = np.rint(x_blocks * inverse)
  return (q.astype(np.float64) * (top / np.float32(127)).astype(np.float64)).reshape(x.shape)


def reference(x, values, scale, offset, bits, group_size):
  """x @ w^T in float64; where the kernel takes the integer path (int8 or int4, groups of a multiple of
  32, rows of a multiple of 64 inputs, on a CPU with AVX-512 VNNI or AVX2) x is quantized as it does, and the
  offsets still see x's exact sums."""
  w = numpy_weight(values, scale, offset, bits, group_size)
  K = x.shape[1]
  integer = decode_kernels.rounds_int8_activations()
  if not (integer and bits in (8, 4) and group_size % 32 == 0 and K % 64 == 0):
    return x.astype(np.float64) @ w.T
  w_scaled = numpy_weight(values, scale, None, bits, group_size)
  y = quantized_x(x) @ w_scaled.T
  if offset is not None:
    offset_NK = np.repeat(np.asarray(offset, np.float64), group_size, axis=1)
    y += x.astype(np.float64) @ offset_NK.T
  return y


def random_weight(rng, N, K, bits, group_size, with_offset, scale_dtype):
  if bits == 32:
    return rng.standard_normal((N, K)).astype(np.float32), None, None
  high = 127 if bits == 8 else 7
  q = rng.integers(-high - (bits == 4), high + 1, (N, K)).astype(np.int8)
  values = np.asarray(quantized.pack_int4(q)) if bits == 4 else q
  scale = (rng.uniform(0.5, 1.5, (N, K // group_size)) / high).astype(scale_dtype)
  offset = rng.uniform(-0.1, 0.1, (N, K // group_size)).astype(scale_dtype) if with_offset else None
  return values, scale, offset


def kernel(x, values, scale, offset, bits, group_size):
  call = lambda x, v, s, o: decode_kernels.matmul(x, [(v, s, o)], bits, group_size)[0]
  return np.asarray(jax.jit(call)(x, values, scale, offset))


pytestmark = pytest.mark.skipif(
  os.environ.get("LMJAX_DECODE_KERNEL") == "0", reason="LMJAX_DECODE_KERNEL=0 turns the kernels off"
)


def test_the_kernel_builds_here():
  """Where a C++ compiler exists (as on CI), decoding must get the kernel, not the fallback."""
  assert os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++"), "no C++ compiler here"
  assert decode_kernels.available()


# (bits, group size, offset): fp32; int8 per row and in groups (Q8_0); int4 with and without offset
# (Q4_1, Q4_0); a group that is not a multiple of 32 takes the dequantize-into-buffer path.
KINDS = [
  (32, None, False),
  (8, None, False),
  (8, 32, False),
  (8, 64, True),
  (4, 32, True),
  (4, 32, False),
  (4, 64, True),
  (8, 8, True),
]


@pytest.mark.parametrize("bits,group_size,with_offset", KINDS)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 16])
def test_matches_numpy(bits, group_size, with_offset, M):
  rng = np.random.default_rng(M * 100 + bits)
  N, K = 37, 128  # N not a multiple of the kernel's 16-row blocks
  G = group_size or K
  values, scale, offset = random_weight(rng, N, K, bits, G, with_offset, np.float32)
  x = rng.standard_normal((M, K)).astype(np.float32)
  want = reference(x, values, scale, offset, bits, G)
  np.testing.assert_allclose(kernel(x, values, scale, offset, bits, G), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 2])
def test_rows_of_96_inputs_convert_in_registers(bits, M):
  """int8 and int4 in groups of 32 over 96 inputs: the fused one-pass path (the integer path needs rows
  of a multiple of 64), exact against dequantize-then-matmul."""
  rng = np.random.default_rng(M + bits)
  values, scale, offset = random_weight(rng, 21, 96, bits, 32, True, np.float32)
  x = rng.standard_normal((M, 96)).astype(np.float32)
  want = x.astype(np.float64) @ numpy_weight(values, scale, offset, bits, 32).T
  np.testing.assert_allclose(kernel(x, values, scale, offset, bits, 32), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_groups_that_straddle_a_64_input_chunk(bits):
  """Groups of 96 over 192 inputs: the integer path's second 64-input chunk has its halves in two groups."""
  rng = np.random.default_rng(bits)
  values, scale, offset = random_weight(rng, 13, 192, bits, 96, True, np.float16)
  x = rng.standard_normal((3, 192)).astype(np.float32)
  want = reference(x, values, scale, offset, bits, 96)
  np.testing.assert_allclose(kernel(x, values, scale, offset, bits, 96), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,scale_dtype", [(8, np.float32), (4, np.float16)])
def test_rows_of_more_than_16_groups_with_offsets(bits, scale_dtype):
  """20 groups of 32 a row (as SmolLM2's 576-input rows have 18): offsets are summed 16 groups at a
  time, then the rest."""
  rng = np.random.default_rng(bits)
  values, scale, offset = random_weight(rng, 9, 640, bits, 32, True, scale_dtype)
  x = rng.standard_normal((2, 640)).astype(np.float32)
  want = reference(x, values, scale, offset, bits, 32)
  np.testing.assert_allclose(kernel(x, values, scale, offset, bits, 32), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("K", [36, 40, 100])
def test_inputs_not_a_multiple_of_the_lanes(K):
  """fp32 and one-group int8 rows whose length leaves a tail after the vector loop (16 lanes with
  AVX-512, 8 otherwise)."""
  rng = np.random.default_rng(K)
  x = rng.standard_normal((4, K)).astype(np.float32)
  for bits in (32, 8):
    values, scale, offset = random_weight(rng, 20, K, bits, K, False, np.float32)
    want = x.astype(np.float64) @ numpy_weight(values, scale, offset, bits, K).T
    np.testing.assert_allclose(kernel(x, values, scale, offset, bits, K), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 5])
def test_integer_extremes_are_exact(bits, M):
  """Weights at the ends of int8 (-128, 127) or int4 (-8, 7) against inputs that round to +-127: the
  integer path's products at their largest (AVX2's vpmaddubsw adds two into a saturating int16, |w| * xq
  up to 2 * 128 * 127 = 32512; VNNI biases w by 128, int4 by 8). Exact in float64 for quantized x."""
  rng = np.random.default_rng(M + bits)
  N, K = 12, 128
  low, high = (-128, 127) if bits == 8 else (-8, 7)
  q = rng.choice(np.array([low, high, -high, 0], np.int8), size=(N, K))
  q[0] = low  # a whole row at the bottom
  values = np.asarray(quantized.pack_int4(q)) if bits == 4 else q
  scale = np.full((N, K // 32), 0.01, np.float32)
  x = rng.choice(np.array([-1.0, 1.0], np.float32), size=(M, K))  # every xq is +-127
  want = reference(x, values, scale, None, bits, 32)
  np.testing.assert_allclose(want[:, 0], 0.01 * low * x.sum(1), rtol=1e-6, atol=1e-9)  # the reference itself
  np.testing.assert_allclose(kernel(x, values, scale, None, bits, 32), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_a_nan_input_gives_nan(bits):
  """A NaN anywhere in a row of x makes that row's products NaN on every path, as a float matmul's
  (the integer path's max |x| per block would otherwise skip it); other rows stay finite."""
  rng = np.random.default_rng(bits)
  values, scale, offset = random_weight(rng, 8, 128, bits, 32, False, np.float32)
  x = rng.standard_normal((3, 128)).astype(np.float32)
  x[1, 5] = np.nan
  y = kernel(x, values, scale, offset, bits, 32)
  assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_float16_scales_as_gguf_stores_them(bits):
  rng = np.random.default_rng(bits)
  values, scale, offset = random_weight(rng, 24, 64, bits, 32, bits == 4, np.float16)
  x = rng.standard_normal((2, 64)).astype(np.float32)
  want = reference(x, values, scale, offset, bits, 32)
  np.testing.assert_allclose(kernel(x, values, scale, offset, bits, 32), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_large_weight_split_over_threads(bits):
  """Above the kernel's 128 KiB threshold the output rows are split into chunks for helper threads:
  values stay right whatever thread takes a chunk (this does not check that a helper ran)."""
  rng = np.random.default_rng(7)
  N, K = 1030, 256
  values, scale, offset = random_weight(rng, N, K, bits, 32, bits == 4, np.float32)
  x = rng.standard_normal((3, K)).astype(np.float32)
  want = reference(x, values, scale, offset, bits, 32)
  np.testing.assert_allclose(kernel(x, values, scale, offset, bits, 32), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_a_row_gives_the_same_result_in_any_batch(bits):
  """A decode step's row does not depend on the other rows: fp32 always, int8 and int4 where they take
  the integer path for every row count (elsewhere 1-2 rows convert in registers, more go through a
  buffer, and the two round differently)."""
  if bits != 32 and not decode_kernels.rounds_int8_activations():
    pytest.skip("without integer dots (AVX-512 VNNI or AVX2), 1-2 rows and more rows round differently")
  rng = np.random.default_rng(3)
  values, scale, offset = random_weight(rng, 80, 128, bits, 64, False, np.float32)
  x = rng.standard_normal((16, 128)).astype(np.float32)
  batch = kernel(x, values, scale, offset, bits, 64)
  for m in (0, 5, 15):
    np.testing.assert_array_equal(kernel(x[m : m + 1], values, scale, offset, bits, 64)[0], batch[m])


@pytest.mark.parametrize("bits,group_size,with_offset", [(32, None, False), (8, 32, False), (4, 32, True)])
@pytest.mark.parametrize("M", [1, 3])
def test_several_weights_in_one_call(bits, group_size, with_offset, M):
  """Weights of different widths that share x (q, k and v; w1 and w3), in one call: each result is
  that weight's product; sizes above the threading threshold, so chunks of different weights run on
  different threads."""
  rng = np.random.default_rng(M + bits)
  K = 512
  G = group_size or K
  weights = [random_weight(rng, N, K, bits, G, with_offset, np.float32) for N in (200, 37, 700)]
  x = rng.standard_normal((M, K)).astype(np.float32)
  got = jax.jit(lambda x, ws: decode_kernels.matmul(x, ws, bits, G))(x, weights)
  assert len(got) == 3
  for y, (values, scale, offset) in zip(got, weights):
    want = reference(x, values, scale, offset, bits, G)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)


def test_one_call_with_an_empty_weight_and_mixed_offsets():
  """A call's weights may differ in rows (one has none) and in having offsets: each result is its own."""
  rng = np.random.default_rng(5)
  weights = [
    random_weight(rng, N, 128, 4, 32, with_offset, np.float32)
    for N, with_offset in ((30, False), (0, True), (20, True))
  ]
  x = rng.standard_normal((2, 128)).astype(np.float32)
  got = jax.jit(lambda x, ws: decode_kernels.matmul(x, ws, 4, 32))(x, weights)
  assert got[1].shape == (2, 0)
  for y, (values, scale, offset) in zip(got, weights):
    np.testing.assert_allclose(
      np.asarray(y), reference(x, values, scale, offset, 4, 32), rtol=1e-5, atol=1e-4
    )


def test_a_quantized_decode_step_reads_qkv_and_w1_w3_in_one_call_each():
  """Per layer: q/k/v, wo, w1/w3 and w2, one kernel call each; plus the tied head."""
  cfg, params = tiny_llama(True)
  cfg, params = quantize.for_decoding(cfg, quantize.quantize_params(params, "int8"))
  step = lambda p, c, t: model.Transformer(cfg).apply({"params": p}, t, cache=c)
  hlo = jax.jit(step).lower(params, model.init_cache(cfg, 1, 32), jnp.zeros((1, 1), jnp.int32)).as_text()
  assert sum("@lmjax_decode_matmul(" in line for line in hlo.splitlines()) == 4 * cfg.n_layers + 1


def test_quantized_matmuls_groups_weights_by_kind():
  """quantized.matmuls: weights of one kind share a kernel call; another kind gets its own call, and a
  weight the kernel does not take (bf16) goes to XLA; every result is its weight's product."""
  rng = np.random.default_rng(0)
  w_NK = [rng.standard_normal((N, 64)).astype(np.float32) for N in (48, 16, 32, 24)]
  ws = [
    quantized.quantize(w_NK[0], 8, 32, (64, 48), 1),
    quantized.quantize(w_NK[1], 8, 32, (64, 16), 1),
    quantized.quantize(w_NK[2], 4, 32, (64, 32), 1, asymmetric=True),
    quantized.transposed(jnp.asarray(w_NK[3], jnp.bfloat16), (64, 24), 1),
  ]
  x = rng.standard_normal((2, 64)).astype(np.float32)
  hlo = jax.jit(quantized.matmuls).lower(x, ws).as_text()
  calls = [line for line in hlo.splitlines() if "@lmjax_decode_matmul(" in line]
  # int4: x, values, scale, offset; int8: x and two weights' values and scales (their offsets: one empty
  # constant, not an argument).
  assert sorted(line.count("%arg") for line in calls) == [4, 5]
  got = jax.jit(quantized.matmuls)(x, ws)
  for y, w in zip(got, ws):
    want = x.astype(np.float64) @ np.asarray(quantized.dequantize(w), np.float64).T
    tolerance = 0.05 if w.is_integer and decode_kernels.rounds_int8_activations() else 1e-4
    np.testing.assert_allclose(np.asarray(y), want, rtol=tolerance, atol=tolerance * 10)


def test_quantized_matmul_uses_the_kernel_for_decode_rows_only():
  """Up to MAX_ROWS rows; weights in tiles (integer-dot builds only) up to MAX_TILED_ROWS."""
  w = quantized.quantize(np.ones((64, 64), np.float32), 8, 32, (64, 64), 1)
  ws = [(w, decode_kernels.MAX_ROWS)]
  if decode_kernels.rounds_int8_activations():
    ws.append((quantized.tile(w), decode_kernels.MAX_TILED_ROWS))
  for w, limit in ws:
    hlo = lambda M, w=w: jax.jit(quantized.matmul).lower(jnp.ones((M, 64)), w).as_text()
    assert "lmjax_decode_matmul" in hlo(limit)
    assert "lmjax_decode_matmul" not in hlo(limit + 1)


def test_build_failure_names_the_compiler_problem(monkeypatch, tmp_path):
  monkeypatch.setenv("LMJAX_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises((RuntimeError, OSError), match="no-such-compiler"):
    decode_kernels.build()
  assert not list((tmp_path / "kernels").glob("*.so")), "a failed build must leave no library behind"


@pytest.mark.parametrize("window", [None, 5])
# GQA groups of 1-4 query heads per key load (and 5 = 4 + 1), head sizes in and out of registers (256:
# several blocks of registers); the second case is threaded.
@pytest.mark.parametrize(
  "B,K,G,H,S",
  [
    (3, 2, 3, 16, 45),
    (4, 3, 3, 64, 256),
    (3, 1, 4, 128, 40),
    (3, 2, 2, 32, 33),
    (3, 1, 5, 64, 20),
    (3, 1, 2, 256, 24),
  ],
)
def test_attention_matches_numpy(B, K, G, H, S, window):
  """One query per row over keys [B, K, H, S] / values [B, K, S, H] with GQA; rows: a prefix of filled
  slots, a ring whose positions wrap, random empty slots, and an empty row (zeros)."""
  rng = np.random.default_rng(S)
  q = rng.standard_normal((B, K * G, H)).astype(np.float32) / np.sqrt(H)
  k = rng.standard_normal((B, K, H, S)).astype(np.float32)
  v = rng.standard_normal((B, K, S, H)).astype(np.float32)
  k_pos = np.full((B, S), -1, np.int32)
  k_pos[0, :20] = np.arange(20)
  k_pos[1] = (np.arange(S) - 7) % S + S  # a full ring: slot s holds position S + (s - 7) mod S
  k_pos[2] = np.where(rng.random(S) < 0.5, np.arange(S), -1)
  q_pos = np.array([15, 2 * S - 1, S - 1] + [0] * (B - 3), np.int32)  # row 0: slots 16-19 not yet seen
  got = np.asarray(
    jax.jit(lambda *a: decode_kernels.attention(*a, window))(q, k, v, q_pos, k_pos), np.float64
  )
  for b, n in np.ndindex(B, K * G):
    seen = (k_pos[b] >= 0) & (k_pos[b] <= q_pos[b])
    if window is not None:
      seen &= q_pos[b] - k_pos[b] < window
    if not seen.any():
      np.testing.assert_array_equal(got[b, n], 0.0)
      continue
    scores = q[b, n].astype(np.float64) @ k[b, n // G].astype(np.float64)
    p = np.where(seen, np.exp(scores - scores[seen].max()), 0.0)
    want = (p / p.sum()) @ v[b, n // G].astype(np.float64)
    np.testing.assert_allclose(got[b, n], want, rtol=1e-5, atol=1e-5)
