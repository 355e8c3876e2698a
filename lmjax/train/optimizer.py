"""Optimizers by name (`optim.name`), from optax, after global-norm clipping, with a schedule by name.

- `adamw` (`optax.adamw`; b1, b2, eps): Adam's direction plus decoupled decay (Loshchilov & Hutter
  2019).
- `lion` (`optax.lion`; b1, b2): the sign of interpolated momentum plus decoupled decay (Chen et al.
  2023, "Symbolic Discovery of Optimization Algorithms"); wants a ~3-10x smaller lr than AdamW.
- `adafactor` (`optax.adafactor` with optax's defaults): factored second moments, update clipping,
  steps relative to each parameter's scale (Shazeer & Stern 2018).
- `sgd` (`optax.sgd`; momentum, default 0.9, and nesterov): weight decay as L2, added to the
  gradient (PyTorch's SGD).
- `muon` (`optax.contrib.muon`; momentum, default 0.95, and b1, b2, eps for its AdamW branch):
  Nesterov momentum orthogonalised by Newton-Schulz iterations for the hidden matrices, AdamW for
  the rest (Jordan et al. 2024, modded-nanogpt).

Weight decay (`optim.weight_decay`) applies by a rule on what a parameter is (`param_roles`), not a
list of names: matrices (two or more axes besides the scanned layer axis, one of them the model
width: projections, embeddings, the output head) decay; norm scales and biases do not; LoRA
adapters decay only with `optim.weight_decay_adapters`. Muon orthogonalises the hidden matrices
(each layer's, per head block flattened: its input axes against its output axes); embeddings,
the output head, norms and biases take its AdamW branch, as its authors prescribe.
"""

from __future__ import annotations

import jax
import optax
from flax import linen as nn
from optax import contrib

from lmjax import model
from lmjax.run.config import OPTIMIZERS
from lmjax.train import schedules

# What a parameter is, for weight decay and Muon (param_roles).
HIDDEN, EMBEDDING, VECTOR, ADAPTER = "hidden", "embedding", "vector", "adapter"
_MUON_DEFAULT_MOMENTUM, _SGD_DEFAULT_MOMENTUM = 0.95, 0.9


def param_roles(model_cfg: model.ModelConfig, adapters=None):
  """Each trainable parameter's role, as a tree of (role, muon dimension numbers or None).

  For the model's parameters the role comes from their logical axis names: `embedding` when an axis
  is the vocabulary or the positions (embeddings, the output head); `hidden` when two or more axes
  besides `layers`, one of them `embed`, remain (the attention and MLP projections: Muon's
  reduction axes are `embed` when it comes first, else every axis before the trailing `embed`);
  `vector` otherwise (norm scales, biases, including per-head q/k/v biases). `adapters`: a LoRA
  adapter tree trained instead of the model (A [..., in, r], B [..., r, out]), every leaf `adapter`.
  """
  if adapters is not None:
    dims = contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)
    return jax.tree.map(lambda _: (ADAPTER, dims), adapters)
  boxed = model.boxed_param_shapes(model_cfg)
  return jax.tree.map(_role, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _role(box: nn.Partitioned):
  names = list(box.names)
  own = [i for i, n in enumerate(names) if n != "layers"]
  if {"vocab", "length"} & set(names):
    return EMBEDDING, None
  if len(own) < 2 or "embed" not in names:
    return VECTOR, None
  reduction = own[:1] if names[own[0]] == "embed" else own[:-1]
  output = [i for i in own if i not in reduction]
  return HIDDEN, contrib.MuonDimensionNumbers(tuple(reduction), tuple(output))


def _is_role(x) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)


def decay_mask(roles, decay_adapters: bool):
  """bool tree: which parameters weight decay applies to (module docstring)."""
  return jax.tree.map(
    lambda r: r[0] in (HIDDEN, EMBEDDING) or (r[0] == ADAPTER and decay_adapters), roles, is_leaf=_is_role
  )


def make_optimizer(
  optim_cfg, total_steps: int, roles, hidden_lr_mult: float = 1.0
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) for `optim_cfg` (the config's `optim` block) over `total_steps`: global-norm
  clipping to `grad_clip`, then `optim.name` at `schedules.make_schedule`'s learning rate.

  `roles`: `param_roles(...)` of the parameters it will train. `hidden_lr_mult`: μP's learning-rate
  multiplier of the hidden matrices (model.mup.hidden_lr_mult: 1/m), applied to their whole update.
  Raises ValueError for an unknown name.
  """
  name, schedule = optim_cfg.name, schedules.make_schedule(optim_cfg, total_steps)
  mask = decay_mask(roles, optim_cfg.weight_decay_adapters)
  wd, momentum = optim_cfg.weight_decay, optim_cfg.momentum
  if name == "adamw":
    core = optax.adamw(schedule, optim_cfg.b1, optim_cfg.b2, optim_cfg.eps, weight_decay=wd, mask=mask)
  elif name == "lion":
    core = optax.lion(schedule, optim_cfg.b1, optim_cfg.b2, weight_decay=wd, mask=mask)
  elif name == "adafactor":
    core = optax.adafactor(schedule, weight_decay_rate=wd or None, weight_decay_mask=mask)
  elif name == "sgd":
    momentum = _SGD_DEFAULT_MOMENTUM if momentum is None else momentum
    core = optax.chain(
      optax.add_decayed_weights(wd, mask), optax.sgd(schedule, momentum or None, optim_cfg.nesterov)
    )
  elif name == "muon":
    core = _muon(optim_cfg, schedule, roles)
  else:
    raise ValueError(f"optim.name={name!r}: choose one of {list(OPTIMIZERS)}")
  chain = [optax.clip_by_global_norm(optim_cfg.grad_clip), core]
  if hidden_lr_mult != 1.0:
    mults = jax.tree.map(lambda r: hidden_lr_mult if r[0] == HIDDEN else 1.0, roles, is_leaf=_is_role)
    chain.append(
      optax.stateless(lambda updates, params=None: jax.tree.map(lambda u, k: u * k, updates, mults))
    )
  return optax.chain(*chain), schedule


def _muon(optim_cfg, schedule, roles) -> optax.GradientTransformation:
  """optax's Muon on the hidden matrices (and adapters), its AdamW branch for the rest. Its own
  decay covers only the Muon branch (all matrices); the AdamW branch's matrices (embeddings, the
  head) get the same decoupled decay, -lr * wd * p, and its vectors none."""
  dims = jax.tree.map(lambda r: r[1] if r[0] in (HIDDEN, ADAPTER) else None, roles, is_leaf=_is_role)
  # The Muon branch is all matrices: the model's hidden ones, or (LoRA) only adapters.
  adapters = any(r[0] == ADAPTER for r in jax.tree.leaves(roles, is_leaf=_is_role))
  muon = contrib.muon(
    schedule,
    beta=_MUON_DEFAULT_MOMENTUM if optim_cfg.momentum is None else optim_cfg.momentum,
    eps=optim_cfg.eps,
    weight_decay=optim_cfg.weight_decay if not adapters or optim_cfg.weight_decay_adapters else 0.0,
    adam_b1=optim_cfg.b1,
    adam_b2=optim_cfg.b2,
    muon_weight_dimension_numbers=lambda _: dims,
  )
  adam_decayed = jax.tree.map(lambda r: r[0] == EMBEDDING, roles, is_leaf=_is_role)
  if optim_cfg.weight_decay and any(jax.tree.leaves(adam_decayed)):
    decay = optax.masked(
      optax.chain(optax.add_decayed_weights(optim_cfg.weight_decay), optax.scale_by_learning_rate(schedule)),
      adam_decayed,
    )
    return _summed(muon, decay)
  return muon


def _summed(a: optax.GradientTransformation, b: optax.GradientTransformation) -> optax.GradientTransformation:
  """The update a(g) + b(zeros): `b` adds a term that depends on the parameters only (the decay)."""

  def init(params):
    return a.init(params), b.init(params)

  def update(updates, state, params=None):
    ua, sa = a.update(updates, state[0], params)
    ub, sb = b.update(jax.tree.map(lambda u: u * 0, updates), state[1], params)
    return jax.tree.map(lambda x, y: x + y, ua, ub), (sa, sb)

  return optax.GradientTransformation(init, update)
