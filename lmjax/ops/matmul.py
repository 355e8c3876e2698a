"""Matmuls with fp32 accumulation, by implementation name (`model.matmul_impl`).

  xla_cpu  `matmul_fp32_accumulate`: a custom-VJP matmul whose three dots (forward, dx, dw) are each a
           plain batched [m, k] @ [k, n] in the operand dtype, with row-major layouts pinned where
           XLA:CPU's bf16 kernels need them (BUILD_NOTES, performance rounds 3-5), and the cotangent
           cast to the operand dtype, so the backward runs at the bf16 rate too.
  xla      `jnp.dot(..., preferred_element_type=float32)` with JAX's own autodiff: the reference.

Both give x @ w with operands in `operand_dtype` and an fp32 result; tests assert they agree in
values and gradients. fp32 operands take the plain dot in both (autodiff already keeps fp32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

MATMUL_IMPLS = ("xla_cpu", "xla")


def matmul(x_MK, w, operand_dtype, w_is_NK: bool = False, impl: str = "xla_cpu") -> jax.Array:
  """x_MK @ w ([K, N]; x_MK @ w.T when `w_is_NK`, w [N, K]) -> fp32 [M, N], operands in `operand_dtype`.

  Raises ValueError for an unknown `impl` (allowed: MATMUL_IMPLS).
  """
  if impl not in MATMUL_IMPLS:
    raise ValueError(f"model.matmul_impl={impl!r} is not supported; allowed values: {list(MATMUL_IMPLS)}")
  if jnp.dtype(operand_dtype) == jnp.float32 or impl == "xla":
    return jnp.dot(
      x_MK.astype(operand_dtype),
      (w.T if w_is_NK else w).astype(operand_dtype),
      preferred_element_type=jnp.float32,
    )
  return matmul_fp32_accumulate(x_MK, w, operand_dtype, w_is_NK)


def _needs_row_major(operand_dtype) -> bool:
  """Whether dots with these operands must see plain row-major [.., M, K] @ [.., K, N] on XLA:CPU.

  XLA:CPU's bf16 matmul kernels (YNNPACK) take only that form; a dot with a
  transposed bf16 operand is upcast to fp32 and runs at the fp32 rate (measured:
  [4096,384] @ [1152,384]^T 18 ms, 10 ms after a row-major copy). fp32 dots, GPUs
  and TPUs read transposed operands natively, so the layout pins below apply to the CPU
  lowering only (`jax.lax.platform_dependent`: decided per lowering platform, not by the host's
  default backend, so code traced on a CPU host still lowers cleanly for cuda and tpu).
  """
  return jnp.dtype(operand_dtype) != jnp.float32


def _on_cpu(pinned, plain, x) -> jax.Array:
  """`pinned(x)` where the computation is lowered for CPU, `plain(x)` for any other platform."""
  return jax.lax.platform_dependent(x, cpu=pinned, default=plain)


def swap_minor(a) -> jax.Array:
  """`a` with its last two axes swapped: a row-major copy where `_needs_row_major`.

  XLA would fold a plain transpose into the consuming dot, so the layout is pinned.
  """
  perm = (*range(a.ndim - 2), a.ndim - 1, a.ndim - 2)
  if not _needs_row_major(a.dtype):
    return a.transpose(perm)
  row_major = Layout(major_to_minor=tuple(range(a.ndim)))
  return _on_cpu(
    lambda x: with_layout_constraint(x.transpose(perm), row_major), lambda x: x.transpose(perm), a
  )


def swap_minor_of_product(y, operand_dtype) -> jax.Array:
  """A dot's result `y` with its last two axes swapped.

  XLA folds a transpose of a dot's result into the dot, which then has transposed
  operands again (for bf16, one that XLA:CPU cannot even run), so where
  `_needs_row_major` the result is stored column-major and the swap is a bitcast.
  """
  n = y.ndim
  if _needs_row_major(operand_dtype):
    column_major = Layout(major_to_minor=(*range(n - 2), n - 1, n - 2))
    y = _on_cpu(lambda x: with_layout_constraint(x, column_major), lambda x: x, y)
  return jnp.swapaxes(y, -1, -2)


def batched_matmul(a, b) -> jax.Array:
  """[..., M, K] @ [..., K, N] with fp32 accumulation; the leading dims are batch dims."""
  batch = tuple(range(a.ndim - 2))
  return jax.lax.dot_general(
    a, b, (((a.ndim - 1,), (a.ndim - 2,)), (batch, batch)), preferred_element_type=jnp.float32
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul_fp32_accumulate(x_MK, w, operand_dtype, w_is_NK: bool = False) -> jax.Array:
  """x @ w (x @ w.T when `w_is_NK`), operands cast to `operand_dtype`, fp32 accumulation.

  Plain autodiff of a bf16 dot with an fp32 result meets an fp32 cotangent and
  upcasts the other operand, so both backward matmuls would run at the fp32
  rate; here the cotangent is cast to the operand dtype instead (as in bf16
  training), and the gradients come back in the dtypes of x and w. All three
  matmuls are issued in the plain form (`swap_minor`), which is also why a
  [N, K] weight (the tied embedding) is passed as it is stored rather than
  transposed by the caller (see `swap_minor_of_product`).
  """
  return _matmul_fwd(x_MK, w, operand_dtype, w_is_NK)[0]


def _matmul_fwd(x_MK, w, operand_dtype, w_is_NK):
  x_op, w_op = x_MK.astype(operand_dtype), w.astype(operand_dtype)
  # Zero-size arrays carry the input dtypes to the backward pass.
  dtypes = (jnp.zeros((0,), x_MK.dtype), jnp.zeros((0,), w.dtype))
  return batched_matmul(x_op, swap_minor(w_op) if w_is_NK else w_op), (x_op, w_op, dtypes)


def _matmul_bwd(operand_dtype, w_is_NK, residuals, g_MN):
  x_op, w_op, (x_dtype, w_dtype) = residuals
  g_MN = g_MN.astype(operand_dtype)
  dx_MK = batched_matmul(g_MN, w_op if w_is_NK else swap_minor(w_op))
  dw = batched_matmul(swap_minor(g_MN), x_op) if w_is_NK else batched_matmul(swap_minor(x_op), g_MN)
  return dx_MK.astype(x_dtype.dtype), dw.astype(w_dtype.dtype)


matmul_fp32_accumulate.defvjp(_matmul_fwd, _matmul_bwd)
