"""Token streams and step-indexed batches (DESIGN.md property 2).

The batch for step `s` is a pure function of (seed, s): no iterator state
exists, so a resumed run sees exactly the batches an uninterrupted run would,
and a run on 1, 2 or 4 processes sees the same global batch, each process
materialising only its own rows.

Sampling: nanoGPT's random windows. Each example is `seq_len + 1` consecutive
tokens starting at an offset drawn uniformly from the token stream (with
replacement), by a generator seeded with (seed, step). We chose it over an
epoch-shuffled permutation of fixed chunks because (a) every offset is an
example, which matters on small corpora like Shakespeare where fixed chunks
would repeat the same 64-token windows each epoch, (b) it needs no epoch or
permutation bookkeeping to stay a pure function of the step, and (c) it is the
sampler of the nanoGPT results we compare against.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lmjax.data import text_datasets, tokenizers
from lmjax.data.tokenizer_base import Tokenizer


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A tokenized text corpus: the tokenizer and the int32 token streams of the train and validation splits."""

  tokenizer: Tokenizer
  train_ids: np.ndarray  # int32 token stream of the train split
  val_ids: np.ndarray  # int32 token stream of the validation split


def load_corpus(data_cfg, tokenizer=None) -> Corpus:
  """Loads (preparing on first use) `data_cfg.dataset` and tokenizes both splits.

  `tokenizer` is the run's saved tokenizer when resuming; otherwise one of kind
  `data_cfg.tokenizer` is fitted to the train split.
  """
  train_text, val_text = text_datasets.load_splits(data_cfg)
  if tokenizer is None:
    tokenizer = tokenizers.train(data_cfg.tokenizer, train_text, data_cfg.get("vocab_size"))
  encode = lambda text: np.asarray(tokenizer.encode(text), np.int32)
  return Corpus(tokenizer, encode(train_text), encode(val_text))


def batch_at(
  ids: np.ndarray,
  seed: int,
  step: int,
  batch_size: int,
  seq_len: int,
  process_index: int = 0,
  process_count: int = 1,
) -> dict:
  """This process's rows of the global batch for `step`: inputs/targets [rows, seq_len].

  The window offsets of the whole global batch are drawn on every process (a
  few integers), then each process gathers only its contiguous block of rows.
  """
  if len(ids) < seq_len + 1:
    raise ValueError(
      f"the token stream has {len(ids)} tokens, fewer than one sequence of seq_len+1="
      f"{seq_len + 1}; use a longer corpus or a smaller train.seq_len"
    )
  if batch_size % process_count:
    raise ValueError(f"the global batch size {batch_size} must be divisible by the {process_count} processes")
  rows = batch_size // process_count
  starts = np.random.default_rng([seed, step]).integers(0, len(ids) - seq_len, size=batch_size)
  starts = starts[process_index * rows : (process_index + 1) * rows]
  windows = ids[starts[:, None] + np.arange(seq_len + 1)]
  return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def encode_padded(tokenizer, texts, seq_len: int):
  """Right-padded token ids [N, seq_len] and positions (-1 = padding), each text cut to seq_len."""
  tokens = np.zeros((len(texts), seq_len), np.int32)
  positions = np.full((len(texts), seq_len), -1, np.int32)
  for row, text in enumerate(texts):
    ids = tokenizer.encode(text)[:seq_len]
    tokens[row, : len(ids)], positions[row, : len(ids)] = ids, np.arange(len(ids))
  return tokens, positions
