"""MobileBERT knowledge-transfer objectives (Sun et al., 2020).

Layer-wise: feature-map transfer (FMT) on the 512-d inter-block hidden states and
attention transfer (AT) on attention probabilities; then pre-training distillation (PD)
on the MLM distribution. Shapes: hidden [B,L,H], attention [B,heads,Lq,Lk],
`attention_mask` int [B,L] (1 = real token; `None` = all real).

All functions are pure, jit-able and compute in float32 (bf16 inputs are upcast).
Teacher tensors are wrapped in `jax.lax.stop_gradient`: the teacher is frozen.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mobilebert_jax.objectives.common import (as_f32, check_attention_pair, check_rank,
                                              check_same_shape,
                                              masked_mean, soft_cross_entropy, token_mask,
                                              weighted_mean)
from mobilebert_jax.objectives.pretraining import mlm_loss, nsp_loss

Array = jax.Array

# Reference weights of the MobileBERT release (google-research `mobilebert/`, Sun et al., 2020).
HIDDEN_DISTILL_FACTOR = 100.0
BETA_DISTILL_FACTOR = 5000.0
GAMMA_DISTILL_FACTOR = 5.0
ATTENTION_DISTILL_FACTOR = 1.0
DISTILL_GROUND_TRUTH_RATIO = 0.5
DISTILL_TEMPERATURE = 1.0


def _hidden_pair(teacher_hidden, student_hidden, attention_mask):
  check_rank("teacher_hidden", teacher_hidden, 3, "[B,L,H]")
  check_same_shape("teacher_hidden", teacher_hidden, "student_hidden", student_hidden)
  mask = token_mask(attention_mask, jnp.shape(teacher_hidden)[:2])
  real = mask[..., None] > 0  # padded tokens are zeroed so inf/NaN there cannot leak into grads
  t = jax.lax.stop_gradient(jnp.where(real, as_f32(teacher_hidden), 0.0))
  s = jnp.where(real, as_f32(student_hidden), 0.0)
  return t, s, mask


def feature_map_mse(teacher_hidden: Array, student_hidden: Array,
                    attention_mask: Optional[Array] = None) -> Array:
  """Plain feature-map MSE: mean over real tokens and channels of (H_t - H_s)^2.

      loss = sum_{b,l: mask=1} sum_c (H_t - H_s)^2 / (n_real_tokens * H)
  """
  t, s, mask = _hidden_pair(teacher_hidden, student_hidden, attention_mask)
  per_token = jnp.mean(jnp.square(t - s), axis=-1)
  return masked_mean(per_token, mask)


def feature_map_transfer(teacher_hidden: Array, student_hidden: Array,
                         attention_mask: Optional[Array] = None,
                         hidden_factor: float = HIDDEN_DISTILL_FACTOR,
                         beta_factor: float = BETA_DISTILL_FACTOR,
                         gamma_factor: float = GAMMA_DISTILL_FACTOR,
                         eps: float = 1e-6):
  """Stabilised feature-map transfer for one layer.

  Per token, over channels c: mu = mean_c H, var = mean_c (H - mu)^2 and
  N = (H - mu) / sqrt(var + eps). With means over real tokens only:

      hidden = hidden_factor * mean_{tokens, c} (N_t - N_s)^2
      beta   = beta_factor   * mean_{tokens} (mu_t - mu_s)^2
      gamma  = gamma_factor  * mean_{tokens} |var_t - var_s|
      total  = hidden + beta + gamma

  Returns `(total, {"hidden": ..., "beta": ..., "gamma": ...})`; the components are
  already multiplied by their factors, so they sum to `total`.
  """
  if not eps > 0:
    raise ValueError(f"eps must be > 0, got {eps!r}")
  t, s, mask = _hidden_pair(teacher_hidden, student_hidden, attention_mask)

  def stats(h):
    mu = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mu), axis=-1, keepdims=True)
    return mu[..., 0], var[..., 0], (h - mu) * jax.lax.rsqrt(var + eps)

  mu_t, var_t, norm_t = stats(t)
  mu_s, var_s, norm_s = stats(s)
  hidden = hidden_factor * masked_mean(jnp.mean(jnp.square(norm_t - norm_s), axis=-1), mask)
  beta = beta_factor * masked_mean(jnp.square(mu_t - mu_s), mask)
  gamma = gamma_factor * masked_mean(jnp.abs(var_t - var_s), mask)
  return hidden + beta + gamma, {"hidden": hidden, "beta": beta, "gamma": gamma}


def attention_transfer(teacher_probs: Array, student_probs: Array,
                       attention_mask: Optional[Array] = None,
                       factor: float = ATTENTION_DISTILL_FACTOR,
                       log_inputs: bool = False, floor: float = 1e-12) -> Array:
  """Attention transfer for one layer: factor * mean over real queries and heads of KL.

      KL_{b,h,q} = sum_{k real} p_t(k) * (log p_t(k) - log p_s(k))
      loss       = factor * mean_{b, h, q: mask[b,q]=1} KL_{b,h,q}

  Inputs are probabilities [B,heads,Lq,Lk] (log p = log(max(p, floor))), or
  log-probabilities when `log_inputs=True`. Keys with mask 0 and keys where the
  teacher probability is 0 contribute nothing. Head counts must match.
  """
  b, lq = check_attention_pair("attention transfer", "probs", teacher_probs, student_probs)
  mask = token_mask(attention_mask, (b, lq))

  # Entries at padded queries or keys are replaced by a harmless constant before any
  # arithmetic, so whatever they hold (0, inf, NaN) cannot reach the loss or its gradient.
  pairs = (mask[:, None, :, None] > 0) & (mask[:, None, None, :] > 0)  # [B,1,Lq,Lk]
  fill = 0.0 if log_inputs else 1.0
  t = jax.lax.stop_gradient(jnp.where(pairs, as_f32(teacher_probs), fill))
  s = jnp.where(pairs, as_f32(student_probs), fill)
  if log_inputs:
    log_t, log_s = t, s
    p_t = jnp.exp(log_t)
  else:
    p_t = t
    log_t = jnp.log(jnp.maximum(t, floor))
    log_s = jnp.log(jnp.maximum(s, floor))
  keep = (p_t > 0) & pairs
  terms = jnp.where(keep, p_t * (jnp.where(keep, log_t, 0.0) - jnp.where(keep, log_s, 0.0)), 0.0)
  kl = jnp.sum(terms, axis=-1)  # [B,heads,Lq]
  return factor * masked_mean(kl, mask[:, None, :])


def pretraining_distillation(student_mlm_logits: Array, teacher_mlm_logits: Array,
                             ids: Array, weights: Array,
                             alpha: float = DISTILL_GROUND_TRUTH_RATIO,
                             temperature: float = DISTILL_TEMPERATURE,
                             scale_by_temperature_squared: bool = False,
                             nsp_logits: Optional[Array] = None,
                             nsp_labels: Optional[Array] = None):
  """Pre-training distillation (PD):

      mlm   = weighted-mean CE(student logits, ids)                  (see mlm_loss)
      kd    = sum_slots w * CE(softmax(t/T), log_softmax(s/T)) / sum w   [x T^2 if flag]
      total = alpha * mlm + (1 - alpha) * kd  [+ nsp_loss(nsp_logits, nsp_labels)]

  MobileBERT applies no T^2 scaling (reference T = 1), so `scale_by_temperature_squared`
  defaults to False. Logits are [B,P,V]; `weights` [B,P] (0 = padding slot).
  Returns `(total, {"mlm": ..., "kd": ...[, "nsp": ...]})` with the raw (unweighted)
  component losses.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
  check_same_shape("student_mlm_logits", student_mlm_logits,
                   "teacher_mlm_logits", teacher_mlm_logits)
  mlm = mlm_loss(student_mlm_logits, ids, weights)
  used = (jnp.asarray(weights) > 0)[..., None]  # padding slots zeroed: no NaN/inf leaks
  student = jnp.where(used, as_f32(student_mlm_logits), 0.0)
  teacher = jax.lax.stop_gradient(jnp.where(used, as_f32(teacher_mlm_logits), 0.0))
  kd = weighted_mean(soft_cross_entropy(student, teacher, temperature), weights)
  if scale_by_temperature_squared:
    kd = kd * temperature ** 2
  total = alpha * mlm + (1.0 - alpha) * kd
  components = {"mlm": mlm, "kd": kd}
  if (nsp_logits is None) != (nsp_labels is None):
    raise ValueError("nsp_logits and nsp_labels must be given together "
                     f"(got nsp_logits={'None' if nsp_logits is None else 'array'}, "
                     f"nsp_labels={'None' if nsp_labels is None else 'array'})")
  if nsp_logits is not None:
    components["nsp"] = nsp_loss(nsp_logits, nsp_labels)
    total = total + components["nsp"]
  return total, components
