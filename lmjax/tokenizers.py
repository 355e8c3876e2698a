"""Tokenizers behind one small interface.

Every tokenizer has `encode(text) -> list[int]`, `decode(ids, skip_special_tokens=True)
-> str`, `vocab_size`, and the special ids `bos_id`, `eos_id`, `pad_id` (None
where it has none). A run saves its tokenizer next to its
checkpoints (`tok.save(dir)`), and sampling later loads that same one (`load(dir)`).

Promises, tested as properties over random Unicode text: `decode(encode(t)) == t` for every
tokenizer (for `char`, within its vocabulary), and `encode` never yields a special (control) id:
text is text. Control tokens come only from a chat template's own markup (`apply_chat_template`
returns a `ChatText` that remembers which parts are markup), or from `encode(t,
special_tokens=True)` when a caller asks for them explicitly.

  char  one id per character of the training text (nanoGPT's shakespeare_char);
        other characters are an error naming them
  byte  UTF-8 bytes 0..255, then <bos>, <eos>, <pad>: any text round-trips
  bpe   SentencePiece BPE trained on the training split, with byte fallback so
        any text (Chinese, emoji) round-trips; saved as a `.model` file
  hf    a pretrained byte-level BPE (GPT-2 style, e.g. SmolLM2's, read from GGUF
        metadata) run by the Hugging Face `tokenizers` library, with its chat template
"""
from __future__ import annotations

import io
import json
import os
import re
import threading

from lmjax import rundir

_SPEC_FILE = "tokenizer.json"
_BPE_FILE = "tokenizer.model"
_HF_FILE = "tokenizer_hf.json"
KINDS = ("char", "byte", "bpe", "hf")
_PRE_TOKENIZERS = ("gpt2", "smollm")  # GGUF `tokenizer.ggml.pre` values we reproduce


class CharTokenizer:
  kind = "char"
  bos_id = eos_id = pad_id = None

  def __init__(self, chars: str):
    self.chars = "".join(sorted(set(chars)))
    if not self.chars:
      raise ValueError("cannot build a char tokenizer from an empty text")
    self._index = {c: i for i, c in enumerate(self.chars)}

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> list:
    try:
      return [self._index[c] for c in text]
    except KeyError:
      unknown = sorted(set(text) - set(self._index))
      raise ValueError(f"characters {unknown!r} are not in this char tokenizer's vocabulary (built from the "
                       "training text); use data.tokenizer='byte' or 'bpe' for open text") from None

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    del skip_special_tokens  # a char vocabulary has no special tokens
    return "".join(self.chars[int(i)] for i in ids)

  def save(self, directory: str) -> None:
    _write_spec(directory, {"kind": self.kind, "chars": self.chars})


class ByteTokenizer:
  kind = "byte"
  bos_id, eos_id, pad_id = 256, 257, 258
  vocab_size = 259

  def encode(self, text: str) -> list:
    return list(text.encode("utf-8"))

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    names = {self.bos_id: "<bos>", self.eos_id: "<eos>", self.pad_id: "<pad>"}
    # Runs of bytes decode together (a character spans several); a sampled sequence may cut a
    # multi-byte character: show U+FFFD rather than fail.
    return _join_runs([int(i) for i in ids], lambda i: i >= 256, lambda run: bytes(run).decode("utf-8", "replace"),
                      lambda i: "" if skip_special_tokens else names[i])

  def save(self, directory: str) -> None:
    _write_spec(directory, {"kind": self.kind})


class BPETokenizer:
  """SentencePiece BPE; identity normalisation and byte fallback make it lossless."""
  kind = "bpe"

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.bos_id, self.eos_id, self.pad_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()

  @classmethod
  def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
    import sentencepiece as spm
    lines = [line for line in text.split("\n") if line]
    if not lines:
      raise ValueError("cannot train a BPE tokenizer on an empty text")
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
          byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
          add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
          split_digits=True, user_defined_symbols=["\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=3,
          max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as err:
      raise ValueError(f"SentencePiece could not train a BPE vocabulary of {vocab_size} on this text: {err}. "
                       "A vocabulary must exceed 256 byte pieces + 5 specials and fit the text; "
                       "lower data.vocab_size or use more text") from None
    return cls(model.getvalue())

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list:
    # SentencePiece writes spaces as U+2581 internally, so a literal U+2581 in the text would come
    # back as a space; it is encoded as its three UTF-8 byte pieces instead, which decode to itself.
    parts = text.split(_SPACE_MARK)
    mark = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode("utf-8")]
    ids = self._sp.encode(parts[0])
    for part in parts[1:]:
      ids += mark + self._sp.encode(part)
    return ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    special = {self.bos_id, self.eos_id, self.pad_id} - {-1}
    return _join_runs([int(i) for i in ids], special.__contains__, self._sp.decode,
                      lambda i: "" if skip_special_tokens else self._sp.id_to_piece(i))

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, _BPE_FILE), "wb") as f:
      f.write(self.model_proto)
    _write_spec(directory, {"kind": self.kind, "model_file": _BPE_FILE})


class HFTokenizer:
  """A `tokenizers.Tokenizer` (byte-level BPE) with special ids and a chat template."""
  kind = "hf"

  def __init__(self, tokenizer, bos_id: int | None, eos_id: int | None, pad_id: int | None,
               chat_template: str = ""):
    self._tok = tokenizer
    self._lock = threading.Lock()
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self.chat_template = chat_template

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, special_tokens: bool = False) -> list:
    """Ids of `text`. Control-token strings in it (`<|im_end|>`) are ordinary text unless
    `special_tokens=True` (what HF's `tokenizer(text)` does by default) turns them into control ids.

    A ChatText from `apply_chat_template` is encoded as HF encodes the rendered string (so ids match
    HF's exactly) unless a control token would fall inside a message's content; then each piece is
    encoded alone, markup with control tokens and contents as text.
    """
    if isinstance(text, ChatText) and text.parts is not None:
      encoding = self._encoding(text, special_tokens=True)
      special = self._special_ids()
      spans, position = [], 0
      for part, markup in text.parts:
        if not markup:
          spans.append((position, position + len(part)))
        position += len(part)
      injected = any(i in special and any(a < end and b > start for a, b in spans)
                     for i, (start, end) in zip(encoding.ids, encoding.offsets))
      if not injected:
        return encoding.ids
      return [i for part, markup in text.parts for i in self.encode(part, special_tokens=markup)]
    return self._encoding(text, special_tokens).ids

  def _encoding(self, text: str, special_tokens: bool):
    with self._lock:  # encode_special_tokens is state on the shared Rust tokenizer
      self._tok.encode_special_tokens = not special_tokens
      return self._tok.encode(str(text), add_special_tokens=False)

  def _special_ids(self) -> set:
    return {i for i, token in self._tok.get_added_tokens_decoder().items() if token.special}

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> "ChatText":
    """Renders [{'role': ..., 'content': ...}] with the model's Jinja chat template (as HF does).

    The result is a str (print it, compare it) that also knows which parts are the template's
    markup, so that `encode` gives control tokens for those only: a message typing `<|im_end|>`
    cannot close its turn. The parts come from a second rendering with each content replaced by a
    private-use sentinel, so they are found by position, not by searching the text (which could
    match inside markup); a template may move, strip or repeat contents. Raises ValueError if it
    changes a content otherwise.
    """
    if not self.chat_template:
      raise ValueError("this tokenizer has no chat template; prompt the model with raw text instead")
    rendered = self._render(messages, add_generation_prompt)
    marked = self._render([{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)],
                          add_generation_prompt)
    parts, position = [], 0
    for piece in re.split("(\ue000\\d+\ue001)", marked):
      if piece.startswith("\ue000"):  # a message's content, as the template inserted it (maybe stripped)
        content = messages[int(piece[1:-1])]["content"]
        piece = next((c for c in (content, content.strip()) if rendered.startswith(c, position)), None)
        if piece is None:
          raise ValueError(f"the chat template changes message content ({content[:40]!r}), so its markup cannot "
                           "be told from the text")
        parts.append((piece, False))
      elif piece:
        if not rendered.startswith(piece, position):
          raise ValueError("the chat template renders differently for different contents; cannot tell markup "
                           "from text")
        parts.append((piece, True))
      position += len(piece)
    return ChatText(rendered, tuple(parts))

  def _render(self, messages, add_generation_prompt: bool) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    def raise_exception(message):
      raise ValueError(f"chat template error: {message}")
    return env.from_string(self.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, raise_exception=raise_exception,
        bos_token=self._token(self.bos_id), eos_token=self._token(self.eos_id))

  def _token(self, token_id) -> str:
    return self._tok.id_to_token(token_id) if token_id is not None and token_id >= 0 else ""

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    self._tok.save(os.path.join(directory, _HF_FILE))
    _write_spec(directory, {"kind": self.kind, "tokenizer_file": _HF_FILE, "bos_id": self.bos_id,
                            "eos_id": self.eos_id, "pad_id": self.pad_id, "chat_template": self.chat_template})


_SPACE_MARK = "\u2581"  # SentencePiece's whitespace symbol


class ChatText(str):
  """A rendered chat prompt: the string, plus `parts`, its (text, is_markup) pieces in order.
  Any string operation returns a plain str, which encodes as text: markup must come from a template."""

  def __new__(cls, text: str, parts: tuple | None = None):  # parts None (e.g. after copy): plain text
    obj = super().__new__(cls, text)
    obj.parts = parts
    return obj


def _join_runs(ids: list, is_special, decode_run, render_special) -> str:
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
  return text[:min(starts)] if starts else text


class TextStream:
  """The text of a growing sequence of generated ids, released in whole characters.

  A character that byte-level tokens split (most CJK characters, emoji) decodes to U+FFFD until its
  last byte arrives, so trailing U+FFFD are held back until then (as HF's TextStreamer holds
  incomplete words); `flush()` releases what remains at the end.
  """

  def __init__(self, tokenizer, skip_special_tokens: bool = True):
    self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
    self.ids, self.released = [], ""

  def push(self, token_id: int) -> str:
    """Adds one id; returns the text it completes ('' while a character is incomplete)."""
    self.ids.append(int(token_id))
    return self._release(self._text().rstrip("\ufffd"))

  def flush(self) -> str:
    return self._release(self._text())

  def _text(self) -> str:
    return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)

  def _release(self, text: str) -> str:
    if not text.startswith(self.released):  # a decoder that rewrote earlier text: release nothing new
      return ""
    new, self.released = text[len(self.released):], text
    return new


def from_gguf_metadata(tokens, token_types, merges, model_kind: str, pre: str, bos_id: int, eos_id: int,
                       pad_id: int, chat_template: str) -> HFTokenizer:
  """Builds the byte-level BPE that a GGUF file describes (llama.cpp's `tokenizer.ggml.*` fields)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  if model_kind != "gpt2":
    raise ValueError(f"GGUF tokenizer model {model_kind!r} is not supported; supported: ['gpt2'] (byte-level BPE)")
  if pre not in _PRE_TOKENIZERS:
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {list(_PRE_TOKENIZERS)}")
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                             merges=[tuple(m.split(" ", 1)) for m in merges]))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  # SmolLM splits every digit on its own before the GPT-2 regex (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM).
  tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                       if pre == "smollm" else byte_level)
  tok.decoder = decoders.ByteLevel()
  control, user_defined = 3, 4  # llama.cpp token types
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, kind in zip(tokens, token_types) if kind == control])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, kind in zip(tokens, token_types) if kind == user_defined])
  as_id = lambda i: int(i) if i is not None and int(i) >= 0 else None
  return HFTokenizer(tok, as_id(bos_id), as_id(eos_id), as_id(pad_id), chat_template)


def train(kind: str, text: str, vocab_size: int | None = None):
  """A tokenizer of `kind` fitted to the training text `text`."""
  if kind == "char":
    return CharTokenizer(text)
  if kind == "byte":
    return ByteTokenizer()
  if kind == "bpe":
    if not vocab_size:
      raise ValueError("data.tokenizer='bpe' needs data.vocab_size (e.g. 2048)")
    return BPETokenizer.train(text, vocab_size)
  raise ValueError(f"data.tokenizer={kind!r} is not supported; allowed values: {list(KINDS[:3])}")


def _write_spec(directory: str, spec: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  rundir.write_json(os.path.join(directory, _SPEC_FILE), spec)


def load(directory: str):
  path = os.path.join(directory, _SPEC_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no tokenizer saved at {path}; was this directory written by an lmjax run?")
  with open(path, encoding="utf-8") as f:
    spec = json.load(f)
  kind = spec.get("kind")
  if kind == "char":
    return CharTokenizer(spec["chars"])
  if kind == "byte":
    return ByteTokenizer()
  if kind == "bpe":
    with open(os.path.join(directory, spec["model_file"]), "rb") as f:
      return BPETokenizer(f.read())
  if kind == "hf":
    from tokenizers import Tokenizer
    return HFTokenizer(Tokenizer.from_file(os.path.join(directory, spec["tokenizer_file"])), spec["bos_id"],
                       spec["eos_id"], spec["pad_id"], spec.get("chat_template", ""))
  raise ValueError(f"unknown tokenizer kind {kind!r} in {path}; known kinds: {list(KINDS)}")
