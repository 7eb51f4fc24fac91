"""Shared helpers for tests that compare against transformers' PyTorch models."""

from __future__ import annotations

import numpy as np
import torch
import transformers

HEAD_CLASSES = {
    ("mobilebert", "pretraining"): "MobileBertForPreTraining",
    ("mobilebert", "masked_lm"): "MobileBertForMaskedLM",
    ("mobilebert", "base"): "MobileBertModel",
    ("mobilebert", "classification"): "MobileBertForSequenceClassification",
    ("mobilebert", "question_answering"): "MobileBertForQuestionAnswering",
    ("bert", "pretraining"): "BertForPreTraining",
    ("bert", "masked_lm"): "BertForMaskedLM",
    ("bert", "base"): "BertModel",
    ("bert", "classification"): "BertForSequenceClassification",
    ("bert", "question_answering"): "BertForQuestionAnswering",
}

SMALL = dict(vocab_size=120, hidden_size=32, num_attention_heads=4, intermediate_size=24,
             num_hidden_layers=2, max_position_embeddings=40)


def hf_config(model_type: str, **overrides):
  values = dict(SMALL, **overrides)
  if model_type == "mobilebert":
    values.setdefault("embedding_size", 16)
    values.setdefault("intra_bottleneck_size", 16)
    return transformers.MobileBertConfig(**values)
  return transformers.BertConfig(**values)


def perturbed_model(model_type: str, head: str, seed: int = 0, **overrides):
  """A transformers model whose every parameter is moved well away from its initial value.

  NoNorm's 1/0 and LayerNorm's 1/0 initial values hide wiring bugs, so all weights get noise.
  """
  torch.manual_seed(seed)
  config = hf_config(model_type, **overrides)
  config._attn_implementation = "eager"
  model = getattr(transformers, HEAD_CLASSES[(model_type, head)])(config)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(torch.randn_like(param) * 0.2)
  return model.eval()


def batch(vocab_size: int, seed: int = 0, shape=(3, 12)):
  """input_ids with padding in two rows and two segment types."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(5, vocab_size, shape).astype(np.int64)
  mask = np.ones(shape, np.int64)
  mask[1, shape[1] - 4:] = 0
  mask[2, 5:] = 0
  ids[mask == 0] = 0
  types = np.zeros(shape, np.int64)
  types[:, shape[1] // 2:] = 1
  types[mask == 0] = 0
  return ids, mask, types


def torch_outputs(model, ids, mask, types):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types), output_hidden_states=True,
                 output_attentions=True)


def max_diff(a, b) -> float:
  a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
  return float(np.max(np.abs(a - np.asarray(b, dtype=np.float32))))
