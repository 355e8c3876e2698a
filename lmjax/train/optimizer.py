"""The optimizer: AdamW (optax) after global-norm clipping, with warmup and cosine decay."""

from __future__ import annotations

import jax
import optax

# Parameters that get weight decay: the matrices. Norm scales and biases do not.
_DECAYED = {"embedding", "lm_head", "pos_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3"}


def _param_name(path) -> str:
  return next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup and cosine decay to `min_lr`, after global-norm clipping.

  The decay spans `optim.decay_steps` (None, 0 or absent: `total_steps`); after it the rate stays at min_lr,
  so a finished run extended to more steps can keep its original schedule.
  """
  decay_steps = optim_cfg.get("decay_steps") or total_steps
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=optim_cfg.lr,
    warmup_steps=optim_cfg.warmup_steps,
    decay_steps=max(decay_steps, optim_cfg.warmup_steps + 1),
    end_value=optim_cfg.min_lr,
  )
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
    lambda p, _: _param_name(p) in _DECAYED, params
  )
  optimizer = optax.chain(
    optax.clip_by_global_norm(optim_cfg.grad_clip),
    optax.adamw(
      schedule,
      b1=optim_cfg.b1,
      b2=optim_cfg.b2,
      eps=optim_cfg.eps,
      weight_decay=optim_cfg.weight_decay,
      mask=decay_mask,
    ),
  )
  return optimizer, schedule
