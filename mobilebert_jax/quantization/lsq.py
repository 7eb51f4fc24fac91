"""Learned step-size quantization (LSQ, Esser et al. 2020) as KDLSQ-BERT uses it.

With step s and integer range [Qn, Qp] (signed: [-2^(b-1), 2^(b-1) - 1]; unsigned: [0, 2^b - 1]),

  forward:  x_hat = clip(round(x / s), Qn, Qp) * s
  d x_hat / d x = 1 if Qn < x/s < Qp else 0                         (straight-through estimator)
  d x_hat / d s = (-x/s + round(x/s)) if Qn < x/s < Qp, Qn if x/s <= Qn, Qp if x/s >= Qp

and the step's gradient is scaled by g = 1 / sqrt(N * Qp) (LSQ Sec. 2.2: "g = 1/sqrt(N_W Q_P)
for weight step size and g = 1/sqrt(N_F Q_P) for activation step size, where N_W is the number of
weights in a layer and N_F is the number of features in a layer"): N = N_W, the elements one
weight step quantizes; N = N_F, the features of one example that one activation step quantizes
(the elements of x over all but the batch axis: T x D for a [B, T, D] input, whatever B is).

Initial steps (`init_step`), per tensor or per channel:
  "lsq"    s0 = 2 <|x|> / sqrt(Qp)                                            (LSQ Sec. 2.1)
  "kdlsq"  s0 = max(|x_(k)|, |x_(n-1-k)|) / Qp,  k = round(n a / 2)          (KDLSQ-BERT,
           Jin et al. 2021): x_(0) <= ... <= x_(n-1) the sorted values, the top level Qp placed
           at the larger end of the range that keeps all but a fraction a = 5% of the values,
           a / 2 in each tail (the authors' release, beyondliangcai/kdlsq `reset_wgt_alpha`,
           keeps 2.5% per tail; it clips at that value, i.e. places it on the top level).

`lsq_interceptor` fake-quantizes the kernel and the input of every dense layer, and optionally
the named embedding tables, with a params-like tree of learned steps, so a distillation loss can
train steps and weights together (everything is passed in; nothing is stored):

  steps = init_lsq_steps(model, params, batch, weight_bits=2, act_bits=8, embedding_bits=2)
  def loss_fn(params, steps):
    out = lsq_apply(model, params, steps, input_ids, weight_bits=2, act_bits=8, embedding_bits=2)
    return distillation_loss(teacher_out, out)
  grads_params, grads_steps = jax.grad(loss_fn, argnums=(0, 1))(params, steps)

`lsq_size_bits` / `lsq_compression_ratio` give the size of the stored integer model.
"""

from __future__ import annotations

import contextvars
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mobilebert_jax.quantization import common, ptq

Array = jax.Array
MIN_STEP = 1e-8
STEP_INITS = ("kdlsq", "lsq")
# KDLSQ's initial range leaves out this fraction of the values, half in each tail.
KDLSQ_TRUNCATION = 0.05
# The embedding tables quantized when embedding bits are given: the word embeddings, as the
# 14.9x of KDLSQ-BERT / TernaryBERT counts BERT-base (position and segment tables stay float).
WORD_EMBEDDINGS = ("word_embeddings",)
_INIT = "lsq_init"
# Set while the interceptor runs a layer's quantized copy, so it is not intercepted again.
_INSIDE = contextvars.ContextVar("mobilebert_jax_lsq_inside", default=False)


def lsq_range(bits: int, signed: bool = True) -> tuple[int, int]:
  """(Qn, Qp): (-2^(b-1), 2^(b-1) - 1) signed, (0, 2^b - 1) unsigned; bits in [2, 8]."""
  common.check_bits(bits)
  if signed:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  return 0, 2 ** bits - 1


def _sum_to_shape(x: Array, shape: tuple[int, ...]) -> Array:
  """Sums `x` over the axes along which an array of `shape` was broadcast to x.shape."""
  lead = x.ndim - len(shape)
  x = jnp.sum(x, axis=tuple(range(lead))) if lead else x
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _lsq(x, step, bits, signed, count):
  qn, qp = lsq_range(bits, signed)
  v = x.astype(jnp.float32) / step.astype(jnp.float32)
  return (jnp.clip(jnp.round(v), qn, qp) * step.astype(jnp.float32)).astype(x.dtype)


def _lsq_fwd(x, step, bits, signed, count):
  return _lsq(x, step, bits, signed, count), (x, step)


def _lsq_bwd(bits, signed, count, residuals, grad):
  x, step = residuals
  qn, qp = lsq_range(bits, signed)
  v = x.astype(jnp.float32) / step.astype(jnp.float32)
  low, high = v <= qn, v >= qp
  inside = ~(low | high)
  grad = grad.astype(jnp.float32)
  grad_x = jnp.where(inside, grad, 0.0)
  local = jnp.where(low, float(qn), jnp.where(high, float(qp), jnp.round(v) - v))
  scale = 1.0 / math.sqrt(count * qp)
  grad_step = _sum_to_shape(grad * local, step.shape) * scale
  return grad_x.astype(x.dtype), grad_step.reshape(step.shape).astype(step.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_quantize(x: Array, step: Array, bits: int, signed: bool = True,
                 batch_dims: int = 0) -> Array:
  """x_hat = clip(round(x / s), Qn, Qp) * s with LSQ's gradients (see the module docstring).

  `step` is a scalar or broadcasts to x (per-channel steps); it must stay positive. The step's
  gradient scale is g = 1 / sqrt(N Qp) with N the elements of x per step and per example: the
  leading `batch_dims` axes are examples (0 for weights: N = N_W; 1 for activations [B, ...]:
  N = N_F, the features of one example).
  """
  common.check_bits(bits)
  x = jnp.asarray(x)
  step = jnp.asarray(step)
  if not jnp.issubdtype(step.dtype, jnp.floating):
    step = step.astype(jnp.float32)
  try:
    broadcasts = jnp.broadcast_shapes(step.shape, x.shape) == x.shape
  except ValueError:
    broadcasts = False
  if not broadcasts:
    raise ValueError(f"step of shape {step.shape} does not broadcast to x of shape {x.shape}")
  if not 0 <= batch_dims < max(x.ndim, 1):
    raise ValueError(f"batch_dims={batch_dims} must leave at least one axis of x {x.shape}")
  examples = int(np.prod(x.shape[:batch_dims]))
  count = max(x.size / max(step.size, 1) / max(examples, 1), 1.0)
  return _lsq(x, step, bits, bool(signed), float(count))


def _truncated_range(x: Array, axes: Sequence[int] | None, truncation: float) -> Array:
  """max(|x_(k)|, |x_(n-1-k)|), k = round(n * truncation / 2), over all of x or over `axes`."""
  reduced = tuple(range(x.ndim)) if axes is None else tuple(sorted(a % x.ndim for a in axes))
  kept = tuple(a for a in range(x.ndim) if a not in reduced)
  flat = jnp.transpose(x, kept + reduced).reshape(tuple(x.shape[a] for a in kept) + (-1,))
  n = flat.shape[-1]
  k = min(int(math.floor(n * truncation / 2 + 0.5)), (n - 1) // 2)
  ordered = jnp.sort(flat, axis=-1)
  value = jnp.maximum(jnp.abs(ordered[..., k]), jnp.abs(ordered[..., n - 1 - k]))
  if axes is None:
    return value
  return value.reshape(tuple(1 if a in reduced else d for a, d in enumerate(x.shape)))


def init_step(x: Array, bits: int, signed: bool = True, axes: Sequence[int] | None = None,
              method: str = "lsq", truncation: float = KDLSQ_TRUNCATION) -> Array:
  """The initial step over all of x (scalar) or over `axes` (kept as size 1):

    "lsq"    s0 = 2 <|x|> / sqrt(Qp)                                  (Esser et al. 2020)
    "kdlsq"  s0 = max(|x_(k)|, |x_(n-1-k)|) / Qp, k = round(n a / 2), x_(i) the sorted values and
             a = `truncation` the fraction left outside the range     (Jin et al. 2021)

  Floored at 1e-8 so an all-zero tensor still gives a usable step.
  """
  if method not in STEP_INITS:
    raise ValueError(f"step init {method!r} is not one of {list(STEP_INITS)}")
  if not 0.0 <= truncation < 1.0:
    raise ValueError(f"truncation must be in [0, 1), got {truncation!r}")
  _, qp = lsq_range(bits, signed)
  x = jnp.asarray(x, jnp.float32)
  if method == "kdlsq":
    return jnp.maximum(_truncated_range(x, axes, truncation) / qp, MIN_STEP)
  x = jnp.abs(x)
  mean = jnp.mean(x) if axes is None else jnp.mean(x, axis=tuple(axes), keepdims=True)
  return jnp.maximum(2.0 * mean / math.sqrt(qp), MIN_STEP)


def _module_params(context, leaf: str) -> dict:
  module = context.module
  params = module.variables.get("params") if module.scope is not None else None
  if not params or leaf not in params:
    raise ValueError(f"layer {common.path_name(module.path)!r} has no params; LSQ "
                     "quantization runs under model.apply with the model's params, not init")
  return dict(nn.meta.unbox(params))


def _n_input_axes(module: nn.DenseGeneral) -> int:
  if module.batch_dims:
    raise ValueError(f"dense layer {common.path_name(module.path)!r} uses batch_dims, which LSQ "
                     "quantization does not support")
  return len(module.axis) if isinstance(module.axis, (tuple, list)) else 1


def _step(entry: Any, key: str, module: nn.Module, kind: str = "dense layer") -> Array:
  if not isinstance(entry, Mapping) or key not in entry:
    raise KeyError(f"no {key!r} step for {kind} {common.path_name(module.path)!r}; create the "
                   "steps with init_lsq_steps and the same weight_bits / act_bits / "
                   "embedding_bits settings")
  return entry[key]


def _run_copy(module: nn.Module, params: dict, args, kwargs):
  """The intercepted layer on `params` (its quantized weights), not intercepted again."""
  token = _INSIDE.set(True)
  try:
    return module.clone(parent=None).apply({"params": params}, *args, **kwargs)
  finally:
    _INSIDE.reset(token)


def _check_bits(weight_bits, act_bits, embedding_bits) -> None:
  for name, value in (("weight_bits", weight_bits), ("act_bits", act_bits),
                      ("embedding_bits", embedding_bits)):
    if value is not None:
      common.check_bits(value, name)


def _quantized_embed(context, embedding_bits, embeddings) -> bool:
  return (embedding_bits is not None and common.is_embed_call(context)
          and context.module.name in embeddings)


def lsq_interceptor(steps: Mapping, weight_bits: int | None = 8, act_bits: int | None = 8,
                    act_signed: bool = True, embedding_bits: int | None = None,
                    embeddings: Sequence[str] = WORD_EMBEDDINGS) -> Callable:
  """A `nn.intercept_methods` interceptor quantizing every dense layer with learned steps.

  For the layer at module path p, the input is `lsq_quantize(x, steps[p]["input"], act_bits,
  act_signed, batch_dims=1)` and the kernel `lsq_quantize(W, steps[p]["kernel"], weight_bits)`
  (signed); with `embedding_bits`, the tables of the `nn.Embed` layers named in `embeddings` are
  `lsq_quantize(E, steps[p]["embedding"], embedding_bits)` (in their lookups; a head that reads
  a table directly keeps it float). `None` bits leave that side in float. Biases, norms and
  everything else stay float.
  """
  _check_bits(weight_bits, act_bits, embedding_bits)

  def interceptor(next_fun, args, kwargs, context):
    if _INSIDE.get():
      return next_fun(*args, **kwargs)
    module = context.module
    if _quantized_embed(context, embedding_bits, embeddings):
      entry = common.lookup(steps, module.path, "LSQ step sizes", "embedding")
      params = _module_params(context, "embedding")
      params["embedding"] = lsq_quantize(
          params["embedding"], _step(entry, "embedding", module, "embedding"), embedding_bits)
      return _run_copy(module, params, args, kwargs)
    if not common.is_dense_call(context):
      return next_fun(*args, **kwargs)
    entry = common.lookup(steps, module.path, "LSQ step sizes")
    x = args[0]
    if act_bits is not None:
      x = lsq_quantize(x, _step(entry, "input", module), act_bits, act_signed, batch_dims=1)
    if weight_bits is None:
      return next_fun(x, *args[1:], **kwargs)
    params = _module_params(context, "kernel")
    params["kernel"] = lsq_quantize(params["kernel"], _step(entry, "kernel", module), weight_bits,
                                    signed=True)
    return _run_copy(module, params, (x,) + tuple(args[1:]), kwargs)

  return interceptor


def lsq_apply(model: nn.Module, params: Mapping, steps: Mapping, *args,
              weight_bits: int | None = 8, act_bits: int | None = 8, act_signed: bool = True,
              embedding_bits: int | None = None, embeddings: Sequence[str] = WORD_EMBEDDINGS,
              **kwargs):
  """`model.apply({"params": params}, *args, **kwargs)` under `lsq_interceptor(steps, ...)`."""
  with nn.intercept_methods(lsq_interceptor(steps, weight_bits, act_bits, act_signed,
                                            embedding_bits, embeddings)):
    return model.apply({"params": params}, *args, **kwargs)


def init_lsq_steps(model: nn.Module, params: Mapping, batch: Any, *, weight_bits: int | None = 8,
                   act_bits: int | None = 8, act_signed: bool = True,
                   per_channel_weights: bool = False, embedding_bits: int | None = None,
                   embeddings: Sequence[str] = WORD_EMBEDDINGS, step_init: str = "lsq",
                   **apply_kwargs) -> dict:
  """Initial steps ``{path...: {"kernel": s_w, "input": s_x}}`` for every dense layer, and
  ``{path...: {"embedding": s_e}}`` for the `embeddings` tables when `embedding_bits` is set.

  s = `init_step(., method=step_init)` on the kernel (per tensor, or per output channel with
  `per_channel_weights`: shape of the kernel with its input axes set to 1), on the table (per
  tensor) and on the layer's input for `batch` (a dict of apply keyword arguments, or
  `input_ids`); a layer called more than once gets the mean of its input steps.
  """
  _check_bits(weight_bits, act_bits, embedding_bits)
  if step_init not in STEP_INITS:
    raise ValueError(f"step_init={step_init!r} is not one of {list(STEP_INITS)}")

  def interceptor(next_fun, args, kwargs, context):
    if _quantized_embed(context, embedding_bits, embeddings):
      table = _module_params(context, "embedding")["embedding"]
      context.module.sow(_INIT, "steps", {"embedding": init_step(
          table, embedding_bits, True, method=step_init)})
    elif common.is_dense_call(context):
      value = {}
      if act_bits is not None:
        value["input"] = init_step(args[0], act_bits, act_signed, method=step_init)
      if weight_bits is not None:
        kernel = _module_params(context, "kernel")["kernel"]
        axes = tuple(range(_n_input_axes(context.module))) if per_channel_weights else None
        value["kernel"] = init_step(kernel, weight_bits, True, axes, method=step_init)
      context.module.sow(_INIT, "steps", value)
    return next_fun(*args, **kwargs)

  per_module = common.dense_values_fn(model, interceptor, _INIT, "steps", **apply_kwargs)(
      params, batch)
  if not per_module:
    raise ValueError(f"{type(model).__name__} called no DenseGeneral layer; no steps to create")
  return common.map_modules(
      lambda calls: jax.tree.map(lambda *v: jnp.mean(jnp.stack(v), axis=0), *calls), per_module)


def lsq_size_bits(params: Mapping, steps: Mapping, weight_bits: int | None,
                  embedding_bits: int | None = None) -> int:
  """Bits of the stored integer model (its params and `steps`):

    size = sum_{quantized W} |W| b_W + 32 (sum_{other leaves v} |v| + sum_{steps s} |s|)

  A kernel counts at `weight_bits` when `steps` holds its layer's "kernel" step, an embedding
  table at `embedding_bits` when it holds its "embedding" step (a params leaf and its step share
  the path, e.g. backbone/layer_0/ffn/output/kernel); every step (weights', tables' and
  activations', all needed for integer inference) and every other leaf counts at 32 bits.
  """
  quantized = {common.path_name(k): k[-1] for k in traverse_util.flatten_dict(nn.meta.unbox(steps))}
  bits = {"kernel": weight_bits, "embedding": embedding_bits}

  def bits_of(path: str, leaf) -> int:
    leaf_bits = bits.get(quantized.get(path, ""))
    return ptq.FLOAT_BITS if leaf_bits is None else int(leaf_bits)

  step_count = sum(int(np.prod(np.shape(s))) for s in jax.tree.leaves(steps))
  return ptq.model_size_bits(params, bits_of) + ptq.FLOAT_BITS * step_count


def lsq_compression_ratio(params: Mapping, steps: Mapping, weight_bits: int | None,
                          embedding_bits: int | None = None) -> float:
  """32 x (number of params) / `lsq_size_bits`: float32 params against the stored model."""
  return ptq.model_size_bits(params) / lsq_size_bits(params, steps, weight_bits, embedding_bits)
