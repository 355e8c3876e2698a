"""Integer weights stored in tiles of 4 rows (ops/quantized.py `tile`): the byte order against a numpy
statement of it, the same matrix through dequantize and take_rows, and the decode kernel's products from
tiles against numpy (as tests/test_decode_kernels.py computes them)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decode_kernels import random_weight, reference

from lmjax import model
from lmjax.model import quantize
from lmjax.ops import decode_kernels, quantized


def numpy_tiles(values, chunk_bytes):
  """The tiled byte order, written out: tile t, then its chunks c, then its 4 rows, each row's bytes of
  chunk c."""
  N, R = values.shape
  out = []
  for t in range(N // 4):
    for c in range(R // chunk_bytes):
      for j in range(4):
        out.append(values[4 * t + j, c * chunk_bytes : (c + 1) * chunk_bytes])
  return np.concatenate(out).reshape(N, R)


def weight(rng, N, K, bits, group_size, with_offset=False):
  values, scale, offset = random_weight(rng, N, K, bits, group_size, with_offset, np.float32)
  return quantized.QuantizedWeight(
    jnp.asarray(values),
    jnp.asarray(scale),
    None if offset is None else jnp.asarray(offset),
    (K, N),
    1,
    bits,
    group_size,
  )


@pytest.mark.parametrize("bits", [8, 4])
def test_tiles_hold_the_same_matrix(bits):
  rng = np.random.default_rng(bits)
  w = weight(rng, 12, 192, bits, 32, with_offset=bits == 4)
  t = quantized.tile(w)
  assert t.tile_rows == 4 and t.values.shape == w.values.shape
  np.testing.assert_array_equal(np.asarray(t.values), numpy_tiles(np.asarray(w.values), 64 * bits // 8))
  np.testing.assert_array_equal(np.asarray(quantized.row_values(t)), np.asarray(w.values))
  np.testing.assert_array_equal(np.asarray(quantized.dequantize(t)), np.asarray(quantized.dequantize(w)))
  ids = jnp.asarray([[0, 5, 11], [3, 4, 7]])
  np.testing.assert_array_equal(
    np.asarray(quantized.take_rows(t, ids)), np.asarray(quantized.take_rows(w, ids))
  )


def test_tile_refuses_what_the_kernel_cannot_read():
  rng = np.random.default_rng(0)
  for w in (weight(rng, 10, 128, 8, 32), weight(rng, 8, 96, 8, 32), weight(rng, 8, 128, 8, 16)):
    assert not quantized.can_tile(w)
    with pytest.raises(ValueError, match="tile\\(\\) takes integer weights"):
      quantized.tile(w)
  assert not quantized.can_tile(quantized.transposed(rng.standard_normal((8, 128)), (128, 8), 1))


integer_dots_only = pytest.mark.skipif(
  os.environ.get("LMJAX_DECODE_KERNEL") == "0" or not decode_kernels.rounds_int8_activations(),
  reason="tiles are read by the kernel's integer-dot path only (AVX-512 VNNI or AVX2)",
)


@integer_dots_only
@pytest.mark.parametrize(
  "bits,group_size,with_offset", [(8, 64, False), (8, 32, False), (8, None, False), (4, 32, True)]
)
@pytest.mark.parametrize("M", [1, 2, 5, 16, 33, 64])
def test_the_kernel_reads_tiles(bits, group_size, with_offset, M):
  """Three weights in one call, the first large enough (>= 128 KB) to be split among threads in spans."""
  rng = np.random.default_rng(M * 10 + bits)
  K = 512
  G = group_size or K
  ws = [weight(rng, N, K, bits, G, with_offset) for N in (272 * 8 // bits, 16, 36)]
  x = rng.standard_normal((M, K)).astype(np.float32)
  tiles = [quantized.tile(w) for w in ws]
  call = lambda x, ts: decode_kernels.matmul(x, [(t.values, t.scale, t.offset) for t in ts], bits, G, 4)
  ys = jax.jit(call)(x, tiles)
  for w, y in zip(ws, ys):
    want = reference(x, np.asarray(w.values), w.scale, w.offset, bits, G)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)


@integer_dots_only
@pytest.mark.parametrize("N,group_size,tile_rows", [(8, 8, 4), (10, 32, 4), (8, 32, 2)])
def test_the_kernel_refuses_tiles_it_cannot_read(N, group_size, tile_rows):
  """Groups of 8 (not the integer path), rows not a multiple of 4, tiles of another height."""
  rng = np.random.default_rng(0)
  values, scale, offset = random_weight(rng, N, 128, 8, group_size, False, np.float32)
  with pytest.raises(Exception, match="tile_rows 4 takes int8 or int4 weights"):
    y = decode_kernels.matmul(jnp.ones((1, 128)), [(values, scale, offset)], 8, group_size, tile_rows)[0]
    y.block_until_ready()


def test_for_decoding_tiles_integer_weights_where_the_kernel_reads_them():
  rng = np.random.default_rng(0)
  params = {"w1": weight(rng, 64, 128, 8, 64), "w2": weight(rng, 10, 128, 8, 64)}  # 10 rows: stays rows
  cfg = model.ModelConfig(vocab_size=96, d_model=64, n_layers=1, n_heads=4, d_ff=128, scan_layers=False)
  _, out = quantize.for_decoding(cfg, params)
  tiles = 4 if decode_kernels.rounds_int8_activations() else 1
  assert out["w1"].tile_rows == tiles and out["w2"].tile_rows == 1
  for name in params:
    np.testing.assert_array_equal(
      np.asarray(quantized.dequantize(out[name])), np.asarray(quantized.dequantize(params[name]))
    )
