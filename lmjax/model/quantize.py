"""A Transformer's weights laid out for inference: int8 or int4 QuantizedWeights (ops/quantized.py),
and the layout decoding is fastest with (`for_decoding`).

    params_q = quantize_params(params, "int8")      # or "int4"; any params tree of model/transformer.py
    logits = Transformer(cfg).apply({"params": params_q}, tokens_BT)
    cfg_d, params_d = for_decoding(cfg, params)     # unrolled layers, matrices [N, K]: same model

Every matrix a token's forward reads is quantized: q/k/v/o, the MLP, the token embedding (lookup and
tied head alike) and an untied head; norms and learned positions stay float (they are vectors, or
read one row a token). Scanned and unrolled layers alike: leading layer axes are kept.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.core import hugepages
from lmjax.ops import decode_kernels, quantized

# dtype name -> (bits, inputs per scale, asymmetric). int8: symmetric in groups of 64 (mean KL to fp32
# on SmolLM2 0.003 nats against 0.014 with one scale per row; BUILD_NOTES). int4: 16 levels spanning
# each group of 32 (llama.cpp's Q4_1).
QUANTIZED_DTYPES = {"int8": (8, 64, False), "int4": (4, 32, True)}
# The token embedding (the tied output layer too) stays 8-bit under int4, as in llama.cpp's 4-bit
# files (token_embd in Q8_0 or Q6_K): the logits are the most sensitive to rounding.
_EMBEDDING_DTYPE = {"int4": "int8"}
# Weight name -> (its rank in one layer, how many leading axes are inputs; -1: declared [N, K]).
MATRICES = {
  "wq": (3, 1),
  "wk": (3, 1),
  "wv": (3, 1),
  "wo": (3, 2),
  "w1": (2, 1),
  "w2": (2, 1),
  "w3": (2, 1),
  "lm_head": (2, 1),
  "embedding": (2, -1),
}


def as_NK(w, rank: int, in_dims: int) -> tuple:
  """(the [..., N, K] matrix of a declared-layout weight w (or a float QuantizedWeight), its one-layer
  shape)."""
  if isinstance(w, quantized.QuantizedWeight):
    return w.values.astype(jnp.float32), w.shape
  w = jnp.asarray(w, jnp.float32)
  lead, shape = w.shape[: w.ndim - rank], w.shape[w.ndim - rank :]
  if in_dims == -1:
    return w, shape
  K = int(np.prod(shape[:in_dims]))
  return w.reshape(*lead, K, -1).swapaxes(-1, -2), shape


def scheme(dtype: str, name: str) -> tuple:
  """(bits, group size, asymmetric) for weight `name` ('embedding', 'wq', ...) under `dtype`."""
  return QUANTIZED_DTYPES[_EMBEDDING_DTYPE.get(dtype, dtype) if name in ("embedding", "lm_head") else dtype]


def quantize_params(params, dtype: str, group_size: int | None = None):
  """`params` with every weight matrix (MATRICES) replaced by a QuantizedWeight of `dtype` (`scheme`;
  `group_size` overrides the groups; a matrix whose inputs the group does not divide gets one scale
  per row). Matrices already quantized are kept. Raises ValueError for another dtype."""
  if dtype not in QUANTIZED_DTYPES:
    raise ValueError(f"quantized dtype {dtype!r} is not supported; allowed: {list(QUANTIZED_DTYPES)}")

  def convert(path, w):
    name = getattr(path[-1], "key", None)
    if name not in MATRICES or (isinstance(w, quantized.QuantizedWeight) and w.is_integer):
      return w
    rank, in_dims = MATRICES[name]
    if isinstance(w, quantized.QuantizedWeight):
      in_dims = w.in_dims
    bits, group, asymmetric = scheme(dtype, name)
    w_NK, shape = as_NK(w, rank, in_dims)
    group = group_size or group
    group = group if w_NK.shape[-1] % group == 0 else None
    return quantized.quantize(w_NK, bits, group, shape, in_dims, asymmetric)

  return jax.tree_util.tree_map_with_path(
    convert, params, is_leaf=lambda x: isinstance(x, quantized.QuantizedWeight)
  )


def dequantize_params(params):
  """The float params (declared layouts) that quantized `params` stand for."""

  def convert(w):
    if not isinstance(w, quantized.QuantizedWeight):
      return w
    w_NK = quantized.dequantize(w)
    if w.in_dims == -1:
      return w_NK
    lead = w_NK.shape[:-2]
    return w_NK.swapaxes(-1, -2).reshape(*lead, *w.shape)

  return jax.tree.map(convert, params, is_leaf=lambda x: isinstance(x, quantized.QuantizedWeight))


def _containers(params) -> list:
  """The QuantizedWeights in `params`."""
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, quantized.QuantizedWeight))
  return [x for x in leaves if isinstance(x, quantized.QuantizedWeight)]


def is_quantized(params) -> bool:
  """Whether any weight in `params` is an integer QuantizedWeight (int8/int4)."""
  return any(w.is_integer for w in _containers(params))


def has_weight_containers(params) -> bool:
  """Whether any weight in `params` is a QuantizedWeight (integer, or a float one `for_decoding` made)."""
  return bool(_containers(params))


def for_decoding(cfg, params) -> tuple:
  """(cfg, params) of the same model laid out for fast decoding on one CPU device; logits are
  unchanged, except that on a CPU with AVX-512 VNNI or AVX2 int8/int4 products of up to
  decode_kernels.MAX_TILED_ROWS rows (a decode step, a short prefill) round x to int8 in the decode
  kernel. On other backends (GPUs, TPUs: not measured there) (cfg, params) come back as they are.

  - Scanned layers are unrolled (`blocks` [L, ...] -> `block_0` ... `block_{L-1}`): a scan reads each
    layer's weights and KV cache through per-step dynamic slices, which XLA:CPU copies (a 16-row
    SmolLM2 decode step spent ~50 ms of ~140 in those copies; BUILD_NOTES).
  - fp32 matrices are stored [N, K] (`quantized.transposed`): matrix-vector products read them ~2x
    faster (53 vs 25 GB/s in session 13's micro-benchmark; SmolLM2 batch-1 decode ~1.3x). Only when
    the model computes in fp32 (dtype and matmul_dtype): the stored matrices are multiplied in fp32.
    Integer (int8/int4) weights are [N, K] already; where the decode kernel multiplies them through
    integer dots (AVX-512 VNNI or AVX2) they are stored in tiles of 4 rows (`quantized.tile`: one
    sequential stream for the kernel; SmolLM2 batch-1 decode, same-process A/B: int8 142 -> 172 tok/s,
    int4 192 -> 206). The others stay as declared.
  - Every array moves into memory advised for transparent huge pages
    (`core.hugepages.arrays_in_huge_pages`): XLA's allocator keeps them in 4 KiB pages, and SmolLM2
    batch-1 decode ran int8 156-172 tok/s against 141-145 from those (session 17, same-host A/B).
  Applying it again changes nothing. Converting holds up to ~3x the weights' memory at its peak while
  the caller keeps the originals; a longer compile follows (the layers unrolled). Raises ValueError
  when `params` do not match `cfg` (scanned layers without `blocks`)."""
  if jax.default_backend() != "cpu":
    return cfg, params
  if cfg.scan_layers:
    if "blocks" not in params:
      raise ValueError(
        "cfg has scanned layers but params have no 'blocks': pass the cfg the params came with"
      )
    blocks = params["blocks"]
    params = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(cfg.n_layers):
      params[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], blocks)
    cfg = dataclasses.replace(cfg, scan_layers=False)

  fp32_compute = jnp.dtype(cfg.matmul_dtype or cfg.dtype) == jnp.float32
  # The kernel path that reads tiles is there (asked only for integer weights: it builds the kernels).
  tiles = is_quantized(params) and decode_kernels.rounds_int8_activations()

  def convert(path, w):
    name = getattr(path[-1], "key", None)
    if isinstance(w, quantized.QuantizedWeight):
      return quantized.tile(w) if tiles and quantized.can_tile(w) else w
    if name not in MATRICES or w.dtype != jnp.float32:
      return w
    if not fp32_compute:
      return w
    w_NK, shape = as_NK(w, *MATRICES[name])
    return quantized.transposed(w_NK, shape, MATRICES[name][1])

  is_weight = lambda x: isinstance(x, quantized.QuantizedWeight)
  params = jax.tree_util.tree_map_with_path(convert, params, is_leaf=is_weight)
  return cfg, hugepages.arrays_in_huge_pages(params)
