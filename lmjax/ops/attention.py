"""Attention kernels, chosen by name (`model.attention_impl`); the model calls `attention`, and
`cached_attention` for a decode step's one query over a KV cache.

  auto       the fastest implementation measured for the backend and shape (`auto_impl`): xla_cpu,
             flash_cpu or blockwise on CPU, cudnn on GPU, splash on TPU. The default.
  xla_cpu    this file's blocked attention: plain causal self-attention is split into query blocks
             that skip the key blocks above the diagonal; each block is `attention_core`, a
             custom-VJP softmax(q k^T + bias) v whose every matmul is a plain batched [m, k] @ [k, n]
             in the operand dtype with row-major layouts pinned where XLA:CPU's bf16 kernels need
             them (BUILD_NOTES, performance rounds 3-5). Supports attention dropout.
  reference  `jax.nn.dot_product_attention(implementation="xla")`, the mask materialised.
  blockwise  FlashAttention's algorithm in plain JAX (blockwise_attention.py): O(T) memory on any
             backend, scores recomputed in the backward.
  flash_cpu  FlashAttention-2 as our C++ kernel for CPUs (flash_attention_cpu.py): O(T) memory, scores
             kept in the cache. Calls it cannot take (not causal, T not a multiple of 64, head dims
             not a multiple of 16 up to 256, a CPU without AVX-512 (bf16: AVX-512 BF16), a non-CPU
             platform) run xla_cpu, or blockwise from CPU_BLOCKWISE_FROM positions. No sharding
             rule: over a mesh XLA gathers its operands to each device (auto: one device only).
  cudnn      cuDNN flash attention (GPU), accelerator_attention.py.
  splash     Pallas splash attention (TPU), accelerator_attention.py.

Every implementation takes the same inputs and gives the same values and gradients (tests assert
it); only xla_cpu has attention dropout. The mask is described, not materialised:
`causal=True` means plain causal self-attention over positions 0..T-1 (the positions are then not
read); otherwise a key at position k is visible to a query at q iff k >= 0 and 0 <= q - k (and
q - k < window with a sliding window). Position -1 marks padding. With `segment_ids` (packed
documents, self-attention only) a key is also visible only to queries of its own segment, so
attention never crosses a document boundary; with `causal=True` the positions then restart per
document (position encodings) while the causal rule stays the row's index order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.ops import accelerator_attention, blockwise_attention, decode_kernels, flash_attention_cpu, masks
from lmjax.ops.matmul import batched_matmul, swap_minor, swap_minor_of_product

# Causal self-attention of at least this many positions takes flash_cpu under "auto" on a CPU whose
# kernel build takes the operand dtype: at 1k-4k positions its forward and backward beat xla_cpu's
# (1x6x64 heads, bf16, fwd+bwd: 22.5 vs 31.4 ms at 1k, 174 vs 281 at 4k) and its memory is O(T); shorter
# ones stay on xla_cpu (at 256, fp32: 6.1 vs 3.9 ms). Only on one device: the kernel has no sharding
# rule, so over a mesh XLA would gather its operands onto every device. BUILD_NOTES: attention speed.
CPU_FLASH_FROM = 1024
# Where flash_cpu cannot run, causal self-attention of at least this many positions takes blockwise on
# a CPU: xla_cpu is faster (6x384 training step: 1.5x at 1k-4k, 1.4x at 8k) but stores the scores: a
# GPT-2-small step (batch 1, remat full) needs 38.4 GiB of temporaries at 8k with it, 8.1 with blockwise.
CPU_BLOCKWISE_FROM = 8192
# Query rows per KV head from which attention_core copies K row-major (see _attention_fwd).
_MIN_ROWS_FOR_K_COPY = 64
# A large finite negative instead of -inf: a fully masked row (a padding query)
# then gives a uniform, finite softmax instead of NaNs.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def attention(
  q_BTNH,
  k_BSKH,
  v_BSKH,
  q_pos_BT,
  k_pos_BS,
  *,
  causal: bool,
  window: int | None = None,
  dropout=None,
  operand_dtype=jnp.float32,
  impl: str = "auto",
  segment_ids_BT=None,
) -> jax.Array:
  """softmax(q k^T / sqrt(H) + mask) v with grouped KV heads (K divides N) -> [B, T, N, H] in q's dtype.

  `dropout`: None or a flax Dropout module applied to the attention probabilities (a mask of
  ones in, the scaled keep mask out). `operand_dtype`: the dtype of the matmul operands (softmax
  and accumulation are fp32). `impl`: a name of ATTENTION_IMPLS, or "auto" (`auto_impl`). Raises
  ValueError for an unknown `impl` and for dropout with an implementation that has none.
  `segment_ids_BT`: None or int [B, T] document ids of packed rows (self-attention: S == T); queries
  see only keys of their own segment. Vaswani et al. 2017, eq. 1; GQA: Ainslie et al. 2023;
  document masking as in MaxText's packed `segment_ids`.
  """
  if impl != "auto" and impl not in ATTENTION_IMPLS:
    raise ValueError(
      f"model.attention_impl={impl!r} is not supported; allowed values: {['auto', *sorted(ATTENTION_IMPLS)]}"
    )
  if segment_ids_BT is not None and (
    segment_ids_BT.shape != q_BTNH.shape[:2] or k_BSKH.shape[1] != q_BTNH.shape[1]
  ):
    raise ValueError(
      f"segment_ids {segment_ids_BT.shape} must be [B, T] = {q_BTNH.shape[:2]} of self-attention "
      f"(keys: {k_BSKH.shape[1]}); packed rows cannot attend over a KV cache"
    )
  if impl == "auto":
    with_dropout = dropout is not None and not dropout.deterministic and dropout.rate > 0
    B, T, N, H = q_BTNH.shape
    impl = auto_impl(jax.default_backend(), T, H, causal, with_dropout, jnp.dtype(operand_dtype).name)
  return ATTENTION_IMPLS[impl](
    q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, causal, window, dropout, operand_dtype, segment_ids_BT
  )


def cached_attention(q_BTNH, k_BKHS, v_BKSH, q_pos_BT, k_pos_BS, window=None, operand_dtype=jnp.float32):
  """Attention of T queries over a KV cache (inference: no dropout, no gradient kernel) -> [B, T, N, H]
  in q's dtype. The cache holds keys as [B, K, H, S] and values as [B, K, S, H], the operand layouts of
  the two batched matmuls, so a decode step reads them as stored: with [B, S, K, H] XLA:CPU copied
  both into those layouts every step (~20 ms of a 90 ms 16-row SmolLM2 step, BUILD_NOTES). The mask
  comes from the positions (`masks.position_mask`; -1: an empty slot). Plain XLA on GPUs and TPUs:
  a decode step's few query rows are bound by reading the cache, which fused kernels do not change.
  On a CPU one query per row with fp32 operands goes to the C++ kernel (ops/decode_kernels.py), which
  reads each row's cache only up to its last filled slot; a row that sees no slot then gives zeros
  (XLA: the mean of its values)."""
  if _kernel_takes(q_BTNH, k_BKHS, v_BKSH, operand_dtype):
    args = (q_BTNH, k_BKHS, v_BKSH, q_pos_BT, k_pos_BS)
    kernel = lambda *a: _kernel_attention(*a, window)
    xla = lambda *a: _xla_cached_attention(*a, window, operand_dtype)
    return jax.lax.platform_dependent(*args, cpu=kernel, default=xla)
  return _xla_cached_attention(q_BTNH, k_BKHS, v_BKSH, q_pos_BT, k_pos_BS, window, operand_dtype)


def _kernel_takes(q_BTNH, k_BKHS, v_BKSH, operand_dtype) -> bool:
  """One query per row with fp32 operands on a CPU: the C++ decode kernel (ops/decode_kernels.py)."""
  fp32 = (
    all(a.dtype == jnp.float32 for a in (q_BTNH, k_BKHS, v_BKSH)) and jnp.dtype(operand_dtype) == jnp.float32
  )
  return q_BTNH.shape[1] == 1 and fp32 and jax.default_backend() == "cpu" and decode_kernels.available()


def _kernel_attention(q_BTNH, k_BKHS, v_BKSH, q_pos_BT, k_pos_BS, window):
  H = q_BTNH.shape[-1]
  q_BNH = q_BTNH[:, 0] * jnp.asarray(H**-0.5, q_BTNH.dtype)
  return decode_kernels.attention(q_BNH, k_BKHS, v_BKSH, q_pos_BT[:, 0], k_pos_BS, window)[:, None]


def _xla_cached_attention(q_BTNH, k_BKHS, v_BKSH, q_pos_BT, k_pos_BS, window, operand_dtype):
  B, T, N, H = q_BTNH.shape
  K = k_BKHS.shape[1]
  G = N // K
  q_BKMH = (q_BTNH.reshape(B, T, K, G, H) * jnp.asarray(H**-0.5, q_BTNH.dtype)).transpose(0, 2, 3, 1, 4)
  q_BKMH = q_BKMH.reshape(B, K, G * T, H).astype(operand_dtype)
  logits_BKGTS = batched_matmul(q_BKMH, k_BKHS.astype(operand_dtype)).reshape(B, K, G, T, -1)
  visible_B11TS = masks.position_mask(q_pos_BT, k_pos_BS, window, None)[:, None, None]
  logits_BKGTS = jnp.where(visible_B11TS, logits_BKGTS, _MASK_VALUE)
  exp_BKGTS = jnp.exp(logits_BKGTS - logits_BKGTS.max(-1, keepdims=True))
  sum_BKM1 = exp_BKGTS.sum(-1).reshape(B, K, G * T, 1)
  exp_BKMS = exp_BKGTS.reshape(B, K, G * T, -1).astype(operand_dtype)
  out_BKMH = batched_matmul(exp_BKMS, v_BKSH.astype(operand_dtype)) / sum_BKM1
  return out_BKMH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)


def auto_impl(
  backend: str, seq_len: int, head_dim: int, causal: bool, dropout: bool, operand_dtype: str
) -> str:
  """What `impl="auto"` runs: the fastest implementation measured for the backend and shape that
  can do the call.

  Attention dropout: xla_cpu (the only one with it). CPU: flash_cpu from CPU_FLASH_FROM query
  positions on one device where its kernel takes the call (flash_attention_cpu.takes), else xla_cpu
  below CPU_BLOCKWISE_FROM positions and blockwise from there for its O(T) memory (BUILD_NOTES:
  attention speed). GPU: cudnn for causal self-attention with bf16/fp16 operands and head dims that
  are multiples of 8 up to 128 (cuDNN's flash attention), blockwise for other training shapes. TPU:
  splash for causal self-attention over multiples of 128 positions, blockwise otherwise. Attention
  of a prompt over a KV cache on GPU/TPU (prefill): reference; a one-token decode step takes
  `cached_attention` instead. `backend` is where the step runs (jax.default_backend()), so a CPU host
  exporting for an accelerator exports the CPU choice (flash_cpu's accelerator branch is xla_cpu, or
  blockwise from CPU_BLOCKWISE_FROM positions); name the implementation to export another.
  """
  if dropout:
    return "xla_cpu"
  if backend == "cpu":
    one_device = jax.device_count() == 1
    if (
      seq_len >= CPU_FLASH_FROM
      and one_device
      and flash_attention_cpu.takes(seq_len, head_dim, causal, operand_dtype)
    ):
      return "flash_cpu"
    return "xla_cpu" if seq_len < CPU_BLOCKWISE_FROM else "blockwise"
  if not causal:
    return "reference"
  if backend == "gpu" and operand_dtype in ("bfloat16", "float16") and head_dim % 8 == 0 and head_dim <= 128:
    return "cudnn"
  if backend == "tpu" and seq_len % 128 == 0:
    return "splash"
  return "blockwise"


def _blocked(
  q_BTNH,
  k_BSKH,
  v_BSKH,
  q_pos_BT,
  k_pos_BS,
  causal,
  window,
  dropout,
  operand_dtype,
  segment_ids_BT=None,
  blocks: int | None = None,
):
  """The xla_cpu implementation (see the module docstring); `blocks`: query blocks of the causal
  path (default `causal_query_blocks(T)`; tests set more to check the block split on short inputs)."""
  dtype = q_BTNH.dtype
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  # Heads-first layout: the per-head [T, H] @ [H, S] matmuls then run on contiguous blocks.
  q_BKGTH = (q_BTNH.reshape(B, T, K, N // K, H) * jnp.asarray(H**-0.5, dtype)).transpose(0, 2, 3, 1, 4)
  k_BKSH, v_BKSH = (c.transpose(0, 2, 1, 3) for c in (k_BSKH, v_BSKH))
  if causal:
    # Plain causal self-attention: a constant mask, and query block i sees key blocks 0..i
    # only, so blocks above the diagonal are never computed (~40% less at 4 blocks). Split
    # rather than sliced: the backward then concatenates the blocks' gradients instead of
    # summing zero-padded full-length copies (6x384 training step ~5% faster).
    n = blocks or causal_query_blocks(T)
    size = T // n
    q_blocks = jnp.split(q_BKGTH, n, axis=3)
    k_blocks, v_blocks = jnp.split(k_BKSH, n, axis=2), jnp.split(v_BKSH, n, axis=2)

    def block_visible(i):
      visible_TS = masks.visible(
        np.arange(i * size, (i + 1) * size)[:, None], np.arange((i + 1) * size)[None, :], window
      )
      if segment_ids_BT is None:
        return visible_TS
      q_seg, k_seg = segment_ids_BT[:, i * size : (i + 1) * size], segment_ids_BT[:, : (i + 1) * size]
      return (visible_TS[None] & (q_seg[:, :, None] == k_seg[:, None, :]))[:, None, None]

    out_BKGTH = jnp.concatenate(
      [
        _attend(
          q_blocks[i],
          jnp.concatenate(k_blocks[: i + 1], axis=2),
          jnp.concatenate(v_blocks[: i + 1], axis=2),
          block_visible(i),
          dropout,
          operand_dtype,
        )
        for i in range(n)
      ],
      axis=3,
    )
  else:
    visible_BTS = masks.position_mask(q_pos_BT, k_pos_BS, window, segment_ids_BT)
    out_BKGTH = _attend(q_BKGTH, k_BKSH, v_BKSH, visible_BTS[:, None, None], dropout, operand_dtype)
  return out_BKGTH.astype(dtype).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _refuse_dropout(impl: str, dropout) -> None:
  """ValueError if `dropout` (a flax Dropout module or None) would drop: `impl` has no attention dropout."""
  if dropout is not None and not dropout.deterministic and dropout.rate > 0:
    raise ValueError(
      f"model.attention_impl={impl!r} has no attention dropout; set model.attn_dropout=0 or use "
      "attention_impl='xla_cpu'"
    )


def _flash_cpu(
  q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, causal, window, dropout, operand_dtype, segment_ids_BT=None
):
  """flash_cpu (see the module docstring): the C++ kernel where it takes the call on a CPU, else xla_cpu."""
  _refuse_dropout("flash_cpu", dropout)

  # Elsewhere (other calls, an accelerator's lowering) what auto would run without the kernel: xla_cpu,
  # or blockwise from CPU_BLOCKWISE_FROM positions for its O(T) memory.
  fallback = _blocked if q_BTNH.shape[1] < CPU_BLOCKWISE_FROM else blockwise_attention.blockwise

  def xla(q, k, v, q_pos, k_pos, segment_ids):
    return fallback(q, k, v, q_pos, k_pos, causal, window, dropout, operand_dtype, segment_ids)

  def kernel(q, k, v, q_pos, k_pos, segment_ids):
    return flash_attention_cpu.flash(q, k, v, segment_ids, window, operand_dtype)

  args = (q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, segment_ids_BT)
  if not flash_attention_cpu.takes(q_BTNH.shape[1], q_BTNH.shape[-1], causal, operand_dtype):
    return xla(*args)
  return jax.lax.platform_dependent(*args, cpu=kernel, default=xla)


def _reference(
  q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, causal, window, dropout, operand_dtype, segment_ids_BT=None
):
  """The reference implementation: jax.nn.dot_product_attention with the mask materialised."""
  _refuse_dropout("reference", dropout)
  if causal:
    T = q_BTNH.shape[1]
    q_pos_BT = k_pos_BS = jnp.arange(T, dtype=jnp.int32)[None]
  visible_BTS = masks.position_mask(q_pos_BT, k_pos_BS, window, segment_ids_BT)
  out_BTNH = jax.nn.dot_product_attention(
    *(x.astype(operand_dtype) for x in (q_BTNH, k_BSKH, v_BSKH)),
    mask=visible_BTS[:, None],
    implementation="xla",
  )
  return out_BTNH.astype(q_BTNH.dtype)


def causal_query_blocks(seq_len: int) -> int:
  """How many query blocks causal self-attention over `seq_len` tokens is split into.

  Blocks of at least 64 queries keep the matmuls efficient; at most 8 keep the
  unrolled graph small. Short sequences stay one block (no skipped work to gain).
  """
  blocks = min(8, seq_len // 64)
  while blocks > 1 and seq_len % blocks:
    blocks -= 1
  return max(blocks, 1)


def _attend(q_BKGTH, k_BKSH, v_BKSH, visible_TS, dropout, operand_dtype) -> jax.Array:
  """`attention_core` for grouped heads; `visible_TS` broadcasts against [B, K, G, T, S]. fp32 result."""
  B, K, G, T, H = q_BKGTH.shape
  bias = jnp.where(visible_TS, 0.0, _MASK_VALUE)
  bias = bias.reshape((1,) * (5 - bias.ndim) + bias.shape)
  bias_BKMS = jnp.broadcast_to(bias, (*bias.shape[:2], G, T, bias.shape[-1])).reshape(
    *bias.shape[:2], G * T, -1
  )
  keep_BKMS = None
  if dropout is not None and not dropout.deterministic and dropout.rate > 0:
    keep_BKMS = dropout(jnp.ones((B, K, G * T, k_BKSH.shape[2]), jnp.float32))
  out_BKMH = attention_core(
    q_BKGTH.reshape(B, K, G * T, H), k_BKSH, v_BKSH, bias_BKMS, keep_BKMS, operand_dtype
  )
  return out_BKMH.reshape(B, K, G, T, H)


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
  # A row-major copy of K pays off for training's blocks of >= 64 queries; decode steps (a few
  # query rows, when they came this way) ran ~14% slower with it (SmolLM2 bf16, batch 8), so short
  # query blocks give XLA K as is.
  k_BKHS = swap_minor(k) if q.shape[-2] >= _MIN_ROWS_FOR_K_COPY else jnp.swapaxes(k, -1, -2)
  logits_BKMS = batched_matmul(q, k_BKHS) + bias_BKMS
  exp_BKMS = jnp.exp(logits_BKMS - logits_BKMS.max(-1, keepdims=True))
  sum_BKM1 = exp_BKMS.sum(-1, keepdims=True)
  kept_BKMS = exp_BKMS if keep_BKMS is None else exp_BKMS * keep_BKMS
  out_BKMH = batched_matmul(kept_BKMS.astype(operand_dtype), v) / sum_BKM1
  return out_BKMH, (q, k, v, exp_BKMS.astype(operand_dtype), sum_BKM1, keep_BKMS, out_BKMH, dtype)


def _attention_bwd(operand_dtype, residuals, dout_BKMH):
  q, k, v, exp_BKMS, sum_BKM1, keep_BKMS, out_BKMH, dtype = residuals
  dout = dout_BKMH.astype(operand_dtype)
  probs_BKMS = exp_BKMS.astype(jnp.float32) / sum_BKM1
  dprobs_BKMS = batched_matmul(dout, swap_minor(v))
  if keep_BKMS is not None:
    dprobs_BKMS, probs_kept = dprobs_BKMS * keep_BKMS, probs_BKMS * keep_BKMS
  else:
    probs_kept = probs_BKMS
  dlogits_BKMS = probs_BKMS * (dprobs_BKMS - (dout_BKMH * out_BKMH).sum(-1, keepdims=True))
  dlogits_BKMS = dlogits_BKMS.astype(operand_dtype)
  dq = batched_matmul(dlogits_BKMS, k)
  dk = swap_minor_of_product(batched_matmul(swap_minor(q), dlogits_BKMS), operand_dtype)
  dv = swap_minor_of_product(
    batched_matmul(swap_minor(dout), probs_kept.astype(operand_dtype)), operand_dtype
  )
  return (*(d.astype(dtype.dtype) for d in (dq, dk, dv)), None, None)


attention_core.defvjp(_attention_fwd, _attention_bwd)


ATTENTION_IMPLS = {
  "xla_cpu": _blocked,
  "reference": _reference,
  "blockwise": blockwise_attention.blockwise,
  "flash_cpu": _flash_cpu,
  "cudnn": accelerator_attention.cudnn,
  "splash": accelerator_attention.splash,
}
ATTENTION_DROPOUT_IMPLS = ("auto", "xla_cpu")  # the implementations with attention dropout (auto: xla_cpu)
