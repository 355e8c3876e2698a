"""Scaling-law fits: final validation loss against model size, L(N) = a * N^(-alpha) + c.

N is the non-embedding parameter count (Kaplan et al. 2020, "Scaling Laws for
Neural Language Models": token, position and output embeddings excluded), and
c is the irreducible loss that a fixed token budget leaves (Chinchilla's E).

  lmjax-scaling --sweep_dir=runs/scaling

reads every finished point of a model-size sweep (each point's config.json and
metrics.jsonl), fits the law and writes scaling.md, scaling.json and a log-log
plot scaling.png into the sweep directory. `experiments/scaling_shakespeare.py`
calls it when its sweep finishes.
"""

from __future__ import annotations

import os

import numpy as np

from lmjax import model
from lmjax.core import files
from lmjax.run import rundir
from lmjax.train import metrics_log


def fit_power_law(n, loss) -> dict:
  """Least-squares fit of loss = a * n^(-alpha) + c with 0 <= c < min(loss).

  For a fixed c the law is a straight line in log space, log(loss - c) =
  log(a) - alpha * log(n); c is chosen on a fine grid to minimise the squared
  error of the loss itself. Returns a, alpha, c, r2 (of the loss) and rmse.
  """
  n, loss = np.asarray(n, np.float64), np.asarray(loss, np.float64)
  if len(n) < 4:
    raise ValueError(f"a 3-parameter power law needs at least 4 model sizes, got {len(n)}")
  best = None
  for c in np.linspace(0.0, loss.min(), 4001, endpoint=False):
    slope, intercept = np.polyfit(np.log(n), np.log(loss - c), 1)
    predicted = np.exp(intercept) * n**slope + c
    sse = float(np.sum((loss - predicted) ** 2))
    if best is None or sse < best["sse"]:
      best = dict(a=float(np.exp(intercept)), alpha=float(-slope), c=float(c), sse=sse)
  best["r2"] = 1.0 - best["sse"] / float(np.sum((loss - loss.mean()) ** 2))
  best["rmse"] = float(np.sqrt(best.pop("sse") / len(n)))
  return best


def predict(fit: dict, n) -> np.ndarray:
  """L(N) = a * N^(-alpha) + c of a `fit_power_law` result at model sizes `n`."""
  return fit["a"] * np.asarray(n, np.float64) ** (-fit["alpha"]) + fit["c"]


def finished_runs(sweep_dir: str) -> list:
  """(non-embedding params, final val loss, run name) of each finished run in the sweep, by size."""
  points = []
  for name in sorted(os.listdir(sweep_dir)):
    workdir = os.path.join(sweep_dir, name)
    if not rundir.is_finished(workdir):  # interrupted or failed runs never enter the fit
      continue
    evals = [r for r in metrics_log.read_metrics(workdir) if "val_loss" in r]
    if evals:
      points.append(
        (model.non_embedding_param_count(rundir.read_model(workdir)[0]), evals[-1]["val_loss"], name)
      )
  return sorted(points)


def report(sweep_dir: str) -> dict:
  """Fits the law to the sweep's runs; writes scaling.{json,md,png}; returns the fit."""
  points = finished_runs(sweep_dir)
  if len(points) < 4:
    raise ValueError(
      f"{sweep_dir} has {len(points)} finished runs with a validation loss; the power-law fit "
      "needs at least 4 model sizes: re-run the sweep to finish (or fix) the others"
    )
  n, loss = np.array([p[0] for p in points]), np.array([p[1] for p in points])
  fit = fit_power_law(n, loss)
  lines = ["| non-embedding params N | final val loss | fitted | run |", "|---:|---:|---:|---|"]
  lines += [f"| {p[0]:,} | {p[1]:.4f} | {predict(fit, p[0]):.4f} | {p[2]} |" for p in points]
  lines += [
    "",
    f"L(N) = {fit['a']:.3g} * N^(-{fit['alpha']:.3f}) + {fit['c']:.3f};  "
    f"R^2 = {fit['r2']:.4f}, RMSE = {fit['rmse']:.4f}",
  ]
  if len(points) >= 5:  # quality beyond the in-sample fit: fit without the largest model, predict it
    held_out = fit_power_law(n[:-1], loss[:-1])
    h = fit["largest_held_out"] = dict(
      n=int(n[-1]),
      measured=float(loss[-1]),
      predicted=float(predict(held_out, n[-1])),
      alpha=held_out["alpha"],
    )
    lines.append(
      f"Fit without the largest model: alpha = {h['alpha']:.3f}, predicts {h['predicted']:.4f} "
      f"for N = {h['n']:,} (measured {h['measured']:.4f})."
    )
  fit["points"] = [dict(n=int(p[0]), val_loss=float(p[1]), run=p[2]) for p in points]
  files.write_json(os.path.join(sweep_dir, "scaling.json"), fit)
  files.write_atomic(os.path.join(sweep_dir, "scaling.md"), "\n".join(lines) + "\n")
  _plot(os.path.join(sweep_dir, "scaling.png"), n, loss, fit)
  return fit


def _plot(path: str, n, loss, fit: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4.5))
  grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 200)
  ax.loglog(n, loss, "o", label="final val loss")
  ax.loglog(
    grid,
    predict(fit, grid),
    label=f"{fit['a']:.3g} N^-{fit['alpha']:.3f} + {fit['c']:.3f} (R² {fit['r2']:.3f})",
  )
  ax.axhline(fit["c"], color="gray", linestyle=":", label="fitted irreducible loss c")
  ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
  ax.set_xlabel("non-embedding parameters N")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("Loss vs model size at a fixed token budget")
  ax.legend()
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
