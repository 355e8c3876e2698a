"""Integrity of runs and results (issue 16): nothing good lost, nothing counted that did not finish.

References are independent of the code under test: file listings, exit codes, the config's
ranges, the warmup-cosine formula and numpy losses.
"""

import hashlib
import json
import math
import os
import re
import sys
import threading

import jax
import ml_collections
import numpy as np
import pytest

from lmjax import model, train
from lmjax.core import errors, files as files_lib, sharding
from lmjax.inference import LanguageModel
from lmjax.research import scaling, sweep
from lmjax.run import checkpoint, config as config_lib, resume, rundir
from lmjax.train import metrics_log, preflight

from conftest import TINY_EXPERIMENT, run_lmjax, tiny_config, tiny_flags

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def listing(workdir):
  """Every file under workdir with its bytes, except the lock file (it records who last ran)."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      if name != files_lib.LOCK_FILE:
        path = os.path.join(root, name)
        files[os.path.relpath(path, workdir)] = open(path, "rb").read()
  return files


# ---------------------------------------------------------------- 1. a good checkpoint is never lost


@pytest.mark.slow
def test_changed_model_config_is_refused_before_anything_is_written(tmp_path, corpus_file):
  data_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "run")
  train.train(tiny_config(corpus_file, data_dir, steps=20, num_samples=0), workdir)
  before = listing(workdir)
  changed = tiny_config(corpus_file, data_dir, steps=30, num_samples=0)
  changed.model.d_model, changed.optim.lr = 48, 3e-3
  with pytest.raises(
    errors.ConfigError,
    match=r"(?s)model\.d_model: saved 32, now 48.*optim\.lr: saved 0\.01, "
    r"now 0\.003.*new --workdir",
  ):
    train.train(changed, workdir)
  assert listing(workdir) == before  # config.json, checkpoints, metrics: all as they were
  with pytest.raises(errors.ConfigError, match="is at step 20, beyond train.steps=10"):
    train.train(tiny_config(corpus_file, data_dir, steps=10, num_samples=0), workdir)
  assert listing(workdir) == before
  assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


@pytest.mark.slow
def test_checkpoint_of_other_shapes_is_a_mismatch_not_corruption(tmp_path, corpus_file):
  data_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "run")
  train.train(tiny_config(corpus_file, data_dir, steps=10, num_samples=0), workdir)
  os.remove(os.path.join(workdir, "config.json"))  # no saved config to compare: the checkpoint itself tells
  before = listing(workdir)
  changed = tiny_config(corpus_file, data_dir, steps=20, num_samples=0)
  changed.model.d_ff = 48
  with pytest.raises(
    checkpoint.CheckpointMismatch,
    match=r"(?s)step 10 .*w1: saved \(2, 32, 64\), this config "
    r"\(2, 32, 48\)",
  ):
    train.train(changed, workdir)
  assert listing(workdir) == before  # not even config.json is written for the mismatched config


@pytest.mark.slow
def test_when_no_checkpoint_restores_nothing_is_moved(tmp_path, corpus_file):
  data_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "run")
  train.train(tiny_config(corpus_file, data_dir, steps=10, num_samples=0), workdir)
  for root, _, names in os.walk(os.path.join(workdir, "checkpoints", "10")):
    for name in names:  # damage the data, keep the metadata readable
      if name not in ("_METADATA", "_CHECKPOINT_METADATA", "_sharding") and "metadata" not in root:
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(os.path.getsize(f.name) // 3)
  before = listing(workdir)
  with pytest.raises(
    checkpoint.CheckpointUnreadable, match="(?s)no checkpoint in .* restores.*step 10.*Nothing was moved"
  ):
    train.train(tiny_config(corpus_file, data_dir, steps=20, num_samples=0), workdir)
  assert listing(workdir) == before


def test_resume_differences_ignore_resumable_fields_only():
  saved = config_lib.base_config()
  cfg = config_lib.base_config()
  cfg.train.steps, cfg.train.eval_every, cfg.mesh.shape, cfg.optim.decay_steps = 9000, 7, (1, 2, 1), 2000
  assert resume.resume_differences(saved, cfg) == []
  cfg.seed, cfg.data.tokenizer = 5, "byte"
  assert resume.resume_differences(saved, cfg) == [("data.tokenizer", "char", "byte"), ("seed", 0, 5)]


@pytest.mark.slow
def test_paths_with_glob_characters_are_taken_literally(tmp_path, corpus_file):
  corpus = tmp_path / "spécial dir" / "corpus [v1].txt"
  corpus.parent.mkdir()
  corpus.write_bytes(open(corpus_file, "rb").read())
  workdir = str(tmp_path / "run [v1] \\x 100%")
  data_dir = str(tmp_path / "tfds")
  train.train(tiny_config(str(corpus), data_dir, steps=10, ckpt_every=10, num_samples=0), workdir)
  flags = tiny_flags(
    str(corpus),
    data_dir,
    workdir,
    "--config.train.steps=20",
    "--config.train.ckpt_every=10",
    "--config.train.num_samples=0",
  )
  second = run_lmjax("train", *flags, env=ENV)
  assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
  assert "resumed from step 10" in second.stdout and "failed to restore" not in second.stdout
  assert checkpoint.step_dirs(workdir) == [10, 20]
  assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))
  lm = LanguageModel.from_workdir(workdir)
  assert lm.params["embedding"].shape[1] == 32


def test_a_half_written_metrics_line_is_dropped_on_resume(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
    '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo'
  )
  assert [r["step"] for r in metrics_log.read_metrics(str(tmp_path))] == [1, 2]
  metrics_log.MetricsLogger(str(tmp_path), total_steps=10, start_step=1).close()  # resuming from step 1
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n'


# ---------------------------------------------------------------- 2. one run per workdir


def test_a_second_run_in_a_workdir_in_use_refuses_and_writes_nothing(tmp_path, corpus_file):
  workdir = str(tmp_path / "run")
  with files_lib.lock(workdir):
    with pytest.raises(files_lib.WorkdirInUse, match=f"in use by another lmjax process: pid {os.getpid()}"):
      train.train(tiny_config(corpus_file, str(tmp_path / "tfds"), steps=2), workdir)
  assert os.listdir(workdir) == [files_lib.LOCK_FILE]


def test_atomic_writes_from_many_threads_leave_one_whole_file(tmp_path):
  path = str(tmp_path / "config.json")
  payloads = [{"writer": i, "data": "x" * 50_000} for i in range(8)]
  failures = []

  def write_and_read(payload):
    try:
      for _ in range(20):
        files_lib.write_json(path, payload)
        assert json.load(open(path)) in payloads  # a reader never sees a torn file
    except Exception as err:  # noqa: BLE001 (reported below; a thread's exception would be lost)
      failures.append(err)

  threads = [threading.Thread(target=write_and_read, args=(p,)) for p in payloads]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert failures == [] and json.load(open(path)) in payloads
  assert os.listdir(tmp_path) == ["config.json"]  # no temporary file left behind


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_permissions_open_would_give(tmp_path, umask, mode):
  """As open(path, "w") under the umask: other users read a run or an export that umask 022 lets them."""
  previous = os.umask(umask)
  try:
    files_lib.write_atomic(str(tmp_path / "a.json"), "{}")
    with open(tmp_path / "b.json", "w") as f:
      f.write("{}")
  finally:
    os.umask(previous)
  assert os.stat(tmp_path / "a.json").st_mode & 0o777 == mode == os.stat(tmp_path / "b.json").st_mode & 0o777


def test_repeated_sweep_points_run_once_and_distinct_points_never_share_a_directory():
  drawn = [{"optim.lr": 0.01, "model.mlp": "swiglu"}] * 3 + [{"optim.lr": 0.01, "model.mlp": "gelu"}]
  assert sweep.distinct_points(drawn) == [drawn[0], drawn[3]]
  similar = [
    {"data.text_files": "a/b.txt"},
    {"data.text_files": "a-b.txt"},
    {"train.sample_prompt": "a b"},
    {"train.sample_prompt": "ab"},
    {f"optim.f{i}": 1e-3 for i in range(40)},
  ]
  names = [sweep.point_name(p) for p in similar]
  assert len(set(names)) == len(names) and all(len(n.encode()) <= 200 and "/" not in n for n in names)
  assert sweep.distinct_points(similar) == similar


# ---------------------------------------------------------------- 3. interrupted is not finished


def _fake_run(tmp_path, steps_in_config, finished_steps=None, val_loss=2.0):
  workdir = tmp_path / f"p{steps_in_config}_{finished_steps}"
  workdir.mkdir()
  cfg = tiny_config("unused.txt", "unused")
  cfg.train.steps = steps_in_config
  rundir.write_config(cfg, str(workdir))
  rundir.write_model(str(workdir), config_lib.model_config(cfg, vocab_size=20))  # as every run writes it
  (workdir / "metrics.jsonl").write_text(
    json.dumps({"step": finished_steps or 5, "val_loss": val_loss}) + "\n"
  )
  if finished_steps is not None:
    rundir.mark_finished(str(workdir), finished_steps, {})
  return str(workdir)


def test_finished_means_reached_the_configured_steps(tmp_path):
  assert rundir.is_finished(_fake_run(tmp_path, 40, 40))
  assert not rundir.is_finished(_fake_run(tmp_path, 60, 40))  # extended after finishing
  assert not rundir.is_finished(_fake_run(tmp_path, 40))  # interrupted: no marker
  # The scaling fit reads only the finished one of three runs.
  assert [p[2] for p in scaling.finished_runs(str(tmp_path))] == ["p40_40"]


def test_a_finished_point_reruns_when_the_experiment_asks_for_more_steps(tmp_path, monkeypatch):
  experiment = tmp_path / "exp.py"
  experiment.write_text(
    "import importlib.util\n"
    f"spec = importlib.util.spec_from_file_location('tiny', {TINY_EXPERIMENT!r})\n"
    "tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)\n"
    "def get_config(variant=''):\n  return tiny.get_config()\n"
  )  # train.steps = 40
  point = {"optim.lr": 0.1}
  workdir = tmp_path / "sweep" / sweep.point_name(point)
  workdir.mkdir(parents=True)
  cfg = tiny_config("unused.txt", "unused", steps=20)
  rundir.write_config(cfg, str(workdir))
  rundir.mark_finished(str(workdir), 20, {})
  monkeypatch.setattr(sweep, "point_command", lambda *a: [sys.executable, "-c", "import sys; sys.exit(3)"])
  ran = sweep.run_point(str(experiment), str(tmp_path / "sweep"), point)  # finished at 20, asked for 40
  assert ran["status"] == "failed" and ran["error"] == "exit code 3"
  rundir.write_config(tiny_config("unused.txt", "unused", steps=40), str(workdir))
  rundir.mark_finished(str(workdir), 40, {})
  assert sweep.run_point(str(experiment), str(tmp_path / "sweep"), point)["status"] == "ok"  # skipped: done
  files_lib.write_json(str(workdir / sweep.POINT_FILE), {"overrides": {"optim.lr": 0.2}, "wall_s": 1.0})
  other = sweep.run_point(str(experiment), str(tmp_path / "sweep"), point)
  assert other["status"] == "failed" and "holds another point" in other["error"]


@pytest.mark.parametrize(
  "script, status",
  [
    ("import sys; sys.exit(143)", "interrupted"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "interrupted"),
    ("pass", "failed"),  # exit 0 without reaching train.steps is not a result
    ("raise SystemExit('boom')", "failed"),
  ],
)
def test_sweep_records_a_point_by_how_it_ended(tmp_path, monkeypatch, script, status):
  monkeypatch.setattr(sweep, "point_command", lambda *a: [sys.executable, "-c", script])
  record = sweep.run_point("unused.py", str(tmp_path), {"optim.lr": 0.1})
  assert record["status"] == status, record


def test_a_failure_of_the_runner_is_that_points_failure(tmp_path, monkeypatch):
  def broken(*args):
    raise OSError(36, "File name too long")

  monkeypatch.setattr(sweep, "point_command", broken)
  record = sweep.run_point("unused.py", str(tmp_path), {"optim.lr": 0.1})
  assert record["status"] == "failed" and "File name too long" in record["error"]


# ---------------------------------------------------------------- 4. what is known at start is
# checked at start


@pytest.mark.parametrize(
  "field, value",
  [
    ("train.grad_accum", 0),
    ("train.eval_every", 0),
    ("train.log_every", 0),
    ("train.ckpt_every", 0),
    ("train.batch_size", 0),
    ("train.seq_len", 0),
    ("train.eval_steps", 0),
    ("train.steps", 0),
    ("optim.lr", -0.01),
    ("optim.b2", 1.0),
    ("optim.grad_clip", 0.0),
    ("data.val_fraction", 1.0),
    ("finetune.lora_rank", 0),
    ("model.rope_theta", 0.0),
    ("optim.lr", float("nan")),
    ("optim.weight_decay", float("inf")),
    ("train.peak_tflops", float("nan")),
  ],
)
def test_out_of_range_values_name_the_field(tmp_path, corpus_file, field, value):
  cfg = tiny_config(corpus_file, str(tmp_path))
  section, key = field.split(".")
  cfg[section][key] = value
  with pytest.raises(errors.ConfigError, match=f"{field}={value}"):
    config_lib.validate(cfg)


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"data.tokenizer": "wordpiece"}, "data.tokenizer='wordpiece' is not supported"),
    ({"finetune.mode": "lora", "finetune.lora_targets": "q,x"}, "finetune.lora_targets='x' is not supported"),
    ({"finetune.task": "qna"}, "finetune.task='qna' is not supported"),
    ({"finetune.mode": "dora"}, "finetune.mode='dora' is not supported"),
    ({"mesh.shape": (0, 1, 1)}, r"mesh.shape=\(0, 1, 1\) must give one size per axis"),
    ({"data.tokenizer": "bpe", "data.vocab_size": 0}, "needs data.vocab_size"),
    ({"optim.min_lr": 0.5}, "optim.min_lr=0.5 exceeds optim.lr"),
  ],
)
def test_bad_choices_and_combinations_name_the_field(tmp_path, corpus_file, overrides, message):
  cfg = tiny_config(corpus_file, str(tmp_path))
  for field, value in overrides.items():
    section, key = field.split(".")
    cfg[section][key] = value
  with pytest.raises(errors.ConfigError, match=message):
    config_lib.validate(cfg)
    preflight.check_finetune_options(cfg)


@pytest.mark.slow
def test_bad_value_on_the_command_line_exits_2_without_traceback(tmp_path, corpus_file):
  workdir = tmp_path / "run"
  result = run_lmjax(
    "train",
    *tiny_flags(corpus_file, str(tmp_path), str(workdir), "--config.train.grad_accum=0"),
    env=ENV,
    timeout=120,
  )
  assert result.returncode == 2
  assert "error: train.grad_accum=0 is out of range: it must be >= 1" in result.stderr
  assert "Traceback" not in result.stderr and not workdir.exists()


def test_sizes_implied_by_data_mesh_and_prompt_are_checked_before_training(tmp_path, corpus_file):
  data_dir = str(tmp_path / "tfds")
  short_val = tiny_config(corpus_file, data_dir, seq_len=256)
  short_val.data.val_fraction = 0.001  # 9 validation characters for a 257-token row
  # The hint offers data.val_fraction only where it sets the split (a text source, no val_file).
  with pytest.raises(
    errors.ConfigError, match="validation split holds no complete sequence.*raise data.val_fraction"
  ):
    train.train(short_val, str(tmp_path / "a"))
  long_prompt = tiny_config(corpus_file, data_dir, sample_prompt="ROMEO: " * 10)
  with pytest.raises(errors.ConfigError, match="train.sample_prompt is 70 tokens.*context of 32"):
    train.train(long_prompt, str(tmp_path / "b"))
  for directory in ("a", "b"):
    assert checkpoint.step_dirs(str(tmp_path / directory)) == []
  two_devices = tiny_config(corpus_file, data_dir)
  two_devices.mesh.shape = (len(jax.devices()) + 1, 1, 1)
  with pytest.raises(errors.ConfigError, match="needs .* devices"):
    preflight.mesh_for(two_devices)
  search = tiny_config(corpus_file, data_dir, grad_accum=2)
  search.finetune.task = "search"
  with pytest.raises(errors.ConfigError, match="grad_accum > 1 cannot be used with finetune.task='search'"):
    config_lib.validate(search)


# ---------------------------------------------------------------- 7. accumulation equals the full batch


@pytest.mark.slow
def test_masked_loss_accumulates_to_the_full_batch_token_mean():
  cfg = model.ModelConfig(vocab_size=50, max_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64)
  optim = config_lib.base_config().optim
  optim.update(lr=1e-2, warmup_steps=0)
  optimizer, schedule = train.make_optimizer(optim, 10, train.param_roles(cfg))
  mesh = sharding.make_mesh((1, 1, 1))
  batch_sh = sharding.batch_sharding(mesh, sharding.DEFAULT_RULES)
  _, shardings = train.state_shardings(cfg, optimizer, mesh, sharding.DEFAULT_RULES)
  rng = np.random.default_rng(0)
  inputs, targets = (rng.integers(0, 50, (4, 16)).astype(np.int32) for _ in range(2))
  mask = np.zeros((4, 16), np.float32)
  for row, n in enumerate([14, 12, 2, 1]):  # the micro-batches hold very different numbers of response tokens
    mask[row, 16 - n :] = 1.0
  batch = {"inputs": inputs, "targets": targets, "mask": mask}
  params0 = jax.device_get(train.init_state(cfg, optimizer, 0, shardings).params)
  logits = np.asarray(model.Transformer(cfg).apply({"params": params0}, inputs), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  token_loss = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  reference = float((token_loss * mask).sum() / mask.sum())  # numpy, one pass over the whole batch
  params = {}
  for accum in (1, 2, 4):
    step = train.make_train_step(cfg, optimizer, schedule, 0, accum, shardings, batch_sh)
    state, metrics = step(train.init_state(cfg, optimizer, 0, shardings), batch, None)
    assert float(metrics["loss"]) == pytest.approx(reference, abs=1e-5), accum
    params[accum] = jax.device_get(state.params)
  for accum in (2, 4):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params[accum], params[1])
  loss_sum, weight = train.make_eval_step(cfg, shardings.params, batch_sh)(params0, batch, None)
  assert float(weight) == mask.sum() and float(loss_sum) / float(weight) == pytest.approx(reference, abs=1e-5)


# ---------------------------------------------------------------- 8. provenance of a LoRA base


@pytest.mark.slow
def test_lora_run_keeps_the_exact_base_it_was_trained_on(tmp_path, corpus_file):
  data_dir, base = str(tmp_path / "tfds"), str(tmp_path / "base")
  train.train(tiny_config(corpus_file, data_dir, steps=10, num_samples=0), base)
  sft = tmp_path / "sft.jsonl"
  sft.write_text(
    "".join(json.dumps({"prompt": f"ROMEO {'ab'[i % 2]}:", "response": " soft\n"}) + "\n" for i in range(20))
  )
  lora_cfg = tiny_config(corpus_file, data_dir, steps=4, eval_every=4, num_samples=0, ckpt_every=4)
  lora_cfg.init.from_checkpoint = base
  lora_cfg.finetune.update(train_file=str(sft), mode="lora")
  train.train(lora_cfg, str(tmp_path / "lora"))
  with open(tmp_path / "lora" / "model.json") as f:
    recorded = json.load(f)["base"]
  assert recorded["workdir"] == base and recorded["step"] == 10
  saved = checkpoint.load_params(os.path.join(base, "checkpoints", "10"))
  digest = hashlib.sha256()  # the fingerprint's definition, written out: sorted paths, dtype, shape, bytes
  for path, leaf in sorted(
    jax.tree_util.tree_flatten_with_path(saved)[0], key=lambda pl: jax.tree_util.keystr(pl[0])
  ):
    leaf = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape};".encode() + leaf.tobytes())
  assert recorded["params_sha256"] == digest.hexdigest()
  merged = jax.device_get(LanguageModel.from_workdir(str(tmp_path / "lora")).params)
  train.train(tiny_config(corpus_file, data_dir, steps=20, num_samples=0), base)  # the base trains on
  again = jax.device_get(LanguageModel.from_workdir(str(tmp_path / "lora")).params)
  jax.tree.map(np.testing.assert_array_equal, again, merged)
  os.rename(os.path.join(base, "checkpoints", "10"), str(tmp_path / "aside"))
  with pytest.raises(FileNotFoundError, match=r"trained on step 10 of .*no longer there"):
    LanguageModel.from_workdir(str(tmp_path / "lora"))
  os.rename(os.path.join(base, "checkpoints", "20"), os.path.join(base, "checkpoints", "10"))  # other weights
  with pytest.raises(ValueError, match="base weights this run was trained on .* have changed"):
    LanguageModel.from_workdir(str(tmp_path / "lora"))


# ---------------------------------------------------------------- 9. no silent schedule change


def _cosine(step, total, peak=1e-2, end=1e-3, warmup=5):  # tiny experiment's optimizer settings
  if step < warmup:
    return peak * step / warmup
  return end + (peak - end) * 0.5 * (
    1 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup))
  )


@pytest.mark.slow
def test_extending_a_run_announces_the_new_schedule_and_can_keep_the_old(tmp_path, corpus_file, capsys):
  data_dir = str(tmp_path / "tfds")
  for name in ("extended", "kept"):
    train.train(tiny_config(corpus_file, data_dir, steps=20, num_samples=0), str(tmp_path / name))
  capsys.readouterr()
  train.train(tiny_config(corpus_file, data_dir, steps=30, num_samples=0), str(tmp_path / "extended"))
  note = capsys.readouterr().out
  now, before = map(
    float, re.search(r"at step 20 the learning rate is (\S+) instead of (\S+) ", note).groups()
  )
  assert now == pytest.approx(_cosine(20, 30), rel=1e-3) and before == pytest.approx(
    _cosine(20, 20), rel=1e-3
  )
  assert "--config.optim.decay_steps=20" in note
  kept = tiny_config(corpus_file, data_dir, steps=30, num_samples=0)
  kept.optim.decay_steps = 20
  train.train(kept, str(tmp_path / "kept"))
  assert "schedule changed" not in capsys.readouterr().out
  with open(tmp_path / "kept" / "metrics.jsonl") as f:
    lr = {r["step"]: r["lr"] for r in map(json.loads, f)}
  for step in (21, 25, 30):  # the logged lr of step s is the schedule at s - 1
    assert lr[step] == pytest.approx(_cosine(step - 1, 20), rel=1e-5)


def test_configs_saved_with_the_old_unset_values_read_as_unset():
  """Optional fields are None until set; config.json files written when they were 0 / '' resume
  and rebuild the same model."""
  legacy = json.loads(config_lib.base_config().to_json_best_effort())
  legacy["model"].update(n_kv_heads=0, head_dim=0, sliding_window=0, matmul_dtype="")
  legacy["optim"]["decay_steps"], legacy["data"]["vocab_size"] = 0, 0
  saved = ml_collections.ConfigDict(legacy)
  assert resume.resume_differences(saved, config_lib.base_config()) == []
  assert config_lib.model_config(saved, 10) == config_lib.model_config(config_lib.base_config(), 10)
  assert config_lib.base_config().model.n_kv_heads is None
