"""Checkpointer: round trips, keep-last-K, resharding between meshes, async saves and errors."""

import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mobilebert_jax.training import checkpointing
from mobilebert_jax.training.checkpointing import Checkpointer


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict
  stats: dict


def _mesh(devices, shape):
  return Mesh(np.asarray(devices).reshape(shape), ("data", "fsdp"))


def _state(seed=0):
  rng = np.random.default_rng(seed)
  return State(step=jnp.asarray(seed, jnp.int32),
               params={"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
                                 "bias": jnp.zeros((4,), jnp.bfloat16)}},
               stats={"count": jnp.arange(3)})


def _abstract(tree, sharding):
  """Abstract leaves on `sharding`; Python scalars (TrainState.step outside jit) stay as they are."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
      if hasattr(x, "shape") else x, tree)


def _assert_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _single():
  return NamedSharding(_mesh(jax.devices()[:1], (1, 1)), P())


def test_round_trip_of_dataclass_and_extra(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every_steps=10, async_save=False)
  state = _state(seed=3)
  extra = {"stage": "distill", "data": {"epoch": 1, "position": 1234}}
  assert ckpt.save(10, state, extra)
  restored, restored_extra = ckpt.restore(_abstract(state, _single()))
  assert isinstance(restored, State)
  _assert_equal(restored, state)
  assert restored.params["dense"]["bias"].dtype == jnp.bfloat16
  assert restored_extra == extra
  ckpt.close()


def test_round_trip_of_flax_train_state_with_optimizer(tmp_path):
  params = {"w": jnp.ones((4, 2)), "b": jnp.zeros((2,))}
  tx = optax.adamw(1e-3)
  state = train_state.TrainState.create(apply_fn=lambda *a: None, params=params, tx=tx)
  grads = jax.tree.map(jnp.ones_like, params)
  state = state.apply_gradients(grads=grads)
  with Checkpointer(str(tmp_path), save_every_steps=1, async_save=False) as ckpt:
    ckpt.save(1, state, {})
    restored, extra = ckpt.restore(_abstract(state, _single()))
  assert extra == {}
  assert int(restored.step) == 1
  _assert_equal(restored.params, state.params)
  _assert_equal(restored.opt_state, state.opt_state)


def test_nested_dict_round_trip_and_explicit_step(tmp_path):
  ckpt = Checkpointer(str(tmp_path), save_every_steps=1, async_save=False)
  trees = {step: {"a": {"b": jnp.full((2, 3), step, jnp.float32)}, "c": jnp.asarray(step)}
           for step in (1, 2)}
  for step, tree in trees.items():
    ckpt.save(step, tree, {"step": step})
  restored, extra = ckpt.restore(_abstract(trees[1], _single()), step=1)
  _assert_equal(restored, trees[1])
  assert extra == {"step": 1}
  ckpt.close()


def test_should_save_keep_last_k_and_latest_step(tmp_path):
  ckpt = Checkpointer(str(tmp_path), save_every_steps=2, keep=2, async_save=False)
  assert ckpt.latest_step() is None
  assert [s for s in range(7) if ckpt.should_save(s)] == [2, 4, 6]
  state = {"x": jnp.ones(3)}
  started = [ckpt.save(step, state, {"step": step}) for step in range(1, 9)]
  assert started == [False, True, False, True, False, True, False, True]
  assert ckpt.latest_step() == 8
  assert ckpt.all_steps() == [6, 8]
  assert sorted(os.listdir(tmp_path)) == ["6", "8"]
  # force saves an off-interval step, but never overwrites an existing one.
  assert ckpt.save(9, state, {}, force=True)
  assert not ckpt.save(9, state, {}, force=True)
  assert ckpt.all_steps() == [8, 9]
  ckpt.close()
  # A new Checkpointer on the same directory sees the same steps.
  assert Checkpointer(str(tmp_path), save_every_steps=2).latest_step() == 9


@pytest.mark.parametrize("direction", ["8_to_1", "1_to_8"])
def test_restore_onto_a_different_mesh(tmp_path, direction):
  assert len(jax.devices()) == 8, "tests/conftest.py should give 8 CPU devices"
  sharded = NamedSharding(_mesh(jax.devices(), (4, 2)), P("data", "fsdp"))
  single = _single()
  save_sharding, restore_sharding = (sharded, single) if direction == "8_to_1" else (single, sharded)
  value = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8)
  state = {"w": jax.device_put(value, save_sharding),
           "v": jax.device_put(-value[:8], save_sharding)}
  assert len(state["w"].sharding.device_set) == len(save_sharding.device_set)
  ckpt = Checkpointer(str(tmp_path), save_every_steps=1)
  ckpt.save(1, state, {"mesh": direction})
  ckpt.wait_until_finished()

  restored, extra = ckpt.restore(_abstract(state, restore_sharding))
  assert extra == {"mesh": direction}
  for key in state:
    assert restored[key].sharding == restore_sharding
    np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(state[key]))
  ckpt.close()


def test_async_save_then_wait(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "run"), save_every_steps=5, async_save=True)
  state = _state(seed=1)
  expected = jax.tree.map(np.asarray, state)
  assert ckpt.save(5, state, {"stage": "pretrain"})
  # The device buffers may be donated to the next train step while the write continues.
  jax.tree.map(lambda x: x.delete(), state)
  ckpt.wait_until_finished()
  assert ckpt.latest_step() == 5
  assert os.listdir(tmp_path / "run") == ["5"]  # no temporary directory left behind
  restored, _ = ckpt.restore(_abstract(expected, _single()))
  _assert_equal(restored, expected)
  ckpt.close()


def test_relative_directory_is_made_absolute_and_urls_pass_through(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ckpt = Checkpointer("relative/ckpt", save_every_steps=1, async_save=False)
  assert ckpt.directory == str(tmp_path / "relative" / "ckpt")
  ckpt.close()
  assert checkpointing._resolve("gs://bucket/run/ckpt") == "gs://bucket/run/ckpt"


def test_empty_directory_error_names_it(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "empty"), save_every_steps=1)
  with pytest.raises(FileNotFoundError, match="no checkpoint.*empty"):
    ckpt.restore(_abstract(_state(), _single()))
  ckpt.save(1, {"x": jnp.ones(2)}, {}, force=True)
  ckpt.wait_until_finished()
  with pytest.raises(FileNotFoundError, match=r"step 7.*available steps: \[1\]"):
    ckpt.restore(_abstract({"x": jnp.ones(2)}, _single()), step=7)
  ckpt.close()


def test_shape_mismatch_error_names_leaf_and_shapes(tmp_path):
  ckpt = Checkpointer(str(tmp_path), save_every_steps=1, async_save=False)
  state = _state()
  ckpt.save(1, state, {})
  wrong = state.replace(params={"dense": {"kernel": jnp.zeros((4, 4)),
                                          "bias": state.params["dense"]["bias"]}})
  with pytest.raises(ValueError, match=r"params/dense/kernel.*\(8, 4\).*\(4, 4\)"):
    ckpt.restore(_abstract(wrong, _single()))
  with pytest.raises(ValueError, match="no leaf params/extra_param"):
    ckpt.restore(_abstract(state.replace(params={**state.params, "extra_param": jnp.ones(1)}),
                           _single()))
  with pytest.raises(ValueError, match=r"leaves that abstract_state lacks: \['stats/count'\]"):
    ckpt.restore(_abstract(state.replace(stats={}), _single()))
  with pytest.raises(TypeError, match="not JSON-serialisable"):
    ckpt.save(2, state, {"bad": object()})
  ckpt.close()
