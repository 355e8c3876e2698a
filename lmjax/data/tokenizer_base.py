"""What every tokenizer shares: the `Tokenizer` protocol, the spec file a run saves it under, and
text helpers for generated ids (whole-character streaming, stop strings, chat markup).
"""

from __future__ import annotations

import codecs
import os
from typing import Protocol, runtime_checkable

import numpy as np

from lmjax.core import files

SPEC_FILE = "tokenizer.json"


@runtime_checkable
class Tokenizer(Protocol):
  """The interface every lmjax tokenizer implements (tokenizers.py, hf_tokenizer.py).

  `encode` never yields a special (control) id for ordinary text; `decode(encode(t)) == t`.
  `bos_id`/`eos_id`/`pad_id` are None where the tokenizer has none.
  """

  kind: str
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None

  @property
  def vocab_size(self) -> int: ...

  def encode(self, text: str) -> list: ...

  def encode_batch(self, texts) -> list:
    """`encode` of each text, as int32 numpy arrays, as fast as the tokenizer allows (preparation)."""
    ...

  def decode(self, ids, skip_special_tokens: bool = True) -> str: ...

  def token_bytes(self, token_id: int) -> bytes:
    """The bytes one id stands for in decoded text: a byte-level token may hold part of a UTF-8
    character, which no str can show (OpenAI's logprobs `bytes`). For ordinary ids
    `b"".join(map(token_bytes, ids)).decode() == decode(ids)`; a special id gives its name's bytes
    (what `decode(..., skip_special_tokens=False)` renders)."""
    ...

  def save(self, directory: str) -> None: ...


def write_spec(directory: str, spec: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  files.write_json(os.path.join(directory, SPEC_FILE), spec)


class ChatText(str):
  """A rendered chat prompt: the string, plus `parts`, its (text, is_markup) pieces in order.
  Any string operation returns a plain str, which encodes as text: markup must come from a template."""

  def __new__(cls, text: str, parts: tuple | None = None):  # parts None (e.g. after copy): plain text
    obj = super().__new__(cls, text)
    obj.parts = parts
    return obj


def join_runs(ids: list, is_special, decode_run, render_special) -> str:
  """Decodes maximal runs of ordinary ids together and renders each special id on its own."""
  out, run = [], []
  for i in ids:
    if is_special(i):
      out += [decode_run(run) if run else "", render_special(i)]
      run = []
    else:
      run.append(i)
  return "".join(out) + (decode_run(run) if run else "")


def cut_at_stop(text: str, stop_strings) -> str:
  """`text` up to (not including) the earliest occurrence of any of `stop_strings`."""
  starts = [text.find(s) for s in stop_strings if s and s in text]
  return text[: min(starts)] if starts else text


def incomplete_tail(tokenizer, ids) -> int:
  """How many of `ids`' last tokens hold a UTF-8 character their bytes begin but do not finish (0 when
  the bytes end on a character boundary), counted back to a token that starts on a character boundary
  (a byte-level token can hold one character's end and the next one's start). A prompt given as token
  ids can end so; its completion's first tokens finish that character, so the completion's text decodes
  after those tokens (TextStream's `context_ids`) and an echoed prompt stops before the character
  (OpenAI's API shows text, and half a character is U+FFFD on both sides of the seam otherwise)."""
  window, count = b"", 0
  while len(window) < 4 and count < len(ids):  # a character has at most 4 bytes
    count += 1
    window = tokenizer.token_bytes(ids[-count]) + window
  decoder = codecs.getincrementaldecoder("utf-8")("replace")
  decoder.decode(window)
  pending = len(decoder.getstate()[0])  # the bytes of a character begun but not finished
  held, tail = 0, b""
  while held < len(ids) and (len(tail) < pending or (pending and tail[:1] and 0x80 <= tail[0] < 0xC0)):
    held += 1
    tail = tokenizer.token_bytes(ids[-held]) + tail
  return held


def whole_characters(tokenizer, ids) -> str:
  """The text of `ids`' bytes in whole characters: a last character they begin but do not finish is left
  out (decode() would show it as one or more U+FFFD, as many as the tokenizer's decoder makes)."""
  return codecs.getincrementaldecoder("utf-8")("replace").decode(b"".join(map(tokenizer.token_bytes, ids)))


class TextStream:
  """The text of a growing sequence of generated ids, released in whole characters.

  A character that byte-level tokens split (most CJK characters, emoji) decodes to U+FFFD until its
  last byte arrives, so trailing U+FFFD are held back until then (as HF's TextStreamer holds
  incomplete words); `flush()` releases what remains at the end. `context_ids`, a prompt's last tokens
  that begin a character (incomplete_tail), are decoded in front of the ids, so the first text released
  is that whole character; their own whole characters are not released.
  """

  def __init__(self, tokenizer, skip_special_tokens: bool = True, context_ids=()):
    self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
    self.context_ids, self.ids, self.released = list(context_ids), [], ""
    self._context_text = whole_characters(tokenizer, self.context_ids)

  def push(self, token_id: int) -> str:
    """Adds one id; returns the text it completes ('' while a character is incomplete)."""
    self.ids.append(int(token_id))
    return self._release(self._text().rstrip("\ufffd"))

  def flush(self) -> str:
    return self._release(self._text())

  def _text(self) -> str:
    if not self.context_ids:
      return self._decode(self.ids)
    return self._decode(self.context_ids + self.ids)[len(self._context_text) :]

  def _decode(self, ids) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

  def _release(self, text: str) -> str:
    if not text.startswith(self.released):  # a decoder that rewrote earlier text: release nothing new
      return ""
    new, self.released = text[len(self.released) :], text
    return new


def encode_padded(tokenizer, texts, seq_len: int):
  """Right-padded token ids [N, seq_len] and positions (-1 = padding), each text cut to seq_len."""
  tokens = np.zeros((len(texts), seq_len), np.int32)
  positions = np.full((len(texts), seq_len), -1, np.int32)
  for row, text in enumerate(texts):
    ids = tokenizer.encode(text)[:seq_len]
    tokens[row, : len(ids)], positions[row, : len(ids)] = ids, np.arange(len(ids))
  return tokens, positions
