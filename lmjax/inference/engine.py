"""Continuous batching: requests join and leave a running decode batch at every step.

The engine holds a KV cache of up to `max_batch` rows ("slots") of `max_context` columns, each row at its
own length (model/transformer.py takes one cache `end` per row). One thread loops:

  1. admit waiting requests into free slots and prefill prompts, at most `prefill_chunk` prompt tokens
     an iteration (chunked prefill): each prompt runs alone, in pieces, into its own one-row cache,
     which replaces the slot's row when the prompt is done and gives its first token;
  2. one decode step for the slots whose prompt is done, at once (the cache is resized to the slots up
     to the highest in use, a power of two, so one step compiles per size; donated, so it is updated in
     place), each row sampled with its own temperature / top-k / top-p and seed;
  3. hand each active request its token (text released in whole characters, held back while it could
     still begin a stop string); a request that hits EOS, a stop string or max_tokens, or whose client
     went away, leaves its slot, which the next waiting request takes at once.

So a short request never waits for a long one to finish (Orca, Yu et al. 2022, "iteration-level
scheduling"; vLLM's continuous batching), nor for all of a long prompt's prefill: between its pieces
the running requests take their next token (Sarathi-Serve, Agrawal et al. 2024, "chunked prefills").
Free slots below the highest one in use, and slots whose prompt is still being prefilled, still
compute, and each step attends over all `max_context` columns, so `max_context` trades memory and step
time for the longest request served. Prompt pieces are padded to powers of two, capped at the columns
left (prefill compiles once per bucket; `warmup` compiles them all). A row's token k is drawn with key
fold_in(key(seed), k), so a seeded request samples the same text whatever else is in the batch.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import model
from lmjax.data import tokenizer_base
from lmjax.inference.row_sampling import sample_rows, token_keys, token_logprobs

# Prompt tokens prefilled between two decode steps. SmolLM2-135M fp32, 2 CPU cores, a 1536-token prompt
# arriving while 4 requests stream (benchmarks/serve_long_prompt.py, session 20): whole, the running
# requests stop for 6.7-7.6 s and the prompt's first token takes as long; 512: 2.0-2.3 s and 5.4-6.0 s;
# 256: 0.9-1.0 s and 4.6-4.7 s; 128: 0.55-0.6 s and 5.5-5.7 s (more pieces, each attending over the
# whole cache). A whole prompt pads to its power of two (1536 -> 2048), pieces mostly do not.
PREFILL_CHUNK = 256


class QueueFull(Exception):
  """More requests are waiting than the engine's `max_queue`."""


@dataclasses.dataclass
class Request:
  """One generation: prompt ids in, events out through `emit(text_delta, finish_reason)` (called on the
  engine thread; finish_reason None while it runs, then 'stop', 'length', or 'error' when the engine
  failed on it). Any int seed (taken mod 2^32); top_k above the vocabulary means all tokens. With
  `logprobs` set, `token_logprobs` gets one entry per output token before the emit that follows it
  (row_sampling.token_logprobs: the model's log p, before temperature / top-k / top-p)."""

  prompt_ids: list
  max_tokens: int
  emit: object
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple = ()
  ignore_eos: bool = False  # run to max_tokens (benchmarks; vLLM's extension of the same name)
  logprobs: int | None = None  # None: none; k: each token's log p and the k (<= 20) likeliest tokens'
  token_logprobs: list = dataclasses.field(default_factory=list)  # (log p, [(id, log p)] * k) a token
  output_ids: list = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  cancelled: bool = False  # set by the client's side; the engine frees the slot at its next step
  sent_text: str = ""  # the text emitted so far


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("row_cache",))
def _prefill(cfg, params, row_cache, tokens_1P, length, seed, temperature, top_k, top_p, wanted):
  """The next piece of one prompt (tokens_1P right-padded; its first `length` tokens real) into the
  prompt's one-row cache, which holds its first row_cache["end"] tokens, and the token drawn after the
  piece (the request's first token when the piece ends the prompt). Returns (row_cache, token_1, its
  token_logprobs, computed if `wanted`).
  Compiled per piece bucket, whatever the size of the engine's cache (`_insert` puts the row in)."""
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


def _row(logprobs, row: int) -> tuple:
  """Row `row` of token_logprobs' (chosen [B], top [B, K], ids [B, K]) as numpy values."""
  return tuple(np.asarray(a)[row] for a in logprobs)


def _bucket(length: int, room: int) -> int:
  """The padded length of a prompt piece of `length` tokens: a power of two from 16, at most `room`."""
  return min(max(16, 1 << (length - 1).bit_length()), room)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _insert(cache, row_cache, row):
  """`cache` with row `row` replaced by the one-row `row_cache` (in place: the cache is donated)."""
  put = lambda axis, c, r: jax.lax.dynamic_update_index_in_dim(c, r, row, axis=axis)
  return {
    **model.map_kv(put, cache, row_cache),
    **{k: put(0, cache[k], row_cache[k]) for k in ("pos", "end")},
  }


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _decode_step(cfg, params, cache, last_R, seeds_R, counts_R, temperature_R, top_k_R, top_p_R, wanted):
  """One token for each of the cache's R rows, each at its own position (its row's length). Returns
  (cache, tokens_R, their token_logprobs, computed if `wanted`)."""
  logits_R1V, cache = model.Transformer(cfg).apply(
    {"params": params}, last_R[:, None], positions_BT=cache["end"][:, None], cache=cache
  )
  keys_R = token_keys(seeds_R, counts_R)
  tokens_R = sample_rows(logits_R1V[:, 0], keys_R, temperature_R, top_k_R, top_p_R)
  return cache, tokens_R, token_logprobs(logits_R1V[:, 0], tokens_R, wanted)


@functools.partial(jax.jit, static_argnames=("rows",))
def _resized(cache, rows: int) -> dict:
  """The cache with `rows` rows: its first rows, or all of them and empty ones after."""
  R = cache["end"].shape[0]
  if rows <= R:
    return {
      **model.map_kv(lambda axis, c: jax.lax.slice_in_dim(c, 0, rows, axis=axis), cache),
      "pos": cache["pos"][:rows],
      "end": cache["end"][:rows],
    }
  pad = lambda axis, c, fill=0: jnp.pad(
    c, [(0, rows - R) if a == axis else (0, 0) for a in range(c.ndim)], constant_values=fill
  )
  return {**model.map_kv(pad, cache), "pos": pad(0, cache["pos"], -1), "end": pad(0, cache["end"])}


class Engine:
  """Serves Requests by continuous batching (module docstring) on a background thread."""

  def __init__(
    self,
    cfg,
    params,
    tokenizer,
    max_batch: int = 8,
    max_context: int = 512,
    max_queue: int = 64,
    prefill_chunk: int = PREFILL_CHUNK,
  ):
    """`max_context`: cache columns per slot, the longest prompt + max_tokens served (at most the model's
    max_len). `max_queue`: requests that may wait for a slot; `submit` raises QueueFull beyond it.
    `prefill_chunk`: prompt tokens prefilled per iteration, between decode steps (module docstring);
    max_context or more prefills every prompt whole. Raises ValueError for values out of range."""
    if max_context > cfg.max_len:
      raise ValueError(f"max_context={max_context} exceeds the model's context ({cfg.max_len} tokens)")
    if max_batch < 1 or max_context < 2 or max_queue < 0 or prefill_chunk < 16:
      raise ValueError(
        "need max_batch >= 1, max_context >= 2, max_queue >= 0, prefill_chunk >= 16; got "
        f"{max_batch}, {max_context}, {max_queue}, {prefill_chunk}"
      )
    cfg, params = model.quantize.for_decoding(cfg, params)  # as LanguageModel holds them already
    self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
    self.max_batch, self.max_context, self.max_queue = max_batch, max_context, max_queue
    self.prefill_chunk = prefill_chunk
    self._cache = self._empty(1)  # grown and shrunk with the slots in use (_fit)
    self._slots: list = [None] * max_batch
    self._streams: list = [None] * max_batch
    self._prefilling: dict = {}  # slot -> (its prompt's one-row cache, tokens in it), oldest first
    self._waiting: collections.deque = collections.deque()
    self._wake = threading.Condition()
    self._stopped = False
    self._thread = threading.Thread(target=self._loop, name="lmjax-engine", daemon=True)
    self._thread.start()

  def warmup(self) -> None:
    """Compiles the decode step for every cache size (1, 2, 4, ... max_batch rows), the resizes between
    them, and the prefill of every piece bucket a prompt can use by running them once on empty caches,
    so requests do not wait for compilers (SmolLM2: ~4 s each). Call before serving. Pieces start at
    multiples of prefill_chunk; their buckets are powers of two from 16, capped at the columns left."""
    starts = range(0, self.max_context, self.prefill_chunk)
    buckets = {
      _bucket(n, self.max_context - start)
      for start in starts
      for n in range(1, min(self.prefill_chunk, self.max_context - start) + 1)
    }
    for bucket in sorted(buckets):
      jax.block_until_ready(self._prefill_piece(None, [0], bucket, Request([0], 1, None)))
    sizes = sorted({min(1 << i, self.max_batch) for i in range(self.max_batch.bit_length() + 1)})
    for rows, other in itertools.product(sizes, sizes):  # _fit's resizes: the first burst stalled 1.3 s
      if rows != other:
        jax.block_until_ready(_resized(self._empty(rows), other))
    for rows in sizes:
      cache = _insert(self._empty(rows), self._empty(1), jnp.int32(0))
      zeros, ones = jnp.zeros((rows,), jnp.int32), jnp.ones((rows,), jnp.float32)
      args = (zeros, zeros.astype(jnp.uint32), zeros, ones, zeros, ones, jnp.asarray(False))
      jax.block_until_ready(_decode_step(self.cfg, self.params, cache, *args))

  def _empty(self, rows: int) -> dict:
    """An empty cache of `rows` rows, each with its own length (`end`)."""
    return {**model.init_cache(self.cfg, rows, self.max_context), "end": jnp.zeros((rows,), jnp.int32)}

  def submit(self, request: Request) -> None:
    """Queues `request`. Raises QueueFull when max_queue requests already wait, ValueError when its
    prompt plus max_tokens does not fit max_context."""
    if not request.prompt_ids:
      raise ValueError("the prompt is empty: give at least one token")
    if not self._thread.is_alive():
      raise RuntimeError("the engine has stopped")
    if len(request.prompt_ids) + request.max_tokens > self.max_context:
      raise ValueError(
        f"the prompt has {len(request.prompt_ids)} tokens and max_tokens is {request.max_tokens}: more "
        f"than this server's context of {self.max_context} tokens"
      )
    with self._wake:
      waiting = sum(not r.cancelled for r in self._waiting)
      if waiting >= self.max_queue:
        raise QueueFull(f"{waiting} requests are already waiting; retry later")
      self._waiting.append(request)
      self._wake.notify()

  def active(self) -> int:
    """Slots in use."""
    return sum(s is not None for s in self._slots)

  def close(self) -> None:
    with self._wake:
      self._stopped = True
      self._wake.notify()
    self._thread.join(timeout=30)

  def _loop(self) -> None:
    while True:
      with self._wake:
        while not self._stopped and not self._waiting and not any(self._slots):
          self._wake.wait()
        if self._stopped:
          return
        while self._waiting and None in self._slots:
          request = self._waiting.popleft()
          if request.cancelled:  # its client left while it waited
            continue
          row = self._slots.index(None)
          self._slots[row] = request
          self._prefilling[row] = (None, 0)
      try:
        self._fit()
        self._prefill()
        if any(self._decoding()):
          self._fit()
          self._step()
      except Exception as err:  # noqa: BLE001 (end the requests in flight, keep serving the next ones)
        logging.exception("lmjax engine step failed: %s", err)
        self._cache = self._empty(1)  # the failed call may have taken (donated) the cache's buffers
        self._prefilling.clear()
        for row, request in enumerate(self._slots):
          if request is not None:
            self._slots[row] = None
            request.finish_reason = "error"
            with contextlib.suppress(Exception):
              request.emit("", "error")

  def _decoding(self) -> list:
    """Each slot's request, or None where the slot is free or its prompt is still being prefilled."""
    return [None if row in self._prefilling else request for row, request in enumerate(self._slots)]

  def _prefill(self) -> None:
    """Prefills up to `prefill_chunk` prompt tokens, oldest prompts first, each prompt in pieces of
    prefill_chunk tokens and a last one (a piece never ends where the budget ran out, which would
    compile buckets the warmup did not): the oldest prompt's next piece always runs, and younger
    prompts that fit in what is left run whole, so at most one prompt is part-way. A prompt whose last
    piece ran joins the decode batch with its first token; a cancelled one frees its slot."""
    budget = self.prefill_chunk
    for row in list(self._prefilling):
      request = self._slots[row]
      if request.cancelled:
        self._slots[row] = None
        del self._prefilling[row]
        continue
      row_cache, done = self._prefilling[row]
      length = min(len(request.prompt_ids) - done, self.prefill_chunk)
      if length > budget:
        continue
      piece = request.prompt_ids[done : done + length]
      row_cache, token_1, logprobs = self._prefill_piece(
        row_cache, piece, _bucket(length, self.max_context - done), request
      )
      budget -= length
      if done + length < len(request.prompt_ids):
        self._prefilling[row] = (row_cache, done + length)
        continue
      del self._prefilling[row]
      self._cache = _insert(self._cache, row_cache, jnp.int32(row))
      self._streams[row] = tokenizer_base.TextStream(self.tokenizer)
      self._accept(row, int(token_1[0]), _row(logprobs, 0) if request.logprobs is not None else None)

  def _prefill_piece(self, row_cache, piece: list, bucket: int, request: Request) -> tuple:
    """_prefill of the prompt ids `piece` padded to `bucket` into `row_cache` (None: a fresh one)."""
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, : len(piece)] = piece
    return _prefill(
      self.cfg,
      self.params,
      self._empty(1) if row_cache is None else row_cache,
      jnp.asarray(tokens),
      jnp.int32(len(piece)),
      jnp.uint32(request.seed % 2**32),
      jnp.float32(request.temperature),
      jnp.int32(min(request.top_k, self.cfg.vocab_size)),
      jnp.float32(request.top_p),
      jnp.asarray(request.logprobs is not None),
    )

  def _fit(self) -> None:
    """Resizes the cache to the slots up to the highest one in use, rounded up to a power of two (one
    compiled step per size): requests take the lowest free slot, so a lone request costs a 1-row step.
    Resizing copies the cache once; a step over a slice of a larger cache copied it every step."""
    highest = max([i for i, request in enumerate(self._slots) if request is not None], default=0)
    rows = min(1 << highest.bit_length(), self.max_batch)
    if rows != self._cache["end"].shape[0]:
      self._cache = _resized(self._cache, rows)

  def _step(self) -> None:
    rows = self._cache["end"].shape[0]
    last, seeds, counts, temperature, top_k, top_p = [], [], [], [], [], []
    decoding = self._decoding()
    wanted = any(r is not None and r.logprobs is not None for r in decoding[:rows])
    for request in decoding[:rows]:
      live = request is not None
      last.append(request.output_ids[-1] if live else 0)
      seeds.append(request.seed % 2**32 if live else 0)
      counts.append(len(request.output_ids) if live else 0)
      temperature.append(request.temperature if live else 0.0)
      top_k.append(min(request.top_k, self.cfg.vocab_size) if live else 0)
      top_p.append(request.top_p if live else 1.0)
    self._cache, tokens, logprobs = _decode_step(
      self.cfg,
      self.params,
      self._cache,
      jnp.asarray(last, jnp.int32),
      jnp.asarray(seeds, jnp.uint32),
      jnp.asarray(counts, jnp.int32),
      jnp.asarray(temperature, jnp.float32),
      jnp.asarray(top_k, jnp.int32),
      jnp.asarray(top_p, jnp.float32),
      jnp.asarray(wanted),
    )
    logprobs = jax.device_get(logprobs) if wanted else None
    for row, token in enumerate(np.asarray(tokens).tolist()):
      if decoding[row] is not None:
        self._accept(row, token, _row(logprobs, row) if decoding[row].logprobs is not None else None)

  def _accept(self, row: int, token: int, logprobs: tuple | None) -> None:
    """Gives slot `row`'s request its next token (and its (logprob, top) entry when it asked for
    logprobs); frees the slot when the request is over."""
    request, stream = self._slots[row], self._streams[row]
    if request.cancelled:
      self._slots[row] = None
      return
    request.output_ids.append(token)
    if logprobs is not None:
      chosen, top, ids = logprobs
      k = request.logprobs
      request.token_logprobs.append((float(chosen), list(zip(ids[:k].tolist(), top[:k].tolist()))))
    eos = token == self.tokenizer.eos_id and not request.ignore_eos
    text = stream.released + ("" if eos else stream.push(token))
    finish = "stop" if eos else None
    if request.stop and tokenizer_base.cut_at_stop(text, request.stop) != text:
      text, finish = tokenizer_base.cut_at_stop(text, request.stop), "stop"
    elif finish is None and len(request.output_ids) >= request.max_tokens:
      text, finish = text + stream.flush(), "length"
    sent = request.sent_text
    hold = 0 if finish else max([len(s) - 1 for s in request.stop] + [0])
    visible = text[: max(len(sent), len(text) - hold)]
    request.sent_text, request.finish_reason = visible, finish
    if visible[len(sent) :] or finish:
      try:
        request.emit(visible[len(sent) :], finish)
      except Exception:  # noqa: BLE001 (the receiver is gone, e.g. its event loop closed: stop serving it)
        request.cancelled = True
    if finish or request.cancelled:
      self._slots[row] = None
