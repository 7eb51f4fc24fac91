"""Device mesh and the logical-axis rules that map parameter annotations onto it.

Models annotate every parameter with logical axis names (see `mobilebert_jax.models.layers`);
`LOGICAL_RULES` alone decides how those names land on the mesh axes (data, fsdp, tensor).
Changing the parallelism is a config change: the mesh shape and, if needed, the rules.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axis or axes). A mesh axis already used by an earlier dimension of the same
# array is skipped, so activations ("batch", "length", "embed") shard batch over data x fsdp.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("hidden_out", "tensor"),
    ("embed", "fsdp"),
    ("token_embed", "fsdp"),
    ("intra", "fsdp"),
    ("vocab_extra", "fsdp"),
    ("kv", None),
    ("labels", None),
    ("layers", None),
)


def create_mesh(shape: Mapping[str, int] | None = None,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor); one size may be -1 (all remaining devices).

  `shape` defaults to pure data parallelism over every device; a shape that names every axis
  size explicitly (no -1) may use the first N devices only.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = {axis: 1 for axis in MESH_AXES}
  sizes["data"] = -1
  for axis, size in dict(shape or {}).items():
    if axis not in MESH_AXES:
      raise ValueError(f"unknown mesh axis {axis!r}; valid axes: {list(MESH_AXES)}")
    sizes[axis] = int(size)
  if sum(s == -1 for s in sizes.values()) > 1:
    raise ValueError(f"mesh shape {sizes}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if known <= 0 or len(devices) % known:
    raise ValueError(f"mesh shape {sizes} does not divide the {len(devices)} available devices")
  sizes = {a: (len(devices) // known if s == -1 else s) for a, s in sizes.items()}
  if -1 not in dict(shape or {}).values() and "data" in dict(shape or {}):
    devices = devices[:int(np.prod(list(sizes.values())))]  # fully explicit: a device subset
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ValueError(f"mesh shape {sizes} uses {int(np.prod(list(sizes.values())))} devices but "
                     f"{len(devices)} are available")
  grid = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES)


def logical_specs(boxed_params: Any) -> Any:
  """The logical PartitionSpec of every parameter of a boxed (`nn.Partitioned`) tree."""
  return nn.get_partition_spec(boxed_params)


def fit_spec(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide (e.g. vocab 30522 over 4 devices)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    fitted.append(axes if size == 1 or dim % size == 0 else None)
  return PartitionSpec(*fitted)


def logical_shardings(boxed_abstract: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """NamedShardings for every leaf of a boxed abstract tree (parameters from
  `jax.eval_shape(model.init)`, or a whole train state): each leaf's logical axes mapped by
  `rules`, mesh axes that do not divide a dimension dropped, unannotated leaves replicated."""
  mesh_specs = nn.logical_to_mesh(logical_specs(boxed_abstract), rules)
  shapes = nn.meta.unbox(boxed_abstract)
  return jax.tree.map(
      lambda x, spec: NamedSharding(mesh, fit_spec(x.shape, spec, mesh)), shapes, mesh_specs,
      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of any [batch, ...] input array: batch over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
