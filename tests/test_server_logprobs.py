"""Log-probabilities through lmjax-serve's OpenAI API (`logprobs` of /v1/completions, `logprobs` and
`top_logprobs` of /v1/chat/completions, whole and streamed) against a float64 log-softmax of one
uncached forward pass over the prompt and the reply."""

import codecs
import json
import threading

import httpx
import jax.numpy as jnp
import numpy as np
import pytest
from test_server import Served, chat_ids, post

from lmjax import model
from lmjax.data import tokenizer_base, tokenizers
from lmjax.inference import api_replies, api_requests, engine as engine_lib

from conftest import is_utf8

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served():
  s = Served(init_std=0.3)  # a tiny model whose distributions are not flat
  yield s
  s.close()


def reference_logprobs(lm, ids: list) -> np.ndarray:
  """log softmax of the model's logits at each position of ids, float64: [len(ids), V]."""
  logits = np.asarray(
    model.Transformer(lm.cfg).apply({"params": lm.params}, jnp.asarray([ids]))[0], np.float64
  )
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def expected(lm, prompt_ids: list, reply_ids: list, k: int) -> list:
  """(log p of each reply token, its k likeliest (token, log p)) from the reference."""
  logp = reference_logprobs(lm, prompt_ids + reply_ids)[len(prompt_ids) - 1 : -1]
  return [
    (row[t], [(int(i), row[i]) for i in np.argsort(-row, kind="stable")[:k]])
    for row, t in zip(logp, reply_ids)
  ]


def greedy_ids(lm, prompt_ids: list, n: int) -> list:
  return lm.generate(prompt_ids, max_new_tokens=n, do_sample=False)[0][len(prompt_ids) :].tolist()


def test_engine_logprobs_are_the_models_before_temperature_in_a_mixed_batch(served):
  """A sampled request (temperature 1.5, top_k 5) in slot 1 beside one without logprobs in slot 0:
  each of its tokens' entries is log softmax of the plain logits, not of the tempered or filtered ones."""
  tokenizer = served.lm.tokenizer
  prompt_ids = tokenizer.encode("the lazy dog")
  done = [threading.Event(), threading.Event()]
  plain = engine_lib.Request(tokenizer.encode("fox"), 12, lambda d, f: f and done[0].set(), ignore_eos=True)
  request = engine_lib.Request(
    prompt_ids, 12, lambda d, f: f and done[1].set(), temperature=1.5, top_k=5, seed=3, logprobs=4
  )
  with served.engine._wake:  # admitted together: slots 0 and 1
    served.engine.submit(plain)
    served.engine.submit(request)
  assert all(e.wait(60) for e in done)
  assert plain.token_logprobs == []
  want = expected(served.lm, prompt_ids, request.output_ids, 4)
  assert len(request.token_logprobs) == len(request.output_ids) == len(want) > 1
  for (logprob, top), (want_logprob, want_top) in zip(request.token_logprobs, want):
    assert abs(logprob - want_logprob) < 1e-4
    assert [i for i, _ in top] == [i for i, _ in want_top]
    assert np.allclose([lp for _, lp in top], [lp for _, lp in want_top], atol=1e-4)


def test_chat_logprobs_equal_the_reference_whole_and_streamed(served):
  client = served.client()
  messages = [{"role": "user", "content": "the lazy dog"}]
  ask = dict(model="tiny", messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
  chat = client.chat.completions.create(**ask)
  content = chat.choices[0].logprobs.content
  chunks = [c.choices[0] for c in client.chat.completions.create(**ask, stream=True) if c.choices]
  assert [e for c in chunks if c.logprobs for e in c.logprobs.content] == content
  prompt_ids = chat_ids(served.lm, messages)
  reply_ids = greedy_ids(served.lm, prompt_ids, 10)
  assert len(content) == chat.usage.completion_tokens == len(reply_ids)
  tokenizer = served.lm.tokenizer
  shown = [e for e, i in zip(content, reply_ids) if i != tokenizer.eos_id]  # EOS: in content, not text
  assert b"".join(bytes(e.bytes) for e in shown).decode(errors="replace") == chat.choices[0].message.content
  for entry, token, (logprob, top) in zip(content, reply_ids, expected(served.lm, prompt_ids, reply_ids, 3)):
    assert abs(entry.logprob - logprob) < 1e-4
    assert np.allclose([t.logprob for t in entry.top_logprobs], [lp for _, lp in top], atol=1e-4)
    for item, i in [(entry, token)] + list(zip(entry.top_logprobs, [i for i, _ in top])):
      text = tokenizer.decode([i], skip_special_tokens=False)
      if "\ufffd" in text:  # part of a character: raw bytes, shown as escapes
        assert item.token.startswith("\\x") and not is_utf8(bytes(item.bytes))
      else:
        assert (item.token, bytes(item.bytes)) == (text, text.encode())


def test_a_character_split_over_tokens_keeps_its_bytes_and_offsets(served):
  """ "é🙂 the" in the server's byte-level BPE (fitted on ASCII) is 2 + 4 byte tokens and then " the":
  chat entries carry each token's raw bytes (joined: the text) with "\\xNN" escapes as token text;
  completion offsets count the characters before each token's first byte (a token inside a character
  gets that character's offset), tokens of the same bytes stay apart in top_logprobs."""
  tokenizer, text = served.lm.tokenizer, "é🙂 the"
  ids = tokenizer.encode(text)
  raw = text.encode()
  assert len(ids) == 7
  request = engine_lib.Request(ids, 8, None, logprobs=2)
  request.output_ids = list(ids)
  request.token_logprobs = [(-0.5, [(i, -0.5), (ids[0], -1.0)]) for i in ids]
  chat = api_replies.Reply(True, "tiny", [request], tokenizer).logprobs(0, len(ids))["content"]
  assert b"".join(bytes(e["bytes"]) for e in chat) == raw
  assert [e["token"] for e in chat] == [f"\\x{b:02x}" for b in raw[:6]] + [" the"]
  completion = api_replies.Reply(False, "tiny", [request], tokenizer)
  first, rest = completion.logprobs(0, 3), completion.logprobs(0, len(ids))  # as streamed: in two parts
  starts = [0, 1, 2, 3, 4, 5, 6]  # byte offsets of the tokens
  assert first["text_offset"] + rest["text_offset"] == [len(raw[:b].decode(errors="ignore")) for b in starts]
  assert first["text_offset"] + rest["text_offset"] == [0, 0, 1, 1, 1, 1, 2]
  assert first["top_logprobs"][1] == {"\\xa9": -0.5, "\\xc3": -1.0}


def test_a_prompt_of_ids_ending_inside_a_character_gives_it_to_the_completion(served):
  """Prompt ids that stop inside a character of "é🙂 the" (byte tokens: 2 for é, 4 for 🙂): the echoed
  prompt stops before the character and the completion begins with it whole, so echo's text is the
  text of all the ids and its offsets count characters across the seam; without echo the completion
  still begins with the character (no U+FFFD on either side)."""
  tokenizer, text = served.lm.tokenizer, "é🙂 the"
  ids = tokenizer.encode(text)
  assert [tokenizer_base.incomplete_tail(tokenizer, ids[:j]) for j in range(8)] == [0, 1, 0, 1, 2, 3, 0, 0]
  offsets = [0, 0, 1, 1, 1, 1, 2]  # characters before each token's first whole one, in the whole text
  for j in range(1, 7):
    prompt, reply = ids[:j], ids[j:]
    begun = tokenizer_base.incomplete_tail(tokenizer, prompt)
    stream = tokenizer_base.TextStream(tokenizer, context_ids=prompt[j - begun :] if begun else ())
    completion = "".join(stream.push(t) for t in reply) + stream.flush()
    whole_before = len(text.encode()[: j - begun].decode())  # characters the prompt finishes
    assert completion == text[whole_before:]
    request = engine_lib.Request(prompt, 8, None, logprobs=1)
    request.output_ids, request.token_logprobs = list(reply), [(-0.5, [(t, -0.5)]) for t in reply]
    echo = api_replies.Reply(False, "tiny", [request], tokenizer, echo=True)
    echo.prompt_logprobs[tuple(prompt)] = (np.zeros(j - 1), np.zeros((j - 1, 1)), np.zeros((j - 1, 1), int))
    assert echo.echoed(0) + completion == text
    assert echo.logprobs(0, len(reply))["text_offset"] == offsets
    plain = api_replies.Reply(False, "tiny", [request], tokenizer)
    assert plain.logprobs(0, len(reply))["text_offset"] == [o - whole_before for o in offsets[j:]]


def test_the_server_completes_a_character_begun_in_a_prompt_of_ids(served):
  tokenizer = served.lm.tokenizer
  prompt = tokenizer.encode("é🙂 the")[:4]  # é and half of 🙂
  reply = greedy_ids(served.lm, prompt, 6)
  full = tokenizer.decode(prompt + reply)
  assert "\ufffd" not in full  # the greedy reply finishes the character (else this tests nothing)
  for echo, want in ((True, full), (False, full[1:])):
    ask = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, "echo": echo}
    assert post(served, "/completions", ask).json()["choices"][0]["text"] == want
    streamed = post(served, "/completions", {**ask, "stream": True}).text.split("\n\n")
    pieces = [json.loads(e[len("data: ") :]) for e in streamed if e.startswith("data: {")]
    assert "".join(p["choices"][0]["text"] for p in pieces if p["choices"]) == want


def test_completion_logprobs_streamed_equal_whole(served):
  client = served.client()
  ask = dict(model="tiny", prompt="quick brown", max_tokens=12, temperature=0, logprobs=2)
  whole = client.completions.create(**ask).choices[0]
  pieces = [c.choices[0] for c in client.completions.create(**ask, stream=True) if c.choices]
  streamed = [p.logprobs for p in pieces if p.logprobs]
  tokens = [t for lp in streamed for t in lp.tokens]
  prompt_ids = served.lm.tokenizer.encode("quick brown")
  reply_ids = greedy_ids(served.lm, prompt_ids, 12)
  assert tokens == whole.logprobs.tokens and len(tokens) == len(reply_ids)
  assert [x for lp in streamed for x in lp.token_logprobs] == whole.logprobs.token_logprobs
  assert [x for lp in streamed for x in lp.text_offset] == whole.logprobs.text_offset
  raw = [served.lm.tokenizer.token_bytes(i) for i in reply_ids]  # checked in test_data.py
  complete = lambda b: len(codecs.utf_8_decode(b, "replace", False)[0])  # a last partial character: none
  assert whole.logprobs.text_offset == [complete(b"".join(raw[:i])) for i in range(len(raw))]
  for logprob, top, (want, want_top) in zip(
    whole.logprobs.token_logprobs, whole.logprobs.top_logprobs, expected(served.lm, prompt_ids, reply_ids, 2)
  ):
    assert abs(logprob - want) < 1e-4 and abs(logprob - max(top.values())) < 1e-6  # greedy: the likeliest
    by_text = {}  # keyed by text, the likeliest of tokens that read the same
    for i, lp in want_top:
      by_text.setdefault(served.lm.tokenizer.token_bytes(i).decode("utf-8", "backslashreplace"), lp)
    assert top.keys() == by_text.keys() and np.allclose(list(top.values()), list(by_text.values()), atol=1e-4)


@pytest.mark.parametrize(
  "path,body,message",
  [
    ("/completions", {"prompt": "a", "logprobs": 6}, "logprobs must be an integer in [0, 5]"),
    ("/completions", {"prompt": "a", "logprobs": True}, "logprobs must be an integer in [0, 5]"),
    ("/chat/completions", {"logprobs": 3}, "logprobs must be true or false"),
    ("/chat/completions", {"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ("/completions", {"prompt": "a", "top_logprobs": 2}, "top_logprobs is a chat field"),
    (
      "/chat/completions",
      {"logprobs": True, "top_logprobs": 21},
      "top_logprobs must be an integer in [0, 20]",
    ),
  ],
)
def test_bad_logprobs_get_a_400(served, path, body, message):
  if path == "/chat/completions":
    body = {**body, "messages": [{"role": "user", "content": "hi"}]}
  response = post(served, path, {"model": "tiny", "max_tokens": 2, **body})
  assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_the_sampled_token_is_always_among_a_completions_top_logprobs(served):
  """OpenAI: up to logprobs + 1 alternatives, the sampled token's always there (logprobs=0: only it)."""
  client = served.client()
  ask = dict(model="tiny", prompt="brown fox", max_tokens=10, temperature=1.5, seed=1)
  for k in (0, 1):
    logprobs = client.completions.create(**ask, logprobs=k).choices[0].logprobs
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
      assert top[token] == logprob and len(top) <= k + 1
      assert k or top == {token: logprob}


def test_no_logprobs_unless_asked(served):
  reply = post(served, "/completions", {"model": "tiny", "prompt": "a", "max_tokens": 3}).json()
  assert reply["choices"][0]["logprobs"] is None
  completion = {"model": "tiny", "prompt": "a", "max_tokens": 3, "logprobs": False}
  assert post(served, "/completions", completion).json()["choices"][0]["logprobs"] is None
  chat = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 3,
    "logprobs": False,
  }
  assert json.loads(post(served, "/chat/completions", chat).text)["choices"][0]["logprobs"] is None


def test_prompts_admitted_together_are_prefilled_packed_each_as_alone(served):
  """Three prompts of different lengths admitted at once run in one packed forward (engine._pack, each
  attending only to itself): each request's log-probabilities equal the float64 reference of its own
  prompt and reply, and each greedy reply equals generate()'s for its prompt alone."""
  engine, tokenizer = served.engine, served.lm.tokenizer
  packs, run_pack = [], engine._pack
  engine._pack = lambda requests: packs.append(len(requests)) or run_pack(requests)
  texts = ["the lazy dog", "quick brown fox jumps over the", "fox"]
  done = [threading.Event() for _ in texts]
  requests = [
    engine_lib.Request(tokenizer.encode(t), 6, lambda d, f, e=e: f and e.set(), temperature=0, logprobs=2)
    for t, e in zip(texts, done)
  ]
  try:
    with engine._wake:  # admitted together
      for request in requests:
        engine.submit(request)
    assert all(e.wait(60) for e in done)
  finally:
    engine._pack = run_pack
  assert packs == [3]
  for request in requests:
    assert request.output_ids == greedy_ids(served.lm, request.prompt_ids, len(request.output_ids))
    want = expected(served.lm, request.prompt_ids, request.output_ids, 2)
    for (logprob, top), (want_logprob, want_top) in zip(request.token_logprobs, want):
      assert abs(logprob - want_logprob) < 1e-4 and [i for i, _ in top] == [i for i, _ in want_top]


def test_echo_gives_the_prompt_and_its_tokens_logprobs_against_the_reference(served):
  """A prompt sent as token ids (as lm-eval's local-completions sends it), echoed with logprobs: the
  text and entries begin with the prompt's, the first without a log p, the others the reference's."""
  tokenizer, client = served.lm.tokenizer, served.client()
  ids = [tokenizer.bos_id] + tokenizer.encode("the lazy dog barks")  # a control token shown by name
  ask = dict(model="tiny", prompt=ids, max_tokens=4, temperature=0, logprobs=2)
  plain = client.completions.create(**ask).choices[0]
  echoed = client.completions.create(**ask, echo=True).choices[0]
  prompt_text = tokenizer.decode(ids, skip_special_tokens=False)
  assert echoed.text == prompt_text + plain.text
  got, L = echoed.logprobs, len(ids)
  assert got.tokens[L:] == plain.logprobs.tokens and got.token_logprobs[L:] == plain.logprobs.token_logprobs
  assert got.tokens[:L] == [tokenizer.token_bytes(i).decode() for i in ids]
  assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
  logp = reference_logprobs(served.lm, ids)
  assert np.allclose(got.token_logprobs[1:L], [logp[t, ids[t + 1]] for t in range(L - 1)], atol=1e-4)
  for t in range(L - 1):
    shown = lambda i: tokenizer.token_bytes(int(i)).decode("utf-8", "backslashreplace")  # as the API's
    likeliest = {shown(i): logp[t, i] for i in np.argsort(-logp[t])[:2]}
    assert set(likeliest) <= set(got.top_logprobs[t + 1])
    assert np.allclose([got.top_logprobs[t + 1][k] for k in likeliest], list(likeliest.values()), atol=1e-4)
  assert got.text_offset[: L + 1] == [
    len(tokenizer.decode(ids[:i], skip_special_tokens=False)) for i in range(L + 1)
  ]
  streamed = list(client.completions.create(**ask, echo=True, stream=True))
  assert streamed[0].choices[0].text == prompt_text
  assert "".join(c.choices[0].text for c in streamed if c.choices) == echoed.text


def test_several_prompts_each_get_their_choices_in_order(served):
  client = served.client()
  prompts = ["the lazy dog", served.lm.tokenizer.encode("quick brown")]
  out = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0, n=2)
  assert [c.index for c in out.choices] == [0, 1, 2, 3]
  for prompt, choices in zip(prompts, (out.choices[:2], out.choices[2:])):
    one = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0)
    assert [c.text for c in choices] == [one.choices[0].text] * 2
  prompt_tokens = len(served.lm.tokenizer.encode("the lazy dog")) + len(prompts[1])
  assert out.usage.prompt_tokens == prompt_tokens


@pytest.mark.parametrize(
  "prompt,message",
  [
    ([], "prompt must be a string, a list of token ids"),
    ([1, "a"], "prompt must be a string, a list of token ids"),
    ([10**6], "token id 1000000 is outside the vocabulary"),
  ],
)
def test_bad_prompts_get_a_400_naming_the_prompt(served, prompt, message):
  response = post(served, "/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 2})
  assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_echo_on_chat_is_refused_by_name(served):
  messages = [{"role": "user", "content": "hi"}]
  response = post(served, "/chat/completions", {"model": "tiny", "messages": messages, "echo": True})
  assert response.status_code == 400 and response.json()["error"]["param"] == "echo"


def test_lm_eval_local_completions_scores_through_the_server_as_the_reference(served):
  """lm-eval's `local-completions` model, with no tokenizer of its own (it finds the server's /tokenize),
  scores (context, continuation) pairs through echo and logprobs: sums and greedy flags as the model's."""
  from lm_eval.api.instance import Instance
  from lm_eval.models.openai_completions import LocalCompletionsAPI

  api = LocalCompletionsAPI(base_url=served.url + "/completions", model="tiny", max_length=96, batch_size=2)
  assert api.tokenizer_backend == "remote"
  ours = served.lm.tokenizer
  assert (
    (api.tokenizer.eos_token_id, api.tokenizer.bos_token_id) == (ours.eos_id, ours.bos_id) != (None, None)
  )
  pairs = [("the lazy dog", " barks"), ("quick brown", " fox jumps over"), ("a", " b")]
  results = api.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
  tokenizer = served.lm.tokenizer
  for (context, continuation), (loglikelihood, greedy) in zip(pairs, results):
    whole, start = tokenizer.encode(context + continuation), len(tokenizer.encode(context))
    logp = reference_logprobs(served.lm, whole)
    assert abs(loglikelihood - sum(logp[t - 1, whole[t]] for t in range(start, len(whole)))) < 1e-3
    assert greedy == all(logp[t - 1].argmax() == whole[t] for t in range(start, len(whole)))


def test_tokenize_turns_control_token_strings_into_their_ids_as_vllm_does(served):
  """/tokenize parses control-token strings, as vLLM's (HF's tokenizer(text)) does, where lmjax's own
  encode keeps them text; lmjax's byte-level BPE kind included."""
  tokenizer = served.lm.tokenizer
  eos = tokenizer.decode([tokenizer.eos_id], skip_special_tokens=False)
  tokens = httpx.post(served.url.removesuffix("/v1") + "/tokenize", json={"prompt": f"a{eos}b"}).json()[
    "tokens"
  ]
  assert tokens == tokenizer.encode("a") + [tokenizer.eos_id] + tokenizer.encode("b")
  assert tokenizer.eos_id not in tokenizer.encode(f"a{eos}b")
  bytelevel = tokenizers.train("bytelevel", "abc abc a " * 50, vocab_size=270)
  ids = api_requests.tokenize_as_vllm(bytelevel, "ab<|endoftext|>c")
  assert ids == bytelevel.encode("ab") + [bytelevel.eos_id] + bytelevel.encode("c")


def test_text_no_tokenizer_encodes_and_empty_token_lists_are_handled(served):
  base = served.url.removesuffix("/v1")
  lone = '{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}'  # JSON allows a lone surrogate
  response = post(served, "/completions", None, raw=lone)
  assert (
    response.status_code == 400 and "not text this tokenizer encodes" in response.json()["error"]["message"]
  )
  response = httpx.post(base + "/tokenize", content='{"prompt": "a\\ud800b"}')
  assert response.status_code == 400
  assert httpx.post(base + "/detokenize", json={"tokens": []}).json() == {"prompt": ""}
