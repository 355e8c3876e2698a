"""End-to-end training tests: loss, logs, checkpoints, exact resume, signals, NaNs, configs."""

import json
import math
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lmjax import model, train
from lmjax.core import errors, sharding
from lmjax.inference import LanguageModel
from lmjax.model import chunked_loss
from lmjax.run import config as config_lib, rundir
from lmjax.tasks import evaluators
from lmjax.train import metrics_log

from conftest import REPO, run_lmjax, tiny_config, tiny_flags

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}


def read_jsonl(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def restore_params(workdir, step):
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "default"))
  return state["params"]


def launch(flags):
  return subprocess.Popen(
    [sys.executable, "-m", "lmjax.cli.train", *flags],
    cwd=REPO,
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def run_until_line(proc, prefix):
  """Reads the process's output until a line starts with `prefix`; returns everything read."""
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith(prefix):
      return "".join(seen)
  raise AssertionError(f"process ended before printing {prefix!r}:\n" + "".join(seen))


@pytest.mark.slow
def test_training_learns_and_writes_every_artifact(tmp_path, corpus_file, capsys):
  workdir = str(tmp_path / "run")
  cfg = tiny_config(corpus_file, str(tmp_path / "tfds"), steps=40, ckpt_every=20)
  cfg.reference.update(
    step=40, val_loss=2.5, source="a test reference", dataset="text_files", tokenizer="char"
  )
  final = train.train(cfg, workdir)
  records = read_jsonl(workdir)
  assert [r["step"] for r in records] == list(range(1, 41))
  for r in records:
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(r)
  evals = [r for r in records if "val_loss" in r]
  assert [r["step"] for r in evals] == [20, 40]
  assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-6) for r in evals)
  assert np.mean([r["loss"] for r in records[-5:]]) < np.mean([r["loss"] for r in records[:5]]) - 0.5
  assert final["val_loss"] == evals[-1]["val_loss"]
  assert (
    f"final val loss {evals[-1]['val_loss']:.4f} at step 40; reference 2.5 at step 40 (a test reference)"
    in capsys.readouterr().out
  )
  for name in ("config.json", "tokenizer.json", "loss.png", "samples.txt"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "40"]
  # The config round-trips through config.json.
  with open(os.path.join(workdir, "config.json")) as f:
    assert ml_collections.ConfigDict(json.load(f)).to_dict() == json.loads(cfg.to_json_best_effort())


@pytest.mark.slow
def test_evaluation_runs_on_its_own_schedule(tmp_path, corpus_file):
  workdir = str(tmp_path / "run")
  train.train(
    tiny_config(corpus_file, str(tmp_path / "tfds"), steps=12, log_every=5, eval_every=4, num_samples=0),
    workdir,
  )
  records = read_jsonl(workdir)
  assert [r["step"] for r in records if "val_loss" in r] == [4, 8, 12]
  assert [r["step"] for r in records] == [4, 5, 8, 10, 12]


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(tmp_path):
  cfg = model.ModelConfig(vocab_size=11, max_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=32)
  optim = config_lib.base_config().optim
  optim.update(lr=1e-2, min_lr=1e-3, warmup_steps=0)
  optimizer, schedule = train.make_optimizer(optim, 10, train.param_roles(cfg))
  mesh = sharding.make_mesh((1, 1, 1))
  _, shardings = train.state_shardings(cfg, optimizer, mesh, sharding.DEFAULT_RULES)
  batch_sh = sharding.batch_sharding(mesh, sharding.DEFAULT_RULES)
  tokens = np.random.default_rng(0).integers(0, 11, (4, 9)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  results = []
  for accum in (1, 2, 4):
    state = train.init_state(cfg, optimizer, 0, shardings)
    step = train.make_train_step(cfg, optimizer, schedule, 0, accum, shardings, batch_sh)
    state, metrics = step(state, batch, None)
    results.append((float(metrics["loss"]), state.params))
  for loss, params in results[1:]:
    assert loss == pytest.approx(results[0][0], abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, results[0][1])


@pytest.mark.slow
def test_bf16_compute_with_fp32_master_params_trains(tmp_path, corpus_file):
  cfg = tiny_config(corpus_file, str(tmp_path / "tfds"), steps=20, eval_every=20, num_samples=0)
  cfg.model.dtype = "bfloat16"
  train.train(cfg, str(tmp_path / "run"))
  records = read_jsonl(str(tmp_path / "run"))
  assert records[-1]["loss"] < records[0]["loss"] and np.isfinite(records[-1]["val_loss"])
  params = restore_params(str(tmp_path / "run"), 20)
  assert {np.asarray(p).dtype for p in jax.tree.leaves(params)} == {np.dtype("float32")}


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, corpus_file, packing):
  data_dir = str(tmp_path / "tfds")
  if packing:  # documents of 1-3 lines (one file each), packed with segment ids
    lines = open(corpus_file, encoding="utf-8").read().splitlines(keepends=True)
    (tmp_path / "docs").mkdir()
    for i in range(0, len(lines), 3):
      (tmp_path / "docs" / f"{i:05d}.txt").write_text("".join(lines[i : i + 1 + i % 3]), encoding="utf-8")
    corpus_file = str(tmp_path / "docs" / "*.txt")
  straight = str(tmp_path / "straight")
  cfg = tiny_config(corpus_file, data_dir, num_samples=0)
  cfg.data.packing = packing
  train.train(cfg, straight)

  resumed = str(tmp_path / "resumed")
  flags = tiny_flags(
    corpus_file, data_dir, resumed, "--config.train.num_samples=0", f"--config.data.packing={packing}"
  )
  proc = launch(flags)
  run_until_line(proc, "step 25/40")
  proc.kill()  # SIGKILL: no chance to save anything
  proc.wait()
  second = run_lmjax("train", *flags, env=ENV)
  assert second.returncode == 0, second.stdout + second.stderr
  resumed_from = int(second.stdout.split("resumed from step ")[1].split()[0])
  assert 10 <= resumed_from < 40

  straight_losses = {r["step"]: r["loss"] for r in read_jsonl(straight)}
  # Steps logged after the last checkpoint before the kill are dropped and logged again: each appears once.
  assert [r["step"] for r in read_jsonl(resumed)] == list(range(1, 41))
  for record in read_jsonl(resumed):
    assert record["loss"] == straight_losses[record["step"]], record["step"]
  jax.tree.map(np.testing.assert_array_equal, restore_params(resumed, 40), restore_params(straight, 40))


@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_143_unfinished(tmp_path, corpus_file):
  workdir = str(tmp_path / "run")
  proc = launch(
    tiny_flags(
      corpus_file,
      str(tmp_path / "tfds"),
      workdir,
      "--config.train.steps=100000",
      "--config.train.ckpt_every=100000",
    )
  )
  run_until_line(proc, "step 5/")
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, out  # saved but not finished: schedulers requeue it
  saved_step = int(out.split("SIGTERM received: saving step ")[1].split()[0])
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(saved_step)]
  assert saved_step >= 5 and not rundir.is_finished(workdir)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, corpus_file, capsys):
  data_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "run")
  train.train(tiny_config(corpus_file, data_dir, steps=20, num_samples=0), workdir)
  latest = os.path.join(workdir, "checkpoints", "20")
  for root, _, files in os.walk(latest):
    for name in files:
      if not name.startswith("_CHECKPOINT_METADATA"):
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(max(0, os.path.getsize(f.name) // 3))
  capsys.readouterr()
  train.train(tiny_config(corpus_file, data_dir, steps=30, num_samples=0), workdir)
  out = capsys.readouterr().out
  assert "checkpoint at step 20 failed to restore" in out and "resumed from step 10" in out
  assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "20"))  # kept aside, not deleted
  assert sorted(map(int, os.listdir(os.path.join(workdir, "checkpoints")))) == [10, 20, 30]


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, corpus_file, monkeypatch):
  real_token_loss_sum = chunked_loss.token_loss_sum

  def poisoned(x, head, targets, mask=None):  # the loss turns NaN from step 13 on (lr is still positive)
    total, count = real_token_loss_sum(x, head, targets, mask)
    return (jnp.where(jnp.abs(x).max() > 0, total * jnp.nan, total) if poisoned.armed else total), count

  poisoned.armed = False
  monkeypatch.setattr(chunked_loss, "token_loss_sum", poisoned)

  data_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "run")
  train.train(tiny_config(corpus_file, data_dir, steps=12, log_every=4, num_samples=0), workdir)
  good = restore_params(workdir, 12)
  poisoned.armed = True
  with pytest.raises(FloatingPointError, match=r"NaN/Inf at step 13;.*last good checkpoint \(step 12\)"):
    train.train(tiny_config(corpus_file, data_dir, steps=40, log_every=4, num_samples=0), workdir)
  assert sorted(map(int, os.listdir(os.path.join(workdir, "checkpoints")))) == [10, 12]
  jax.tree.map(np.testing.assert_array_equal, restore_params(workdir, 12), good)


@pytest.mark.slow
def test_unknown_override_fails_naming_the_closest_fields(tmp_path, corpus_file):
  result = run_lmjax(
    "train",
    *tiny_flags(corpus_file, str(tmp_path), str(tmp_path / "run"), "--config.optim.lrr=3"),
    env=ENV,
    timeout=120,
  )
  assert result.returncode == 2
  assert "--config.optim.lrr: no such config field; did you mean: optim.lr" in result.stderr
  assert "model.d_model" not in result.stderr  # only the relevant fields, not all ~70
  assert not os.path.exists(tmp_path / "run")


def test_unknown_key_in_experiment_file_is_rejected(tmp_path, corpus_file):
  cfg = tiny_config(corpus_file, str(tmp_path))
  cfg.train.stepz = 3
  with pytest.raises(ValueError, match=r"(?s)unknown config keys \['train.stepz'\].*train.steps"):
    train.train(cfg, str(tmp_path / "run"))
  cfg = tiny_config(corpus_file, str(tmp_path))
  cfg.model.pos_encoding = "alibi"
  with pytest.raises(ValueError, match="model.pos_encoding='alibi'.*allowed values"):
    config_lib.validate(cfg)


def test_metrics_reader_prefers_latest_record_per_step(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 2, "loss": 2.5, "val_loss": 2.6}\n')
  assert metrics_log.read_metrics(str(tmp_path)) == [
    {"step": 1, "loss": 3.0},
    {"step": 2, "loss": 2.5, "val_loss": 2.6},
  ]


@pytest.mark.slow
def test_evaluators_declared_in_the_config_run_during_training_and_at_the_end(tmp_path, corpus_file):
  """cfg.evals: a perplexity evaluator every 4 steps and samples every 6 run at those steps and at
  the end, logging steps or not; the last perplexity is the final weights' perplexity on that text.
  The finished run re-started re-samples but does not evaluate again what is on record."""
  workdir = str(tmp_path / "run")
  cfg = tiny_config(corpus_file, str(tmp_path / "tfds"), steps=10, ckpt_every=10, num_samples=0, log_every=5)
  cfg.evals.ppl = dict(kind="perplexity", every=4, text_file=corpus_file, seq_len=16)
  cfg.evals.peek = dict(kind="samples", every=6, count=2, length=5)
  train.train(cfg, workdir)
  records = [r for r in metrics_log.read_metrics(workdir) if "ppl/perplexity" in r]  # merged per step
  assert [r["step"] for r in records] == [4, 8, 10]
  assert ["loss" in r for r in records] == [False, False, True]  # steps 4 and 8 are not logging steps
  lm = LanguageModel.from_workdir(workdir)
  with open(corpus_file, encoding="utf-8") as f:
    expected = evaluators.perplexity(lm.cfg, lm.params, lm.tokenizer, f.read(), 16)
  assert records[-1]["ppl/perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
  with open(os.path.join(workdir, "finished.json")) as f:
    assert json.load(f)["evals"] == {k: records[-1][k] for k in ("ppl/loss", "ppl/perplexity")}
  assert sorted(n for n in os.listdir(workdir) if n.startswith("samples")) == [
    "samples_peek.txt",
    "samples_peek_step6.txt",
  ]
  os.remove(os.path.join(workdir, "samples_peek.txt"))
  lines = len(read_jsonl(workdir))
  train.train(cfg, workdir)  # finished: samples again, perplexity is on record
  assert os.path.exists(os.path.join(workdir, "samples_peek.txt")) and len(read_jsonl(workdir)) == lines
  with pytest.raises(errors.ConfigError, match=r"evals.bad \(kind 'perplexity'\): missing \['text_file'\]"):
    bad = tiny_config(corpus_file, str(tmp_path / "tfds"))
    bad.evals.bad = dict(kind="perplexity", every=2)
    train.train(bad, str(tmp_path / "bad"))
  unencodable = tiny_config(corpus_file, str(tmp_path / "tfds"))
  unencodable.evals.peek = dict(kind="samples", prompt="\u65e5\u672c")  # not in the char vocabulary
  with pytest.raises(errors.ConfigError, match="evals.peek: its text cannot be encoded"):
    train.train(unencodable, str(tmp_path / "unencodable"))
  assert not os.path.exists(tmp_path / "unencodable" / "config.json")  # refused before anything is written
  with pytest.raises(FileNotFoundError, match="no checkpoints in"):
    LanguageModel.from_workdir(str(tmp_path / "never_trained"))
