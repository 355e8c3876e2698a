"""Attention through the accelerators' fused kernels: `cudnn` (GPU) and `splash` (TPU).

Both take ops/attention.py's arguments and masks (causal index order, sliding window, packed
`segment_ids`, positions with -1 padding) and give its values; neither has attention dropout
(config validation refuses it, `check` below).

  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's flash attention (Dao 2023,
          FlashAttention-2, as NVIDIA ships it). Causal self-attention and the sliding window are
          the kernel's own mask types, so no [T, S] mask exists; segment ids and padding are passed
          as a boolean mask (a [B, 1, T, S] bias inside cuDNN). Operands must be bf16 or fp16, head
          dims a multiple of 8 (<= 128, or 256 on Hopper). JAX refuses it at trace time where cuDNN is
          absent ("cuDNN is not detected"), so it cannot run or export on a CPU host.
  splash  Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention, the kernel
          MaxText uses): causal self-attention with GQA as a vmap of its multi-query kernel over KV
          heads, segment ids as its SegmentIds, the window as its LocalMask. It tiles by 128 (the lane
          width), so other lengths (a model's init batch, a prompt) and attention over a KV cache
          (decode) take `blockwise`. Off TPU the kernel runs in Pallas's interpreter
          (slow; what the CPU tests check), chosen per lowering platform, so a CPU host exports the
          real TPU kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lmjax.ops import blockwise_attention, masks

_SPLASH_LANES = 128  # splash's tiles are multiples of the TPU lane width
_CUDNN_DTYPES = ("bfloat16", "float16")


def check(impl: str, operand_dtype: str, head_dim: int) -> None:
  """Raises ValueError, at config time, for a model `impl` cannot run: cuDNN needs bf16/fp16
  operands and head dims that are multiples of 8 (cuDNN's flash attention support matrix)."""
  if impl != "cudnn":
    return
  if operand_dtype not in _CUDNN_DTYPES:
    raise ValueError(
      f"model.attention_impl='cudnn' needs bf16 or fp16 matmul operands, got {operand_dtype}; set "
      "model.matmul_dtype (or model.dtype, with matmul_dtype unset) to 'bfloat16' or 'float16', or "
      "use model.attention_impl='blockwise'"
    )
  if head_dim % 8:
    raise ValueError(
      f"model.attention_impl='cudnn' needs a head dim that is a multiple of 8, got {head_dim}; "
      "use model.attention_impl='blockwise'"
    )


def cudnn_arguments(
  q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, causal, window, operand_dtype, segment_ids_BT=None
):
  """The arguments of `jax.nn.dot_product_attention` that give ops/attention.py's masks: causal and
  window masks as the kernel's own mask types, segments and positions as a boolean [B, 1, T, S] mask."""
  arguments = {"query": q_BTNH, "key": k_BSKH, "value": v_BSKH}
  arguments = {name: x.astype(operand_dtype) for name, x in arguments.items()}
  if causal:
    arguments["is_causal"] = True
    if window is not None:
      arguments["local_window_size"] = (window - 1, 0)  # keys q - window + 1 .. q
    if segment_ids_BT is not None:
      arguments["mask"] = masks.same_segment(segment_ids_BT)[:, None]
  else:
    arguments["mask"] = masks.position_mask(q_pos_BT, k_pos_BS, window, segment_ids_BT)[:, None]
  return arguments


def cudnn(
  q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, causal, window, dropout, operand_dtype, segment_ids_BT=None
):
  """The `cudnn` implementation (module docstring)."""
  _refuse_dropout("cudnn", dropout)
  arguments = cudnn_arguments(
    q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, causal, window, operand_dtype, segment_ids_BT
  )
  return jax.nn.dot_product_attention(**arguments, implementation="cudnn").astype(q_BTNH.dtype)


def splash(
  q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, causal, window, dropout, operand_dtype, segment_ids_BT=None
):
  """The `splash` implementation (module docstring): causal self-attention over a multiple of 128
  positions in the splash kernel; other lengths and attention over a KV cache in `blockwise`."""
  # Imported on use: Pallas adds ~0.6 s to the start of every process that never calls it.
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as kernel_lib,
    splash_attention_mask as mask_lib,
  )

  _refuse_dropout("splash", dropout)
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  if not causal or T % _SPLASH_LANES:
    return blockwise_attention.blockwise(
      q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, causal, window, dropout, operand_dtype, segment_ids_BT
    )
  block = next(b for b in (512, 256, 128) if T % b == 0)
  sizes = dict(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block)
  sizes.update(block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  one_head = mask_lib.CausalMask((T, T)) if window is None else mask_lib.LocalMask((T, T), (window - 1, 0), 0)
  mask = mask_lib.MultiHeadMask([one_head] * (N // K))

  def run(interpret: bool):
    kernel = kernel_lib.make_splash_mqa(
      mask, head_shards=1, q_seq_shards=1, block_sizes=kernel_lib.BlockSizes(**sizes), interpret=interpret
    )
    seg_BT = jnp.zeros((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    # q [B, K, G, T, H] against k, v [B, K, S, H]: the multi-query kernel per (batch, KV head).
    per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    per_row = jax.vmap(lambda q, k, v, seg: per_kv_head(q, k, v, kernel_lib.SegmentIds(q=seg, kv=seg)))
    return per_row(q_BKGTH, k_BKSH, v_BKSH, seg_BT)

  q_BKGTH = (q_BTNH * jnp.asarray(H**-0.5, q_BTNH.dtype)).astype(operand_dtype)
  q_BKGTH = q_BKGTH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
  k_BKSH, v_BKSH = (x.astype(operand_dtype).transpose(0, 2, 1, 3) for x in (k_BSKH, v_BSKH))
  out_BKGTH = jax.lax.platform_dependent(
    tpu=functools.partial(run, False), default=functools.partial(run, True)
  )
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)


def _refuse_dropout(impl: str, dropout) -> None:
  if dropout is not None and not dropout.deterministic and dropout.rate > 0:
    raise ValueError(f"model.attention_impl={impl!r} has no attention dropout; set model.attn_dropout=0")
