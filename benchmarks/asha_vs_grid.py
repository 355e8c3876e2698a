"""Successive halving vs the full grid on experiments/asha_shakespeare.py: best val loss and steps.

  python benchmarks/asha_vs_grid.py --workdir=runs/asha

Runs (or resumes) both sweeps one after the other, then prints and writes WORKDIR/asha_vs_grid.md:
each search's best final validation loss, the optimizer steps it trained (the grid: every point to
train.steps; halving: each point's furthest step) and its wall time. Compute is counted in steps, as
every point has the same model and batch.
"""

import csv
import json
import os
import subprocess
import sys
import time

from absl import app, flags

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "asha_shakespeare.py")
flags.DEFINE_string("workdir", "runs/asha", "Parent of the grid/ and halving/ sweep directories.")
flags.DEFINE_integer("eta", 3, "Halving's eta.")
flags.DEFINE_integer("rungs", 3, "Halving's rungs.")


def sweep(workdir: str, *extra: str) -> float:
  start = time.time()
  cmd = [sys.executable, "-m", "lmjax.cli.sweep", f"--config={EXPERIMENT}", f"--workdir={workdir}", *extra]
  subprocess.run(cmd, check=True)
  return time.time() - start


def finished_rows(sweep_dir: str) -> list:
  with open(os.path.join(sweep_dir, "results.csv")) as f:
    return [r for r in csv.DictReader(f) if r["final_val_loss"]]


def main(argv):
  del argv
  f = flags.FLAGS
  grid_dir, halving_dir = os.path.join(f.workdir, "grid"), os.path.join(f.workdir, "halving")
  grid_s = sweep(grid_dir)
  halving_s = sweep(halving_dir, "--search=halving", f"--eta={f.eta}", f"--rungs={f.rungs}")
  grid = finished_rows(grid_dir)
  grid_best = min(grid, key=lambda r: float(r["final_val_loss"]))
  grid_steps = sum(int(r["steps"]) for r in grid)
  with open(os.path.join(halving_dir, "rungs.json")) as fh:
    rungs = json.load(fh)
  last = rungs["rungs"][-1]
  winner = min((p for p in last["points"] if p["val_loss"] is not None), key=lambda p: p["val_loss"])
  gap = winner["val_loss"] - float(grid_best["final_val_loss"])
  share = rungs["steps_trained"] / grid_steps
  lines = [
    "| search | best point | best val loss | steps trained | share of grid | wall (this run) |",
    "|---|---|---|---|---|---|",
    f"| grid | lr {grid_best['optim.lr']}, wd {grid_best['optim.weight_decay']} | "
    f"{float(grid_best['final_val_loss']):.4f} | {grid_steps} | 100% | {grid_s:.0f} s |",
    f"| halving (eta {f.eta}, {f.rungs} rungs) | {winner['point']} | {winner['val_loss']:.4f} | "
    f"{rungs['steps_trained']} | {100 * share:.0f}% | {halving_s:.0f} s |",
    "",
    f"halving's best minus the grid's best: {gap:+.4f} (goal <= 0.01 with <= 40% of the steps)",
  ]
  text = "\n".join(lines) + "\n"
  print(text)
  with open(os.path.join(f.workdir, "asha_vs_grid.md"), "w") as fh:
    fh.write(text)


if __name__ == "__main__":
  app.run(main)
