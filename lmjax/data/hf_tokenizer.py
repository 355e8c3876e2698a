"""Pretrained byte-level BPE tokenizers (GPT-2 style, e.g. SmolLM2's) run by the Hugging Face
`tokenizers` library, with special ids and a chat template: built from GGUF metadata
(`from_gguf_metadata`) or a Hugging Face directory (`from_hf_directory`), and written back as one
(`save_hf_directory`).
"""

from __future__ import annotations

import json
import os
import re
import threading

import numpy as np

from lmjax.core import errors, files
from lmjax.data import bytelevel_bpe
from lmjax.data.tokenizer_base import ChatText, write_spec

_HF_FILE = "tokenizer_hf.json"
_PRE_TOKENIZERS = ("gpt2", "smollm")  # GGUF `tokenizer.ggml.pre` values we reproduce


class HFTokenizer:
  """A `tokenizers.Tokenizer` (byte-level BPE) with special ids and a chat template."""

  kind = "hf"

  def __init__(
    self, tokenizer, bos_id: int | None, eos_id: int | None, pad_id: int | None, chat_template: str = ""
  ):
    self._tok = tokenizer
    self._lock = threading.Lock()
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self.chat_template = chat_template
    self._decoding = None  # what token_bytes reads from the decoder, found on first use

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
      injected = any(
        i in special and any(a < end and b > start for a, b in spans)
        for i, (start, end) in zip(encoding.ids, encoding.offsets)
      )
      if not injected:
        return encoding.ids
      return [i for part, markup in text.parts for i in self.encode(part, special_tokens=markup)]
    return self._encoding(text, special_tokens).ids

  def encode_batch(self, texts) -> list:
    """`encode` of each text as int32 arrays, in parallel (the `tokenizers` library's Rust threads;
    corpus preparation). Control-token strings are text, as in `encode`."""
    with self._lock:
      self._tok.encode_special_tokens = True
      encodings = self._tok.encode_batch_fast([str(t) for t in texts], add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def _encoding(self, text: str, special_tokens: bool):
    with self._lock:  # encode_special_tokens is state on the shared Rust tokenizer
      self._tok.encode_special_tokens = not special_tokens
      return self._tok.encode(str(text), add_special_tokens=False)

  def _special_ids(self) -> set:
    return {i for i, token in self._tok.get_added_tokens_decoder().items() if token.special}

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_bytes(self, token_id: int) -> bytes:
    """What the tokenizer.json's decoder does to one token (added tokens too, as the `tokenizers`
    library decodes them), as bytes: ByteLevel (GPT-2's) reads each character as one byte
    (bytelevel_bpe.byte_of_char); ByteFallback reads `<0xE4>` pieces as their byte; Metaspace, or a
    Replace of U+2581 (Llama's), reads U+2581 as a space. A decoder that strips the text's first
    space (Llama's `Strip`) makes the first id differ."""
    token = self._tok.id_to_token(int(token_id))
    if self._decoding is None:
      spec = json.loads(self._tok.to_str()).get("decoder") or {}
      steps = spec.get("decoders", [spec])
      kinds = {step.get("type") for step in steps}
      metaspace = "Metaspace" in kinds or any(
        step.get("type") == "Replace" and step.get("pattern", {}).get("String") == "\u2581" for step in steps
      )
      byte_of = bytelevel_bpe.byte_of_char() if "ByteLevel" in kinds else None
      self._decoding = (byte_of, "ByteFallback" in kinds, metaspace)
    byte_of, byte_fallback, metaspace = self._decoding
    if byte_of is not None and all(c in byte_of for c in token):
      return bytes(byte_of[c] for c in token)
    if byte_fallback and re.fullmatch("<0x[0-9A-Fa-f]{2}>", token):
      return bytes([int(token[3:5], 16)])
    return (token.replace("\u2581", " ") if metaspace else token).encode("utf-8")

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
    marked = self._render(
      [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)], add_generation_prompt
    )
    parts, position = [], 0
    for piece in re.split("(\ue000\\d+\ue001)", marked):
      if piece.startswith("\ue000"):  # a message's content, as the template inserted it (maybe stripped)
        content = messages[int(piece[1:-1])]["content"]
        piece = next((c for c in (content, content.strip()) if rendered.startswith(c, position)), None)
        if piece is None:
          raise ValueError(
            f"the chat template changes message content ({content[:40]!r}), so its markup cannot "
            "be told from the text"
          )
        parts.append((piece, False))
      elif piece:
        if not rendered.startswith(piece, position):
          raise ValueError(
            "the chat template renders differently for different contents; cannot tell markup from text"
          )
        parts.append((piece, True))
      position += len(piece)
    return ChatText(rendered, tuple(parts))

  def _render(self, messages, add_generation_prompt: bool) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
      raise ValueError(f"chat template error: {message}")

    return env.from_string(self.chat_template).render(
      messages=messages,
      add_generation_prompt=add_generation_prompt,
      raise_exception=raise_exception,
      bos_token=self._token(self.bos_id),
      eos_token=self._token(self.eos_id),
    )

  def _token(self, token_id) -> str:
    return self._tok.id_to_token(token_id) if token_id is not None and token_id >= 0 else ""

  @classmethod
  def from_spec(cls, directory: str, spec: dict) -> "HFTokenizer":
    """The tokenizer `save` wrote into `directory` (its tokenizer.json spec is `spec`)."""
    from tokenizers import Tokenizer

    return cls(
      Tokenizer.from_file(os.path.join(directory, spec["tokenizer_file"])),
      spec["bos_id"],
      spec["eos_id"],
      spec["pad_id"],
      spec.get("chat_template", ""),
    )

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    self._tok.save(os.path.join(directory, _HF_FILE))
    write_spec(
      directory,
      {
        "kind": self.kind,
        "tokenizer_file": _HF_FILE,
        "bos_id": self.bos_id,
        "eos_id": self.eos_id,
        "pad_id": self.pad_id,
        "chat_template": self.chat_template,
      },
    )


def from_gguf_metadata(
  tokens,
  token_types,
  merges,
  model_kind: str,
  pre: str,
  bos_id: int,
  eos_id: int,
  pad_id: int,
  chat_template: str,
) -> HFTokenizer:
  """Builds the byte-level BPE that a GGUF file describes (llama.cpp's `tokenizer.ggml.*` fields)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  if model_kind != "gpt2":
    raise ValueError(
      f"GGUF tokenizer model {model_kind!r} is not supported; supported: ['gpt2'] (byte-level BPE)"
    )
  if pre not in _PRE_TOKENIZERS:
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {list(_PRE_TOKENIZERS)}")
  tok = Tokenizer(
    models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges])
  )
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  # SmolLM splits every digit on its own before the GPT-2 regex (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM).
  tok.pre_tokenizer = (
    pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre == "smollm"
    else byte_level
  )
  tok.decoder = decoders.ByteLevel()
  control, user_defined = 3, 4  # llama.cpp token types
  tok.add_special_tokens(
    [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, token_types) if kind == control]
  )
  tok.add_tokens(
    [
      AddedToken(t, special=False, normalized=False)
      for t, kind in zip(tokens, token_types)
      if kind == user_defined
    ]
  )
  as_id = lambda i: int(i) if i is not None and int(i) >= 0 else None
  return HFTokenizer(tok, as_id(bos_id), as_id(eos_id), as_id(pad_id), chat_template)


def from_hf_directory(directory: str) -> HFTokenizer:
  """The tokenizer of a Hugging Face model directory: tokenizer.json, with the special tokens and chat
  template of tokenizer_config.json (ids falling back to config.json's *_token_id fields).

  Raises errors.UserError when tokenizer.json is missing (a slow-tokenizer-only model: convert it with
  transformers' `AutoTokenizer.from_pretrained(dir).save_pretrained(dir)` first).
  """
  from tokenizers import Tokenizer

  def read(name):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      return {}
    with open(path, encoding="utf-8") as f:
      return json.load(f)

  path = os.path.join(directory, "tokenizer.json")
  if not os.path.exists(path):
    raise errors.UserError(
      f"{directory} has no tokenizer.json; write one with transformers: "
      "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
    )
  tok, settings, model_config = Tokenizer.from_file(path), read("tokenizer_config.json"), read("config.json")

  def token_id(kind):
    token = settings.get(f"{kind}_token")
    token = token.get("content") if isinstance(token, dict) else token
    found = tok.token_to_id(token) if token else None
    return found if found is not None else model_config.get(f"{kind}_token_id")

  template = settings.get("chat_template") or ""
  template_file = os.path.join(directory, "chat_template.jinja")
  if not template and os.path.exists(template_file):
    with open(template_file, encoding="utf-8") as f:
      template = f.read()
  return HFTokenizer(tok, token_id("bos"), token_id("eos"), token_id("pad"), template)


def save_hf_directory(tokenizer: HFTokenizer, directory: str) -> None:
  """tokenizer.json and tokenizer_config.json as Hugging Face writes them (what `from_hf_directory`
  and transformers' AutoTokenizer read)."""
  os.makedirs(directory, exist_ok=True)
  tokenizer._tok.save(os.path.join(directory, "tokenizer.json"))
  settings = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tokenizer.chat_template or None}
  for kind in ("bos", "eos", "pad"):
    settings[f"{kind}_token"] = tokenizer._token(getattr(tokenizer, f"{kind}_id")) or None
  files.write_json(os.path.join(directory, "tokenizer_config.json"), settings)


def to_gguf_metadata(tokenizer: HFTokenizer) -> dict:
  """The `tokenizer.ggml.*` description of a byte-level BPE (from_gguf_metadata's arguments), for GGUF
  export: tokens by id, llama.cpp token types (1 normal, 3 control = special added tokens, 4 user
  defined), merges as "a b" strings, the pre-tokenizer's llama.cpp name, special ids and chat template.

  Raises ValueError for what llama.cpp would tokenize differently: a model other than BPE, a
  normalizer, no merges, or a pre-tokenizer other than GPT-2's regex or SmolLM's digits-then-GPT-2.
  """
  spec = json.loads(tokenizer._tok.to_str())
  model = spec["model"]
  if model.get("type") != "BPE" or spec.get("normalizer"):
    raise ValueError(
      f"a {model.get('type')} tokenizer{' with a normalizer' if spec.get('normalizer') else ''} has no "
      "llama.cpp equivalent; GGUF export takes byte-level BPE tokenizers"
    )
  pre = spec.get("pre_tokenizer") or {}
  steps = [
    (p["type"], p.get("use_regex"), p.get("individual_digits")) for p in pre.get("pretokenizers", [pre])
  ]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  if not merges:  # gguf refuses an empty array, llama.cpp a gpt2 vocabulary without the key
    raise ValueError("a byte-level vocabulary without merges cannot be written as GGUF")
  if steps == [("ByteLevel", True, None)]:
    pre_name = "gpt2"
  elif steps == [("Digits", None, True), ("ByteLevel", True, None)]:
    pre_name = "smollm"
  else:
    raise ValueError(
      f"pre-tokenizer {pre} has no llama.cpp equivalent (supported: GPT-2's byte-level regex, SmolLM's "
      "digits then GPT-2's)"
    )
  by_id = {i: (t, 1) for t, i in model["vocab"].items()}
  by_id.update({a["id"]: (a["content"], 3 if a["special"] else 4) for a in spec["added_tokens"]})
  if sorted(by_id) != list(range(len(by_id))):
    raise ValueError("the tokenizer's ids are not 0..vocab_size-1 without gaps, as GGUF lists them")
  return {
    "tokens": [by_id[i][0] for i in range(len(by_id))],
    "token_types": [by_id[i][1] for i in range(len(by_id))],
    "merges": merges,
    "model_kind": "gpt2",
    "pre": pre_name,
    "bos_id": tokenizer.bos_id,
    "eos_id": tokenizer.eos_id,
    "pad_id": tokenizer.pad_id,
    "chat_template": tokenizer.chat_template,
  }
