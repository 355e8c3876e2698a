"""The train state and the one setup path for mesh, optimizer, abstract state and shardings, used by
the trainer, the dry run and the benchmarks (`setup`).
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from lmjax import model
from lmjax.core import sharding
from lmjax.train import optimizer as optimizer_lib
from lmjax.train.preflight import mesh_for


@flax.struct.dataclass
class TrainState:
  """The whole training state, one pytree: step, params, optimizer state, and the first step whose loss
  or gradient was NaN/Inf (-1 if none), so a poisoned state is detected before it is saved."""

  step: jax.Array
  params: dict
  opt_state: optax.OptState
  first_bad_step: jax.Array  # first step whose loss or gradient was NaN/Inf; -1 if none


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything a step is compiled against: the mesh, the batch sharding, the optimizer and its
  schedule, the abstract train state (shapes with shardings) and its shardings."""

  mesh: jax.sharding.Mesh
  batch_sharding: jax.sharding.NamedSharding
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  abstract: TrainState
  shardings: TrainState


def setup(cfg, model_cfg: model.ModelConfig, trainable=None, mesh=None) -> Setup:
  """The setup of config `cfg` for `model_cfg`; `trainable`: a trainable tree other than the model's
  params (LoRA adapters); `mesh`: the one `preflight.mesh_for(cfg)` built already, if any. Raises
  errors.ConfigError when the mesh does not fit the devices or batch."""
  mesh = mesh if mesh is not None else mesh_for(cfg)
  roles = optimizer_lib.param_roles(model_cfg, adapters=trainable)
  optimizer, schedule = optimizer_lib.make_optimizer(cfg.optim, cfg.train.steps, roles)
  abstract, shardings = state_shardings(model_cfg, optimizer, mesh, cfg.mesh.rules, trainable)
  return Setup(mesh, sharding.batch_sharding(mesh, cfg.mesh.rules), optimizer, schedule, abstract, shardings)


def batch_spec(cfg, batch_sharding) -> dict:
  """The abstract global pretraining batch of `cfg` (tasks.losses.LMBatch): inputs and targets int32
  [train.batch_size, train.seq_len], with data.packing also segment_ids and positions (int32) and the
  loss mask (float32), sharded over the batch axes. Used by the dry run and the throughput benchmark."""
  shape = (cfg.train.batch_size, cfg.train.seq_len)
  keys = ("inputs", "targets") + (("segment_ids", "positions", "mask") if cfg.data.get("packing") else ())
  return {
    k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "mask" else jnp.int32, sharding=batch_sharding)
    for k in keys
  }


def state_shardings(model_cfg, optimizer, mesh, rules, trainable=None):
  """Abstract train state (shapes) and its shardings.

  Model params shard by their logical axis names; a `trainable` tree of another shape (LoRA
  adapters, small) is replicated.
  """
  params = model.boxed_param_shapes(model_cfg) if trainable is None else trainable
  boxed = jax.eval_shape(
    lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p), jnp.zeros((), jnp.int32)), params
  )
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings
  )
  return abstract, shardings


def init_state(model_cfg, optimizer, seed: int, shardings, params=None) -> TrainState:
  """A fresh state: newly initialised params, or the given ones (fine-tuning)."""

  def init(params):
    if params is None:
      params = model.init_params(model_cfg, jax.random.key(seed))
    params = jax.tree.map(lambda x: x.astype(model_cfg.param_dtype), params)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), jnp.full((), -1, jnp.int32))

  return jax.jit(init, out_shardings=shardings)(params)
