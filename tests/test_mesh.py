"""Meshes from the topology: axis sizes, hybrid (multi-slice) grids, errors. (Training on a
hybrid mesh against plain data parallelism: tests/test_trainer.py.)"""

import dataclasses
import itertools
import logging

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from mobilebert_jax.models import build_model, get_preset, tiny
from mobilebert_jax.parallel import sharding
from mobilebert_jax.pretrained import init_params
from mobilebert_jax.stages import PlanError, plan
from test_trainer import tiny_config


@dataclasses.dataclass(frozen=True)
class FakeChip:
  """What mesh_utils reads of a TPU v4 chip (one device per chip)."""
  id: int
  slice_index: int
  process_index: int
  coords: tuple[int, int, int]
  core_on_chip: int = 0
  platform: str = "tpu"
  device_kind: str = "TPU v4"


@dataclasses.dataclass(frozen=True)
class FakeGpu:
  """A GPU as mesh_utils sees it: no slice_index."""
  id: int
  process_index: int
  platform: str = "gpu"
  device_kind: str = "NVIDIA H100"


def fake_pod(num_slices, dims=(4, 2, 1)):
  """`num_slices` TPU v4 slices of `dims` (x, y, z) chips, ids in slice-major, x-fastest order."""
  chips = []
  for index in range(num_slices):
    for z, y, x in itertools.product(*(range(d) for d in reversed(dims))):
      chips.append(FakeChip(len(chips), index, index, (x, y, z)))
  return chips


def slices_of(grid):
  return {chip.slice_index for chip in np.ravel(grid)}


def test_axes_shape_and_a_batch_split_over_the_dcn_axis(caplog):
  with caplog.at_level(logging.WARNING, logger=sharding.__name__):
    mesh = sharding.create_mesh(dict(dcn_data=2, data=2, fsdp=2, tensor=1))
  assert "splits its 8 devices into contiguous groups standing for slices" in caplog.text
  assert mesh.axis_names == ("dcn_data", "data", "fsdp", "tensor")
  assert dict(mesh.shape) == dict(dcn_data=2, data=2, fsdp=2, tensor=1)
  devices = jax.devices()
  assert [{d.id for d in group.flat} for group in mesh.devices] == [
      {d.id for d in devices[:4]}, {d.id for d in devices[4:]}]
  batch = sharding.batch_sharding(mesh)
  assert batch.spec == PartitionSpec(("dcn_data", "data", "fsdp"))
  assert sharding.batch_shards(mesh) == 8
  rows = jax.device_put(np.arange(16), batch)
  for shard in rows.addressable_shards:  # the first "slice" holds the first half of the batch
    group = 0 if shard.device in mesh.devices[0].flat else 1
    assert np.all(np.asarray(shard.data) // 8 == group) and shard.data.shape == (2,)
  # Callers that name only data, fsdp and tensor get dcn_data=1 and the old layout.
  assert dict(sharding.create_mesh(dict(data=2, fsdp=2, tensor=2)).shape) == dict(
      dcn_data=1, data=2, fsdp=2, tensor=2)
  assert dict(sharding.create_mesh(dict(data=2)).shape)["data"] == 2  # the first 2 devices
  assert dict(sharding.create_mesh(dict(dcn_data=2, fsdp=-1)).shape) == dict(
      dcn_data=2, data=1, fsdp=4, tensor=1)  # -1 resolves within a slice


def test_parameters_are_laid_out_alike_in_every_slice():
  config = tiny(get_preset("mobilebert"), vocab_size=64)
  model = build_model(config, "pretraining")
  boxed = jax.eval_shape(lambda: init_params(model, config, jax.random.PRNGKey(0), boxed=True))
  hybrid = sharding.logical_shardings(
      boxed, sharding.create_mesh(dict(dcn_data=2, data=1, fsdp=2, tensor=2)))
  single = sharding.logical_shardings(
      boxed, sharding.create_mesh(dict(data=1, fsdp=2, tensor=2), jax.devices()[:4]))
  specs = [s.spec for s in jax.tree.leaves(hybrid)]
  assert specs == [s.spec for s in jax.tree.leaves(single)]
  assert any("fsdp" in str(spec) for spec in specs)
  assert not any("dcn_data" in str(spec) for spec in specs)


def test_slices_stay_on_their_interconnect():
  pod = fake_pod(4)
  grid = sharding.device_grid(dict(dcn_data=4, data=-1, tensor=2), pod)
  assert grid.shape == (4, 4, 1, 2)
  assert [slices_of(g) for g in grid] == [{0}, {1}, {2}, {3}]
  # Within a slice the layout follows the torus, not the list order: each tensor pair is one
  # y-column of the 4x2 slice (a reshape of the x-fastest list would pair x neighbours).
  for pair in grid.reshape(-1, 2):
    assert pair[0].coords[0] == pair[1].coords[0] and pair[0].coords[1] != pair[1].coords[1]
  shuffled = [pod[i] for i in np.random.default_rng(0).permutation(len(pod))]
  np.testing.assert_array_equal(sharding.device_grid(dict(dcn_data=4, tensor=2), shuffled), grid)
  # dcn_data=2 over 4 slices: each dcn_data group's two slices extend its data axis.
  folded = sharding.device_grid(dict(dcn_data=2, data=-1, fsdp=2), pod)
  assert folded.shape == (2, 8, 2, 1)
  assert [slices_of(g) for g in folded] == [{0, 1}, {2, 3}]
  assert [slices_of(folded[0, :4]), slices_of(folded[0, 4:])] == [{0}, {1}]
  # Processes stand for slices on devices without slice_index (GPU, multi-process CPU).
  hosts = [FakeGpu(i, process_index=i // 8) for i in range(32)]
  grid = sharding.device_grid(dict(dcn_data=4, data=2, fsdp=4), hosts)
  assert [{d.process_index for d in g.flat} for g in grid] == [{0}, {1}, {2}, {3}]


def test_several_slices_with_dcn_data_1_fall_back_to_the_device_order(caplog):
  pod = fake_pod(2)
  with caplog.at_level(logging.WARNING, logger=sharding.__name__):
    grid = sharding.device_grid(dict(data=-1), pod)
  assert "set config.mesh.dcn_data" in caplog.text and "reshaping them" in caplog.text
  assert [c.id for c in grid.flat] == list(range(16))


@pytest.mark.parametrize("shape, message", [
    (dict(model=2), r"unknown mesh axis 'model'"),
    (dict(dcn_data=3), r"mesh axis dcn_data=3 does not divide the 8 devices"),
    (dict(dcn_data=-1), r"mesh axis dcn_data=-1: sizes are >= 1"),
    (dict(tensor=0), r"mesh axis tensor=0: sizes are >= 1"),
    (dict(data=2.0), r"mesh axis data=2.0 is not an integer"),
    (dict(data=-1, fsdp=-1), r"at most one axis may be -1"),
    (dict(fsdp=3), r"'fsdp': 3.* does not divide the 8 available devices"),
    (dict(dcn_data=2, tensor=3), r"does not divide the 8 available devices \(4 per dcn_data"),
])
def test_bad_shapes_name_the_axis(shape, message):
  with pytest.raises(ValueError, match=message):
    sharding.create_mesh(shape)


def test_slice_counts_that_do_not_fit():
  with pytest.raises(ValueError, match=r"dcn_data=2 does not divide the number of slices, 3 "
                                       r"\(the devices' slice_index\)"):
    sharding.device_grid(dict(dcn_data=2), fake_pod(3, dims=(2, 2, 1)))
  with pytest.raises(ValueError, match=r"dcn_data=2 does not divide the number of slices, 1"):
    sharding.device_grid(dict(dcn_data=2), fake_pod(1))
  with pytest.raises(ValueError, match=r"data=1 is not a multiple of the 2 slices in each "
                                       r"dcn_data group"):
    sharding.device_grid(dict(dcn_data=2, data=1, fsdp=-1), fake_pod(4))
  c = tiny_config()
  c.mesh.dcn_data = 3
  with pytest.raises(PlanError, match=r"config.mesh: mesh axis dcn_data=3 does not divide"):
    plan(c)
  c = tiny_config(dcn_data=2, data=2, fsdp=1, tensor=1)
  c.data.batch_size = 6
  with pytest.raises(PlanError, match=r"dcn_data x data x fsdp = 4 devices .*multiple of 4"):
    plan(c)
