"""Layers under nn.scan (`ModelConfig.scan_layers`): same outputs, same gradients, one layout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilebert_jax import pretrained
from mobilebert_jax.interop import hf
from mobilebert_jax.models import (ModelConfig, build_model, get_preset, to_canonical_layout,
                                   to_model_layout)
from mobilebert_jax.parallel import sharding

PRESETS = ["bert_base", "ib_bert_large", "mobilebert", "mobilebert_tiny"]
FLAGS = dict(output_hidden_states=True, output_attentions=True, output_attention_scores=True)


def tiny_config(name, **changes):
  # Three layers, so the stacked axis differs from every other dimension.
  return get_preset(name, tiny_variant=True, num_layers=3, **changes)


def batch():
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 1, 1000)
  mask = jnp.ones((2, 10), jnp.int32).at[1, 7:].set(0)
  return ids, mask


def init(config, head="pretraining", seed=0):
  """The model's own init, jitted (eager init of the many small tables is slow)."""
  model = build_model(config, head)
  return jax.jit(lambda rng: pretrained.init_params(model, config, rng))(
      jax.random.PRNGKey(seed))


def canonical_params(config, head="pretraining"):
  return init(config.replace(scan_layers=False), head)


def assert_trees_close(a, b, atol=1e-6, rtol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", PRESETS)
def test_scanned_outputs_equal_unscanned(name):
  config = tiny_config(name)
  scanned = config.replace(scan_layers=True)
  params = canonical_params(config)
  ids, mask = batch()
  ref = build_model(config).apply({"params": params}, ids, mask, **FLAGS)
  out = build_model(scanned).apply({"params": to_model_layout(params, scanned)}, ids, mask,
                                   **FLAGS)
  for field in ("hidden_states", "attentions", "attention_scores"):
    assert isinstance(getattr(out, field), tuple)
    assert len(getattr(out, field)) == len(getattr(ref, field))
  assert_trees_close(out, ref)


@pytest.mark.parametrize("name", ["ib_bert_large", "mobilebert"])
@pytest.mark.parametrize("remat", [False, True])
def test_scanned_gradients_equal_unscanned(name, remat):
  config = tiny_config(name, remat=remat)
  scanned = config.replace(scan_layers=True)
  params = canonical_params(config)
  ids, mask = batch()

  def loss_fn(model):
    def loss(p):
      out = model.apply({"params": p}, ids, mask, output_hidden_states=True)
      logp = jax.nn.log_softmax(out.prediction_logits)
      nll = -jnp.take_along_axis(logp, ids[..., None], axis=-1).mean()
      return nll + 1e-3 * sum(jnp.mean(h ** 2) for h in out.hidden_states)
    return loss

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn(build_model(config))))(params)
  loss, grads = jax.jit(jax.value_and_grad(loss_fn(build_model(scanned))))(
      to_model_layout(params, scanned))
  assert "layers" in grads["backbone"]
  np.testing.assert_allclose(loss, ref_loss, atol=1e-6, rtol=0)
  # Both jitted: XLA fuses the two programs alike, so only float32 rounding can differ.
  assert_trees_close(to_canonical_layout(grads, scanned), ref_grads, rtol=1e-6)


def test_dropout_runs_under_scan():
  config = tiny_config("mobilebert", hidden_dropout=0.1, scan_layers=True)
  model = build_model(config)
  params = init(config)
  ids, mask = batch()
  run = jax.jit(lambda key: model.apply({"params": params}, ids, mask, deterministic=False,
                                         rngs={"dropout": key}).prediction_logits)
  first, second = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
  assert np.isfinite(first).all()
  assert not np.allclose(first, second)


def test_layout_round_trip_is_exact_and_idempotent():
  config = tiny_config("ib_bert_large", scan_layers=True)
  params = canonical_params(config)
  stacked = to_model_layout(params, config)
  backbone = stacked["backbone"]
  assert "layers" in backbone and not any(k.startswith("layer_") for k in backbone)
  kernel = backbone["layers"]["attention"]["query"]["kernel"]
  np.testing.assert_array_equal(kernel[2], params["backbone"]["layer_2"]["attention"]["query"]
                                ["kernel"])
  assert to_model_layout(stacked, config) is stacked
  back = to_canonical_layout(stacked, config)
  assert to_canonical_layout(back, config) is back
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # A bare backbone, numpy leaves, and an unscanned config (canonical out).
  host = jax.tree.map(np.asarray, params["backbone"])
  host_stacked = to_model_layout(host, config)
  assert isinstance(host_stacked["layers"]["ffn"]["output"]["kernel"], np.ndarray)
  unscanned = config.replace(scan_layers=False)
  assert to_model_layout(host, unscanned) is host
  assert sorted(to_model_layout(host_stacked, unscanned)) == sorted(host)
  # The model's own init has the stacked layout.
  own = init(config)
  assert jax.tree.structure(own) == jax.tree.structure(stacked)


def test_layout_rejects_a_depth_mismatch():
  config = tiny_config("bert_base", scan_layers=True)
  params = canonical_params(config)
  with pytest.raises(ValueError, match="num_layers=4"):
    to_model_layout(params, config.replace(num_layers=4))
  with pytest.raises(ValueError, match="num_layers=4"):
    to_canonical_layout(to_model_layout(params, config), config.replace(num_layers=4))


def test_full_size_boxed_abstract_layouts_and_shardings():
  config = get_preset("ib_bert_large", scan_layers=True)
  boxed = lambda c: jax.eval_shape(lambda: pretrained.init_params(
      build_model(c), c, jax.random.PRNGKey(0), boxed=True))
  scanned = boxed(config)
  canonical = boxed(config.replace(scan_layers=False))
  query = scanned["backbone"]["layers"]["attention"]["query"]["kernel"]
  assert query.value.shape == (24, 512, 4, 256)
  assert query.names == ("layers", "embed", "heads", "kv")
  converted = to_model_layout(canonical, config)
  is_box = lambda x: isinstance(x, nn.Partitioned)
  same = lambda a, b: (a.value.shape, a.value.dtype, a.names) == (b.value.shape, b.value.dtype,
                                                                  b.names)
  assert jax.tree.structure(converted, is_leaf=is_box) == jax.tree.structure(scanned,
                                                                            is_leaf=is_box)
  assert all(jax.tree.leaves(jax.tree.map(same, converted, scanned, is_leaf=is_box)))
  assert all(jax.tree.leaves(jax.tree.map(same, to_canonical_layout(scanned, config), canonical,
                                          is_leaf=is_box)))
  # The "layers" axis maps to no mesh axis; the other dimensions shard as before.
  specs = nn.logical_to_mesh(sharding.logical_specs(scanned), sharding.LOGICAL_RULES)
  ref = nn.logical_to_mesh(sharding.logical_specs(canonical), sharding.LOGICAL_RULES)
  spec = specs["backbone"]["layers"]["ffn"]["intermediate"]["kernel"]
  assert tuple(spec) == (None,) + tuple(ref["backbone"]["layer_0"]["ffn"]["intermediate"]
                                        ["kernel"])


def test_scanned_checkpoint_loads_into_an_unscanned_model(tmp_path):
  config = tiny_config("mobilebert", scan_layers=True)
  model = build_model(config)
  params = init(config, seed=3)
  ids, mask = batch()
  ref = model.apply({"params": params}, ids, mask, **FLAGS)
  pretrained.save_pretrained(str(tmp_path), config, params, "pretraining")

  saved_config, head, saved = pretrained.read_checkpoint(str(tmp_path))
  assert saved_config == config and head == "pretraining"
  assert "layer_0" in saved["backbone"] and "layers" not in saved["backbone"]
  unscanned = saved_config.replace(scan_layers=False)
  out = build_model(unscanned).apply({"params": saved}, ids, mask, **FLAGS)
  assert_trees_close(out, ref)

  loaded_model, loaded = pretrained.load_pretrained(str(tmp_path))
  assert "layers" in loaded["backbone"]
  assert_trees_close(loaded_model.apply({"params": loaded}, ids, mask, **FLAGS), ref)

  # A new head on a scanned checkpoint: the backbone comes over, the result applies directly.
  cls_model, cls_params = pretrained.load_pretrained(str(tmp_path), "classification")
  assert "layers" in cls_params["backbone"]
  cls_out = cls_model.apply({"params": cls_params}, ids, mask)
  assert_trees_close(cls_out.last_hidden_state, ref.last_hidden_state)


def test_config_round_trip_and_hf_export_leave_scan_layers_out():
  config = get_preset("mobilebert", scan_layers=True, remat=True)
  assert ModelConfig.from_dict(config.to_dict()) == config
  assert ModelConfig().scan_layers is False
  assert "scan_layers" not in hf.config_to_hf(config, "pretraining")
  assert hf.config_from_hf(hf.config_to_hf(config, "pretraining")).scan_layers is False


def test_nas_layers_reject_scan_layers():
  with pytest.raises(ValueError, match="scan_layers"):
    ModelConfig(use_bottleneck=False, intra_size=None, attention_input="layer_input",
                num_layers=2, layer_ops=("mha4", "ffn64"), scan_layers=True)
