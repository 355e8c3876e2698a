"""Preparation: sources -> filter -> tokenize -> token store (store.py), once per (sources, tokenizer).

`ensure(data_cfg)` returns the store for a data config, preparing it first when it does not exist
(training calls it; `lmjax-prepare` runs it alone). A store's directory is named by a digest of the
sources' fingerprints, the tokenizer settings and the filters, so changed sources prepare a new store.

How: each source's pieces (sources.py) pass the filters (filters.py), are tokenized in batches of
~`BATCH_BYTES` with the tokenizer's `encode_batch` (vectorised numpy for char/byte; SentencePiece's
threads for bpe, a thread per core in tiktoken for bytelevel, overlapping the reading of the next
batch), get the EOS after each document, and are written in shards of `SHARD_TOKENS` on a writer
thread. Memory stays at a few batches and one shard whatever the
corpus size. A fitted tokenizer (char, bpe) is fitted first: char on the characters of the whole
train split (a cheap pass), BPE on a bounded sample (`data.tokenizer_sample_mb`).

Nothing partial is ever taken for a store: preparation writes into `<store>.partial/`, the manifest
last, then renames the directory into place. An error (bad input, a full disk) removes the partial
directory; an interruption (Ctrl-C, a kill) keeps its finished shards, each with a sidecar that says
which pieces it holds, and the next preparation resumes after them. Preparing twice gives
byte-identical stores (no timestamps; deterministic order).
"""

from __future__ import annotations

import concurrent.futures
import errno
import io
import json
import math
import os
import shutil
import sys

import numpy as np

from lmjax.core import errors, files
from lmjax.data import filters as filters_lib, sources as sources_lib, store as store_lib, tokenizers

BATCH_BYTES = 4 << 20
SHARD_TOKENS = 16 << 20
DEFAULT_ROOT = os.path.join("~", ".cache", "lmjax", "stores")


def source_list(data_cfg) -> list:
  """[(Source, weight)] from `data.sources` ("spec=weight;spec=weight", weights default 1) or, when
  that is empty, from `data.dataset` (shakespeare, text_files, or a TFDS catalog name)."""
  specs = [s.strip() for s in (data_cfg.get("sources") or "").split(";") if s.strip()]
  if not specs:
    dataset = data_cfg.dataset
    specs = [
      "shakespeare"
      if dataset == "shakespeare"
      else f"text:{data_cfg.text_files}"
      if dataset == "text_files"
      else f"tfds:{dataset}"
    ]
  out = []
  for spec in specs:
    head, _, tail = spec.rpartition("=")
    weight = 1.0
    if head:
      try:
        spec, weight = head, float(tail)
      except ValueError:  # a path with '=' in it, or a weight that is not a number
        try:
          sources_lib.parse(spec, data_cfg)
        except errors.ConfigError:
          raise errors.ConfigError(
            f"data.sources: in {spec!r}, the weight {tail!r} after '=' is not a number (write "
            "'spec=0.5;spec=1.5', entries separated by ';')"
          ) from None
    if not (math.isfinite(weight) and weight > 0):
      raise errors.ConfigError(
        f"data.sources: the weight of {spec!r} must be a finite number > 0, not {weight}"
      )
    if spec == "text:":
      raise errors.ConfigError(
        "data.dataset='text_files' needs data.text_files: a path, a glob, or a comma-separated list"
        if not data_cfg.get("sources")
        else "data.sources: 'text:' needs paths, e.g. 'text:books/*.txt'"
      )
    out.append((sources_lib.parse(spec, data_cfg), weight))
  return out


def store_path(data_cfg, sources) -> str:
  """Where the store for these sources and tokenizer settings lives (named by their digest)."""
  root = data_cfg.get("store_dir") or os.path.join(data_cfg.get("data_dir") or "", "lmjax_stores")
  if not data_cfg.get("store_dir") and not data_cfg.get("data_dir"):
    root = DEFAULT_ROOT
  key = {
    "format": store_lib.FORMAT,
    "sources": [s.fingerprint() for s in sources],
    "tokenizer": [data_cfg.tokenizer, data_cfg.get("vocab_size"), data_cfg.get("tokenizer_sample_mb")],
    "filters": data_cfg.get("filters") or "",
  }
  return os.path.join(os.path.expanduser(root), sources_lib.digest(key))


def ensure(data_cfg, tokenizer=None, progress: bool = True) -> store_lib.Store:
  """The store for `data_cfg`, prepared now if missing. `tokenizer`: use this one (a resumed run's)
  instead of fitting one. Raises errors.UserError for bad input (see sources.py), removing any
  partial store; concurrent preparations of one store wait for each other and prepare it once."""
  sources = [s for s, _ in source_list(data_cfg)]
  path = store_path(data_cfg, sources)
  if os.path.exists(os.path.join(path, store_lib.MANIFEST)):
    return store_lib.Store(path)
  locks = os.path.join(os.path.dirname(path), ".locks")  # kept: removing a lock file others may wait on races
  os.makedirs(locks, exist_ok=True)
  with files.waiting_lock(os.path.join(locks, os.path.basename(path) + ".lock"), f"the token store {path}"):
    if not os.path.exists(os.path.join(path, store_lib.MANIFEST)):
      _prepare(data_cfg, sources, path, tokenizer, progress)
  return store_lib.Store(path)


def _prepare(data_cfg, sources, path: str, tokenizer, progress: bool) -> None:
  partial = path + ".partial"
  if os.path.exists(path):
    raise errors.UserError(
      f"{path} exists but has no {store_lib.MANIFEST}: it is not a store lmjax finished. Remove the "
      "directory and run again to prepare it"
    )
  try:
    _remove_temporary_files(partial)  # a killed preparation's half-written files
    tok_dir = os.path.join(partial, store_lib.TOKENIZER_DIR)
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):  # resuming an interrupted preparation
      tokenizer = tokenizers.load(tok_dir)
    else:
      if tokenizer is None:
        tokenizer = _fit_tokenizer(data_cfg, sources)
      tokenizer.save(tok_dir)
    chain = filters_lib.parse(data_cfg.get("filters") or "")
    entries = []
    for index, source in enumerate(sources):
      entry = {"spec": source.spec, "fingerprint": source.fingerprint(), "splits": {}}
      counts = filters_lib.Counts(chain)
      for split in store_lib.SPLITS:
        writer = _SplitWriter(partial, index, split, tokenizer, progress)
        entry["splits"][split] = writer.write(filters_lib.apply(chain, source.pieces(split), counts))
        if not entry["splits"][split]["tokens"]:
          raise errors.UserError(
            f"source {source.spec} has no {split} text after filtering ({counts.as_dict()}); give it "
            "more text, or loosen data.filters"
            + (", or raise data.val_fraction" if split == "validation" and source.split_by_fraction else "")
          )
      entry["filters"] = counts.as_dict()
      entries.append(entry)
    manifest = {
      "format": store_lib.FORMAT,
      "dtype": store_lib.token_dtype(tokenizer.vocab_size).name,
      "vocab_size": tokenizer.vocab_size,
      "eos_id": tokenizer.eos_id,
      "tokenizer": {"kind": tokenizer.kind, "fingerprint": store_lib.tokenizer_fingerprint(tokenizer)},
      "sources": entries,
    }
    for name in os.listdir(partial):  # resume sidecars are not part of a finished store
      if name.endswith(".json") and name != store_lib.MANIFEST:
        os.remove(os.path.join(partial, name))
    _remove_temporary_files(partial)
    files.write_json(os.path.join(partial, store_lib.MANIFEST), manifest)
    os.replace(partial, path)
  except Exception as err:
    shutil.rmtree(partial, ignore_errors=True)
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
      raise errors.UserError(
        f"the disk is full while preparing the token store {path}: the partial store was removed. "
        "Free space, or set data.store_dir to a larger disk, and run again"
      ) from err
    raise


def _remove_temporary_files(directory: str) -> None:
  """Deletes write_atomic's temporary files (`.NAME.XXXX.tmp`) that a killed process left."""
  for root, _, names in os.walk(directory) if os.path.isdir(directory) else ():
    for name in names:
      if name.startswith(".") and name.endswith(".tmp"):
        os.remove(os.path.join(root, name))


def _fit_tokenizer(data_cfg, sources):
  kind = data_cfg.tokenizer
  if kind == "byte":
    return tokenizers.ByteTokenizer()
  if kind == "char":
    return tokenizers.CharTokenizer.from_texts(text for s in sources for _, text in s.pieces("train"))
  # The sample is counted in characters (~bytes for English, fewer than its bytes for CJK text).
  budget = int(data_cfg.get("tokenizer_sample_mb") * (1 << 20)) // len(sources)
  sample = []
  for source in sources:
    taken = 0
    for _, text in source.pieces("train"):
      sample.append(text[: budget - taken])
      taken += len(sample[-1])
      if taken >= budget:
        break
  return tokenizers.train(kind, "\n".join(sample), data_cfg.get("vocab_size"))


_RELEASES_GIL = ("bpe", "bytelevel", "hf")  # tokenizer kinds whose encode_batch runs outside the GIL


def _run_now(fn, *args) -> concurrent.futures.Future:
  """`fn(*args)` run at once, as a finished future (executor.submit's interface)."""
  future = concurrent.futures.Future()
  try:
    future.set_result(fn(*args))
  except Exception as err:
    future.set_exception(err)
  return future


def _write_shard(base: str, tokens, doc_ends, info: dict) -> None:
  files.write_atomic(base + ".tokens", memoryview(tokens))
  buffer = io.BytesIO()
  np.save(buffer, doc_ends)
  files.write_atomic(base + ".docs.npy", buffer.getvalue())
  files.write_json(base + ".json", info)


class _SplitWriter:
  """Tokenizes one split's pieces in batches and writes its shards (resuming after finished ones)."""

  def __init__(self, directory: str, source_index: int, split: str, tokenizer, progress: bool):
    self.directory, self.source_index, self.split = directory, source_index, split
    self.tokenizer, self.eos = tokenizer, tokenizer.eos_id
    self.dtype = store_lib.token_dtype(tokenizer.vocab_size)
    self.progress = progress and sys.stderr.isatty()

  def _sidecar(self, shard: int) -> str:
    return os.path.join(self.directory, store_lib.shard_name(self.source_index, self.split, shard) + ".json")

  def write(self, pieces) -> dict:
    """Consumes the (starts_document, text) pieces; returns the split's manifest entry."""
    shards = []
    while os.path.exists(self._sidecar(len(shards))):  # finished by an interrupted preparation
      with open(self._sidecar(len(shards)), encoding="utf-8") as f:
        shards.append(json.load(f))
    done = shards[-1] if shards else {"pieces": 0, "end": 0, "open": False}
    self.total, self.open_doc, self.pieces = done["end"], done["open"], done["pieces"]
    self.buffer, self.doc_ends, self.shards = [], [], shards
    bar = self._bar()
    self._writer, self._pending = concurrent.futures.ThreadPoolExecutor(1), None
    # BPE batch k is encoded on a thread while batch k+1 is read (those tokenizers release the GIL;
    # char/byte numpy encoding does not, and ran ~10% slower on a thread: it stays inline).
    encoder, previous = concurrent.futures.ThreadPoolExecutor(1), None
    submit = encoder.submit if self.tokenizer.kind in _RELEASES_GIL else _run_now
    try:
      batch, batch_bytes = [], 0
      for i, (starts, text) in enumerate(pieces):
        if i < done["pieces"]:
          continue
        batch.append((starts, text))
        batch_bytes += len(text)
        if batch_bytes >= BATCH_BYTES:
          if previous is not None:
            self._add(*previous, bar)
          previous = batch, submit(self.tokenizer.encode_batch, [t for _, t in batch])
          batch, batch_bytes = [], 0
      if previous is not None:
        self._add(*previous, bar)
      self._add(batch, submit(self.tokenizer.encode_batch, [t for _, t in batch]), bar, last=True)
    finally:  # an interrupted preparation still finishes the shard in flight (it resumes after it)
      encoder.shutdown(cancel_futures=True)
      try:
        self.wait()
      finally:
        self._writer.shutdown()
        if bar is not None:
          bar.close()
    return {
      "tokens": sum(s["tokens"] for s in self.shards),
      "documents": sum(s["documents"] for s in self.shards),
      "shards": [{k: s[k] for k in ("file", "tokens", "documents")} for s in self.shards],
    }

  def _add(self, batch, encoded, bar, last: bool = False) -> None:
    """Adds a batch of pieces (`encoded`: the future of their ids) to the buffer; writes a shard once
    it holds SHARD_TOKENS (or at the end), so every shard ends at a batch boundary and its sidecar can
    say where to resume."""
    try:
      ids = encoded.result()
    except ValueError as err:  # text the tokenizer cannot encode (a char vocabulary's unknown characters)
      raise errors.UserError(f"the {self.split} split of source {self.source_index}: {err}") from None
    parts, eos = [], np.array([self.eos] if self.eos is not None else [], self.dtype)
    for (starts, _), piece_ids in zip(batch, ids):
      if starts and self.open_doc:
        parts.append(eos)
        self.total += len(eos)
        self.doc_ends.append(self.total)
      self.open_doc = True
      parts.append(piece_ids)
      self.total += len(piece_ids)
      self.pieces += 1
    if parts:
      self.buffer.append(np.concatenate(parts).astype(self.dtype))
    if bar is not None:
      bar.update(sum(len(text) for _, text in batch))
      rate = self.total / max(bar.format_dict["elapsed"], 1e-3)
      bar.set_postfix(tokens=f"{self.total:,}", tokens_per_s=f"{rate:,.0f}", refresh=False)
    if last and self.open_doc:
      self._end_document()
      self.open_doc = False
    buffered = sum(len(b) for b in self.buffer)
    if buffered >= SHARD_TOKENS or (last and (buffered or self.doc_ends or not self.shards)):
      self._flush()

  def _end_document(self) -> None:
    if self.eos is not None:
      self.buffer.append(np.array([self.eos], self.dtype))
      self.total += 1
    self.doc_ends.append(self.total)

  def _flush(self) -> None:
    """Hands the buffer to the writer thread as the next shard (waiting for the one before), so
    writing overlaps tokenizing the next; the sidecar goes last: then the shard is finished."""
    name = store_lib.shard_name(self.source_index, self.split, len(self.shards))
    tokens = np.concatenate(self.buffer) if self.buffer else np.zeros(0, self.dtype)
    info = {"file": name, "tokens": len(tokens), "documents": len(self.doc_ends), "end": self.total}
    info.update(pieces=self.pieces, open=self.open_doc)
    self.wait()
    self._pending = self._writer.submit(
      _write_shard, os.path.join(self.directory, name), tokens, np.asarray(self.doc_ends, np.int64), info
    )
    self.shards.append(info)
    self.buffer, self.doc_ends = [], []

  def wait(self) -> None:
    """Until the shard in flight is written; raises what writing it raised (a full disk)."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      pending.result()

  def _bar(self):
    if not self.progress:
      return None
    from tqdm import tqdm

    return tqdm(
      desc=f"preparing source {self.source_index} {self.split}", unit="char", unit_scale=True, leave=False
    )
