"""An OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI; `lmjax-serve` runs it
under uvicorn).

  GET  /v1/models, /v1/models/{id}   the one model served
  POST /v1/completions       {"model", "prompt" (a string, token ids, or a list of either), "max_tokens",
                              "temperature", "top_p", "top_k", "stop", "seed", "n", "stream", "echo",
                              "logprobs" (0-5 alternatives)}
  POST /v1/chat/completions  {"model", "messages", ... as above (max_completion_tokens too; "logprobs"
                              true and "top_logprobs" 0-20; no echo)}; the model's chat template renders
                              the messages (system, user and assistant; content a string or text parts)
  GET  /tokenizer_info, POST /tokenize, POST /detokenize   vLLM's tokenizer endpoints

Responses, streamed chunks (server-sent events ending with `data: [DONE]`) and errors follow OpenAI's
shapes, so the `openai` client works unchanged (base_url=http://127.0.0.1:PORT/v1), and so does
lm-eval's `local-completions` model (base_url=.../v1/completions), which scores a (context,
continuation) pair by `echo` with logprobs and tokenizes through /tokenize. Errors: 400 (malformed
JSON, a bad field, a prompt that does not fit the context), 401 (API key: every route needs it when
one is set, the tokenizer endpoints too), 404 (unknown model or route), 429 (the queue is full); a
client that disconnects frees its slot. `top_k` and `ignore_eos` are extensions (as vLLM's); `best_of`,
`suffix` and tools are not served and are refused by name unless given as their no-op defaults.
`n` choices (up to 128, as OpenAI's, and no more in all than the server's slots plus its queue: a 400)
of each prompt are n requests in the engine's batch, all queued or none (429), prompt i's choice j at
index i * n + j; equal prompts admitted together, short enough to be packed (prefill_chunk) and
not begun by a kept prompt (prefix caching: each then prefills its own rest) are prefilled once.
Choices that free slots seat at once do not count against `max_queue`. With a `seed`, choice 0 draws
as a request with that seed alone would and choice j > 0 with a seed derived from (seed, j) (numpy's
SeedSequence), so a seeded request repeats; usage counts each prompt once. `echo`
puts the prompt before each choice's text and, with logprobs, its tokens' entries before the
completion's (the first token's log p null, as OpenAI's), from one more forward over the prompt,
computed beside the engine (compiled per prompt bucket on first use).
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
import json
import logging
import time

import jax
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmjax.inference import engine as engine_lib, engine_steps
from lmjax.inference.api_replies import Reply
from lmjax.inference.api_requests import (
  ApiError,
  RequireKey,
  chat_messages,
  engine_requests,
  error_response,
  prompt_ids,
  tokenize_as_vllm,
)

# Fields this server does not implement, with the values it accepts (their defaults and no-ops).
_UNSUPPORTED = {
  "best_of": (1,),
  "suffix": (),
  "tools": ([],),
  "functions": ([],),
  "tool_choice": ("none", "auto"),
}
_UNSUPPORTED["response_format"] = ({"type": "text"},)


def create_app(lm, model_name: str, engine: engine_lib.Engine, api_key: str | None = None) -> FastAPI:
  """The FastAPI app serving `lm` (a LanguageModel: its tokenizer and chat template) as `model_name`
  through `engine`. With `api_key`, every request needs `Authorization: Bearer <api_key>`."""
  app = FastAPI(title="lmjax", docs_url=None, redoc_url=None)
  one_forward = asyncio.Semaphore(1)  # echo's prompt forwards
  created = int(time.time())

  if api_key:
    app.add_middleware(RequireKey, api_key=api_key)

  served = {"id": model_name, "object": "model", "created": created, "owned_by": "lmjax"}

  @app.exception_handler(StarletteHTTPException)  # unknown routes, wrong methods: OpenAI's error shape
  async def http_error(http: HttpRequest, err: StarletteHTTPException):
    response = error_response(ApiError(err.status_code, f"{err.detail}: {http.method} {http.url.path}"))
    response.headers.update(err.headers or {})  # a 405's Allow
    return response

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [served]}

  @app.get("/v1/models/{model_id:path}")
  async def model(model_id: str):
    if model_id != model_name:
      return error_response(_not_served(model_id))
    return served

  @app.post("/v1/completions")
  async def completions(http: HttpRequest):
    try:
      body = await _body(http)
      return await _generate(http, body, prompt_ids(body.get("prompt"), lm.tokenizer), chat=False)
    except ApiError as err:
      return error_response(err)

  @app.post("/v1/chat/completions")
  async def chat_completions(http: HttpRequest):
    try:
      body = await _body(http)
      messages = chat_messages(body.get("messages"))
      try:
        text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
      except ValueError as err:  # e.g. a model without a chat template
        raise ApiError(400, f"cannot render the chat: {err}", "messages") from None
      try:
        ids = lm.tokenizer.encode(text)
      except (ValueError, TypeError) as err:  # a lone surrogate (Hugging Face tokenizers: TypeError)
        raise ApiError(400, f"messages are not text this tokenizer encodes: {err}", "messages") from None
      return await _generate(http, body, [ids], chat=True)
    except ApiError as err:
      return error_response(err)

  # vLLM's tokenizer endpoints, outside /v1: lm-eval's local-completions model finds them and then needs
  # no tokenizer of its own (lm_eval.utils.RemoteTokenizer).
  @app.get("/tokenizer_info")
  async def tokenizer_info():
    tok = lm.tokenizer
    special = lambda i: None if i is None else tok.decode([i], skip_special_tokens=False)
    template = getattr(tok, "chat_template", None)
    return {
      "eos_token": special(tok.eos_id),
      "bos_token": special(tok.bos_id),
      "pad_token": special(getattr(tok, "pad_id", None)),
      "chat_template": template if isinstance(template, str) and template else None,
      "model_max_length": engine.max_context,
    }

  @app.post("/tokenize")
  async def tokenize(http: HttpRequest):
    try:
      body = await _json(http)
      if not isinstance(body.get("prompt"), str):
        raise ApiError(400, "prompt must be a string", "prompt")
      try:
        ids = tokenize_as_vllm(lm.tokenizer, body["prompt"])
      except (ValueError, TypeError) as err:  # a lone surrogate (Hugging Face tokenizers: TypeError)
        raise ApiError(400, f"prompt is not text this tokenizer encodes: {err}", "prompt") from None
      return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_context}
    except ApiError as err:
      return error_response(err)

  @app.post("/detokenize")
  async def detokenize(http: HttpRequest):
    try:
      tokens = (await _json(http)).get("tokens")
      (ids,) = [[]] if tokens == [] else prompt_ids(tokens, lm.tokenizer, field="tokens", several=False)
      return {"prompt": lm.tokenizer.decode(ids, skip_special_tokens=False)}
    except ApiError as err:
      return error_response(err)

  async def _json(http: HttpRequest) -> dict:
    try:
      body = json.loads(await http.body())
    except ValueError as err:
      raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
      raise ApiError(400, "the request body must be a JSON object")
    return body

  async def _body(http: HttpRequest) -> dict:
    body = await _json(http)
    if body.get("model") != model_name:
      raise _not_served(body.get("model"))
    for field, accepted in _UNSUPPORTED.items():
      value = body.get(field)
      if value is not None and not any(type(value) is type(a) and value == a for a in accepted):
        raise ApiError(400, f"{field}={value!r} is not supported by this server", field)
    return body

  def _not_served(name) -> ApiError:
    message = f"model {name!r} is not served here; this server serves {model_name!r}"
    return ApiError(404, message, "model", code="model_not_found")

  async def _generate(http: HttpRequest, body: dict, prompts: list, chat: bool):
    # max_tokens' default: OpenAI's 16 for completions; for chat, the rest of the context.
    default_max_tokens = max(1, engine.max_context - len(prompts[0])) if chat else 16
    loop = asyncio.get_running_loop()
    requests, events = engine_requests(body, prompts, loop, default_max_tokens, chat)
    try:
      engine.submit(*requests)
    except engine_lib.QueueFull as err:
      raise ApiError(
        429, f"the server is busy: {err}", kind="rate_limit_error", code="rate_limit_exceeded"
      ) from None
    except engine_lib.TooManyAtOnce as err:  # could never be taken: a 400 that names n or the prompts
      field = "n" if len(prompts) == 1 else "prompt"
      n = len(requests) // len(prompts)
      raise ApiError(400, f"{len(prompts)} prompt(s) x n={n} choices: {err}", field) from None
    except (
      ValueError
    ) as err:  # an empty prompt, or one that leaves no room (then max_tokens' fault if it fits)
      fits = 0 < min(map(len, prompts)) and max(map(len, prompts)) < engine.max_context
      if not fits:
        raise ApiError(400, str(err), "messages" if chat else "prompt") from None
      limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
      room = engine.max_context - max(map(len, prompts))
      raise ApiError(400, f"{err}; give {limit} at most {room}", limit) from None
    except RuntimeError as err:
      raise ApiError(503, f"the server cannot generate: {err}", kind="server_error") from None
    echo = body.get("echo") is True
    reply = Reply(chat, model_name, requests, lm.tokenizer, len(requests) // len(prompts), echo)
    if echo and requests[0].logprobs is not None:  # the prompts' own tokens, beside the engine's work
      try:
        async with one_forward:  # each holds [P, V] logits: one at a time
          reply.prompt_logprobs = await asyncio.to_thread(_prompt_logprobs, engine, prompts)
      except BaseException as err:  # failed, or the handler was cancelled: the choices stop too
        reply.cancel_unfinished()
        if not isinstance(err, Exception):
          raise
        logging.exception("lmjax-serve: the prompt's logprobs failed: %s", err)
        raise ApiError(
          500, "the prompt's logprobs failed (the server's log has the cause)", kind="server_error"
        ) from None
    if body.get("stream"):
      usage = bool((body.get("stream_options") or {}).get("include_usage"))  # a dict: engine_requests
      return StreamingResponse(_stream(events, reply, usage), media_type="text/event-stream")
    texts, finishes, checked = [[] for _ in requests], [None] * len(requests), time.monotonic()
    try:
      while None in finishes:
        try:
          index, delta, finish, _ = await asyncio.wait_for(events.get(), timeout=0.1)
        except TimeoutError:
          index = None
        if time.monotonic() - checked > 0.1:  # on the clock: tokens arrive more often than that
          if await http.is_disconnected():
            return JSONResponse({}, status_code=499)
          checked = time.monotonic()
        if index is None:
          continue
        texts[index].append(delta)
        if finish == "error":
          return error_response(
            ApiError(500, "generation failed on the server (its log has the cause)", kind="server_error")
          )
        finishes[index] = finish
      return reply.whole([reply.echoed(i) + "".join(text) for i, text in enumerate(texts)], finishes)
    finally:  # a client gone or a choice failed: the other choices free their slots
      reply.cancel_unfinished()

  async def _stream(events, reply, usage: bool):
    try:
      for index in range(len(reply.requests)):
        if reply.chat:
          yield _sse(reply.chunk(index, {"role": "assistant", "content": ""}, None))
        elif reply.echo:
          yield _sse(reply.chunk(index, reply.echoed(index), None, reply.logprobs(index, 0)))
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


def _prompt_logprobs(engine: engine_lib.Engine, prompts: list) -> dict:
  """{prompt: engine_steps.prompt_logprobs of its tokens, as numpy} for each distinct prompt (tuple)."""
  found = {}
  for ids in map(tuple, prompts):
    if ids not in found:
      tokens_1P = engine_steps.padded(ids, engine_steps.bucket(len(ids), engine.max_context))
      found[ids] = jax.device_get(engine_steps.prompt_logprobs(engine.cfg, engine.params, tokens_1P))
  return found


def _sse(payload: dict) -> str:
  return f"data: {json.dumps(payload)}\n\n"
