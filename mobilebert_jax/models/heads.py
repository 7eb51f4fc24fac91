"""Task heads on top of the `Backbone`: MLM + NSP, MLM only, sequence classification, spans.

Every model takes the backbone's keyword arguments (attention_mask, token_type_ids, position_ids,
deterministic, output_hidden_states, output_attentions, output_attention_scores) and returns an
output dataclass named as in transformers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mobilebert_jax.models import layers
from mobilebert_jax.models.config import ModelConfig
from mobilebert_jax.models.encoder import Backbone
from mobilebert_jax.models.outputs import (EncoderOutput, PreTrainingOutput,
                                           QuestionAnsweringOutput, SequenceClassifierOutput)

Dtype = Any


def _encoder_fields(out: EncoderOutput) -> dict:
  return dict(last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states,
              attentions=out.attentions, attention_scores=out.attention_scores)


def gather_positions(sequence, positions):
  """Picks [B, P, H] vectors at `positions` [B, P] from `sequence` [B, L, H]."""
  return jnp.take_along_axis(sequence, positions[..., None].astype(jnp.int32), axis=1)


class MaskedLMHead(nn.Module):
  """Transform (dense, activation, LayerNorm) then the decoder tied to the token embedding.

  MobileBERT's token table is narrower than the hidden size, so the decoder is the tied table
  (embedding_size rows) stacked with an extra learned [hidden - embedding, vocab] matrix, as in
  transformers. For BERT (equal widths) the extra matrix is empty and not created.
  """
  config: ModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden, word_embeddings):
    """`word_embeddings` is the backbone's [vocab, embedding_size] token table (tied)."""
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.dense(cfg.hidden_size, ("embed",), ("hidden_out",), name="transform",
                     stddev=cfg.initializer_range, **kw)(hidden)
    h = layers.activation(cfg.hidden_act)(h)
    h = layers.norm("layer_norm", "hidden_out", name="transform_norm", eps=cfg.layer_norm_eps,
                    **kw)(h)
    logits = h[..., :cfg.embedding_size] @ word_embeddings.astype(self.dtype).T
    extra_rows = cfg.hidden_size - cfg.embedding_size
    if extra_rows:
      extra = self.param("extra_decoder", layers.kernel_init(cfg.initializer_range,
                                                              ("vocab_extra", "vocab")),
                         (extra_rows, cfg.vocab_size), self.param_dtype)
      logits = logits + h[..., cfg.embedding_size:] @ extra.astype(self.dtype)
    bias = self.param("bias", layers.zeros_init(("vocab",)), (cfg.vocab_size,), self.param_dtype)
    return logits + bias.astype(self.dtype)


class _WithBackbone(nn.Module):
  config: ModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  add_pooling_layer = True

  def setup(self):
    self.backbone = Backbone(self.config, add_pooling_layer=self.add_pooling_layer,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    self.setup_head()

  def setup_head(self):
    raise NotImplementedError

  def _dense(self, features, in_axis, out_axis):
    return layers.dense(features, (in_axis,), (out_axis,), name=None, dtype=self.dtype,
                        param_dtype=self.param_dtype, stddev=self.config.initializer_range)

  def _mlm(self, out: EncoderOutput, masked_lm_positions):
    hidden = out.last_hidden_state
    if masked_lm_positions is not None:
      hidden = gather_positions(hidden, masked_lm_positions)
    table = self.backbone.embeddings.variables["params"]["word_embeddings"]["embedding"]
    return self.mlm(hidden, nn.meta.unbox(table))


class ForPreTraining(_WithBackbone):
  """MLM and NSP heads (transformers' *ForPreTraining).

  `masked_lm_positions` [B, P] restricts the vocabulary projection to the masked slots, as
  BERT's pretraining does; then `prediction_logits` is [B, P, vocab].
  """

  def setup_head(self):
    self.mlm = MaskedLMHead(self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    self.nsp = self._dense(2, "embed", "labels")

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
               masked_lm_positions=None, deterministic: bool = True, **flags) -> PreTrainingOutput:
    out = self.backbone(input_ids, attention_mask, token_type_ids, position_ids,
                        deterministic=deterministic, **flags)
    return PreTrainingOutput(prediction_logits=self._mlm(out, masked_lm_positions),
                             seq_relationship_logits=self.nsp(out.pooler_output),
                             **_encoder_fields(out))


class ForMaskedLM(_WithBackbone):
  """MLM head only, no pooler (transformers' *ForMaskedLM)."""
  add_pooling_layer = False

  def setup_head(self):
    self.mlm = MaskedLMHead(self.config, dtype=self.dtype, param_dtype=self.param_dtype)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
               masked_lm_positions=None, deterministic: bool = True, **flags) -> PreTrainingOutput:
    out = self.backbone(input_ids, attention_mask, token_type_ids, position_ids,
                        deterministic=deterministic, **flags)
    return PreTrainingOutput(prediction_logits=self._mlm(out, masked_lm_positions),
                             **_encoder_fields(out))


class ForSequenceClassification(_WithBackbone):
  """Pooled [CLS] -> dropout -> dense(num_labels) (transformers' *ForSequenceClassification)."""

  def setup_head(self):
    cfg = self.config
    rate = cfg.hidden_dropout if cfg.classifier_dropout is None else cfg.classifier_dropout
    self.dropout = nn.Dropout(rate)
    self.classifier = self._dense(cfg.num_labels, "embed", "labels")

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
               deterministic: bool = True, **flags) -> SequenceClassifierOutput:
    out = self.backbone(input_ids, attention_mask, token_type_ids, position_ids,
                        deterministic=deterministic, **flags)
    pooled = self.dropout(out.pooler_output, deterministic=deterministic)
    return SequenceClassifierOutput(logits=self.classifier(pooled), **_encoder_fields(out))


class ForQuestionAnswering(_WithBackbone):
  """Per-token start/end logits for extractive QA (transformers' *ForQuestionAnswering)."""
  add_pooling_layer = False

  def setup_head(self):
    self.qa_outputs = self._dense(2, "embed", "labels")

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
               deterministic: bool = True, **flags) -> QuestionAnsweringOutput:
    out = self.backbone(input_ids, attention_mask, token_type_ids, position_ids,
                        deterministic=deterministic, **flags)
    logits = self.qa_outputs(out.last_hidden_state)
    return QuestionAnsweringOutput(start_logits=logits[..., 0], end_logits=logits[..., 1],
                                   **_encoder_fields(out))


class ForTokenClassification(ForSequenceClassification):
  """Per-token hidden state -> dropout -> dense(num_labels) (transformers'
  *ForTokenClassification: no pooler); `logits` is [batch, length, num_labels]."""
  add_pooling_layer = False

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
               deterministic: bool = True, **flags) -> SequenceClassifierOutput:
    out = self.backbone(input_ids, attention_mask, token_type_ids, position_ids,
                        deterministic=deterministic, **flags)
    hidden = self.dropout(out.last_hidden_state, deterministic=deterministic)
    return SequenceClassifierOutput(logits=self.classifier(hidden), **_encoder_fields(out))


HEADS = {
    "base": Backbone,
    "pretraining": ForPreTraining,
    "masked_lm": ForMaskedLM,
    "classification": ForSequenceClassification,
    "question_answering": ForQuestionAnswering,
    "token_classification": ForTokenClassification,
}


def build_model(config: ModelConfig, head: str = "pretraining", *, dtype: Dtype = jnp.float32,
                param_dtype: Dtype = jnp.float32) -> nn.Module:
  """Returns the flax module for `config` with `head` (one of HEADS)."""
  if head not in HEADS:
    raise ValueError(f"unknown model head {head!r}; valid heads: {sorted(HEADS)}")
  return HEADS[head](config, dtype=dtype, param_dtype=param_dtype)
