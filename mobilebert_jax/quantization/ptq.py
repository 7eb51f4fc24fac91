"""Post-training quantization: int8 weights per output channel, calibrated int8 dense inputs.

Weights (symmetric, per output channel): for a kernel W with input axes I,

  s_c = max_{i in I} |W[i, c]| / Qp,   W_q = clip(round(W / s), -Qp, Qp),   W_hat = W_q * s

with Qp = 2^(b-1) - 1 (127 for int8). Dense kernels are [in, out]; attention query/key/value
kernels are [in, heads, head_dim] (one input axis) and the attention output kernel is
[heads, head_dim, out] (two input axes); `quantization_axes` decides this from the leaf's path.
Embedding tables are quantized per row (the tied MLM decoder's output channels).

Activations (symmetric, per tensor): the input x of every dense layer is recorded on calibration
batches (`calibrate`: max |x|, or a percentile of |x| averaged over batches), giving
s = range / Qp; `quantized_apply` then runs the model with every dense input replaced by
clip(round(x / s), -Qp, Qp) * s and the weights by W_hat. This simulates int8 inference in float.

  quantizer = PostTrainingQuantizer(weight_bits=8, act_bits=8)
  scales = quantizer.calibrate(model, params, batches)        # batches: dicts of apply kwargs
  out = quantizer.quantized_apply(model, params, scales, input_ids, attention_mask=mask)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mobilebert_jax.quantization import common

Array = jax.Array
FLOAT_BITS = 32
CALIBRATION_METHODS = ("max", "percentile")
_STATS = "quantization_stats"


# ----------------------------------------------------------------------------------------------
# Weights


@flax.struct.dataclass
class QuantizedTensor:
  """Integer levels and their scale: ``dequantize() = values * scale`` (scale broadcasts)."""
  values: Array          # int8 levels in [-Qp, Qp]
  scale: Array           # float32, the tensor's shape with the reduced (input) axes set to 1
  bits: int = flax.struct.field(pytree_node=False, default=8)

  def dequantize(self, dtype=jnp.float32) -> Array:
    return (self.values.astype(jnp.float32) * self.scale).astype(dtype)

  @property
  def size_bits(self) -> int:
    """Storage: `bits` per level plus float32 per scale."""
    return int(np.prod(self.values.shape)) * self.bits + int(np.prod(self.scale.shape)) * FLOAT_BITS


def _keys(path) -> tuple[str, ...]:
  return tuple(str(p) for p in (path.split("/") if isinstance(path, str) else path))


def kernel_input_axes(path: Sequence[str] | str, ndim: int) -> tuple[int, ...]:
  """Input (contracted) axes of a dense kernel, from its path.

  ``.../attention/output/kernel`` [heads, head_dim, out] has two; every other kernel
  ([in, out], and query/key/value [in, heads, head_dim]) has one.
  """
  keys = _keys(path)
  n_in = 2 if keys[-3:] == ("attention", "output", "kernel") else 1
  if ndim <= n_in:
    raise ValueError(f"kernel {common.path_name(keys)} has rank {ndim}, expected more than "
                     f"{n_in} (its input axes)")
  return tuple(range(n_in))


def quantization_axes(path: Sequence[str] | str, ndim: int) -> tuple[int, ...] | None:
  """Axes reduced for one weight's per-channel scale, or None for leaves kept in float.

  `kernel`: its input axes (per output channel); `embedding` [rows, features]: the feature axis
  (per row); `extra_decoder` [extra_rows, vocab] (MobileBERT's MLM decoder rows): axis 0 (per
  vocabulary column). Biases, norms and anything else stay float.
  """
  keys = _keys(path)
  name = keys[-1]
  if name == "kernel":
    return kernel_input_axes(keys, ndim)
  if name == "embedding" and ndim == 2:
    return (1,)
  if name == "extra_decoder" and ndim == 2:
    return (0,)
  return None


def quantize_tensor(x: Array, bits: int = 8, axes: Sequence[int] | None = None) -> QuantizedTensor:
  """Symmetric quantization with s = max|x| over `axes` / Qp (all axes when None: per tensor).

  An all-zero channel gets s = 1 (its levels are 0 either way).
  """
  qmax = common.symmetric_qmax(bits)
  x = jnp.asarray(x, jnp.float32)
  axes = tuple(range(x.ndim)) if axes is None else tuple(axes)
  amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / qmax, 1.0).astype(jnp.float32)
  values = jnp.clip(jnp.round(x / scale), -qmax, qmax).astype(jnp.int8)
  return QuantizedTensor(values=values, scale=scale, bits=bits)


def _map_weights(fn: Callable[[tuple[str, ...], Array, int, tuple[int, ...]], Any], params: Mapping,
                 weight_bits: int | None, embedding_bits: int | None) -> dict:
  flat = traverse_util.flatten_dict(nn.meta.unbox(params))
  out = {}
  for path, leaf in flat.items():
    axes = quantization_axes(path, np.ndim(leaf))
    bits = embedding_bits if path[-1] == "embedding" else weight_bits
    out[path] = leaf if axes is None or bits is None else fn(path, leaf, bits, axes)
  return traverse_util.unflatten_dict(out)


@functools.partial(jax.jit, static_argnums=(1, 2))
def quantize_params(params: Mapping, weight_bits: int | None = 8,
                    embedding_bits: int | None = 8) -> dict:
  """Replaces every dense kernel (per output channel) and embedding (per row) by a
  `QuantizedTensor`; other leaves are kept. `None` bits keep that kind in float."""
  return _map_weights(lambda path, w, bits, axes: quantize_tensor(w, bits, axes), params,
                      weight_bits, embedding_bits)


def dequantize_params(qparams: Mapping) -> dict:
  """The float tree of a `quantize_params` result (W_hat = W_q * s), in float32."""
  return jax.tree.map(lambda x: x.dequantize() if isinstance(x, QuantizedTensor) else x, qparams,
                      is_leaf=lambda x: isinstance(x, QuantizedTensor))


@functools.partial(jax.jit, static_argnums=(1, 2))
def fake_quantize_params(params: Mapping, weight_bits: int | None = 8,
                         embedding_bits: int | None = 8) -> dict:
  """Quantize then dequantize (W_hat, in each leaf's own dtype): simulated low-bit weights."""
  return _map_weights(
      lambda path, w, bits, axes: quantize_tensor(w, bits, axes).dequantize(jnp.asarray(w).dtype),
      params, weight_bits, embedding_bits)


# ----------------------------------------------------------------------------------------------
# Activations


def calibrate(model: nn.Module, params: Mapping, batches: Iterable[Any], *, bits: int = 8,
              method: str = "max", percentile: float = 99.99, **apply_kwargs) -> dict:
  """Per-tensor scales of every dense layer's input: s = range / Qp.

  range = max over batches of max|x| (`method="max"`), or the mean over batches of the
  `percentile`-th percentile of |x| (`method="percentile"`). `batches` yields dicts of
  `model.apply` keyword arguments (or `input_ids` arrays); `apply_kwargs` go to every call.
  Returns a nested dict keyed by module path: ``scales["backbone"]["layer_0"]["ffn"]["output"]``.
  """
  qmax = common.symmetric_qmax(bits)
  if method not in CALIBRATION_METHODS:
    raise ValueError(f"unknown calibration method {method!r}; valid: {list(CALIBRATION_METHODS)}")
  if not 0.0 < percentile <= 100.0:
    raise ValueError(f"percentile must be in (0, 100], got {percentile}")

  def interceptor(next_fun, args, kwargs, context):
    if common.is_dense_call(context):
      x = jnp.abs(jnp.asarray(args[0], jnp.float32))
      stat = jnp.max(x) if method == "max" else jnp.percentile(x, percentile)
      context.module.sow(_STATS, "input_range", stat)
    return next_fun(*args, **kwargs)

  batch_stats = common.dense_values_fn(model, interceptor, _STATS, "input_range", **apply_kwargs)

  combined, count = None, 0
  for batch in batches:
    stats = common.map_modules(lambda v: jnp.max(jnp.stack(v)), batch_stats(params, batch))
    if combined is None:
      combined = stats
    else:
      merge = jnp.maximum if method == "max" else jnp.add
      combined = jax.tree.map(merge, combined, stats)
    count += 1
  if combined is None:
    raise ValueError("calibrate needs at least one batch")
  if not jax.tree.leaves(combined):
    raise ValueError(f"{type(model).__name__} called no DenseGeneral layer; nothing to calibrate")
  if method == "percentile":
    combined = jax.tree.map(lambda r: r / count, combined)
  return jax.tree.map(lambda r: jnp.where(r > 0, r / qmax, 1.0).astype(jnp.float32), combined)


def activation_interceptor(scales: Mapping, bits: int = 8) -> Callable:
  """A `nn.intercept_methods` interceptor replacing each dense input x by
  clip(round(x / s), -Qp, Qp) * s with its calibrated s (a KeyError names an uncalibrated one)."""
  common.symmetric_qmax(bits)

  def interceptor(next_fun, args, kwargs, context):
    if common.is_dense_call(context):
      scale = common.lookup(scales, context.module.path, "calibrated scale")
      args = (common.fake_quantize(args[0], scale, bits),) + tuple(args[1:])
    return next_fun(*args, **kwargs)

  return interceptor


def quantized_apply(model: nn.Module, params: Mapping, scales: Mapping | None, *args,
                    weight_bits: int | None = 8, act_bits: int | None = 8,
                    embedding_bits: int | None = 8, **kwargs):
  """`model.apply` with fake-quantized weights (W_hat) and dense inputs (calibrated scales).

  `scales` must come from `calibrate(..., bits=act_bits)`; `act_bits=None` (weight-only) ignores
  it, `weight_bits=None` / `embedding_bits=None` keep kernels / embeddings in float.
  """
  qparams = fake_quantize_params(params, weight_bits, embedding_bits)
  if act_bits is None:
    return model.apply({"params": qparams}, *args, **kwargs)
  if scales is None:
    raise ValueError("act_bits is set but scales is None; run calibrate first (or act_bits=None)")
  with nn.intercept_methods(activation_interceptor(scales, act_bits)):
    return model.apply({"params": qparams}, *args, **kwargs)


# ----------------------------------------------------------------------------------------------
# Size


BitsByLeaf = int | Mapping[str, int] | Callable[[str, Any], int]


def ptq_bits_by_leaf(weight_bits: int | None = 8, embedding_bits: int | None = 8) -> Callable:
  """Bits per leaf as `quantize_params` stores them (None or non-weight leaves: 32)."""

  def bits_of(path: str, leaf) -> int:
    axes = quantization_axes(path, np.ndim(leaf))
    bits = embedding_bits if path.split("/")[-1] == "embedding" else weight_bits
    return FLOAT_BITS if axes is None or bits is None else bits

  return bits_of


def model_size_bits(params: Mapping, bits_by_leaf: BitsByLeaf = FLOAT_BITS) -> int:
  """Sum over leaves of size * bits (scales not counted; see `quantized_size_bits`).

  `bits_by_leaf`: one int for all leaves, a mapping from "a/b/kernel" paths to bits (other
  leaves 32; unknown paths are an error), or a function (path, leaf) -> bits.
  """
  flat = {common.path_name(k): v
          for k, v in traverse_util.flatten_dict(nn.meta.unbox(params)).items()}
  if isinstance(bits_by_leaf, Mapping):
    unknown = sorted(set(bits_by_leaf) - set(flat))
    if unknown:
      raise KeyError(f"bits_by_leaf names paths not in params: {unknown}")
    table = bits_by_leaf
    bits_of = lambda path, leaf: table.get(path, FLOAT_BITS)
  elif callable(bits_by_leaf):
    bits_of = bits_by_leaf
  else:
    bits_of = lambda path, leaf: bits_by_leaf
  total = 0
  for path, leaf in flat.items():
    bits = bits_of(path, leaf)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits <= 0:
      raise ValueError(f"bits for {path} must be a positive int, got {bits!r}")
    total += int(np.prod(np.shape(leaf))) * bits
  return total


def compression_ratio(params: Mapping, bits_by_leaf: BitsByLeaf) -> float:
  """float32 size / quantized size (`model_size_bits`)."""
  return model_size_bits(params, FLOAT_BITS) / model_size_bits(params, bits_by_leaf)


def quantized_size_bits(qparams: Mapping) -> int:
  """Storage of a `quantize_params` tree: levels at their bits, scales and the rest float32."""
  leaves = jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, QuantizedTensor))
  return sum(x.size_bits if isinstance(x, QuantizedTensor) else int(np.prod(np.shape(x))) *
             FLOAT_BITS for x in leaves)


# ----------------------------------------------------------------------------------------------
# One object holding the settings


@dataclasses.dataclass(frozen=True)
class PostTrainingQuantizer:
  """Post-training quantization settings; `None` bits leave that part in float.

  calibrate(model, params, batches) -> scales;
  quantized_apply(model, params, scales, *args, **kwargs) -> the model's output.
  """
  weight_bits: int | None = 8
  act_bits: int | None = 8
  embedding_bits: int | None = 8
  method: str = "max"
  percentile: float = 99.99

  def __post_init__(self):
    for name in ("weight_bits", "act_bits", "embedding_bits"):
      if getattr(self, name) is not None:
        common.check_bits(getattr(self, name), name)
    if self.method not in CALIBRATION_METHODS:
      raise ValueError(f"unknown calibration method {self.method!r}; "
                       f"valid: {list(CALIBRATION_METHODS)}")

  def calibrate(self, model: nn.Module, params: Mapping, batches: Iterable[Any],
                **apply_kwargs) -> dict | None:
    if self.act_bits is None:
      return None
    return calibrate(model, params, batches, bits=self.act_bits, method=self.method,
                     percentile=self.percentile, **apply_kwargs)

  def quantize_params(self, params: Mapping) -> dict:
    return quantize_params(params, self.weight_bits, self.embedding_bits)

  def fake_quantize_params(self, params: Mapping) -> dict:
    return fake_quantize_params(params, self.weight_bits, self.embedding_bits)

  def quantized_apply(self, model: nn.Module, params: Mapping, scales: Mapping | None, *args,
                      **kwargs):
    return quantized_apply(model, params, scales, *args, weight_bits=self.weight_bits,
                           act_bits=self.act_bits, embedding_bits=self.embedding_bits, **kwargs)

  def model_size_bits(self, params: Mapping) -> int:
    return model_size_bits(params, ptq_bits_by_leaf(self.weight_bits, self.embedding_bits))

  def compression_ratio(self, params: Mapping) -> float:
    return compression_ratio(params, ptq_bits_by_leaf(self.weight_bits, self.embedding_bits))
