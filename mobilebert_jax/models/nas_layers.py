"""NAS-BERT layer ops: multi-head attention, feed-forward, separable convolution and identity.

A NAS architecture (`ModelConfig.layer_ops`) stacks one op per layer instead of transformer
layers. Every op except identity is a residual block with a post-LayerNorm at the hidden size:
``LayerNorm(x + f(x))``. The parameter layouts are chosen so that a smaller op is a *prefix slice*
of a larger one, which is how the NAS supernet shares weights across widths
(`mobilebert_jax.search.supernet.slice_like`):

  mha<n>      query/key/value/output kernels are flat [hidden, hidden] (heads are a reshape of
              the output columns), so any head count shares one set of weights;
  ffn<i>      intermediate [hidden, i] and output [i, hidden];
  conv<k>     a depthwise kernel [k, hidden] whose taps are stored by distance from the centre
              (offsets 0, -1, +1, -2, +2, ...): the first k rows are a centred kernel of size k;
              then a pointwise [hidden, hidden] map and the activation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobilebert_jax.models import layers
from mobilebert_jax.models.config import ModelConfig, parse_op

Dtype = Any
ACTIVATION_AXES = ("batch", "length", "embed")


def tap_offsets(kernel: int) -> list[int]:
  """Relative positions of a depthwise kernel's taps, centre first: 0, -1, +1, -2, +2, ..."""
  return [0] + [sign * d for d in range(1, kernel // 2 + 1) for sign in (-1, 1)]


def shift(x: jax.Array, offset: int) -> jax.Array:
  """y[:, t] = x[:, t + offset] along the length axis, zero outside the sequence."""
  if offset == 0:
    return x
  length = x.shape[1]
  if abs(offset) >= length:
    return jnp.zeros_like(x)
  if offset > 0:
    return jnp.pad(x[:, offset:], ((0, 0), (0, offset), (0, 0)))
  return jnp.pad(x[:, :offset], ((0, 0), (-offset, 0), (0, 0)))


class NasLayer(nn.Module):
  """One NAS-BERT op at ``config.hidden_size``; returns (hidden, attention probs, scores).

  Probabilities and scores are None for ops other than attention.
  """
  config: ModelConfig
  op: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden, mask, deterministic: bool = True):
    cfg = self.config
    kind, size = parse_op(self.op)
    if kind == "identity":
      return hidden, None, None
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, stddev=cfg.initializer_range)
    width = hidden.shape[-1]
    probs = scores = None
    if kind == "mha":
      heads, head_dim = size, width // size
      split = lambda t: t.reshape(t.shape[:-1] + (heads, head_dim))
      q = split(layers.dense(width, ("embed",), ("heads",), name="query", **kw)(hidden))
      k = split(layers.dense(width, ("embed",), ("heads",), name="key", **kw)(hidden))
      v = split(layers.dense(width, ("embed",), ("heads",), name="value", **kw)(hidden))
      context, probs, scores = layers.dot_product_attention(
          q, k, v, mask, dropout_rate=cfg.attention_dropout, deterministic=deterministic,
          dtype=self.dtype, probs_dtype=cfg.attention_probs_dtype)
      context = context.reshape(hidden.shape)
      out = layers.dense(width, ("heads",), ("embed",), name="output", **kw)(context)
    elif kind == "ffn":
      h = layers.dense(size, ("embed",), ("mlp",), name="intermediate", **kw)(hidden)
      h = layers.activation(cfg.hidden_act)(h)
      out = layers.dense(width, ("mlp",), ("embed",), name="output", **kw)(h)
    else:  # conv: depthwise (centre-first taps) -> pointwise -> activation
      kernel = self.param("depthwise", layers.kernel_init(cfg.initializer_range, (None, "embed")),
                          (size, width), self.param_dtype).astype(self.dtype)
      bias = self.param("depthwise_bias", layers.zeros_init(("embed",)), (width,),
                        self.param_dtype).astype(self.dtype)
      x = hidden * mask[..., None].astype(hidden.dtype)  # padding never leaks into real tokens
      h = sum(shift(x, offset) * kernel[i] for i, offset in enumerate(tap_offsets(size))) + bias
      h = layers.dense(width, ("embed",), ("hidden_out",), name="pointwise", **kw)(h)
      out = layers.activation(cfg.hidden_act)(h)
    out = nn.Dropout(cfg.hidden_dropout)(out, deterministic=deterministic)
    out = layers.norm("layer_norm", "embed", name="norm", dtype=self.dtype,
                      param_dtype=self.param_dtype, eps=cfg.layer_norm_eps)(out + hidden)
    return nn.with_logical_constraint(out, ACTIVATION_AXES), probs, scores
