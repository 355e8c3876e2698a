"""Tokenizers behind one small interface: encode, decode, vocab_size, special ids, save/load.

A tokenizer is saved with every run (`save(directory)`, `load(directory)`) so
that sampling later uses exactly the one the model was trained with.
"""
from __future__ import annotations

import json
import os

_FILE = "tokenizer.json"


class CharTokenizer:
  """One id per character seen in the training text (nanoGPT's shakespeare_char)."""
  kind = "char"
  bos_id = eos_id = pad_id = None

  def __init__(self, chars: str):
    self.chars = "".join(sorted(set(chars)))
    if not self.chars:
      raise ValueError("cannot build a char tokenizer from an empty text")
    self._index = {c: i for i, c in enumerate(self.chars)}

  @classmethod
  def train(cls, text: str) -> "CharTokenizer":
    return cls(text)

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> list:
    try:
      return [self._index[c] for c in text]
    except KeyError:
      unknown = sorted(set(text) - set(self._index))
      raise ValueError(f"characters {unknown!r} are not in this char tokenizer's vocabulary "
                       f"(built from the training text); use the byte or bpe tokenizer for open text") from None

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    del skip_special_tokens  # a char vocabulary has no special tokens
    return "".join(self.chars[int(i)] for i in ids)

  def to_json(self) -> dict:
    return {"kind": self.kind, "chars": self.chars}


def save(tokenizer, directory: str) -> str:
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, _FILE)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(tokenizer.to_json(), f, ensure_ascii=False)
  return path


def load(directory: str):
  path = os.path.join(directory, _FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no tokenizer saved at {path}; was this directory written by an lmjax run?")
  with open(path, encoding="utf-8") as f:
    spec = json.load(f)
  if spec.get("kind") == "char":
    return CharTokenizer(spec["chars"])
  raise ValueError(f"unknown tokenizer kind {spec.get('kind')!r} in {path}; known: ['char']")
