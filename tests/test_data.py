"""Data tests: TFDS builders, splits, tokenizers, step-indexed batches."""

import os
import sys

import ml_collections
import numpy as np
import pytest

from lmjax.data import (
  corpus as corpus_lib,
  hf_tokenizer,
  shakespeare,
  text_datasets,
  tokenizer_base,
  tokenizers,
)

CHINESE = "什么是人工智能？"
ODD_TEXTS = [
  CHINESE,
  "emoji 🙂👍🏽 and café",
  "  two  spaces\tand tabs\n\n",
  "数学公式 $PE_{(i,2j)} = \\sin(i)$",
  "",
]


def data_cfg(tmp_path, **overrides):
  values = dict(
    dataset="shakespeare",
    text_files="",
    val_file="",
    val_fraction=0.1,
    text_key="text",
    data_dir=str(tmp_path / "tfds"),
    tokenizer="char",
    vocab_size=0,
  )
  return ml_collections.ConfigDict({**values, **overrides})


@pytest.fixture(scope="module")
def shakespeare_splits(tmp_path_factory):
  return text_datasets.load_splits(data_cfg(tmp_path_factory.mktemp("sh")))


def test_shakespeare_builder_round_trip_and_split(shakespeare_splits):
  train, val = shakespeare_splits
  source = shakespeare.shakespeare_text()
  assert train + val == source  # prepared text == source text; contiguous, no overlap
  assert len(train) == int(len(source) * 0.9)
  assert "tensorflow" not in sys.modules


def test_shakespeare_char_rnn_layout(shakespeare_splits):
  train, _ = shakespeare_splits
  # A Midsummer Night's Dream comes first in path order (comedies/a-midsummer...).
  assert train.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\nDraws on apace;")
  assert "\n\nHAMLET:\nTo be, or not to be: that is the question:\n" in train
  for markup in ("**", "##", "_Enter", "\\[", "Exeunt"):
    assert markup not in train
  speeches = train.split("\n\n")
  assert all(s.split("\n", 1)[0].endswith(":") for s in speeches[:1000])


def test_text_files_builder_with_globs_and_tail_split(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "a.txt").write_text("First file. " * 50 + CHINESE, encoding="utf-8")
  (corpus / "b.txt").write_text("Second file 🙂. " * 50, encoding="utf-8")
  (tmp_path / "c.txt").write_text("third\n" * 20, encoding="utf-8")
  cfg = data_cfg(
    tmp_path, dataset="text_files", text_files=f"{corpus}/*.txt, {tmp_path}/c.txt", val_fraction=0.2
  )
  train, val = text_datasets.load_splits(cfg)
  source = "".join(
    p.read_text(encoding="utf-8") for p in [corpus / "a.txt", corpus / "b.txt", tmp_path / "c.txt"]
  )
  assert train + val == source
  assert len(val) == len(source) - int(len(source) * 0.8)


def test_text_files_explicit_validation_file(tmp_path):
  (tmp_path / "train.txt").write_text("training text\n" * 10, encoding="utf-8")
  (tmp_path / "val.txt").write_text("validation text\n", encoding="utf-8")
  cfg = data_cfg(
    tmp_path, dataset="text_files", text_files=str(tmp_path / "train.txt"), val_file=str(tmp_path / "val.txt")
  )
  assert text_datasets.load_splits(cfg) == ("training text\n" * 10, "validation text\n")


def test_edited_file_is_prepared_again(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("version one " * 10, encoding="utf-8")
  cfg = data_cfg(tmp_path, dataset="text_files", text_files=str(path))
  first = text_datasets.load_splits(cfg)
  path.write_text("version two, longer " * 10, encoding="utf-8")
  os.utime(path, ns=(1, 10**18))  # a different mtime even on coarse clocks
  second = text_datasets.load_splits(cfg)
  assert "".join(first).startswith("version one") and "".join(second).startswith("version two")


def test_empty_corpus_is_a_clear_error(tmp_path):
  (tmp_path / "empty.txt").write_text("", encoding="utf-8")
  with pytest.raises(ValueError, match="corpus is empty"):
    text_datasets.load_splits(
      data_cfg(tmp_path, dataset="text_files", text_files=str(tmp_path / "empty.txt"))
    )


def test_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="nope.*matches no file"):
    text_datasets.load_splits(
      data_cfg(tmp_path, dataset="text_files", text_files=str(tmp_path / "nope*.txt"))
    )


def test_unknown_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="neither a built-in dataset.*nor in the TFDS catalog"):
    text_datasets.load_splits(data_cfg(tmp_path, dataset="no_such_dataset_xyz"))


def test_corpus_shorter_than_one_sequence_is_a_clear_error():
  with pytest.raises(ValueError, match="fewer than one sequence"):
    corpus_lib.batch_at(np.arange(10, dtype=np.int32), seed=0, step=0, batch_size=2, seq_len=10)


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_byte_tokenizer_round_trips(text):
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(text)
  assert ids == list(text.encode("utf-8"))
  assert tok.decode(ids + [tok.eos_id]) == text


@pytest.fixture(scope="module")
def bpe(shakespeare_splits):
  return tokenizers.train("bpe", shakespeare_splits[0][:300_000], vocab_size=1000)


@pytest.mark.parametrize("text", ODD_TEXTS + ["To be, or not to be: that is the question"])
def test_bpe_tokenizer_round_trips(bpe, text):
  assert bpe.decode(bpe.encode(text)) == text


def test_bpe_learns_merges_and_saves(bpe, tmp_path):
  assert bpe.vocab_size == 1000
  sample = "What is the matter, my lord?"
  assert len(bpe.encode(sample)) < len(sample) / 2  # merges compress English
  bpe.save(str(tmp_path))
  assert (tmp_path / "tokenizer.model").exists()
  assert tokenizers.load(str(tmp_path)).encode(CHINESE) == bpe.encode(CHINESE)


def test_char_tokenizer_names_unknown_characters(tmp_path):
  tok = tokenizers.train("char", "hello world")
  assert tok.vocab_size == 8 and tok.decode(tok.encode("hello")) == "hello"
  with pytest.raises(ValueError, match="'人'.*'什'") as err:
    tok.encode(CHINESE)
  assert "'o'" not in str(err.value)
  tok.save(str(tmp_path))
  assert tokenizers.load(str(tmp_path)).encode("low") == tok.encode("low")


def test_unknown_tokenizer_kind():
  with pytest.raises(ValueError, match="data.tokenizer='word'.*allowed values"):
    tokenizers.train("word", "text")


def test_batches_are_shifted_windows_of_the_stream():
  ids = np.arange(1000, dtype=np.int32)  # token i has value i, so windows are easy to check
  batch = corpus_lib.batch_at(ids, seed=3, step=7, batch_size=5, seq_len=16)
  assert batch["inputs"].shape == batch["targets"].shape == (5, 16)
  np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
  np.testing.assert_array_equal(np.diff(batch["inputs"], axis=1), 1)


def test_batches_are_a_function_of_seed_and_step():
  ids = np.random.default_rng(0).integers(0, 50, 5000).astype(np.int32)
  batch = lambda seed, step: corpus_lib.batch_at(ids, seed, step, 4, 32)["inputs"]
  np.testing.assert_array_equal(batch(1, 5), batch(1, 5))
  assert not np.array_equal(batch(1, 5), batch(1, 6))
  assert not np.array_equal(batch(1, 5), batch(2, 5))


@pytest.mark.parametrize("processes", [2, 4])
def test_global_batch_independent_of_process_count(processes):
  ids = np.random.default_rng(1).integers(0, 50, 5000).astype(np.int32)
  whole = corpus_lib.batch_at(ids, 0, 11, 8, 32)["inputs"]
  slices = [corpus_lib.batch_at(ids, 0, 11, 8, 32, p, processes)["inputs"] for p in range(processes)]
  assert all(s.shape == (8 // processes, 32) for s in slices)
  np.testing.assert_array_equal(np.concatenate(slices), whole)


def test_load_corpus_tokenizes_both_splits(tmp_path):
  (tmp_path / "t.txt").write_text("abcabcabd" * 20, encoding="utf-8")
  corpus = corpus_lib.load_corpus(
    data_cfg(tmp_path, dataset="text_files", text_files=str(tmp_path / "t.txt"))
  )
  assert corpus.tokenizer.vocab_size == 4
  assert (
    corpus.tokenizer.decode(corpus.train_ids) + corpus.tokenizer.decode(corpus.val_ids) == "abcabcabd" * 20
  )
  assert corpus.train_ids.dtype == np.int32


def test_every_tokenizer_kind_implements_the_protocol_and_loads_back(bpe, tmp_path):
  """char, byte, bpe and hf tokenizers all satisfy data.tokenizer_base.Tokenizer and come back from
  what they save with the same ids (the hf one is a two-token byte-level BPE built from GGUF-style
  metadata)."""
  hf = hf_tokenizer.from_gguf_metadata(
    [chr(c) for c in range(256)] + ["<|im_end|>"], [1] * 256 + [3], [], "gpt2", "gpt2", -1, 256, -1, ""
  )
  for tok in (tokenizers.CharTokenizer("abc \n"), tokenizers.ByteTokenizer(), bpe, hf):
    assert isinstance(tok, tokenizer_base.Tokenizer), tok.kind
    directory = tmp_path / tok.kind
    tok.save(str(directory))
    again = tokenizers.load(str(directory))
    assert (again.kind, again.vocab_size, again.encode("abc a")) == (
      tok.kind,
      tok.vocab_size,
      tok.encode("abc a"),
    )
