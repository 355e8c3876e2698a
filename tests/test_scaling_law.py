"""Scaling-law fit (lmjax/research/scaling.py) against synthetic laws, and a real model-size sweep with
its report."""

import json
import os

import numpy as np
import pytest
from test_sweep import run_sweep, write_experiment

from lmjax import model
from lmjax.research import chinchilla, scaling


def test_fit_recovers_a_known_power_law():
  n = np.geomspace(2e4, 3e6, 7)
  exact = 40.0 * n**-0.35 + 1.3
  fit = scaling.fit_power_law(n, exact)
  assert fit["alpha"] == pytest.approx(0.35, abs=0.01)
  assert fit["c"] == pytest.approx(1.3, abs=0.01)
  assert fit["a"] == pytest.approx(40.0, rel=0.05)
  assert fit["r2"] > 0.99999 and fit["rmse"] < 1e-3
  noisy = exact + np.random.default_rng(0).normal(0, 0.005, n.shape)
  fit = scaling.fit_power_law(n, noisy)
  assert fit["alpha"] == pytest.approx(0.35, abs=0.08) and fit["r2"] > 0.99


def test_fit_needs_four_sizes():
  with pytest.raises(ValueError, match="at least 4 model sizes"):
    scaling.fit_power_law([1e4, 1e5, 1e6], [3.0, 2.5, 2.2])


def test_report_on_a_sweep_without_enough_finished_runs_says_so(tmp_path):
  (tmp_path / "unfinished_point").mkdir()
  with pytest.raises(ValueError, match="0 finished runs with a validation loss.*at least 4"):
    scaling.report(str(tmp_path))


def test_non_embedding_count_excludes_embeddings():
  for tie, pos in ((True, "learned"), (False, "rope")):
    cfg = model.ModelConfig(
      vocab_size=50,
      max_len=16,
      d_model=24,
      n_layers=3,
      n_heads=2,
      d_ff=40,
      mlp="gelu",
      norm="layernorm",
      pos_encoding=pos,
      tie_embeddings=tie,
    )
    # per layer: q, k, v, o (4 d^2), w1 and w2 (2 d F), two LayerNorms (4 d); plus the final LayerNorm
    assert model.non_embedding_param_count(cfg) == 3 * (4 * 24 * 24 + 2 * 24 * 40 + 4 * 24) + 2 * 24


@pytest.mark.slow
def test_model_size_sweep_writes_the_scaling_report(tmp_path, corpus_file):
  config = write_experiment(
    tmp_path, corpus_file, '[{"model.d_model": d, "model.d_ff": 2 * d} for d in (8, 16, 24, 32)]'
  )
  with open(config, "a") as f:
    f.write(
      "\ndef analyze_sweep(sweep_dir):\n  from lmjax.research import scaling\n  scaling.report(sweep_dir)\n"
    )
  workdir = str(tmp_path / "sweep")
  result = run_sweep(config, workdir, "--parallel=2")
  assert result.returncode == 0, result.stderr[-2000:]
  with open(os.path.join(workdir, "scaling.json")) as f:
    fit = json.load(f)
  # the tiny experiment: 2 layers, SwiGLU (3 d F), RMSNorm (2 d per layer + final d)
  assert [p["n"] for p in fit["points"]] == [
    2 * (4 * d * d + 3 * d * 2 * d + 2 * d) + d for d in (8, 16, 24, 32)
  ]
  assert all(p["val_loss"] > 0 for p in fit["points"]) and np.isfinite(fit["alpha"])
  assert "L(N) =" in open(os.path.join(workdir, "scaling.md")).read()
  assert os.path.getsize(os.path.join(workdir, "scaling.png")) > 0


def test_chinchilla_fit_recovers_known_constants_with_intervals_that_cover_them():
  """Approach 3 on losses made from Chinchilla's published constants (5 sizes x 3 budgets, 0.2%
  log-normal noise): the exponents come back within 0.02, every 90% bootstrap interval covers
  the true constant, and the compute-optimal split matches a brute-force search along 6ND = C."""
  true = dict(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28)
  n, d = (x.ravel() for x in np.meshgrid([1e6, 3e6, 1e7, 3e7, 1e8], [1e8, 3e8, 1e9]))
  loss = chinchilla.predict(true, n, d) * np.exp(np.random.default_rng(0).normal(0, 0.002, n.shape))
  fitted = chinchilla.fit(n, d, loss)
  assert abs(fitted["alpha"] - 0.34) < 0.02 and abs(fitted["beta"] - 0.28) < 0.02
  intervals = chinchilla.bootstrap(n, d, loss, samples=40)
  assert all(low <= true[k] <= high for k, (low, high) in intervals.items()), intervals
  n_opt, d_opt = chinchilla.compute_optimal(true, 1e21)
  grid = np.logspace(8, 11, 20001)
  assert n_opt == pytest.approx(grid[np.argmin(chinchilla.predict(true, grid, 1e21 / 6 / grid))], rel=1e-3)
  assert 6 * n_opt * d_opt == pytest.approx(1e21)
  with pytest.raises(ValueError, match="at least 5 runs"):
    chinchilla.fit(n[:4], d[:4], loss[:4])


def test_chinchilla_report_writes_the_fit_and_the_compute_optimal_ratio(tmp_path, monkeypatch):
  """report() on a sweep's runs (here exact losses of known constants on a 4 x 4 grid): the table,
  the constants, and D_opt / N_opt at the largest run's compute found by brute force along 6ND = C."""
  true = dict(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28)
  grid = [(n, d) for n in (1e6, 3e6, 1e7, 3e7) for d in (1e8, 3e8, 1e9, 3e9)]
  runs = [(n, d, float(chinchilla.predict(true, n, d)), f"run{i}") for i, (n, d) in enumerate(grid)]
  monkeypatch.setattr(chinchilla, "finished_runs", lambda sweep_dir: runs)
  result = chinchilla.report(str(tmp_path), samples=10)
  assert abs(result["alpha"] - 0.34) < 0.01 and abs(result["beta"] - 0.28) < 0.01
  flops = 6 * 3e7 * 3e9
  sizes = np.logspace(6, 11, 50001)
  n_best = sizes[np.argmin(chinchilla.predict(true, sizes, flops / 6 / sizes))]
  assert result["tokens_per_param"] == pytest.approx(flops / 6 / n_best**2, rel=0.05)
  text = (tmp_path / "chinchilla.md").read_text()
  assert "| 1,000,000 | 100,000,000 |" in text and "tokens per parameter" in text
  assert json.loads((tmp_path / "chinchilla.json").read_text())["points"][0]["run"] == "run0"
  assert (tmp_path / "chinchilla.png").stat().st_size > 0
  monkeypatch.setattr(chinchilla, "finished_runs", lambda sweep_dir: runs[:4])  # one size only
  with pytest.raises(ValueError, match="varying both"):
    chinchilla.report(str(tmp_path))
