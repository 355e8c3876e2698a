"""Automatic prefix caching (inference/prefix_cache.py): a prompt that begins as a kept one is prefilled
only from where they part, and its reply is still generate()'s (the reference prefills every token)."""

import threading

import jax.numpy as jnp
import numpy as np
import pytest
from test_gguf_export import byte_level_bpe, tiny_llama

from lmjax import model
from lmjax.inference import engine as engine_lib, engine_steps, prefix_cache
from lmjax.inference.language_model import LanguageModel


def _run(engine, ids, max_tokens, ignore_eos=False):
  done = threading.Event()
  emit = lambda d, f: f and done.set()
  request = engine_lib.Request(ids, max_tokens, emit, temperature=0, ignore_eos=ignore_eos)
  engine.submit(request)
  assert done.wait(60)
  return request.output_ids


def test_a_prompt_that_begins_as_a_kept_one_is_prefilled_from_where_they_part():
  tokenizer = byte_level_bpe()
  cfg, params = tiny_llama(True, tokenizer.vocab_size, max_len=256, init_std=0.3)
  lm = LanguageModel(cfg, params, tokenizer)
  engine = engine_lib.Engine(cfg, params, tokenizer, max_batch=1, max_context=256, prefill_chunk=64)
  pieces = []  # (the piece's first token's place in its prompt, its length)
  run_piece = engine._prefill_piece
  engine._prefill_piece = lambda cache, piece, bucket, request: (
    pieces.append((int(cache["end"][0]) if cache is not None else 0, len(piece))),
    run_piece(cache, piece, bucket, request),
  )[1]
  ids = tokenizer.encode("the quick brown fox jumps over the lazy dog, " * 20)
  assert len(ids) >= 130
  first, longer, other = ids[:100], ids[:130], ids[:100] + tokenizer.encode("a different end")
  try:
    outputs = [_run(engine, prompt, 1) for prompt in (first, longer, first, other)]  # prompts kept alone
  finally:
    engine.close()
  # first: whole, two pieces of 64 and 36; longer: the 30 tokens after `first`, in pieces that end where
  # an uncached prompt's do (128); first again: its last token (a sampled token needs one); other: from
  # where it leaves `first` (kept, and the likeliest match)
  assert pieces == [(0, 64), (64, 36), (100, 28), (128, 2), (99, 1), (100, len(other) - 100)]
  assert (engine.prefixes.hits, engine.prefixes.reused_tokens) == (3, 100 + 99 + 100)
  for prompt, output in zip((first, longer, first, other), outputs):
    assert output == lm.generate(prompt, max_new_tokens=1, do_sample=False)[0][len(prompt) :].tolist()


def test_no_prefix_is_reused_when_the_cache_keeps_none_or_the_shared_part_is_short():
  tokenizer = byte_level_bpe()
  cfg, params = tiny_llama(True, tokenizer.vocab_size, max_len=128)
  ids = list(range(3, 103))
  lm = LanguageModel(cfg, params, tokenizer)
  off = engine_lib.Engine(cfg, params, tokenizer, max_batch=1, max_context=128, prefix_cache=0)
  prefix_cache.prefix_of.clear_cache()
  try:
    off.warmup()
    outputs = [_run(off, ids[:60], 2), _run(off, ids[:70], 2)]
  finally:
    off.close()
  assert off.prefixes.hits == 0 and not off.prefixes._kept and prefix_cache.prefix_of._cache_size() == 0
  for prompt, output in zip((ids[:60], ids[:70]), outputs):
    assert output == lm.generate(prompt, max_new_tokens=2, do_sample=False)[0][len(prompt) :].tolist()
  kept = prefix_cache.PrefixCache(2, max_context=128, prefill_chunk=64)
  kept.store(ids[:40], model.init_cache(cfg, 1, 128))
  assert kept.lookup(ids[: prefix_cache.MIN_REUSE - 1] + [0] * 20) is None  # shares 31 tokens
  assert kept.lookup(ids[: prefix_cache.MIN_REUSE] + [0] * 20)[1] == prefix_cache.MIN_REUSE
  with pytest.raises(ValueError, match="prefix_cache=-1"):
    prefix_cache.PrefixCache(-1, 128, 64)


def test_the_least_recently_used_prompt_goes_first():
  kept = prefix_cache.PrefixCache(2, max_context=128, prefill_chunk=64)
  a, b, c = ([t] * 40 for t in (3, 4, 5))
  cache = {
    "k": jnp.zeros((1, 1, 2, 128)),
    "v": jnp.zeros((1, 1, 128, 2)),
    "pos": jnp.zeros((1, 128), jnp.int32),
  }
  kept.store(a, cache)
  kept.store(b, cache)
  assert kept.lookup(a + [1])[1] == 40  # a used: b is now the least recent
  kept.store(c, cache)
  assert (
    kept.lookup(b + [1]) is None and kept.lookup(a + [1]) is not None and kept.lookup(c + [1]) is not None
  )


def test_the_reused_length_leaves_room_for_the_next_pieces_bucket():
  """max_context 100, prefill_chunk 40: after 90 shared tokens the next piece's 16-token bucket would not
  fit the 10 columns left, so the prefix is cut to 80, where the warmed-up pieces start."""
  kept = prefix_cache.PrefixCache(1, max_context=100, prefill_chunk=40)
  cache = {
    "k": jnp.zeros((1, 1, 2, 100)),
    "v": jnp.zeros((1, 1, 100, 2)),
    "pos": jnp.zeros((1, 100), jnp.int32),
  }
  kept.store(list(range(90)), cache)
  assert kept.lookup(list(range(90)) + [1, 2, 3])[1] == 80
  assert kept.lookup(list(range(60)) + [1, 2, 3])[1] == 60  # a 16-token bucket fits after 60


@pytest.mark.parametrize(
  "max_context,prefill_chunk", [(100, 40), (128, 32), (128, 128), (100, 128), (33, 16), (64, 40), (199, 67)]
)
def test_piece_buckets_are_exactly_the_buckets_prefills_use(max_context, prefill_chunk):
  """Every prompt length, alone and after every prefix a kept prompt can give (PrefixCache.lookup), cut
  into pieces as Engine._prefill cuts them (whole prompts are packed, not pieces): the buckets they use
  are piece_buckets', no more (warmup would compile for nothing) and no fewer (serving would compile)."""
  row = {
    "k": jnp.zeros((1, 1, 2, max_context)),
    "v": jnp.zeros((1, 1, max_context, 2)),
    "pos": jnp.zeros((1, max_context), jnp.int32),
  }

  def buckets_used(prompt_length, done):
    used = set()
    while done < prompt_length:
      length = engine_steps.piece_length(done, prompt_length, prefill_chunk)
      if length == prompt_length:
        break  # packed
      used.add(engine_steps.bucket(length, max_context - done))
      done += length
    return used

  alone, after = set(), set()
  for prompt_length in range(1, max_context):
    alone |= buckets_used(prompt_length, 0)
    for shared in range(prefix_cache.MIN_REUSE, prompt_length):
      kept = prefix_cache.PrefixCache(1, max_context, prefill_chunk)
      kept.store(list(range(shared)) + [-1], row)
      if hit := kept.lookup(list(range(prompt_length))):
        after |= buckets_used(prompt_length, hit[1])
  shortest = prefix_cache.MIN_REUSE
  assert engine_steps.piece_buckets(max_context, prefill_chunk, 0) == sorted(alone)
  assert engine_steps.piece_buckets(max_context, prefill_chunk, shortest) == sorted(alone | after)


def test_a_requests_choices_in_pieces_wait_for_the_first_and_reuse_its_prompt():
  """Three choices of a 100-token prompt (prefill_chunk 64): the first is prefilled in pieces, the others
  wait for it and prefill only the last token (a sampled token needs one) from its kept cache, in the
  pass where the first finished."""
  tokenizer = byte_level_bpe()
  cfg, params = tiny_llama(True, tokenizer.vocab_size, max_len=128, init_std=0.3)
  lm = LanguageModel(cfg, params, tokenizer)
  engine = engine_lib.Engine(cfg, params, tokenizer, max_batch=3, max_context=128, prefill_chunk=64)
  pieces, passes = [], [0]  # (start, length, the _prefill pass it ran in)
  run_piece, run_pass = engine._prefill_piece, engine._prefill
  engine._prefill = lambda: (passes.__setitem__(0, passes[0] + 1), run_pass())
  engine._prefill_piece = lambda cache, piece, bucket, request: (
    pieces.append((int(cache["end"][0]) if cache is not None else 0, len(piece), passes[0])),
    run_piece(cache, piece, bucket, request),
  )[1]
  prompt = tokenizer.encode("the quick brown fox jumps over the lazy dog, " * 20)[:100]
  finished = threading.Semaphore(0)
  choices = [
    engine_lib.Request(prompt, 6, lambda d, f: f and finished.release(), temperature=0) for _ in range(3)
  ]
  try:
    engine.submit(*choices)
    assert all(finished.acquire(timeout=60) for _ in choices)
  finally:
    engine.close()
  # the twins start in the pass where the first's last piece ran (its prompt kept by then)
  assert [p[:2] for p in pieces] == [(0, 64), (64, 36), (99, 1), (99, 1)]
  assert [p[2] - pieces[0][2] for p in pieces] == [0, 1, 1, 1]
  expected = lm.generate(prompt, max_new_tokens=6, do_sample=False)[0][len(prompt) :].tolist()
  assert [c.output_ids for c in choices] == [expected] * 3


def test_prefix_of_keeps_the_first_tokens_and_copies():
  rng = np.random.default_rng(0)
  k, v = rng.normal(size=(2, 2, 1, 3, 4, 10)).astype(np.float32)  # [L, B, K, H, S]
  v = np.swapaxes(v, -1, -2)  # values [L, B, K, S, H]
  cache = {"k": jnp.asarray(k), "v": jnp.asarray(v), "pos": jnp.arange(10)[None], "end": jnp.asarray([10])}
  cut = prefix_cache.prefix_of(cache, jnp.int32(6))
  np.testing.assert_array_equal(cut["k"], np.concatenate([k[..., :6], np.zeros_like(k[..., 6:])], -1))
  np.testing.assert_array_equal(cut["v"], np.concatenate([v[..., :6, :], np.zeros_like(v[..., 6:, :])], -2))
  np.testing.assert_array_equal(cut["pos"], [[0, 1, 2, 3, 4, 5, -1, -1, -1, -1]])
  assert cut["end"].tolist() == [6]
  layers = {**cache, "k": (cache["k"][0], cache["k"][1]), "v": (cache["v"][0], cache["v"][1])}  # unrolled
  per_layer = prefix_cache.prefix_of(layers, jnp.int32(6))
  np.testing.assert_array_equal(per_layer["k"][1], cut["k"][1])
  assert cut["k"].unsafe_buffer_pointer() != cache["k"].unsafe_buffer_pointer()


@pytest.mark.parametrize("prefill_chunk", [32, 128])
def test_reused_prefixes_compile_nothing_past_warmup_and_stay_right(prefill_chunk):
  """A 40-token prompt kept (prefill_chunk 32: from pieces; 128, the whole context: from a pack), then
  prompts sharing 33 and 40 of its tokens: their pieces start after the prefix, end on multiples of
  prefill_chunk, and use buckets warmup() compiled; their replies are generate()'s."""
  tokenizer = byte_level_bpe()
  cfg, params = tiny_llama(True, tokenizer.vocab_size, max_len=128, init_std=0.3)
  lm = LanguageModel(cfg, params, tokenizer)
  engine = engine_lib.Engine(
    cfg, params, tokenizer, max_batch=1, max_context=128, prefill_chunk=prefill_chunk
  )
  ids = tokenizer.encode("the quick brown fox jumps over the lazy dog, " * 20)
  kept, parted, longer = ids[:40], ids[:33] + ids[60:110], ids[:70]
  try:
    engine.warmup()
    steps = (engine_steps.prefill, engine_steps.prefill_packed, engine_steps.row_of, prefix_cache.prefix_of)
    compiled = [step._cache_size() for step in steps]
    outputs = [_run(engine, prompt, 8) for prompt in (kept, parted, longer)]
  finally:
    engine.close()
  assert len(parted) == 83 and engine.prefixes.reused_tokens == 33 + 40
  assert [step._cache_size() for step in steps] == compiled
  for prompt, output in zip((kept, parted, longer), outputs):
    assert output == lm.generate(prompt, max_new_tokens=8, do_sample=False)[0][len(prompt) :].tolist()


def test_a_chats_next_turn_reuses_the_previous_reply_too():
  """Turn 1's prompt and its 12-token reply are kept when it finishes (the cache holds all but the
  reply's last token, never fed back); turn 2, the same tokens and more, reuses them and still gets
  generate()'s reply. The kept row is a copy: the engine's cache goes on being donated."""
  tokenizer = byte_level_bpe()
  cfg, params = tiny_llama(True, tokenizer.vocab_size, max_len=256, init_std=0.3)
  lm = LanguageModel(cfg, params, tokenizer)
  engine = engine_lib.Engine(cfg, params, tokenizer, max_batch=2, max_context=256, prefill_chunk=64)
  turn1 = tokenizer.encode("the quick brown fox jumps over the lazy dog, " * 6)[:50]
  try:
    reply = _run(engine, turn1, 12, ignore_eos=True)
    turn2 = turn1 + reply + tokenizer.encode(" and then?")
    second = _run(engine, turn2, 8)
  finally:
    engine.close()
  assert len(reply) == 12
  kept = set(engine.prefixes._kept)  # each prompt, and each prompt with its reply
  assert kept == {tuple(turn1), tuple(turn2), tuple(turn1 + reply[:-1]), tuple(turn2 + second[:-1])}
  assert engine.prefixes.reused_tokens == len(turn1) + len(reply) - 1
  assert second == lm.generate(turn2, max_new_tokens=8, do_sample=False)[0][len(turn2) :].tolist()


def test_row_of_copies_one_row():
  rng = np.random.default_rng(0)
  k, v = rng.normal(size=(2, 2, 3, 1, 4, 16)).astype(np.float32)  # keys, values: 2 layers x 3 rows each
  cache = {
    "k": jnp.asarray(k),
    "v": jnp.asarray(v),
    "pos": jnp.arange(48).reshape(3, 16),
    "end": jnp.asarray([3, 5, 7]),
  }
  row = engine_steps.row_of(cache, jnp.int32(1))
  np.testing.assert_array_equal(row["k"], k[:, 1:2])
  np.testing.assert_array_equal(row["v"], v[:, 1:2])
  assert row["pos"].tolist() == [list(range(16, 32))] and row["end"].tolist() == [5]
  one = {name: a[:, :1] if name in ("k", "v") else a[:1] for name, a in cache.items()}  # a whole-cache slice
  assert (
    engine_steps.row_of(one, jnp.int32(0))["k"].unsafe_buffer_pointer() != one["k"].unsafe_buffer_pointer()
  )
