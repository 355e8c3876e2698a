"""The μP coordinate check (Yang et al. 2021, Tensor Programs V, Figure 5 / Appendix D.1): train the
same model at several widths for a few steps and record the RMS of each layer's activations
(the typical size of one coordinate) after every step. Under a parametrization that transfers (μP)
each curve is flat in width; under standard parametrization the activations grow with width after
a few Adam steps, which is why a learning rate tuned small does not transfer.

Widths scale d_model, d_ff and the number of heads together (head dim fixed), from `base`, which is
also μP's base model (`mup_base_width = base.d_model`). Data: Shakespeare's characters.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmjax import model, train
from lmjax.data import shakespeare
from lmjax.run import config as config_lib


def at_width(base: model.ModelConfig, width: int, parametrization: str) -> model.ModelConfig:
  """`base` widened to d_model = `width` (d_ff and heads in proportion), under `parametrization`."""
  ratio = width / base.d_model
  return dataclasses.replace(
    base,
    d_model=width,
    d_ff=round(base.d_ff * ratio),
    n_heads=max(1, round(base.n_heads * ratio)),
    n_kv_heads=None,
    head_dim=base.dim_per_head,
    scan_layers=False,  # the intermediates are read per layer
    parametrization=parametrization,
    mup_base_width=base.d_model if parametrization == "mup" else None,
  )


def _rms_by_layer(cfg, params, tokens_BT) -> dict:
  """{activation name: RMS over all its coordinates}: each block's attention and MLP outputs and the
  residual stream after it, and the logits."""
  logits, state = model.Transformer(cfg).apply(
    {"params": params}, tokens_BT, capture_intermediates=True, mutable=["intermediates"]
  )
  found = state["intermediates"]
  rms = lambda x: jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))
  out = {}
  for i in range(cfg.n_layers):
    block = found[f"block_{i}"]
    out[f"block_{i}/attn"] = rms(block["attn"]["__call__"][0][0])
    out[f"block_{i}/mlp"] = rms(block["mlp"]["__call__"][0])
    out[f"block_{i}/residual"] = rms(block["__call__"][0][0])
  out["logits"] = rms(logits)
  return out


def coord_check(
  base: model.ModelConfig,
  widths,
  parametrization: str,
  steps: int = 10,
  lr: float = 1e-2,
  batch_size: int = 8,
  seed: int = 0,
) -> dict:
  """{width: [{activation: RMS} after 0, 1, ..., `steps` AdamW steps]} (constant `lr`, no weight
  decay, batches of `batch_size` x base.max_len characters; the same batches at every width)."""
  text = shakespeare.shakespeare_text()[:400_000]
  chars = sorted(set(text))
  index = {c: i for i, c in enumerate(chars)}
  ids = np.fromiter((index[c] for c in text), np.int32, len(text))
  base = dataclasses.replace(base, vocab_size=len(chars))
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(ids) - base.max_len - 1, (steps + 1, batch_size))
  batches = [np.stack([ids[s : s + base.max_len + 1] for s in row]) for row in starts]
  optim = config_lib.base_config().optim
  optim.update(lr=lr, schedule="constant", warmup_steps=0, weight_decay=0.0, grad_clip=1e9)
  return {width: _curve(at_width(base, width, parametrization), optim, batches, seed) for width in widths}


def _curve(cfg, optim, batches, seed: int) -> list:
  """The activation RMS of `cfg` before training and after each step on `batches` but the last."""
  params = model.init_params(cfg, jax.random.key(seed))
  tx, _ = train.make_optimizer(optim, len(batches), train.param_roles(cfg))
  opt_state = tx.init(params)

  def loss(p, batch):
    logits = model.Transformer(cfg).apply({"params": p}, batch[:, :-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]))

  @jax.jit
  def step(p, s, batch):
    updates, s = tx.update(jax.grad(loss)(p, batch), s, p)
    return optax.apply_updates(p, updates), s

  measure = jax.jit(lambda p, batch: _rms_by_layer(cfg, p, batch[:, :-1]))
  curve = []
  for t, batch in enumerate(batches):
    curve.append({k: float(v) for k, v in measure(params, batch).items()})
    if t < len(batches) - 1:
      params, opt_state = step(params, opt_state, batch)
  return curve


def write_report(results: dict, out_dir: str) -> None:
  """coord_check.json and coord_check.png (one panel per parametrization: RMS against width, a line
  per activation kind and step) in `out_dir`."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "coord_check.json"), "w") as f:
    json.dump({p: {str(w): c for w, c in r.items()} for p, r in results.items()}, f, indent=1)
  kinds = ("attn", "mlp", "residual", "logits")
  fig, axes = plt.subplots(
    len(results), len(kinds), figsize=(4 * len(kinds), 3.2 * len(results)), squeeze=False
  )
  for row, (param, by_width) in enumerate(results.items()):
    widths = sorted(by_width)
    steps = len(by_width[widths[0]])
    for col, kind in enumerate(kinds):
      ax = axes[row][col]
      names = [n for n in by_width[widths[0]][0] if n.endswith(kind)]
      for t in range(steps):
        mean = [np.mean([by_width[w][t][n] for n in names]) for w in widths]
        ax.plot(widths, mean, marker="o", color=plt.cm.viridis(t / max(steps - 1, 1)), label=f"t={t}")
      ax.set(xscale="log", yscale="log", xlabel="width (d_model)", title=f"{param}: {kind} RMS")
      if col == 0:
        ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "coord_check.png"), dpi=110)
  plt.close(fig)


def width_growth(by_width: dict, step: int) -> dict:
  """{activation: RMS at the widest width / RMS at the narrowest} after `step` steps."""
  widths = sorted(by_width)
  narrow, wide = by_width[widths[0]][step], by_width[widths[-1]][step]
  return {k: wide[k] / narrow[k] for k in narrow}
