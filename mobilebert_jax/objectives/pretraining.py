"""BERT pre-training objectives: masked-LM and next-sentence prediction.

Conventions: MLM logits are gathered at the masked positions, `logits` [B,P,V],
`ids` int [B,P], `weights` float [B,P] (0 for padding slots). NSP logits are [B,2]
with labels int [B] (0 = is-next). All results are float32 scalars.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mobilebert_jax.objectives.common import (as_f32, check_rank, check_same_shape,
                                              integer_cross_entropy, weighted_mean)

Array = jax.Array


def _check_mlm(logits, ids, weights) -> None:
  check_rank("MLM logits", logits, 3, "[B,P,V]")
  check_same_shape("masked_lm_ids", ids, "masked_lm_weights", weights)
  if tuple(jnp.shape(ids)) != tuple(jnp.shape(logits))[:2]:
    raise ValueError(
        f"masked_lm_ids shape {tuple(jnp.shape(ids))} must equal MLM logits shape "
        f"[B,P]={tuple(jnp.shape(logits))[:2]}")


def mlm_loss(logits: Array, ids: Array, weights: Array) -> Array:
  """Weighted mean masked-LM cross-entropy:

      loss = sum_{b,p} w_bp * (-log softmax(logits_bp)[ids_bp]) / max(sum_{b,p} w_bp, tiny)

  Slots with weight 0 are ignored (their logits may hold anything); no slots gives 0.
  """
  _check_mlm(logits, ids, weights)
  used = (jnp.asarray(weights) > 0)[..., None]  # padding slots zeroed: no NaN/inf leaks
  logits = jnp.where(used, as_f32(logits), 0.0)
  return weighted_mean(integer_cross_entropy(logits, ids), weights)


def mlm_accuracy(logits: Array, ids: Array, weights: Array) -> Array:
  """Weighted fraction of slots where argmax_v logits == ids (weight-0 slots ignored)."""
  _check_mlm(logits, ids, weights)
  correct = (jnp.argmax(as_f32(logits), axis=-1) == jnp.asarray(ids)).astype(jnp.float32)
  return weighted_mean(correct, weights)


def _check_nsp(logits, labels) -> None:
  check_rank("NSP logits", logits, 2, "[B,2]")
  if tuple(jnp.shape(labels)) != tuple(jnp.shape(logits))[:1]:
    raise ValueError(
        f"NSP labels shape {tuple(jnp.shape(labels))} must be [B]="
        f"{tuple(jnp.shape(logits))[:1]}")


def nsp_loss(logits: Array, labels: Array) -> Array:
  """Mean next-sentence cross-entropy: mean_b -log softmax(logits_b)[labels_b] (0 = is-next)."""
  _check_nsp(logits, labels)
  return jnp.mean(integer_cross_entropy(logits, labels))


def nsp_accuracy(logits: Array, labels: Array) -> Array:
  """Fraction of examples where argmax logits == labels."""
  _check_nsp(logits, labels)
  correct = jnp.argmax(as_f32(logits), axis=-1) == jnp.asarray(labels)
  return jnp.mean(correct.astype(jnp.float32))
