"""OpenAI's response objects for lmjax-serve (inference/server.py): a request's whole response or its
stream chunks, with logprobs in each endpoint's shape, echo and usage counts."""

from __future__ import annotations

import codecs
import functools
import time
import uuid

from lmjax.data import tokenizer_base


class Reply:
  """OpenAI's response objects for one API request's choices (engine Requests, `n` a prompt): the whole
  response, or stream chunks. With `echo` each completion choice begins with its prompt, whose tokens'
  logprobs entries (the first None, as OpenAI's) come from `prompt_logprobs` when asked for."""

  def __init__(self, chat: bool, model_name: str, requests: list, tokenizer, n: int = 1, echo: bool = False):
    self.chat, self.model, self.requests, self.tokenizer = chat, model_name, requests, tokenizer
    self.n, self.echo, self._echoed = n, echo, [False] * len(requests)
    self.prompt_logprobs: dict = {}  # prompt (tuple) -> engine_steps.prompt_logprobs, for echo
    self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    self.created = int(time.time())
    # Each choice's logprobs entries given so far, the characters they complete, and its decoder of
    # them, which holds a character's first bytes.
    self._given, self._offset = [0] * len(requests), [0] * len(requests)
    self._characters = [codecs.getincrementaldecoder("utf-8")("replace") for _ in requests]
    self._token_bytes = functools.lru_cache(None)(tokenizer.token_bytes)
    # A prompt of token ids may end inside a character (tokenizer_base.incomplete_tail): the completion's
    # text begins with that whole character (the engine's TextStream), so its offsets count from it.
    self._begun = [tokenizer_base.incomplete_tail(tokenizer, r.prompt_ids) for r in requests]
    for characters, request, begun in zip(self._characters, requests, self._begun):
      if begun and not echo:  # with echo the prompt's entries feed the decoder
        characters.decode(b"".join(map(self._token_bytes, request.prompt_ids[-begun:])))

  def logprobs(self, index: int, upto: int) -> dict | None:
    """OpenAI's logprobs object for choice `index`'s tokens after those given so far, up to `upto` (None
    when the request did not ask for logprobs)."""
    request = self.requests[index]
    if request.logprobs is None:
      return None
    start, self._given[index] = self._given[index], max(self._given[index], upto)
    entries = list(zip(request.output_ids[start:upto], request.token_logprobs[start:upto]))
    echoed = 0  # prompt entries in front (echo's first call)
    if self.echo and not self._echoed[index]:
      self._echoed[index] = True
      entries = self._prompt_entries(request) + entries
      echoed = len(request.prompt_ids)
    token_bytes = self._token_bytes
    text = lambda token: token_bytes(token).decode("utf-8", "backslashreplace")  # a part: "\\xe4\\xbd"
    if self.chat:
      item = lambda t, logprob: {"token": text(t), "logprob": logprob, "bytes": list(token_bytes(t))}
      content = [{**item(t, lp), "top_logprobs": [item(*alt) for alt in top]} for t, (lp, top) in entries]
      return {"content": content, "refusal": None}
    offsets = []
    for i, (token, _) in enumerate(entries):  # characters of the text before each token's first whole one
      offsets.append(self._offset[index])
      self._offset[index] += len(self._characters[index].decode(token_bytes(token)))
      if i == echoed - 1:  # the completion starts after the echoed text (the decoder keeps a begun character)
        self._offset[index] = len(self.echoed(index))
    return {
      "tokens": [text(t) for t, _ in entries],
      "token_logprobs": [lp for _, (lp, _) in entries],
      "top_logprobs": [
        None if lp is None else {**_by_text(text, top), text(t): lp} for t, (lp, top) in entries
      ],
      "text_offset": offsets,
    }

  def _prompt_entries(self, request) -> list:
    """(token, (log p or None, [(id, log p)] alternatives)) of each prompt token, as token_logprobs has
    them for the completion's tokens; the first token has no log p (nothing comes before it)."""
    chosen, top, top_ids = self.prompt_logprobs[tuple(request.prompt_ids)]
    k = request.logprobs
    later = [
      (token, (float(chosen[i]), list(zip(top_ids[i, :k].tolist(), top[i, :k].tolist()))))
      for i, token in enumerate(request.prompt_ids[1:])
    ]
    return [(request.prompt_ids[0], (None, []))] + later

  def echoed(self, index: int) -> str:
    """The text choice `index` begins with: its prompt with `echo` (control tokens by name, as its
    logprobs entries show them), else nothing; a character the prompt's ids begin but do not finish is
    left to the completion, whose text begins with it whole."""
    if not self.echo:
      return ""
    ids, begun = self.requests[index].prompt_ids, self._begun[index]
    if not begun:
      return self.tokenizer.decode(ids, skip_special_tokens=False)
    before = self.tokenizer.decode(ids[: len(ids) - begun], skip_special_tokens=False)
    return before + tokenizer_base.whole_characters(self.tokenizer, ids[len(ids) - begun :])

  def usage(self) -> dict:
    """Token counts: each prompt once (not once a choice), the completion tokens of every choice."""
    prompt = sum(len(r.prompt_ids) for r in self.requests[:: self.n])
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


def _by_text(text, top: list) -> dict:
  """{token text: log p} of (id, log p) pairs, likeliest first: OpenAI's completion format keys by text,
  so of tokens that read the same the likeliest stays."""
  alternatives = {}
  for token, logprob in top:
    alternatives.setdefault(text(token), logprob)
  return alternatives
