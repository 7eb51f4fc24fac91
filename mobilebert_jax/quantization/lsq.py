"""Learned step-size quantization (LSQ, Esser et al. 2020) as KDLSQ-BERT uses it.

With step s and integer range [Qn, Qp] (signed: [-2^(b-1), 2^(b-1) - 1]; unsigned: [0, 2^b - 1]),

  forward:  x_hat = clip(round(x / s), Qn, Qp) * s
  d x_hat / d x = 1 if Qn < x/s < Qp else 0                         (straight-through estimator)
  d x_hat / d s = (-x/s + round(x/s)) if Qn < x/s < Qp, Qn if x/s <= Qn, Qp if x/s >= Qp
  and the step's gradient is scaled by g = 1 / sqrt(N * Qp), N = elements of x per step.

Steps start at s0 = 2 * mean|x| / sqrt(Qp). `lsq_interceptor` fake-quantizes the kernel and the
input of every dense layer with a params-like tree of learned steps, so a distillation loss can
train steps and weights together (everything is passed in; nothing is stored):

  steps = init_lsq_steps(model, params, batch, weight_bits=2, act_bits=8)
  def loss_fn(params, steps):
    out = lsq_apply(model, params, steps, input_ids, weight_bits=2, act_bits=8)
    return distillation_loss(teacher_out, out)
  grads_params, grads_steps = jax.grad(loss_fn, argnums=(0, 1))(params, steps)
"""

from __future__ import annotations

import contextvars
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobilebert_jax.quantization import common

Array = jax.Array
MIN_STEP = 1e-8
_INIT = "lsq_init"
# Set while the interceptor runs a dense layer's quantized copy, so it is not intercepted again.
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _lsq(x, step, bits, signed):
  qn, qp = lsq_range(bits, signed)
  v = x.astype(jnp.float32) / step.astype(jnp.float32)
  return (jnp.clip(jnp.round(v), qn, qp) * step.astype(jnp.float32)).astype(x.dtype)


def _lsq_fwd(x, step, bits, signed):
  return _lsq(x, step, bits, signed), (x, step)


def _lsq_bwd(bits, signed, residuals, grad):
  x, step = residuals
  qn, qp = lsq_range(bits, signed)
  v = x.astype(jnp.float32) / step.astype(jnp.float32)
  low, high = v <= qn, v >= qp
  inside = ~(low | high)
  grad = grad.astype(jnp.float32)
  grad_x = jnp.where(inside, grad, 0.0)
  local = jnp.where(low, float(qn), jnp.where(high, float(qp), jnp.round(v) - v))
  n = x.size / max(step.size, 1)
  scale = 1.0 / math.sqrt(n * qp)
  grad_step = _sum_to_shape(grad * local, step.shape) * scale
  return grad_x.astype(x.dtype), grad_step.reshape(step.shape).astype(step.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_quantize(x: Array, step: Array, bits: int, signed: bool = True) -> Array:
  """x_hat = clip(round(x / s), Qn, Qp) * s with LSQ's gradients (see the module docstring).

  `step` is a scalar or broadcasts to x (per-channel steps); it must stay positive.
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
  return _lsq(x, step, bits, bool(signed))


def init_step(x: Array, bits: int, signed: bool = True,
              axes: Sequence[int] | None = None) -> Array:
  """s0 = 2 * mean|x| / sqrt(Qp), over all of x (scalar) or over `axes` (kept as size 1).

  Floored at 1e-8 so an all-zero tensor still gives a usable step.
  """
  _, qp = lsq_range(bits, signed)
  x = jnp.abs(jnp.asarray(x, jnp.float32))
  mean = jnp.mean(x) if axes is None else jnp.mean(x, axis=tuple(axes), keepdims=True)
  return jnp.maximum(2.0 * mean / math.sqrt(qp), MIN_STEP)


def _dense_params(context) -> dict:
  module = context.module
  params = module.variables.get("params") if module.scope is not None else None
  if not params or "kernel" not in params:
    raise ValueError(f"dense layer {common.path_name(module.path)!r} has no params; LSQ "
                     "quantization runs under model.apply with the model's params, not init")
  return dict(nn.meta.unbox(params))


def _n_input_axes(module: nn.DenseGeneral) -> int:
  if module.batch_dims:
    raise ValueError(f"dense layer {common.path_name(module.path)!r} uses batch_dims, which LSQ "
                     "quantization does not support")
  return len(module.axis) if isinstance(module.axis, (tuple, list)) else 1


def _step(entry: Any, key: str, module: nn.Module) -> Array:
  if not isinstance(entry, Mapping) or key not in entry:
    raise KeyError(f"no {key!r} step for dense layer {common.path_name(module.path)!r}; create "
                   "the steps with init_lsq_steps and the same weight_bits / act_bits settings")
  return entry[key]


def lsq_interceptor(steps: Mapping, weight_bits: int | None = 8, act_bits: int | None = 8,
                    act_signed: bool = True) -> Callable:
  """A `nn.intercept_methods` interceptor quantizing every dense layer with learned steps.

  For the layer at module path p, the input is `lsq_quantize(x, steps[p]["input"], act_bits,
  act_signed)` and the kernel `lsq_quantize(W, steps[p]["kernel"], weight_bits)` (signed);
  `None` bits leave that side in float. Bias and everything outside dense layers stay float.
  """
  if weight_bits is not None:
    common.check_bits(weight_bits, "weight_bits")
  if act_bits is not None:
    common.check_bits(act_bits, "act_bits")

  def interceptor(next_fun, args, kwargs, context):
    if not common.is_dense_call(context) or _INSIDE.get():
      return next_fun(*args, **kwargs)
    module = context.module
    entry = common.lookup(steps, module.path, "LSQ step sizes")
    x = args[0]
    if act_bits is not None:
      x = lsq_quantize(x, _step(entry, "input", module), act_bits, act_signed)
    if weight_bits is None:
      return next_fun(x, *args[1:], **kwargs)
    params = _dense_params(context)
    kernel_step = _step(entry, "kernel", module)
    params["kernel"] = lsq_quantize(params["kernel"], kernel_step, weight_bits, signed=True)
    token = _INSIDE.set(True)
    try:
      return module.clone(parent=None).apply({"params": params}, x, *args[1:], **kwargs)
    finally:
      _INSIDE.reset(token)

  return interceptor


def lsq_apply(model: nn.Module, params: Mapping, steps: Mapping, *args,
              weight_bits: int | None = 8, act_bits: int | None = 8, act_signed: bool = True,
              **kwargs):
  """`model.apply({"params": params}, *args, **kwargs)` under `lsq_interceptor(steps, ...)`."""
  with nn.intercept_methods(lsq_interceptor(steps, weight_bits, act_bits, act_signed)):
    return model.apply({"params": params}, *args, **kwargs)


def init_lsq_steps(model: nn.Module, params: Mapping, batch: Any, *, weight_bits: int | None = 8,
                   act_bits: int | None = 8, act_signed: bool = True,
                   per_channel_weights: bool = False, **apply_kwargs) -> dict:
  """Initial steps for every dense layer: ``{path...: {"kernel": s_w, "input": s_x}}``.

  s = 2 * mean|.| / sqrt(Qp) on the kernel (per tensor, or per output channel with
  `per_channel_weights`: shape of the kernel with its input axes set to 1) and on the layer's
  input for `batch` (a dict of apply keyword arguments, or `input_ids`); a layer called more
  than once gets the mean of its input steps.
  """
  if weight_bits is not None:
    common.check_bits(weight_bits, "weight_bits")
  if act_bits is not None:
    common.check_bits(act_bits, "act_bits")

  def interceptor(next_fun, args, kwargs, context):
    if common.is_dense_call(context):
      value = {}
      if act_bits is not None:
        value["input"] = init_step(args[0], act_bits, act_signed)
      if weight_bits is not None:
        kernel = _dense_params(context)["kernel"]
        axes = tuple(range(_n_input_axes(context.module))) if per_channel_weights else None
        value["kernel"] = init_step(kernel, weight_bits, True, axes)
      context.module.sow(_INIT, "steps", value)
    return next_fun(*args, **kwargs)

  per_module = common.dense_values_fn(model, interceptor, _INIT, "steps", **apply_kwargs)(
      params, batch)
  if not per_module:
    raise ValueError(f"{type(model).__name__} called no DenseGeneral layer; no steps to create")
  return common.map_modules(
      lambda calls: jax.tree.map(lambda *v: jnp.mean(jnp.stack(v), axis=0), *calls), per_module)
