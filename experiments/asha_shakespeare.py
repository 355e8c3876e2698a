"""Successive halving against a full grid on character-level Shakespeare (the default config).

A 3 x 3 grid of learning rate and weight decay, 2000 steps a point:

  lmjax-sweep --config=experiments/asha_shakespeare.py --workdir=runs/asha/grid
  lmjax-sweep --config=experiments/asha_shakespeare.py --workdir=runs/asha/halving \
    --search=halving --eta=3 --rungs=3

Optuna's TPE over the same ranges (continuous, log-uniform), for comparison:

  lmjax-sweep --config=experiments/asha_shakespeare.py --workdir=runs/asha/tpe --search=optuna --trials=9

The grid, the halving and their comparison: `python benchmarks/asha_vs_grid.py --workdir=runs/asha`. Halving
trains all 9 points to step 222, the best 3 to 666 and the best one to 2000: 4664 of the grid's
18000 steps (26%).
"""

from lmjax.run import config


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"asha_shakespeare has no variants, got {variant!r}")
  cfg = config.load_experiment(__file__.replace("asha_shakespeare.py", "shakespeare_char.py"))
  cfg.train.update(num_samples=0)
  return cfg


def get_sweep():
  return {"optim.lr": [1e-3, 3e-3, 1e-2], "optim.weight_decay": [0.0, 0.1, 0.3]}


def get_search_space():
  return {"optim.lr": (1e-3, 1e-2), "optim.weight_decay": (0.01, 0.3)}
