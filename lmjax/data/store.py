"""A token store: a corpus tokenized once, read by memory map (written by data/prepare.py).

Layout of a store directory (everything but the manifest is written before the manifest, which is
written last and atomically: a directory with a manifest is complete):

  manifest.json            format, token dtype, EOS id, tokenizer fingerprint, and per source its
                           spec, fingerprint, filter counts and per split the shards with their
                           token and document counts
  tokenizer/               the tokenizer the tokens were made with (tokenizers.load reads it)
  s{i}.{split}.{k}.tokens  shard k of source i: raw uint16 (vocab <= 65536) or uint32 token ids
  s{i}.{split}.{k}.docs.npy  int64 end offsets (global in the split) of the documents ending in it

While preparing, each shard also has a sidecar `s{i}.{split}.{k}.json` (where an interrupted
preparation resumes); they are removed before the manifest is written.

Documents are separated by the tokenizer's EOS (each document's last token), or simply adjacent for
tokenizers without one (char). Reading maps the shards, so memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np

from lmjax.core import errors
from lmjax.data import tokenizers

FORMAT = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "validation")


def shard_name(source_index: int, split: str, shard: int) -> str:
  return f"s{source_index}.{split}.{shard:05d}"


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenizer_fingerprint(tokenizer) -> str:
  """sha256 over the files a tokenizer saves (names and bytes): equal iff the tokenizers are equal."""
  with tempfile.TemporaryDirectory() as directory:
    tokenizer.save(directory)
    return _directory_digest(directory)


def _directory_digest(directory: str) -> str:
  digest = hashlib.sha256()
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      digest.update(name.encode() + b"\0" + f.read() + b"\0")
  return digest.hexdigest()[:16]


class SplitTokens:
  """One split of one source: its token stream (memory-mapped shards) and document boundaries.

  `window(start, length)` returns int32 tokens [length] (crossing shards as needed);
  `documents(starts_R, length)` returns, for windows [R, length], the segment id (1 = the window's
  first document) and the position within the document, restarting at 0 where a document starts
  and at the window's start.
  """

  def __init__(self, directory: str, entries: list, dtype: np.dtype):
    self._shards = [
      np.memmap(os.path.join(directory, e["file"] + ".tokens"), dtype=dtype, mode="r", shape=(e["tokens"],))
      if e["tokens"]
      else np.zeros(0, dtype)
      for e in entries
    ]
    self._starts = np.cumsum([0] + [e["tokens"] for e in entries])
    self.tokens = int(self._starts[-1])
    ends = [np.load(os.path.join(directory, e["file"] + ".docs.npy")) for e in entries]
    self.doc_ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    self.documents_count = len(self.doc_ends)

  def window(self, start: int, length: int) -> np.ndarray:
    if start < 0 or start + length > self.tokens:
      raise IndexError(f"tokens [{start}, {start + length}) outside the split's {self.tokens}")
    shard = int(np.searchsorted(self._starts, start, side="right")) - 1
    parts, need = [], length
    while need:
      local = start - self._starts[shard]
      piece = self._shards[shard][local : local + need]
      parts.append(piece)
      need -= len(piece)
      start += len(piece)
      shard += 1
    return np.concatenate(parts).astype(np.int32) if len(parts) > 1 else parts[0].astype(np.int32)

  def documents(self, starts_R: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    index_RL = starts_R[:, None] + np.arange(length)
    doc_RL = np.searchsorted(self.doc_ends, index_RL, side="right")
    segment_ids_RL = (doc_RL - doc_RL[:, :1] + 1).astype(np.int32)
    doc_start_RL = np.where(doc_RL > 0, self.doc_ends[np.maximum(doc_RL - 1, 0)], 0)
    positions_RL = (index_RL - np.maximum(doc_start_RL, starts_R[:, None])).astype(np.int32)
    return segment_ids_RL, positions_RL


class Store:
  """A prepared store (module docstring): `manifest`, `tokenizer`, and `split(source_index, name)`."""

  def __init__(self, directory: str):
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
      raise errors.UserError(
        f"{directory} is not a prepared token store (no {MANIFEST}); prepare it with `lmjax-prepare "
        "--config=...` (training prepares it on first use)"
      )
    with open(path, encoding="utf-8") as f:
      self.manifest = json.load(f)
    if self.manifest.get("format") != FORMAT:
      raise errors.UserError(
        f"{directory} has store format {self.manifest.get('format')}, this lmjax reads {FORMAT}; "
        "remove it to prepare it again"
      )
    self.directory = directory
    self.tokenizer = tokenizers.load(os.path.join(directory, TOKENIZER_DIR))
    self._dtype = np.dtype(self.manifest["dtype"])
    self._splits = {}

  def split(self, source_index: int, name: str) -> SplitTokens:
    key = (source_index, name)
    if key not in self._splits:
      entries = self.manifest["sources"][source_index]["splits"][name]["shards"]
      self._splits[key] = SplitTokens(self.directory, entries, self._dtype)
    return self._splits[key]

  def check_tokenizer(self, tokenizer, whose: str) -> None:
    """Raises UserError when `tokenizer` (`whose`: e.g. a run's saved one) is not the store's."""
    theirs, ours = tokenizer_fingerprint(tokenizer), self.manifest["tokenizer"]["fingerprint"]
    if theirs != ours:
      raise errors.UserError(
        f"the token store {self.directory} was prepared with a {self.manifest['tokenizer']['kind']} "
        f"tokenizer of fingerprint {ours}, but {whose} is a {tokenizer.kind} tokenizer of fingerprint "
        f"{theirs}. Remove the store directory to prepare it again with {whose}, or start a new run "
        "(a new workdir) to train with the store's"
      )
