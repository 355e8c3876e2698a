"""Text corpora, their train/validation split, and step-indexed batches.

A batch is a pure function of (seed, step): no iterator state exists, so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from lmjax import shakespeare, tokenizers


@dataclasses.dataclass(frozen=True)
class Corpus:
  tokenizer: object
  train_ids: np.ndarray  # int32 token stream
  val_ids: np.ndarray


def load_text(dataset: str) -> str:
  if dataset == "shakespeare":
    return shakespeare.shakespeare_text()
  raise ValueError(f"data.dataset={dataset!r} is not supported; allowed values: ['shakespeare']")


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
  """Contiguous split: validation is the last `val_fraction` of the text."""
  if not text:
    raise ValueError("the corpus is empty: nothing to train on")
  cut = int(len(text) * (1 - val_fraction))
  return text[:cut], text[cut:]


def load_corpus(data_cfg) -> Corpus:
  train_text, val_text = split_text(load_text(data_cfg.dataset), data_cfg.val_fraction)
  tokenizer = tokenizers.CharTokenizer.train(train_text)
  encode = lambda s: np.asarray(tokenizer.encode(s), np.int32)
  return Corpus(tokenizer, encode(train_text), encode(val_text))


def batch_at(ids: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int) -> dict:
  """Random windows of `seq_len + 1` tokens; inputs and targets are shifted by one."""
  if len(ids) <= seq_len + 1:
    raise ValueError(f"a token stream of {len(ids)} tokens is too short for seq_len={seq_len}")
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
  windows = np.stack([ids[s:s + seq_len + 1] for s in starts])
  return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
