"""An OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI; `lmjax-serve` runs it
under uvicorn).

  GET  /v1/models            the one model served
  POST /v1/completions       {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop",
                              "seed", "stream", "logprobs" (0-5 alternatives)}
  POST /v1/chat/completions  {"model", "messages", ... as above (max_completion_tokens too; "logprobs"
                              true and "top_logprobs" 0-20)}; the model's chat template renders the
                              messages

Responses, streamed chunks (server-sent events ending with `data: [DONE]`) and errors follow OpenAI's
shapes, so the `openai` client works unchanged (base_url=http://127.0.0.1:PORT/v1). Errors: 400
(malformed JSON, a bad field, a prompt that does not fit the context), 401 (API key), 404 (unknown
model), 429 (the queue is full); a client that disconnects frees its slot. `top_k` and `ignore_eos`
are extensions (as vLLM's); `best_of`, `echo` and tools are not served and are refused by name. `n`
choices (up to 128, as OpenAI's) are n requests in the engine's batch, all queued or none (429); with a
`seed`, choice 0 draws as a request with that seed alone would and choice i > 0 with a seed derived
from (seed, i) (numpy's SeedSequence), so a seeded request repeats; usage counts the prompt once.
Log-probabilities are the model's (before temperature, top-k and top-p, as vLLM's), one entry per
completion token (an EOS that ended the reply included, and, as vLLM's, the tokens of text cut at a
stop string), in OpenAI's shapes for each endpoint; a streamed chunk carries the entries of every
token so far, which can run ahead of text held back for a stop string. A token's `bytes` (chat) are
its own (tokenizer `token_bytes`), so a character split over byte-level tokens (CJK, emoji) joins
from them; its text shows bytes that are no whole character as escapes (`\\xf0\\x9f`, as
DeepSeek's API). A completion's `text_offset` is the token's character offset in the completion
(that of the character a token finishes when it starts inside one), and its `top_logprobs` keys by
token text (the chosen token always among them).
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import json
import time
import uuid

import numpy as np
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from lmjax.inference import engine as engine_lib

# Fields this server does not implement, with the one value it accepts (their default).
_UNSUPPORTED = {"best_of": 1, "echo": False, "suffix": None}
_UNSUPPORTED.update({"tools": None, "functions": None, "response_format": None})


class ApiError(Exception):
  def __init__(
    self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
  ):
    super().__init__(message)
    self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(err: ApiError) -> JSONResponse:
  body = {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": None}}
  return JSONResponse(body, status_code=err.status)


def create_app(lm, model_name: str, engine: engine_lib.Engine, api_key: str | None = None) -> FastAPI:
  """The FastAPI app serving `lm` (a LanguageModel: its tokenizer and chat template) as `model_name`
  through `engine`. With `api_key`, every request needs `Authorization: Bearer <api_key>`."""
  app = FastAPI(title="lmjax", docs_url=None, redoc_url=None)
  created = int(time.time())

  @app.middleware("http")
  async def check_key(request: HttpRequest, call_next):
    if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
      return _error(
        ApiError(
          401, "missing or wrong API key (send Authorization: Bearer <key>)", kind="authentication_error"
        )
      )
    return await call_next(request)

  @app.get("/v1/models")
  async def models():
    return {
      "object": "list",
      "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "lmjax"}],
    }

  @app.post("/v1/completions")
  async def completions(http: HttpRequest):
    try:
      body = await _body(http)
      prompt = body.get("prompt")
      if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
      if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (one prompt per request)", "prompt")
      return await _generate(http, body, lm.tokenizer.encode(prompt), chat=False)
    except ApiError as err:
      return _error(err)

  @app.post("/v1/chat/completions")
  async def chat_completions(http: HttpRequest):
    try:
      body = await _body(http)
      messages = body.get("messages")
      if not isinstance(messages, list) or not messages or not all(_is_message(m) for m in messages):
        raise ApiError(
          400, "messages must be a non-empty list of {role, content} with string content", "messages"
        )
      try:
        ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
      except ValueError as err:  # e.g. a model without a chat template
        raise ApiError(400, f"cannot render the chat: {err}", "messages") from None
      return await _generate(http, body, ids, chat=True)
    except ApiError as err:
      return _error(err)

  async def _body(http: HttpRequest) -> dict:
    try:
      body = json.loads(await http.body())
    except ValueError as err:
      raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
      raise ApiError(400, "the request body must be a JSON object")
    if body.get("model") != model_name:
      raise ApiError(
        404,
        f"model {body.get('model')!r} is not served here; this server serves {model_name!r}",
        "model",
        "model_not_found",
      )
    for field, default in _UNSUPPORTED.items():
      value = body.get(field)
      if value is not None and not (type(value) is type(default) and value == default):
        raise ApiError(400, f"{field}={value!r} is not supported by this server", field)
    return body

  async def _generate(http: HttpRequest, body: dict, prompt_ids: list, chat: bool):
    # max_tokens' default: OpenAI's 16 for completions; for chat, the rest of the context.
    default_max_tokens = max(1, engine.max_context - len(prompt_ids)) if chat else 16
    requests, events = _requests(body, prompt_ids, asyncio.get_running_loop(), default_max_tokens, chat)
    if len(requests) > max(engine.max_queue, 1):
      raise ApiError(400, f"n must be at most {max(engine.max_queue, 1)} on this server (its queue)", "n")
    try:
      engine.submit(*requests)
    except engine_lib.QueueFull as err:
      raise ApiError(429, f"the server is busy: {err}", kind="rate_limit_error") from None
    except ValueError as err:
      raise ApiError(400, str(err), "max_tokens" if "max_tokens" in str(err) else "prompt") from None
    except RuntimeError as err:
      raise ApiError(503, f"the server cannot generate: {err}", kind="server_error") from None
    reply = _Reply(chat, model_name, requests, lm.tokenizer)
    if body.get("stream"):
      usage = bool((body.get("stream_options") or {}).get("include_usage"))  # checked a dict in _requests
      return StreamingResponse(_stream(events, reply, usage), media_type="text/event-stream")
    texts, finishes = [[] for _ in requests], [None] * len(requests)
    try:
      while None in finishes:
        try:
          index, delta, finish, _ = await asyncio.wait_for(events.get(), timeout=0.5)
        except TimeoutError:
          if await http.is_disconnected():
            return JSONResponse({}, status_code=499)
          continue
        texts[index].append(delta)
        if finish == "error":
          return _error(
            ApiError(500, "generation failed on the server (its log has the cause)", kind="server_error")
          )
        finishes[index] = finish
      return reply.whole(["".join(text) for text in texts], finishes)
    finally:  # a client gone or a choice failed: the other choices free their slots
      reply.cancel_unfinished()

  async def _stream(events, reply, usage: bool):
    try:
      if reply.chat:
        for index in range(len(reply.requests)):
          yield _sse(reply.chunk(index, {"role": "assistant", "content": ""}, None))
      running = len(reply.requests)
      while running:
        index, delta, finish, tokens = await events.get()
        if delta or finish:
          content = ({"content": delta} if delta else None) if reply.chat else delta
          yield _sse(reply.chunk(index, content, finish, reply.logprobs(index, tokens)))
        running -= bool(finish)
      if usage:
        yield _sse({**reply.chunk(0, None, None), "choices": [], "usage": reply.usage()})
      yield "data: [DONE]\n\n"
    finally:  # the client went away (the generator is closed) or the request ended
      reply.cancel_unfinished()

  return app


def _is_message(m) -> bool:
  return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def _requests(body: dict, prompt_ids: list, loop, default_max_tokens: int, chat: bool) -> tuple:
  """(engine Requests from the body's sampling fields, one a choice (`n`), the asyncio queue their events
  arrive on: each (choice index, text delta, finish reason, tokens that have a logprobs entry by then)).
  A field given as null takes its default, as OpenAI's API does."""
  given = {k: v for k, v in body.items() if v is not None}
  max_tokens = given.get("max_completion_tokens", given.get("max_tokens", default_max_tokens))
  stop = given.get("stop", ())
  stop = (stop,) if isinstance(stop, str) else stop
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  if chat:  # logprobs: true, then top_logprobs alternatives (OpenAI: 0-20)
    logprobs, top = given.get("logprobs", False), given.get("top_logprobs", 0)
    if "top_logprobs" in given and logprobs is not True:
      raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    logprobs_checks = [
      ("logprobs", isinstance(logprobs, bool), "true or false"),
      ("top_logprobs", is_int(top) and 0 <= top <= 20, "an integer in [0, 20]"),
    ]
    top = top if logprobs is True else None
  else:  # logprobs: the alternatives to list (OpenAI: 0-5); false reads as null
    if "top_logprobs" in given:
      raise ApiError(
        400,
        "top_logprobs is a chat field; on /v1/completions logprobs (0-5) gives the alternatives",
        "top_logprobs",
      )
    top = None if given.get("logprobs") is False else given.get("logprobs")
    ok = top is None or (is_int(top) and 0 <= top <= 5)
    logprobs_checks = [("logprobs", ok, "an integer in [0, 5] (the alternatives to list) or null")]
  checks = [
    *logprobs_checks,
    ("n", is_int(given.get("n", 1)) and 1 <= given.get("n", 1) <= 128, "an integer in [1, 128]"),
    ("max_tokens", is_int(max_tokens) and max_tokens > 0, "a positive integer"),
    ("temperature", _number(given.get("temperature", 1.0), 0, 2), "a number in [0, 2]"),
    ("top_p", _number(given.get("top_p", 1.0), 0, 1) and given.get("top_p", 1.0) > 0, "a number in (0, 1]"),
    ("top_k", is_int(given.get("top_k", 0)) and given.get("top_k", 0) >= 0, "an integer >= 0"),
    ("seed", is_int(given.get("seed", 0)), "an integer"),
    ("ignore_eos", isinstance(given.get("ignore_eos", False), bool), "true or false"),
    ("stream_options", isinstance(given.get("stream_options", {}), dict), "an object"),
    (
      "stop",
      isinstance(stop, (list, tuple)) and len(stop) <= 4 and all(isinstance(x, str) and x for x in stop),
      "a string or up to 4 non-empty strings",
    ),
  ]
  for field, ok, expected in checks:
    if not ok:
      raise ApiError(400, f"{field} must be {expected}, got {body.get(field)!r}", field)
  events: asyncio.Queue = asyncio.Queue()
  requests = []
  for index, seed in enumerate(_choice_seeds(given.get("seed"), given.get("n", 1))):
    emit = lambda delta, finish, i=index: loop.call_soon_threadsafe(
      events.put_nowait, (i, delta, finish, len(requests[i].token_logprobs))
    )
    requests.append(
      engine_lib.Request(
        prompt_ids=list(prompt_ids),
        max_tokens=max_tokens,
        emit=emit,
        temperature=float(given.get("temperature", 1.0)),
        top_k=given.get("top_k", 0),
        top_p=float(given.get("top_p", 1.0)),
        seed=seed,
        stop=tuple(stop),
        ignore_eos=given.get("ignore_eos", False),
        logprobs=top,
      )
    )
  return requests, events


def _choice_seeds(seed: int | None, n: int) -> list:
  """The seeds of n choices: `seed` itself for the first, then seeds numpy's SeedSequence derives from
  (seed mod 2^32, choice index), independent of one another; without a seed, fresh random ones."""
  if seed is None:
    return [uuid.uuid4().int % 2**31 for _ in range(n)]
  derived = [
    int(np.random.SeedSequence(seed % 2**32, spawn_key=(i,)).generate_state(1)[0]) for i in range(1, n)
  ]
  return [seed, *derived]


def _by_text(text, top: list) -> dict:
  """{token text: log p} of (id, log p) pairs, likeliest first: OpenAI's completion format keys by text,
  so of tokens that read the same the likeliest stays."""
  alternatives = {}
  for token, logprob in top:
    alternatives.setdefault(text(token), logprob)
  return alternatives


def _number(value, low: float, high: float) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _sse(payload: dict) -> str:
  return f"data: {json.dumps(payload)}\n\n"


class _Reply:
  """OpenAI's response objects for one API request's choices (engine Requests): the whole response, or
  stream chunks."""

  def __init__(self, chat: bool, model_name: str, requests: list, tokenizer):
    self.chat, self.model, self.requests, self.tokenizer = chat, model_name, requests, tokenizer
    self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    self.created = int(time.time())
    # Each choice's logprobs entries given so far, the characters they complete, and its decoder of
    # them, which holds a character's first bytes.
    self._given, self._offset = [0] * len(requests), [0] * len(requests)
    self._characters = [codecs.getincrementaldecoder("utf-8")("replace") for _ in requests]
    self._token_bytes = functools.lru_cache(None)(tokenizer.token_bytes)

  def logprobs(self, index: int, upto: int) -> dict | None:
    """OpenAI's logprobs object for choice `index`'s tokens after those given so far, up to `upto` (None
    when the request did not ask for logprobs)."""
    request = self.requests[index]
    if request.logprobs is None:
      return None
    start, self._given[index] = self._given[index], max(self._given[index], upto)
    entries = list(zip(request.output_ids[start:upto], request.token_logprobs[start:upto]))
    token_bytes = self._token_bytes
    text = lambda token: token_bytes(token).decode("utf-8", "backslashreplace")  # a part: "\\xe4\\xbd"
    if self.chat:
      item = lambda t, logprob: {"token": text(t), "logprob": logprob, "bytes": list(token_bytes(t))}
      content = [{**item(t, lp), "top_logprobs": [item(*alt) for alt in top]} for t, (lp, top) in entries]
      return {"content": content, "refusal": None}
    offsets = []
    for token, _ in entries:  # characters of the completion before each token's first whole one
      offsets.append(self._offset[index])
      self._offset[index] += len(self._characters[index].decode(token_bytes(token)))
    return {
      "tokens": [text(t) for t, _ in entries],
      "token_logprobs": [lp for _, (lp, _) in entries],
      "top_logprobs": [{**_by_text(text, top), text(t): lp} for t, (lp, top) in entries],
      "text_offset": offsets,
    }

  def usage(self) -> dict:
    """Token counts: the prompt once, the completion tokens of every choice."""
    prompt = len(self.requests[0].prompt_ids)
    completion = sum(len(r.output_ids) for r in self.requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

  def cancel_unfinished(self) -> None:
    """Frees the slots of choices still running (their client left, or another choice failed)."""
    for request in self.requests:
      request.cancelled = request.finish_reason is None

  def _envelope(self, kind: str, choices: list) -> dict:
    return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

  def whole(self, texts: list, finishes: list) -> dict:
    """The response: choice i has texts[i] and finishes[i]."""
    choices = []
    for index, (text, finish) in enumerate(zip(texts, finishes)):
      logprobs = self.logprobs(index, len(self.requests[index].output_ids))
      if self.chat:
        message = {"role": "assistant", "content": text}
        choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs})
      else:
        choices.append({"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs})
    kind = "chat.completion" if self.chat else "text_completion"
    return {**self._envelope(kind, choices), "usage": self.usage()}

  def chunk(self, index: int, delta, finish, logprobs: dict | None = None) -> dict:
    """A streamed chunk of choice `index`."""
    if self.chat:
      choice = {"index": index, "delta": delta or {}, "finish_reason": finish, "logprobs": logprobs}
      return self._envelope("chat.completion.chunk", [choice])
    choice = {"index": index, "text": delta or "", "finish_reason": finish, "logprobs": logprobs}
    return self._envelope("text_completion", [choice])
