"""lmjax-serve (inference/engine.py, inference/server.py): an OpenAI-compatible server with continuous
batching, driven by the `openai` client and raw HTTP, against LanguageModel.generate as the reference."""

import concurrent.futures
import json
import socket
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import uvicorn
from test_gguf_export import byte_level_bpe, tiny_llama

from lmjax.inference import engine as engine_lib, engine_steps, row_sampling, server
from lmjax.inference.language_model import LanguageModel
from lmjax.ops import reductions

openai = pytest.importorskip("openai")


class Served:
  """A tiny model behind a real uvicorn server on a free loopback port."""

  def __init__(self, max_batch=3, max_context=96, max_queue=16, api_key=None, **shape):
    tokenizer = byte_level_bpe()
    cfg, params = tiny_llama(True, tokenizer.vocab_size, max_len=max(128, max_context), **shape)
    self.lm = LanguageModel(cfg, params, tokenizer)
    self.engine = engine_lib.Engine(self.lm.cfg, self.lm.params, tokenizer, max_batch, max_context, max_queue)
    self.engine.warmup()  # as lmjax-serve does
    app = server.create_app(self.lm, "tiny", self.engine, api_key)
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    while not self.server.started:
      time.sleep(0.02)
    self.url = f"http://127.0.0.1:{self.port}/v1"

  def client(self, api_key="none"):
    return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0)

  def close(self):
    self.server.should_exit = True
    self.thread.join(timeout=10)
    self.engine.close()


@pytest.fixture(scope="module")
def served():
  s = Served()
  yield s
  s.close()


def reference(lm, ids, max_new_tokens, stop=()):
  """What generate() gives greedily for these prompt ids, as text (cut before a stop string)."""
  out = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, stop_sequences=stop)[0]
  text = lm.tokenizer.decode(out[len(ids) :])
  return min((text[: text.find(s)] for s in stop if s in text), key=len, default=text), len(out) - len(ids)


def chat_ids(lm, messages):
  return lm.tokenizer.encode(lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def test_openai_client_gets_generates_greedy_text_with_usage(served):
  client = served.client()
  assert [m.id for m in client.models.list().data] == ["tiny"]
  messages = [{"role": "user", "content": "Hello world"}]
  chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
  ids = chat_ids(served.lm, messages)
  text, count = reference(served.lm, ids, 20)
  assert chat.choices[0].message.content == text and chat.choices[0].message.role == "assistant"
  assert chat.choices[0].finish_reason == ("length" if count == 20 else "stop")
  assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(ids), count)
  completion = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=12, temperature=0)
  text, _ = reference(served.lm, served.lm.tokenizer.encode("the quick brown"), 12)
  assert completion.choices[0].text == text


def test_streamed_chunks_concatenate_to_the_full_text(served):
  client = served.client()
  messages = [{"role": "user", "content": "fox jumps"}]
  whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=25, temperature=0)
  stream = client.chat.completions.create(
    model="tiny",
    messages=messages,
    max_tokens=25,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
  )
  chunks = list(stream)
  streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert streamed == whole.choices[0].message.content
  assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
  pieces = client.completions.create(
    model="tiny", prompt="lazy dog", max_tokens=15, temperature=0, stop=["o"], stream=True
  )
  text, _ = reference(served.lm, served.lm.tokenizer.encode("lazy dog"), 15, stop=("o",))
  assert "".join(c.choices[0].text for c in pieces) == text


def test_concurrent_requests_of_different_lengths_are_each_right(served):
  client = served.client()
  prompts = ["Hello", "the lazy dog 123", "quick", "fox", "world, the", "12345 brown"]
  lengths = [30, 4, 17, 9, 25, 2]  # more requests than slots: they join and leave the batch

  def ask(i):
    r = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0)
    return r.choices[0].text

  with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
    texts = list(pool.map(ask, range(len(prompts))))
  for prompt, n, text in zip(prompts, lengths, texts):
    assert text == reference(served.lm, served.lm.tokenizer.encode(prompt), n)[0]


def test_nulls_take_defaults_and_chat_runs_past_16_tokens(served):
  body = {"model": "tiny", "prompt": "a", "max_tokens": 3, "temperature": None, "top_p": None, "seed": 2**70}
  assert post(served, "/completions", {**body, "top_k": 2**40}).status_code == 200
  chat = post(served, "/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
  reply = chat.json()
  assert reply["usage"]["completion_tokens"] > 16 or reply["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_repeats(served):
  client = served.client()
  ask = lambda: client.completions.create(
    model="tiny", prompt="Hello", max_tokens=10, temperature=1.0, top_p=0.9, seed=5
  )
  assert ask().choices[0].text == ask().choices[0].text


def post(served, path, body, raw=None):
  content = raw if raw is not None else json.dumps(body)
  return httpx.post(
    served.url + path, content=content, headers={"content-type": "application/json"}, timeout=30
  )


@pytest.mark.parametrize(
  "path,body,raw,status,message",
  [
    ("/completions", None, "{not json", 400, "not valid JSON"),
    ("/completions", {"model": "gpt-4", "prompt": "a"}, None, 404, "model 'gpt-4' is not served here"),
    (
      "/completions",
      {"model": "tiny", "prompt": "a", "max_tokens": 0},
      None,
      400,
      "max_tokens must be a positive",
    ),
    (
      "/completions",
      {"model": "tiny", "prompt": "a " * 200, "max_tokens": 5},
      None,
      400,
      "context of 96 tokens",
    ),
    ("/completions", {"model": "tiny", "prompt": "a", "temperature": 3}, None, 400, "temperature must be"),
    ("/completions", {"model": "tiny", "prompt": "a", "best_of": 2}, None, 400, "best_of=2 is not supported"),
    (
      "/chat/completions",
      {"model": "tiny", "messages": "hi"},
      None,
      400,
      "messages must be a non-empty list",
    ),
    ("/completions", {"model": "tiny", "prompt": "", "max_tokens": 2}, None, 400, "the prompt is empty"),
    ("/completions", {"model": "tiny", "prompt": "a", "stop": 5}, None, 400, "stop must be"),
    (
      "/completions",
      {"model": "tiny", "prompt": "a", "stream": True, "stream_options": "x"},
      None,
      400,
      "stream_options",
    ),
  ],
)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(
  served, path, body, raw, status, message
):
  response = post(served, path, body, raw)
  assert response.status_code == status
  assert message in response.json()["error"]["message"]
  ok = post(served, "/completions", {"model": "tiny", "prompt": "a", "max_tokens": 3})
  assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_the_queue_limit_is_an_http_429():
  s = Served(max_batch=1, max_context=512, max_queue=0)
  try:  # with no queue a request is served exactly when a slot is free
    assert post(s, "/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2}).status_code == 200
    long = engine_lib.Request(s.lm.tokenizer.encode("a"), 480, lambda d, f: None, ignore_eos=True)
    s.engine.submit(long)
    while s.engine.active() == 0:
      time.sleep(0.001)
    response = post(s, "/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})
    assert response.status_code == 429 and "the server is busy" in response.json()["error"]["message"]
    assert long.finish_reason is None  # the slot really was taken all along
    long.cancelled = True
  finally:
    s.close()


def test_engine_queues_up_to_max_queue_then_refuses():
  tokenizer = byte_level_bpe()
  cfg, params = tiny_llama(True, tokenizer.vocab_size, max_len=512)
  engine = engine_lib.Engine(cfg, params, tokenizer, max_batch=1, max_context=512, max_queue=1)
  try:
    done = threading.Event()
    long = engine_lib.Request(tokenizer.encode("a"), 480, lambda d, f: f and done.set(), temperature=0)
    engine.submit(long)
    while engine.active() == 0:
      time.sleep(0.001)
    engine.submit(engine_lib.Request(tokenizer.encode("b"), 2, lambda d, f: None))  # waits for the slot
    with pytest.raises(engine_lib.QueueFull, match=r"\(1 waiting already\)"):
      engine.submit(engine_lib.Request(tokenizer.encode("c"), 2, lambda d, f: None))
    assert not done.is_set()  # the long request was still running all along
  finally:
    engine.close()


def test_a_client_that_disconnects_frees_its_slot():
  s = Served(max_batch=1, max_context=512, d_model=256, n_layers=4, d_ff=512)  # ~1 ms a token
  try:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 480, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", s.url + "/completions", json=body) as response:
      next(response.iter_lines())
      request = s.engine._slots[0]
    deadline = time.time() + 20
    while s.engine.active() and time.time() < deadline:
      time.sleep(0.01)
    assert s.engine.active() == 0 and request.cancelled
    assert len(request.output_ids) < 480  # stopped when the client left, not at max_tokens
    assert post(s, "/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2}).status_code == 200
  finally:
    s.close()


def test_api_key_is_required_when_set():
  s = Served(api_key="secret")
  try:
    with pytest.raises(openai.AuthenticationError):
      s.client("wrong").models.list()
    assert [m.id for m in s.client("secret").models.list().data] == ["tiny"]
  finally:
    s.close()


def test_no_recompilation_across_requests(served):
  """After warmup (Served, as lmjax-serve) neither lone nor concurrent requests compile a decode step, a
  cache insert or resize, or a prefill: the cache's row counts, the resizes between them and the prompt
  buckets were all compiled."""
  client = served.client()
  steps = (
    engine_steps.decode_step,
    engine_steps.insert,
    engine_steps.resized_into,
    engine_steps.prefill,
    engine_steps.prefill_packed,
    engine_steps.unpacked_row,
  )
  compiled = lambda: [f._cache_size() for f in steps]
  jax.clear_caches()  # what earlier tests compiled must not count: only warmup's programs
  served.engine.warmup()
  before = compiled()

  def ask(n):
    client.completions.create(
      model="tiny", prompt="fox " * n, max_tokens=n, temperature=0.5, extra_body={"top_k": 5}
    )

  for n in (3, 11, 7):
    ask(n)
  client.completions.create(model="tiny", prompt="fox", max_tokens=4, logprobs=2)  # the other branch
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    list(pool.map(ask, (3, 9, 5)))
  assert compiled() == before


def test_sample_rows_draws_as_jax_random_categorical_and_argmax():
  """Each row as the reference draws it alone: numpy's argmax (first maximum) where temperature is 0,
  jax.random.categorical of logits / temperature (top-k filtered with numpy) elsewhere."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 300)).astype(np.float32)
  logits[0, [7, 200]] = 9.0  # a tie: the first index wins
  temperature = np.array([0, 0.7, 1.3, 0, 1.0], np.float32)
  top_k = np.array([0, 0, 5, 3, 0], np.int32)
  keys = row_sampling.token_keys(jnp.arange(5, dtype=jnp.uint32), jnp.full((5,), 4, jnp.int32))
  got = np.asarray(
    row_sampling.sample_rows(
      jnp.asarray(logits), keys, jnp.asarray(temperature), jnp.asarray(top_k), jnp.ones(5)
    )
  )
  for i in range(5):
    if temperature[i] == 0:
      assert got[i] == np.argmax(logits[i])
      continue
    x = logits[i] / temperature[i]
    if top_k[i]:
      x = np.where(x < np.sort(x)[::-1][top_k[i] - 1], -np.inf, x)
    assert got[i] == int(jax.random.categorical(keys[i], jnp.asarray(x)))
  assert got[0] == 7
  greedy = row_sampling.sample_rows(
    jnp.asarray(logits), keys, jnp.zeros(5), jnp.zeros(5, jnp.int32), jnp.ones(5)
  )
  assert np.asarray(greedy).tolist() == np.argmax(logits, axis=-1).tolist()
  nan_row = jnp.asarray([[0.0, np.nan, 1.0, np.nan], [2.0, 5.0, 5.0, 1.0]])
  assert (
    reductions.first_argmax(nan_row).tolist() == np.argmax(np.asarray(nan_row), axis=-1).tolist() == [1, 1]
  )


def test_a_long_prompt_is_prefilled_in_pieces_between_decode_steps():
  """With prefill_chunk=16, a 70-token prompt admitted with a 4-token one is prefilled in pieces of 16,
  16, 16, 16 and 6 tokens, one an iteration after the short prompt's (a 16-token piece does not fit
  beside it), each followed by a decode step of the short request, which a whole prefill would have
  held up; both replies equal generate()'s greedy tokens,
  which depend on the long prompt's first token (init_std 0.3: a tiny model that does not repeat one
  token)."""
  tokenizer = byte_level_bpe()
  cfg, params = tiny_llama(True, tokenizer.vocab_size, max_len=128, init_std=0.3)
  lm = LanguageModel(cfg, params, tokenizer)
  with pytest.raises(ValueError, match="prefill_chunk >= 16"):
    engine_lib.Engine(cfg, params, tokenizer, max_context=128, prefill_chunk=8)
  engine = engine_lib.Engine(cfg, params, tokenizer, max_batch=2, max_context=128, prefill_chunk=16)
  accepted = []  # the slot of each token the engine hands out, in order
  accept = engine._accept
  engine._accept = lambda row, token, logprobs: (accepted.append(row), accept(row, token, logprobs))
  long_ids = tokenizer.encode("the quick brown fox jumps over the lazy dog, " * 6)[:70]
  prompts, max_tokens = [long_ids[-4:], long_ids], [30, 20]
  done = [threading.Event() for _ in prompts]
  requests = [
    engine_lib.Request(ids, n, lambda d, f, e=e: f and e.set(), temperature=0)
    for ids, n, e in zip(prompts, max_tokens, done)
  ]
  try:
    with engine._wake:  # both wait before the engine's next iteration, which admits them together
      for request in requests:
        engine.submit(request)
    assert all(e.wait(60) for e in done)
  finally:
    engine.close()
  assert len(prompts[0]) == 4 and len(long_ids) == 70
  assert accepted[: accepted.index(1)] == [0] * 6
  for request, ids, n in zip(requests, prompts, max_tokens):
    assert request.output_ids == lm.generate(ids, max_new_tokens=n, do_sample=False)[0][len(ids) :].tolist()
  other = lm.generate([long_ids[1]] + long_ids[1:], max_new_tokens=20, do_sample=False)[0][70:].tolist()
  assert requests[1].output_ids != other


def test_pieces_near_the_context_end_are_warmed_up_and_right():
  """prefill_chunk=40 and max_context=100: a 90-token prompt runs as pieces of 40, 40 (padded to 60,
  the columns left, not 64) and 10 (16 left: padded to 16). warmup() compiled all three buckets, and the
  reply equals generate()'s (a write past the cache end would be clamped and shift the keys)."""
  tokenizer = byte_level_bpe()
  cfg, params = tiny_llama(True, tokenizer.vocab_size, max_len=128, init_std=0.3)
  lm = LanguageModel(cfg, params, tokenizer)
  engine = engine_lib.Engine(cfg, params, tokenizer, max_batch=1, max_context=100, prefill_chunk=40)
  try:
    engine.warmup()
    compiled = engine_steps.prefill._cache_size()
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog, " * 8)[:90]
    done = threading.Event()
    request = engine_lib.Request(ids, 8, lambda d, f: f and done.set(), temperature=0)
    engine.submit(request)
    assert done.wait(60) and len(ids) == 90
  finally:
    engine.close()
  assert engine_steps.prefill._cache_size() == compiled
  assert request.output_ids == lm.generate(ids, max_new_tokens=8, do_sample=False)[0][90:].tolist()


def test_a_request_cancelled_between_pieces_frees_its_slot():
  """A client that leaves while its prompt is half prefilled: no more pieces run, the slot is freed, and
  the request queued behind it is served (one slot)."""
  tokenizer = byte_level_bpe()
  cfg, params = tiny_llama(True, tokenizer.vocab_size, max_len=128)
  engine = engine_lib.Engine(cfg, params, tokenizer, max_batch=1, max_context=128, prefill_chunk=16)
  pieces = []
  run_piece = engine._prefill_piece

  def piece_then_leave(row_cache, piece, bucket, request):
    pieces.append(request)
    request.cancelled = request is long  # its client goes away after the first piece
    return run_piece(row_cache, piece, bucket, request)

  engine._prefill_piece = piece_then_leave
  done = threading.Event()
  long = engine_lib.Request(list(range(3, 83)), 5, lambda d, f: None, temperature=0)
  short = engine_lib.Request([5, 6, 7], 4, lambda d, f: f and done.set(), temperature=0)
  try:
    with engine._wake:
      engine.submit(long)
      engine.submit(short)
    assert done.wait(60)
  finally:
    engine.close()
  assert pieces == [long] and long.output_ids == [] and len(short.output_ids) == 4  # short: packed
