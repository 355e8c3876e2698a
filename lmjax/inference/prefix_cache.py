"""Automatic prefix caching for the engine (inference/engine.py): the KV caches of recent prompts and of
finished replies with their prompts, so a prompt that begins with one of them is prefilled only from
where they part.

A multi-turn chat sends its whole history every turn, and clients often repeat a long system prompt
or document with different questions. Keys and values at positions below L depend only on the first L
tokens, so a prompt sharing its first L tokens with a kept one can start from that one's cache cut to
L columns and prefill the rest as the next pieces of its chunked prefill. vLLM's automatic prefix
caching and SGLang's RadixAttention (Zheng et al. 2024) keep such prefixes in blocks shared between
requests; here each kept prompt is a one-row cache of its own, copied when reused, the least recently
used dropped first. The reused keys and values come from another forward (a pack, or other pieces), so
a prompt's logits equal an uncached prefill's up to float rounding, as packing's do (engine.py).
"""

import collections

import jax
import jax.numpy as jnp

from lmjax.inference import engine_steps

# Shared prefixes shorter than this are prefilled again: the copy would cost about what it saves.
MIN_REUSE = 32


@jax.jit
def prefix_of(row_cache: dict, length) -> dict:
  """A copy of the one-row `row_cache` holding only its first `length` tokens: keys and values past them
  zeroed, their positions -1 (empty), `end` = length. New buffers, so `row_cache` itself survives the
  prefills that are given (and donate) the copy."""
  keep_S = jnp.arange(row_cache["pos"].shape[1]) < length

  def cut(a, axis):  # keys are stored [..., H, S] and values [..., S, H] (model.init_cache)
    shape = [a.shape[d] if d == a.ndim + axis else 1 for d in range(a.ndim)]
    return jnp.where(keep_S.reshape(shape), a, jnp.zeros((), a.dtype))

  each = lambda x, axis: tuple(cut(a, axis) for a in x) if isinstance(x, tuple) else cut(x, axis)
  return {
    "k": each(row_cache["k"], -1),
    "v": each(row_cache["v"], -2),
    "pos": jnp.where(keep_S[None], row_cache["pos"], -1),
    "end": jnp.reshape(length, (1,)).astype(jnp.int32),
  }


def common_prefix(a, b) -> int:
  """How many leading tokens the sequences `a` and `b` share."""
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


class PrefixCache:
  """Up to `capacity` one-row caches (`max_context` columns each, so capacity x one row of the engine's
  cache in memory) of prompts, as their prefill leaves them, and of finished replies with their prompts
  (a chat's next turn begins with both), least recently used out first; capacity 0 keeps none."""

  def __init__(self, capacity: int, max_context: int, prefill_chunk: int):
    if capacity < 0:
      raise ValueError(f"prefix_cache={capacity}: give how many prompts to keep, 0 or more")
    self.capacity, self.max_context, self.prefill_chunk = capacity, max_context, prefill_chunk
    self._kept: collections.OrderedDict = collections.OrderedDict()  # prompt tuple -> row cache
    self.hits = self.reused_tokens = 0

  def store(self, prompt_ids, row_cache: dict) -> None:
    """Keeps `row_cache` (it holds exactly `prompt_ids`, and nothing may donate it afterwards)."""
    if self.capacity == 0:
      return
    key = tuple(prompt_ids)
    self._kept.pop(key, None)
    self._kept[key] = row_cache
    while len(self._kept) > self.capacity:
      self._kept.popitem(last=False)

  def clear(self) -> None:
    """Drops every kept prompt (the hit counters stay)."""
    self._kept.clear()

  def lookup(self, prompt_ids) -> tuple[dict, int] | None:
    """(a copy of a kept cache cut to L tokens, L) for the kept prompt sharing the longest prefix with
    `prompt_ids`, or None when no prefix of at least MIN_REUSE tokens is shared. L leaves at least one
    token to prefill (it gives the first sampled token). The engine's first piece after L ends at the
    next multiple of prefill_chunk, so later pieces fall where uncached prompts' do; that first piece
    pads to a power of two (warmed up with prefix caching on) unless it would not fit the columns left,
    and then L moves down to a multiple of prefill_chunk instead, where every bucket is warmed up."""
    best, best_key = 0, None
    for key in self._kept:
      shared = min(common_prefix(key, prompt_ids), len(prompt_ids) - 1)
      if shared > best:
        best, best_key = shared, key
    piece = engine_steps.piece_length(best, len(prompt_ids), self.prefill_chunk)
    if engine_steps.bucket(piece, self.max_context) > self.max_context - best:
      best -= best % self.prefill_chunk
    if best < MIN_REUSE:
      return None
    self._kept.move_to_end(best_key)
    self.hits, self.reused_tokens = self.hits + 1, self.reused_tokens + best
    return prefix_of(self._kept[best_key], jnp.int32(best)), best
