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
  hf    a pretrained byte-level BPE (GPT-2 style, e.g. SmolLM2's, read from GGUF
        metadata) run by the Hugging Face `tokenizers` library, with its chat template
"""
from __future__ import annotations

import io
import json
import os

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


class HFTokenizer:
  """A `tokenizers.Tokenizer` (byte-level BPE) with special ids and a chat template."""
  kind = "hf"

  def __init__(self, tokenizer, bos_id: int | None, eos_id: int | None, pad_id: int | None,
               chat_template: str = ""):
    self._tok = tokenizer
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self.chat_template = chat_template

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
    """Renders [{'role': ..., 'content': ...}] with the model's Jinja chat template (as HF does)."""
    if not self.chat_template:
      raise ValueError("this tokenizer has no chat template; prompt the model with raw text instead")
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
