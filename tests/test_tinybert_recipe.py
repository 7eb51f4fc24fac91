"""TinyBERT's recipe on a regression task (STS-B, one logit): the prediction-layer losses of the
strategies that use `objectives.prediction_loss` train the student, on tiny real models."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilebert_jax.distill import strategies
from mobilebert_jax.models import build_model, get_preset
from mobilebert_jax.pretrained import init_params
from mobilebert_jax.quantization import kdlsq


@pytest.fixture(scope="module")
def regression_pair():
  """A teacher and a student with one output (STS-B), and a batch of 3 sequences of length 8."""
  config = get_preset("mobilebert", tiny_variant=True, vocab_size=64, num_labels=1)
  model = build_model(config, "classification")
  teacher = init_params(model, config, jax.random.PRNGKey(0))
  student = init_params(model, config, jax.random.PRNGKey(1))
  ids = np.random.default_rng(0).integers(5, 64, (3, 8)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[2, 5:] = 0
  batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
           "labels": np.array([0.5, 2.0, 4.5], np.float32)}
  return model, teacher, student, batch


def logits(model, params, batch):
  return np.asarray(model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                batch["token_type_ids"]).logits, np.float64)


def nonzero_leaves(grads) -> int:
  return sum(bool(np.any(np.asarray(g) != 0)) for g in jax.tree_util.tree_leaves(grads))


def test_task_prediction_distils_a_regression_head(regression_pair):
  model, teacher, student, batch = regression_pair
  ctx = types.SimpleNamespace(model=model, teacher_model=model,
                              stage=types.SimpleNamespace(temperature=1.0))

  def loss(p):
    return strategies.task_prediction_loss(ctx, {"model": p}, teacher, batch, None, 0)[0]

  value, grads = jax.value_and_grad(loss)(student)
  mse = np.mean((logits(model, student, batch) - logits(model, teacher, batch)) ** 2)
  assert mse > 0 and float(value) == pytest.approx(mse, rel=1e-4)
  assert nonzero_leaves(grads["classifier"]) == len(jax.tree_util.tree_leaves(
      grads["classifier"]))
  assert nonzero_leaves(grads) > len(jax.tree_util.tree_leaves(grads)) // 2


def test_kdlsq_prediction_term_on_a_regression_head(regression_pair):
  model, teacher, student, batch = regression_pair
  stage = types.SimpleNamespace(temperature=1.0, weight_bits=8, act_bits=8)
  ctx = types.SimpleNamespace(model=model, teacher_model=model, stage=stage)
  params = {"model": student, "aux": kdlsq.kdlsq_aux_from(ctx, student, batch)}

  def prediction(p):
    return kdlsq.kdlsq_loss(ctx, p, teacher, batch, jax.random.PRNGKey(2), 0)[1]["prediction"]

  value, grads = jax.value_and_grad(prediction)(params)
  assert float(value) > 0
  assert nonzero_leaves(grads["model"]["classifier"]) > 0
  assert jnp.isfinite(value)
