"""What the continuous-batching engine (inference/engine.py) serves, and the errors of its queue: kept
apart from the engine so its callers (the API layer, benchmarks) need not read the scheduler."""

from __future__ import annotations

import dataclasses


class QueueFull(Exception):
  """More requests would wait for a slot than the engine's `max_queue`: retry later."""


class TooManyAtOnce(ValueError):
  """More requests submitted together than the engine ever takes (max_batch + max_queue)."""


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
