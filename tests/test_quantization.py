"""Post-training int8 quantization and learned step-size quantization (LSQ) on tiny models."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mobilebert_jax import quantization as quant
from mobilebert_jax.models import build_model, get_preset
from mobilebert_jax.pretrained import init_params
from mobilebert_jax.quantization import lsq, ptq

VOCAB = 1024


@functools.lru_cache(maxsize=None)
def _model(name):
  """A tiny classification model (4 labels) and its params, built once per test session."""
  config = get_preset(name, tiny_variant=True, num_labels=4)
  model = build_model(config, "classification")
  return model, jax.jit(lambda rng: init_params(model, config, rng))(jax.random.PRNGKey(0))


def _ids(seed, batch, length=32):
  return np.random.default_rng(seed).integers(1, VOCAB, (batch, length)).astype(np.int32)


@pytest.fixture(scope="module", params=["mobilebert", "bert_base"])
def tiny_model(request):
  return request.param, *_model(request.param)


# ----------------------------------------------------------------------------------------------
# Weights


@pytest.mark.parametrize("path,shape,channel_axes", [
    ("ffn/intermediate/kernel", (24, 40), (1,)),
    ("layer_0/attention/query/kernel", (24, 4, 6), (1, 2)),
    ("layer_0/attention/output/kernel", (4, 6, 24), (2,)),
    ("embeddings/word_embeddings/embedding", (50, 16), (0,)),
])
def test_per_channel_int8_error_and_grid(path, shape, channel_axes):
  w = jax.random.normal(jax.random.PRNGKey(1), shape) * jnp.linspace(0.1, 3.0, shape[-1])
  axes = ptq.quantization_axes(path, len(shape))
  assert set(axes) == set(range(len(shape))) - set(channel_axes)
  q = ptq.quantize_tensor(w, 8, axes)
  assert q.values.dtype == jnp.int8 and q.scale.dtype == jnp.float32
  expected_scale_shape = tuple(n if i in channel_axes else 1 for i, n in enumerate(shape))
  assert q.scale.shape == expected_scale_shape
  np.testing.assert_allclose(q.scale, jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127,
                             rtol=1e-6)
  levels = np.asarray(q.values, np.int32)
  assert levels.min() >= -127 and levels.max() <= 127
  # Every output channel uses the full grid: its largest |level| is 127.
  assert np.all(np.max(np.abs(levels), axis=axes) == 127)
  w_hat = q.dequantize()
  assert np.all(np.abs(np.asarray(w_hat - w)) <= np.asarray(q.scale) / 2 * (1 + 1e-5))
  # W_hat is exactly on the grid: levels * scale, and re-quantizing it changes nothing.
  np.testing.assert_array_equal(w_hat, levels.astype(np.float32) * np.asarray(q.scale))
  again = ptq.quantize_tensor(w_hat, 8, axes)
  np.testing.assert_array_equal(again.values, q.values)
  np.testing.assert_allclose(again.dequantize(), w_hat, rtol=1e-6, atol=0)


def test_quantize_params_covers_kernels_and_embeddings():
  _, params = _model("mobilebert")
  qparams = ptq.quantize_params(params)
  flat = traverse_util.flatten_dict(qparams)
  for path, leaf in flat.items():
    name = path[-1]
    if name in ("kernel", "embedding"):
      assert isinstance(leaf, ptq.QuantizedTensor), path
      if path[-3:] == ("attention", "output", "kernel"):
        assert leaf.scale.shape == (1, 1, leaf.values.shape[-1])
      elif name == "kernel":
        assert leaf.scale.shape == (1,) + leaf.values.shape[1:]
      else:
        assert leaf.scale.shape == (leaf.values.shape[0], 1)
    else:
      assert not isinstance(leaf, ptq.QuantizedTensor), path
  fake = ptq.fake_quantize_params(params)
  deq = ptq.dequantize_params(qparams)
  for a, b in zip(jax.tree.leaves(fake), jax.tree.leaves(deq)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="attention/output/kernel has rank 2"):
    ptq.kernel_input_axes("layer_0/attention/output/kernel", 2)


# ----------------------------------------------------------------------------------------------
# Post-training quantization of whole models


def test_ptq_int8_logits_close_to_float(tiny_model):
  name, model, params = tiny_model
  calib = [{"input_ids": _ids(seed, 16)} for seed in (1, 2)]
  quantizer = quant.PostTrainingQuantizer(weight_bits=8, act_bits=8)
  scales = quantizer.calibrate(model, params, calib)
  dense_paths = [k for k in traverse_util.flatten_dict(params) if k[-1] == "kernel"]
  flat_scales = traverse_util.flatten_dict(scales)
  assert set(flat_scales) == {k[:-1] for k in dense_paths}
  assert all(float(s) > 0 for s in flat_scales.values())

  ids = _ids(3, 128)
  apply_float = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
  apply_int8 = jax.jit(lambda p, s, x: quantizer.quantized_apply(model, p, s, x).logits)
  weight_only_4 = quant.PostTrainingQuantizer(weight_bits=4, act_bits=None, embedding_bits=4)
  apply_w4 = jax.jit(lambda p, x: weight_only_4.quantized_apply(model, p, None, x).logits)
  ref = np.asarray(apply_float(params, ids))
  int8 = np.asarray(apply_int8(params, scales, ids))
  w4 = np.asarray(apply_w4(params, ids))

  def rel_error(x):
    return np.mean(np.abs(x - ref)) / np.mean(np.abs(ref))

  assert np.max(np.abs(int8 - ref)) < 0.15 * np.max(np.abs(ref)), name
  assert rel_error(int8) < 0.04, name
  assert np.mean(int8.argmax(-1) == ref.argmax(-1)) > 0.95, name
  # 4-bit weights (no activation quantization) are far worse than full int8.
  assert rel_error(w4) > 3 * rel_error(int8), (name, rel_error(w4), rel_error(int8))


def test_percentile_calibration_and_errors():
  model, params = _model("bert_base")
  calib = [_ids(1, 4, 16)]
  by_max = traverse_util.flatten_dict(ptq.calibrate(model, params, calib))
  by_pct = traverse_util.flatten_dict(
      ptq.calibrate(model, params, calib, method="percentile", percentile=99.0))
  assert by_max.keys() == by_pct.keys()
  assert all(float(by_pct[k]) <= float(by_max[k]) for k in by_max)
  assert any(float(by_pct[k]) < float(by_max[k]) for k in by_max)
  with pytest.raises(ValueError, match="calibration method 'mean'"):
    ptq.calibrate(model, params, calib, method="mean")
  with pytest.raises(ValueError, match="at least one batch"):
    ptq.calibrate(model, params, [])
  with pytest.raises(ValueError, match="act_bits must be an integer in \\[2, 8\\], got 16"):
    quant.PostTrainingQuantizer(act_bits=16)
  # Scales of a different model name the dense layer they lack.
  other_model, other_params = _model("mobilebert")
  scales = {"backbone": {"pooler": by_max[("backbone", "pooler")]}}
  with pytest.raises(KeyError, match="backbone/embeddings/embedding_transformation"):
    ptq.quantized_apply(other_model, other_params, scales, _ids(0, 1, 8))


# ----------------------------------------------------------------------------------------------
# Size


def test_int8_weights_compress_four_times():
  _, params = _model("bert_base")
  flat = traverse_util.flatten_dict(params)
  kernels = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] == "kernel"})
  n_kernel = sum(v.size for v in jax.tree.leaves(kernels))
  assert ptq.model_size_bits(kernels) == 32 * n_kernel
  assert ptq.model_size_bits(kernels, 8) == 8 * n_kernel
  assert ptq.compression_ratio(kernels, 8) == pytest.approx(4.0)
  assert ptq.compression_ratio(kernels, ptq.ptq_bits_by_leaf(8)) == pytest.approx(4.0)
  # Counting the float32 per-channel scales too: a little under 4x.
  stored = ptq.quantized_size_bits(ptq.quantize_params(kernels))
  assert 3.5 < 32 * n_kernel / stored < 4.0
  # Whole model: biases and norms stay float32, so the ratio is between 3.5 and 4.
  quantizer = quant.PostTrainingQuantizer()
  assert 3.5 < quantizer.compression_ratio(params) < 4.0
  assert quant.PostTrainingQuantizer(weight_bits=4, embedding_bits=4).compression_ratio(
      params) > 7.0
  one = "backbone/pooler/kernel"
  assert ptq.model_size_bits(params, {one: 8}) == (
      ptq.model_size_bits(params) - 24 * flat[("backbone", "pooler", "kernel")].size)
  with pytest.raises(KeyError, match="not/a/leaf"):
    ptq.model_size_bits(params, {"not/a/leaf": 8})


# ----------------------------------------------------------------------------------------------
# LSQ


def _lsq_reference(x, step, bits, signed, upstream):
  """Forward and gradients of LSQ written out in numpy (scalar step)."""
  qn, qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
  v = x / step
  forward = np.clip(np.round(v), qn, qp) * step
  low, high = v <= qn, v >= qp
  inside = ~(low | high)
  local = np.where(low, qn, np.where(high, qp, -v + np.round(v)))
  g = 1.0 / math.sqrt(x.size * qp)
  return forward, upstream * inside, np.sum(upstream * local) * g, (low, high, inside)


@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (4, True), (8, True)])
def test_lsq_forward_and_gradients_match_formula(bits, signed):
  rng = np.random.default_rng(bits)
  step = 0.37
  qn, qp = lsq.lsq_range(bits, signed)
  # Values inside the range, clipped low and clipped high (none on a rounding or clip boundary).
  margin = 0.5 * (qp - qn) + 1
  x = rng.uniform((qn - margin) * step, (qp + margin) * step, size=(6, 7)).astype(np.float32)
  upstream = rng.normal(size=x.shape).astype(np.float32)
  forward, grad_x, grad_step, (low, high, inside) = _lsq_reference(
      x.astype(np.float64), step, bits, signed, upstream.astype(np.float64))
  assert low.any() and high.any() and inside.any()

  out = lsq.lsq_quantize(jnp.asarray(x), jnp.float32(step), bits, signed)
  np.testing.assert_allclose(out, forward, rtol=1e-6, atol=1e-6)
  gx, gs = jax.grad(lambda x, s: jnp.sum(lsq.lsq_quantize(x, s, bits, signed) * upstream),
                    argnums=(0, 1))(jnp.asarray(x), jnp.float32(step))
  np.testing.assert_array_equal(gx, grad_x.astype(np.float32))  # the STE mask
  np.testing.assert_allclose(gs, grad_step, rtol=1e-4)


def test_lsq_step_gradient_each_case():
  step, bits = 0.5, 4                      # Qn = -8, Qp = 7, g = 1 / sqrt(N * 7)
  g = 1.0 / math.sqrt(1 * 7)

  def grad_step(value):
    return float(jax.grad(lambda s: lsq.lsq_quantize(jnp.float32(value), s, bits)[()])(
        jnp.float32(step)))

  assert grad_step(1.3) == pytest.approx((-1.3 / step + round(1.3 / step)) * g, rel=1e-5)
  assert grad_step(-2.2) == pytest.approx((2.2 / step + round(-2.2 / step)) * g, rel=1e-5)
  assert grad_step(-9.0) == pytest.approx(-8 * g, rel=1e-6)    # clipped low: Qn
  assert grad_step(12.0) == pytest.approx(7 * g, rel=1e-6)     # clipped high: Qp


def test_lsq_per_channel_step_and_init():
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
  step = lsq.init_step(x, 4, axes=(0,))
  assert step.shape == (1, 3)
  np.testing.assert_allclose(step, 2 * np.mean(np.abs(x), axis=0, keepdims=True) / math.sqrt(7),
                             rtol=1e-6)
  assert float(lsq.init_step(x, 8)) == pytest.approx(2 * float(jnp.mean(jnp.abs(x))) /
                                                     math.sqrt(127), rel=1e-6)
  upstream = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  gs = jax.grad(lambda s: jnp.sum(lsq.lsq_quantize(x, s, 4) * upstream))(step)
  assert gs.shape == (1, 3)
  for c in range(3):  # each channel is its own LSQ quantizer with N = 5 elements
    _, _, expected, _ = _lsq_reference(np.asarray(x[:, c], np.float64), float(step[0, c]), 4,
                                       True, np.asarray(upstream[:, c], np.float64))
    np.testing.assert_allclose(gs[0, c], expected, rtol=1e-4)
  with pytest.raises(ValueError, match="does not broadcast"):
    lsq.lsq_quantize(x, jnp.ones((5, 1, 2)), 4)


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True])
def test_lsq_bits_out_of_range(bits):
  with pytest.raises(ValueError, match=f"bits must be an integer in \\[2, 8\\], got {bits!r}"):
    lsq.lsq_quantize(jnp.ones(3), 0.1, bits)
  with pytest.raises(ValueError, match=f"got {bits!r}"):
    lsq.init_step(jnp.ones(3), bits)
  with pytest.raises(ValueError, match=f"weight_bits must be .* got {bits!r}"):
    lsq.lsq_interceptor({}, weight_bits=bits)


def test_lsq_on_model_trains_steps_and_weights():
  model, params = _model("mobilebert")
  # The same parameters drive a rematerialised copy (lifted transforms see the interceptor).
  model = build_model(model.config.replace(remat=True), "classification")
  ids = _ids(4, 4, 16)
  steps = lsq.init_lsq_steps(model, params, {"input_ids": ids}, weight_bits=4, act_bits=8,
                             per_channel_weights=True)
  flat_steps = traverse_util.flatten_dict(steps)
  kernels = {k[:-1]: v for k, v in traverse_util.flatten_dict(params).items()
             if k[-1] == "kernel"}
  assert {k[:-1] for k in flat_steps} == set(kernels)
  for module, kernel in kernels.items():
    n_in = 2 if module[-2:] == ("attention", "output") else 1
    assert flat_steps[module + ("kernel",)].shape == (1,) * n_in + kernel.shape[n_in:]
    assert flat_steps[module + ("input",)].shape == ()

  ref = model.apply({"params": params}, ids).logits
  unquantized = lsq.lsq_apply(model, params, steps, ids, weight_bits=None, act_bits=None).logits
  np.testing.assert_array_equal(unquantized, ref)
  int8_steps = lsq.init_lsq_steps(model, params, ids, weight_bits=8, act_bits=8)
  int8 = jax.jit(lambda p, s: lsq.lsq_apply(model, p, s, ids, weight_bits=8, act_bits=8).logits)(
      params, int8_steps)
  assert np.mean(np.abs(int8 - ref)) < 0.1 * np.mean(np.abs(ref))

  def loss(params, steps):
    out = lsq.lsq_apply(model, params, steps, ids, weight_bits=4, act_bits=8).logits
    return jnp.mean((out - ref) ** 2)

  grad_params, grad_steps = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, steps)
  assert jax.tree.structure(grad_steps) == jax.tree.structure(steps)
  for tree in (grad_params, grad_steps):
    leaves = jax.tree.leaves(tree)
    assert all(np.all(np.isfinite(x)) for x in leaves)
  assert all(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(grad_steps))
  kernel_grad = grad_params["backbone"]["layer_0"]["ffn"]["output"]["kernel"]
  assert np.any(np.asarray(kernel_grad) != 0)
  first = "backbone/embeddings/embedding_transformation"
  for kept, used in (("input", "kernel"), ("kernel", "input")):
    partial = traverse_util.unflatten_dict({k: v for k, v in flat_steps.items() if k[-1] == kept})
    bits = {"weight_bits": 4 if used == "kernel" else None,
            "act_bits": 8 if used == "input" else None}
    with pytest.raises(KeyError, match=f"'{used}' step for dense layer '{first}'"):
      lsq.lsq_apply(model, params, partial, ids, **bits)
  with pytest.raises(KeyError, match="LSQ step sizes for dense layer 'backbone/pooler'"):
    missing = {k: v for k, v in steps["backbone"].items() if k != "pooler"}
    lsq.lsq_apply(model, params, {**steps, "backbone": missing}, ids)
