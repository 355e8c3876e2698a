"""μTransfer on character-level Shakespeare (Tensor Programs V, Figure 1): learning-rate sweeps at
four widths (d_model 32-256, 8x) under standard parametrization and under μP with base width 32.
Under μP the best learning rate stays put as the model widens; under sp it shifts.

  lmjax-sweep --config=experiments/mup_shakespeare.py --workdir=runs/mup_transfer

writes the sweep's table and plots plus mup_transfer.md / mup_transfer.png (both panels; see
lmjax/research/mup_transfer.py). 2 layers, head dim 16, d_ff = 4 d_model, 500 steps of 12 x 64
characters per point, 56 points.
"""

from lmjax.run import config

WIDTHS = (32, 64, 128, 256)
LRS = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2)  # a factor of 2 per grid step
BASE_WIDTH = 32


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"mup_shakespeare has no variants, got {variant!r}")
  cfg = config.load_experiment(__file__.replace("mup_shakespeare.py", "shakespeare_char.py"))
  cfg.model.update(d_model=BASE_WIDTH, n_layers=2, n_heads=BASE_WIDTH // 16, d_ff=4 * BASE_WIDTH)
  cfg.optim.update(warmup_steps=50, min_lr=0.0)
  cfg.train.update(steps=500, eval_every=250, eval_steps=20, log_every=250, ckpt_every=500, num_samples=0)
  return cfg


def get_sweep():
  points = []
  for parametrization in ("sp", "mup"):
    for width in WIDTHS:
      for lr in LRS:
        point = {"model.parametrization": parametrization, "model.d_model": width}
        point.update({"model.n_heads": width // 16, "model.d_ff": 4 * width, "optim.lr": lr})
        if parametrization == "mup":
          point["model.mup_base_width"] = BASE_WIDTH
        points.append(point)
  return points


def analyze_sweep(sweep_dir: str) -> None:
  from lmjax.research import mup_transfer

  summary = mup_transfer.report(sweep_dir)
  for parametrization, shift in summary["shift_in_grid_steps"].items():
    print(f"{parametrization}: the best learning rate moves {shift} grid step(s) across widths")
  print(f"see {sweep_dir}/mup_transfer.md and mup_transfer.png")
