"""Teacher-student loyalty of a classifier over encoded examples.

  teacher = predict_fn(teacher_model, teacher_params)
  student = predict_fn(student_model, student_params)
  arrays = encode_examples(examples, tokenizer, max_seq_length=128)
  evaluate_loyalty(teacher, student, arrays, batch_size=32)
  # -> {"label_loyalty": ..., "probability_loyalty": ...}

A predictor maps a batch {input_ids, attention_mask, token_type_ids} of numpy arrays [B, L] to
logits [B, C]. Batches always hold `batch_size` rows (the last one is filled by wrapping around
and the extra rows dropped), so a jitted predictor compiles once.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from mobilebert_jax.compilation import jit_inference
from mobilebert_jax.downstream.metrics import label_loyalty, probability_loyalty

BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids")

Predictor = Callable[[Mapping[str, np.ndarray]], np.ndarray]


def softmax(logits) -> np.ndarray:
  """Row-wise softmax in float64: exp(z - max z) / sum(exp(z - max z))."""
  z = np.asarray(logits, np.float64)
  if z.ndim != 2:
    raise ValueError(f"softmax expects logits [N, C], got shape {z.shape}")
  z = np.exp(z - z.max(axis=1, keepdims=True))
  return z / z.sum(axis=1, keepdims=True)


def predict_fn(model, params) -> Predictor:
  """A jitted numpy-in / numpy-out predictor for a flax classification model: batch dict ->
  `model.apply({"params": params}, input_ids, attention_mask, token_type_ids).logits` as float32
  [B, C] (deterministic, no dropout)."""

  @jit_inference
  def forward(params, input_ids, attention_mask, token_type_ids):
    return model.apply({"params": params}, input_ids, attention_mask, token_type_ids).logits

  def predict(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.asarray(forward(params, *(np.asarray(batch[k]) for k in BATCH_KEYS)), np.float32)

  return predict


def batched_logits(predict: Predictor, arrays: Mapping[str, np.ndarray],
                   batch_size: int) -> np.ndarray:
  """Logits [N, C] of `predict` over `arrays`, in batches of exactly `batch_size` rows."""
  missing = [k for k in BATCH_KEYS if k not in arrays]
  if missing:
    raise KeyError(f"arrays lack {missing}; got keys {sorted(arrays)} (use encode_examples)")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  n = len(arrays["input_ids"])
  if n == 0:
    raise ValueError("no examples to predict")
  outputs = []
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size) % n  # wrap around to fill the last batch
    logits = np.asarray(predict({k: np.asarray(arrays[k])[rows] for k in BATCH_KEYS}))
    if logits.ndim != 2 or logits.shape[0] != batch_size:
      raise ValueError(f"a predictor must return logits [batch, classes] = [{batch_size}, C], "
                       f"got shape {logits.shape}")
    outputs.append(logits)
  return np.concatenate(outputs)[:n]


def evaluate_loyalty(teacher_predict: Predictor, student_predict: Predictor,
                     arrays: Mapping[str, np.ndarray], batch_size: int,
                     base: float | None = None) -> dict[str, float]:
  """Label loyalty (argmax agreement) and probability loyalty (mean 1 - sqrt(JSD)) of the
  student to the teacher over `arrays`, both from float64 softmaxes of the logits.

  JSD uses natural logarithms by default, as SciPy's `distance.jensenshannon` that the loyalty
  paper's reference names (Xu et al., 2021); `base=2` gives the [0, 1]-bounded variant.
  """
  return loyalty_scores(batched_logits(teacher_predict, arrays, batch_size),
                        batched_logits(student_predict, arrays, batch_size), base)


def loyalty_scores(teacher: np.ndarray, student: np.ndarray,
                   base: float | None = None) -> dict[str, float]:
  """Label and probability loyalty of student logits [N, C] to teacher logits [N, C]
  (`base`: the JSD's logarithm, None = natural, as `metrics.probability_loyalty`)."""
  teacher, student = np.asarray(teacher), np.asarray(student)
  if teacher.shape != student.shape:
    raise ValueError(f"teacher logits {teacher.shape} and student logits {student.shape} differ "
                     "in shape: do the two models have the same number of labels?")
  t, s = softmax(teacher), softmax(student)
  return {"label_loyalty": label_loyalty(t, s),
          "probability_loyalty": probability_loyalty(t, s, base)}
