"""The configurable encoder: embeddings, transformer layers and pooler.

One `Backbone` covers BERT (post-LN, GELU), IB-BERT (inverted bottleneck), MobileBERT (bottleneck,
shared q/k bottleneck, stacked FFNs, NoNorm, ReLU) and MobileBERT-TINY (q/k/v from the bottleneck),
following transformers' `MobileBertModel` / `BertModel` numerically. Parameters live outside the
module: `Backbone(config).apply({"params": params}, input_ids, ...)`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobilebert_jax.models import layers
from mobilebert_jax.models.config import ModelConfig
from mobilebert_jax.models.nas_layers import NasLayer
from mobilebert_jax.models.outputs import EncoderOutput

Dtype = Any
ACTIVATION_AXES = ("batch", "length", "embed")
# With `ModelConfig.scan_layers`, the scanned layers' submodule name and the logical name of the
# leading axis their stacked parameters get (mapped to no mesh axis by the sharding rules).
SCAN_NAME = "layers"
SCAN_AXIS = "layers"


class Embeddings(nn.Module):
  """Token (optionally trigram-widened), position and segment embeddings, then a norm."""
  config: ModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, stddev=cfg.initializer_range)
    narrow = "embed" if cfg.embedding_size == cfg.hidden_size else "token_embed"
    x = layers.embed(cfg.vocab_size, cfg.embedding_size, ("vocab", narrow),
                     name="word_embeddings", **kw)(input_ids)
    if cfg.trigram_input:
      # Kernel-3 convolution as in the reference: [emb(t+1), emb(t), emb(t-1)], zero padded.
      nxt = jnp.pad(x[:, 1:], ((0, 0), (0, 1), (0, 0)))
      prev = jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0)))
      x = jnp.concatenate([nxt, x, prev], axis=-1)
    if cfg.uses_embedding_transformation:
      x = layers.dense(cfg.hidden_size, (narrow,), ("embed",), name="embedding_transformation",
                       **kw)(x)
    x = x + layers.embed(cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"),
                         name="position_embeddings", **kw)(position_ids)
    x = x + layers.embed(cfg.type_vocab_size, cfg.hidden_size, (None, "embed"),
                         name="token_type_embeddings", **kw)(token_type_ids)
    eps = (layers.TORCH_DEFAULT_LAYER_NORM_EPS if cfg.model_type == "mobilebert"
           else cfg.layer_norm_eps)
    x = layers.norm(cfg.normalization, "embed", name="norm", dtype=self.dtype,
                    param_dtype=self.param_dtype, eps=eps)(x)
    x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


class Attention(nn.Module):
  """Multi-head attention with its output projection, residual and norm.

  Returns (normed output [B, L, intra], probabilities [B, H, L, L], masked scores [B, H, L, L]).
  """
  config: ModelConfig
  query_axis: str
  value_axis: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_in, k_in, v_in, residual, mask, deterministic: bool):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, stddev=cfg.initializer_range)
    heads = (cfg.num_heads, cfg.head_dim)
    q = layers.dense(heads, (self.query_axis,), ("heads", "kv"), name="query", **kw)(q_in)
    k = layers.dense(heads, (self.query_axis,), ("heads", "kv"), name="key", **kw)(k_in)
    v = layers.dense(heads, (self.value_axis,), ("heads", "kv"), name="value", **kw)(v_in)
    context, probs, scores = layers.dot_product_attention(
        q, k, v, mask, dropout_rate=cfg.attention_dropout, deterministic=deterministic,
        dtype=self.dtype, probs_dtype=cfg.attention_probs_dtype)
    out = layers.dense(cfg.intra_size, ("heads", "kv"), ("intra",), axis=(-2, -1), name="output",
                       **kw)(context)
    if not cfg.use_bottleneck:
      out = nn.Dropout(cfg.hidden_dropout)(out, deterministic=deterministic)
    out = layers.norm(cfg.normalization, "intra", name="norm", dtype=self.dtype,
                      param_dtype=self.param_dtype, eps=cfg.layer_norm_eps)(out + residual)
    return out, probs, scores


class FeedForward(nn.Module):
  """dense -> activation -> dense, residual, norm (one of MobileBERT's F stacked FFNs)."""
  config: ModelConfig
  eps: float
  dropout: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, stddev=cfg.initializer_range)
    h = layers.dense(cfg.intermediate_size, ("intra",), ("mlp",), name="intermediate", **kw)(x)
    h = layers.activation(cfg.hidden_act)(h)
    h = layers.dense(cfg.intra_size, ("mlp",), ("intra",), name="output", **kw)(h)
    if self.dropout:
      h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
    return layers.norm(cfg.normalization, "intra", name="norm", dtype=self.dtype,
                       param_dtype=self.param_dtype, eps=self.eps)(h + x)


class TransformerLayer(nn.Module):
  """One encoder layer; returns (hidden [B, L, hidden], attention probs, attention scores)."""
  config: ModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden, mask, deterministic: bool = True):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense_kw = dict(kw, stddev=cfg.initializer_range)
    eps = cfg.layer_norm_eps

    def bottleneck(name):
      h = layers.dense(cfg.intra_size, ("embed",), ("intra",), name=name, **dense_kw)(hidden)
      return layers.norm(cfg.normalization, "intra", name=f"{name}_norm", eps=eps, **kw)(h)

    query_axis = value_axis = "embed"
    q_in = k_in = v_in = layer_input = hidden
    if cfg.use_bottleneck:
      layer_input = bottleneck("bottleneck_input")
      if cfg.attention_input == "bottleneck":
        q_in = k_in = v_in = layer_input
        query_axis = value_axis = "intra"
      elif cfg.attention_input == "shared_bottleneck":
        q_in = k_in = bottleneck("bottleneck_attention")
        query_axis = "intra"

    x, probs, scores = Attention(cfg, query_axis, value_axis, name="attention", **kw)(
        q_in, k_in, v_in, layer_input, mask, deterministic)
    for i in range(cfg.num_ffn - 1):
      x = FeedForward(cfg, eps=eps, name=f"stacked_ffn_{i}", **kw)(x, deterministic)
    # transformers' MobileBERT builds this norm without passing layer_norm_eps.
    ffn_eps = layers.TORCH_DEFAULT_LAYER_NORM_EPS if cfg.model_type == "mobilebert" else eps
    x = FeedForward(cfg, eps=ffn_eps, dropout=not cfg.use_bottleneck, name="ffn", **kw)(
        x, deterministic)
    if cfg.use_bottleneck:
      out = layers.dense(cfg.hidden_size, ("intra",), ("embed",), name="output_bottleneck",
                         **dense_kw)(x)
      out = nn.Dropout(cfg.hidden_dropout)(out, deterministic=deterministic)
      x = layers.norm(cfg.normalization, "embed", name="output_bottleneck_norm", eps=eps,
                      **kw)(out + hidden)
    return nn.with_logical_constraint(x, ACTIVATION_AXES), probs, scores


class ScanStep(TransformerLayer):
  """A `TransformerLayer` in `nn.scan`'s form: returns (hidden, (hidden, probs, scores))."""

  def __call__(self, hidden, mask, deterministic: bool = True):
    hidden, probs, scores = super().__call__(hidden, mask, deterministic)
    return hidden, (hidden, probs, scores)


def _remat(layer_cls, cfg: ModelConfig, prevent_cse: bool = True):
  """`layer_cls` rematerialised with the config's policy when `cfg.remat` is set."""
  if not cfg.remat:
    return layer_cls
  return nn.remat(layer_cls, static_argnums=(3,), prevent_cse=prevent_cse,
                  policy=getattr(jax.checkpoint_policies, cfg.remat_policy))


class Backbone(nn.Module):
  """Embeddings, `num_layers` transformer layers and (optionally) the [CLS] pooler.

  The layers' parameters are `layer_0`, `layer_1`, ...; with `config.scan_layers` they are one
  `layers` subtree stacked on a leading axis (see `models.layout`).

  Call with `input_ids` [B, L] int, optional `attention_mask` (1 = real token), `token_type_ids`,
  `position_ids`; `deterministic=False` enables dropout (needs a 'dropout' rng).
  """
  config: ModelConfig
  add_pooling_layer: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embeddings = Embeddings(cfg, **kw)
    if cfg.scan_layers:  # (ModelConfig rejects it with layer_ops, whose layers differ)
      # One layer traced once and run num_layers times; parameters stacked on axis 0.
      step = _remat(ScanStep, cfg, prevent_cse=False)
      self.layers = nn.scan(
          step, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: SCAN_AXIS})(cfg, name=SCAN_NAME, **kw)
    elif cfg.layer_ops:  # a NAS-BERT architecture: one op per layer
      self.layer = [_remat(NasLayer, cfg)(cfg, op, **kw) for op in cfg.layer_ops]
    else:
      self.layer = [_remat(TransformerLayer, cfg)(cfg, **kw) for _ in range(cfg.num_layers)]
    if self.add_pooling_layer and cfg.classifier_activation:
      self.pooler = layers.dense(cfg.hidden_size, ("embed",), ("hidden_out",), name=None,
                                 stddev=cfg.initializer_range, **kw)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
               deterministic: bool = True, output_hidden_states: bool = False,
               output_attentions: bool = False,
               output_attention_scores: bool = False) -> EncoderOutput:
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    length = input_ids.shape[1]
    if length > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings="
                       f"{self.config.max_position_embeddings}")
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
    mask = jnp.asarray(attention_mask).astype(bool)

    hidden = self.embeddings(input_ids, token_type_ids, position_ids, deterministic)
    all_hidden, all_probs, all_scores = [hidden], [], []
    if self.config.scan_layers:
      # Per-layer outputs come back stacked; outputs nobody asks for are dropped by jit.
      hidden, stacked = self.layers(hidden, mask, deterministic)
      for i in range(self.config.num_layers):
        h, probs, scores = (x[i] for x in stacked)
        all_hidden.append(h)
        all_probs.append(probs)
        all_scores.append(scores)
    else:
      for layer in self.layer:
        hidden, probs, scores = layer(hidden, mask, deterministic)
        all_hidden.append(hidden)
        all_probs.append(probs)
        all_scores.append(scores)

    pooled = None
    if self.add_pooling_layer:
      pooled = hidden[:, 0]
      if self.config.classifier_activation:
        pooled = jnp.tanh(self.pooler(pooled))
    return EncoderOutput(
        last_hidden_state=hidden,
        pooler_output=pooled,
        hidden_states=tuple(all_hidden) if output_hidden_states else None,
        attentions=tuple(all_probs) if output_attentions else None,
        attention_scores=tuple(all_scores) if output_attention_scores else None)
