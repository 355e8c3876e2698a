"""L(N, D) on character-level Shakespeare: Chinchilla's approach 3 (Hoffmann et al. 2022) over a grid
of 4 model sizes x 4 token budgets, each run with its cosine schedule ending at its own budget:

  lmjax-sweep --config=experiments/chinchilla_shakespeare.py --workdir=runs/chinchilla

writes the sweep's table and plots plus chinchilla.md / chinchilla.json / chinchilla.png: the fitted
E, A, B, alpha, beta with 90% bootstrap intervals and the compute-optimal split N_opt(C), D_opt(C)
(lmjax/research/chinchilla.py). Sizes are scaling_shakespeare.py's, N counts non-embedding
parameters; budgets are 250-2000 steps of 12 x 64 characters (0.19M-1.54M tokens). 16 runs.
"""

from lmjax.run import config

SIZES = [(32, 2, 2), (64, 4, 4), (128, 4, 4), (192, 6, 6)]  # (d_model, n_layers, n_heads)
STEPS = [250, 500, 1000, 2000]


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"chinchilla_shakespeare has no variants, got {variant!r}")
  cfg = config.load_experiment(__file__.replace("chinchilla_shakespeare.py", "shakespeare_char.py"))
  cfg.optim.update(lr=2e-3, min_lr=2e-4)  # scaling_shakespeare's: stable at every size
  cfg.train.update(eval_every=250, eval_steps=50, ckpt_every=1000, num_samples=0)
  return cfg


def get_sweep():
  points = []
  for d, layers, heads in SIZES:
    for steps in STEPS:
      size = {"model.d_model": d, "model.n_layers": layers, "model.n_heads": heads, "model.d_ff": 4 * d}
      points.append({**size, "train.steps": steps})
  return points


def analyze_sweep(sweep_dir: str) -> None:
  from lmjax.research import chinchilla

  fit = chinchilla.report(sweep_dir)
  law = f"{fit['E']:.3f} + {fit['A']:.3g} / N^{fit['alpha']:.3f} + {fit['B']:.3g} / D^{fit['beta']:.3f}"
  print(
    f"L(N, D) = {law}; {fit['tokens_per_param']:.1f} tokens per parameter at C = {fit['flops']:.3g}; "
    f"see {sweep_dir}/chinchilla.md"
  )
