"""`flash_cpu`: causal self-attention for training on a CPU through our C++ kernel (flash_attention.cc),
FlashAttention-2's algorithm (Dao 2023, arXiv:2307.08691): scores in 64 x 64 tiles that stay in the cache,
an online softmax, and a backward that recomputes the probabilities from the forward's log-sum-exp, so
memory is O(T) and no [T, S] matrix crosses the memory bus. XLA:CPU's own attention (`xla_cpu`) passes
over fp32 [T, S] scores about ten times a training step and is bound by memory from ~1k positions on
(BUILD_NOTES: attention speed).

It takes plain causal self-attention (`causal=True`) with GQA, packed `segment_ids` and a sliding
window, over T a multiple of 64 and head dims a multiple of 16 up to 256, with fp32 operands (AVX-512)
or bf16 (AVX-512 BF16: sums in fp32, as XLA's bf16 dots), on a CPU whose kernels built
(ops/decode_kernels.py). `takes` says whether a call qualifies; ops/attention.py sends the others to
`xla_cpu`. No attention dropout (config validation refuses it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.ops import decode_kernels

TILE = 64  # the kernel's tile of query rows and key columns; T must be a multiple


def takes(seq_len: int, head_dim: int, causal: bool, operand_dtype) -> bool:
  """Whether the kernel can run a call: causal self-attention over a multiple of TILE positions, head
  dims a multiple of 16 up to 256, an operand dtype this build takes
  (decode_kernels.flash_attention_dtypes)."""
  return (
    causal
    and seq_len % TILE == 0
    and seq_len > 0
    and head_dim % 16 == 0
    and head_dim <= 256
    and jnp.dtype(operand_dtype).name in decode_kernels.flash_attention_dtypes()
  )


def flash(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, window: int | None, operand_dtype) -> jax.Array:
  """softmax(q k^T / sqrt(H) + causal mask) v -> [B, T, N, H] in q's dtype, differentiable in q, k and v.

  q [B, T, N, H], k and v [B, T, K, H] (K divides N; head n reads KV head n // (N // K)); matmul operands
  in `operand_dtype`, softmax and sums in fp32. A key at t' is visible to a query at t iff t' <= t, they
  share a segment id (`segment_ids_BT` int [B, T], or None: one document) and t - t' < window (None: no
  window). Call only where `takes` holds: ValueError for an operand dtype this build does not take (or
  no kernels at all); T not a multiple of TILE (or an odd H with bf16) fails to reshape at trace time,
  other shapes `takes` refuses fail with the kernel's InvalidArgument error at run time.
  """
  built = decode_kernels.flash_attention_dtypes()  # also registers the kernel with XLA, once
  if jnp.dtype(operand_dtype).name not in built:
    raise ValueError(
      f"flash attention on this CPU takes operand dtypes {list(built)} (none: the C++ kernels are off or "
      f"failed to build, see the logged warning), not {jnp.dtype(operand_dtype).name}; use "
      "model.attention_impl='xla_cpu'"
    )
  B, T = q_BTNH.shape[:2]
  H = q_BTNH.shape[-1]
  ids_BT = jnp.zeros((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
  q_BTNH = q_BTNH * jnp.asarray(H**-0.5, q_BTNH.dtype)
  return _flash(q_BTNH, k_BTKH, v_BTKH, ids_BT, int(window or 0), jnp.dtype(operand_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q_BTNH, k_BTKH, v_BTKH, ids_BT, window, operand_dtype):
  return _forward(q_BTNH, k_BTKH, v_BTKH, ids_BT, window, operand_dtype)[0]


def _step(dtype) -> int:
  """Elements of the summed dimension one lane multiplies: bf16 pairs (vdpbf16ps), fp32 one."""
  return 2 if jnp.dtype(dtype) == jnp.bfloat16 else 1


def _by_dim(x_BTKH):
  """[B, K, tiles, H / step, TILE, step]: the B operand of a product summed over the head dim (q k^T,
  dO v^T): each tile's rows become columns, `step` dims side by side."""
  B, T, K, H = x_BTKH.shape
  step = _step(x_BTKH.dtype)
  return x_BTKH.reshape(B, T // TILE, TILE, K, H // step, step).transpose(0, 3, 1, 4, 2, 5)


def _by_row(x_BTKH):
  """[B, K, tiles, TILE / step, H, step]: the B operand of a product summed over key rows (P v, dS k),
  `step` rows interleaved."""
  B, T, K, H = x_BTKH.shape
  step = _step(x_BTKH.dtype)
  return x_BTKH.reshape(B, T // TILE, TILE // step, step, K, H).transpose(0, 4, 1, 2, 5, 3)


def _forward(q_BTNH, k_BTKH, v_BTKH, ids_BT, window, operand_dtype):
  B, T, N, _ = q_BTNH.shape
  q, k, v = (a.astype(operand_dtype) for a in (q_BTNH, k_BTKH, v_BTKH))
  results = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((B, N, T), jnp.float32))
  call = jax.ffi.ffi_call("lmjax_flash_forward", results, vmap_method="sequential")
  out_BTNH, lse_BNT = call(q, _by_dim(k), _by_row(v), ids_BT, window=np.int64(window))
  dtypes = tuple(jnp.zeros((0,), a.dtype) for a in (q_BTNH, k_BTKH, v_BTKH))  # the inputs' dtypes
  return out_BTNH.astype(q_BTNH.dtype), (q, k, v, ids_BT, out_BTNH, lse_BNT, dtypes)


def _backward(window, operand_dtype, residuals, dout_BTNH):
  q, k, v, ids_BT, out_BTNH, lse_BNT, dtypes = residuals
  # FlashAttention's D = rowsum(dO * O), the softmax's correction term, in fp32 as the kernel wants it.
  delta_BNT = (dout_BTNH.astype(jnp.float32) * out_BTNH).sum(-1).transpose(0, 2, 1)
  dout = dout_BTNH.astype(operand_dtype)
  q_BNHT, dout_BNHT = (a.transpose(0, 2, 3, 1) for a in (q, dout))
  results = [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v)]
  call = jax.ffi.ffi_call("lmjax_flash_backward", results, vmap_method="sequential")
  operands = (q, dout, q_BNHT, dout_BNHT, _by_dim(k), _by_dim(v), _by_row(k), ids_BT, lse_BNT, delta_BNT)
  grads = call(*operands, window=np.int64(window))
  return (*(g.astype(d.dtype) for g, d in zip(grads, dtypes)), None)


_flash.defvjp(_forward, _backward)
