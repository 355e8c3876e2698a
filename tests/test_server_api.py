"""lmjax-serve against OpenAI's API reference where clients depend on its details: error objects (type,
param, code), the model routes, the forms chat messages take, no-op defaults some clients always send,
and the types of the streaming fields."""

import time

import httpx
import pytest
from test_server import Served, chat_ids, post, reference

from lmjax.inference import engine as engine_lib

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served():
  s = Served(max_context=96)
  yield s
  s.close()


def _error(response, status):
  assert response.status_code == status, response.text
  return response.json()["error"]


def test_an_unknown_model_is_openais_model_not_found(served):
  error = _error(post(served, "/completions", {"model": "gpt-4", "prompt": "a"}), 404)
  assert (error["type"], error["param"], error["code"]) == (
    "invalid_request_error",
    "model",
    "model_not_found",
  )
  with pytest.raises(openai.NotFoundError) as raised:
    served.client().completions.create(model="gpt-4", prompt="a", max_tokens=2)
  assert raised.value.code == "model_not_found"


def test_the_model_routes_and_unknown_routes(served):
  assert served.client().models.retrieve("tiny").id == "tiny"
  error = _error(httpx.get(served.url + "/models/other"), 404)
  assert error["code"] == "model_not_found"
  assert "message" in _error(httpx.get(served.url + "/nowhere"), 404)
  wrong_method = httpx.get(served.url + "/completions")
  assert "GET /v1/completions" in _error(wrong_method, 405)["message"]
  assert wrong_method.headers["allow"] == "POST"


def test_the_api_key_and_queue_errors_carry_openais_codes():
  s = Served(max_batch=1, max_context=512, max_queue=0, api_key="secret")
  try:
    assert _error(httpx.get(s.url + "/models"), 401)["code"] == "invalid_api_key"
    request = engine_lib.Request(s.lm.tokenizer.encode("a"), 480, lambda d, f: None, ignore_eos=True)
    s.engine.submit(request)  # takes the one slot; with no queue the next request is refused
    while s.engine.active() == 0:
      time.sleep(0.001)
    response = httpx.post(
      s.url + "/completions",
      json={"model": "tiny", "prompt": "a", "max_tokens": 2},
      headers={"Authorization": "Bearer secret"},
    )
    assert _error(response, 429)["code"] == "rate_limit_exceeded"
    request.cancelled = True
  finally:
    s.close()


def test_chat_content_as_text_parts_reads_as_the_joined_string(served):
  parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]
  chat = served.client().chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
  as_string = [messages[0], {"role": "user", "content": "Hello\nworld"}]
  assert chat.choices[0].message.content == reference(served.lm, chat_ids(served.lm, as_string), 8)[0]
  developer = [{"role": "developer", "content": "Be brief."}, as_string[1]]  # OpenAI's newer "system"
  chat = served.client().chat.completions.create(
    model="tiny", messages=developer, max_tokens=8, temperature=0
  )
  assert chat.choices[0].message.content == reference(served.lm, chat_ids(served.lm, as_string), 8)[0]
  history = [*as_string, {"role": "assistant", "content": None}, {"role": "user", "content": "Again"}]
  body = {"model": "tiny", "messages": history, "max_tokens": 2}
  assert post(served, "/chat/completions", body).status_code == 200  # a null assistant turn reads as ""


@pytest.mark.parametrize(
  "messages,message",
  [
    ([{"role": "banana", "content": "hi"}], "role must be system, user or assistant, got 'banana'"),
    ([{"role": "tool", "content": "42"}], "role must be system, user or assistant"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "list of text parts"),
    ([{"role": "user", "content": None}], "content must be a string"),
    ([{"role": "user", "content": []}], "content must be a string"),
    ([{"role": "user", "content": "\ud83d"}], "not text this tokenizer encodes"),
    ("hi", "messages must be a non-empty list"),
  ],
)
def test_bad_chat_messages_are_a_400_naming_messages(served, messages, message):
  error = _error(
    post(served, "/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 2}), 400
  )
  assert message in error["message"] and error["param"] == "messages"


def test_no_op_defaults_are_accepted_and_real_uses_refused(served):
  base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
  for extra in (
    {"tools": []},
    {"response_format": {"type": "text"}},
    {"tool_choice": "none"},
    {"best_of": 1},
  ):
    assert post(served, "/chat/completions", {**base, **extra}).status_code == 200, extra
  for field, value in [("tool_choice", "required"), ("response_format", {"type": "json_object"})]:
    error = _error(post(served, "/chat/completions", {**base, field: value}), 400)
    assert error["param"] == field and "is not supported" in error["message"]


@pytest.mark.parametrize(
  "extra,param,message",
  [
    ({"stream": "yes"}, "stream", "stream must be true or false, got 'yes'"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream: true"),
    ({"stream": True, "stream_options": {"include_usage": "x"}}, "stream_options", "stream_options must be"),
    ({"max_completion_tokens": "x"}, "max_completion_tokens", "max_completion_tokens must be a positive"),
  ],
)
def test_field_types_are_checked_and_named(served, extra, param, message):
  body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra}
  error = _error(post(served, "/chat/completions", body), 400)
  assert error["param"] == param and message in error["message"]


def test_a_prompt_too_long_for_the_context_is_the_prompts_fault_not_max_tokens(served):
  long = {"model": "tiny", "prompt": "a " * 200, "max_tokens": 5}
  error = _error(post(served, "/completions", long), 400)
  assert error["param"] == "prompt" and "no room for a reply" in error["message"]
  chat = {"model": "tiny", "messages": [{"role": "user", "content": "a " * 200}]}  # no max_tokens given
  error = _error(post(served, "/chat/completions", chat), 400)
  assert error["param"] == "messages" and "no room for a reply" in error["message"]
  fits = {"model": "tiny", "prompt": "a", "max_tokens": 500}
  error = _error(post(served, "/completions", fits), 400)
  room = served.engine.max_context - 1  # "a" is one token
  assert error["param"] == "max_tokens" and error["message"].endswith(f"give max_tokens at most {room}")
  chat = {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 500}
  error = _error(post(served, "/chat/completions", chat), 400)
  assert error["param"] == "max_completion_tokens" and "max_tokens" not in error["message"].replace(
    "max_completion_tokens", ""
  )
