"""Weight matrices stored [N, K] for inference: int8 and int4 with scales (weight-only quantization,
dequantized inside the matmul), or float ones as they are.

A `QuantizedWeight` holds one weight matrix as [N, K] integers (N outputs, K inputs), in groups of
`group_size` consecutive inputs that share a scale (and, for llama.cpp's Q4_1, an offset):

    w[n, k] = q[n, k] * scale[n, k // G] + offset[n, k // G]        q in [-127, 127] or [-8, 7]

Activations stay in floating point; only the weights' bytes shrink (~4x for int8, ~5x for int4 with
group 32), which is what decoding one token at a time is limited by. `quantize` rounds to nearest
per group, symmetric (llama.cpp's Q8_0: scale = max|w| / qmax) or asymmetric (Q4_1: the levels span
[min, max]; ggml-quants.c `quantize_row_q8_0_ref` / `quantize_row_q4_1_ref`); one group per output
row is LLM.int8's vector-wise weight quantization without its outlier split (Dettmers et al. 2022).

Why [N, K] and a dequantize-then-dot: XLA:CPU fuses the int8 -> fp32 convert and the per-group
scale into a matrix-vector product whose weight is the transposed [N, K] operand, reading the int8
bytes once (measured 27-35 GB/s of weight bytes, 5x fp32's time per weight, BUILD_NOTES); the
[K, N] layout or an integer dot does not fuse (8-9 GB/s). Two int4 values share a byte (element 2i
in the low nibble, 2i+1 in the high one); unpacking them does not fuse as well, so int4 saves
memory more than time on a CPU. Qwix (Google's JAX quantization library) was tried first: it
recognises a weight only when the Flax parameter itself reaches the dot, and our layers reshape and
stack parameters before their 2-D matmuls (ops/matmul.py), so it refused the model; its weight-only
path is the same dequantize-then-dot.

The same container holds a float matrix transposed to [N, K] without scales (`transposed`): XLA:CPU's
matrix-vector products read fp32 weights stored [N, K] at ~2x the rate of the [K, N] layout the layers
declare (SmolLM2 batch-1 decode 52-57 tok/s against 38-44, BUILD_NOTES), so inference keeps every
float matrix that way (model/quantize.py `for_decoding`).

On a CPU, `matmul` over 1-16 rows (a decode step) goes to the C++ kernels of ops/decode_kernels.py
instead, which read every layout above in one pass (int8 and int4 through integer dots, AVX-512
VNNI's or AVX2's, where available, from weights stored in tiles of 4 rows, `tile`, and then up to 64
rows); the XLA path described here serves larger products and other backends.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.ops import decode_kernels

BITS = (8, 4)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  """One quantized weight (a pytree, so it passes through jit, scan and device_put like an array).

  values: int8 [..., N, K] (bits 8), [..., N, K // 2] (bits 4, two per byte; see module doc), or a
    float matrix [..., N, K] (bits 32 or 16: `transposed`, not quantized).
  scale, offset: [..., N, K // group_size] floats; offset is None for symmetric quantization, and both
    are None for a float matrix.
  shape: the float weight's shape as its layer declares it (one layer: leading axes such as scanned
    layers are not part of it); `in_dims` of its leading axes are the inputs (flattened to K), the
    rest the outputs (flattened to N); in_dims=-1: the weight is declared [N, K] (a tied embedding).
  tile_rows: 1, or TILE_ROWS for integer values stored in tiles (`tile`): the same [..., N, K] (or
    [..., N, K // 2]) array, its bytes reordered so that the decode kernel reads one stream.
  """

  values: jax.Array
  scale: jax.Array | None
  offset: jax.Array | None
  shape: tuple = dataclasses.field(metadata={"static": True})
  in_dims: int = dataclasses.field(metadata={"static": True})
  bits: int = dataclasses.field(metadata={"static": True})
  group_size: int = dataclasses.field(metadata={"static": True})
  tile_rows: int = dataclasses.field(default=1, metadata={"static": True})

  @property
  def inputs(self) -> int:
    """K, the matrix's inputs (two int4 values share a byte)."""
    return self.values.shape[-1] * (2 if self.bits == 4 else 1)

  @property
  def is_integer(self) -> bool:
    """Whether the values are quantized integers (False: a `transposed` float matrix)."""
    return self.scale is not None

  @property
  def nbytes(self) -> int:
    """Bytes held (values, scales and offsets), over all leading axes."""
    arrays = [a for a in (self.values, self.scale, self.offset) if a is not None]
    return int(sum(np.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays))


def quantize(
  w_NK, bits: int, group_size: int | None, shape: tuple, in_dims: int, asymmetric: bool = False
) -> QuantizedWeight:
  """Round-to-nearest quantization of a float [..., N, K] matrix, per group of `group_size` inputs
  (None: one group per output row). Symmetric (llama.cpp's Q8_0): scale = max|w| / qmax, qmax 127
  (int8) or 7 (int4), q = round(w / scale). `asymmetric` (Q4_1): the 2^bits levels span [min, max]:
  scale = (max - min) / (2^bits - 1), q = round((w - min) / scale) - 2^(bits-1), offset = min +
  2^(bits-1) * scale. Either way no weight is more than scale / 2 from its level. Raises ValueError
  for other `bits` or a group size that does not divide K (or is odd for int4)."""
  if bits not in BITS:
    raise ValueError(f"bits={bits} is not supported; allowed: {list(BITS)}")
  w_NK = jnp.asarray(w_NK, jnp.float32)
  K = w_NK.shape[-1]
  group_size = group_size or K
  if K % group_size or (bits == 4 and group_size % 2):
    raise ValueError(
      f"group_size={group_size} must divide the input dimension {K}"
      + (" and be even for int4" if bits == 4 else "")
    )
  w_NgG = w_NK.reshape(*w_NK.shape[:-1], K // group_size, group_size)
  half = 2 ** (bits - 1)
  if asymmetric:
    low_Ng = jnp.min(w_NgG, axis=-1)
    scale_Ng = (jnp.max(w_NgG, axis=-1) - low_Ng) / (2 * half - 1)
    safe_Ng = jnp.where(scale_Ng == 0, 1.0, scale_Ng)
    q_NgG = jnp.clip(jnp.round((w_NgG - low_Ng[..., None]) / safe_Ng[..., None]), 0, 2 * half - 1) - half
    offset_Ng = low_Ng + half * scale_Ng
  else:
    scale_Ng = jnp.max(jnp.abs(w_NgG), axis=-1) / (half - 1)
    safe_Ng = jnp.where(scale_Ng == 0, 1.0, scale_Ng)
    q_NgG = jnp.clip(jnp.round(w_NgG / safe_Ng[..., None]), 1 - half, half - 1)
    offset_Ng = None
  q_NK = q_NgG.astype(jnp.int8).reshape(w_NK.shape)
  values = pack_int4(q_NK) if bits == 4 else q_NK
  return QuantizedWeight(values, scale_Ng, offset_Ng, tuple(shape), in_dims, bits, group_size)


def transposed(w_NK, shape: tuple, in_dims: int) -> QuantizedWeight:
  """A float [..., N, K] matrix kept as it is (its dtype, no scales), for layers that declare `shape`
  with `in_dims` input axes (QuantizedWeight's fields)."""
  w_NK = jnp.asarray(w_NK)
  if not jnp.issubdtype(w_NK.dtype, jnp.floating):
    raise ValueError(f"transposed() takes a float matrix, got {w_NK.dtype}; quantize() makes integer ones")
  bits = jnp.dtype(w_NK.dtype).itemsize * 8
  return QuantizedWeight(w_NK, None, None, tuple(shape), in_dims, bits, w_NK.shape[-1])


def pack_int4(q_NK) -> jax.Array:
  """int8 values in [-8, 7], [..., N, K] -> [..., N, K // 2] bytes: element 2i in the low nibble."""
  q = jnp.asarray(q_NK, jnp.int8)
  lo, hi = q[..., 0::2], q[..., 1::2]
  return (jnp.left_shift(hi, 4) | (lo & 0xF)).astype(jnp.int8)


def unpack_int4(packed) -> jax.Array:
  """Inverse of pack_int4: [..., N, K // 2] bytes -> int8 [..., N, K] in [-8, 7] (sign-extending
  shifts)."""
  lo = jnp.right_shift(jnp.left_shift(packed, 4), 4)
  hi = jnp.right_shift(packed, 4)
  return jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# Rows of a tile and inputs of its chunks (`tile`): decode_matmul_int_dots.h reads 4 weight rows a step,
# 64 inputs at a time.
TILE_ROWS, TILE_INPUTS = 4, 64


def can_tile(w: QuantizedWeight) -> bool:
  """Whether `tile` takes w: integer values in rows, N a multiple of TILE_ROWS, K of TILE_INPUTS, and
  groups of a multiple of 32 inputs (the decode kernel's integer path, the one that reads tiles)."""
  N, K = w.values.shape[-2], w.inputs
  return (
    w.is_integer
    and w.tile_rows == 1
    and N % TILE_ROWS == 0
    and K % TILE_INPUTS == 0
    and w.group_size % 32 == 0
  )


def tile(w: QuantizedWeight) -> QuantizedWeight:
  """w with its values in tiles of TILE_ROWS rows, each stored chunk-major: for every 64 inputs, the
  tile's 4 rows' bytes side by side (64 bytes a row for int8, 32 for int4), then the next 64 inputs.
  A decode step's kernel reads 4 rows 64 inputs at a time, so it then reads the weight as one
  sequential stream, which the CPU's hardware prefetchers follow; rows stored whole make 4 short
  streams that they do not (BUILD_NOTES, "Decode kernels, session 18"). Scales and offsets keep their
  [..., N, groups] layout. Raises ValueError unless `can_tile(w)`."""
  if not can_tile(w):
    raise ValueError(
      f"tile() takes integer weights with rows a multiple of {TILE_ROWS}, inputs of {TILE_INPUTS} and"
      f" groups of 32; got values {w.values.shape} (bits {w.bits}, group {w.group_size}, tile_rows"
      f" {w.tile_rows})"
    )
  *lead, N, R = w.values.shape
  chunks = w.inputs // TILE_INPUTS
  v = jnp.asarray(w.values).reshape(*lead, N // TILE_ROWS, TILE_ROWS, chunks, R // chunks)
  v = jnp.swapaxes(v, -3, -2).reshape(*lead, N, R)
  return dataclasses.replace(w, values=v, tile_rows=TILE_ROWS)


def row_values(w: QuantizedWeight) -> jax.Array:
  """w's values as rows ([..., N, K] or [..., N, K // 2]), whether or not they are stored in tiles."""
  if w.tile_rows == 1:
    return w.values
  *lead, N, R = w.values.shape
  chunks = w.inputs // TILE_INPUTS
  v = w.values.reshape(*lead, N // w.tile_rows, chunks, w.tile_rows, R // chunks)
  return jnp.swapaxes(v, -3, -2).reshape(*lead, N, R)


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
  """The float [..., N, K] matrix w stands for (module docstring's formula)."""
  if not w.is_integer:
    return w.values.astype(dtype)
  values = row_values(w)
  q_NK = unpack_int4(values) if w.bits == 4 else values
  *lead, N, K = q_NK.shape
  G = w.group_size
  w_NgG = q_NK.astype(jnp.float32).reshape(*lead, N, K // G, G) * w.scale.astype(jnp.float32)[..., None]
  if w.offset is not None:
    w_NgG = w_NgG + w.offset.astype(jnp.float32)[..., None]
  return w_NgG.reshape(*lead, N, K).astype(dtype)


def matmul(x_MK, w: QuantizedWeight) -> jax.Array:
  """x_MK @ w^T for a one-layer QuantizedWeight ([N, K]): fp32 [M, N], computed in fp32 whatever x's
  dtype (XLA:CPU's bf16 matrix-vector products are slower than fp32 ones; the bytes saved are the
  weights'). A decode step's few rows (1 <= M <= decode_kernels.MAX_ROWS) of fp32, int8 or int4
  weights go to the C++ kernel on a CPU (ops/decode_kernels.py; its int8 and int4 paths on CPUs with
  AVX-512 VNNI or AVX2 also round x to int8 per 32 inputs; weights in tiles go to it up to MAX_TILED_ROWS
  rows, a short prefill's), everything else to XLA's dot."""
  return matmuls(x_MK, [w])[0]


def matmuls(x_MK, ws) -> list[jax.Array]:
  """[x_MK @ w^T for w in ws]: `matmul` for several weights that read the same input (a layer's q, k
  and v; its w1 and w3). Weights of one kind (bits, group size, dtypes, K) that the C++ kernel takes
  go to it in one call, which quantizes x once and splits all their rows among its threads, as one
  larger matrix would be; the rest go one by one."""
  ws = list(ws)
  kernel = [i for i, w in enumerate(ws) if _kernel_takes(x_MK, w)]
  kinds = {}
  for i in kernel:
    kinds.setdefault(_kind(ws[i]), []).append(i)
  results = [None] * len(ws)
  for indices in kinds.values():
    group = [ws[i] for i in indices]
    ys = jax.lax.platform_dependent(
      x_MK, group, cpu=_kernel_matmul, default=lambda x, g: [_xla_matmul(x, w) for w in g]
    )
    for i, y in zip(indices, ys):
      results[i] = y
  return [_xla_matmul(x_MK, w) if y is None else y for w, y in zip(ws, results)]


def _kind(w: QuantizedWeight) -> tuple:
  """What one kernel call needs its weights to share."""
  dtype = lambda a: None if a is None else jnp.dtype(a.dtype).name
  return (w.bits, w.group_size, w.inputs, w.tile_rows, dtype(w.values), dtype(w.scale), dtype(w.offset))


def _kernel_takes(x_MK, w: QuantizedWeight) -> bool:
  float_ok = not w.is_integer and w.values.dtype == jnp.float32
  integer_ok = w.is_integer and all(
    a is None or a.dtype in (jnp.float32, jnp.float16) for a in (w.scale, w.offset)
  )
  limit = decode_kernels.MAX_ROWS if w.tile_rows == 1 else decode_kernels.MAX_TILED_ROWS
  return (
    1 <= x_MK.shape[0] <= limit
    and w.values.ndim == 2
    and (float_ok or integer_ok)
    and jax.default_backend() == "cpu"
    and decode_kernels.available()
    and (w.tile_rows == 1 or decode_kernels.rounds_int8_activations())  # tiles: the integer path only
  )


def _kernel_matmul(x_MK, ws) -> list[jax.Array]:
  kind = ws[0]
  weights = [(w.values, w.scale, w.offset) for w in ws]
  return decode_kernels.matmul(x_MK, weights, kind.bits, kind.group_size, kind.tile_rows)


def _xla_matmul(x_MK, w: QuantizedWeight) -> jax.Array:
  x_MK = jax.lax.platform_dependent(x_MK, cpu=_materialized, default=lambda x: x)
  # Tie the weight to x: otherwise XLA hoists the dequantization of a weight that a decode loop reads
  # every step (the tied head) out of the loop, and each step reads the fp32 copy (4x the bytes).
  w, x_MK = jax.lax.optimization_barrier((w, x_MK))
  return jnp.dot(x_MK.astype(jnp.float32), dequantize(w).T, preferred_element_type=jnp.float32)


def _materialized(x):
  """x, computed before the matmul that reads it. XLA:CPU fuses a matrix-vector product into one loop
  together with x's producers (an attention output's normalisation, a norm) and recomputes x for every
  output row: wo's product ran at 1.8 GB/s of weight bytes that way, 28 GB/s with x materialised
  (BUILD_NOTES). A conditional is opaque to fusion; its predicate (false only for a NaN, where both
  branches give x anyway) keeps XLA from folding it. CPU only: on GPUs a conditional waits for the
  host."""
  return jax.lax.cond(x.reshape(-1)[0] == x.reshape(-1)[0], lambda x: x, lambda x: x + 0, x)


def take_rows(w: QuantizedWeight, ids) -> jax.Array:
  """Rows `ids` (any int shape I) of a [N, K] QuantizedWeight, dequantized: fp32 [*I, K] (the token
  embedding lookup)."""
  take = lambda a: None if a is None else jnp.take(a, ids, axis=0)
  ids = jnp.asarray(ids)
  if w.tile_rows == 1:
    values = take(w.values)
  else:  # row r is chunk by chunk in tile r // T, at place r % T
    N, R = w.values.shape
    chunks = w.inputs // TILE_INPUTS
    tiles = w.values.reshape(N // w.tile_rows, chunks, w.tile_rows, R // chunks)
    values = tiles[ids // w.tile_rows, :, ids % w.tile_rows, :].reshape(*ids.shape, R)
  return dequantize(
    dataclasses.replace(w, values=values, scale=take(w.scale), offset=take(w.offset), tile_rows=1)
  )
