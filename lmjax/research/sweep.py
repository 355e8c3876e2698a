"""Hyperparameter sweeps: run every point of an experiment's `get_sweep()`, collect a results table.

    lmjax-sweep --config=experiments/shakespeare_char.py --workdir=runs/lr_sweep [--parallel=2]
    lmjax-sweep ... --print_commands        # one shell command per point, for any scheduler
    lmjax-sweep ... --emit=slurm --slurm_gpus=1 --slurm_time=01:00:00   # sbatch job array

`get_sweep()` returns a grid (`{"optim.lr": [1e-3, 3e-4], "model.n_layers": [2, 4]}`), a list of
override dicts, or `random_search(space, count, seed)`. Each point is an ordinary run of
`lmjax-train` in its own subdirectory (named by its overrides, shortened with a hash when the name
would be too long for the file system), so it resumes from its checkpoint when the sweep is re-run.
A point counts as finished only when its run reached its train.steps (rundir.is_finished): finished
points are skipped; a point stopped by a signal is "interrupted" and resumes on the next sweep; a
failing point, whatever the failure, is recorded with its error and the others go on. Points drawn
twice (random search with choices) run once. Results: DIR/results.csv, DIR/results.md, DIR/val_loss.png
and one DIR/val_loss_vs_<field>.png per swept field. An experiment may also define
`analyze_sweep(sweep_dir)`, called at the end with the sweep directory (the scaling study fits
its power law there).

Two searches decide which points train and for how long, on top of these parts: successive halving
(research/halving.py) and Optuna's TPE (research/optuna_search.py).
"""

from __future__ import annotations

import concurrent.futures
import csv
import glob
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import time

import numpy as np

from lmjax.core import files
from lmjax.research import devices
from lmjax.run import config as config_lib, rundir
from lmjax.train import metrics_log

# The sweep's exit status when a point was stopped by a signal (EX_TEMPFAIL): not done, re-run to resume.
INTERRUPTED_EXIT = 75
POINT_FILE = "sweep_point.json"  # in a point's workdir: its overrides and the wall time spent on it
SWEEP_FILE = "sweep_overrides.json"  # in the sweep directory: the overrides every point shares
_MAX_NAME_BYTES = 200  # below NAME_MAX (255 on common file systems), with room for a hash suffix


def random_search(space: dict, count: int, seed: int) -> list:
  """`count` points; a list value is a choice, a (low, high) tuple a log-uniform draw (of integers
  when both ends are: a log-uniform draw over [low, high + 1), rounded down)."""
  rng = np.random.default_rng(seed)
  points = []
  for _ in range(count):
    point = {}
    for key, values in space.items():
      if isinstance(values, tuple) and all(isinstance(v, int) for v in values):
        point[key] = int(math.exp(rng.uniform(math.log(values[0]), math.log(values[1] + 1))))
      elif isinstance(values, tuple):
        point[key] = float(math.exp(rng.uniform(math.log(values[0]), math.log(values[1]))))
      else:
        point[key] = values[int(rng.integers(len(values)))]
    points.append(point)
  return points


def experiment_module(config_path: str):
  """The experiment file (`path.py[:variant]`) as a module: its get_sweep, get_search_space, ..."""
  spec = importlib.util.spec_from_file_location("lmjax_sweep_experiment", config_path.partition(":")[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sweep_points(config_path: str) -> list:
  """The override dicts of the experiment file's `get_sweep()`."""
  module = experiment_module(config_path)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{config_path} defines no get_sweep(); add one returning a grid or a list of overrides")
  sweep = module.get_sweep()
  if isinstance(sweep, dict):
    keys = list(sweep)
    return [dict(zip(keys, values)) for values in itertools.product(*(sweep[k] for k in keys))]
  return [dict(p) for p in sweep]


def point_name(overrides: dict) -> str:
  """The point's directory name: its overrides, readable. When they had to be changed to make a
  name ('/' and spaces) or are longer than _MAX_NAME_BYTES, a prefix of them and a hash of the
  unchanged text, so distinct points never share a directory and the file system accepts the name."""
  raw = "__".join(f"{k}_{v}" for k, v in overrides.items()) or "default"
  name = raw.replace("/", "-").replace(" ", "")
  if name == raw and len(name.encode()) <= _MAX_NAME_BYTES:
    return name
  digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
  return name.encode()[: _MAX_NAME_BYTES - 14].decode(errors="ignore") + "__" + digest


def distinct_points(points: list) -> list:
  """The points in order, each distinct point once (a random search may draw one twice)."""
  seen = {}
  for p in points:
    seen.setdefault(point_name(p), p)
  return list(seen.values())


def point_command(config: str, workdir: str, overrides: dict, base: dict | None = None) -> list:
  """The argv that trains one sweep point: `lmjax-train` with the experiment, its workdir, the
  overrides every point shares (`base`, from the sweep's command line), then the point's own."""
  flags = [f"--config.{k}={v}" for k, v in {**(base or {}), **overrides}.items()]
  return [sys.executable, "-m", "lmjax.cli.train", f"--config={config}", f"--workdir={workdir}", *flags]


def run_point(
  config: str, sweep_dir: str, overrides: dict, env: dict | None = None, base: dict | None = None
) -> dict:
  """Runs (or resumes) one point unless it has finished; returns its status record: status 'ok'
  (finished), 'interrupted' (stopped by a signal; resumes next time) or 'failed', with the error.
  `env`: variables added to the point's environment (its devices: research/devices.py); `base`:
  overrides every point shares.
  Never raises: any failure, ours or the point's, is that point's result."""
  workdir = os.path.join(sweep_dir, point_name(overrides))
  record = {"overrides": overrides, "workdir": workdir, "wall_s": 0.0}
  try:
    os.makedirs(workdir, exist_ok=True)
    point_path = os.path.join(workdir, POINT_FILE)
    if os.path.exists(point_path):
      with open(point_path, encoding="utf-8") as f:
        saved = json.load(f)
      if _canonical(saved["overrides"]) != _canonical(overrides):
        return {**record, "status": "failed", "error": f"{workdir} holds another point: {saved['overrides']}"}
      record["wall_s"] = saved.get("wall_s", 0.0)
    if rundir.is_finished(workdir, steps=_point_steps(config, {**(base or {}), **overrides})):
      return {**record, "status": "ok"}
    start = time.time()
    with open(os.path.join(workdir, "sweep_log.txt"), "a") as log:
      result = subprocess.run(
        point_command(config, workdir, overrides, base),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
      )
    record["wall_s"] += time.time() - start
    files.write_json(point_path, {"overrides": overrides, "wall_s": record["wall_s"]})
    if result.returncode == 0 and rundir.is_finished(workdir):
      return {**record, "status": "ok"}
    if (
      result.returncode > 128 or result.returncode < 0
    ):  # 128 + signal from lmjax-train; -signal if killed outright
      return {
        **record,
        "status": "interrupted",
        "error": f"stopped by signal {abs(result.returncode) % 128} (exit status {result.returncode}); "
        "re-run the sweep to resume",
      }
    with open(os.path.join(workdir, "sweep_log.txt"), encoding="utf-8", errors="replace") as f:
      lines = [l.strip() for l in f if l.strip()]
    if result.returncode:
      error = lines[-1][:300] if lines else f"exit code {result.returncode}"
    else:
      error = "exit code 0 without reaching train.steps (no finished.json)"
    return {**record, "status": "failed", "error": error}
  except Exception as err:  # e.g. a workdir the file system refuses: this point fails, the sweep goes on
    return {**record, "status": "failed", "error": f"{type(err).__name__}: {err}"[:300]}


def point_record(sweep_dir: str, overrides: dict, status: str, error: str = "") -> dict:
  """The status record (as run_point returns) of a point run earlier, with its recorded wall time."""
  workdir = os.path.join(sweep_dir, point_name(overrides))
  wall_s = 0.0
  if os.path.exists(os.path.join(workdir, POINT_FILE)):
    with open(os.path.join(workdir, POINT_FILE), encoding="utf-8") as f:
      wall_s = json.load(f).get("wall_s", 0.0)
  record = {"overrides": overrides, "workdir": workdir, "wall_s": wall_s, "status": status}
  return {**record, "error": error} if error else record


def record_base(sweep_dir: str, base: dict) -> None:
  """Writes the shared overrides into the sweep directory, or raises ValueError when it already holds
  a sweep run with other ones (its finished points would otherwise count as this sweep's)."""
  path = os.path.join(sweep_dir, SWEEP_FILE)
  saved = None
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)["overrides"]
  elif glob.glob(os.path.join(sweep_dir, "*", POINT_FILE)):
    saved = {}  # points of a sweep from before the file existed: run without shared overrides
  if saved is not None:
    if _canonical(saved) != _canonical(base):
      shown = lambda o: " ".join(f"--config.{k}={v}" for k, v in o.items()) or "no overrides"
      raise ValueError(
        f"{sweep_dir} holds a sweep run with {shown(saved)}, not {shown(base)}; use another --workdir, "
        "or the same overrides to resume it"
      )
  if not os.path.exists(path):
    files.write_json(path, {"overrides": base})


def _canonical(overrides: dict) -> str:
  return json.dumps(overrides, sort_keys=True, default=str)


def point_config(config: str, overrides: dict):
  """The experiment's config with `overrides` applied as its command line would apply them (None when
  the experiment does not load or an override names no field: the point's own run reports why)."""
  try:
    cfg = config_lib.load_experiment(config)
    for key, value in overrides.items():
      *parents, last = key.split(".")
      node = cfg
      for part in parents:
        node = node[part]
      node[last] = value
    return cfg
  except Exception:  # noqa: BLE001 (any failure here is the point run's to report)
    return None


def _point_steps(config: str, overrides: dict) -> int | None:
  """The point's train.steps as its command will set it (None if the experiment does not load)."""
  cfg = point_config(config, overrides)
  return None if cfg is None else cfg.train.steps


def summarize(record: dict) -> dict:
  """One results row: the point's overrides and what its metrics.jsonl says."""
  row = {**record["overrides"], "status": record["status"], "wall_s": round(record.get("wall_s", 0.0), 1)}
  path = os.path.join(record["workdir"], "metrics.jsonl")
  records = metrics_log.read_metrics(record["workdir"]) if os.path.exists(path) else []
  evals = [r for r in records if "val_loss" in r]
  row["steps"] = records[-1]["step"] if records else 0
  finished = record["status"] == "ok" and evals  # an unfinished point's losses are not results
  row["final_val_loss"] = round(evals[-1]["val_loss"], 4) if finished else ""
  row["best_val_loss"] = round(min(r["val_loss"] for r in evals), 4) if finished else ""
  rates = [r["tokens_per_sec"] for r in records if r.get("tokens_per_sec")]
  row["tokens_per_sec"] = round(statistics.median(rates)) if rates else ""
  if record["status"] != "ok":
    row["error"] = record.get("error", "")
  return row


def write_results(sweep_dir: str, rows: list) -> None:
  """results.csv and results.md (one row per point) in the sweep directory, written atomically."""
  columns = list(dict.fromkeys(k for row in rows for k in row))
  table = io.StringIO()
  writer = csv.DictWriter(table, fieldnames=columns)
  writer.writeheader()
  writer.writerows(rows)
  files.write_atomic(os.path.join(sweep_dir, "results.csv"), table.getvalue())
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
  files.write_atomic(os.path.join(sweep_dir, "results.md"), "\n".join(lines) + "\n")


def plot_results(sweep_dir: str, records: list, swept: list) -> list:
  """val loss curves of all points on one chart, and final val loss against each swept field."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  fig, ax = plt.subplots(figsize=(7, 4))
  for record in records:
    if os.path.exists(os.path.join(record["workdir"], "metrics.jsonl")):
      points = [
        (r["step"], r["val_loss"]) for r in metrics_log.read_metrics(record["workdir"]) if "val_loss" in r
      ]
      if points:
        ax.plot(*zip(*points), marker="o", label=point_name(record["overrides"]))
  ax.set(xlabel="step", ylabel="validation loss", title="sweep: validation loss")
  ax.grid(alpha=0.3)
  if ax.lines:  # no point has a validation loss yet: no legend to draw
    ax.legend(fontsize=7)
  paths.append(os.path.join(sweep_dir, "val_loss.png"))
  fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
  plt.close(fig)
  rows = [summarize(r) for r in records]
  for field in swept:
    xy = [
      (row[field], row["final_val_loss"])
      for row in rows
      if row.get(field) is not None and row["final_val_loss"] != ""
    ]
    if not xy or not all(isinstance(x, (int, float)) for x, _ in xy):
      continue
    xy.sort()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(*zip(*xy), marker="o")
    xs = [x for x, _ in xy]
    if min(xs) > 0 and max(xs) / min(xs) >= 10:
      ax.set_xscale("log")
      ax.minorticks_off()
      ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set(xlabel=field, ylabel="final validation loss", title=f"final val loss vs {field}")
    ax.grid(alpha=0.3)
    paths.append(os.path.join(sweep_dir, f"val_loss_vs_{field}.png"))
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
  return paths


def run_points(
  config: str,
  sweep_dir: str,
  points: list,
  parallel: int = 1,
  devices_per_point: int = 0,
  base: dict | None = None,
  base_for=None,
) -> list:
  """Runs `points` with `parallel` at once (at most one per point), each in a slot of
  `devices_per_point` devices of its own (0: all share the node's; devices.slot_environments);
  returns their records in the order of `points` (run_point). `base`: overrides every point shares;
  `base_for(point)`: a point's own shared overrides instead (successive halving's rung budget).
  The caller holds the sweep directory's lock. Raises ValueError when the node lacks the devices
  asked for."""
  if not points:
    return []
  parallel = min(parallel, len(points))
  platform, node = devices.node_devices()
  slots = queue.SimpleQueue()
  for env in devices.slot_environments(platform, node, parallel, devices_per_point):
    slots.put(env)

  def run_in_a_slot(point):
    env = slots.get()  # a free slot exists: as many workers as slots
    try:
      return run_point(config, sweep_dir, point, env, base_for(point) if base_for else base)
    finally:
      slots.put(env)

  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    return list(pool.map(run_in_a_slot, points))


def report(config: str, sweep_dir: str, records: list, swept: list) -> int:
  """Writes the results table and plots of `records`, prints the table, calls the experiment's
  `analyze_sweep`, and returns the sweep's exit status: INTERRUPTED_EXIT when a point was stopped by
  a signal (re-run to resume), 1 when the analysis failed, else 0 (failed points are in the table,
  each with its error). Status 'stopped' (successive halving's points that did not go on) is
  counted apart from finished points."""
  rows = [summarize(r) for r in records]
  write_results(sweep_dir, rows)
  plot_results(sweep_dir, records, swept)
  with open(os.path.join(sweep_dir, "results.md")) as fh:
    print(fh.read())
  counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "stopped", "interrupted", "failed")}
  stopped = f"{counts['stopped']} stopped early by the search, " if counts["stopped"] else ""
  print(
    f"{counts['ok']} points finished, {stopped}{counts['interrupted']} interrupted (re-run to resume), "
    f"{counts['failed']} failed; results in {sweep_dir}"
  )
  analyze = getattr(experiment_module(config), "analyze_sweep", None)
  if analyze:  # the experiment's own study on top of the table, e.g. a scaling-law fit
    try:
      analyze(sweep_dir)
    except ValueError as err:  # e.g. too few finished points for a fit: the results above stand
      print(f"error: analyze_sweep did not complete: {err}", file=sys.stderr)
      return INTERRUPTED_EXIT if counts["interrupted"] else 1
  return INTERRUPTED_EXIT if counts["interrupted"] else 0


def run_sweep(
  config: str,
  sweep_dir: str,
  points: list,
  parallel: int = 1,
  devices_per_point: int = 0,
  base: dict | None = None,
) -> int:
  """Runs `points` (override dicts) of experiment `config` into `sweep_dir` (locked while it runs)
  and reports them (`report`: table, plots, analysis, exit status). `parallel` and
  `devices_per_point`: see run_points. `base`: overrides for every point, recorded in the directory
  (SWEEP_FILE) so finished points are never reused under others.
  Raises files.WorkdirInUse when another sweep runs in `sweep_dir`, ValueError when the node lacks
  the devices asked for or the directory holds a sweep with other `base` overrides."""
  with files.lock(sweep_dir):
    record_base(sweep_dir, base or {})
    records = run_points(config, sweep_dir, points, parallel, devices_per_point, base)
  return report(config, sweep_dir, records, list(dict.fromkeys(k for p in points for k in p)))
