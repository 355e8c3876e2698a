"""`n` choices per request (lmjax-serve): each choice is a request in the engine's batch; greedy choices
against LanguageModel.generate, seeded ones against lone requests with the seeds the API documents."""

import threading
import time

import httpx
import numpy as np
import pytest
from test_gguf_export import byte_level_bpe, tiny_llama
from test_server import Served, chat_ids, post, reference

from lmjax.inference import engine as engine_lib, engine_steps

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served():
  s = Served(max_queue=4)
  yield s
  s.close()


def test_greedy_choices_each_equal_generate_and_usage_counts_the_prompt_once(served):
  messages = [{"role": "user", "content": "Hello world"}]
  chat = served.client().chat.completions.create(
    model="tiny", messages=messages, max_tokens=20, temperature=0, n=3
  )
  ids = chat_ids(served.lm, messages)
  text, count = reference(served.lm, ids, 20)
  assert [c.index for c in chat.choices] == [0, 1, 2]
  assert [c.message.content for c in chat.choices] == [text] * 3
  assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(ids), 3 * count)


def test_choices_of_one_prompt_share_its_prefill(served, monkeypatch):
  packs = []
  prefill_packed = engine_steps.prefill_packed

  def spy(cfg, params, tokens, positions, segments, *rest):
    packs.append(np.asarray(segments[0]))
    return prefill_packed(cfg, params, tokens, positions, segments, *rest)

  monkeypatch.setattr(engine_steps, "prefill_packed", spy)
  prompt = "the quick brown fox"
  _seeded(served, 5, 3, prompt=prompt)
  (segments,) = packs  # one forward: the prompt's tokens once, one segment
  assert (segments == 1).sum() == len(served.lm.tokenizer.encode(prompt)) and segments.max() == 1


def _seeded(served, seed, n, **extra):
  ask = dict(model="tiny", prompt="quick brown", max_tokens=12, temperature=1.0, seed=seed, n=n)
  ask.update(extra)
  return served.client().completions.create(**ask)


def test_seeded_choices_repeat_differ_and_draw_with_the_documented_seeds(served):
  texts = [c.text for c in _seeded(served, 7, 3).choices]
  assert [c.text for c in _seeded(served, 7, 3).choices] == texts
  assert len(set(texts)) > 1  # independent draws, not one repeated
  # Choice 0 draws with the seed itself, choice i with SeedSequence(seed, spawn_key=(i,))'s first word.
  seeds = [7] + [int(np.random.SeedSequence(7, spawn_key=(i,)).generate_state(1)[0]) for i in (1, 2)]
  assert [_seeded(served, seed, 1).choices[0].text for seed in seeds] == texts


def test_streamed_choices_concatenate_per_index_to_the_whole_response(served):
  messages = [{"role": "user", "content": "tell me"}]
  ask = dict(model="tiny", messages=messages, max_tokens=16, temperature=1.0, seed=3, n=2)
  client = served.client()
  whole = client.chat.completions.create(**ask)
  texts, roles, finishes, usage = ["", ""], [[], []], [[], []], None
  for chunk in client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}):
    if chunk.usage is not None:
      usage = chunk.usage
    for choice in chunk.choices:
      texts[choice.index] += choice.delta.content or ""
      roles[choice.index] += [choice.delta.role] if choice.delta.role else []
      finishes[choice.index] += [choice.finish_reason] if choice.finish_reason else []
  assert texts == [c.message.content for c in whole.choices]
  assert roles == [["assistant"], ["assistant"]]
  assert finishes == [[c.finish_reason] for c in whole.choices]
  assert usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize(
  "n,message",
  [
    (0, "n must be an integer in [1, 128]"),
    (129, "n must be an integer in [1, 128]"),
    ("2", "n must be an integer in [1, 128]"),
    (True, "n must be an integer in [1, 128]"),
    (8, "8 requests at once are more than this server takes (3 slots + max_queue=4)"),
  ],
)
def test_bad_n_gets_a_400_naming_it(served, n, message):
  response = post(served, "/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2, "n": n})
  assert response.status_code == 400
  error = response.json()["error"]
  assert message in error["message"] and error["param"] == "n"


def test_choices_are_queued_all_or_none():
  tokenizer = byte_level_bpe()
  cfg, params = tiny_llama(True, tokenizer.vocab_size, max_len=512)
  engine = engine_lib.Engine(cfg, params, tokenizer, max_batch=1, max_context=512, max_queue=2)
  ask = lambda text, n: engine_lib.Request(tokenizer.encode(text), n, lambda d, f: None, temperature=0)
  try:
    done = threading.Event()
    engine.submit(engine_lib.Request(tokenizer.encode("a"), 480, lambda d, f: f and done.set()))
    while engine.active() == 0:
      time.sleep(0.001)
    engine.submit(ask("b", 2))  # waits for the slot: one place of two left
    with pytest.raises(engine_lib.QueueFull, match=r"\(1 waiting already\)"):
      engine.submit(ask("c", 2), ask("c", 2))
    assert len(engine._waiting) == 1  # neither choice was queued
    with pytest.raises(engine_lib.TooManyAtOnce, match=r"4 requests .* \(1 slots \+ max_queue=2\)"):
      engine.submit(*[ask("d", 2)] * 4)
    assert not done.is_set()
  finally:
    engine.close()


def test_choices_that_free_slots_seat_do_not_count_against_the_queue():
  tokenizer = byte_level_bpe()
  cfg, params = tiny_llama(True, tokenizer.vocab_size, max_len=512)
  engine = engine_lib.Engine(cfg, params, tokenizer, max_batch=4, max_context=512, max_queue=0)
  ask = lambda n: engine_lib.Request(tokenizer.encode("a"), n, lambda d, f: None, ignore_eos=True)
  try:
    long = [ask(480) for _ in range(3)]
    engine.submit(*long)  # three of four slots, nothing waits: taken with no queue at all
    with pytest.raises(engine_lib.QueueFull):
      engine.submit(ask(2), ask(2))  # one would have to wait
    engine.submit(ask(2))  # the last free slot
    assert all(r.finish_reason is None for r in long)  # the slots were taken all along
  finally:
    engine.close()


@pytest.fixture(scope="module")
def slow():
  s = Served(max_batch=2, max_context=512, d_model=256, n_layers=4, d_ff=512)  # ~1 ms a token
  yield s
  s.close()


def _all_freed(s, requests, max_tokens):
  deadline = time.time() + 20
  while s.engine.active() and time.time() < deadline:
    time.sleep(0.01)
  assert s.engine.active() == 0 and all(r.cancelled for r in requests)
  assert all(len(r.output_ids) < max_tokens for r in requests)  # stopped when the client left


def test_a_streaming_client_that_disconnects_frees_every_choices_slot(slow):
  body = {"model": "tiny", "prompt": "Hello", "max_tokens": 480, "stream": True, "n": 2}
  with (
    httpx.Client(timeout=30) as http,
    http.stream("POST", slow.url + "/completions", json=body) as response,
  ):
    next(response.iter_lines())  # a token: both choices were admitted together
    requests = list(slow.engine._slots)
    assert all(requests)
  _all_freed(slow, requests, 480)


def test_a_waiting_client_that_disconnects_frees_every_choices_slot(slow):
  """Without streaming, tokens arrive more often than the server looks for a gone client: it still
  looks, on the clock."""
  body = {"model": "tiny", "prompt": "Hello", "max_tokens": 480, "n": 2, "ignore_eos": True}
  asking = threading.Thread(
    target=lambda: pytest.raises(
      httpx.TimeoutException, httpx.post, slow.url + "/completions", json=body, timeout=0.3
    )
  )
  asking.start()
  while not all(slow.engine._slots):
    time.sleep(0.001)
  requests = list(slow.engine._slots)
  asking.join()
  _all_freed(slow, requests, 480)
