"""Tokenizers behind one small interface.

Every tokenizer has `encode(text) -> list[int]`, `decode(ids, skip_special_tokens=True)
-> str`, `vocab_size`, and the special ids `bos_id`, `eos_id`, `pad_id` (None
where it has none). A run saves its tokenizer next to its
checkpoints (`tok.save(dir)`), and sampling later loads that same one (`load(dir)`).

  char  one id per character of the training text (nanoGPT's shakespeare_char);
        other characters are an error naming them
  byte  UTF-8 bytes 0..255, then <bos>, <eos>, <pad>: any text round-trips
  bpe   SentencePiece BPE trained on the training split, with byte fallback so
        any text (Chinese, emoji) round-trips; saved as a `.model` file
"""
from __future__ import annotations

import io
import json
import os

_SPEC_FILE = "tokenizer.json"
_BPE_FILE = "tokenizer.model"
KINDS = ("char", "byte", "bpe")


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
    ids = [int(i) for i in ids]
    if not skip_special_tokens and any(i >= 256 for i in ids):
      names = {self.bos_id: "<bos>", self.eos_id: "<eos>", self.pad_id: "<pad>"}
      return "".join(names[i] if i >= 256 else bytes([i]).decode("utf-8", "replace") for i in ids)
    # A sampled sequence may cut a multi-byte character: show U+FFFD rather than fail.
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

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
    return self._sp.encode(text)

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids]
    if skip_special_tokens:
      ids = [i for i in ids if i not in (self.bos_id, self.eos_id, self.pad_id)]
    return self._sp.decode(ids)

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, _BPE_FILE), "wb") as f:
      f.write(self.model_proto)
    _write_spec(directory, {"kind": self.kind, "model_file": _BPE_FILE})


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
  raise ValueError(f"data.tokenizer={kind!r} is not supported; allowed values: {list(KINDS)}")


def _write_spec(directory: str, spec: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, _SPEC_FILE), "w", encoding="utf-8") as f:
    json.dump(spec, f, ensure_ascii=False)


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
  raise ValueError(f"unknown tokenizer kind {kind!r} in {path}; known kinds: {list(KINDS)}")
