"""L(N, D) = E + A / N^alpha + B / D^beta, fitted as Chinchilla's approach 3 (Hoffmann et al. 2022,
"Training Compute-Optimal Large Language Models", section 3.3 and appendix D.2), with bootstrap
intervals and the compute-optimal allocation it implies.

The fit minimises the Huber loss (delta 1e-3) between log L and the log of the predicted loss,
written as LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, by L-BFGS from a
grid of starting points (the paper's procedure; here the 32 grid points with the lowest objective
are refined); the best is kept. With C = 6 N D
training FLOPs, the loss-minimising split of a budget C is (appendix D.2, eq. 4)
  N_opt(C) = G (C / 6)^(beta / (alpha + beta)),  D_opt(C) = (C / 6)^(alpha / (alpha + beta)) / G,
  G = (alpha A / (beta B))^(1 / (alpha + beta)).
"""

from __future__ import annotations

import itertools
import os

import numpy as np
from scipy import optimize, special

from lmjax.core import files
from lmjax.research import scaling
from lmjax.run import rundir

HUBER_DELTA = 1e-3
_REFINED = 32  # grid starts refined by L-BFGS
# The objective is ~1e-6 at a good fit: scipy's default tolerances would stop at the first step.
_TOLERANCES = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 2000}
_STARTS = list(
  itertools.product(
    (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),  # a
    (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),  # b
    (-1.0, -0.5, 0.0, 0.5, 1.0),  # e
    (0.0, 0.5, 1.0, 1.5, 2.0),  # alpha
    (0.0, 0.5, 1.0, 1.5, 2.0),  # beta
  )
)


def _objective(theta, log_n, log_d, log_loss):
  """The Huber loss of the log residuals and its gradient in (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  predicted = special.logsumexp(terms, axis=0)
  r = predicted - log_loss
  small = np.abs(r) <= HUBER_DELTA
  value = np.sum(np.where(small, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)))
  slope = np.where(small, r, HUBER_DELTA * np.sign(r))  # d huber / d r
  weights = np.exp(terms - predicted)  # d LSE / d term (a softmax over the three terms)
  grad = [
    np.sum(slope * weights[0]),
    np.sum(slope * weights[1]),
    np.sum(slope * weights[2]),
    -np.sum(slope * weights[0] * log_n),
    -np.sum(slope * weights[1] * log_d),
  ]
  return float(value), np.asarray(grad)


def fit(n, d, loss, starts=None) -> dict:
  """Fits L(N, D) to final losses `loss` of models with `n` parameters trained on `d` tokens.

  Returns {A, B, E, alpha, beta, huber}. `starts`: (a, b, e, alpha, beta) starting points (default
  the best 32 of the 6 x 6 x 5^3 grid above; the bootstrap passes the full fit's optimum only).
  Raises ValueError for
  fewer than 5 points (five constants).
  """
  n, d, loss = (np.asarray(x, np.float64) for x in (n, d, loss))
  if len(loss) < 5:
    raise ValueError(f"L(N, D) has 5 constants; the fit needs at least 5 runs, got {len(loss)}")
  args = (np.log(n), np.log(d), np.log(loss))
  # L-BFGS from the grid points where the objective is already lowest (all 3125 would take minutes
  # for the same optimum).
  starts = starts or sorted(_STARTS, key=lambda s: _objective(np.asarray(s), *args)[0])[:_REFINED]
  best = None
  for start in starts:
    result = optimize.minimize(
      _objective, np.asarray(start, np.float64), args=args, jac=True, method="L-BFGS-B", options=_TOLERANCES
    )
    if best is None or result.fun < best.fun:
      best = result
  a, b, e, alpha, beta = best.x
  return dict(
    A=float(np.exp(a)),
    B=float(np.exp(b)),
    E=float(np.exp(e)),
    alpha=float(alpha),
    beta=float(beta),
    huber=float(best.fun),
  )


def predict(constants: dict, n, d) -> np.ndarray:
  """E + A / N^alpha + B / D^beta."""
  c = constants
  return (
    c["E"]
    + c["A"] / np.asarray(n, np.float64) ** c["alpha"]
    + c["B"] / np.asarray(d, np.float64) ** c["beta"]
  )


def compute_optimal(constants: dict, flops) -> tuple:
  """(N_opt, D_opt) minimising L(N, D) subject to 6 N D = `flops` (module docstring)."""
  c, flops = constants, np.asarray(flops, np.float64)
  total = c["alpha"] + c["beta"]
  g = (c["alpha"] * c["A"] / (c["beta"] * c["B"])) ** (1.0 / total)
  return g * (flops / 6) ** (c["beta"] / total), (flops / 6) ** (c["alpha"] / total) / g


def bootstrap(n, d, loss, samples: int = 200, seed: int = 0, level: float = 0.9) -> dict:
  """{constant: (low, high)}: percentile intervals at `level` of each constant over `samples` refits to
  points resampled with replacement (each refit starts from the full fit's optimum)."""
  n, d, loss = (np.asarray(x, np.float64) for x in (n, d, loss))
  full = fit(n, d, loss)
  start = [(np.log(full["A"]), np.log(full["B"]), np.log(full["E"]), full["alpha"], full["beta"])]
  rng = np.random.default_rng(seed)
  draws = {k: [] for k in ("A", "B", "E", "alpha", "beta")}
  while len(draws["alpha"]) < samples:
    pick = rng.integers(0, len(loss), len(loss))
    if len(np.unique(pick)) < 5:  # five constants need five distinct points
      continue
    refit = fit(n[pick], d[pick], loss[pick], starts=start)
    for k in draws:
      draws[k].append(refit[k])
  tail = (1 - level) / 2 * 100
  return {k: tuple(float(x) for x in np.percentile(v, [tail, 100 - tail])) for k, v in draws.items()}


def finished_runs(sweep_dir: str) -> list:
  """(non-embedding params N, training tokens D, final val loss, run name) of each finished run in
  the sweep; D = train.steps x batch_size x seq_len of its saved config."""
  points = []
  for n, loss, name in scaling.finished_runs(sweep_dir):
    tc = rundir.saved_config(os.path.join(sweep_dir, name)).train
    points.append((n, tc.steps * tc.batch_size * tc.seq_len, loss, name))
  return sorted(points)


def report(sweep_dir: str, samples: int = 200) -> dict:
  """Fits L(N, D) to the sweep's finished runs with bootstrap intervals (`samples` refits, 90%);
  writes chinchilla.{json,md,png}; returns the fit with `intervals` and `tokens_per_param` (D_opt /
  N_opt at the compute of the sweep's largest run, 6 N D). Raises ValueError under 5 runs or when
  the runs do not vary both N and D."""
  points = finished_runs(sweep_dir)
  n, d, loss = (np.array([p[i] for p in points], np.float64) for i in range(3))
  if len(points) < 5 or len(set(n)) < 2 or len(set(d)) < 2:
    raise ValueError(
      f"{sweep_dir} has {len(points)} finished runs over {len(set(n))} sizes and {len(set(d))} budgets; "
      "L(N, D) needs at least 5 runs varying both: re-run the sweep to finish the others"
    )
  result = fit(n, d, loss)
  result["intervals"] = bootstrap(n, d, loss, samples=samples)
  flops = float(np.max(6 * n * d))
  n_opt, d_opt = compute_optimal(result, flops)
  result.update(flops=flops, n_opt=float(n_opt), d_opt=float(d_opt), tokens_per_param=float(d_opt / n_opt))
  result["points"] = [dict(n=int(p[0]), d=int(p[1]), val_loss=float(p[2]), run=p[3]) for p in points]
  files.write_json(os.path.join(sweep_dir, "chinchilla.json"), result)
  lines = [
    "| non-embedding params N | tokens D | final val loss | fitted | run |",
    "|---:|---:|---:|---:|---|",
  ]
  lines += [
    f"| {int(p[0]):,} | {int(p[1]):,} | {p[2]:.4f} | {predict(result, p[0], p[1]):.4f} | {p[3]} |"
    for p in points
  ]
  iv = result["intervals"]
  lines += ["", "| constant | fit | 90% bootstrap interval |", "|---|---:|---|"]
  lines += [
    f"| {k} | {result[k]:.4g} | {iv[k][0]:.4g} - {iv[k][1]:.4g} |" for k in ("E", "A", "B", "alpha", "beta")
  ]
  share = result["beta"] / (result["alpha"] + result["beta"])
  lines += [
    "",
    f"Compute-optimal: N_opt ~ C^{share:.3f}, D_opt ~ C^{1 - share:.3f} (Chinchilla: ~0.5 each). At "
    f"C = {flops:.3g} FLOPs (the largest run): N_opt = {n_opt:,.0f}, D_opt = {d_opt:,.0f}, "
    f"{d_opt / n_opt:.1f} tokens per parameter (Chinchilla: ~20).",
  ]
  files.write_atomic(os.path.join(sweep_dir, "chinchilla.md"), "\n".join(lines) + "\n")
  _plot(os.path.join(sweep_dir, "chinchilla.png"), n, d, loss, result)
  return result


def _plot(path: str, n, d, loss, result: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  sizes = sorted(set(n))
  grid = np.geomspace(d.min() / 1.5, d.max() * 1.5, 100)
  for i, size in enumerate(sizes):
    color = plt.cm.viridis(i / max(len(sizes) - 1, 1))
    mine = n == size
    left.plot(d[mine], loss[mine], "o", color=color, label=f"N = {size:,.0f}")
    left.plot(grid, predict(result, size, grid), color=color, alpha=0.7)
  left.set(xscale="log", xlabel="training tokens D", ylabel="final validation loss", title="L(N, D) fit")
  left.grid(alpha=0.3, which="both")
  left.legend(fontsize=8)
  flops = np.geomspace(float(np.min(6 * n * d)), float(np.max(6 * n * d)) * 100, 100)
  n_opt, d_opt = compute_optimal(result, flops)
  right.loglog(flops, n_opt, label="N_opt (parameters)")
  right.loglog(flops, d_opt, label="D_opt (tokens)")
  right.loglog(flops, d_opt / n_opt, "--", label="D_opt / N_opt")
  right.axhline(20, color="gray", linestyle=":", label="Chinchilla's ~20 tokens/param")
  right.set(xlabel="training FLOPs C = 6 N D", title="compute-optimal allocation")
  right.grid(alpha=0.3, which="both")
  right.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
