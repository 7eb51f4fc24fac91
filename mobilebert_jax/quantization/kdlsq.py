"""KDLSQ-BERT: the fine-tuned classifier with LSQ fake-quantized weights and dense inputs
(learned step sizes, `weight_bits` / `act_bits`) distilled from its full-precision self.

Registered as the `kdlsq` strategy; the step sizes are the stage's trainable extras
(`params["aux"]["lsq_steps"]`), initialised from the starting weights and a real batch.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from mobilebert_jax import objectives
from mobilebert_jax.pretrained import init_params
from mobilebert_jax.quantization.lsq import init_lsq_steps, lsq_apply

LSQ_STEP_FLOOR = 1e-6  # steps are kept positive
STEPS_FILE = "lsq_steps.npz"
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def bits(stage) -> dict[str, int]:
  return {"weight_bits": int(stage.weight_bits), "act_bits": int(stage.act_bits)}


def positive_steps(steps):
  return jax.tree.map(lambda x: jnp.maximum(x, LSQ_STEP_FLOOR), steps)


def kdlsq_aux_from(ctx, model_params, batch) -> dict:
  """LSQ step sizes from the starting weights and the activations of a real batch."""
  return {"lsq_steps": init_lsq_steps(ctx.model, model_params, {k: batch[k] for k in INPUT_KEYS},
                                      **bits(ctx.stage))}


def kdlsq_aux_init(ctx, rng) -> dict:
  """Step sizes of a freshly initialised model on a dummy batch (shapes for checkpoints)."""
  length = min(8, ctx.model.config.max_position_embeddings)
  dummy = {k: jnp.ones((1, length), jnp.int32) for k in INPUT_KEYS}
  return kdlsq_aux_from(ctx, init_params(ctx.model, ctx.model.config, rng), dummy)


def kdlsq_loss(ctx, params, teacher_params, batch, rng, step):
  """L = SCE(z_s / T, z_t / T) + sum_l MSE(H_s^l, H_t^l): the quantized student's prediction
  soft cross-entropy against the full-precision teacher plus the hidden-state MSE of every layer
  (embeddings included), over real tokens."""
  steps = positive_steps(params["aux"]["lsq_steps"])
  student = lsq_apply(ctx.model, params["model"], steps, *(batch[k] for k in INPUT_KEYS),
                      deterministic=False, output_hidden_states=True, rngs={"dropout": rng},
                      **bits(ctx.stage))
  teacher = ctx.teacher_model.apply(
      {"params": jax.lax.stop_gradient(teacher_params)}, *(batch[k] for k in INPUT_KEYS),
      output_hidden_states=True)
  prediction = objectives.prediction_loss(student.logits, teacher.logits,
                                          temperature=ctx.stage.temperature)
  hidden = sum(objectives.hidden_loss(s, t, attention_mask=batch["attention_mask"])
               for s, t in zip(student.hidden_states, teacher.hidden_states))
  return prediction + hidden, {"prediction": prediction, "hidden": hidden,
                               "accuracy": objectives.accuracy(student.logits, batch["labels"])}


def lsq_forward(model, steps, stage):
  """`forward(params, batch) -> {"logits"}` of the LSQ-quantized model (for evaluation)."""
  steps = positive_steps(steps)

  def forward(params, batch):
    return {"logits": lsq_apply(model, params, steps, *(batch[k] for k in INPUT_KEYS),
                                **bits(stage)).logits}
  return forward


def save_steps(aux: dict, final_dir: str) -> None:
  """The learned step sizes beside the final model, `final_dir/lsq_steps.npz`."""
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, positive_steps(aux["lsq_steps"])),
                                    sep="/")
  epath.Path(final_dir).mkdir(parents=True, exist_ok=True)
  with epath.Path(os.path.join(final_dir, STEPS_FILE)).open("wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})
