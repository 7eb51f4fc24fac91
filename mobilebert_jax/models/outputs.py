"""Model outputs, named as transformers names them. They are pytrees, so jit can return them."""

from __future__ import annotations

from typing import Any

import flax.struct

Array = Any


class _Output:
  """Mapping-style access (``out["prediction_logits"]``) alongside attribute access."""

  def __getitem__(self, key: str):
    return getattr(self, key)

  def keys(self):
    return [k for k in self.__dataclass_fields__ if getattr(self, k) is not None]


@flax.struct.dataclass
class EncoderOutput(_Output):
  """Backbone output.

  hidden_states: embedding output followed by every layer's inter-block output (num_layers + 1).
  attentions: per-layer attention probabilities [batch, heads, q, k].
  attention_scores: per-layer scaled, masked scores before the softmax (TinyBERT's target).
  """
  last_hidden_state: Array
  pooler_output: Array | None = None
  hidden_states: tuple[Array, ...] | None = None
  attentions: tuple[Array, ...] | None = None
  attention_scores: tuple[Array, ...] | None = None


@flax.struct.dataclass
class PreTrainingOutput(_Output):
  """MLM (+ NSP) head output; `prediction_logits` is [batch, P, vocab] when positions are given."""
  prediction_logits: Array
  seq_relationship_logits: Array | None = None
  last_hidden_state: Array | None = None
  hidden_states: tuple[Array, ...] | None = None
  attentions: tuple[Array, ...] | None = None
  attention_scores: tuple[Array, ...] | None = None


@flax.struct.dataclass
class SequenceClassifierOutput(_Output):
  logits: Array
  last_hidden_state: Array | None = None
  hidden_states: tuple[Array, ...] | None = None
  attentions: tuple[Array, ...] | None = None
  attention_scores: tuple[Array, ...] | None = None


@flax.struct.dataclass
class QuestionAnsweringOutput(_Output):
  start_logits: Array
  end_logits: Array
  last_hidden_state: Array | None = None
  hidden_states: tuple[Array, ...] | None = None
  attentions: tuple[Array, ...] | None = None
  attention_scores: tuple[Array, ...] | None = None
