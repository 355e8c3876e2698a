"""Token stores: sources and splits, preparation (determinism, resume, filters), bad input, batches."""

import errno
import json
import os
import socket
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

from lmjax.core import errors, files
from lmjax.data import loader, prepare, shakespeare, sources, store as store_lib, tokenizers
from lmjax.run import config as config_lib

CHINESE = "什么是人工智能？"


def data_cfg(tmp_path, **overrides):
  cfg = config_lib.base_config().data
  cfg.update(store_dir=str(tmp_path / "stores"), data_dir=str(tmp_path / "tfds"), **overrides)
  return cfg


def split_text(store, split, source=0):
  tokens = store.split(source, split)
  return store.tokenizer.decode(tokens.window(0, tokens.tokens))


def store_files(directory):
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
  return out


def leftovers(tmp_path):
  root = tmp_path / "stores"
  return sorted(n for n in os.listdir(root) if n != ".locks") if root.exists() else []


def test_shakespeare_store_is_the_source_text_split_at_90_percent(tmp_path):
  store = prepare.ensure(data_cfg(tmp_path))
  text = shakespeare.shakespeare_text()
  train, val = split_text(store, "train"), split_text(store, "validation")
  assert train + val == text and len(train) == int(len(text) * 0.9)
  assert store.manifest["dtype"] == "uint16" and store.split(0, "train").documents_count == 1
  assert train.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\nDraws on apace;")
  assert "tensorflow" not in sys.modules


def test_text_files_globs_tail_split_and_documents(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "a.txt").write_text("First file. " * 50 + CHINESE, encoding="utf-8")
  (corpus / "b.txt").write_text("Second file 🙂. " * 50, encoding="utf-8")
  (tmp_path / "c.txt").write_text("third\n" * 20, encoding="utf-8")
  cfg = data_cfg(
    tmp_path, dataset="text_files", text_files=f"{corpus}/*.txt, {tmp_path}/c.txt", val_fraction=0.2
  )
  cfg.tokenizer = "byte"
  store = prepare.ensure(cfg)
  parts = [p.read_bytes() for p in (corpus / "a.txt", corpus / "b.txt", tmp_path / "c.txt")]
  cut = int(sum(map(len, parts)) * 0.8)
  # Byte tokens: each document (file) ends with EOS; the file across the cut is split there.
  eos = bytes([0])  # placeholder, replaced below
  train = store.split(0, "train").window(0, store.split(0, "train").tokens)
  val = store.split(0, "validation").window(0, store.split(0, "validation").tokens)
  eos = store.tokenizer.eos_id
  assert list(train) == list(parts[0]) + [eos] + list(parts[1][: cut - len(parts[0])]) + [eos]
  assert list(val) == list(parts[1][cut - len(parts[0]) :]) + [eos] + list(parts[2]) + [eos]
  np.testing.assert_array_equal(store.split(0, "train").doc_ends, [len(parts[0]) + 1, len(train)])


def test_explicit_validation_file_and_edited_files_prepare_a_new_store(tmp_path):
  (tmp_path / "train.txt").write_text("training text\n" * 10, encoding="utf-8")
  (tmp_path / "val.txt").write_text("validation text\n", encoding="utf-8")
  cfg = data_cfg(
    tmp_path, dataset="text_files", text_files=str(tmp_path / "train.txt"), val_file=str(tmp_path / "val.txt")
  )
  with pytest.raises(errors.UserError, match="validation split.*'v'.*not in this char tokenizer"):
    prepare.ensure(cfg)  # a char vocabulary comes from the train split
  cfg.tokenizer = "byte"
  store = prepare.ensure(cfg)
  assert (split_text(store, "train"), split_text(store, "validation")) == (
    "training text\n" * 10,
    "validation text\n",
  )
  (tmp_path / "train.txt").write_text("version two training\n" * 10, encoding="utf-8")
  os.utime(tmp_path / "train.txt", ns=(1, 10**18))
  again = prepare.ensure(cfg)
  assert again.directory != store.directory and split_text(again, "train").startswith("version two")


def test_jsonl_and_parquet_sources_give_one_document_per_record(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  docs = [f"document {i} " + "x" * i for i in range(20)]
  (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d, "id": 1}) + "\n" for d in docs))
  pq.write_table(pa.table({"body": docs}), tmp_path / "d.parquet")
  for kind in ("jsonl", "parquet"):
    cfg = data_cfg(tmp_path, sources=f"{kind}:{tmp_path}/d.{kind}", text_key="body", tokenizer="byte")
    store = prepare.ensure(cfg)
    seen = []
    for split in store_lib.SPLITS:
      tokens = store.split(0, split)
      ids = tokens.window(0, tokens.tokens)
      starts = np.concatenate([[0], tokens.doc_ends[:-1]])
      seen += [bytes(ids[a : b - 1].astype(np.uint8)).decode() for a, b in zip(starts, tokens.doc_ends)]
      assert (ids[tokens.doc_ends - 1] == store.tokenizer.eos_id).all()
    assert seen == docs, kind
    assert store.split(0, "validation").documents_count >= 1


def test_preparing_twice_gives_byte_identical_stores(tmp_path):
  (tmp_path / "t.txt").write_text(shakespeare.shakespeare_text()[:200_000], encoding="utf-8")
  for tokenizer in ("char", "bpe", "bytelevel"):
    made = []
    for name in ("one", "two"):
      cfg = data_cfg(tmp_path / name, dataset="text_files", text_files=str(tmp_path / "t.txt"))
      cfg.update(tokenizer=tokenizer, vocab_size=None if tokenizer == "char" else 400)
      made.append(store_files(prepare.ensure(cfg).directory))
    assert made[0] == made[1] and len(made[0]) >= 6, tokenizer


def test_interrupted_preparation_resumes_from_finished_shards(tmp_path, monkeypatch):
  (tmp_path / "t.txt").write_text("\n".join(f"line {i} " * 30 for i in range(3000)), encoding="utf-8")
  monkeypatch.setattr(prepare, "SHARD_TOKENS", 20_000)
  monkeypatch.setattr(prepare, "BATCH_BYTES", 10_000)
  monkeypatch.setattr(sources, "PIECE_BYTES", 10_000)  # the file streams in many pieces
  made = lambda where: data_cfg(
    where, dataset="text_files", text_files=str(tmp_path / "t.txt"), tokenizer="byte"
  )
  reference = store_files(prepare.ensure(made(tmp_path / "ref")).directory)
  cfg = made(tmp_path)

  real_flush, flushed = prepare._SplitWriter._flush, []

  def flush_then_stop(writer):
    real_flush(writer)
    flushed.append(writer.shards[-1]["file"])
    if len(flushed) == 5:
      raise KeyboardInterrupt  # Ctrl-C: finished shards stay for the next run

  monkeypatch.setattr(prepare._SplitWriter, "_flush", flush_then_stop)
  with pytest.raises(KeyboardInterrupt):
    prepare.ensure(cfg)
  (partial,) = leftovers(tmp_path)
  finished = [n for n in os.listdir(tmp_path / "stores" / partial) if n.endswith(".tokens")]
  assert partial.endswith(".partial") and len(finished) == 5
  (tmp_path / "stores" / partial / ".s0.train.00005.tokens.x1.tmp").write_bytes(b"half")  # a kill mid-write
  resumed = []
  monkeypatch.setattr(prepare._SplitWriter, "_flush", lambda w: (resumed.append(1), real_flush(w)))
  assert store_files(prepare.ensure(cfg).directory) == reference
  shards = len([n for n in reference if n.endswith(".tokens")])
  assert len(resumed) == shards - 5, (len(resumed), shards)  # only the missing shards were written


def test_document_ends_are_kept_at_shard_ends_without_an_eos(tmp_path, monkeypatch):
  """char has no EOS: a document ending exactly at a shard's end still counts (its end is recorded)."""
  monkeypatch.setattr(prepare, "SHARD_TOKENS", 4)
  monkeypatch.setattr(prepare, "BATCH_BYTES", 4)
  docs = ["abcd", "efgh", "abcd", "efgh", "abcd", "efgh", "abcd", "efgh", "abcd", "efgh"]
  (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  store = prepare.ensure(data_cfg(tmp_path, sources=f"jsonl:{tmp_path}/d.jsonl", val_fraction=0.2))
  counts = [store.split(0, s).documents_count for s in store_lib.SPLITS]
  assert (
    counts == [8, 2]
    and [store.manifest["sources"][0]["splits"][s]["documents"] for s in store_lib.SPLITS] == counts
  )
  np.testing.assert_array_equal(store.split(0, "train").doc_ends, np.arange(4, 33, 4))


def test_a_directory_in_the_stores_place_is_not_overwritten(tmp_path):
  cfg = data_cfg(tmp_path, tokenizer="byte")
  path = prepare.store_path(cfg, [s for s, _ in prepare.source_list(cfg)])
  os.makedirs(path)
  (tmp_path / "stores" / path / "notes.txt").write_text("mine")
  with pytest.raises(errors.UserError, match="not a store lmjax finished. Remove the directory"):
    prepare.ensure(cfg)
  assert os.listdir(path) == ["notes.txt"]


def test_filter_stage_drops_short_documents_and_counts_them(tmp_path):
  docs = ["short", "a long enough document " * 3, "tiny", "another long enough document " * 3] * 5
  (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  cfg = data_cfg(tmp_path, sources=f"jsonl:{tmp_path}/d.jsonl", filters="min_chars:20", tokenizer="byte")
  store = prepare.ensure(cfg)
  counts = store.manifest["sources"][0]["filters"]["min_chars:20"]
  assert counts == {"seen": 20, "dropped": 10, "changed": 0}
  assert "short" not in split_text(store, "train") + split_text(store, "validation")
  with pytest.raises(errors.ConfigError, match="no_such_filter"):
    prepare.ensure(data_cfg(tmp_path, sources=f"jsonl:{tmp_path}/d.jsonl", filters="no_such_filter"))


def test_bad_inputs_give_clear_errors_and_leave_no_store(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  (tmp_path / "emptydir").mkdir()
  (tmp_path / "latin1.txt").write_bytes("good text\n".encode() * 5 + "café".encode("latin-1") + b"\n")
  (tmp_path / "nofield.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
  (tmp_path / "number.jsonl").write_text('{"text": "a"}\n{"text": null}\n{"text": 3}\n')
  cases = [
    (dict(sources=f"text:{tmp_path}/empty.txt"), "empty.txt is empty"),
    (dict(sources=f"text:{tmp_path}/emptydir/*"), "matches no file"),
    (dict(sources=f"text:{tmp_path}/latin1.txt"), "latin1.txt is not UTF-8 at byte offset 53"),
    (dict(sources=f"jsonl:{tmp_path}/nofield.jsonl"), "nofield.jsonl line 2 has no field 'text'"),
    (dict(sources=f"jsonl:{tmp_path}/number.jsonl"), "number.jsonl line 3: field 'text' holds int, not text"),
    (dict(sources="nosuchkind:x"), "is not one of"),
    (dict(sources=f"text:{tmp_path}/latin1.txt=abc"), "the weight 'abc' after '=' is not a number"),
    (dict(sources=f"text:{tmp_path}/latin1.txt=inf"), "must be a finite number > 0, not inf"),
    (dict(sources=f"text:{tmp_path}/latin1.txt", filters="min_chars:abc"), "min_chars needs a whole number"),
    (dict(sources=f"text:{tmp_path}/latin1.txt", filters="no_such_module_xyz.fn"), "ModuleNotFoundError"),
  ]
  for overrides, message in cases:
    with pytest.raises(errors.UserError, match=message):
      prepare.ensure(data_cfg(tmp_path, tokenizer="byte", **overrides))
    assert leftovers(tmp_path) == [], message
  store = prepare.ensure(
    data_cfg(tmp_path, tokenizer="byte", errors="replace", sources=f"text:{tmp_path}/latin1.txt")
  )
  assert "caf\ufffd" in split_text(store, "train") + split_text(store, "validation")


def test_disk_full_removes_the_partial_store(tmp_path, monkeypatch):
  real_write, calls = files.write_atomic, []

  def full_disk(path, data):
    calls.append(path)
    if path.endswith(".tokens") and len([c for c in calls if c.endswith(".tokens")]) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    real_write(path, data)

  monkeypatch.setattr(files, "write_atomic", full_disk)
  with pytest.raises(errors.UserError, match="disk is full.*partial store was removed"):
    prepare.ensure(data_cfg(tmp_path))
  assert leftovers(tmp_path) == []


def test_store_of_another_tokenizer_is_refused_with_how_to_rebuild(tmp_path):
  store = prepare.ensure(data_cfg(tmp_path))
  with pytest.raises(errors.UserError, match=r"prepared with a char tokenizer.*Remove the store directory"):
    store.check_tokenizer(tokenizers.CharTokenizer("abc"), "this run's saved tokenizer")
  store.check_tokenizer(tokenizers.load(os.path.join(store.directory, "tokenizer")), "the same one")


# Batches -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def doc_store(tmp_path_factory):
  """Byte tokens of 200 JSONL documents of varied length (each ends with EOS = 257)."""
  tmp = tmp_path_factory.mktemp("docs")
  rng = np.random.default_rng(0)
  docs = ["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(1, 40))) for _ in range(200)]
  (tmp / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  (tmp / "b.jsonl").write_text("".join(json.dumps({"text": d.upper()}) + "\n" for d in docs))
  cfg = data_cfg(tmp, sources=f"jsonl:{tmp}/a.jsonl=3;jsonl:{tmp}/b.jsonl=1", tokenizer="byte")
  return prepare.ensure(cfg), docs


def test_windows_are_shifted_runs_of_the_stream_and_a_function_of_seed_and_step(doc_store):
  store, _ = doc_store
  batches = loader.StoreBatches(store, [1.0], "train", seed=3, batch_size=5, seq_len=16, packing=False)
  batch = batches(7)
  stream = store.split(0, "train").window(0, store.split(0, "train").tokens)
  rng = np.random.default_rng([3, 7])  # the earlier corpus sampler's draw, unchanged
  starts = rng.integers(0, len(stream) - 16, size=5)
  np.testing.assert_array_equal(batch["inputs"], stream[starts[:, None] + np.arange(16)])
  np.testing.assert_array_equal(batch["targets"], stream[starts[:, None] + np.arange(1, 17)])
  assert not np.array_equal(batches(8)["inputs"], batch["inputs"])


def test_packed_rows_restart_positions_and_segments_at_each_document(doc_store):
  store, _ = doc_store
  batches = loader.StoreBatches(store, [3.0, 1.0], "train", seed=0, batch_size=8, seq_len=64, packing=True)
  source_R, start_R = batches.rows(5)
  batch = batches(5)
  for r in range(8):
    split = store.split(int(source_R[r]), "train")
    ends = set(split.doc_ends.tolist())
    segment, position = 1, 0
    for t in range(64):
      index = int(start_R[r]) + t
      if t and index in ends:  # a document starts here
        segment, position = segment + 1, 0
      assert (batch["segment_ids"][r, t], batch["positions"][r, t]) == (segment, position)
      assert batch["mask"][r, t] == (index + 1 not in ends)  # no target across documents
      position += 1
    assert (batch["inputs"][r][batch["mask"][r] == 0] == store.tokenizer.eos_id).all()


def test_mixture_weights_are_met_within_sampling_error(doc_store):
  store, _ = doc_store
  batches = loader.StoreBatches(store, [3.0, 1.0], "train", seed=1, batch_size=8, seq_len=16, packing=False)
  drawn = np.concatenate([batches.rows(step)[0] for step in range(1000)])
  share, sigma = drawn.mean(), np.sqrt(0.25 * 0.75 / len(drawn))
  assert abs(share - 0.25) < 4 * sigma
  upper = batches(3)["inputs"][batches.rows(3)[0] == 1]
  assert ((upper < 97) | (upper > 122)).all()  # rows of source 1 hold its upper-case text


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_see_slices_of_the_same_global_batch(doc_store, processes):
  store, _ = doc_store
  batches = loader.StoreBatches(store, [3.0, 1.0], "train", seed=0, batch_size=8, seq_len=32, packing=True)
  whole = batches(11)
  parts = [batches(11, p, processes) for p in range(processes)]
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_a_catalog_dataset_offline_fails_in_seconds_and_leaves_no_temp_dirs(tmp_path, monkeypatch):
  """Not prepared and no network: one connection attempt, the message, no TFDS download retries,
  and none of TFDS's `tmp*tfds` directories left in the temp dir."""

  def unreachable(address, timeout=None):
    raise OSError("Network is unreachable")

  monkeypatch.setattr(socket, "create_connection", unreachable)
  temp = tmp_path / "tmp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  start = time.monotonic()
  with pytest.raises(
    errors.UserError, match="tfds:tiny_shakespeare is not prepared in .* network is unreachable"
  ):
    prepare.ensure(data_cfg(tmp_path, dataset="tiny_shakespeare"))
  assert time.monotonic() - start < 30
  assert list(temp.iterdir()) == [] and leftovers(tmp_path) == []


def test_tfds_name_outside_the_catalog_is_a_clear_error(tmp_path):
  with pytest.raises(errors.UserError, match="tfds:no_such_dataset_xyz is not in the TFDS catalog"):
    prepare.ensure(data_cfg(tmp_path, dataset="no_such_dataset_xyz"))
  assert leftovers(tmp_path) == []


def test_a_run_waiting_on_a_store_lock_says_who_holds_it(tmp_path, capsys):
  """A second preparation of the same store waits, and says once what it waits for and who holds it."""
  path, entered = str(tmp_path / "store.lock"), threading.Event()

  def second():
    with files.waiting_lock(path, "the token store S"):
      entered.set()

  with files.waiting_lock(path, "the token store S"):
    waiter = threading.Thread(target=second)
    waiter.start()
    time.sleep(0.3)
    assert not entered.is_set()  # still waiting
    err = capsys.readouterr().err
    assert f"waiting for the token store S: held by pid {os.getpid()}" in err and "command:" in err
  waiter.join(timeout=10)
  assert entered.is_set()
