"""Device mesh and the logical-axis rules that map parameter annotations onto it.

Models annotate every parameter with logical axis names (see `mobilebert_jax.models.layers`);
`LOGICAL_RULES` alone decides how those names land on the mesh axes (dcn_data, data, fsdp,
tensor). Changing the parallelism is a config change: the mesh shape and, if needed, the rules.

`dcn_data` is data parallelism across slices over the data-centre network (DCN); data, fsdp and
tensor live within a slice, on its fast interconnect (ICI). Parameters never shard over dcn_data:
each slice holds the same layout, and only gradients cross the DCN.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

# Ordered from the least to the most communication, as mesh_utils expects.
MESH_AXES = ("dcn_data", "data", "fsdp", "tensor")
SLICE_AXES = MESH_AXES[1:]  # the axes within one slice
BATCH_AXES = ("dcn_data", "data", "fsdp")  # the axes a batch is split over
DEFAULT_SHAPE = {"dcn_data": 1, "data": -1, "fsdp": 1, "tensor": 1}

# (logical axis, mesh axis or axes). A mesh axis already used by an earlier dimension of the same
# array is skipped, so activations ("batch", "length", "embed") shard batch over every batch axis.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
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


def mesh_sizes(shape: Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
  """Every mesh axis's size from a `config.mesh`-like mapping over `num_devices` devices.

  Missing axes take `DEFAULT_SHAPE` (dcn_data=1, data=-1, fsdp=1, tensor=1; data=1 when another
  axis is -1). One of data, fsdp and tensor may be -1: the devices of one dcn_data group left
  over by the others (a slice, when dcn_data is the slice count). Without a -1 the mesh may use
  only the first devices.
  """
  sizes = dict(DEFAULT_SHAPE)
  if -1 in dict(shape or {}).values():
    sizes["data"] = 1
  for axis, size in dict(shape or {}).items():
    if axis not in MESH_AXES:
      raise ValueError(f"unknown mesh axis {axis!r}; valid axes: {list(MESH_AXES)}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
      raise ValueError(f"mesh axis {axis}={size!r} is not an integer")
    if size < 1 and not (size == -1 and axis in SLICE_AXES):
      raise ValueError(f"mesh axis {axis}={size}: sizes are >= 1, or -1 for one of "
                       f"{list(SLICE_AXES)} (the rest of the devices)")
    sizes[axis] = int(size)
  free = [axis for axis in SLICE_AXES if sizes[axis] == -1]
  if len(free) > 1:
    raise ValueError(f"mesh shape {sizes}: at most one axis may be -1, got {free}")
  groups = sizes["dcn_data"]
  if num_devices % groups:
    raise ValueError(f"mesh axis dcn_data={groups} does not divide the {num_devices} devices")
  known = math.prod(size for size in sizes.values() if size != -1)
  if free:
    per_group = num_devices // groups
    if per_group % (known // groups):
      within = f" ({per_group} per dcn_data group)" if groups > 1 else ""
      raise ValueError(f"mesh shape {sizes} does not divide the {num_devices} available "
                       f"devices{within}")
    sizes[free[0]] = per_group // (known // groups)
  elif num_devices % known:
    raise ValueError(f"mesh shape {sizes} does not divide the {num_devices} available devices")
  return sizes


def _slice_grid(shape: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
  """Devices of one slice (or any devices that share a network) arranged in `shape`.

  `mesh_utils.create_device_mesh` follows the physical torus on TPU (an axis may span several
  physical axes, later axes get the most bandwidth) and orders GPUs by id; elsewhere (CPU) it is a
  plain reshape. Where it cannot place the devices (a TPU device subset with holes, devices of
  several slices) the mesh falls back to a reshape in device order, with a warning.
  """
  try:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (AssertionError, NotImplementedError, ValueError) as e:
    log.warning("mesh %s: no topology-aware layout for these %d %s devices (%s); reshaping them "
                "in device order", list(shape), len(devices), devices[0].platform,
                str(e).splitlines()[0] if str(e) else type(e).__name__)
    return np.asarray(devices, dtype=object).reshape(shape)


def _granules(devices: Sequence[jax.Device]) -> tuple[str, list[list[jax.Device]]]:
  """The devices grouped by DCN granule: slices (TPU `slice_index`), else processes."""
  attr = "slice_index" if hasattr(devices[0], "slice_index") else "process_index"
  groups = collections.defaultdict(list)
  for device in devices:
    groups[getattr(device, attr)].append(device)
  return attr, [groups[key] for key in sorted(groups)]


def _hybrid_grid(sizes: Mapping[str, int], devices: Sequence[jax.Device]) -> np.ndarray:
  """Devices in a (dcn_data, data, fsdp, tensor) grid whose dcn_data axis crosses the DCN.

  Several slices (or, without `slice_index`, several processes): `create_hybrid_device_mesh`,
  each slice laid out on its own interconnect; dcn_data must divide the slice count, and the
  slices of one dcn_data group extend the data axis (its outer part). One process without slices
  (CPU tests, one GPU host): its devices split into dcn_data contiguous groups standing for slices.
  """
  groups = sizes["dcn_data"]
  inner = [1] + [sizes[axis] for axis in SLICE_AXES]
  attr, granules = _granules(devices)
  kind = "slice" if attr == "slice_index" else "process"
  if kind == "process" and len(granules) == 1:
    log.warning("mesh: one process and no TPU slices, so dcn_data=%d splits its %d devices into "
                "contiguous groups standing for slices", groups, len(devices))
    per_group = len(devices) // groups
    return np.concatenate([_slice_grid(inner, devices[g * per_group:(g + 1) * per_group])
                           for g in range(groups)])
  if len(granules) % groups:
    raise ValueError(f"mesh axis dcn_data={groups} does not divide the number of {kind}s, "
                     f"{len(granules)} (the devices' {attr})")
  if len({len(granule) for granule in granules}) > 1:
    raise ValueError(f"mesh axis dcn_data={groups}: the {kind}s hold unequal numbers of devices "
                     f"{[len(granule) for granule in granules]}")
  per_group = len(granules) // groups
  if sizes["data"] % per_group:
    raise ValueError(f"mesh axis data={sizes['data']} is not a multiple of the {per_group} "
                     f"{kind}s in each dcn_data group ({len(granules)} {kind}s, dcn_data="
                     f"{groups}): set dcn_data={len(granules)} or a data size that they divide")
  inner[1] = sizes["data"] // per_group
  try:
    return mesh_utils.create_hybrid_device_mesh(
        inner, [groups, per_group, 1, 1], devices, process_is_granule=attr == "process_index",
        allow_split_physical_axes=True)
  except (AssertionError, NotImplementedError) as e:  # e.g. part of a slice's devices
    raise ValueError(f"mesh shape {dict(sizes)}: no layout of {inner[1:]} within each of the "
                     f"{len(granules)} {kind}s: {e}") from None


def device_grid(shape: Mapping[str, int] | None, devices: Sequence[Any]) -> np.ndarray:
  """`devices` in an array of the mesh's shape (`mesh_sizes`), axes as in `MESH_AXES`.

  dcn_data=1: one topology-aware grid (`_slice_grid`, `create_device_mesh`). dcn_data>1: a
  hybrid grid whose first axis crosses slices (`_hybrid_grid`, `create_hybrid_device_mesh`).
  A shape without -1 may use the first N devices only.
  """
  sizes = mesh_sizes(shape, len(devices))
  devices = list(devices)[:math.prod(sizes.values())]
  if sizes["dcn_data"] > 1:
    return _hybrid_grid(sizes, devices)
  if len({getattr(device, "slice_index", 0) for device in devices}) > 1:
    log.warning("mesh: the devices span several slices but dcn_data=1; set config.mesh.dcn_data "
                "to the slice count to keep data, fsdp and tensor within a slice")
  return _slice_grid([sizes[axis] for axis in MESH_AXES], devices)


def create_mesh(shape: Mapping[str, int] | None = None,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (dcn_data, data, fsdp, tensor) laid out by `device_grid`; `shape`
  defaults to pure data parallelism over every device (`jax.devices()`)."""
  devices = list(devices if devices is not None else jax.devices())
  return Mesh(device_grid(shape, devices), MESH_AXES)


def batch_shards(mesh: Mesh) -> int:
  """How many ways a batch splits on `mesh`: the product of its `BATCH_AXES` sizes."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


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
  """Sharding of any [batch, ...] input array: batch over dcn_data x data x fsdp, the rest
  replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))
