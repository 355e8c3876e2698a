"""μP, the Maximal Update Parametrization (Yang et al. 2021, "Tensor Programs V: Tuning Large Neural
Networks via Zero-Shot Hyperparameter Transfer", Table 3, Adam column; the same rules as the `mup`
package's MuReadout/MuAdam and Cerebras's "Practitioner's Guide to μP", 2024).

With `model.parametrization='mup'`, a model of width d_model is described relative to a base model of
width `mup_base_width`, where its hyperparameters (learning rate, init std) were tuned; m =
d_model / mup_base_width is the width multiplier, and the training dynamics of every width follow
the base's, so the tuned values transfer. Relative to standard parametrization (sp):

| parameter / activation | init std | Adam learning rate | forward |
|---|---|---|---|
| embeddings (token, position) | init_std | lr | |
| hidden matrices (q, k, v, o, MLP) | init_std / sqrt(m) | lr / m | |
| output head (tied or not) | init_std | lr | logits x 1 / m |
| norm scales, biases | as sp | lr | |
| attention logits | | | q.k x sqrt(h0) / h instead of 1 / sqrt(h) |

h is the head dim and h0 `mup_base_head_dim` (default h: with heads added at fixed head dim the
attention scale is unchanged). All hidden widths (d_ff, heads x head_dim) are taken to scale with
d_model, as in the paper's width sweeps. At m = 1 and h = h0, μP equals sp exactly. The learning-rate
rule is Adam's; it also holds for Lion (a sign update, like Adam's normalised one) and is refused
for the other optimizers (train/optimizer.py).
"""

from __future__ import annotations

import math

PARAMETRIZATIONS = ("sp", "mup")


def width_mult(cfg) -> float:
  """m = d_model / mup_base_width under μP, else 1."""
  if cfg.parametrization != "mup":
    return 1.0
  return cfg.d_model / (cfg.mup_base_width or cfg.d_model)


def hidden_init_mult(cfg) -> float:
  """Multiplier of the hidden matrices' init std: 1 / sqrt(m)."""
  return 1.0 / math.sqrt(width_mult(cfg))


def hidden_lr_mult(cfg) -> float:
  """Multiplier of the hidden matrices' (Adam) learning rate: 1 / m."""
  return 1.0 / width_mult(cfg)


def logit_mult(cfg) -> float:
  """Multiplier of the output logits: 1 / m."""
  return 1.0 / width_mult(cfg)


def query_mult(cfg) -> float:
  """Multiplier of the queries that turns the kernel's 1 / sqrt(h) into μP's sqrt(h0) / h."""
  if cfg.parametrization != "mup":
    return 1.0
  h = cfg.dim_per_head
  return math.sqrt((cfg.mup_base_head_dim or h) / h)
