"""Training objectives, each returned as a token-weighted sum and its weight.

A loss is `(loss_sum, weight)` rather than a mean so that gradient accumulation and evaluation
over several batches reduce exactly as the full batch would: the mean is `sum(loss_sums) /
sum(weights)` (a mean of per-micro-batch means is not, when micro-batches hold different numbers
of masked-in tokens, as SFT batches do).
"""

from __future__ import annotations

from typing import TypedDict

import jax
import jax.numpy as jnp
import optax


class LMBatch(TypedDict, total=False):
  """The batch of next-token objectives (pretraining, SFT): every array [B, T], B the batch rows of
  this process (or micro-batch), T = train.seq_len. The data layer builds it as numpy
  (data/corpus.py `batch_at`, data/sft.py `batch_at`); the trainer places it on the mesh."""

  inputs: jax.Array  # int32 token ids
  targets: jax.Array  # int32 ids of the next tokens (inputs shifted by one)
  mask: jax.Array  # float32, 1 on tokens that count (SFT responses and EOS); absent: all count
  positions: jax.Array  # int32 position of each token in its document (packed rows)
  segment_ids: jax.Array  # int32 document of each token (packed rows): attention stays inside one


class PairBatch(TypedDict):
  """The batch of the contrastive objective (retrieval): B (query, passage) pairs, each [B, T] with
  positions -1 on padding (tasks/finetuning.py)."""

  query: jax.Array  # int32
  query_pos: jax.Array  # int32
  passage: jax.Array  # int32
  passage_pos: jax.Array  # int32


def token_loss_sum(logits_BTV, targets_BT, mask_BT=None) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token cross-entropies over the masked-in tokens, their count), both fp32 scalars.

  Without a mask every token counts (pretraining); with one, only tokens where mask_BT is 1 (SFT
  responses).
  """
  losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
  if mask_BT is None:
    return losses_BT.sum(), jnp.asarray(losses_BT.size, jnp.float32)
  return (losses_BT * mask_BT).sum(), mask_BT.sum().astype(jnp.float32)


def cross_entropy(logits_BTV, targets_BT, mask_BT=None) -> jax.Array:
  """Mean next-token loss over the masked-in tokens (all tokens without a mask)."""
  total, count = token_loss_sum(logits_BTV, targets_BT, mask_BT)
  return total / jnp.maximum(count, 1.0)


def lm_loss(run_model, batch: LMBatch) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy (sum, token count); `run_model(tokens, **kwargs)` is the model with its
  weights bound; `batch` holds inputs/targets [B, T] and optionally a loss mask [B, T] and, for
  packed documents, positions and segment_ids [B, T]."""
  packed = {}
  if "segment_ids" in batch:
    packed = {"positions_BT": batch["positions"], "segment_ids_BT": batch["segment_ids"]}
  # The model computes the loss itself: for large vocabularies in chunks, never holding all logits.
  return run_model(batch["inputs"], targets_BT=batch["targets"], loss_mask_BT=batch.get("mask"), **packed)


def contrastive_loss(run_model, batch: PairBatch, temperature: float = 0.05) -> tuple[jax.Array, jax.Array]:
  """InfoNCE over in-batch negatives (query i should be closest to passage i), as (sum over the B
  queries, B). Its negatives are the whole batch, so it cannot be accumulated over micro-batches
  (config.validate refuses train.grad_accum > 1 with it). van den Oord et al. 2018, eq. 4."""
  q_BD = mean_pooled(run_model, batch["query"], batch["query_pos"])
  p_BD = mean_pooled(run_model, batch["passage"], batch["passage_pos"])
  logits_BB = q_BD @ p_BD.T / temperature
  losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BB, jnp.arange(logits_BB.shape[0]))
  return losses_B.sum(), jnp.asarray(losses_B.shape[0], jnp.float32)


def mean_pooled(run_model, tokens_BT, positions_BT) -> jax.Array:
  """L2-normalised mean of the last hidden states over real (position >= 0) tokens.

  `run_model(tokens, **kwargs)` is the model with its weights bound; the contrastive training loss
  (`contrastive_loss`) and evaluators.embed share this definition.
  """
  hidden_BTD = run_model(tokens_BT, positions_BT=positions_BT, return_hidden=True)
  valid_BT1 = (positions_BT >= 0)[..., None]
  pooled_BD = (hidden_BTD * valid_BT1).sum(1) / jnp.maximum(valid_BT1.sum(1), 1)
  return pooled_BD / jnp.linalg.norm(pooled_BD, axis=-1, keepdims=True)
