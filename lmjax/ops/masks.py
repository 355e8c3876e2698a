"""The attention masks every implementation shares, described by positions (ops/attention.py).

A key at position k is visible to a query at q iff k >= 0 (-1 marks padding) and 0 <= q - k (and
q - k < window with a sliding window); with packed `segment_ids` also only within a segment.
"""

from __future__ import annotations


def position_mask(q_pos_BT, k_pos_BS, window, segment_ids_BT):
  """bool [B, T, S] visibility from positions (padding, causal, window) and, if given, segments."""
  visible_BTS = (k_pos_BS[:, None, :] >= 0) & visible(q_pos_BT[:, :, None], k_pos_BS[:, None, :], window)
  if segment_ids_BT is not None:
    visible_BTS = visible_BTS & same_segment(segment_ids_BT)
  return visible_BTS


def same_segment(segment_ids_BT):
  """bool [B, T, T]: query and key in the same packed document."""
  return segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]


def visible(q_pos, k_pos, window: int | None):
  """The causal (and sliding-window) rule on broadcasting query/key positions, numpy or jax."""
  causal = k_pos <= q_pos
  return causal if window is None else causal & (q_pos - k_pos < window)
