"""`blockwise` attention: FlashAttention's algorithm in plain JAX, O(T) memory on any backend.

Queries and keys are cut into blocks; for each query block a loop over key blocks keeps a running
max, softmax denominator and output (online softmax), so no [T, S] score matrix exists, only one
[block, block] tile at a time. The custom VJP keeps only the output and the row log-sum-exp and
recomputes each tile in the backward (dS = P * (dP - rowsum(dO * O))). Dao et al. 2022,
Algorithms 1 and 2; Rabe & Staats 2021 (memory-efficient attention).

Causal self-attention skips the key blocks above the diagonal (a loop bound per query block).
Masks are those of ops/attention.py: positions (-1 padding, causal, sliding window) and, for packed
rows, segment ids. No attention dropout (config validation refuses it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lmjax.ops.matmul import batched_matmul, swap_minor

_MAX_BLOCK = 512  # rows per tile: [G*512, 512] fp32 scores per (batch, kv head) at a time
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def block_size(length: int) -> int:
  """The largest power-of-two block <= _MAX_BLOCK dividing `length` (the whole length if none >= 16)."""
  size = _MAX_BLOCK
  while size >= 16:
    if length % size == 0:
      return size
    size //= 2
  return length


def blockwise(
  q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, causal, window, dropout, operand_dtype, segment_ids_BT=None
):
  """The `blockwise` implementation behind ops.attention.attention (same arguments and result)."""
  if dropout is not None and not dropout.deterministic and dropout.rate > 0:
    raise ValueError("model.attention_impl='blockwise' has no attention dropout; set model.attn_dropout=0")
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  if causal:  # the mask is index order (positions then only feed the position encodings)
    q_pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    k_pos_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  q_seg = jnp.zeros((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
  k_seg = jnp.zeros((B, S), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
  # [B, K, G*T, H]: the G query heads sharing a kv head become rows (g, t) of one matrix.
  q_BKMH = (q_BTNH * jnp.asarray(H**-0.5, q_BTNH.dtype)).reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
  # Cast once here, not in every tile: fp32 activations with bf16 matmuls (8192 positions, 6x384
  # training step on CPU) otherwise pay a cast per tile and keep fp32 residuals.
  q_BKMH = q_BKMH.reshape(B, K, (N // K) * T, H).astype(operand_dtype)
  k_BKSH, v_BKSH = (x.transpose(0, 2, 1, 3).astype(operand_dtype) for x in (k_BSKH, v_BSKH))
  out_BKMH = _flash(
    q_BKMH, k_BKSH, v_BKSH, q_pos_BT, k_pos_BS, q_seg, k_seg, causal, window, jnp.dtype(operand_dtype)
  )
  out = out_BKMH.reshape(B, K, N // K, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
  return out.astype(q_BTNH.dtype)


def _tiles(q_BKMH, q_pos, k_pos):
  """Block geometry: (G, T, block_q, block_k, number of query and key blocks)."""
  T, S = q_pos.shape[1], k_pos.shape[1]
  G = q_BKMH.shape[2] // T
  bq, bk = block_size(T), block_size(S)
  return G, T, bq, bk, T // bq, S // bk


def _tile_scores(q_blk, k_blk, qp, kp, qs, ks, window, operand_dtype):
  """Masked scores [B, K, G*bq, bk] (fp32) of one tile; q rows are (g, t) with t from `qp` [B, bq]."""
  s = batched_matmul(q_blk.astype(operand_dtype), swap_minor(k_blk.astype(operand_dtype)))
  visible = (kp[:, None, :] >= 0) & (kp[:, None, :] <= qp[:, :, None]) & (qs[:, :, None] == ks[:, None, :])
  if window is not None:
    visible = visible & (qp[:, :, None] - kp[:, None, :] < window)
  B, bq, bk = visible.shape
  G = s.shape[2] // bq
  visible = jnp.broadcast_to(visible[:, None, None], (B, 1, G, bq, bk)).reshape(B, 1, G * bq, bk)
  return jnp.where(visible, s, _NEG)


def _q_block(x_BKMH, i, G, T, bq):
  """Rows (g, t) for t in query block i, all g: [B, K, G*bq, H]."""
  B, K, _, H = x_BKMH.shape
  x = x_BKMH.reshape(B, K, G, T, -1)
  return jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=3).reshape(B, K, G * bq, x.shape[-1])


def _key_blocks_for(i, n_k, bq, bk, causal):
  """Key blocks query block i needs: all, or with a causal mask those up to its diagonal."""
  return jnp.minimum(n_k, ((i + 1) * bq + bk - 1) // bk) if causal else n_k


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(q, k, v, q_pos, k_pos, q_seg, k_seg, causal, window, operand_dtype):
  return _flash_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, causal, window, operand_dtype)[0]


def _flash_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, causal, window, operand_dtype):
  G, T, bq, bk, n_q, n_k = _tiles(q, q_pos, k_pos)
  B, K, _, H = q.shape

  def one_query_block(i):
    q_blk = _q_block(q, i, G, T, bq)
    qp, qs = (jax.lax.dynamic_slice_in_dim(a, i * bq, bq, axis=1) for a in (q_pos, q_seg))

    def step(j, carry):
      m, l, acc = carry
      k_blk, v_blk = (jax.lax.dynamic_slice_in_dim(a, j * bk, bk, axis=2) for a in (k, v))
      kp, ks = (jax.lax.dynamic_slice_in_dim(a, j * bk, bk, axis=1) for a in (k_pos, k_seg))
      s = _tile_scores(q_blk, k_blk, qp, kp, qs, ks, window, operand_dtype)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      scale = jnp.exp(m - m_new)
      pv = batched_matmul(p.astype(operand_dtype), v_blk.astype(operand_dtype))
      return m_new, l * scale + p.sum(-1), acc * scale[..., None] + pv

    init = (
      jnp.full((B, K, G * bq), _NEG, jnp.float32),
      jnp.zeros((B, K, G * bq), jnp.float32),
      jnp.zeros((B, K, G * bq, H), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(0, _key_blocks_for(i, n_k, bq, bk, causal), step, init)
    return acc / l[..., None], m + jnp.log(l)

  out_blocks, lse_blocks = jax.lax.map(one_query_block, jnp.arange(n_q))
  out = _from_blocks(out_blocks, G, bq)  # [B, K, G*T, H]
  lse = _from_blocks(lse_blocks[..., None], G, bq)[..., 0]
  return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse)


def _from_blocks(x_nBKMX, G, bq):
  """[n, B, K, G*bq, X] query-block results -> [B, K, G*T, X] in (g, t) row order."""
  n, B, K, _, X = x_nBKMX.shape
  x = x_nBKMX.reshape(n, B, K, G, bq, X).transpose(1, 2, 3, 0, 4, 5)
  return x.reshape(B, K, G * n * bq, X)


def _flash_bwd(causal, window, operand_dtype, residuals, dout):
  q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse = residuals
  G, T, bq, bk, n_q, n_k = _tiles(q, q_pos, k_pos)
  delta = (dout.astype(jnp.float32) * out).sum(-1)  # rowsum(dO * O)
  dout = dout.astype(operand_dtype)

  def probs(i, j):
    """(q block, dO block, P tile, k block, v block) for query block i and key block j."""
    q_blk, do_blk = _q_block(q, i, G, T, bq), _q_block(dout, i, G, T, bq)
    lse_blk, delta_blk = (_q_block(x[..., None], i, G, T, bq)[..., 0] for x in (lse, delta))
    qp, qs = (jax.lax.dynamic_slice_in_dim(a, i * bq, bq, axis=1) for a in (q_pos, q_seg))
    k_blk, v_blk = (jax.lax.dynamic_slice_in_dim(a, j * bk, bk, axis=2) for a in (k, v))
    kp, ks = (jax.lax.dynamic_slice_in_dim(a, j * bk, bk, axis=1) for a in (k_pos, k_seg))
    s = _tile_scores(q_blk, k_blk, qp, kp, qs, ks, window, operand_dtype)
    p = jnp.exp(s - lse_blk[..., None])
    dp = batched_matmul(do_blk.astype(operand_dtype), swap_minor(v_blk.astype(operand_dtype)))
    ds = p * (dp - delta_blk[..., None])
    return q_blk, do_blk, p, ds, k_blk

  def dq_block(i):  # dQ_i = sum_j dS_ij K_j
    def step(j, acc):
      _, _, _, ds, k_blk = probs(i, j)
      return acc + batched_matmul(ds.astype(operand_dtype), k_blk.astype(operand_dtype))

    zero = jnp.zeros(q.shape[:2] + (G * bq, q.shape[-1]), jnp.float32)
    return jax.lax.fori_loop(0, _key_blocks_for(i, n_k, bq, bk, causal), step, zero)

  def dkv_block(j):  # dK_j = sum_i dS_ij^T Q_i, dV_j = sum_i P_ij^T dO_i
    first = (j * bk) // bq if causal else 0  # query blocks before it see none of this key block

    def step(i, acc):
      dk, dv = acc
      q_blk, do_blk, p, ds, _ = probs(i, j)
      dk = dk + batched_matmul(swap_minor(ds.astype(operand_dtype)), q_blk.astype(operand_dtype))
      dv = dv + batched_matmul(swap_minor(p.astype(operand_dtype)), do_blk.astype(operand_dtype))
      return dk, dv

    zero = jnp.zeros(k.shape[:2] + (bk, k.shape[-1]), jnp.float32)
    return jax.lax.fori_loop(first, n_q, step, (zero, zero))

  dq = _from_blocks(jax.lax.map(dq_block, jnp.arange(n_q)), G, bq)
  dk_blocks, dv_blocks = jax.lax.map(dkv_block, jnp.arange(n_k))
  dk, dv = (x.transpose(1, 2, 0, 3, 4).reshape(k.shape) for x in (dk_blocks, dv_blocks))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
