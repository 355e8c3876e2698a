"""Bayesian search with Optuna's TPE sampler, the study kept in the sweep directory.

    lmjax-sweep --config=experiments/asha_shakespeare.py --workdir=runs/tpe --search=optuna --trials=20

The experiment file defines `get_search_space()`: {field: values}, where a list is a choice and a
(low, high) tuple a log-uniform range (integers when both ends are; the format of
`sweep.random_search`). Each trial is an ordinary sweep point (`sweep.run_point`) in its own
subdirectory, and its objective is the point's final validation loss.

The study lives in DIR/optuna.journal (Optuna's JournalStorage: an append-only file, safe for the
several threads of `--parallel`), with its search space (a different space is refused). Re-running
the command resumes it: finished trials stay, a trial left RUNNING by a killed sweep is run again
with its own parameters (its point resumes from its checkpoint), and new trials are asked for until
the study holds `--trials`. Raising `--trials` extends a finished study. With `--parallel=1` and a
fixed `--seed` the trials' parameters are reproducible when the sweep runs uninterrupted; parallel
trials depend on the order they finish in (TPE's constant liar stands in for the running ones).
Sources: Bergstra et al. 2011, "Algorithms for hyper-parameter optimization"; Akiba et al. 2019,
"Optuna".
"""

from __future__ import annotations

import json
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
    elif len({json.dumps(v) for v in values}) < len(values):
      raise ValueError(f"search space {key}: the choices {values} repeat a value; list each once")


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
  losses = metrics_log.val_losses(workdir)
  return losses[max(losses)] if losses else None


def load_study(sweep_dir: str, seed: int, startup_trials: int):
  """The sweep directory's study (created on first use), minimizing validation loss with TPE. The
  sampler's seed is `seed` plus the trials the study holds, so a resumed or extended study draws new
  points instead of repeating its first ones."""
  import optuna

  optuna.logging.set_verbosity(optuna.logging.WARNING)
  storage = optuna.storages.JournalStorage(
    optuna.storages.journal.JournalFileBackend(os.path.join(sweep_dir, STUDY_FILE))
  )
  study = optuna.create_study(
    study_name=STUDY_NAME, storage=storage, direction="minimize", load_if_exists=True
  )
  study.sampler = optuna.samplers.TPESampler(
    seed=seed + len(study.get_trials(deepcopy=False)), n_startup_trials=startup_trials, constant_liar=True
  )
  return study


def _check_study_space(study, space: dict) -> None:
  """Records the search space in a new study; raises ValueError when the study was made with another
  (its trials' parameters would not be points of this one)."""
  text = json.dumps(space, sort_keys=True)
  saved = study.user_attrs.get("space")
  if saved is None:
    study.set_user_attr("space", text)
  elif saved != text:
    raise ValueError(
      f"the study in this sweep directory searched {saved}, not {text}: use another --workdir for a new "
      "search space"
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
  results. `parallel` (at most the trials left), `devices_per_point`, `base`: as sweep.run_sweep.
  Two trials that draw the same point never train it at once: the second waits and then reads the
  first one's result.
  Raises ValueError for a malformed `space`, `trials` < 1, a study made with another space, or an
  error inside the search itself (Optuna's), and as sweep.run_sweep."""
  import optuna

  check_space(space)
  if trials < 1:
    raise ValueError(f"--trials={trials}: a study needs at least one trial")
  running = optuna.trial.TrialState.RUNNING
  with files.lock(sweep_dir):
    sweep.record_base(sweep_dir, base or {})
    study = load_study(sweep_dir, seed, startup_trials)
    _check_study_space(study, space)
    stale = []  # trials a killed sweep left running: their points resume from their checkpoints
    for t in study.get_trials(deepcopy=False, states=(running,)):
      if set(t.params) == set(space):
        stale.append((t.number, {k: t.params[k] for k in space}))
      else:  # killed while its parameters were being drawn
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    left = max(1, len(stale) + trials - len(study.get_trials(deepcopy=False)))
    platform, node = devices.node_devices()
    slot_envs = devices.slot_environments(platform, node, min(parallel, left), devices_per_point)
    turn, in_flight, failures = threading.Condition(), set(), []

    def next_trial():
      with turn:
        if failures:
          return None
        if stale:
          return stale.pop(0)
        if len(study.get_trials(deepcopy=False)) >= trials:
          return None
        trial = study.ask()
        return trial.number, suggest(trial, space)

    def run_trial(number, point, env):
      name = sweep.point_name(point)
      with turn:  # the same point drawn twice: the second waits for the first's result
        turn.wait_for(lambda: name not in in_flight)
        in_flight.add(name)
      try:
        record = sweep.run_point(config, sweep_dir, point, env, base)
      finally:
        with turn:
          in_flight.discard(name)
          turn.notify_all()
      loss = final_val_loss(record["workdir"]) if record["status"] == "ok" else None
      if record["status"] == "interrupted":  # a signal: the trial stays RUNNING, resumed next time
        with turn:
          failures.append(None)
      elif loss is not None and math.isfinite(loss):
        study.tell(number, loss)
      else:
        study.tell(number, state=optuna.trial.TrialState.FAIL)

    def worker(env):
      try:
        while (job := next_trial()) is not None:
          run_trial(*job, env)
      except Exception as err:  # Optuna's own errors: stop asking, report after the others finish
        with turn:
          failures.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=worker, args=(env,)) for env in slot_envs]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    errors = [f for f in failures if f]
    if errors:
      raise ValueError(f"the Optuna search stopped: {errors[0]}; re-run to resume the study")
    done = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
  status = {"COMPLETE": "ok", "FAIL": "failed", "RUNNING": "interrupted"}
  records = []
  for t in done:
    point = {k: t.params[k] for k in space if k in t.params}
    state = status.get(t.state.name, "failed")
    records.append(sweep.point_record(sweep_dir, point, state, _trial_error(sweep_dir, t, point, state)))
  _plot_history(sweep_dir, [t.value for t in done])
  return sweep.report(config, sweep_dir, records, list(space))


def _trial_error(sweep_dir: str, trial, point: dict, state: str) -> str:
  """What went wrong with a trial that did not complete: its run's last log line, when it has one."""
  if state == "ok":
    return ""
  log = os.path.join(sweep_dir, sweep.point_name(point), "sweep_log.txt")
  lines = []
  if os.path.exists(log):
    with open(log, encoding="utf-8", errors="replace") as f:
      lines = [line.strip() for line in f if line.strip()]
  return f"trial {trial.number} {trial.state.name}" + (f": {lines[-1][:300]}" if lines else "")


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
