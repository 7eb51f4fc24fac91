"""Inference compiler options: taken on CPU, same outputs, and no library dots in the program."""

import logging

import jax
import numpy as np
import pytest

from mobilebert_jax import compilation
from mobilebert_jax.models import build_model, get_preset, tiny
from mobilebert_jax.pretrained import init_params


@pytest.fixture(scope="module")
def tiny_mobilebert():
  config = tiny(get_preset("mobilebert"), vocab_size=128)
  model = build_model(config, "base")
  params = init_params(model, config, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 128, (2, 16)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 11:] = 0

  def forward(p, i, m):
    return model.apply({"params": p}, i, attention_mask=m).last_hidden_state

  return forward, (params, ids, mask)


def test_cpu_forward_with_the_options_matches_and_uses_no_ynnpack_dots(tiny_mobilebert):
  options = compilation.inference_compiler_options()
  assert options == compilation.INFERENCE_COMPILER_OPTIONS["cpu"]
  forward, args = tiny_mobilebert
  default = jax.jit(forward).lower(*args).compile()
  tuned = compilation.jit_inference(forward).lower(*args).compile()
  np.testing.assert_allclose(np.asarray(tuned(*args)), np.asarray(default(*args)),
                             rtol=1e-5, atol=1e-5)
  # The option reaches XLA: the tuned program hands no product to YNNPACK (XLA's defaults do,
  # on the jaxlib versions that introduced the option).
  assert "ynn_fusion" not in tuned.as_text()
  assert " dot(" in tuned.as_text()


def test_options_this_xla_rejects_fall_back_to_its_defaults(tiny_mobilebert, monkeypatch, caplog):
  monkeypatch.setitem(compilation.INFERENCE_COMPILER_OPTIONS, "cpu",
                      {"xla_cpu_no_such_option_here": True})
  with caplog.at_level(logging.WARNING, logger="mobilebert_jax"):
    assert compilation.inference_compiler_options() == {}
  assert "xla_cpu_no_such_option_here" in caplog.text
  forward, args = tiny_mobilebert
  out = compilation.jit_inference(forward)(*args)
  np.testing.assert_allclose(np.asarray(out), np.asarray(jax.jit(forward)(*args)), atol=1e-6)


def test_backends_without_options_get_none():
  assert compilation.inference_compiler_options("tpu") == {}
