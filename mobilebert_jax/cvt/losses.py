"""Cross-view training losses (Clark, Luong, Manning and Le, 2018, section 2).

Labelled examples train the primary module alone with cross-entropy:

    L_sup = 1 / |real words| * sum_{i, t} CE(y~_{i,t}, p(y | x_i)_t)

where y~ is the one-hot gold tag smoothed by `label_smoothing` e (y~ = (1 - e) y + e / C; the
release's label_smoothing 0.1, `tagging_module.py`). On unlabelled examples the primary module,
run without dropout and held fixed (no gradient flows through it), is the teacher of every
auxiliary module j, which sees its restricted view under dropout:

    L_CVT = sum_j 1 / |real words| * sum_{i, t} KL(stop_grad(p(y | x_i)_t) || p_j(y | x_i)_t)

The paper's D is the KL divergence; its gradient equals the release's cross-entropy against the
teacher's probabilities (`masked_ce_loss` with soft targets). The paper alternates minimizing
L_sup on a labelled minibatch and L_CVT on an unlabelled one; here one step takes one minibatch
of each and minimizes L = L_sup + w * L_CVT (w = `unlabeled_weight`, 1 = the paper's sum).
Dropout: 0.5 on labelled and 0.2 on unlabelled minibatches, none for the teacher (the release's
labeled_keep_prob 0.5, unlabeled_keep_prob 0.8, `run_teacher` with is_training=False).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mobilebert_jax.cvt.data import INPUT_KEYS, UNLABELED_PREFIX
from mobilebert_jax.cvt.model import rbg_key


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` over the positions where `mask` is set (0 when none is)."""
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def supervised_loss(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                    ) -> jax.Array:
  """L_sup: cross-entropy of [B, W, C] logits against smoothed one-hot `labels` [B, W]
  (labels < 0 are not words and are left out)."""
  num_tags = logits.shape[-1]
  target = jax.nn.one_hot(jnp.maximum(labels, 0), num_tags)
  target = target * (1.0 - label_smoothing) + label_smoothing / num_tags
  ce = -jnp.sum(target * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)
  return masked_mean(ce, labels >= 0)


def consistency_loss(teacher_logits: jax.Array, student_logits: jax.Array, mask: jax.Array
                     ) -> jax.Array:
  """One auxiliary module's term of L_CVT: KL(p_teacher || p_student) per position, averaged
  over `mask`; the teacher's logits are held fixed (stop_gradient)."""
  teacher = jax.lax.stop_gradient(jax.nn.log_softmax(teacher_logits.astype(jnp.float32)))
  student = jax.nn.log_softmax(student_logits.astype(jnp.float32))
  kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
  return masked_mean(kl, mask)


def word_mask(words: jax.Array, lengths: jax.Array) -> jax.Array:
  """[B, W] True at real words: positions 1 .. length - 2 (not <s>, </s> or padding)."""
  position = jnp.arange(words.shape[1])[None, :]
  return (position >= 1) & (position < lengths[:, None] - 1)


def _pad_width(x: jax.Array, width: int) -> jax.Array:
  """[B, W, ...] padded with zeros (padding) to [B, width, ...]."""
  return jnp.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def cvt_terms(model, params, batch, rng, *, labeled_dropout: float, unlabeled_dropout: float,
              label_smoothing: float, word_dropout: float = 0.0):
  """(L_sup, L_CVT, metrics) of one step's `batch`: the labelled keys (words, chars, lengths,
  labels) and, when present, the unlabelled ones (prefixed "unlabeled_"; L_CVT is 0 without).

  One encoder pass computes all three forward passes of the step, each row with its own noise:
  the labelled rows (labeled_dropout, word_dropout), the unlabelled rows as the teacher (none)
  and the same rows again as the students (unlabeled_dropout, word_dropout; without noise the
  teacher's rows serve the students too). Rows are independent and padding reaches no real
  word (`CVTTagger`), so this equals separate passes. `word_dropout` (not in the paper) zeroes
  whole words' vectors (`CVTTagger`)."""
  labeled = [batch[k] for k in INPUT_KEYS]
  if UNLABELED_PREFIX + "words" not in batch:
    logits = model.apply({"params": params}, *labeled, dropout_rate=labeled_dropout,
                         word_dropout=word_dropout, rngs={"dropout": rbg_key(rng)})["primary"]
    sup = supervised_loss(logits, batch["labels"], label_smoothing)
    return sup, jnp.zeros(()), {"supervised_loss": sup}
  unlabeled = [batch[UNLABELED_PREFIX + k] for k in INPUT_KEYS]
  n_l, w_l = labeled[0].shape
  n_u, w_u = unlabeled[0].shape
  copies = 2 if unlabeled_dropout > 0 or word_dropout > 0 else 1
  width = max(w_l, w_u)
  rows = [jnp.concatenate([_pad_width(a, width)] + [_pad_width(b, width)] * copies)
          for a, b in zip(labeled[:2], unlabeled[:2])]
  lengths = jnp.concatenate([labeled[2]] + [unlabeled[2]] * copies)
  rates = jnp.concatenate([jnp.full((n_l,), labeled_dropout), jnp.zeros((n_u,))] +
                          [jnp.full((n_u,), unlabeled_dropout)] * (copies - 1))
  words_off = jnp.concatenate([jnp.full((n_l,), word_dropout), jnp.zeros((n_u,))] +
                              [jnp.full((n_u,), word_dropout)] * (copies - 1))
  out = model.apply({"params": params}, *rows, lengths, dropout_rate=rates,
                    word_dropout=words_off, with_views=True, rngs={"dropout": rbg_key(rng)})
  student = n_l + (copies - 1) * n_u  # the students' first row
  sup = supervised_loss(out["primary"][:n_l, :w_l], batch["labels"], label_smoothing)
  teacher = out["primary"][n_l:n_l + n_u, :w_u]
  mask = word_mask(unlabeled[0], unlabeled[2])
  metrics, cvt = {"supervised_loss": sup}, jnp.zeros(())
  for view in model.config.views:
    term = consistency_loss(teacher, out[view][student:, :w_u], mask)
    metrics[f"{view}_kl"] = term
    cvt = cvt + term
  metrics["cvt_loss"] = cvt
  return sup, cvt, metrics


def cvt_loss(model, params, batch, rng, *, labeled_dropout: float, unlabeled_dropout: float,
             label_smoothing: float, unlabeled_weight: float, word_dropout: float = 0.0):
  """L = L_sup + w * L_CVT (module docstring; `cvt_terms`) and the metrics: each auxiliary
  module's KL, L_sup and L_CVT."""
  sup, cvt, metrics = cvt_terms(model, params, batch, rng, labeled_dropout=labeled_dropout,
                                unlabeled_dropout=unlabeled_dropout,
                                label_smoothing=label_smoothing, word_dropout=word_dropout)
  return sup + unlabeled_weight * cvt, metrics
