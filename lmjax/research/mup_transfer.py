"""μTransfer from a finished sweep over (parametrization, width, learning rate): the best learning rate
of each width under each parametrization, how far it moves across widths in grid steps, and the
μP paper's Figure 1 (validation loss against learning rate, a line per width; sp and μP side by side).
`experiments/mup_shakespeare.py` is the sweep; its `analyze_sweep` calls `report`.
"""

from __future__ import annotations

import csv
import os

from lmjax.core import files


def best_learning_rates(rows: list) -> dict:
  """{parametrization: {width: (best lr, its final val loss)}} from results.csv rows (finished points)."""
  best = {}
  for row in rows:
    if not row.get("final_val_loss"):
      continue
    by_width = best.setdefault(row["model.parametrization"], {})
    width, lr, loss = int(row["model.d_model"]), float(row["optim.lr"]), float(row["final_val_loss"])
    if width not in by_width or loss < by_width[width][1]:
      by_width[width] = (lr, loss)
  return best


def grid_shift(best_by_width: dict, grid: list) -> int:
  """How many grid steps separate the smallest and largest best learning rate over the widths."""
  steps = [grid.index(lr) for lr, _ in best_by_width.values()]
  return max(steps) - min(steps)


def report(sweep_dir: str) -> dict:
  """Writes mup_transfer.md, mup_transfer.json and mup_transfer.png in `sweep_dir` from its
  results.csv; returns the summary (best learning rates and their shift in grid steps)."""
  with open(os.path.join(sweep_dir, "results.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  grid = sorted({float(r["optim.lr"]) for r in rows})
  best = best_learning_rates(rows)
  summary = {
    "best_lr": {p: {str(w): lr for w, (lr, _) in sorted(b.items())} for p, b in best.items()},
    "shift_in_grid_steps": {p: grid_shift(b, grid) for p, b in best.items()},
  }
  files.write_json(os.path.join(sweep_dir, "mup_transfer.json"), summary)
  widths = sorted({w for b in best.values() for w in b})
  lines = ["| parametrization | " + " | ".join(f"width {w}" for w in widths) + " | shift |"]
  lines.append("|---" * (len(widths) + 2) + "|")
  for p, b in best.items():
    cells = [f"{b[w][0]:g} ({b[w][1]:.3f})" if w in b else "-" for w in widths]
    lines.append(f"| {p} | " + " | ".join(cells) + f" | {summary['shift_in_grid_steps'][p]} grid steps |")
  files.write_atomic(os.path.join(sweep_dir, "mup_transfer.md"), "\n".join(lines) + "\n")
  _plot(rows, best, os.path.join(sweep_dir, "mup_transfer.png"))
  return summary


def _plot(rows: list, best: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(best), figsize=(5.5 * len(best), 4), sharey=True, squeeze=False)
  for ax, parametrization in zip(axes[0], best):
    widths = sorted(best[parametrization])
    for i, width in enumerate(widths):
      points = sorted(
        (float(r["optim.lr"]), float(r["final_val_loss"]))
        for r in rows
        if r["model.parametrization"] == parametrization
        and int(r["model.d_model"]) == width
        and r["final_val_loss"]
      )
      color = plt.cm.viridis(i / max(len(widths) - 1, 1))
      ax.plot(*zip(*points), marker="o", color=color, label=f"width {width}")
      ax.plot(*best[parametrization][width], marker="*", markersize=14, color=color)
    ax.set(xscale="log", xlabel="learning rate", title=f"{parametrization}: final val loss")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("validation loss")
  axes[0][-1].legend(fontsize=8)
  losses = [float(r["final_val_loss"]) for r in rows if r["final_val_loss"]]
  if losses:  # diverged points (loss ~ log V) would flatten the interesting range
    axes[0][0].set_ylim(min(losses) - 0.05, min(max(losses), min(losses) + 1.5))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
