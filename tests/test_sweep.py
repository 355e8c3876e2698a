"""Sweep runner: a 2x2 grid on the tiny experiment, results, skipping, failures, commands, SLURM."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from lmjax.research import devices, sweep

from conftest import REPO, TINY_EXPERIMENT

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def write_experiment(tmp_path, corpus_file, grid: str) -> str:
  path = tmp_path / "sweep_experiment.py"
  path.write_text(f"""
import importlib.util
spec = importlib.util.spec_from_file_location("tiny", {TINY_EXPERIMENT!r})
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)

def get_config(variant=""):
  cfg = tiny.get_config()
  cfg.data.text_files = {corpus_file!r}
  cfg.data.data_dir = {str(tmp_path / "tfds")!r}
  cfg.train.update(steps=6, log_every=3, eval_every=3, num_samples=0, ckpt_every=6, peak_tflops=1.0)
  return cfg

def get_sweep():
  return {grid}
""")
  return str(path)


def run_sweep(config, workdir, *extra):
  return subprocess.run(
    [sys.executable, "-m", "lmjax.cli.sweep", f"--config={config}", f"--workdir={workdir}", *extra],
    cwd=REPO,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.mark.slow
def test_grid_sweep_results_skip_and_failure(tmp_path, corpus_file):
  # model.n_heads=3 does not divide d_model=32: that point must fail while the others finish.
  config = write_experiment(tmp_path, corpus_file, '{"optim.lr": [0.01, 0.003], "model.n_heads": [2, 3]}')
  workdir = str(tmp_path / "sweep")
  first = run_sweep(config, workdir, "--parallel=2")
  assert first.returncode == 0, first.stderr[-2000:]
  with open(os.path.join(workdir, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 4
  assert sorted(r["status"] for r in rows) == ["failed", "failed", "ok", "ok"]
  for row in rows:
    if row["model.n_heads"] == "3":
      assert "n_heads=3 must divide" in row["error"]
    else:
      assert row["steps"] == "6" and float(row["final_val_loss"]) > 0
  for name in ("results.md", "val_loss.png", "val_loss_vs_optim.lr.png", "val_loss_vs_model.n_heads.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  second = run_sweep(config, workdir)  # finished points are skipped, not re-run
  assert second.returncode == 0
  ok_dirs = [
    os.path.join(workdir, sweep.point_name({"optim.lr": lr, "model.n_heads": 2})) for lr in (0.01, 0.003)
  ]
  for d in ok_dirs:
    with open(os.path.join(d, "sweep_log.txt")) as f:
      assert f.read().count("starting at step 0") == 1


@pytest.mark.slow
def test_command_line_overrides_apply_to_every_point(tmp_path, corpus_file):
  """--config.FIELD=VALUE on the sweep's command line reaches every point; a rerun with other shared
  overrides, or one that sets a swept field, is refused (exit 2) before anything runs."""
  config = write_experiment(tmp_path, corpus_file, '{"optim.lr": [0.01, 0.003]}')
  workdir = tmp_path / "sweep"
  result = run_sweep(config, str(workdir), "--config.train.steps=3")
  assert result.returncode == 0, result.stderr[-2000:]
  with open(workdir / "results.csv") as f:
    assert [r["steps"] for r in csv.DictReader(f)] == ["3", "3"]
  for lr in (0.01, 0.003):
    saved = json.loads((workdir / sweep.point_name({"optim.lr": lr}) / "config.json").read_text())
    assert saved["train"]["steps"] == 3 and saved["optim"]["lr"] == lr
  other = run_sweep(config, str(workdir), "--config.train.steps=5")
  assert other.returncode == 2 and "holds a sweep run with --config.train.steps=3" in other.stderr
  swept = run_sweep(config, str(tmp_path / "elsewhere"), "--config.optim.lr=0.1")
  assert swept.returncode == 2 and "get_sweep() varies it" in swept.stderr


@pytest.mark.slow
def test_print_commands_and_slurm_script(tmp_path, corpus_file):
  config = write_experiment(
    tmp_path, corpus_file, '[{"optim.lr": 0.01}, {"optim.lr": 0.003}, {"train.steps": 4}, {}]'
  )
  printed = run_sweep(config, str(tmp_path / "s"), "--print_commands")
  commands = printed.stdout.strip().splitlines()
  assert len(commands) == 4 and all("-m lmjax.cli.train" in c and f"--config={config}" in c for c in commands)
  assert "--config.optim.lr=0.003" in commands[1]
  emitted = run_sweep(config, str(tmp_path / "s"), "--emit=slurm", "--slurm_gpus=2")
  script = (tmp_path / "s" / "sweep.sbatch").read_text()
  assert emitted.returncode == 0 and "#SBATCH --array=0-3" in script and "#SBATCH --gpus=2" in script
  assert script.count("--config.optim.lr=") == 2


def test_plots_skip_fields_a_point_does_not_set(tmp_path):
  records = []
  for i, overrides in enumerate([{"model.mlp": "relu"}, {"optim.lr": 0.01}, {"optim.lr": 0.1}]):
    workdir = tmp_path / f"p{i}"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text(f'{{"step": 10, "loss": 2.0, "val_loss": {2.0 - i / 10}}}\n')
    records.append({"overrides": overrides, "workdir": str(workdir), "status": "ok"})
  paths = sweep.plot_results(str(tmp_path), records, ["model.mlp", "optim.lr"])
  assert [os.path.basename(p) for p in paths] == ["val_loss.png", "val_loss_vs_optim.lr.png"]


def test_random_search_is_seeded_and_in_range():
  points = sweep.random_search({"optim.lr": (1e-4, 1e-2), "model.mlp": ["gelu", "swiglu"]}, 6, seed=3)
  assert points == sweep.random_search({"optim.lr": (1e-4, 1e-2), "model.mlp": ["gelu", "swiglu"]}, 6, seed=3)
  assert all(1e-4 <= p["optim.lr"] <= 1e-2 and p["model.mlp"] in ("gelu", "swiglu") for p in points)


def test_each_running_point_gets_devices_of_its_own(monkeypatch):
  """--parallel x --devices_per_point on an 8-GPU node: disjoint CUDA_VISIBLE_DEVICES covering the
  node; TPU chips likewise with a port each; sharing turns GPU preallocation off; clear refusals."""
  gpus = [str(i) for i in range(8)]
  slots = devices.slot_environments("gpu", gpus, 4, 2)
  ids = [env["CUDA_VISIBLE_DEVICES"].split(",") for env in slots]
  assert all(len(i) == 2 for i in ids) and sorted(sum(ids, [])) == gpus
  assert devices.slot_environments("gpu", gpus, 2, 0) == [{"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}] * 2
  assert devices.slot_environments("cpu", [], 2, 0) == [{}, {}]
  tpu = devices.slot_environments("tpu", [str(i) for i in range(4)], 2, 2)
  assert [env["TPU_VISIBLE_CHIPS"] for env in tpu] == ["0,1", "2,3"]
  assert {env["TPU_CHIPS_PER_PROCESS_BOUNDS"] for env in tpu} == {"1,2,1"}
  assert len({env["TPU_MESH_CONTROLLER_PORT"] for env in tpu}) == 2
  # The hints name settings that fit: each keeps one of the two numbers and fits the other.
  with pytest.raises(
    ValueError, match="needs 12 devices; this node has 8 GPUs .* use --parallel=2 or --devices_per_point=2$"
  ):
    devices.slot_environments("gpu", gpus, 3, 4)
  with pytest.raises(ValueError, match="needs GPUs or TPUs"):
    devices.slot_environments("cpu", [], 2, 1)
  with pytest.raises(ValueError, match="holds 1, 2 or 4 chips"):
    devices.slot_environments("tpu", [str(i) for i in range(8)], 2, 3)
  with pytest.raises(ValueError, match="needs --devices_per_point .a TPU chip serves one process"):
    devices.slot_environments("tpu", ["0", "1"], 2, 0)
  with pytest.raises(ValueError, match="use --devices_per_point=4$"):
    devices.slot_environments("gpu", gpus[:4], 1, 8)
  with pytest.raises(ValueError, match="use --devices_per_point=1$"):
    devices.slot_environments("gpu", gpus[:2], 2, 4)
  with pytest.raises(ValueError, match="use --parallel=1 or --devices_per_point=2$"):
    devices.slot_environments("tpu", [str(i) for i in range(6)], 2, 4)  # 6 // 2 = 3 chips: 2 fit
  for platform, count, parallel, per_point in (("gpu", 8, 3, 4), ("gpu", 2, 2, 4), ("tpu", 6, 2, 4)):
    ids = [str(i) for i in range(count)]
    with pytest.raises(ValueError) as refused:
      devices.slot_environments(platform, ids, parallel, per_point)
    for flag, value in re.findall(
      r"--(parallel|devices_per_point)=(\d+)", str(refused.value).split("use ")[-1]
    ):
      fixed = {"parallel": parallel, "devices_per_point": per_point, flag: int(value)}
      assert len(devices.slot_environments(platform, ids, **fixed)) == fixed["parallel"]  # the hint works
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
  assert devices.node_devices() == ("gpu", ["2", "5"])
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # every GPU hidden on purpose
  assert devices.node_devices() == ("gpu", [])


def test_running_points_never_share_a_slot(tmp_path, monkeypatch):
  """run_sweep hands each concurrently running point a slot environment no other running point
  holds (points recorded from inside run_point)."""
  import threading
  import time

  monkeypatch.setattr(devices, "node_devices", lambda: ("gpu", [str(i) for i in range(4)]))
  running, seen, lock = set(), [], threading.Lock()

  def fake_point(config, sweep_dir, point, env, base):
    with lock:
      assert env["CUDA_VISIBLE_DEVICES"] not in running
      running.add(env["CUDA_VISIBLE_DEVICES"])
    time.sleep(0.05)
    with lock:
      running.remove(env["CUDA_VISIBLE_DEVICES"])
      seen.append(env["CUDA_VISIBLE_DEVICES"])
    return {"overrides": point, "workdir": str(tmp_path / str(point["i"])), "wall_s": 0.0, "status": "ok"}

  monkeypatch.setattr(sweep, "run_point", fake_point)
  monkeypatch.setattr(sweep, "experiment_module", lambda config: None)
  assert sweep.run_sweep("unused.py", str(tmp_path), [{"i": i} for i in range(6)], 2, 2) == 0
  assert sorted(set(seen)) == ["0,1", "2,3"] and len(seen) == 6
