"""Successive halving: train every point for a short budget, keep the best, resume them for longer.

    lmjax-sweep --config=experiments/shakespeare_char.py --workdir=runs/sh --search=halving --eta=3 --rungs=3

Successive halving (Jamieson & Talwalkar 2016, "Non-stochastic best arm identification and
hyperparameter optimization"), with ASHA's promotion rule (Li et al. 2020, "A system for massively
parallel hyperparameter tuning", Algorithm 2): of the n points that reached rung k, the best
floor(n / eta) by validation loss at the rung's step go on to rung k + 1 (at least one). Rung k ends
at step S / eta^(R-1-k) of the full budget S = train.steps, so the last rung is a full run.

Rungs here are synchronous: every point of a rung finishes before promotions are decided, so the
promoted points are the same whatever `--parallel` is (ASHA's asynchronous promotions depend on which
point finishes first). A promoted point resumes from its checkpoint: lmjax's resume is exact, and the
learning-rate schedule's horizon is pinned to S (`optim.decay_steps` of cosine and wsd, unless the
experiment sets it), so a point that reaches S is bitwise the run it would have been without
stopping. A stopped point keeps its checkpoint and continues later to the full budget with
`lmjax-train --config=EXPERIMENT --workdir=DIR/POINT` plus the sweep's and the point's overrides
(DIR/sweep_overrides.json, DIR/POINT/sweep_point.json) and `--config.optim.decay_steps=S` (cosine,
wsd; the pinned horizon), `--config.train.steps=S`.

Ties in validation loss are broken by the point's name; a point that failed, or whose loss is not a
number, is never promoted. Files beside the results table: DIR/rungs.json and DIR/rungs.md (each
rung's step, every point's loss there and whether it was promoted).
"""

from __future__ import annotations

import json
import math
import os

from lmjax.core import files
from lmjax.research import sweep
from lmjax.run import rundir
from lmjax.train import metrics_log, schedules

RUNGS_FILE = "rungs.json"
# Set by the halving itself on every point: a point of get_sweep() that sets them is refused (the
# command line's --config.train.steps is the full budget, --config.optim.decay_steps the horizon).
SCHEDULE_FIELDS = ("train.steps", "optim.decay_steps")


def rung_steps(total_steps: int, eta: int, rungs: int) -> list:
  """The steps each rung ends at: [S / eta^(R-1), ..., S / eta, S], rounded down, for the full budget
  S = `total_steps`. Raises ValueError when eta < 2, rungs < 1, or the first rung would be empty or
  two rungs would end at the same step (too many rungs for S)."""
  if eta < 2 or rungs < 1:
    raise ValueError(f"successive halving needs eta >= 2 and rungs >= 1, got eta={eta}, rungs={rungs}")
  steps = [total_steps // eta ** (rungs - 1 - k) for k in range(rungs)]
  if steps[0] < 1 or len(set(steps)) < rungs:
    raise ValueError(
      f"{rungs} rungs with eta={eta} do not fit train.steps={total_steps} (rung ends {steps}); use fewer "
      "--rungs or a smaller --eta"
    )
  return steps


def promote(losses: dict, eta: int) -> list:
  """The names of the points that go on: the best max(1, floor(n / eta)) of the n points by loss
  (`losses`: point name -> validation loss at the rung, or None for a point without one), ties by
  name. Points without a finite loss never go on (and count in n: a failure does not free a place).
  Returns [] when no point has a finite loss."""
  keep = max(1, len(losses) // eta)
  ranked = sorted((loss, name) for name, loss in losses.items() if loss is not None and math.isfinite(loss))
  return [name for _, name in ranked[:keep]]


def reached(workdir: str) -> int:
  """The furthest step the point has trained to: its finished run or its latest checkpoint (0: none)."""
  path = os.path.join(workdir, rundir.FINISHED_FILE)
  done = 0
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      done = json.load(f).get("steps", 0)
  checkpoints = rundir.steps(workdir) if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
  return max([done, *checkpoints])


def run_halving(
  config: str,
  sweep_dir: str,
  points: list,
  eta: int,
  rungs: int,
  parallel: int = 1,
  devices_per_point: int = 0,
  base: dict | None = None,
) -> int:
  """Successive halving over `points` (override dicts) of experiment `config` in `sweep_dir` (locked
  while it runs); writes the rung history and the results table (sweep.report; a point that did
  not go on is 'stopped', with its rung in the error column) and returns the sweep's exit status.
  Re-running the same command resumes: points that already reached a rung are not trained again.
  `parallel`, `devices_per_point`, `base`: as sweep.run_sweep.
  Raises ValueError for points that set SCHEDULE_FIELDS, rungs that do not fit train.steps
  (rung_steps), or a directory that holds a halving with other rungs; files.WorkdirInUse as
  run_sweep."""
  base = dict(base or {})
  for point in points:
    fixed = sorted(set(point) & set(SCHEDULE_FIELDS))
    if fixed:
      raise ValueError(
        f"successive halving sets {fixed[0]} of each point itself (rungs end at fractions of "
        f"train.steps, the horizon is pinned to it), but a point of get_sweep() sets it: {point}; set "
        f"{fixed[0]} for every point in the experiment file or with --config.{fixed[0]}"
      )
  cfg = sweep.point_config(config, base)
  if cfg is None:
    raise ValueError(f"{config} does not load with {base}; run lmjax-train with it to see why")
  total = cfg.train.steps
  steps = rung_steps(total, eta, rungs)
  plan = {"eta": eta, "rungs": rungs, "steps": steps}
  history, live, records = [], list(points), {}
  with files.lock(sweep_dir):
    _check_plan(sweep_dir, plan)
    sweep.record_base(sweep_dir, base)
    for k, step in enumerate(steps):
      todo = [p for p in live if reached(_workdir(sweep_dir, p)) < step]
      rung_base = lambda p, step=step: {**base, **_horizon(config, base, p, total), "train.steps": step}
      for record in sweep.run_points(
        config, sweep_dir, todo, parallel, devices_per_point, base_for=rung_base
      ):
        records[sweep.point_name(record["overrides"])] = record
      for p in live:  # points that reached the rung in an earlier invocation
        records.setdefault(sweep.point_name(p), sweep.point_record(sweep_dir, p, "ok"))
      status = {sweep.point_name(p): records[sweep.point_name(p)]["status"] for p in live}
      if "interrupted" in status.values():
        break  # a signal stopped the sweep: promotions wait for the rung to finish
      losses = {
        name: metrics_log.val_losses(os.path.join(sweep_dir, name)).get(step) if state == "ok" else None
        for name, state in status.items()
      }
      promoted = promote(losses, eta) if k < rungs - 1 else []
      points_seen = [{"point": n, "val_loss": loss, "promoted": n in promoted} for n, loss in losses.items()]
      history.append({"rung": k, "steps": step, "points": points_seen})
      for name in losses:
        if k < rungs - 1 and name not in promoted and records[name]["status"] == "ok":
          shown = "none" if losses[name] is None else f"{losses[name]:.4f}"
          why = f"stopped at rung {k}, step {step} (val loss {shown}): not among the best 1/{eta}"
          records[name] = {**records[name], "status": "stopped", "error": why}
      live = [p for p in live if sweep.point_name(p) in promoted]
      if not live:
        break  # nothing finite to promote (every point failed): the table says why
  _write_history(sweep_dir, plan, history, len(points) * total)
  ordered = [records[sweep.point_name(p)] for p in points if sweep.point_name(p) in records]
  return sweep.report(config, sweep_dir, ordered, list(dict.fromkeys(k for p in points for k in p)))


def _horizon(config: str, base: dict, point: dict, total: int) -> dict:
  """The point's pinned decay horizon (optim.decay_steps at the full budget) when its schedule has
  one (schedules.HORIZON_SCHEDULES); {} for one that does not, or a point whose config does not load
  (its run then reports why)."""
  cfg = sweep.point_config(config, {**base, **point})
  if cfg is None or cfg.optim.schedule not in schedules.HORIZON_SCHEDULES:
    return {}
  return {"optim.decay_steps": schedules.decay_horizon(cfg.optim, total)}


def _check_plan(sweep_dir: str, plan: dict) -> None:
  """Raises ValueError when the directory holds a halving with other rungs (its points' losses are
  at other steps, and its promotions would not be this one's)."""
  path = os.path.join(sweep_dir, RUNGS_FILE)
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    saved = json.load(f).get("plan")
  if saved and saved != plan:
    raise ValueError(
      f"{sweep_dir} holds a successive halving with eta={saved['eta']}, rungs={saved['rungs']} (rung ends "
      f"{saved['steps']}), not eta={plan['eta']}, rungs={plan['rungs']} ({plan['steps']}); re-run with "
      "those to resume it, or use another --workdir"
    )


def _workdir(sweep_dir: str, point: dict) -> str:
  return os.path.join(sweep_dir, sweep.point_name(point))


def _write_history(sweep_dir: str, plan: dict, history: list, grid_steps: int) -> None:
  """rungs.json and rungs.md; the markdown ends with the steps trained against the same points'
  full-length grid (each point's furthest step, counted once)."""
  names = [p["point"] for p in history[0]["points"]] if history else []
  trained = sum(reached(os.path.join(sweep_dir, name)) for name in names)
  summary = {"plan": plan, "rungs": history, "steps_trained": trained, "grid_steps": grid_steps}
  files.write_json(os.path.join(sweep_dir, RUNGS_FILE), summary)
  lines = ["| rung | steps | point | val_loss | promoted |", "|---|---|---|---|---|"]
  for rung in history:
    for p in sorted(rung["points"], key=lambda p: (p["val_loss"] is None, p["val_loss"] or 0.0, p["point"])):
      loss = "" if p["val_loss"] is None else f"{p['val_loss']:.4f}"
      mark = "yes" if p["promoted"] else ""
      lines.append(f"| {rung['rung']} | {rung['steps']} | {p['point']} | {loss} | {mark} |")
  share = f"{100 * trained / grid_steps:.0f}%" if grid_steps else "-"
  lines.append(f"\nsteps trained: {trained} of the full grid's {grid_steps} ({share})")
  files.write_atomic(os.path.join(sweep_dir, "rungs.md"), "\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)
