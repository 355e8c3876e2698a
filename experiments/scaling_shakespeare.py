"""Model-size scaling at a fixed token budget on character-level Shakespeare (Kaplan et al. style).

Seven models from 25k to 2.7M non-embedding parameters, each trained on the same 1.54M tokens
(2000 steps of 12x64, the default experiment's budget), then L(N) = a * N^(-alpha) + c is
fitted to their final validation losses (lmjax/research/scaling.py):

  lmjax-sweep --config=experiments/scaling_shakespeare.py --workdir=runs/scaling

writes the usual sweep table and plots plus scaling.md / scaling.json / scaling.png.
About 20 minutes on a 2-core CPU.
"""

from lmjax.run import config

# (d_model, n_layers, n_heads): head size 16-32, d_ff = 4 * d_model.
SIZES = [(32, 2, 2), (48, 3, 3), (64, 4, 4), (96, 4, 4), (128, 4, 4), (160, 6, 5), (192, 6, 6)]


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"scaling_shakespeare has no variants, got {variant!r}")
  cfg = config.load_experiment(__file__.replace("scaling_shakespeare.py", "shakespeare_char.py"))
  # One learning rate for every size: 2e-3 beat 1e-3 at d_model 128 in the LR sweep, and the
  # warmup and clipping keep the largest model stable with it.
  cfg.optim.lr = 2e-3
  cfg.optim.min_lr = 2e-4
  cfg.train.update(eval_every=500, eval_steps=50, ckpt_every=1000, num_samples=0)
  return cfg


def get_sweep():
  return [
    {"model.d_model": d, "model.n_layers": layers, "model.n_heads": heads, "model.d_ff": 4 * d}
    for d, layers, heads in SIZES
  ]


def analyze_sweep(sweep_dir: str) -> None:
  from lmjax.research import scaling

  fit = scaling.report(sweep_dir)
  print(
    f"scaling law: L(N) = {fit['a']:.3g} * N^(-{fit['alpha']:.3f}) + {fit['c']:.3f}, R^2 {fit['r2']:.4f}; "
    f"see {sweep_dir}/scaling.md and scaling.png"
  )
