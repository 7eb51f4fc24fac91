"""Numerical parity with transformers' PyTorch MobileBERT and BERT in float32 (<= 1e-5)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_helpers import batch, max_diff, perturbed_model, torch_outputs
from mobilebert_jax import load_pretrained

TOL = 1e-5

PRETRAINING_CASES = {
    # MobileBERT as released: shared q/k bottleneck, NoNorm, ReLU, F=4.
    "mobilebert_shared_bottleneck_f4": ("mobilebert", {}),
    # MobileBERT-TINY: q/k/v from the bottleneck, F=2.
    "mobilebert_tiny_bottleneck_attention_f2": (
        "mobilebert", dict(use_bottleneck_attention=True, key_query_shared_bottleneck=False,
                           num_feedforward_networks=2)),
    # Inverted bottleneck as transformers can express it: intra > hidden, layer_norm + gelu, F=1.
    "inverted_bottleneck_layer_norm_gelu_f1": (
        "mobilebert", dict(intra_bottleneck_size=64, normalization_type="layer_norm",
                           hidden_act="gelu", num_feedforward_networks=1)),
    "mobilebert_f3_no_trigram": ("mobilebert", dict(num_feedforward_networks=3,
                                                    trigram_input=False)),
    "bert": ("bert", {}),
}


def _compare_encoder(torch_out, jax_out, num_layers):
  assert len(jax_out.hidden_states) == len(torch_out.hidden_states) == num_layers + 1
  assert len(jax_out.attentions) == len(torch_out.attentions) == num_layers
  for i, (t, j) in enumerate(zip(torch_out.hidden_states, jax_out.hidden_states)):
    assert max_diff(t, j) <= TOL, f"hidden_states[{i}] differs by {max_diff(t, j)}"
  for i, (t, j) in enumerate(zip(torch_out.attentions, jax_out.attentions)):
    assert j.shape == tuple(t.shape)
    assert max_diff(t, j) <= TOL, f"attentions[{i}] differs by {max_diff(t, j)}"


def _run(model, params, ids, mask, types):
  return model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                     token_type_ids=jnp.asarray(types), output_hidden_states=True,
                     output_attentions=True)


@pytest.mark.parametrize("case", sorted(PRETRAINING_CASES))
def test_pretraining_parity(case, tmp_path):
  model_type, overrides = PRETRAINING_CASES[case]
  torch_model = perturbed_model(model_type, "pretraining", **overrides)
  torch_model.save_pretrained(tmp_path)
  model, params = load_pretrained(str(tmp_path))
  ids, mask, types = batch(torch_model.config.vocab_size)
  expected = torch_outputs(torch_model, ids, mask, types)
  got = _run(model, params, ids, mask, types)
  assert max_diff(expected.prediction_logits, got.prediction_logits) <= TOL
  assert max_diff(expected.seq_relationship_logits, got.seq_relationship_logits) <= TOL
  _compare_encoder(expected, got, torch_model.config.num_hidden_layers)


@pytest.mark.parametrize("model_type", ["mobilebert", "bert"])
@pytest.mark.parametrize("head", ["base", "masked_lm", "classification", "question_answering"])
def test_head_parity(model_type, head, tmp_path):
  overrides = {"num_labels": 3} if head == "classification" else {}
  torch_model = perturbed_model(model_type, head, seed=1, **overrides)
  torch_model.save_pretrained(tmp_path)
  model, params = load_pretrained(str(tmp_path))
  ids, mask, types = batch(torch_model.config.vocab_size, seed=1)
  expected = torch_outputs(torch_model, ids, mask, types)
  got = _run(model, params, ids, mask, types)
  if head == "base":
    assert max_diff(expected.last_hidden_state, got.last_hidden_state) <= TOL
    assert max_diff(expected.pooler_output, got.pooler_output) <= TOL
  elif head == "masked_lm":
    assert max_diff(expected.logits, got.prediction_logits) <= TOL
  elif head == "classification":
    assert got.logits.shape == (3, 3)
    assert max_diff(expected.logits, got.logits) <= TOL
  else:
    assert max_diff(expected.start_logits, got.start_logits) <= TOL
    assert max_diff(expected.end_logits, got.end_logits) <= TOL
  _compare_encoder(expected, got, torch_model.config.num_hidden_layers)


def test_newcomer_mobilebert_config(tmp_path):
  """An unusual config transformers accepts: no bottleneck, gelu_new, no pooler activation."""
  torch_model = perturbed_model(
      "mobilebert", "pretraining", seed=2, use_bottleneck=False, hidden_act="gelu_new",
      classifier_activation=False, num_feedforward_networks=2, embedding_size=24,
      trigram_input=False, normalization_type="layer_norm", layer_norm_eps=1e-6)
  torch_model.save_pretrained(tmp_path)
  model, params = load_pretrained(str(tmp_path))
  ids, mask, types = batch(torch_model.config.vocab_size, seed=2)
  expected = torch_outputs(torch_model, ids, mask, types)
  got = _run(model, params, ids, mask, types)
  assert max_diff(expected.prediction_logits, got.prediction_logits) <= TOL
  assert max_diff(expected.seq_relationship_logits, got.seq_relationship_logits) <= TOL
  _compare_encoder(expected, got, torch_model.config.num_hidden_layers)


def test_pytorch_bin_weights(tmp_path):
  torch_model = perturbed_model("mobilebert", "pretraining", seed=3)
  torch_model.config.save_pretrained(tmp_path)
  torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
  model, params = load_pretrained(str(tmp_path))
  ids, mask, types = batch(torch_model.config.vocab_size, seed=3)
  expected = torch_outputs(torch_model, ids, mask, types)
  got = _run(model, params, ids, mask, types)
  assert max_diff(expected.prediction_logits, got.prediction_logits) <= TOL


def test_masked_positions_gather_matches_full_logits(tmp_path):
  torch_model = perturbed_model("mobilebert", "pretraining", seed=4)
  torch_model.save_pretrained(tmp_path)
  model, params = load_pretrained(str(tmp_path))
  ids, mask, types = batch(torch_model.config.vocab_size, seed=4)
  positions = np.array([[1, 3], [2, 0], [4, 4]], np.int32)
  full = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  sliced = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                       jnp.asarray(types), masked_lm_positions=jnp.asarray(positions))
  expected = np.take_along_axis(np.asarray(full.prediction_logits), positions[..., None], axis=1)
  np.testing.assert_allclose(np.asarray(sliced.prediction_logits), expected, atol=1e-6)
