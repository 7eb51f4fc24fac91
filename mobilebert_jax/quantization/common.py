"""Shared pieces of the quantizers: bit ranges, symmetric fake quantization, dense-call plumbing.

Symmetric uniform quantization with `bits` bits and step (scale) s:

  q(x) = clip(round(x / s), Qn, Qp),    x_hat = q(x) * s

with Qn = -(2^(b-1) - 1), Qp = 2^(b-1) - 1 for the symmetric (post-training) grid and
Qn = -2^(b-1) for LSQ's signed grid (Esser et al. 2020); unsigned LSQ uses Qn = 0, Qp = 2^b - 1.

Dense layers are found at run time by intercepting `nn.DenseGeneral.__call__`
(`flax.linen.intercept_methods`); per-layer values (scales, step sizes) live in a params-like
nested dict keyed by the module path, e.g. ``tree["backbone"]["layer_0"]["attention"]["query"]``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: Any, what: str = "bits") -> int:
  """Returns `bits` if it is a Python int in [2, 8]; raises ValueError naming the value."""
  if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"{what} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
  return bits


def symmetric_qmax(bits: int) -> int:
  """Largest level of the symmetric grid: Qp = 2^(b-1) - 1 (127 for int8)."""
  return 2 ** (check_bits(bits) - 1) - 1


def fake_quantize(x: Array, scale: Array, bits: int) -> Array:
  """x_hat = clip(round(x / s), -Qp, Qp) * s on the symmetric grid (no gradient tricks)."""
  qmax = symmetric_qmax(bits)
  scale = jnp.asarray(scale, x.dtype)
  return jnp.clip(jnp.round(x / scale), -qmax, qmax) * scale


def is_dense_call(context) -> bool:
  """True when an interceptor `context` is a `DenseGeneral.__call__` (incl. subclasses)."""
  return isinstance(context.module, nn.DenseGeneral) and context.method_name == "__call__"


def is_embed_call(context) -> bool:
  """True when an interceptor `context` is an `nn.Embed.__call__` (a table lookup)."""
  return isinstance(context.module, nn.Embed) and context.method_name == "__call__"


def path_name(path: Sequence[str]) -> str:
  return "/".join(str(p) for p in path)


def lookup(tree: Mapping, path: Sequence[str], what: str, kind: str = "dense layer") -> Any:
  """Returns ``tree[path[0]][path[1]]...``; a KeyError names the missing layer (of `kind`)."""
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f"no {what} for {kind} {path_name(path)!r}; compute it with the same "
                     "model (and head) that is being applied")
    node = node[key]
  return node


def set_in(tree: dict, path: Sequence[str], value: Any) -> None:
  """Sets ``tree[path[0]]...[path[-1]] = value``, creating the intermediate dicts."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def apply_batch(model: nn.Module, variables: Mapping, batch: Any, **kwargs):
  """`model.apply` on a batch given as a Mapping of keyword arguments or as `input_ids`."""
  if isinstance(batch, Mapping):
    return model.apply(variables, **dict(batch), **kwargs)
  return model.apply(variables, batch, **kwargs)


def dense_values_fn(model: nn.Module, interceptor: Callable, collection: str, name: str,
                    **apply_kwargs) -> Callable:
  """A jitted (params, batch) -> {module path: [value per call]} that runs `model` under
  `interceptor`, which sows `name` into `collection` at each dense call (calibration statistics,
  initial step sizes)."""

  @jax.jit
  def run(params, batch):
    with nn.intercept_methods(interceptor):
      _, state = apply_batch(model, {"params": params}, batch, mutable=[collection],
                             **apply_kwargs)
    return sown(state.get(collection, {}), name)

  return run


def sown(collection: Mapping, name: str) -> dict:
  """Turns a sown collection ``{...: {"name": (v, ...)}}`` into ``{...: [v, ...]}`` per module."""
  out: dict = {}

  def walk(node, path):
    for key, value in node.items():
      if key == name and isinstance(value, tuple):
        set_in(out, path, list(value))
      elif isinstance(value, Mapping):
        walk(value, path + (key,))

  walk(collection, ())
  return out


def map_modules(fn: Callable[[Any], Any], tree: Mapping) -> dict:
  """Applies `fn` to every per-module leaf list produced by `sown`."""
  return {k: map_modules(fn, v) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}
