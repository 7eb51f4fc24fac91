"""Model structure: reference parameter counts, sharding annotations, bf16, remat, bad configs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilebert_jax.models import ModelConfig, build_model, get_preset, tiny
from mobilebert_jax.parallel import sharding
from mobilebert_jax.pretrained import abstract_params, init_params

# MobileBERT paper Table 1 (and TinyBERT). Counted as the model the papers describe: encoder,
# pooler and MLM transform, without the vocabulary-sized output rows (extra decoder, output
# bias). MobileBERT-TINY's published 15.1M cannot be reproduced from its published sizes under
# any single counting convention that also gives 25.3M for MobileBERT (see README); its bound
# is wider.
REFERENCE_COUNTS = {
    "mobilebert": (25.3e6, 0.01),
    "mobilebert_tiny": (15.1e6, 0.07),
    "ib_bert_large": (293e6, 0.01),
    "bert_base": (109e6, 0.01),
    "tinybert_4l": (14.5e6, 0.01),
}


def paper_count(name):
  config = get_preset(name)
  params = abstract_params(build_model(config, "pretraining"), config)
  mlm = params["mlm"]
  vocab_output = mlm["bias"].size + (mlm["extra_decoder"].size if "extra_decoder" in mlm else 0)
  total = sum(x.size for x in jax.tree.leaves(params))
  return total - vocab_output - params["nsp"]["kernel"].size - params["nsp"]["bias"].size


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_full_size_parameter_counts(name):
  expected, rel = REFERENCE_COUNTS[name]
  count = paper_count(name)
  assert abs(count - expected) / expected <= rel, f"{name}: {count / 1e6:.2f}M vs {expected / 1e6}M"


def test_bert_large_and_base_encoder_counts_match_transformers_exactly():
  config = get_preset("bert_base")
  count = sum(x.size for x in jax.tree.leaves(abstract_params(build_model(config, "base"), config)))
  assert count == 109_482_240  # transformers BertModel(BertConfig()).num_parameters()


@pytest.mark.parametrize("name", ["mobilebert", "ib_bert_large", "bert_base"])
def test_every_parameter_has_logical_axes_and_shards_on_a_mesh(name):
  config = get_preset(name)
  model = build_model(config, "pretraining")
  boxed = jax.eval_shape(lambda: init_params(model, config, jax.random.PRNGKey(0), boxed=True))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  known = {rule[0] for rule in sharding.LOGICAL_RULES}
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), f"unannotated parameter {leaf}"
    assert len(leaf.names) == leaf.value.ndim
    assert set(leaf.names) - {None} <= known
  mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = sharding.logical_shardings(boxed, mesh)
  query = shardings["backbone"]["layer_0"]["attention"]["query"]["kernel"]
  assert query.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  ffn = shardings["backbone"]["layer_3"]["ffn"]["intermediate"]["kernel"]
  assert ffn.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_rules_table_alone_changes_the_layout():
  config = tiny(get_preset("mobilebert"))
  model = build_model(config, "base")
  boxed = jax.eval_shape(lambda: init_params(model, config, jax.random.PRNGKey(0), boxed=True))
  mesh = sharding.create_mesh({"data": 1, "fsdp": 1, "tensor": 8})
  rules = [(name, None) for name, _ in sharding.LOGICAL_RULES]
  replicated = sharding.logical_shardings(boxed, mesh, rules)
  assert all(s.spec == jax.sharding.PartitionSpec(*([None] * len(s.spec)))
             for s in jax.tree.leaves(replicated))
  default = sharding.logical_shardings(boxed, mesh)
  assert default["layer_0"]["attention"]["query"]["kernel"].spec[1] is None  # 4 heads, 8 devices
  assert default["layer_0"]["ffn"]["intermediate"]["kernel"].spec[1] == "tensor"


def test_mesh_errors():
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.create_mesh({"model": 2})
  with pytest.raises(ValueError, match="does not divide"):
    sharding.create_mesh({"data": 3})


def test_bf16_compute_with_float32_params_stays_close():
  config = tiny(get_preset("mobilebert"), vocab_size=128)
  params = init_params(build_model(config, "pretraining"), config, jax.random.PRNGKey(0))
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 5, 128)
  f32 = build_model(config, "pretraining").apply({"params": params}, ids,
                                                  output_hidden_states=True)
  bf16 = build_model(config, "pretraining", dtype=jnp.bfloat16).apply(
      {"params": params}, ids, output_hidden_states=True)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert bf16.prediction_logits.dtype == jnp.bfloat16
  assert bf16.last_hidden_state.dtype == jnp.bfloat16
  scale = float(jnp.max(jnp.abs(f32.prediction_logits)))
  err = float(jnp.max(jnp.abs(bf16.prediction_logits.astype(jnp.float32) - f32.prediction_logits)))
  assert err / scale < 0.05


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable",
                                    "dots_with_no_batch_dims_saveable"])
def test_remat_gives_same_outputs_and_gradients(policy):
  config = tiny(get_preset("ib_bert_large"), vocab_size=64).replace(remat_policy=policy)
  ids = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 5, 64)
  params = init_params(build_model(config, "pretraining"), config, jax.random.PRNGKey(0))

  def loss(p, cfg):
    return jnp.mean(build_model(cfg, "pretraining").apply({"params": p}, ids).prediction_logits**2)

  plain = jax.grad(loss)(params, config)
  remat = jax.grad(loss)(params, config.replace(remat=True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), plain, remat)


def test_dropout_needs_rng_and_is_reproducible():
  config = tiny(get_preset("bert_base"), vocab_size=64)
  model = build_model(config, "base")
  params = init_params(model, config, jax.random.PRNGKey(0))
  ids = jnp.ones((2, 8), jnp.int32)
  a = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
  b = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
  c = model.apply({"params": params}, ids)
  np.testing.assert_array_equal(a.last_hidden_state, b.last_hidden_state)
  assert not np.allclose(a.last_hidden_state, c.last_hidden_state)


@pytest.mark.parametrize("changes,message", [
    (dict(intra_size=130), "not divisible by num_heads"),
    (dict(normalization="batch_norm"), "normalization='batch_norm'"),
    (dict(use_bottleneck=False, intra_size=512), "needs use_bottleneck=True"),
    (dict(embedding_size=1024), "exceeds hidden_size"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
])
def test_bad_configs_are_named(changes, message):
  with pytest.raises(ValueError, match=message):
    get_preset("mobilebert").replace(**changes)


def test_sequence_longer_than_positions_is_rejected():
  config = tiny(get_preset("mobilebert"), vocab_size=64)
  model = build_model(config, "base")
  params = init_params(model, config, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="exceeds max_position_embeddings=128"):
    model.apply({"params": params}, jnp.ones((1, 129), jnp.int32))


def test_unknown_preset_and_head():
  with pytest.raises(ValueError, match="unknown model preset 'mobilebert_xl'"):
    get_preset("mobilebert_xl")
  with pytest.raises(ValueError, match="unknown model head 'tagging'"):
    build_model(ModelConfig(), "tagging")
