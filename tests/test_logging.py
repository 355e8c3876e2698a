"""Weights & Biases logging, offline: the run directory's W&B files hold the metrics of metrics.jsonl."""

import glob
import json
import os
import struct

import pytest

from lmjax import train
from lmjax.core import errors
from lmjax.train import metrics_log, preflight

from conftest import tiny_config


def wandb_records(path: str) -> list:
  """The protobuf records of a .wandb file: W&B's header (':W&B', 2-byte magic, version), then
  LevelDB's log format (32 KiB blocks of [crc32 u32, length u16, type u8] chunks; type 1 a whole
  record, 2/3/4 its first/middle/last piece; a block's tail under 7 bytes is padding)."""
  from wandb.proto import wandb_internal_pb2

  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B"
  pos, block, pending, raw = 7, 32768, b"", []
  while pos + 7 <= len(data):
    if block - pos % block < 7:
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
    payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
    if kind == 1:
      raw.append(payload)
    elif kind == 2:
      pending = payload
    elif kind == 3:
      pending += payload
    elif kind == 4:
      raw.append(pending + payload)
  records = []
  for item in raw:
    record = wandb_internal_pb2.Record()
    record.ParseFromString(item)
    records.append(record)
  return records


def logged_history(workdir: str) -> dict:
  """step -> {metric: value} over every offline W&B run file in the workdir."""
  history = {}
  for path in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))):
    for record in wandb_records(path):
      if record.WhichOneof("record_type") == "history":
        values = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
        history.setdefault(values["_step"], {}).update(values)
  return history


def test_wandb_offline_run_holds_the_metrics_and_resume_continues_it(tmp_path, corpus_file, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  workdir = str(tmp_path / "run")
  cfg = tiny_config(corpus_file, str(tmp_path / "tfds"), steps=6, log_every=2, eval_every=3, num_samples=0)
  cfg.logging.update(wandb=True, wandb_project="lmjax-test")
  train.train(cfg, workdir)
  with open(os.path.join(workdir, metrics_log.WANDB_ID_FILE)) as f:
    run_id = f.read().strip()
  cfg.train.steps = 8  # a resumed run logs into the same W&B run
  train.train(cfg, workdir)
  with open(os.path.join(workdir, metrics_log.WANDB_ID_FILE)) as f:
    assert f.read().strip() == run_id
  runs = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
  assert len(runs) == 2 and all(r.endswith("-" + run_id) for r in runs)
  history = logged_history(workdir)
  expected = metrics_log.read_metrics(workdir)
  assert [r["step"] for r in expected] == [2, 3, 4, 6, 8]
  for record in expected:
    logged = history[record["step"]]
    for key, value in record.items():
      if key != "step":
        assert logged[key] == pytest.approx(value, rel=1e-12), (record["step"], key)


def test_wandb_fields_without_wandb_and_missing_package_are_refused(tmp_path, corpus_file, monkeypatch):
  cfg = tiny_config(corpus_file, str(tmp_path / "tfds"))
  cfg.logging.wandb_project = "mine"
  with pytest.raises(errors.ConfigError, match=r"logging.wandb_project='mine' \(logging.wandb is False\)"):
    preflight.check_fields_used(cfg)
  cfg.logging.wandb = True
  monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
  with pytest.raises(errors.ConfigError, match=r"pip install 'lmjax\[wandb\]'"):
    preflight.check_logging(cfg)
