"""Device mesh and the table that maps logical axis names to mesh axes (DESIGN.md property 3).

The model names every parameter dimension (`embed`, `mlp`, `heads`, ...). The
rules table below maps those names to the mesh axes `data`, `fsdp`, `tensor`;
data parallel, FSDP and tensor parallel differ only in the mesh shape. One
device is the mesh (1, 1, 1).
"""
from __future__ import annotations

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
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh.shape={tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"but {len(devices)} are available")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_shardings(boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree whose leaves carry logical names (nn.Partitioned); others replicate."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, tuple(tuple(r) for r in rules))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of [batch, length] token arrays."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), tuple(tuple(r) for r in rules)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
