"""Searches that choose which points train how long: successive halving and Optuna's TPE."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from test_sweep import ENV, run_sweep, write_experiment

from lmjax.research import halving, optuna_search, sweep
from lmjax.run import rundir

from conftest import REPO, TINY_EXPERIMENT


def test_promotion_keeps_the_best_fraction_ties_by_name_failures_never():
  # Hand-computed: 9 points, eta 3 -> floor(9 / 3) = 3 go on. Sorted by loss: b 1.5, d 1.5 (tie: by
  # name), h 1.6, f 1.8, ... ; c (NaN) and e (failed) count among the 9 but are never promoted.
  losses = {"a": 2.0, "b": 1.5, "c": math.nan, "d": 1.5, "e": None, "f": 1.8, "g": 3.0, "h": 1.6, "i": 2.5}
  assert halving.promote(losses, eta=3) == ["b", "d", "h"]
  assert halving.promote({"x": 2.0, "y": None, "z": 1.0}, eta=2) == ["z"]  # floor(3/2) = 1
  assert halving.promote({"x": 2.0}, eta=3) == ["x"]  # at least one goes on
  assert halving.promote({"x": None, "y": math.inf}, eta=2) == []


def test_rungs_end_at_fractions_of_the_budget():
  assert halving.rung_steps(2000, eta=3, rungs=3) == [222, 666, 2000]
  assert halving.rung_steps(8, eta=2, rungs=2) == [4, 8]
  with pytest.raises(ValueError, match="do not fit train.steps=8"):
    halving.rung_steps(8, eta=3, rungs=3)
  with pytest.raises(ValueError, match="eta >= 2"):
    halving.rung_steps(100, eta=1, rungs=2)


def test_halving_refuses_points_that_set_the_budget_and_rungs_that_do_not_fit(tmp_path):
  with pytest.raises(ValueError, match="a point of get_sweep\\(\\) sets it"):
    halving.run_halving(TINY_EXPERIMENT, str(tmp_path), [{"train.steps": 10}], eta=2, rungs=2)
  with pytest.raises(ValueError, match="do not fit train.steps=40"):  # the tiny experiment's 40 steps
    halving.run_halving(TINY_EXPERIMENT, str(tmp_path), [{"optim.lr": 0.01}], eta=4, rungs=4)
  assert not os.listdir(tmp_path)  # refused before anything is written


def test_search_space_checks_and_integer_ranges():
  space = {"optim.lr": (1e-4, 1e-2), "model.n_layers": (1, 8), "model.mlp": ["gelu", "swiglu"]}
  optuna_search.check_space(space)
  point = optuna_search.suggest(
    optuna.trial.FixedTrial({"optim.lr": 3e-3, "model.n_layers": 4, "model.mlp": "gelu"}), space
  )
  assert point == {"optim.lr": 3e-3, "model.n_layers": 4, "model.mlp": "gelu"}
  drawn = sweep.random_search({"model.n_layers": (1, 8)}, count=200, seed=0)
  assert all(isinstance(p["model.n_layers"], int) and 1 <= p["model.n_layers"] <= 8 for p in drawn)
  assert {p["model.n_layers"] for p in drawn} == set(range(1, 9))
  for bad, message in [
    ({}, "non-empty"),
    ({"optim.lr": (1e-2, 1e-4)}, "0 < low < high"),
    ({"x": 3}, "list of"),
  ]:
    with pytest.raises(ValueError, match=message):
      optuna_search.check_space(bad)


def _val_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


@pytest.mark.slow
def test_halving_promotes_by_rung_loss_and_resumes_exactly(tmp_path, corpus_file):
  lrs = [0.03, 0.01, 0.003, 0.001]
  config = write_experiment(tmp_path, corpus_file, f'{{"optim.lr": {lrs}}}')
  workdir = str(tmp_path / "sh")
  args = ("--search=halving", "--eta=2", "--rungs=2", "--parallel=2")
  first = run_sweep(config, workdir, *args)
  assert first.returncode == 0, first.stderr[-2000:]
  dirs = {lr: os.path.join(workdir, sweep.point_name({"optim.lr": lr})) for lr in lrs}
  at_rung = {lr: _val_losses(d)[3] for lr, d in dirs.items()}  # rungs of train.steps=6: [3, 6]
  best_two = sorted(lrs, key=lambda lr: at_rung[lr])[:2]
  with open(os.path.join(workdir, halving.RUNGS_FILE)) as f:
    rungs = json.load(f)
  assert [r["steps"] for r in rungs["rungs"]] == [3, 6]
  promoted = {p["point"] for p in rungs["rungs"][0]["points"] if p["promoted"]}
  assert promoted == {sweep.point_name({"optim.lr": lr}) for lr in best_two}
  for lr, d in dirs.items():
    assert max(_val_losses(d)) == (6 if lr in best_two else 3)
  assert rungs["steps_trained"] == 2 * 6 + 2 * 3 and rungs["grid_steps"] == 4 * 6
  # A promoted point is the run it would have been without stopping: the same as a plain 6-step run.
  plain = str(tmp_path / "plain")
  done = subprocess.run(
    [sys.executable, "-m", "lmjax.cli.train", f"--config={config}", f"--workdir={plain}",
     f"--config.optim.lr={best_two[0]}"],
    cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-2000:]
  assert _val_losses(plain)[6] == _val_losses(dirs[best_two[0]])[6]
  again = run_sweep(config, workdir, *args)  # all rungs reached: nothing trains again
  assert again.returncode == 0
  for d in dirs.values():
    with open(os.path.join(d, "sweep_log.txt")) as f:
      assert f.read().count("starting at step 0") == 1


@pytest.mark.slow
def test_optuna_study_resumes_after_the_sweep_is_killed(tmp_path, corpus_file):
  config = write_experiment(tmp_path, corpus_file, "{}")
  with open(config, "a") as f:
    f.write('\ndef get_search_space():\n  return {"optim.lr": (1e-3, 3e-2)}\n')
  workdir = str(tmp_path / "tpe")
  args = ["--search=optuna", "--trials=3", "--startup_trials=2", "--config.train.steps=200",
          "--config.train.ckpt_every=5", "--config.train.eval_every=20"]  # fmt: skip
  cmd = [sys.executable, "-m", "lmjax.cli.sweep", f"--config={config}", f"--workdir={workdir}", *args]
  proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL)
  deadline = time.time() + 300
  study = None
  while time.time() < deadline:  # kill the sweep and its trial mid-way through the second trial
    time.sleep(0.2)
    if os.path.exists(os.path.join(workdir, optuna_search.STUDY_FILE)):
      study = optuna_search.load_study(workdir, seed=0, startup_trials=2)
      trials = study.get_trials()
      if len(trials) == 2 and trials[1].state.name == "RUNNING":
        second = os.path.join(workdir, sweep.point_name(trials[1].params))
        if rundir.steps(second):  # a finished checkpoint, not Orbax's temporary directory
          break
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  before = optuna_search.load_study(workdir, seed=0, startup_trials=2).get_trials()
  assert [t.state.name for t in before] == ["COMPLETE", "RUNNING"]
  resumed = run_sweep(config, workdir, *args)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  after = optuna_search.load_study(workdir, seed=0, startup_trials=2).get_trials()
  assert [t.state.name for t in after] == ["COMPLETE"] * 3
  assert after[0].value == before[0].value and after[1].params == before[1].params
  with open(os.path.join(workdir, sweep.point_name(after[1].params), "sweep_log.txt")) as f:
    log = f.read()
  assert "resumed from step" in log and log.count("starting at step 0") == 1
  for t in after:  # each trial's objective is its point's final validation loss
    assert t.value == _val_losses(os.path.join(workdir, sweep.point_name(t.params)))[200]
  assert os.path.getsize(os.path.join(workdir, "optuna_history.png")) > 0


def fake_runs(monkeypatch, loss_of, fail=()):
  """sweep.run_point replaced by a run that writes what a finished lmjax-train run would (metrics.jsonl
  with a val loss at its train.steps, finished.json), in milliseconds; `loss_of(point)` gives the
  loss, a point in `fail` fails. Returns the list of (point, train.steps) runs."""
  runs = []

  def run_point(config, sweep_dir, overrides, env=None, base=None):
    workdir = os.path.join(sweep_dir, sweep.point_name(overrides))
    steps = (base or {}).get("train.steps", 40)
    runs.append((overrides, steps))
    os.makedirs(workdir, exist_ok=True)
    if sweep.point_name(overrides) in fail:
      return {"overrides": overrides, "workdir": workdir, "status": "failed", "error": "boom"}
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"step": steps, "val_loss": loss_of(overrides) + 1.0 / steps}) + "\n")
    with open(os.path.join(workdir, rundir.FINISHED_FILE), "w") as f:
      json.dump({"steps": steps}, f)
    return {"overrides": overrides, "workdir": workdir, "status": "ok"}

  monkeypatch.setattr(sweep, "run_point", run_point)
  monkeypatch.setattr(sweep, "plot_results", lambda *args: [])
  return runs


def test_extending_an_optuna_study_draws_new_points_and_a_new_space_is_refused(tmp_path, monkeypatch):
  runs = fake_runs(monkeypatch, lambda p: abs(math.log(p["optim.lr"] / 3e-3)))
  space = {"optim.lr": (1e-4, 1e-1)}
  assert optuna_search.run_optuna(TINY_EXPERIMENT, str(tmp_path), space, trials=2, startup_trials=1) == 0
  assert optuna_search.run_optuna(TINY_EXPERIMENT, str(tmp_path), space, trials=4, startup_trials=1) == 0
  lrs = [p["optim.lr"] for p, _ in runs]
  assert len(lrs) == 4 and len(set(lrs)) == 4  # the extension did not replay the first draws
  trials = optuna_search.load_study(str(tmp_path), 0, 1).get_trials()
  assert [t.state.name for t in trials] == ["COMPLETE"] * 4
  with pytest.raises(ValueError, match="use another --workdir for a new search space"):
    optuna_search.run_optuna(TINY_EXPERIMENT, str(tmp_path), {"optim.lr": (1e-4, 1e-2)}, trials=5)


def test_halving_stops_failed_points_refuses_other_rungs_and_stops_when_none_is_left(tmp_path, monkeypatch):
  points = [{"optim.lr": lr} for lr in (0.1, 0.01, 0.001, 0.0001)]
  failing = sweep.point_name(points[3])  # the best loss, but its run fails: never promoted
  runs = fake_runs(monkeypatch, lambda p: p["optim.lr"] if p != points[3] else 0.0, fail={failing})
  assert halving.run_halving(TINY_EXPERIMENT, str(tmp_path), points, eta=2, rungs=2) == 0
  assert sorted((p["optim.lr"], steps) for p, steps in runs) == [
    (0.0001, 20), (0.001, 20), (0.001, 40), (0.01, 20), (0.01, 40), (0.1, 20)
  ]  # fmt: skip
  with open(tmp_path / halving.RUNGS_FILE) as f:
    saved = json.load(f)
  assert saved["plan"] == {"eta": 2, "rungs": 2, "steps": [20, 40]}
  with open(tmp_path / "results.csv") as f:
    text = f.read()
  assert "stopped at rung 0, step 20" in text and "boom" in text
  with pytest.raises(ValueError, match="re-run with those to resume it, or use another --workdir"):
    halving.run_halving(TINY_EXPERIMENT, str(tmp_path), points, eta=4, rungs=2)
  everything_fails = {sweep.point_name(p) for p in points}
  runs = fake_runs(monkeypatch, lambda p: 1.0, fail=everything_fails)
  assert halving.run_halving(TINY_EXPERIMENT, str(tmp_path / "all_fail"), points, eta=2, rungs=2) == 0
  assert len(runs) == 4  # rung 0 only: nothing to promote
