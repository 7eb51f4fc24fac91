"""The two parameter layouts of a backbone's layers: canonical (per layer) and scanned (stacked).

Canonical is what checkpoints, the Hugging Face conversion and every other module see: one
subtree per layer, ``layer_0``, ``layer_1``, ... A model built with `ModelConfig.scan_layers`
expects instead one ``layers`` subtree whose leaves carry a leading axis of ``num_layers``
(logical name "layers"). The functions here convert between the two; they find every backbone
(a mapping with an ``embeddings`` entry) in a tree, so a head model's tree, a bare backbone's, or
a mapping holding either all work. Leaves may be arrays (numpy stays numpy), abstract
``jax.ShapeDtypeStruct`` shapes, or ``nn.Partitioned`` boxes (the "layers" name is added or
dropped).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mobilebert_jax.models.config import ModelConfig
from mobilebert_jax.models.encoder import SCAN_AXIS, SCAN_NAME

_LAYER_KEY = re.compile(r"layer_(\d+)")


def to_model_layout(params: Any, config: ModelConfig) -> Any:
  """Canonical params -> the layout `build_model(config, ...)` expects.

  Stacks ``layer_i`` into ``layers`` when `config.scan_layers`; otherwise returns the canonical
  layout (the input itself when it already is). Idempotent.
  """
  if not config.scan_layers:
    return to_canonical_layout(params, config)
  return _map_backbones(params, lambda backbone: _stack_layers(backbone, config.num_layers))


def to_canonical_layout(params: Any, config: ModelConfig) -> Any:
  """Params in either layout -> the canonical per-layer layout (``layer_0``, ...). Idempotent."""
  return _map_backbones(params, lambda backbone: _unstack_layers(backbone, config.num_layers))


def _map_backbones(tree: Any, fn: Callable[[Mapping], dict]) -> Any:
  if not isinstance(tree, Mapping):
    return tree
  if "embeddings" in tree:
    return fn(tree)
  converted = {k: _map_backbones(v, fn) for k, v in tree.items()}
  if all(converted[k] is v for k, v in tree.items()):
    return tree
  return converted


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def _stack_layers(backbone: Mapping, num_layers: int) -> Mapping:
  keys = [k for k in backbone if _LAYER_KEY.fullmatch(k)]
  if not keys:
    return backbone  # already stacked (or no layers at all)
  if SCAN_NAME in backbone:
    raise ValueError(f"a backbone has both '{SCAN_NAME}' and per-layer entries {keys}")
  expected = [f"layer_{i}" for i in range(num_layers)]
  if sorted(keys, key=lambda k: int(k[6:])) != expected:
    raise ValueError(f"expected layers layer_0..layer_{num_layers - 1} "
                     f"(ModelConfig.num_layers={num_layers}), found {sorted(keys)}")
  stacked = jax.tree.map(lambda *xs: _stack(xs), *(backbone[k] for k in expected),
                         is_leaf=_is_box)
  out = {}
  for k, v in backbone.items():
    if k == expected[0]:
      out[SCAN_NAME] = stacked
    elif k not in expected:
      out[k] = v
  return out


def _unstack_layers(backbone: Mapping, num_layers: int) -> Mapping:
  if SCAN_NAME not in backbone:
    return backbone
  stacked = backbone[SCAN_NAME]
  depths = {_leading_dim(x) for x in jax.tree.leaves(stacked, is_leaf=_is_box)}
  if depths != {num_layers}:
    raise ValueError(f"'{SCAN_NAME}' parameters have leading axes {sorted(depths)}, expected "
                     f"ModelConfig.num_layers={num_layers}")
  out = {}
  for k, v in backbone.items():
    if k == SCAN_NAME:
      for i in range(num_layers):
        out[f"layer_{i}"] = jax.tree.map(lambda x: _take(x, i), stacked, is_leaf=_is_box)
    else:
      out[k] = v
  return out


def _stack(leaves: Sequence[Any]) -> Any:
  first = leaves[0]
  if _is_box(first):
    return first.replace(value=_stack([x.value for x in leaves]),
                         names=(SCAN_AXIS,) + tuple(first.names))
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype)
  if any(isinstance(x, jax.Array) for x in leaves):
    return jnp.stack(leaves)
  return np.stack([np.asarray(x) for x in leaves])


def _take(x: Any, i: int) -> Any:
  if _is_box(x):
    names = tuple(x.names)
    if not names or names[0] != SCAN_AXIS:
      raise ValueError(f"a stacked parameter's first logical axis is {names[:1]}, expected "
                       f"'{SCAN_AXIS}'")
    return x.replace(value=_take(x.value, i), names=names[1:])
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype)
  return x[i]


def _leading_dim(x: Any) -> int | None:
  value = x.value if _is_box(x) else x
  shape = tuple(np.shape(value)) if not hasattr(value, "shape") else tuple(value.shape)
  return shape[0] if shape else None


def num_params(tree: Any) -> int:
  """Number of scalars in a parameter tree (either layout)."""
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))
