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
  bytelevel  GPT-2-style byte-level BPE run by tiktoken (bytelevel_bpe.py), as nanoGPT's;
        the fastest to prepare a large corpus with
  hf    a pretrained byte-level BPE (GPT-2 style, e.g. SmolLM2's, read from GGUF
        metadata) run by the Hugging Face `tokenizers` library, with its chat template
"""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np

from lmjax.data import bytelevel_bpe, hf_tokenizer
from lmjax.data.tokenizer_base import SPEC_FILE, join_runs, write_spec

_BPE_FILE = "tokenizer.model"
KINDS = ("char", "byte", "bpe", "bytelevel", "hf")  # all but hf are fitted to a corpus (`train`)


class CharTokenizer:
  """One id per distinct character of the training text (nanoGPT's shakespeare_char); no special ids.

  Raises ValueError from `encode` for characters outside the vocabulary, naming them."""

  kind = "char"
  bos_id = eos_id = pad_id = None

  def __init__(self, chars: str):
    self.chars = "".join(sorted(set(chars)))
    if not self.chars:
      raise ValueError("cannot build a char tokenizer from an empty text")
    self._index = {c: i for i, c in enumerate(self.chars)}
    self._table = None  # code point -> id (-1 outside), made on the first encode_batch

  @classmethod
  def from_texts(cls, texts) -> "CharTokenizer":
    """The vocabulary of every character in the iterable of texts (streamed; ~300 MB/s)."""
    seen, batch, size = np.zeros(_CODE_POINTS, bool), [], 0
    for text in texts:
      batch.append(text)
      size += len(text)
      if size >= 1 << 22:
        seen[np.frombuffer("".join(batch).encode("utf-32-le"), np.uint32)] = True
        batch, size = [], 0
    seen[np.frombuffer("".join(batch).encode("utf-32-le"), np.uint32)] = True
    return cls("".join(map(chr, np.flatnonzero(seen))))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> list:
    try:
      return [self._index[c] for c in text]
    except KeyError:
      unknown = sorted(set(text) - set(self._index))
      raise ValueError(
        f"characters {unknown!r} are not in this char tokenizer's vocabulary (built from the "
        "training text): use only characters of the training text (a model for open text needs a "
        "run with data.tokenizer='byte' or 'bytelevel')"
      ) from None

  def encode_batch(self, texts) -> list:
    """`encode` of each text as int32 arrays, vectorised over the whole batch (a code point table;
    ~100 MB/s a core)."""
    if self._table is None:
      self._table = np.full(_CODE_POINTS, -1, np.int32)
      self._table[[ord(c) for c in self.chars]] = np.arange(len(self.chars), dtype=np.int32)
    ids = self._table[np.frombuffer("".join(texts).encode("utf-32-le"), np.uint32)]
    if (ids < 0).any():
      self.encode("".join(texts))  # raises, naming the unknown characters
    return np.split(ids, np.cumsum([len(t) for t in texts[:-1]]))

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    del skip_special_tokens  # a char vocabulary has no special tokens
    return "".join(self.chars[int(i)] for i in ids)

  def token_bytes(self, token_id: int) -> bytes:
    return self.chars[int(token_id)].encode("utf-8")

  def save(self, directory: str) -> None:
    write_spec(directory, {"kind": self.kind, "chars": self.chars})


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then <bos> 256, <eos> 257, <pad> 258: any text round-trips."""

  kind = "byte"
  bos_id, eos_id, pad_id = 256, 257, 258
  vocab_size = 259

  def encode(self, text: str) -> list:
    return list(text.encode("utf-8"))

  def encode_batch(self, texts) -> list:
    """`encode` of each text as int32 arrays (the UTF-8 bytes, vectorised over the batch)."""
    encoded = [t.encode("utf-8") for t in texts]
    ids = np.frombuffer(b"".join(encoded), np.uint8).astype(np.int32)
    return np.split(ids, np.cumsum([len(e) for e in encoded[:-1]]))

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    names = {self.bos_id: "<bos>", self.eos_id: "<eos>", self.pad_id: "<pad>"}
    # Runs of bytes decode together (a character spans several); a sampled sequence may cut a
    # multi-byte character: show U+FFFD rather than fail.
    return join_runs(
      [int(i) for i in ids],
      lambda i: i >= 256,
      lambda run: bytes(run).decode("utf-8", "replace"),
      lambda i: "" if skip_special_tokens else names[i],
    )

  def token_bytes(self, token_id: int) -> bytes:
    names = {self.bos_id: b"<bos>", self.eos_id: b"<eos>", self.pad_id: b"<pad>"}
    return bytes([token_id]) if token_id < 256 else names[token_id]

  def save(self, directory: str) -> None:
    write_spec(directory, {"kind": self.kind})


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
    """A SentencePiece BPE of `vocab_size` pieces fitted to `text`, with byte fallback (any text
    round-trips)."""
    import sentencepiece as spm

    lines = [line for line in text.split("\n") if line]
    if not lines:
      raise ValueError("cannot train a BPE tokenizer on an empty text")
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        max_sentence_length=1 << 16,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
      )
    except RuntimeError as err:
      # SentencePiece's two size failures, told apart by its own numbers: below the characters the
      # text needs (raise the size), or above the pieces the text can make (lower it or add text).
      small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(err))
      large = re.search(r"too high \(\d+\)\. Please set it to a value <= (\d+)", str(err))
      if small:
        fix = f"raise data.vocab_size to at least {small.group(1)} (the text's characters + specials)"
      elif large:
        fix = f"lower data.vocab_size to at most {large.group(1)}, or use more text"
      else:
        fix = "a vocabulary must hold the text's characters and the specials and fit the text"
      raise ValueError(
        f"SentencePiece could not train a BPE vocabulary of {vocab_size} on this text: {fix} ({err})"
      ) from None
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

  def encode_batch(self, texts) -> list:
    """`encode` of each text as int32 arrays; SentencePiece encodes the batch on all cores."""
    plain = [i for i, t in enumerate(texts) if _SPACE_MARK not in t]
    out = [None] * len(texts)
    encoded = self._sp.encode([texts[i] for i in plain], num_threads=os.cpu_count() or 1)
    for i, ids in zip(plain, encoded):
      out[i] = np.asarray(ids, np.int32)
    for i in set(range(len(texts))) - set(plain):
      out[i] = np.asarray(self.encode(texts[i]), np.int32)
    return out

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    special = {self.bos_id, self.eos_id, self.pad_id} - {-1}
    return join_runs(
      [int(i) for i in ids],
      special.__contains__,
      self._sp.decode,
      lambda i: "" if skip_special_tokens else self._sp.id_to_piece(i),
    )

  def token_bytes(self, token_id: int) -> bytes:
    """A byte-fallback piece (`<0xE4>`) is its byte; other pieces are text with U+2581 for spaces."""
    piece = self._sp.id_to_piece(int(token_id))
    if self._sp.is_byte(int(token_id)):
      return bytes([int(piece[3:5], 16)])
    if self._sp.is_control(int(token_id)):
      return piece.encode("utf-8")
    return piece.replace(_SPACE_MARK, " ").encode("utf-8")

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, _BPE_FILE), "wb") as f:
      f.write(self.model_proto)
    write_spec(directory, {"kind": self.kind, "model_file": _BPE_FILE})


_SPACE_MARK = "\u2581"  # SentencePiece's whitespace symbol
_CODE_POINTS = 0x110000  # Unicode's range: every character's code point is below it


def train(kind: str, text: str, vocab_size: int | None = None):
  """A tokenizer of `kind` fitted to the training text `text`."""
  if kind == "char":
    return CharTokenizer(text)
  if kind == "byte":
    return ByteTokenizer()
  if kind in ("bpe", "bytelevel"):
    if not vocab_size:
      raise ValueError(f"data.tokenizer={kind!r} needs data.vocab_size (e.g. 2048)")
    trainer = BPETokenizer if kind == "bpe" else bytelevel_bpe.ByteLevelBPETokenizer
    return trainer.train(text, vocab_size)
  raise ValueError(f"data.tokenizer={kind!r} is not supported; allowed values: {list(KINDS[:4])}")


def load(directory: str):
  """The tokenizer a run saved in `directory` (tokenizer.json names its kind).

  Raises FileNotFoundError when there is none, ValueError for an unknown kind."""
  path = os.path.join(directory, SPEC_FILE)
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
  if kind == "bytelevel":
    return bytelevel_bpe.ByteLevelBPETokenizer.load(directory, spec)
  if kind == "hf":
    return hf_tokenizer.HFTokenizer.from_spec(directory, spec)
  raise ValueError(f"unknown tokenizer kind {kind!r} in {path}; known kinds: {list(KINDS)}")
