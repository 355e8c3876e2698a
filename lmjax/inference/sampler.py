"""Sampling: jit-compiled prefill and KV-cache decode, sampling methods, generate().

Prompts are left-padded to a bucket length (a power of two), so new prompt lengths reuse a compiled
prefill; padding has position -1 and is never attended to (see model/transformer.py). Decoding is one
`lax.while_loop` over a pure `decode_step`, run to a traced step count: all at once, one token at a
time (streaming), or in chunks between host checks of text stop strings (`stop_at`).

Context: the model attends over at most `max_len` tokens (the context it was trained on); a prompt
that does not leave room for one new token is an error. Past the context, generation goes on in one
of two ways (`past_context`), each predicting a token from the row's last `max_len` tokens:
- "crop", as nanoGPT's `generate`: that window is placed at positions 0..max_len-1 and run through
  the whole model for every token (`decode_cropped`; no cache; any position encoding);
- "rolling" (RoPE models only), as Mistral's rolling buffer cache: the KV cache is a ring whose
  oldest slots are overwritten, positions keep counting, and attention is limited to the last
  `max_len` positions. One cached step per token, so O(max_len) per token instead of a forward pass
  of max_len tokens; relative distances stay within those trained on, but keys keep the context
  they were computed in (for a model trained with `sliding_window <= max_len` that is exactly the
  training computation). "auto" is rolling for RoPE models, crop otherwise.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lmjax import model
from lmjax.ops.reductions import first_argmax

_MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 = greedy. top_k 0 and top_p 1 disable those filters; repetition_penalty 1 = off."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
      raise ValueError(
        f"invalid sampling settings {self}: need temperature >= 0, top_k >= 0, "
        "0 < top_p <= 1, repetition_penalty > 0"
      )


def process_logits(logits_BV, seen_BV, sampling: SamplingConfig):
  """Repetition penalty (CTRL/HF rule), temperature, then top-k and top-p filtering (-inf outside)."""
  if sampling.repetition_penalty != 1.0:
    penalised = jnp.where(
      logits_BV > 0, logits_BV / sampling.repetition_penalty, logits_BV * sampling.repetition_penalty
    )
    logits_BV = jnp.where(seen_BV, penalised, logits_BV)
  logits_BV = logits_BV / max(sampling.temperature, 1e-6)
  if sampling.top_k:
    kth_B1 = jax.lax.top_k(logits_BV, min(sampling.top_k, logits_BV.shape[-1]))[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if sampling.top_p < 1.0:
    threshold_B1 = top_p_threshold(jnp.sort(logits_BV, axis=-1)[:, ::-1], sampling.top_p)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return logits_BV


def top_p_threshold(sorted_BV, top_p) -> jax.Array:
  """The smallest logit nucleus sampling keeps, [B, 1], from logits sorted in descending order: the
  smallest prefix whose mass reaches top_p (a float or [B, 1]) stays, i.e. a token stays if the mass
  before it is < top_p (Holtzman et al. 2020)."""
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p
  return jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)


@dataclasses.dataclass
class DecodeState:
  """The decode loop's carry: step count, KV cache, last token [B], done flags [B], seen-token mask [B, V],
  generated tokens and their log-probabilities [B, N], and the RNG key."""

  step: jax.Array  # tokens generated so far
  cache: dict
  last_token_B: jax.Array
  done_B: jax.Array
  seen_BV: jax.Array  # tokens present in prompt or output (repetition penalty)
  tokens_BN: jax.Array
  logprobs_BN: jax.Array
  rng: jax.Array


jax.tree_util.register_dataclass(
  DecodeState, data_fields=[f.name for f in dataclasses.fields(DecodeState)], meta_fields=[]
)


def _choose(logits_BV, state: DecodeState, sampling: SamplingConfig, eos_id: int, pad_id: int):
  """Picks the next token per row from the model's logits and advances the bookkeeping."""
  rng, sample_rng = jax.random.split(state.rng)
  processed_BV = process_logits(logits_BV, state.seen_BV, sampling)
  draw = lambda: jax.random.categorical(sample_rng, processed_BV, axis=-1)
  token_B = first_argmax(processed_BV) if sampling.temperature == 0 else draw()
  token_B = jnp.where(state.done_B, pad_id, token_B).astype(jnp.int32)
  logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, -1), token_B[:, None], axis=-1)[:, 0]
  return DecodeState(
    step=state.step + 1,
    cache=state.cache,
    last_token_B=token_B,
    done_B=state.done_B | (token_B == eos_id),
    seen_BV=state.seen_BV.at[jnp.arange(token_B.shape[0]), token_B].set(True),
    tokens_BN=state.tokens_BN.at[:, state.step].set(token_B),
    logprobs_BN=state.logprobs_BN.at[:, state.step].set(jnp.where(state.done_B, 0.0, logprob_B)),
    rng=rng,
  )


@functools.partial(
  jax.jit, static_argnames=("cfg", "num_new", "sampling", "eos_id", "pad_id", "mesh_rules", "cached_new")
)
def prefill(
  cfg: model.ModelConfig,
  params,
  tokens_BP,
  positions_BP,
  rng,
  num_new: int,
  sampling: SamplingConfig,
  eos_id: int,
  pad_id: int,
  mesh_rules=None,
  cached_new: int | None = None,
) -> DecodeState:
  """Runs the padded prompts through the model, filling the cache, and picks the first new token.

  `num_new`: room for that many new tokens (the decode loops' `until` says how many are made);
  `cached_new` (default `num_new`) cache slots after the prompt, the tokens past them are generated
  by `decode_cropped`. With `mesh_rules=(mesh, rules)` the cache is sharded by the
  logical-axis rules (batch over the data axes, KV heads over tensor); the decode loop keeps that
  sharding.
  """
  B, P = tokens_BP.shape
  cache = model.init_cache(cfg, B, P + (num_new if cached_new is None else cached_new))
  if mesh_rules is not None:
    mesh, rules = mesh_rules
    axes = {
      k: (model.CACHE_AXES[k][1:],) * len(v) if isinstance(v, tuple) else model.CACHE_AXES[k]
      for k, v in cache.items()
    }
    cache = jax.tree.map(lambda v, a: nn.with_logical_constraint(v, a, rules=rules, mesh=mesh), cache, axes)
  logits_B1V, cache = model.Transformer(cfg).apply(
    {"params": params},
    tokens_BP,
    positions_BT=positions_BP,
    cache=cache,
    logits_at_BN=jnp.full((B, 1), P - 1),
  )
  seen_BV = (
    jnp.zeros((B, cfg.vocab_size), jnp.int32)
    .at[jnp.arange(B)[:, None], tokens_BP]
    .add((positions_BP >= 0).astype(jnp.int32))
    > 0
  )  # add, not set: a padded id may also occur for real
  state = DecodeState(
    step=jnp.zeros((), jnp.int32),
    cache=cache,
    last_token_B=tokens_BP[:, -1],
    done_B=jnp.zeros((B,), bool),
    seen_BV=seen_BV,
    tokens_BN=jnp.full((B, num_new), pad_id, jnp.int32),
    logprobs_BN=jnp.zeros((B, num_new), jnp.float32),
    rng=rng,
  )
  return _choose(logits_B1V[:, -1], state, sampling, eos_id, pad_id)


def decode_step(
  cfg: model.ModelConfig, params, state: DecodeState, sampling: SamplingConfig, eos_id: int, pad_id: int
) -> DecodeState:
  """One decode step for all B rows: feeds last_token_B at one past each row's last cache position,
  writes its keys/values into the cache, picks the next token (greedy or sampled by `sampling`),
  and records it and its log-probability at column `step` of tokens_BN / logprobs_BN. Rows already
  done emit `pad_id`; a row emitting `eos_id` is done."""
  positions_B1 = jnp.max(state.cache["pos"], axis=1, keepdims=True) + 1
  logits_B1V, cache = model.Transformer(cfg).apply(
    {"params": params}, state.last_token_B[:, None], positions_BT=positions_B1, cache=state.cache
  )
  return _choose(logits_B1V[:, 0], dataclasses.replace(state, cache=cache), sampling, eos_id, pad_id)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "eos_id", "pad_id"))
def decode(
  cfg, params, state: DecodeState, until, sampling: SamplingConfig, eos_id: int, pad_id: int
) -> DecodeState:
  """Decodes until every row is done or `until` tokens exist (a traced count: streaming and the
  stop-check chunks reuse one compiled loop)."""
  return jax.lax.while_loop(
    lambda s: (s.step < until) & ~jnp.all(s.done_B),
    lambda s: decode_step(cfg, params, s, sampling, eos_id, pad_id),
    state,
  )


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "eos_id", "pad_id"))
def decode_cropped(
  cfg,
  params,
  tokens_BP,
  lengths_B,
  state: DecodeState,
  until,
  sampling: SamplingConfig,
  eos_id: int,
  pad_id: int,
) -> DecodeState:
  """Decodes past the context, as nanoGPT's `generate` crops: each token is predicted from the row's
  last `cfg.max_len` tokens (left-padded prompt `tokens_BP` of `lengths_B` real tokens, then the
  generated ones), placed at positions 0..max_len-1 and run through the whole model. Until every
  row is done or `until` tokens exist; `state.cache` is not used."""
  B, P = tokens_BP.shape
  W = cfg.max_len
  sequence_BS = jnp.concatenate([tokens_BP, state.tokens_BN], axis=1)  # prompt, then every new slot

  def step(s: DecodeState) -> DecodeState:
    sequence = sequence_BS.at[:, P:].set(s.tokens_BN)
    end = P + s.step  # one past each row's last token
    first_B = jnp.maximum(P - lengths_B, end - W)  # each row's first token in the window
    index_BW = end - W + jnp.arange(W)[None, :]
    positions_BW = jnp.where(index_BW >= first_B[:, None], index_BW - first_B[:, None], -1)
    window_BW = jnp.take_along_axis(sequence, jnp.maximum(index_BW, 0), axis=1)
    logits_B1V, _ = model.Transformer(cfg).apply(
      {"params": params},
      window_BW,
      positions_BT=positions_BW,
      cache=model.init_cache(cfg, B, W),
      logits_at_BN=jnp.full((B, 1), W - 1),
    )
    return _choose(logits_B1V[:, -1], s, sampling, eos_id, pad_id)

  return jax.lax.while_loop(lambda s: (s.step < until) & ~jnp.all(s.done_B), step, state)


def bucket_length(n: int, limit: int) -> int:
  """Smallest power of two >= n (at least 16), capped at `limit`."""
  return min(max(_MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length()), limit)


@dataclasses.dataclass
class Generation:
  """What `generate_tokens` returns: per row, the generated ids (up to and including EOS or a stop) and their
  log-probabilities under the model (natural log)."""

  tokens: list  # per row: the generated ids (without the prompt), up to and including EOS / stop
  logprobs: list  # per row: log p(token) under the model (before temperature and filtering)


def generate_tokens(
  cfg: model.ModelConfig,
  params,
  prompts,
  max_new_tokens: int,
  sampling: SamplingConfig = SamplingConfig(),
  seed: int = 0,
  eos_id: int | None = None,
  stop_at=None,
  pad_id: int = 0,
  on_token=None,
  mesh_rules=None,
  past_context: str = "auto",
) -> Generation:
  """Samples continuations of `prompts` (lists of ids). `on_token(ids_B)` streams each step.

  `stop_at(row, generated_ids) -> int | None` ends a row early: it returns how many of the generated
  ids to keep when the row must stop there (e.g. a stop string appeared in its decoded text), else
  None. It runs on the host every `STOP_CHECK_EVERY` tokens (every token when streaming), so it may
  see up to that many tokens past the stop; the result is cut where it says.
  `mesh_rules=(mesh, rules)` shards the KV cache like training shards activations (see `prefill`).
  `past_context`: "auto", "crop" or "rolling", how tokens past the model's context are generated
  (module docstring). Raises ValueError for empty prompts, a prompt that fills the context,
  `max_new_tokens < 1`, or "rolling" for a model without RoPE.
  """
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts:
    raise ValueError("no prompts given")
  if any(not p for p in prompts):
    raise ValueError("a prompt is empty: give at least one token (a BOS token, for a tokenizer that has one)")
  longest = max(len(p) for p in prompts)
  if longest >= cfg.max_len:
    raise ValueError(
      f"a prompt has {longest} tokens but the model's context is {cfg.max_len} tokens "
      "(prompt plus at least one new token must fit); shorten the prompt"
    )
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
  rolling_cfg = rolling_config(cfg, past_context)
  P = bucket_length(longest, cfg.max_len - 1)
  # New tokens with a cache slot: those within the context (the rest are cropped), or all of them
  # in a rolling cache of the same size. The cache and the output buffer are rounded up to powers of
  # two, so other max_new_tokens values reuse the compiled prefill and decode loop.
  cached = min(max_new_tokens, cfg.max_len - longest)
  cache_slots = max(_MIN_BUCKET, 1 << (P + cached - 1).bit_length())
  tokens_BP = np.full((len(prompts), P), pad_id, np.int32)
  positions_BP = np.full((len(prompts), P), -1, np.int32)
  for row, prompt in enumerate(prompts):
    tokens_BP[row, P - len(prompt) :] = prompt
    positions_BP[row, P - len(prompt) :] = np.arange(len(prompt))
  eos = -1 if eos_id is None else int(eos_id)
  args = dict(sampling=sampling, eos_id=eos, pad_id=int(pad_id))
  state = prefill(
    cfg,
    params,
    jnp.asarray(tokens_BP),
    jnp.asarray(positions_BP),
    jax.random.key(seed),
    num_new=max(_MIN_BUCKET, 1 << (max_new_tokens - 1).bit_length()),
    mesh_rules=mesh_rules,
    cached_new=cache_slots - P,
    **args,
  )
  lengths_B = jnp.asarray([len(p) for p in prompts], jnp.int32)

  def decode_until(state, until: int):
    if rolling_cfg is not None and until > cached:
      return decode(rolling_cfg, params, state, jnp.int32(until), **args)
    if until <= cached or int(state.step) < cached:
      state = decode(cfg, params, state, jnp.int32(min(until, cached)), **args)
    if until > cached:  # past the context: nanoGPT's crop
      state = decode_cropped(cfg, params, jnp.asarray(tokens_BP), lengths_B, state, jnp.int32(until), **args)
    return state

  keep, settled = {}, set()  # row -> generated ids to keep (from stop_at); rows stop_at is done with
  if on_token is None and stop_at is None:
    state = decode_until(state, max_new_tokens)
  else:
    if on_token is not None:
      on_token(np.asarray(state.last_token_B))
    chunk = 1 if on_token is not None else STOP_CHECK_EVERY
    while True:
      if stop_at is not None:
        state = _apply_stops(state, stop_at, keep, settled, eos)
      step = int(state.step)
      if step >= max_new_tokens or bool(jnp.all(state.done_B)):
        break
      state = decode_until(state, min(step + chunk, max_new_tokens))
      if on_token is not None:
        on_token(np.asarray(state.last_token_B))
  return _unpad(np.asarray(state.tokens_BN), np.asarray(state.logprobs_BN), int(state.step), eos, keep)


PAST_CONTEXT = ("auto", "crop", "rolling")


def rolling_config(cfg: model.ModelConfig, past_context: str) -> model.ModelConfig | None:
  """The config a rolling cache decodes with (attention limited to the last max_len positions), or
  None to crop. Raises ValueError for an unknown `past_context`, or 'rolling' without RoPE."""
  if past_context not in PAST_CONTEXT:
    raise ValueError(f"past_context={past_context!r}: choose one of {list(PAST_CONTEXT)}")
  if past_context == "rolling" and cfg.pos_encoding != "rope":
    raise ValueError(
      f"past_context='rolling' needs a RoPE model (relative positions), but this model's "
      f"pos_encoding is {cfg.pos_encoding!r}; use past_context='crop'"
    )
  if past_context == "crop" or cfg.pos_encoding != "rope":
    return None
  return dataclasses.replace(cfg, sliding_window=min(cfg.sliding_window or cfg.max_len, cfg.max_len))


STOP_CHECK_EVERY = 8  # tokens decoded on device between host checks of stop_at


def _apply_stops(state: DecodeState, stop_at, keep: dict, settled: set, eos_id: int) -> DecodeState:
  """Asks stop_at about every row it has not settled: running rows, and rows that reached EOS in
  the last chunk (a stop string may come before their EOS). Marks the rows it stops as done."""
  tokens_BN, done_B, step = np.asarray(state.tokens_BN), np.asarray(state.done_B).copy(), int(state.step)
  for row in (int(r) for r in range(len(done_B)) if r not in settled):
    ids = tokens_BN[row, :step].tolist()
    if done_B[row]:  # ended by EOS in the last chunk: look up to it, then never again
      settled.add(row)
      if eos_id in ids:
        ids = ids[: ids.index(eos_id) + 1]
    kept = stop_at(row, ids)
    if kept is not None:
      keep[row], done_B[row] = kept, True
      settled.add(row)
  return dataclasses.replace(state, done_B=jnp.asarray(done_B))


def _unpad(tokens_BN, logprobs_BN, steps: int, eos_id: int, keep: dict) -> Generation:
  rows, logprobs = [], []
  for row, (tokens, lps) in enumerate(zip(tokens_BN, logprobs_BN)):
    length = keep.get(row, steps)
    hits = np.flatnonzero(tokens[:length] == eos_id)
    if len(hits):  # the first EOS ends the row (it is kept)
      length = int(hits[0]) + 1
    rows.append(tokens[:length].tolist())
    logprobs.append(lps[:length].tolist())
  return Generation(rows, logprobs)
