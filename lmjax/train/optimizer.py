"""Optimizers by name (`optim.name`), from optax, after global-norm clipping, with a schedule by name.

- `adamw` (`optax.adamw`; b1, b2, eps): Adam's direction plus decoupled decay, -lr * wd * p
  (Loshchilov & Hutter 2019).
- `lion` (`optax.lion`; b1, b2): the sign of interpolated momentum plus decoupled decay (Chen et al.
  2023, "Symbolic Discovery of Optimization Algorithms"); wants a ~3-10x smaller lr than AdamW.
- `adafactor` (`optax.adafactor` with optax's defaults): factored second moments, update clipping,
  steps relative to each parameter's scale (Shazeer & Stern 2018), plus decoupled decay (optax's
  own `weight_decay_rate` is not scaled by the learning rate, so it is not used).
- `sgd` (`optax.sgd`; momentum, default 0.9, and nesterov): weight decay as L2, wd * p added to the
  gradient (PyTorch's SGD; typical values are ~100x smaller than AdamW's 0.1).
- `muon` (`optax.contrib.muon`; momentum, default 0.95, and b1, b2, eps): Nesterov momentum
  orthogonalised by Newton-Schulz iterations for the hidden matrices at `lr`, optax's Nesterov AdamW
  for the rest at `muon_adam_lr` (default `lr`; modded-nanogpt runs Muon at ~0.05 and Adam at
  ~0.008: Jordan et al. 2024), plus decoupled decay at each branch's own rate.

Weight decay (`optim.weight_decay`) applies by a rule on what a parameter is (`param_roles`), not a
list of names: matrices (two or more axes besides the scanned layer axis, one of them the model
width: projections, embeddings, the output head) decay; norm scales and biases do not; LoRA
adapters decay only with `optim.weight_decay_adapters`. Muon orthogonalises the hidden matrices,
each layer's separately with its input axes flattened against its output axes (wq: d_model x
heads*head_dim); embeddings, the output head, norms and biases take its AdamW branch, as its
authors prescribe. Under μP the roles also carry the hidden matrices' learning-rate multiplier.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from optax import contrib

from lmjax import model
from lmjax.run.config import OPTIMIZERS
from lmjax.train import schedules

# What a parameter is, for weight decay and Muon (param_roles).
HIDDEN, EMBEDDING, VECTOR, ADAPTER = "hidden", "embedding", "vector", "adapter"
_MUON_DEFAULT_MOMENTUM, _SGD_DEFAULT_MOMENTUM = 0.95, 0.9
# The optim fields each optimizer reads besides lr, weight_decay, grad_clip and the schedule's (the
# others are refused when set: preflight.check_fields_used); HYPERPARAMETERS: all of them.
READS = {
  "adamw": ("b1", "b2", "eps"),
  "lion": ("b1", "b2"),
  "adafactor": (),
  "sgd": ("momentum", "nesterov"),
  "muon": ("b1", "b2", "eps", "momentum", "muon_adam_lr"),
}
HYPERPARAMETERS = tuple(dict.fromkeys(k for fields in READS.values() for k in fields))


class Role(NamedTuple):
  """What a trainable parameter is: its kind, Muon's dimension numbers (matrices) and its
  learning-rate multiplier (μP's 1/m on hidden matrices, else 1)."""

  kind: str
  muon_dims: contrib.MuonDimensionNumbers | None
  lr_mult: float


def param_roles(model_cfg: model.ModelConfig, adapters=None):
  """Each trainable parameter's `Role`, as a tree shaped like the parameters.

  For the model's parameters the kind comes from their logical axis names: `embedding` when an axis
  is the vocabulary or the positions (embeddings, the output head); `hidden` when two or more axes
  besides `layers`, one of them `embed`, remain (the attention and MLP projections: Muon's
  reduction axes are `embed` when it comes first, else every axis before the trailing `embed`);
  `vector` otherwise (norm scales, biases, including per-head q/k/v biases). `adapters`: a LoRA
  adapter tree trained instead of the model (A [..., in, r], B [..., r, out]), every leaf `adapter`
  at the base learning rate.
  """
  if adapters is not None:
    dims = contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)
    return jax.tree.map(lambda _: Role(ADAPTER, dims, 1.0), adapters)
  boxed = model.boxed_param_shapes(model_cfg)
  hidden_mult = model.mup.hidden_lr_mult(model_cfg)
  return jax.tree.map(
    lambda box: _role(box, hidden_mult), boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )


def _role(box: nn.Partitioned, hidden_mult: float) -> Role:
  names = list(box.names)
  own = [i for i, n in enumerate(names) if n != "layers"]
  if {"vocab", "length"} & set(names):
    return Role(EMBEDDING, None, 1.0)
  if len(own) < 2 or "embed" not in names:
    return Role(VECTOR, None, 1.0)
  reduction = own[:1] if names[own[0]] == "embed" else own[:-1]
  output = [i for i in own if i not in reduction]
  return Role(HIDDEN, contrib.MuonDimensionNumbers(tuple(reduction), tuple(output)), hidden_mult)


def _is_role(x) -> bool:
  return isinstance(x, Role)


def _where(roles, predicate):
  """bool tree: `predicate(role)` for each parameter."""
  return jax.tree.map(predicate, roles, is_leaf=_is_role)


def decay_mask(roles, decay_adapters: bool):
  """bool tree: which parameters weight decay applies to (module docstring)."""
  return _where(roles, lambda r: r.kind in (HIDDEN, EMBEDDING) or (r.kind == ADAPTER and decay_adapters))


def make_optimizer(optim_cfg, total_steps: int, roles) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) for `optim_cfg` (the config's `optim` block) over `total_steps`: global-norm
  clipping to `grad_clip`, then `optim.name` at `schedules.make_schedule`'s learning rate, each
  parameter's update scaled by its role's `lr_mult` (μP).

  `roles`: `param_roles(...)` of the parameters it will train. Raises ValueError for an unknown name.
  """
  name, schedule = optim_cfg.name, schedules.make_schedule(optim_cfg, total_steps)
  mask = decay_mask(roles, optim_cfg.weight_decay_adapters)
  wd, momentum = optim_cfg.weight_decay, optim_cfg.momentum
  if name == "adamw":
    core = optax.adamw(schedule, optim_cfg.b1, optim_cfg.b2, optim_cfg.eps, weight_decay=wd, mask=mask)
  elif name == "lion":
    core = optax.lion(schedule, optim_cfg.b1, optim_cfg.b2, weight_decay=wd, mask=mask)
  elif name == "adafactor":
    core = _with_decay(optax.adafactor(schedule), schedule, wd, mask)
  elif name == "sgd":
    momentum = _SGD_DEFAULT_MOMENTUM if momentum is None else momentum
    core = optax.chain(
      optax.add_decayed_weights(wd, mask), optax.sgd(schedule, momentum or None, optim_cfg.nesterov)
    )
  elif name == "muon":
    core = _muon(optim_cfg, schedule, roles, mask)
  else:
    raise ValueError(f"optim.name={name!r}: choose one of {list(OPTIMIZERS)}")
  chain = [optax.clip_by_global_norm(optim_cfg.grad_clip), core]
  mults = _where(roles, lambda r: r.lr_mult)
  if any(m != 1.0 for m in jax.tree.leaves(mults)):
    chain.append(
      optax.stateless(lambda updates, params=None: jax.tree.map(lambda u, k: u * k, updates, mults))
    )
  return optax.chain(*chain), schedule


def _muon(optim_cfg, schedule, roles, mask) -> optax.GradientTransformation:
  """optax's Muon on the hidden matrices (or LoRA adapters), its AdamW branch for the rest (at
  `muon_adam_lr`'s share of the schedule), with decoupled decay -lr * wd * p on the decayed
  parameters of both branches, each at its branch's lr."""
  on_muon = lambda r: r.kind in (HIDDEN, ADAPTER)
  dims = _where(roles, lambda r: r.muon_dims if on_muon(r) else None)
  ratio = 1.0 if optim_cfg.muon_adam_lr is None else optim_cfg.muon_adam_lr / optim_cfg.lr
  adam_schedule = schedule if ratio == 1.0 else (lambda step: ratio * schedule(step))
  muon = contrib.muon(
    schedule,
    beta=_MUON_DEFAULT_MOMENTUM if optim_cfg.momentum is None else optim_cfg.momentum,
    eps=optim_cfg.eps,
    adam_b1=optim_cfg.b1,
    adam_b2=optim_cfg.b2,
    adam_learning_rate=adam_schedule,
    muon_weight_dimension_numbers=lambda _: dims,
  )
  if ratio == 1.0:  # one decay for both branches (and the optimizer state of runs before muon_adam_lr)
    return _with_decay(muon, schedule, optim_cfg.weight_decay, mask)
  muon_mask = jax.tree.map(lambda m, on: m and on, mask, _where(roles, on_muon))
  adam_mask = jax.tree.map(lambda m, on: m and not on, mask, _where(roles, on_muon))
  decayed = _with_decay(muon, schedule, optim_cfg.weight_decay, muon_mask)
  return _with_decay(decayed, adam_schedule, optim_cfg.weight_decay, adam_mask)


def _with_decay(core, schedule, wd: float, mask) -> optax.GradientTransformation:
  """`core`'s update plus decoupled weight decay, -schedule(t) * wd * p where `mask` is True."""
  if not wd or not any(jax.tree.leaves(mask)):
    return core
  decay = optax.masked(
    optax.chain(optax.add_decayed_weights(wd), optax.scale_by_learning_rate(schedule)), mask
  )

  def init(params):
    return core.init(params), decay.init(params)

  def update(updates, state, params=None):
    core_updates, core_state = core.update(updates, state[0], params)
    decay_updates, decay_state = decay.update(jax.tree.map(jnp.zeros_like, updates), state[1], params)
    return jax.tree.map(jnp.add, core_updates, decay_updates), (core_state, decay_state)

  return optax.GradientTransformation(init, update)
