"""Post-training int8 quantization, learned step-size quantization (LSQ) and KDLSQ-BERT on tiny
models (and BERT-base shapes, never materialised)."""

import functools
import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mobilebert_jax import quantization as quant
from mobilebert_jax.models import build_model, get_preset
from mobilebert_jax.pretrained import abstract_params, init_params
from mobilebert_jax.quantization import kdlsq, lsq, ptq

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


# ----------------------------------------------------------------------------------------------
# KDLSQ-BERT


def test_lsq_step_gradient_scale_counts_features_per_example():
  """g = 1 / sqrt(N Qp) (Esser et al. 2020): N = N_F = T x D features of one example for a dense
  input [B, T, D], whatever B is; N = N_W, every element, for the kernel."""
  bits, (t, d, f) = 4, (5, 6, 3)
  s_x, s_w = 0.3, 0.4
  rng = np.random.default_rng(0)
  layer = nn.DenseGeneral(f)
  kernel = rng.normal(size=(d, f))
  params = {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.zeros(f)}
  steps = {"input": jnp.float32(s_x), "kernel": jnp.float32(s_w)}
  w_hat = _lsq_reference(kernel, s_w, bits, True, 0.0)[0]

  @jax.jit
  def grad(steps, x, up):
    def loss(steps):
      with nn.intercept_methods(lsq.lsq_interceptor(steps, weight_bits=bits, act_bits=bits)):
        return jnp.sum(layer.apply({"params": params}, x) * up)
    return jax.grad(loss)(steps)

  for b in (2, 5):
    x, up = 2 * rng.normal(size=(b, t, d)), rng.normal(size=(b, t, f))
    grads = grad(steps, jnp.asarray(x, jnp.float32), jnp.asarray(up, jnp.float32))
    x_hat = _lsq_reference(x, s_x, bits, True, 0.0)[0]
    # `_lsq_reference` scales by 1 / sqrt(x.size Qp) = 1 / sqrt(B T D Qp); N_F = T D is B x less.
    by_size = _lsq_reference(x, s_x, bits, True, up @ w_hat.T)[2]
    np.testing.assert_allclose(grads["input"], by_size * math.sqrt(b), rtol=1e-4)
    np.testing.assert_allclose(grads["input"], by_size * math.sqrt(x.size / (t * d)), rtol=1e-4)
    grad_w_hat = np.einsum("btd,btf->df", x_hat, up)
    np.testing.assert_allclose(grads["kernel"],
                               _lsq_reference(kernel, s_w, bits, True, grad_w_hat)[2], rtol=1e-4)

def test_kdlsq_step_init_is_the_truncated_range_over_qp():
  """s0 = max(|x_(k)|, |x_(n-1-k)|) / Qp, k = round(n a / 2), a = 5% (Jin et al. 2021): the
  values -60..139 (n = 200, k = 5) keep [x_(5), x_(194)] = [-55, 134]."""
  values = np.random.default_rng(0).permutation(np.arange(200) - 60).astype(np.float32)
  x = values.reshape(10, 20)
  assert float(lsq.init_step(x, 4, method="kdlsq")) == pytest.approx(134 / 7)
  assert float(lsq.init_step(x, 8, method="kdlsq")) == pytest.approx(134 / 127)
  assert float(lsq.init_step(x, 4, method="kdlsq", truncation=0.0)) == pytest.approx(139 / 7)
  assert float(lsq.init_step(x, 4)) == pytest.approx(  # LSQ's, still the default of init_step
      2 * np.mean(np.abs(values)) / math.sqrt(7), rel=1e-6)
  # Per output channel (2 bits, Qp = 1): -2x spans -278..120, x + 100 spans 40..239.
  columns = np.stack([values, -2 * values, values + 100], axis=1)
  per_channel = lsq.init_step(columns, 2, axes=(0,), method="kdlsq")
  assert per_channel.shape == (1, 3)
  np.testing.assert_allclose(per_channel[0], [134, 268, 234])
  with pytest.raises(ValueError, match="step init 'max' is not one of"):
    lsq.init_step(x, 4, method="max")


def test_int2_bert_base_with_word_embeddings_compresses_like_the_paper():
  """The stored int2 BERT-base: kernels and the word table at 2 bits, every step size and every
  other leaf at 32 bits. That is 14.94x, KDLSQ-BERT's (and TernaryBERT's) 14.9x; float
  embeddings would cap it at 3.74x."""
  config = get_preset("bert_base", num_labels=2)
  model = build_model(config, "classification")
  params = abstract_params(model, config)
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  steps = jax.eval_shape(lambda p, i: lsq.init_lsq_steps(
      model, p, i, weight_bits=2, act_bits=8, embedding_bits=2, step_init="kdlsq"), params, ids)

  flat = traverse_util.flatten_dict(params)
  kernels = [k for k in flat if k[-1] == "kernel"]
  assert len(kernels) == 12 * 6 + 2  # q, k, v, output, intermediate, output per layer; pooler
  n_total = sum(int(np.prod(v.shape)) for v in flat.values())  # and classifier
  n_kernel = sum(int(np.prod(flat[k].shape)) for k in kernels)
  n_word = 30522 * 768
  n_steps = 2 * len(kernels) + 1  # an input and a kernel step per dense layer, one for the table
  flat_steps = traverse_util.flatten_dict(steps)
  assert len(flat_steps) == n_steps and all(v.shape == () for v in flat_steps.values())
  expected = 2 * (n_kernel + n_word) + 32 * (n_total - n_kernel - n_word + n_steps)
  assert quant.lsq_size_bits(params, steps, 2, 2) == expected
  ratio = quant.lsq_compression_ratio(params, steps, 2, 2)
  assert ratio == pytest.approx(32 * n_total / expected)
  assert ratio == pytest.approx(14.9, abs=0.05)
  dense_only = traverse_util.unflatten_dict(
      {k: v for k, v in flat_steps.items() if k[-1] != "embedding"})
  assert quant.lsq_compression_ratio(params, dense_only, 2) == pytest.approx(
      32 * n_total / (2 * n_kernel + 32 * (n_total - n_kernel + 2 * len(kernels))))
  assert quant.lsq_compression_ratio(params, dense_only, 2) == pytest.approx(3.74, abs=0.01)


def test_kdlsq_loss_distils_attention_and_adds_an_optional_ground_truth_term():
  model, teacher = _model("bert_base")
  ids = _ids(5, 4, 16)
  mask = np.ones_like(ids)
  mask[1, 10:] = 0
  batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
           "labels": np.array([0, 1, 2, 3], np.int32)}

  def ctx(ground_truth_weight):  # the paper's defaults: 2-bit weights and word table, 8-bit inputs
    stage = types.SimpleNamespace(**dict(kdlsq.STAGE_KEYS, ground_truth_weight=ground_truth_weight))
    return types.SimpleNamespace(model=model, teacher_model=model, stage=stage)

  aux = kdlsq.kdlsq_aux_from(ctx(0.0), teacher, batch)
  table = teacher["backbone"]["embeddings"]["word_embeddings"]["embedding"]
  np.testing.assert_allclose(aux["lsq_steps"]["backbone"]["embeddings"]["word_embeddings"][
      "embedding"], lsq.init_step(table, 2, method="kdlsq"), rtol=1e-6)
  params = {"model": teacher, "aux": aux}  # the student starts from the full-precision teacher

  bits = kdlsq.bits(ctx(0.0).stage)

  @jax.jit
  def run(params):
    def attention(p):  # without the ground truth; the whole loss comes along
      loss, terms = kdlsq.kdlsq_loss(ctx(0.0), p, teacher, batch, None, 0)
      return terms["attention"], (loss, terms)

    attention_grads, off = jax.grad(attention, has_aux=True)(params)
    steps = kdlsq.positive_steps(params["aux"]["lsq_steps"])
    logits = lsq.lsq_apply(model, params["model"], steps, ids, mask, batch["token_type_ids"],
                           **bits).logits
    return off, kdlsq.kdlsq_loss(ctx(1.0), params, teacher, batch, None, 0), attention_grads, logits

  (off, terms), (on, terms_on), grads, logits = run(params)
  assert float(terms["attention"]) > 0 and float(terms["hidden"]) > 0
  assert "ground_truth" not in terms
  query = grads["model"]["backbone"]["layer_0"]["attention"]["query"]
  assert np.any(np.asarray(query["kernel"]) != 0)
  assert np.any(np.asarray(grads["aux"]["lsq_steps"]["backbone"]["layer_0"]["attention"][
      "query"]["kernel"]) != 0)
  logits = np.asarray(logits, np.float64)
  log_p = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                 keepdims=True)) - logits.max(-1, keepdims=True)
  ce = -np.mean(log_p[np.arange(4), batch["labels"]])
  assert float(terms_on["ground_truth"]) == pytest.approx(ce, rel=1e-4)
  assert float(on) - float(off) == pytest.approx(ce, rel=1e-3)
  # One logit (STS-B): the hard-label term is the squared error.
  z, y = np.array([[0.5], [2.0], [-1.0]], np.float32), np.array([1.0, 2.0, 0.0], np.float32)
  assert float(kdlsq.ground_truth_loss(z, y)) == pytest.approx(np.mean((z[:, 0] - y) ** 2))
