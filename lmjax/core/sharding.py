"""Device mesh and the table that maps logical axis names to mesh axes (DESIGN.md property 3).

The model names every parameter dimension (`embed`, `mlp`, `heads`, ...). The
rules table below maps those names to the mesh axes `data`, `fsdp`, `tensor`;
data parallel, FSDP and tensor parallel differ only in the mesh shape. One
device is the mesh (1, 1, 1).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). Batches split over data and fsdp; parameters are
# sharded along `embed` over fsdp (ZeRO-3) and along heads/mlp/vocab over tensor.
DEFAULT_RULES = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv", None),
  ("vocab", "tensor"),
  ("layers", None),
  # Activations between blocks: batch split like the data, the residual stream not split.
  ("activation_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_embed", None),
)


def make_mesh(shape, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one entry of `shape` may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh.shape={tuple(shape)} must have one entry per axis {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape={tuple(shape)}: at most one entry may be -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = len(devices) // known
  elif int(np.prod(shape)) < len(devices) and jax.process_count() == 1:
    devices = devices[: int(np.prod(shape))]  # a smaller mesh on one host: use the first devices
  if int(np.prod(shape)) != len(devices):
    raise ValueError(
      f"mesh.shape={tuple(shape)} needs {int(np.prod(shape))} devices, but {len(devices)} are available"
    )
  return Mesh(
    np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  )


def _fit(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """Drops the mesh axes of any dimension they do not divide (e.g. a 78-character vocabulary
  over 4-way tensor parallelism): that dimension is replicated instead of failing."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    fitted.append(axes if size == 1 or dim % size == 0 else None)
  return PartitionSpec(*fitted)


def logical_shardings(boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree whose leaves carry logical names (nn.Partitioned); others replicate.
  Empty placeholders (optax's MaskedNode, where a partitioned optimizer keeps no state) stay as
  they are."""
  rules = tuple(tuple(r) for r in rules)
  mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), rules)
  shapes = nn.unbox(boxed_tree)
  return jax.tree.map(
    lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)) if hasattr(x, "shape") else x,
    mesh_specs,
    shapes,
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of [batch, length] token arrays."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), tuple(tuple(r) for r in rules)))


_ACTIVE = contextvars.ContextVar("lmjax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
  """While tracing a step, makes `constrain` pin activations to this mesh by the rules table
  (outside it `constrain` does nothing, e.g. in the sampler or in unit tests)."""
  token = _ACTIVE.set((mesh, tuple(tuple(r) for r in rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes) -> jax.Array:
  """A sharding constraint on an activation, named by logical axes (see `activation_sharding`)."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = _fit(nn.logical_to_mesh_axes(logical_axes, rules), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
