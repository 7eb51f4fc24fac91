"""Building blocks with logical sharding axes: dense layers, embeddings, norms, activations.

Every parameter is created through `nn.with_logical_partitioning`, so one rules table
(`mobilebert_jax.parallel.sharding`) alone decides how it is laid out on a device mesh.

Logical axis names used by the models:
  vocab        vocabulary rows of the token table and MLM logits
  token_embed  the narrow (128-d) token embedding
  embed        the inter-block hidden size (residual stream between layers)
  intra        the intra-block (bottleneck) width
  heads, kv    attention heads and per-head width
  mlp          feed-forward inner width
  hidden_out   the output side of square hidden->hidden maps (pooler, MLM transform)
  vocab_extra  MobileBERT's extra decoder rows (hidden_size - embedding_size)
  labels       classifier outputs
Activations use batch, length, embed.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Axes = tuple[str | None, ...]

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

# transformers' MobileBERT builds two of its norms with PyTorch's default epsilon.
TORCH_DEFAULT_LAYER_NORM_EPS = 1e-5


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation function called `name` (Hugging Face naming)."""
  if name not in _ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; valid: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def kernel_init(stddev: float, axes: Axes) -> Callable:
  return nn.with_logical_partitioning(nn.initializers.truncated_normal(stddev), axes)


def zeros_init(axes: Axes) -> Callable:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones_init(axes: Axes) -> Callable:
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def dense(features: int | Sequence[int], in_axes: Axes, out_axes: Axes, *, name: str,
          dtype: Dtype, param_dtype: Dtype, stddev: float, axis: int | Sequence[int] = -1,
          use_bias: bool = True) -> nn.DenseGeneral:
  """A `DenseGeneral` whose kernel is annotated (in_axes + out_axes) and bias out_axes."""
  return nn.DenseGeneral(
      features=features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=kernel_init(stddev, tuple(in_axes) + tuple(out_axes)),
      bias_init=zeros_init(tuple(out_axes)), name=name)


def embed(num: int, features: int, axes: Axes, *, name: str, dtype: Dtype, param_dtype: Dtype,
          stddev: float) -> nn.Embed:
  return nn.Embed(num_embeddings=num, features=features, dtype=dtype, param_dtype=param_dtype,
                  embedding_init=kernel_init(stddev, axes), name=name)


class NoNorm(nn.Module):
  """MobileBERT's NoNorm: an element-wise affine map ``gamma * h + beta`` in place of LayerNorm."""
  axis_name: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", ones_init((self.axis_name,)), (features,), self.param_dtype)
    bias = self.param("bias", zeros_init((self.axis_name,)), (features,), self.param_dtype)
    x = x.astype(self.dtype)
    return x * scale.astype(self.dtype) + bias.astype(self.dtype)


def norm(kind: str, axis_name: str, *, name: str, dtype: Dtype, param_dtype: Dtype,
         eps: float) -> nn.Module:
  """LayerNorm (statistics in float32) or NoNorm, with parameters named scale/bias."""
  if kind == "no_norm":
    return NoNorm(axis_name=axis_name, dtype=dtype, param_dtype=param_dtype, name=name)
  if kind == "layer_norm":
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, scale_init=ones_init((axis_name,)),
                        bias_init=zeros_init((axis_name,)), name=name)
  raise ValueError(f"unknown normalization {kind!r}; valid: ['layer_norm', 'no_norm']")


def dot_product_attention(q, k, v, mask, *, dropout_rate: float, deterministic: bool,
                          dtype: Dtype, probs_dtype: str = "float32"
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Scaled dot-product attention over [B, L, heads, head_dim] inputs and a [B, L] key mask.

  Softmax in float32; `probs_dtype` is `ModelConfig.attention_probs_dtype` (how the
  probabilities are kept). Returns (context [B, L, heads, head_dim], probabilities
  [B, H, L, L], masked scores [B, H, L, L]). Call inside a compact module (attention dropout
  is a submodule).
  """
  scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), dtype)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
  if probs_dtype == "float32":  # the original numerics
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
    values, product = v, {}
  else:  # one rounded array, read by the product in its dtype
    probs = rounded_softmax(scores.astype(jnp.float32), jnp.dtype(probs_dtype))
    values, product = v.astype(probs.dtype), {"preferred_element_type": dtype}
  dropped = nn.Dropout(dropout_rate)(probs, deterministic=deterministic)
  return jnp.einsum("bhqk,bkhd->bqhd", dropped, values, **product), probs, scores


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def rounded_softmax(scores: jax.Array, dtype: Dtype) -> jax.Array:
  """Softmax over the last axis of float32 `scores`, rounded to `dtype`.

  The backward pass keeps only the rounded output y and computes the float32 gradient
  y * (g - sum(g * y)) from it, so no float32 copy of the probabilities stays alive.
  """
  return jax.nn.softmax(scores, axis=-1).astype(dtype)


def _rounded_softmax_forward(scores, dtype):
  probs = rounded_softmax(scores, dtype)
  return probs, probs


def _rounded_softmax_backward(dtype, probs, grad):
  del dtype
  probs, grad = probs.astype(jnp.float32), grad.astype(jnp.float32)
  return (probs * (grad - jnp.sum(grad * probs, axis=-1, keepdims=True)),)


rounded_softmax.defvjp(_rounded_softmax_forward, _rounded_softmax_backward)
