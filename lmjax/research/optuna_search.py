"""Bayesian search with Optuna's TPE sampler, the study kept in the sweep directory.

    lmjax-sweep --config=experiments/shakespeare_char.py --workdir=runs/tpe --search=optuna --trials=20

The experiment file defines `get_search_space()`: {field: values}, where a list is a choice and a
(low, high) tuple a log-uniform range (integers when both ends are; the format of
`sweep.random_search`). Each trial is an ordinary sweep point (`sweep.run_point`) in its own
subdirectory, and its objective is the point's final validation loss.

The study lives in DIR/optuna.journal (Optuna's JournalStorage: an append-only file, safe for the
several threads of `--parallel`). Re-running the command resumes it: finished trials stay, a trial
left RUNNING by a killed sweep is run again with its own parameters (its point resumes from its
checkpoint), and new trials are asked for until the study holds `--trials`. Raising `--trials`
extends a finished study. With `--parallel=1` and a fixed `--seed` the trials' parameters are
reproducible when the sweep runs uninterrupted; parallel trials depend on the order they finish in
(TPE's constant liar stands in for the running ones). Source: Bergstra et al. 2011, "Algorithms for
hyper-parameter optimization"; Akiba et al. 2019, "Optuna".
"""

from __future__ import annotations

import math
import os
import threading

from lmjax.core import files
from lmjax.research import devices, sweep
from lmjax.train import metrics_log

STUDY_FILE = "optuna.journal"
STUDY_NAME = "lmjax-sweep"


def check_space(space) -> None:
  """Raises ValueError unless `space` is {field: list of choices | (low, high) with 0 < low < high}."""
  if not isinstance(space, dict) or not space:
    raise ValueError("get_search_space() must return a non-empty dict {field: [choices] or (low, high)}")
  for key, values in space.items():
    if isinstance(values, tuple):
      if len(values) != 2 or not 0 < values[0] < values[1]:
        raise ValueError(f"search space {key}: a range is (low, high) with 0 < low < high, got {values}")
    elif not isinstance(values, list) or not values:
      raise ValueError(f"search space {key}: give a list of choices or a (low, high) range, got {values!r}")


def suggest(trial, space: dict) -> dict:
  """The trial's overrides, drawn by its sampler from `space` (in the space's field order)."""
  point = {}
  for key, values in space.items():
    if isinstance(values, list):
      point[key] = trial.suggest_categorical(key, values)
    elif all(isinstance(v, int) for v in values):
      point[key] = trial.suggest_int(key, values[0], values[1], log=True)
    else:
      point[key] = trial.suggest_float(key, float(values[0]), float(values[1]), log=True)
  return point


def final_val_loss(workdir: str) -> float | None:
  """The point's last validation loss (None when it has none)."""
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return None
  evals = [r["val_loss"] for r in metrics_log.read_metrics(workdir) if "val_loss" in r]
  return evals[-1] if evals else None


def load_study(sweep_dir: str, seed: int, startup_trials: int):
  """The sweep directory's study (created on first use), minimizing validation loss with TPE."""
  import optuna

  optuna.logging.set_verbosity(optuna.logging.WARNING)
  storage = optuna.storages.JournalStorage(
    optuna.storages.journal.JournalFileBackend(os.path.join(sweep_dir, STUDY_FILE))
  )
  sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
  return optuna.create_study(
    study_name=STUDY_NAME, storage=storage, sampler=sampler, direction="minimize", load_if_exists=True
  )


def run_optuna(
  config: str,
  sweep_dir: str,
  space: dict,
  trials: int,
  seed: int = 0,
  startup_trials: int = 10,
  parallel: int = 1,
  devices_per_point: int = 0,
  base: dict | None = None,
) -> int:
  """Runs (or resumes) the study in `sweep_dir` until it holds `trials` trials, then reports every
  trial as a sweep point (sweep.report; DIR/optuna_history.png: each trial's loss and the best so
  far) and returns the sweep's exit status. `startup_trials`: random trials before TPE models the
  results. `parallel`, `devices_per_point`, `base`: as sweep.run_sweep.
  Raises ValueError for a malformed `space` or `trials` < 1, and as sweep.run_sweep."""
  import optuna

  check_space(space)
  if trials < 1:
    raise ValueError(f"--trials={trials}: a study needs at least one trial")
  platform, node = devices.node_devices()
  slot_envs = devices.slot_environments(platform, node, parallel, devices_per_point)
  with files.lock(sweep_dir):
    sweep.record_base(sweep_dir, base or {})
    study = load_study(sweep_dir, seed, startup_trials)
    # Trials a killed sweep left running: their points resume from their checkpoints.
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    asking, stopped = threading.Lock(), threading.Event()

    def next_trial():
      with asking:
        if stopped.is_set():
          return None
        if stale:
          trial = stale.pop(0)
          return trial.number, {k: trial.params[k] for k in space if k in trial.params}
        if len(study.get_trials(deepcopy=False)) >= trials:
          return None
        trial = study.ask()
        return trial.number, suggest(trial, space)

    def worker(env):
      while (job := next_trial()) is not None:
        number, point = job
        record = sweep.run_point(config, sweep_dir, point, env, base)
        loss = final_val_loss(record["workdir"]) if record["status"] == "ok" else None
        if record["status"] == "interrupted":
          stopped.set()  # a signal: the trial stays RUNNING and resumes on the next run
        elif loss is not None and math.isfinite(loss):
          study.tell(number, loss)
        else:
          study.tell(number, state=optuna.trial.TrialState.FAIL)

    threads = [threading.Thread(target=worker, args=(env,)) for env in slot_envs]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    done = study.get_trials(deepcopy=False)
  status = {"COMPLETE": "ok", "FAIL": "failed", "RUNNING": "interrupted"}
  records = []
  for t in sorted(done, key=lambda t: t.number):
    point = {k: t.params[k] for k in space if k in t.params}
    state = status.get(t.state.name, "failed")
    error = "" if state == "ok" else f"trial {t.number}: {t.state.name}"
    records.append(sweep.point_record(sweep_dir, point, state, error))
  _plot_history(sweep_dir, [t.value for t in sorted(done, key=lambda t: t.number)])
  return sweep.report(config, sweep_dir, records, list(space))


def _plot_history(sweep_dir: str, values: list) -> str:
  """Each trial's final validation loss in order, and the best so far (Optuna's history plot)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  xs = [i for i, v in enumerate(values) if v is not None]
  ys = [values[i] for i in xs]
  ax.plot(xs, ys, "o", label="trial")
  best = [min(ys[: j + 1]) for j in range(len(ys))]
  ax.step(xs, best, where="post", label="best so far")
  ax.set(xlabel="trial", ylabel="final validation loss", title="Optuna TPE search")
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.path.join(sweep_dir, "optuna_history.png")
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path
