"""Next-token cross-entropy from the last hidden states, in chunks of tokens for large vocabularies.

The full [B, T, V] fp32 logits of a 50k vocabulary are most of a long sequence's step memory (and
their backward copy as much again). Cut into chunks of the sequence, each chunk's logits are made,
reduced to a loss sum and, under `jax.checkpoint`, made again in the backward instead of being kept:
memory O(B * chunk * V) instead of O(B * T * V), for one extra head matmul. The same sums as the
full computation (to fp32 rounding). Chosen automatically (`chunk_length`); the small vocabularies
of char/byte models keep the plain path. As in MaxText's vocabulary tiling and Liger's fused loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

MAX_CHUNK_LOGITS = 1 << 26  # B * chunk * V fp32 values per chunk (256 MB)
MIN_VOCAB = 8192  # below this the logits are small: one plain computation


def chunk_length(batch: int, seq_len: int, vocab: int) -> int:
  """Tokens per row in a chunk: the longest power of two dividing `seq_len` with at most
  MAX_CHUNK_LOGITS logits per chunk; `seq_len` itself (no chunking) for small vocabularies."""
  if vocab < MIN_VOCAB:
    return seq_len
  chunk = seq_len
  while chunk > 1 and (batch * chunk * vocab > MAX_CHUNK_LOGITS or seq_len % chunk):
    chunk //= 2
  return chunk if seq_len % chunk == 0 else seq_len


def token_loss_sum(x_BTD, head, targets_BT, mask_BT=None) -> tuple[jax.Array, jax.Array]:
  """(sum of cross-entropies over the masked-in tokens, their count), fp32 scalars, where the logits
  are `head(x)` [B, chunk, V] fp32 of hidden states x [B, chunk, D], computed chunk by chunk."""
  B, T, D = x_BTD.shape
  mask_BT = jnp.ones((B, T), jnp.float32) if mask_BT is None else mask_BT.astype(jnp.float32)

  def chunk_sum(x_BCD, targets_BC, mask_BC):
    losses_BC = optax.softmax_cross_entropy_with_integer_labels(head(x_BCD), targets_BC)
    return (losses_BC * mask_BC).sum()

  vocab = jax.eval_shape(head, jax.ShapeDtypeStruct((B, 1, D), x_BTD.dtype)).shape[-1]
  chunk = chunk_length(B, T, vocab)
  if chunk == T:
    return chunk_sum(x_BTD, targets_BT, mask_BT), mask_BT.sum()
  n = T // chunk
  split = lambda a: a.reshape(B, n, chunk, *a.shape[2:]).swapaxes(0, 1)
  step = jax.checkpoint(lambda total, parts: (total + chunk_sum(*parts), None))
  total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (split(x_BTD), split(targets_BT), split(mask_BT)))
  return total, mask_BT.sum()
