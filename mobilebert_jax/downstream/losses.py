"""Fine-tuning losses: `loss(ctx, params, teacher_params, batch, rng, step) -> (loss, metrics)`
(see `mobilebert_jax.stages.registry`); registered as `finetune`, `squad` and `tagging`."""

from __future__ import annotations

import jax.numpy as jnp

from mobilebert_jax import objectives


def _forward(ctx, params, batch, rng):
  return ctx.model.apply({"params": params["model"]}, batch["input_ids"],
                         batch["attention_mask"], batch["token_type_ids"], deterministic=False,
                         rngs={"dropout": rng})


def finetune_loss(ctx, params, teacher_params, batch, rng, step):
  """Sequence classification: L = mean_b -log softmax(z_b)[y_b]; regression (num_labels = 1,
  STS-B): L = mean_b (z_b - y_b)^2."""
  logits = _forward(ctx, params, batch, rng).logits.astype(jnp.float32)
  if ctx.model.config.num_labels == 1:
    loss = jnp.mean((logits[:, 0] - batch["labels"]) ** 2)
    return loss, {"mse": loss}
  loss = objectives.integer_cross_entropy(logits, batch["labels"].astype(jnp.int32)).mean()
  return loss, {"cross_entropy": loss, "accuracy": objectives.accuracy(logits, batch["labels"])}


def squad_loss(ctx, params, teacher_params, batch, rng, step):
  """Extractive QA: L = (CE(start logits, start) + CE(end logits, end)) / 2, means over the
  batch (BERT's SQuAD objective)."""
  out = _forward(ctx, params, batch, rng)
  start = objectives.integer_cross_entropy(out.start_logits, batch["start_positions"]).mean()
  end = objectives.integer_cross_entropy(out.end_logits, batch["end_positions"]).mean()
  return (start + end) / 2, {"start": start, "end": end}


def tagging_loss(ctx, params, teacher_params, batch, rng, step):
  """Token classification: L = sum_{b,t} m_bt (-log softmax(z_bt)[y_bt]) / sum m_bt over the
  positions carrying a word's tag (m_bt = y_bt >= 0: each word's first piece; BERT's
  CoNLL-2003 NER recipe)."""
  logits = _forward(ctx, params, batch, rng).logits.astype(jnp.float32)
  labels = batch["labels"]
  mask = (labels >= 0).astype(jnp.float32)
  count = jnp.maximum(mask.sum(), 1.0)
  loss = jnp.sum(objectives.integer_cross_entropy(logits, labels) * mask) / count
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * mask
  return loss, {"cross_entropy": loss, "accuracy": correct.sum() / count}
