"""The compiled steps of continuous batching (inference/engine.py schedules them): a prompt piece's
prefill into its own one-row cache, several whole prompts' prefill packed into one row, the row's move
into the engine's cache, the decode step over every row, and the cache's resize. Each is jitted, so
the engine compiles one program per shape (its `warmup` runs them all once)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import model
from lmjax.inference.row_sampling import sample_rows, token_keys, token_logprobs


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("row_cache",))
def prefill(cfg, params, row_cache, tokens_1P, length, seed, temperature, top_k, top_p, wanted):
  """The next piece of one prompt (tokens_1P right-padded; its first `length` tokens real) into the
  prompt's one-row cache, which holds its first row_cache["end"] tokens, and the token drawn after the
  piece (the request's first token when the piece ends the prompt). Returns (row_cache, token_1, its
  token_logprobs, computed if `wanted`).
  Compiled per piece bucket, whatever the size of the engine's cache (`insert` puts the row in)."""
  P = tokens_1P.shape[1]
  start_1 = row_cache["end"]
  positions_1P = jnp.where(jnp.arange(P) < length, start_1[0] + jnp.arange(P), -1)[None]
  logits_11V, row_cache = model.Transformer(cfg).apply(
    {"params": params},
    tokens_1P,
    positions_BT=positions_1P,
    cache=row_cache,
    logits_at_BN=(length - 1)[None, None],
  )
  keys_1 = token_keys(seed[None], jnp.zeros((1,), jnp.int32))
  token_1 = sample_rows(logits_11V[:, 0], keys_1, temperature[None], top_k[None], top_p[None])
  logprobs = token_logprobs(logits_11V[:, 0], token_1, wanted)
  return {**row_cache, "end": start_1 + length}, token_1, logprobs


@functools.partial(jax.jit, static_argnames=("cfg",))
def prefill_packed(
  cfg, params, tokens_1P, positions_1P, segments_1P, last_R, seeds_R, temperature_R, top_k_R, top_p_R, wanted
):
  """Several whole prompts in one row: tokens_1P holds them one after another (then padding), each with
  its own positions from 0 and segment id (1, 2, ...; padding: position -1, segment 0), so one forward
  fills a cache of exactly P columns in which each prompt attends only to itself (the packing of
  training's `segment_ids`, model/transformer.py). last_R: each prompt's last index in the row, one of
  R rows (R the engine's max_batch; unused rows 0). Returns (the packed cache, the token drawn after
  each prompt [R], their token_logprobs, computed if `wanted`); `unpacked_row` moves a prompt's
  columns out. Compiled per bucket P: one call does the work of one prefill per prompt, whose padding
  it shares (SmolLM2 fp32 here: a 64-token row runs at ~125 GFLOP/s, a 256-token one at ~175)."""
  P = tokens_1P.shape[1]
  cache = {**model.init_cache(cfg, 1, P), "end": jnp.zeros((1,), jnp.int32)}
  logits_1RV, cache = model.Transformer(cfg).apply(
    {"params": params},
    tokens_1P,
    positions_BT=positions_1P,
    cache=cache,
    segment_ids_BT=segments_1P,
    logits_at_BN=last_R[None],
  )
  keys_R = token_keys(seeds_R, jnp.zeros_like(last_R))
  tokens_R = sample_rows(logits_1RV[0], keys_R, temperature_R, top_k_R, top_p_R)
  return cache, tokens_R, token_logprobs(logits_1RV[0], tokens_R, wanted)


def packed_inputs(requests: list, room: int, max_batch: int, vocab_size: int) -> tuple:
  """prefill_packed's inputs after (cfg, params) for the requests' whole prompts, one after another in a
  row padded to its bucket (at most `room`), equal prompts once, each request sampling its first token
  there with its own settings (columns past the requests greedy). Returns (the inputs as arrays but
  `wanted`, each request's prompt offset in the row)."""
  starts = {}  # prompt -> its offset in the row
  for r in requests:
    starts.setdefault(tuple(r.prompt_ids), sum(map(len, starts)))
  P = bucket(sum(map(len, starts)), room)
  (tokens, segments), positions = np.zeros((2, 1, P), np.int32), np.full((1, P), -1, np.int32)
  last, settings = np.zeros(max_batch, np.int32), np.zeros((4, max_batch), np.float64)
  settings[3] = 1.0  # rows of seed, temperature, top_k, top_p
  for segment, (prompt, offset) in enumerate(starts.items(), 1):
    window = slice(offset, offset + len(prompt))
    tokens[0, window], positions[0, window], segments[0, window] = prompt, np.arange(len(prompt)), segment
  offsets = [starts[tuple(r.prompt_ids)] for r in requests]
  for i, (r, offset) in enumerate(zip(requests, offsets)):
    last[i] = offset + len(r.prompt_ids) - 1
    settings[:, i] = (r.seed % 2**32, r.temperature, min(r.top_k, vocab_size), r.top_p)
  arrays = map(jnp.asarray, (tokens, positions, segments, last))
  return (*arrays, *map(jnp.asarray, settings, (jnp.uint32, jnp.float32, jnp.int32, jnp.float32))), offsets


@functools.partial(jax.jit, static_argnames=("cfg",))
def prompt_logprobs(cfg, params, tokens_1P) -> tuple:
  """token_logprobs of a prompt's own tokens (the API's `echo` with logprobs): row t holds log p(token
  t + 1 | tokens up to t) and the likeliest tokens at t, for t below the prompt's length - 1 (tokens_1P
  right-padded to P; later rows are padding's). One forward over a fresh cache of P columns, as
  prefill_packed's (the cache is dropped); compiled per bucket P on first use, not by `warmup`."""
  P = tokens_1P.shape[1]
  cache = {**model.init_cache(cfg, 1, P), "end": jnp.zeros((1,), jnp.int32)}
  every_1P = jnp.arange(P)[None]
  logits_1PV, _ = model.Transformer(cfg).apply(
    {"params": params}, tokens_1P, positions_BT=every_1P, cache=cache, logits_at_BN=every_1P
  )
  return token_logprobs(logits_1PV[0], jnp.roll(tokens_1P[0], -1), jnp.asarray(True))


@functools.partial(jax.jit, static_argnames=("columns",))
def unpacked_row(packed, offset, length, columns: int) -> dict:
  """The one-row cache of `columns` columns holding the prompt at [offset, offset + length) of a
  `prefill_packed` cache, moved to columns [0, length) (positions -1 after it), as `prefill` would
  have left it. Compiled per (pack bucket, columns)."""
  P = packed["pos"].shape[1]

  def move(c, axis):  # roll the prompt to column 0, then to `columns` columns
    c = jnp.roll(c, -offset, axis=axis)
    c = jax.lax.slice_in_dim(c, 0, min(P, columns), axis=axis % c.ndim)
    return jnp.pad(c, [(0, columns - c.shape[a]) if a == axis % c.ndim else (0, 0) for a in range(c.ndim)])

  each = lambda x, axis: tuple(move(a, axis) for a in x) if isinstance(x, tuple) else move(x, axis)
  keep = jnp.arange(columns) < length
  pos = jnp.where(keep, move(packed["pos"], 1), -1)
  # keys are stored [..., H, S] and values [..., S, H] (model.init_cache)
  return {"k": each(packed["k"], -1), "v": each(packed["v"], -2), "pos": pos, "end": length[None]}


def logprobs_row(logprobs, row: int) -> tuple:
  """Row `row` of token_logprobs' (chosen [B], top [B, K], ids [B, K]) as numpy values."""
  return tuple(np.asarray(a)[row] for a in logprobs)


def bucket(length: int, room: int) -> int:
  """The padded length of a prompt piece of `length` tokens: a power of two from 16, at most `room`."""
  return min(max(16, 1 << (length - 1).bit_length()), room)


def piece_length(done: int, prompt_length: int, prefill_chunk: int) -> int:
  """The next piece of a prompt of `prompt_length` tokens with `done` prefilled: up to the next multiple
  of prefill_chunk (Engine._prefill; a piece never ends elsewhere, so its buckets are known)."""
  return min(prompt_length - done, prefill_chunk - done % prefill_chunk)


def piece_buckets(max_context: int, prefill_chunk: int, shortest_prefix: int) -> list:
  """Exactly the buckets of the prompt pieces the engine may prefill (its warmup compiles each). Prompts
  have at most max_context - 1 tokens; one longer than prefill_chunk starts with a whole chunk, and its
  next pieces start at multiples of prefill_chunk (piece_length), padded to powers of two capped at the
  columns left. With prefix caching (`shortest_prefix`, the fewest tokens it reuses; 0: off) a piece may
  also start after any reused length s >= shortest_prefix, padded to its power of two where that fits
  the columns left (else PrefixCache.lookup moves s down to a multiple of prefill_chunk)."""

  def upto(longest: int, cap: int) -> set:  # {bucket(n, cap) for n in 1..longest}: n's powers of two suffice
    return {bucket(1 << k, cap) for k in range((longest - 1).bit_length() + 1)}

  buckets = {bucket(prefill_chunk, max_context)} if max_context - 1 > prefill_chunk else set()
  for start in range(prefill_chunk, max_context - 1, prefill_chunk):
    buckets |= upto(min(prefill_chunk, max_context - 1 - start), max_context - start)
  for start in range(shortest_prefix or max_context, max_context - 1):
    longest = min(prefill_chunk - start % prefill_chunk, max_context - 1 - start)
    buckets |= {b for b in upto(longest, max_context) if b <= max_context - start}
  return sorted(buckets)


def padded(ids, length: int) -> np.ndarray:
  """Prompt ids right-padded with 0 to `length` (at least len(ids)), as the [1, length] int32 row the
  one-row prefills take."""
  tokens_1P = np.zeros((1, length), np.int32)
  tokens_1P[0, : len(ids)] = ids
  return tokens_1P


@functools.partial(jax.jit, donate_argnames=("cache",))
def insert(cache, row_cache, row):
  """`cache` with row `row` replaced by the one-row `row_cache` (in place: the cache is donated)."""
  put = lambda axis, c, r: jax.lax.dynamic_update_index_in_dim(c, r, row, axis=axis)
  return {
    **model.map_kv(put, cache, row_cache),
    **{k: put(0, cache[k], row_cache[k]) for k in ("pos", "end")},
  }


@jax.jit
def row_of(cache, row) -> dict:
  """Row `row` of the engine's cache as a one-row cache of its own, in new buffers (the next decode
  step donates the cache; prefix caching keeps the row)."""
  take = lambda axis, c: jax.lax.dynamic_slice_in_dim(c, row, 1, axis=axis)
  return {**model.map_kv(take, cache), **{k: take(0, cache[k]) for k in ("pos", "end")}}


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_step(cfg, params, cache, last_R, seeds_R, counts_R, temperature_R, top_k_R, top_p_R, wanted):
  """One token for each of the cache's R rows, each at its own position (its row's length). Returns
  (cache, tokens_R, their token_logprobs, computed if `wanted`)."""
  logits_R1V, cache = model.Transformer(cfg).apply(
    {"params": params}, last_R[:, None], positions_BT=cache["end"][:, None], cache=cache
  )
  keys_R = token_keys(seeds_R, counts_R)
  tokens_R = sample_rows(logits_R1V[:, 0], keys_R, temperature_R, top_k_R, top_p_R)
  return cache, tokens_R, token_logprobs(logits_R1V[:, 0], tokens_R, wanted)


@functools.partial(jax.jit, donate_argnames=("spare",))
def resized_into(spare, cache) -> dict:
  """The cache with as many rows as `spare` (its first rows, or all of them and empty ones after), written
  into `spare`, a cache of that size no longer in use: it is donated, so its memory is reused and no new
  pages are touched (on this machine a fresh 188 MB cache of 16 SmolLM2 rows cost 0.85-0.9 s in page
  faults, growing into a kept one 12 ms). Rows past the cache's are emptied (positions -1, length 0);
  their keys and values stay as they were, unread."""
  R, rows = cache["end"].shape[0], spare["end"].shape[0]
  n = min(R, rows)
  put = lambda axis, s, c: jax.lax.dynamic_update_slice_in_dim(
    s, jax.lax.slice_in_dim(c, 0, n, axis=axis), 0, axis
  )
  pos = jnp.full_like(spare["pos"], -1).at[:n].set(cache["pos"][:n])
  return {
    **model.map_kv(put, spare, cache),
    "pos": pos,
    "end": jnp.zeros_like(spare["end"]).at[:n].set(cache["end"][:n]),
  }
