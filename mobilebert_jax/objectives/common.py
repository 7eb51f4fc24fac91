"""Shared helpers for the objectives: float32 casting, shape checks and masked means.

Every helper is a pure jnp function and safe under `jax.jit`. Masked means use the
"double where" pattern so that values at masked positions (even inf or NaN) affect
neither the result nor its gradient.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

# Denominators of masked means are clamped to at least this value, so a batch with
# no real token (or no weighted slot) gives 0 instead of NaN.
MIN_DENOMINATOR = 1e-6


def as_f32(x) -> Array:
  """Returns `x` as a float32 array (bf16/fp16 inputs are upcast before any arithmetic)."""
  return jnp.asarray(x).astype(jnp.float32)


def check_rank(name: str, x, rank: int, layout: str) -> None:
  """Raises ValueError unless `x` has `rank` dims (`layout` names them, e.g. "[B,L,H]")."""
  if jnp.ndim(x) != rank:
    raise ValueError(
        f"{name} must have rank {rank} {layout}, got shape {tuple(jnp.shape(x))}")


def check_same_shape(name_a: str, a, name_b: str, b) -> None:
  """Raises ValueError naming both arrays unless their shapes are equal."""
  if tuple(jnp.shape(a)) != tuple(jnp.shape(b)):
    raise ValueError(
        f"{name_a} and {name_b} must have the same shape, got "
        f"{tuple(jnp.shape(a))} and {tuple(jnp.shape(b))}")


def check_attention_pair(loss: str, what: str, teacher, student) -> tuple[int, int]:
  """Validates teacher/student self-attention maps [B,heads,L,L]; returns (B, L).

  Errors name the loss (`loss`), the kind of map (`what`) and both head counts or shapes.
  """
  check_rank(f"teacher_{what}", teacher, 4, "[B,heads,L,L]")
  check_rank(f"student_{what}", student, 4, "[B,heads,L,L]")
  t_heads, s_heads = jnp.shape(teacher)[1], jnp.shape(student)[1]
  if t_heads != s_heads:
    raise ValueError(f"{loss} needs equal head counts: teacher has {t_heads} heads, "
                     f"student has {s_heads}")
  check_same_shape(f"teacher_{what}", teacher, f"student_{what}", student)
  b, _, lq, lk = jnp.shape(teacher)
  if lq != lk:
    raise ValueError(f"attention {what} must be self-attention (Lq == Lk), got Lq={lq}, Lk={lk}")
  return b, lq


def token_mask(attention_mask: Optional[Array], batch_shape: Sequence[int]) -> Array:
  """Returns a float32 [B,L] mask (1 = real token); `None` means every token is real.

  Raises ValueError if `attention_mask` does not have shape `batch_shape` ([B,L]).
  """
  batch_shape = tuple(batch_shape)
  if attention_mask is None:
    return jnp.ones(batch_shape, jnp.float32)
  if tuple(jnp.shape(attention_mask)) != batch_shape:
    raise ValueError(
        f"attention_mask must have shape [B,L]={batch_shape}, got "
        f"{tuple(jnp.shape(attention_mask))}")
  return (jnp.asarray(attention_mask) > 0).astype(jnp.float32)


def masked_mean(values: Array, mask: Array) -> Array:
  """sum(values * [mask>0]) / max(sum(mask>0), tiny), with `mask` broadcastable to `values`.

  Positions with mask 0 are replaced by 0 before the sum (so NaN/inf there is ignored).
  """
  values = as_f32(values)
  keep = jnp.broadcast_to(jnp.asarray(mask) > 0, values.shape)
  total = jnp.sum(jnp.where(keep, values, 0.0))
  count = jnp.sum(keep.astype(jnp.float32))
  return total / jnp.maximum(count, MIN_DENOMINATOR)


def weighted_mean(values: Array, weights: Array) -> Array:
  """sum(w * v) / max(sum(w), tiny) over slots; slots with w <= 0 contribute nothing.

  Used for MLM slots: `weights` is float [B,P] with 0 for padding slots.
  """
  values = as_f32(values)
  weights = as_f32(weights)
  check_same_shape("values", values, "weights", weights)
  keep = weights > 0
  w = jnp.where(keep, weights, 0.0)
  total = jnp.sum(jnp.where(keep, values, 0.0) * w)
  return total / jnp.maximum(jnp.sum(w), MIN_DENOMINATOR)


def soft_cross_entropy(student_logits: Array, teacher_logits: Array,
                       temperature: float = 1.0) -> Array:
  """Per-row soft cross-entropy over the last axis (float32):

      CE = -sum_v softmax(teacher / T)_v * log_softmax(student / T)_v

  Returns an array with the leading shape of the logits (last axis reduced).
  """
  check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")
  t = jax.nn.softmax(as_f32(teacher_logits) / temperature, axis=-1)
  log_s = jax.nn.log_softmax(as_f32(student_logits) / temperature, axis=-1)
  return -jnp.sum(t * log_s, axis=-1)


def integer_cross_entropy(logits: Array, labels: Array) -> Array:
  """Per-row cross-entropy -log softmax(logits)[label] over the last axis (float32).

  Labels outside [0, V) give a finite but meaningless value; mask such rows out.
  """
  logits = as_f32(logits)
  if tuple(jnp.shape(labels)) != logits.shape[:-1]:
    raise ValueError(
        f"labels shape {tuple(jnp.shape(labels))} must equal logits shape without its "
        f"last axis {logits.shape[:-1]}")
  log_p = jax.nn.log_softmax(logits, axis=-1)
  labels = jnp.clip(jnp.asarray(labels).astype(jnp.int32), 0, logits.shape[-1] - 1)
  return -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]


def accuracy(logits: Array, labels: Array) -> Array:
  """Fraction of rows where argmax over the last axis of `logits` equals the integer label."""
  return jnp.mean((jnp.argmax(logits, -1) == jnp.asarray(labels).astype(jnp.int32))
                  .astype(jnp.float32))
