"""Continuous batching: requests join and leave a running decode batch at every step.

The engine holds a KV cache of up to `max_batch` rows ("slots") of `max_context` columns, each row at its
own length (model/transformer.py takes one cache `end` per row). One thread loops:

  1. admit waiting requests into free slots and prefill prompts, at most `prefill_chunk` prompt tokens
     an iteration (chunked prefill): a long prompt in pieces into its own one-row cache, the prompts
     that fit whole packed into one forward (engine_steps.prefill_packed); a prompt's row replaces its
     slot's row when the prompt is done and gives its first token; a prompt that begins as a recent one
     starts from that one's cache, cut where they part (automatic prefix caching, prefix_cache.py);
  2. one decode step for the slots whose prompt is done, at once (the cache is resized to the slots up
     to the highest in use, a power of two, so one step compiles per size; donated, so it is updated in
     place), each row sampled with its own temperature / top-k / top-p and seed;
  3. hand each active request its token (text released in whole characters, held back while it could
     still begin a stop string); a request that hits EOS, a stop string or max_tokens, or whose client
     went away, leaves its slot, which the next waiting request takes at once.

So a short request never waits for a long one to finish (Orca, Yu et al. 2022, "iteration-level scheduling";
vLLM's continuous batching), nor for all of a long prompt's prefill: between its pieces the running requests
take their next token (Sarathi-Serve, Agrawal et al. 2024, "chunked prefills"). Free slots below the highest
one in use, and slots whose prompt is still being prefilled, still compute, and each step attends over all
`max_context` columns, so `max_context` trades memory and step time for the longest request served. Prompt
pieces and packs are padded to powers of two, capped at the columns left (prefill compiles once per bucket;
`warmup` compiles them all). A row's token k is drawn with key fold_in(key(seed), k), the same whatever else
is in the batch; its logits equal a lone run's up to float rounding (a pack's size and the prompt's place in
it change attention's sum order), so a seeded request can differ only where two tokens nearly tie.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import model
from lmjax.data import tokenizer_base
from lmjax.inference import engine_steps, prefix_cache as prefix_cache_lib
from lmjax.inference.request import QueueFull, Request, TooManyAtOnce

# Prompt tokens prefilled between two decode steps. SmolLM2-135M fp32, 2 CPU cores, a 1536-token prompt
# arriving while 4 requests stream (benchmarks/serve_long_prompt.py, session 20): whole, the running
# requests stop for 6.7-7.6 s and the prompt's first token takes as long; 512: 2.0-2.3 s and 5.4-6.0 s;
# 256: 0.9-1.0 s and 4.6-4.7 s; 128: 0.55-0.6 s and 5.5-5.7 s (more pieces, each attending over the
# whole cache). A whole prompt pads to its power of two (1536 -> 2048), pieces mostly do not.
PREFILL_CHUNK = 256


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
    prefix_cache: int = 8,
  ):
    """`max_context`: cache columns per slot, the longest prompt + max_tokens served (at most the model's
    max_len). `max_queue`: requests that may wait beyond the free slots; `submit` raises QueueFull past it.
    `prefill_chunk`: prompt tokens prefilled per iteration, between decode steps (module docstring);
    max_context or more prefills every prompt whole. `prefix_cache`: KV caches of recent prompts and finished
    replies (with their prompts) kept for prompts that begin as they do (inference/prefix_cache.py; each
    costs one row of the cache, 0 keeps none). Raises ValueError for values out of range."""
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
    self.prefixes = prefix_cache_lib.PrefixCache(prefix_cache, max_context, prefill_chunk)
    self._pack_room = min(prefill_chunk, max_context)  # tokens of whole prompts prefilled together
    self._cache = self._empty(1)  # grown and shrunk with the slots in use (_fit)
    self._spares: dict = {}  # rows -> a cache of that size not in use (_fit)
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
    them, and the prefill of every piece and pack bucket by running them once on empty caches, so
    requests do not wait for compilers (SmolLM2: ~4 s each). Call before serving. Pieces' buckets:
    engine_steps.piece_buckets; packs': powers of two from 16 to min(prefill_chunk, max_context). Leaves a
    cache of every size allocated for `_fit` to reuse."""
    shortest_prefix = prefix_cache_lib.MIN_REUSE if self.prefixes.capacity else 0
    for bucket in engine_steps.piece_buckets(self.max_context, self.prefill_chunk, shortest_prefix):
      jax.block_until_ready(self._prefill_piece(None, [0], bucket, Request([0], 1, None)))
    for bucket in sorted({engine_steps.bucket(n, self._pack_room) for n in range(1, self._pack_room + 1)}):
      cache, *_ = self._pack([Request([0] * bucket, 1, None)])
      jax.block_until_ready(engine_steps.unpacked_row(cache, jnp.int32(1), jnp.int32(1), self.max_context))
    if self.prefixes.capacity:  # a prefix reused
      jax.block_until_ready(prefix_cache_lib.prefix_of(self._empty(1), jnp.int32(1)))
    sizes = sorted({min(1 << i, self.max_batch) for i in range(self.max_batch.bit_length() + 1)})
    for rows, other in itertools.product(sizes, sizes):  # _fit's resizes: the first burst stalled 1.3 s
      if rows != other:
        jax.block_until_ready(engine_steps.resized_into(self._empty(other), self._empty(rows)))
    for rows in sizes:
      cache = engine_steps.insert(self._empty(rows), self._empty(1), jnp.int32(0))
      zeros, ones = jnp.zeros((rows,), jnp.int32), jnp.ones((rows,), jnp.float32)
      args = (zeros, zeros.astype(jnp.uint32), zeros, ones, zeros, ones, jnp.asarray(False))
      cache, *_ = engine_steps.decode_step(self.cfg, self.params, cache, *args)
      if self.prefixes.capacity:  # a finished reply's row, copied out
        jax.block_until_ready(engine_steps.row_of(cache, jnp.int32(0)))
      if rows != self._cache["end"].shape[0]:
        self._spares[rows] = jax.block_until_ready(cache)  # each size's memory, touched once

  def _empty(self, rows: int) -> dict:
    """An empty cache of `rows` rows, each with its own length (`end`)."""
    return {**model.init_cache(self.cfg, rows, self.max_context), "end": jnp.zeros((rows,), jnp.int32)}

  def submit(self, *requests: Request) -> None:
    """Queues `requests` (an API request's choices: all or none); those free slots will seat do not count
    against max_queue (0: taken exactly when a slot is free). Raises QueueFull when more than max_queue
    would wait, TooManyAtOnce (a ValueError) beyond max_batch + max_queue at once, ValueError for an empty
    prompt or one that with max_tokens overruns max_context, RuntimeError when the engine has stopped."""
    if not self._thread.is_alive():
      raise RuntimeError("the engine has stopped")
    if len(requests) > self.max_batch + self.max_queue:
      took = f"{self.max_batch} slots + max_queue={self.max_queue}"
      raise TooManyAtOnce(f"{len(requests)} requests at once are more than this server takes ({took})")
    for request in requests:
      if not request.prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
      if len(request.prompt_ids) >= self.max_context:
        raise ValueError(
          f"the prompt has {len(request.prompt_ids)} tokens: no room for a reply in this server's context "
          f"of {self.max_context} tokens"
        )
      if len(request.prompt_ids) + request.max_tokens > self.max_context:
        raise ValueError(
          f"the prompt has {len(request.prompt_ids)} tokens and a reply of up to {request.max_tokens}: "
          f"more than this server's context of {self.max_context} tokens"
        )
    with self._wake:
      waiting = sum(not r.cancelled for r in self._waiting)  # seated first, in order
      if (over := waiting + len(requests) - self._slots.count(None)) > self.max_queue:
        raise QueueFull(
          f"{over} requests would wait for a slot ({waiting} waiting already), more than "
          f"max_queue={self.max_queue}; retry later"
        )
      self._waiting.extend(requests)
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
        self._prefilling.clear()  # the spares stay: a failed resize_into had popped the one it took
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
    """Prefills up to `prefill_chunk` prompt tokens, oldest prompts first, a prompt longer than that in pieces
    of up to prefill_chunk tokens ending at its multiples (a piece never ends where the budget ran out, which
    would compile buckets the warmup did not): the oldest prompt's next piece always runs, and younger prompts
    that fit in what is left run whole, packed together into one forward (at most min(prefill_chunk,
    max_context) tokens), so at most one prompt is part-way besides those that start from a kept prefix.
    Prompts equal to one already in the pack (an API request's `n` choices) share its tokens there at no cost
    to the budget; with prefix caching, those equal to one prefilled in pieces wait for it and then start
    from its kept cache. A prompt whose last piece ran joins the decode batch with its first token; a
    cancelled one frees its slot."""
    budget, packed, room, in_pack, in_pieces = self.prefill_chunk, [], self._pack_room, set(), set()
    for row in list(self._prefilling):
      request = self._slots[row]
      if request.cancelled:
        self._slots[row] = None
        del self._prefilling[row]
        continue
      row_cache, done = self._prefilling[row]
      key = tuple(request.prompt_ids)
      if done == 0 and key in in_pieces:  # its twin's prompt will be kept: wait, then start from it
        continue
      if done == 0 and (hit := self.prefixes.lookup(request.prompt_ids)):  # prefilled from where they part
        row_cache, done = self._prefilling[row] = hit
      length = engine_steps.piece_length(done, len(request.prompt_ids), self.prefill_chunk)
      whole = length == len(request.prompt_ids)
      unfinished = done + length < len(request.prompt_ids) or length > budget  # after this pass
      if not whole and unfinished and self.prefixes.capacity and len(key) > prefix_cache_lib.MIN_REUSE:
        in_pieces.add(key)
      if whole and key in in_pack:
        packed.append(row)
        continue
      if length > budget or (whole and length > room):
        continue
      budget -= length
      if whole:
        packed.append(row)
        room -= length
        in_pack.add(key)
        continue
      piece = request.prompt_ids[done : done + length]
      row_cache, token_1, logprobs = self._prefill_piece(
        row_cache, piece, engine_steps.bucket(length, self.max_context - done), request
      )
      if done + length < len(request.prompt_ids):
        self._prefilling[row] = (row_cache, done + length)
      else:
        self._join(row, row_cache, int(token_1[0]), logprobs, 0)
    if packed:
      requests = [self._slots[row] for row in packed]
      cache, tokens_R, logprobs, offsets = self._pack(requests)
      for i, (row, request, offset) in enumerate(zip(packed, requests, offsets)):
        length = jnp.int32(len(request.prompt_ids))
        row_cache = engine_steps.unpacked_row(cache, jnp.int32(offset), length, self.max_context)
        self._join(row, row_cache, int(tokens_R[i]), logprobs, i)

  def _join(self, row: int, row_cache: dict, token: int, logprobs, index: int) -> None:
    """Puts a prefilled prompt's one-row cache into slot `row` and gives the request its first token
    (with entry `index` of the prefill's token_logprobs)."""
    request = self._slots[row]
    del self._prefilling[row]
    self.prefixes.store(request.prompt_ids, row_cache)  # `insert` does not donate it
    self._cache = engine_steps.insert(self._cache, row_cache, jnp.int32(row))
    begun = tokenizer_base.incomplete_tail(self.tokenizer, request.prompt_ids)  # ids ending mid-character
    context = request.prompt_ids[len(request.prompt_ids) - begun :] if begun else ()
    self._streams[row] = tokenizer_base.TextStream(self.tokenizer, context_ids=context)
    wanted = request.logprobs is not None
    self._accept(row, token, engine_steps.logprobs_row(logprobs, index) if wanted else None)

  def _pack(self, requests: list) -> tuple:
    """engine_steps.prefill_packed of the requests' whole prompts (engine_steps.packed_inputs). Returns
    (the packed cache, first tokens [max_batch] as numpy, token_logprobs, each request's prompt offset
    in the row)."""
    inputs, offsets = engine_steps.packed_inputs(
      requests, self._pack_room, self.max_batch, self.cfg.vocab_size
    )
    wanted = any(r.logprobs is not None for r in requests)
    cache, tokens_R, logprobs = engine_steps.prefill_packed(
      self.cfg, self.params, *inputs, jnp.asarray(wanted)
    )
    return cache, np.asarray(tokens_R), jax.device_get(logprobs) if wanted else None, offsets

  def _prefill_piece(self, row_cache, piece: list, bucket: int, request: Request) -> tuple:
    """_prefill of the prompt ids `piece` padded to `bucket` into `row_cache` (None: a fresh one)."""
    return engine_steps.prefill(
      self.cfg,
      self.params,
      self._empty(1) if row_cache is None else row_cache,
      jnp.asarray(engine_steps.padded(piece, bucket)),
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
    Resizing copies the cache once; a step over a slice of a larger cache copied it every step. The
    cache left behind is kept for the next resize to that size (engine_steps.resized_into): caches of
    1 + 2 + 4 + ... + max_batch rows in all (under twice the largest where max_batch is a power of
    two), and no page faults after the first time."""
    highest = max([i for i, request in enumerate(self._slots) if request is not None], default=0)
    rows, current = min(1 << highest.bit_length(), self.max_batch), self._cache["end"].shape[0]
    if rows != current:
      spare = self._spares.pop(rows, None) or self._empty(rows)  # none kept without warmup()
      self._spares[current], self._cache = self._cache, engine_steps.resized_into(spare, self._cache)

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
    self._cache, tokens, logprobs = engine_steps.decode_step(
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
        self._accept(
          row, token, engine_steps.logprobs_row(logprobs, row) if decoding[row].logprobs is not None else None
        )

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
    # At EOS a character begun before it (by the reply, or a prompt of ids) ends the text as U+FFFD,
    # as decode() gives it.
    text = stream.released + (stream.flush() if eos else stream.push(token))
    finish = "stop" if eos else None
    if request.stop and tokenizer_base.cut_at_stop(text, request.stop) != text:
      text, finish = tokenizer_base.cut_at_stop(text, request.stop), "stop"
    elif finish is None and len(request.output_ids) >= request.max_tokens:
      text, finish = text + stream.flush(), "length"
    sent = request.sent_text
    hold = 0 if finish else max([len(s) - 1 for s in request.stop] + [0])
    visible = text[: max(len(sent), len(text) - hold)]
    request.sent_text, request.finish_reason = visible, finish
    if finish and len(request.output_ids) > 1 and self.prefixes.capacity:  # a chat's next turn extends it
      kept = request.prompt_ids + request.output_ids[:-1]  # what the row holds: all but the last token
      try:
        self.prefixes.store(kept, engine_steps.row_of(self._cache, jnp.int32(row)))
      except Exception as err:  # noqa: BLE001 (e.g. no memory for the copy: the replies go on)
        logging.warning("lmjax engine: a finished reply was not kept for prefix caching: %s", err)
    if finish:  # free before the client hears: its next request finds the slot
      self._slots[row] = None
    if visible[len(sent) :] or finish:
      try:
        request.emit(visible[len(sent) :], finish)
      except Exception:  # noqa: BLE001 (the receiver is gone, e.g. its event loop closed: stop serving it)
        request.cancelled = True
    if request.cancelled:
      self._slots[row] = None
