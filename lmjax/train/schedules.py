"""Learning-rate schedules by name (`optim.schedule`), built from optax's schedule pieces.

Every schedule warms up linearly from 0 to `optim.lr` over `optim.warmup_steps`, then:
- `cosine`: cosine decay to `min_lr` at the decay horizon H (`optim.decay_steps`, default train.steps),
  min_lr after it (Loshchilov & Hutter 2017; nanoGPT's and most LLM recipes' default);
- `wsd` (warmup-stable-decay): `lr` until the last `decay_fraction` of H, then a decay to `min_lr` at
  H whose shape is `linear`, `cosine` or `sqrt` (1 - sqrt, Hägele et al. 2024, "Scaling Laws and
  Compute-Optimal Training Beyond Fixed Training Durations", which finds it best); min_lr after H.
  A checkpoint from the stable phase can be decayed to any shorter budget, so one run serves
  several token budgets (Hu et al. 2024, MiniCPM);
- `constant`: `lr`;
- `inverse_sqrt`: lr * sqrt(warmup_steps / t) after the warmup (Vaswani et al. 2017's schedule,
  normalised to reach lr at the end of the warmup; with no warmup, lr / sqrt(t + 1)).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from lmjax.run.config import DECAY_SHAPES, SCHEDULES

HORIZON_SCHEDULES = ("cosine", "wsd")  # the schedules that decay to a horizon (optim.decay_steps)


def decay_horizon(optim_cfg, total_steps: int) -> int:
  """H: the step at which decaying schedules reach min_lr (optim.decay_steps, else train.steps)."""
  return optim_cfg.decay_steps or total_steps


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """The `optim.schedule` of `optim_cfg` for a run of `total_steps`: step -> learning rate.

  Raises ValueError for an unknown schedule or decay shape (config validation names them first).
  """
  name, lr, warmup = optim_cfg.schedule, optim_cfg.lr, optim_cfg.warmup_steps
  if name not in SCHEDULES:
    raise ValueError(f"optim.schedule={name!r}: choose one of {list(SCHEDULES)}")
  horizon = max(decay_horizon(optim_cfg, total_steps), warmup + 1)
  if name == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, horizon, end_value=optim_cfg.min_lr)
  warm = optax.linear_schedule(0.0, lr, warmup)
  if name == "constant":
    after = optax.constant_schedule(lr)
  elif name == "inverse_sqrt" and warmup:  # `after` counts steps from the end of the warmup
    after = lambda t: lr * jnp.sqrt(warmup / jnp.maximum(t + warmup, 1))
  elif name == "inverse_sqrt":
    after = lambda t: lr / jnp.sqrt(jnp.maximum(t + 1.0, 1.0))
  else:
    decay = max(1, min(round(optim_cfg.decay_fraction * horizon), horizon - warmup))
    stable = horizon - warmup - decay
    after = optax.join_schedules(
      [optax.constant_schedule(lr), _decay(optim_cfg.decay_shape, lr, optim_cfg.min_lr, decay)], [stable]
    )
  return optax.join_schedules([warm, after], [warmup])


def _decay(shape: str, lr: float, min_lr: float, steps: int) -> optax.Schedule:
  """lr -> min_lr over `steps` steps, then min_lr, with the WSD cooldown `shape`."""
  if shape not in DECAY_SHAPES:
    raise ValueError(f"optim.decay_shape={shape!r}: choose one of {list(DECAY_SHAPES)}")

  def schedule(t):
    f = jnp.clip(t / steps, 0.0, 1.0)
    if shape == "linear":
      kept = 1 - f
    elif shape == "cosine":
      kept = 0.5 * (1 + jnp.cos(math.pi * f))
    else:
      kept = 1 - jnp.sqrt(f)
    return min_lr + (lr - min_lr) * kept

  return schedule
