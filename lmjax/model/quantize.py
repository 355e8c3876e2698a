"""A Transformer's weight matrices as int8 or int4 QuantizedWeights (ops/quantized.py), for inference.

    params_q = quantize_params(params, "int8")      # or "int4"; any params tree of model/transformer.py
    logits = Transformer(cfg).apply({"params": params_q}, tokens_BT)

Every matrix a token's forward reads is quantized: q/k/v/o, the MLP, the token embedding (lookup and
tied head alike) and an untied head; norms and learned positions stay float (they are vectors, or
read one row a token). Scanned and unrolled layers alike: leading layer axes are kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.ops import quantized

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
  """(the [..., N, K] matrix of a declared-layout weight w, its one-layer shape)."""
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
    if name not in MATRICES or isinstance(w, quantized.QuantizedWeight):
      return w
    rank, in_dims = MATRICES[name]
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


def is_quantized(params) -> bool:
  """Whether any weight in `params` is a QuantizedWeight."""
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, quantized.QuantizedWeight))
  return any(isinstance(x, quantized.QuantizedWeight) for x in leaves)
