"""The requests of OpenAI's API as lmjax-serve reads them (inference/server.py): the API key, prompts,
sampling fields and their checks, errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
import uuid

import numpy as np
from fastapi.responses import JSONResponse

from lmjax.inference import engine as engine_lib


class ApiError(Exception):
  """An HTTP error in OpenAI's shape: its status, message, the request field at fault (`param`), its
  `type` (`kind`) and machine-readable `code` (OpenAI's: model_not_found, invalid_api_key, ...)."""

  def __init__(
    self,
    status: int,
    message: str,
    param: str | None = None,
    kind: str = "invalid_request_error",
    code: str | None = None,
  ):
    super().__init__(message)
    self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error_response(err: ApiError) -> JSONResponse:
  """OpenAI's error object for `err`, with its status."""
  body = {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}}
  return JSONResponse(body, status_code=err.status)


class RequireKey:
  """Refuses (401) HTTP requests without `Authorization: Bearer <api_key>`. Plain ASGI, not Starlette's
  BaseHTTPMiddleware (`@app.middleware`), behind which `request.is_disconnected()` never reports a
  client gone (starlette discussion #2094; vLLM #10087): the engine would serve it to the end."""

  def __init__(self, app, api_key: str):
    self.app, self.expected = app, f"Bearer {api_key}".encode()

  async def __call__(self, scope, receive, send):
    if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != self.expected:
      message = "missing or wrong API key (send Authorization: Bearer <key>)"
      await error_response(ApiError(401, message, code="invalid_api_key"))(scope, receive, send)
      return
    await self.app(scope, receive, send)


def prompt_ids(prompt, tokenizer, field: str = "prompt", several: bool = True) -> list:
  """The token ids of each prompt of a /v1/completions request, whose `prompt` is a string, a list of
  token ids, or (`several`) a list of either (several prompts, as OpenAI's API takes them). Raises
  ApiError (400, naming `field`) for anything else or an id outside the tokenizer's vocabulary."""
  ids_list = lambda p: isinstance(p, list) and bool(p) and all(is_int(t) for t in p)
  prompts = [prompt] if isinstance(prompt, str) or ids_list(prompt) or not several else prompt
  if (
    not isinstance(prompts, list)
    or not prompts
    or not all((several and isinstance(p, str)) or ids_list(p) for p in prompts)
  ):
    kinds = (
      "a string, a list of token ids, or a non-empty list of either" if several else "a list of token ids"
    )
    raise ApiError(400, f"{field} must be {kinds}", field)
  try:
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
  except (ValueError, TypeError) as err:  # a lone surrogate ("\ud800"), which JSON allows
    raise ApiError(400, f"{field} is not text this tokenizer encodes: {err}", field) from None
  outside = [t for p in ids for t in p if not 0 <= t < tokenizer.vocab_size]
  if outside:
    raise ApiError(
      400, f"token id {outside[0]} is outside the vocabulary (0 to {tokenizer.vocab_size - 1})", field
    )
  return ids


def chat_messages(messages) -> list:
  """OpenAI's chat `messages` as the chat template takes them, [{role, content}] with string content:
  content as a string, a non-empty list of text parts ({"type": "text", "text": ...}, joined by
  newlines, as vLLM joins them) or null (an assistant turn); OpenAI's "developer" role is its newer name
  for "system". Raises ApiError (400, "messages") for anything else, roles other than system, user and
  assistant included (tools are not served)."""
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
  rendered = []
  for i, m in enumerate(messages):
    role = m.get("role") if isinstance(m, dict) else None
    role = "system" if role == "developer" else role
    if role not in ("system", "user", "assistant"):
      raise ApiError(400, f"messages[{i}]: role must be system, user or assistant, got {role!r}", "messages")
    content = m.get("content")
    if isinstance(content, list) and content and all(_is_text_part(p) for p in content):
      content = "\n".join(p["text"] for p in content)
    elif content is None and role == "assistant":
      content = ""
    if not isinstance(content, str):
      message = f"messages[{i}]: content must be a string or a list of text parts (this model reads text)"
      raise ApiError(400, message, "messages")
    rendered.append({"role": role, "content": content})
  return rendered


def _is_text_part(part) -> bool:
  return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def tokenize_as_vllm(tokenizer, text: str) -> list:
  """The ids of `text` as vLLM's /tokenize gives them: the tokenizer's control-token strings in it
  (`<|im_end|>`) become their ids, as Hugging Face's `tokenizer(text)` makes them, where lmjax's own
  `encode` reads them as text (so a prompt cannot forge a control token). lm-eval's RemoteTokenizer
  finds the EOS and BOS ids by tokenizing their strings."""
  if "special_tokens" in inspect.signature(tokenizer.encode).parameters:  # Hugging Face tokenizers
    return tokenizer.encode(text, special_tokens=True)
  ids = {tokenizer.bos_id, tokenizer.eos_id, getattr(tokenizer, "pad_id", None)} - {None}
  names = {tokenizer.decode([i], skip_special_tokens=False): i for i in ids}
  if not names:
    return tokenizer.encode(text)
  pieces = re.split("(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + ")", text)
  return [
    i for piece in pieces if piece for i in ([names[piece]] if piece in names else tokenizer.encode(piece))
  ]


def is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def engine_requests(body: dict, prompts: list, loop, default_max_tokens: int, chat: bool) -> tuple:
  """(engine Requests from the body's sampling fields, `n` choices of each prompt (token id lists) in
  OpenAI's order: prompt i's choice j is choice i * n + j; the asyncio queue their events arrive on: each
  (choice index, text delta, finish reason, tokens that have a logprobs entry by then)). A field given
  as null takes its default, as OpenAI's API does. Raises ApiError (400) naming a bad field."""
  given = {k: v for k, v in body.items() if v is not None}
  max_tokens_field = "max_completion_tokens" if "max_completion_tokens" in given else "max_tokens"
  max_tokens = given.get(max_tokens_field, default_max_tokens)
  stream_options = given.get("stream_options", {})
  if stream_options and given.get("stream") is not True:
    raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
  stop = given.get("stop", ())
  stop = (stop,) if isinstance(stop, str) else stop
  if chat:  # logprobs: true, then top_logprobs alternatives (OpenAI: 0-20)
    logprobs, top = given.get("logprobs", False), given.get("top_logprobs", 0)
    if "top_logprobs" in given and logprobs is not True:
      raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    logprobs_checks = [
      ("logprobs", isinstance(logprobs, bool), "true or false"),
      ("top_logprobs", is_int(top) and 0 <= top <= 20, "an integer in [0, 20]"),
    ]
    top = top if logprobs is True else None
    if given.get("echo"):
      raise ApiError(
        400, "echo is a /v1/completions field (a chat reply does not repeat the messages)", "echo"
      )
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
    ("echo", isinstance(given.get("echo", False), bool), "true or false"),
    ("n", is_int(given.get("n", 1)) and 1 <= given.get("n", 1) <= 128, "an integer in [1, 128]"),
    (max_tokens_field, is_int(max_tokens) and max_tokens > 0, "a positive integer"),
    ("temperature", number(given.get("temperature", 1.0), 0, 2), "a number in [0, 2]"),
    ("top_p", number(given.get("top_p", 1.0), 0, 1) and given.get("top_p", 1.0) > 0, "a number in (0, 1]"),
    ("top_k", is_int(given.get("top_k", 0)) and given.get("top_k", 0) >= 0, "an integer >= 0"),
    ("seed", is_int(given.get("seed", 0)), "an integer"),
    ("ignore_eos", isinstance(given.get("ignore_eos", False), bool), "true or false"),
    ("stream", isinstance(given.get("stream", False), bool), "true or false"),
    (
      "stream_options",
      isinstance(stream_options, dict) and isinstance(stream_options.get("include_usage", False), bool),
      'an object such as {"include_usage": true}',
    ),
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
  for ids in prompts:
    for seed in choice_seeds(given.get("seed"), given.get("n", 1)):
      emit = functools.partial(_emit, loop, events, requests, len(requests))
      requests.append(
        engine_lib.Request(
          prompt_ids=list(ids),
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


def _emit(loop, events: asyncio.Queue, requests: list, index: int, delta: str, finish) -> None:
  """Request `index`'s emit (called on the engine's thread): its event onto the asyncio queue."""
  event = (index, delta, finish, len(requests[index].token_logprobs))
  loop.call_soon_threadsafe(events.put_nowait, event)


def choice_seeds(seed: int | None, n: int) -> list:
  """The seeds of n choices: `seed` itself for the first, then seeds numpy's SeedSequence derives from
  (seed mod 2^32, choice index), independent of one another; without a seed, fresh random ones."""
  if seed is None:
    return [uuid.uuid4().int % 2**31 for _ in range(n)]
  derived = [
    int(np.random.SeedSequence(seed % 2**32, spawn_key=(i,)).generate_state(1)[0]) for i in range(1, n)
  ]
  return [seed, *derived]


def number(value, low: float, high: float) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
