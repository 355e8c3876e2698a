"""Step-indexed batches from a token store, and Grain prefetch of any step-indexed batches.

The batch for step `s` is a pure function of (seed, s, process) (DESIGN.md property 2): no
iterator state exists, so a resumed run sees exactly the batches an uninterrupted run would, and a
run on 1, 2 or 4 processes sees the same global batch, each process reading only its own rows.

Rows (`StoreBatches`):
  windows  nanoGPT's random windows: `seq_len + 1` consecutive tokens at an offset drawn uniformly
           from the split by a generator seeded with (seed, step). Every offset is an example (which
           matters on small corpora), and it is the sampler of the nanoGPT results we compare with.
  packed   (`data.packing=True`) the same windows, plus `segment_ids` (1, 2, ... per document in the
           row), `positions` restarting at 0 where each document starts, and a loss `mask` that
           drops the one target per boundary that would predict across documents. With the model's
           segment mask, each document in a row trains exactly as it would alone in a padded row.
Mixtures: with several sources each row's source is drawn from the same (seed, step) generator
with probabilities proportional to the weights, then its offset within that source.

`prefetch` runs a batch function ahead of the training step on Grain's background threads
(`grain.MapDataset` over step indices): Grain provides the prefetch, our function the sampling,
because the sampling must stay a pure function of the step.
"""

from __future__ import annotations

import numpy as np


class StoreBatches:
  """`(step, process_index, process_count) -> batch` over one split of a store's sources.

  The batch holds int32 `inputs`/`targets` [rows, seq_len] (rows = batch_size / process_count)
  and, packed, int32 `segment_ids`/`positions` and float32 `mask` of the same shape. Every split
  must hold seq_len + 1 tokens (train/preflight.py checks). Raises ValueError when the batch does
  not divide over the processes.
  """

  def __init__(self, store, weights, split: str, seed: int, batch_size: int, seq_len: int, packing: bool):
    self.splits = [store.split(i, split) for i in range(len(weights))]
    self.probabilities = np.asarray(weights, np.float64) / np.sum(weights)
    self.seed, self.batch_size, self.seq_len, self.packing = seed, batch_size, seq_len, packing

  def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(source index, window start) of every row of the global batch for `step`."""
    rng = np.random.default_rng([self.seed, step])
    if len(self.splits) == 1:  # the single-source draw is exactly the earlier sampler's
      return np.zeros(self.batch_size, np.int64), rng.integers(
        0, self.splits[0].tokens - self.seq_len, size=self.batch_size
      )
    source_R = rng.choice(len(self.splits), size=self.batch_size, p=self.probabilities)
    room_R = np.array([s.tokens - self.seq_len for s in self.splits])[source_R]
    return source_R, (rng.random(self.batch_size) * room_R).astype(np.int64)

  def __call__(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
    if self.batch_size % process_count:
      raise ValueError(
        f"the global batch size {self.batch_size} must be divisible by the {process_count} processes"
      )
    mine = slice(
      process_index * self.batch_size // process_count, (process_index + 1) * self.batch_size // process_count
    )
    source_R, start_R = (a[mine] for a in self.rows(step))
    length = self.seq_len + 1
    windows_RL = np.stack([self.splits[s].window(int(o), length) for s, o in zip(source_R, start_R)])
    batch = {"inputs": windows_RL[:, :-1], "targets": windows_RL[:, 1:]}
    if self.packing:
      segment_ids_RL = np.empty(windows_RL.shape, np.int32)
      positions_RL = np.empty(windows_RL.shape, np.int32)
      for s in np.unique(source_R):
        rows = source_R == s
        segment_ids_RL[rows], positions_RL[rows] = self.splits[s].documents(start_R[rows], length)
      batch["segment_ids"], batch["positions"] = segment_ids_RL[:, :-1], positions_RL[:, :-1]
      batch["mask"] = (segment_ids_RL[:, :-1] == segment_ids_RL[:, 1:]).astype(np.float32)
    return batch


def prefetch(make_batch, start: int, stop: int, process_index: int, process_count: int, ahead: int = 4):
  """An iterator over `make_batch(step, process_index, process_count)` for steps start..stop-1,
  computed `ahead` steps in advance on Grain's background threads."""
  import grain

  steps = grain.MapDataset.range(start, stop).map(lambda step: make_batch(step, process_index, process_count))
  return iter(steps.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=ahead)))
