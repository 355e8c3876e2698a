"""XLA:CPU-shaped kernels: the matmul with fp32 accumulation and the attention core.

Both are custom-VJP functions whose every dot is a plain batched [m, k] @ [k, n] in the operand
dtype, with row-major layouts pinned where XLA:CPU's bf16 kernels need them (BUILD_NOTES,
performance rounds 3-5); the model calls them and knows nothing of layouts. Moved out of model.py
as the first step of issue 18's kernel seam (`model.attention_impl` will choose among kernels here).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

# Query rows per KV head from which attention_core copies K row-major (see _attention_fwd).
_MIN_ROWS_FOR_K_COPY = 64


def _needs_row_major(operand_dtype) -> bool:
  """Whether dots with these operands must see plain row-major [.., M, K] @ [.., K, N].

  XLA:CPU's bf16 matmul kernels (YNNPACK) take only that form; a dot with a
  transposed bf16 operand is upcast to fp32 and runs at the fp32 rate (measured:
  [4096,384] @ [1152,384]^T 18 ms, 10 ms after a row-major copy). fp32 dots, GPUs
  and TPUs read transposed operands natively.
  """
  return jax.default_backend() == "cpu" and jnp.dtype(operand_dtype) != jnp.float32


def _swap_minor(a) -> jax.Array:
  """`a` with its last two axes swapped: a row-major copy where `_needs_row_major`.

  XLA would fold a plain transpose into the consuming dot, so the layout is pinned.
  """
  perm = (*range(a.ndim - 2), a.ndim - 1, a.ndim - 2)
  if not _needs_row_major(a.dtype):
    return a.transpose(perm)
  return with_layout_constraint(a.transpose(perm), Layout(major_to_minor=tuple(range(a.ndim))))


def _swap_minor_of_product(y, operand_dtype) -> jax.Array:
  """A dot's result `y` with its last two axes swapped.

  XLA folds a transpose of a dot's result into the dot, which then has transposed
  operands again (for bf16, one that XLA:CPU cannot even run), so where
  `_needs_row_major` the result is stored column-major and the swap is a bitcast.
  """
  n = y.ndim
  if _needs_row_major(operand_dtype):
    y = with_layout_constraint(y, Layout(major_to_minor=(*range(n - 2), n - 1, n - 2)))
  return jnp.swapaxes(y, -1, -2)


def _matmul(a, b) -> jax.Array:
  """[..., M, K] @ [..., K, N] with fp32 accumulation; the leading dims are batch dims."""
  batch = tuple(range(a.ndim - 2))
  return jax.lax.dot_general(a, b, (((a.ndim - 1,), (a.ndim - 2,)), (batch, batch)),
                             preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul_fp32_accumulate(x_MK, w, operand_dtype, w_is_NK: bool = False) -> jax.Array:
  """x @ w (x @ w.T when `w_is_NK`), operands cast to `operand_dtype`, fp32 accumulation.

  Plain autodiff of a bf16 dot with an fp32 result meets an fp32 cotangent and
  upcasts the other operand, so both backward matmuls would run at the fp32
  rate; here the cotangent is cast to the operand dtype instead (as in bf16
  training), and the gradients come back in the dtypes of x and w. All three
  matmuls are issued in the plain form (`_swap_minor`), which is also why a
  [N, K] weight (the tied embedding) is passed as it is stored rather than
  transposed by the caller (see `_swap_minor_of_product`).
  """
  return _matmul_fwd(x_MK, w, operand_dtype, w_is_NK)[0]


def _matmul_fwd(x_MK, w, operand_dtype, w_is_NK):
  x_op, w_op = x_MK.astype(operand_dtype), w.astype(operand_dtype)
  # Zero-size arrays carry the input dtypes to the backward pass.
  dtypes = (jnp.zeros((0,), x_MK.dtype), jnp.zeros((0,), w.dtype))
  return _matmul(x_op, _swap_minor(w_op) if w_is_NK else w_op), (x_op, w_op, dtypes)


def _matmul_bwd(operand_dtype, w_is_NK, residuals, g_MN):
  x_op, w_op, (x_dtype, w_dtype) = residuals
  g_MN = g_MN.astype(operand_dtype)
  dx_MK = _matmul(g_MN, w_op if w_is_NK else _swap_minor(w_op))
  dw = _matmul(_swap_minor(g_MN), x_op) if w_is_NK else _matmul(_swap_minor(x_op), g_MN)
  return dx_MK.astype(x_dtype.dtype), dw.astype(w_dtype.dtype)


matmul_fp32_accumulate.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def attention_core(q_BKMH, k_BKSH, v_BKSH, bias_BKMS, keep_BKMS, operand_dtype) -> jax.Array:
  """softmax(q k^T + bias) v for pre-scaled queries, in fp32 with `operand_dtype` matmul operands.

  M is the query rows per KV head (G heads x T positions); `bias_BKMS` (0 or a large
  negative, broadcasting to [B, K, M, S]) is the mask; `keep_BKMS` is None or the
  attention-dropout mask scaled by 1/keep_prob. Returns fp32 [B, K, M, H].

  The backward is written out as in FlashAttention (dS = P * (dP - rowsum(dO * O))),
  so every matmul is a plain batched [m, k] @ [k, n] in the operand dtype: only
  [., H]-sized operands and results are transposed, never the [M, S] matrices. The
  softmax is normalised after the V matmul (dividing [M, H] rather than [M, S]).
  """
  return _attention_fwd(q_BKMH, k_BKSH, v_BKSH, bias_BKMS, keep_BKMS, operand_dtype)[0]


def _attention_fwd(q_BKMH, k_BKSH, v_BKSH, bias_BKMS, keep_BKMS, operand_dtype):
  dtype = jnp.zeros((0,), q_BKMH.dtype)  # carries the input dtype to the backward pass
  q, k, v = (a.astype(operand_dtype) for a in (q_BKMH, k_BKSH, v_BKSH))
  # A row-major copy of K pays off for training's blocks of >= 64 queries; decode steps
  # (a few query rows) ran ~14% slower with it (SmolLM2 bf16, batch 8), so XLA gets K as is.
  k_BKHS = _swap_minor(k) if q.shape[-2] >= _MIN_ROWS_FOR_K_COPY else jnp.swapaxes(k, -1, -2)
  logits_BKMS = _matmul(q, k_BKHS) + bias_BKMS
  exp_BKMS = jnp.exp(logits_BKMS - logits_BKMS.max(-1, keepdims=True))
  sum_BKM1 = exp_BKMS.sum(-1, keepdims=True)
  kept_BKMS = exp_BKMS if keep_BKMS is None else exp_BKMS * keep_BKMS
  out_BKMH = _matmul(kept_BKMS.astype(operand_dtype), v) / sum_BKM1
  return out_BKMH, (q, k, v, exp_BKMS.astype(operand_dtype), sum_BKM1, keep_BKMS, out_BKMH, dtype)


def _attention_bwd(operand_dtype, residuals, dout_BKMH):
  q, k, v, exp_BKMS, sum_BKM1, keep_BKMS, out_BKMH, dtype = residuals
  dout = dout_BKMH.astype(operand_dtype)
  probs_BKMS = exp_BKMS.astype(jnp.float32) / sum_BKM1
  dprobs_BKMS = _matmul(dout, _swap_minor(v))
  if keep_BKMS is not None:
    dprobs_BKMS, probs_kept = dprobs_BKMS * keep_BKMS, probs_BKMS * keep_BKMS
  else:
    probs_kept = probs_BKMS
  dlogits_BKMS = probs_BKMS * (dprobs_BKMS - (dout_BKMH * out_BKMH).sum(-1, keepdims=True))
  dlogits_BKMS = dlogits_BKMS.astype(operand_dtype)
  dq = _matmul(dlogits_BKMS, k)
  dk = _swap_minor_of_product(_matmul(_swap_minor(q), dlogits_BKMS), operand_dtype)
  dv = _swap_minor_of_product(_matmul(_swap_minor(dout), probs_kept.astype(operand_dtype)), operand_dtype)
  return (*(d.astype(dtype.dtype) for d in (dq, dk, dv)), None, None)


attention_core.defvjp(_attention_fwd, _attention_bwd)
