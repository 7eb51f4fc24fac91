"""TinyBERT distillation objectives (Jiao et al., 2020) and student-to-teacher layer mappings.

Layer indexing: `hidden_states` is a tuple of M+1 (student) / N+1 (teacher) arrays
[B,L,D] where index 0 is the embedding output and index m the output of layer m;
`attention_scores` is a tuple of M / N unnormalised score arrays [B,heads,L,L] (index
m-1 for layer m). A mapping `g` gives, for student layers 1..M, the teacher layer
(1..N) it learns from.

All losses are pure, jit-able and compute in float32 (bf16 inputs are upcast).
Teacher tensors are wrapped in `jax.lax.stop_gradient`: the teacher is frozen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from mobilebert_jax.objectives.common import (as_f32, check_attention_pair, check_rank,
                                              check_same_shape, masked_mean,
                                              soft_cross_entropy, token_mask, weighted_mean)

Array = jax.Array

# Scores at or below this value are treated as masked (additive masks are ~-1e4 or less).
MASKED_SCORE_THRESHOLD = -1e3

_ORDERS = ("any", "nondecreasing", "increasing")


def _projected_mse(student, teacher, projection, attention_mask, what: str) -> Array:
  check_rank(f"student {what}", student, 3, "[B,L,Ds]")
  check_rank(f"teacher {what}", teacher, 3, "[B,L,Dt]")
  s_shape, t_shape = tuple(jnp.shape(student)), tuple(jnp.shape(teacher))
  if s_shape[:2] != t_shape[:2]:
    raise ValueError(
        f"student {what} {s_shape} and teacher {what} {t_shape} must share [B,L]")
  ds, dt = s_shape[2], t_shape[2]
  mask = token_mask(attention_mask, s_shape[:2])
  real = mask[..., None] > 0  # padded tokens are zeroed so inf/NaN there cannot leak
  s = jnp.where(real, as_f32(student), 0.0)
  if projection is None:
    if ds != dt:
      raise ValueError(
          f"student {what} width {ds} differs from teacher width {dt}: pass a "
          f"projection of shape [{ds}, {dt}]")
  else:
    if tuple(jnp.shape(projection)) != (ds, dt):
      raise ValueError(
          f"projection for {what} must have shape [Ds, Dt]=[{ds}, {dt}], got "
          f"{tuple(jnp.shape(projection))}")
    s = jnp.matmul(s, as_f32(projection))
  t = jax.lax.stop_gradient(jnp.where(real, as_f32(teacher), 0.0))
  return masked_mean(jnp.mean(jnp.square(s - t), axis=-1), mask)


def embedding_loss(student_emb: Array, teacher_emb: Array,
                   projection: Optional[Array] = None,
                   attention_mask: Optional[Array] = None) -> Array:
  """Embedding-layer loss: mean over real tokens and teacher channels of

      (E_s @ W_e - E_t)^2,   E_s [B,L,Ds], W_e [Ds,Dt] (learned), E_t [B,L,Dt]

  `projection` (W_e) may be omitted only when Ds == Dt.
  """
  return _projected_mse(student_emb, teacher_emb, projection, attention_mask, "embeddings")


def hidden_loss(student_hidden: Array, teacher_hidden: Array,
                projection: Optional[Array] = None,
                attention_mask: Optional[Array] = None) -> Array:
  """Hidden-state loss for one mapped layer: mean over real tokens and channels of

      (H_s @ W_h - H_t)^2,   H_s [B,L,Ds], W_h [Ds,Dt] (learned), H_t [B,L,Dt]

  `projection` (W_h) may be omitted only when Ds == Dt.
  """
  return _projected_mse(student_hidden, teacher_hidden, projection, attention_mask,
                        "hidden states")


def attention_score_loss(student_scores: Array, teacher_scores: Array,
                         attention_mask: Optional[Array] = None,
                         masked_threshold: float = MASKED_SCORE_THRESHOLD) -> Array:
  """MSE between unnormalised attention scores [B,heads,L,L] of one mapped layer:

      loss = sum_{b,h,q,k real} (S'_s - S'_t)^2 / (heads * n_real(q,k) pairs)

  where S' is S set to 0 (on both sides) at keys with mask 0 and wherever either
  score is <= `masked_threshold` (already-masked entries). Padded query rows are
  excluded from the mean. Head counts must match.
  """
  b, lq = check_attention_pair("attention score loss", "scores", teacher_scores,
                               student_scores)
  mask = token_mask(attention_mask, (b, lq))
  pairs = (mask[:, None, :, None] > 0) & (mask[:, None, None, :] > 0)  # [B,1,Lq,Lk]
  s = as_f32(student_scores)
  t = jax.lax.stop_gradient(as_f32(teacher_scores))
  zeroed = ~pairs | (s <= masked_threshold) | (t <= masked_threshold)
  s = jnp.where(zeroed, 0.0, s)
  t = jnp.where(zeroed, 0.0, t)
  return masked_mean(jnp.square(s - t), pairs)


def prediction_loss(student_logits: Array, teacher_logits: Array,
                    temperature: float = 1.0, weights: Optional[Array] = None,
                    scale_by_temperature_squared: bool = False) -> Array:
  """Prediction-layer distillation loss (TinyBERT, Jiao et al., 2020: L_pred), per row:

      C > 1 (classes):    -sum_c softmax(z_t / T)_c * log_softmax(z_s / T)_c  [x T^2 if flag]
      C = 1 (regression): (z_s - z_t)^2           (temperature and the T^2 flag are ignored)

  then the mean over rows, or a weighted mean with `weights` of the leading shape (e.g.
  MLM slot weights, 0 = padding). Logits are [..., C].

  A soft cross-entropy over one logit is identically 0 (softmax of one value is 1), so a
  regression head (STS-B) is distilled with a squared error instead, as TinyBERT's
  task_distill.py does for `output_mode == "regression"` (MSELoss, lines 969-973 of
  huawei-noah/Pretrained-Language-Model@0598f02). Note the release regresses the student onto
  the gold score there, not the teacher's; to reproduce that, pass `labels[:, None]` as
  `teacher_logits`. For C > 1 the release averages over classes too (`.mean()` over [B, C],
  line 908), i.e. its loss is this one divided by C; the sum over classes here is the paper's.
  """
  check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
  student = as_f32(student_logits)
  teacher = jax.lax.stop_gradient(as_f32(teacher_logits))
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")
  if weights is not None:  # rows with weight 0 are zeroed: no NaN/inf leaks into grads
    if tuple(jnp.shape(weights)) != student.shape[:-1]:
      raise ValueError(
          f"weights shape {tuple(jnp.shape(weights))} must equal the logits' leading "
          f"shape {student.shape[:-1]}")
    used = (jnp.asarray(weights) > 0)[..., None]
    student = jnp.where(used, student, 0.0)
    teacher = jnp.where(used, teacher, 0.0)
  regression = student.ndim >= 1 and student.shape[-1] == 1
  if regression:
    per_row = jnp.square(student - teacher)[..., 0]
  else:
    per_row = soft_cross_entropy(student, teacher, temperature)
  loss = jnp.mean(per_row) if weights is None else weighted_mean(per_row, weights)
  if scale_by_temperature_squared and not regression:
    loss = loss * temperature ** 2
  return loss


def _check_layer_counts(num_student_layers, num_teacher_layers) -> None:
  for name, v in (("num_student_layers", num_student_layers),
                  ("num_teacher_layers", num_teacher_layers)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")


def uniform_layer_mapping(num_student_layers: int, num_teacher_layers: int) -> tuple[int, ...]:
  """Uniform mapping g(m) = ceil(m * N / M) for student layers m = 1..M (= m*N/M when M | N).

  Teacher indices are 1-based hidden-state indices (0 would be the embeddings), so
  M=4, N=12 gives (3, 6, 9, 12) and g(M) = N always.
  """
  _check_layer_counts(num_student_layers, num_teacher_layers)
  m_total, n_total = int(num_student_layers), int(num_teacher_layers)
  return tuple(-(-m * n_total // m_total) for m in range(1, m_total + 1))


def parse_layer_mapping(value: Union[str, Sequence[int]], num_student_layers: int,
                        num_teacher_layers: int, order: str = "nondecreasing") -> tuple[int, ...]:
  """Parses a layer mapping into a tuple of M teacher layer indices in [1, N].

  `value` is "uniform", a comma string such as "3,6,9,12", or a sequence of ints.
  `order` is "nondecreasing" (default), "increasing" (strict) or "any".
  Raises ValueError naming the offending entry.
  """
  _check_layer_counts(num_student_layers, num_teacher_layers)
  if order not in _ORDERS:
    raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
  m_total, n_total = int(num_student_layers), int(num_teacher_layers)
  if isinstance(value, str):
    text = value.strip()
    if text.lower() == "uniform":
      return uniform_layer_mapping(m_total, n_total)
    items = [p.strip() for p in text.split(",")]
    mapping = []
    for i, item in enumerate(items):
      try:
        mapping.append(int(item))
      except ValueError:
        raise ValueError(
            f"layer mapping {value!r}: entry {i} ({item!r}) is not an integer") from None
  elif isinstance(value, Sequence) or hasattr(value, "__array__"):
    if hasattr(value, "__array__"):
      value = tuple(np.asarray(value).tolist())
    mapping = []
    for i, item in enumerate(value):
      if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
        raise ValueError(f"layer mapping {value!r}: entry {i} ({item!r}) is not an int")
      mapping.append(int(item))
  else:
    raise ValueError(
        f"layer mapping must be 'uniform', a comma string or a sequence of ints, got {value!r}")
  if len(mapping) != m_total:
    raise ValueError(
        f"layer mapping {value!r} has {len(mapping)} entries, expected one per student "
        f"layer ({m_total})")
  for m, g in enumerate(mapping, start=1):
    if not 1 <= g <= n_total:
      raise ValueError(
          f"layer mapping {value!r}: student layer {m} maps to teacher layer {g}, "
          f"outside [1, {n_total}]")
  for m in range(1, m_total):
    prev, cur = mapping[m - 1], mapping[m]
    if (order == "nondecreasing" and cur < prev) or (order == "increasing" and cur <= prev):
      raise ValueError(
          f"layer mapping {value!r} is not {order}: student layer {m} -> {prev}, "
          f"layer {m + 1} -> {cur}")
  return tuple(mapping)


def _field(out: Any, name: str):
  """Reads `name` from a Mapping or an object attribute."""
  if isinstance(out, Mapping):
    if name not in out:
      raise ValueError(f"model outputs lack {name!r}; keys are {sorted(out)}")
    return out[name]
  if not hasattr(out, name):
    raise ValueError(f"model outputs of type {type(out).__name__} lack {name!r}")
  return getattr(out, name)


def _split_projections(projections, num_student_layers: int):
  """Returns (embedding projection, list of M hidden projections); entries may be None."""
  if projections is None:
    return None, [None] * num_student_layers
  if not isinstance(projections, Mapping):  # one array shared by every layer
    return projections, [projections] * num_student_layers
  unknown = set(projections) - {"embedding", "hidden"}
  if unknown:
    raise ValueError(
        f"projections keys must be 'embedding' and/or 'hidden', got unknown {sorted(unknown)}")
  hidden = projections.get("hidden")
  if hidden is None or hasattr(hidden, "shape"):
    hidden = [hidden] * num_student_layers
  else:
    hidden = list(hidden)
    if len(hidden) != num_student_layers:
      raise ValueError(
          f"projections['hidden'] has {len(hidden)} entries, expected one per student "
          f"layer ({num_student_layers}) or a single shared array")
  return projections.get("embedding"), hidden


def tinybert_intermediate_loss(student_out: Any, teacher_out: Any,
                               mapping: Union[str, Sequence[int]] = "uniform",
                               projections: Any = None,
                               attention_mask: Optional[Array] = None):
  """TinyBERT intermediate-layer loss (embeddings + mapped attention + mapped hidden):

      embedding = embedding_loss(E_s, E_t, W_e)
      attention = sum_{m=1..M} attention_score_loss(A_s[m], A_t[g(m)])
      hidden    = sum_{m=1..M} hidden_loss(H_s[m], H_t[g(m)], W_h[m])
      total     = embedding + attention + hidden

  `*_out` are dict-like (or attribute) objects with `hidden_states` (index 0 =
  embeddings) and `attention_scores` (per-layer [B,heads,L,L]). `mapping` is anything
  `parse_layer_mapping` accepts (range-checked, any order allowed). `projections` is
  None (equal widths), one [Ds,Dt] array shared by all terms, or a dict with optional
  "embedding" ([Ds,Dt]) and "hidden" (one shared array or a sequence of M arrays).
  Returns `(total, {"embedding": ..., "attention": ..., "hidden": ...})`.
  """
  s_hidden = tuple(_field(student_out, "hidden_states"))
  t_hidden = tuple(_field(teacher_out, "hidden_states"))
  s_scores = tuple(_field(student_out, "attention_scores"))
  t_scores = tuple(_field(teacher_out, "attention_scores"))
  m_total, n_total = len(s_scores), len(t_scores)
  if len(s_hidden) != m_total + 1:
    raise ValueError(
        f"student has {m_total} attention_scores but {len(s_hidden)} hidden_states; "
        f"expected {m_total + 1} (embeddings + one per layer)")
  if len(t_hidden) != n_total + 1:
    raise ValueError(
        f"teacher has {n_total} attention_scores but {len(t_hidden)} hidden_states; "
        f"expected {n_total + 1} (embeddings + one per layer)")
  g = parse_layer_mapping(mapping, m_total, n_total, order="any")
  emb_proj, hidden_projs = _split_projections(projections, m_total)

  emb = embedding_loss(s_hidden[0], t_hidden[0], emb_proj, attention_mask)
  att = jnp.zeros((), jnp.float32)
  hid = jnp.zeros((), jnp.float32)
  for m in range(1, m_total + 1):
    att = att + attention_score_loss(s_scores[m - 1], t_scores[g[m - 1] - 1], attention_mask)
    hid = hid + hidden_loss(s_hidden[m], t_hidden[g[m - 1]], hidden_projs[m - 1],
                            attention_mask)
  return emb + att + hid, {"embedding": emb, "attention": att, "hidden": hid}
