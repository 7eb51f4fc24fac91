"""KDLSQ-BERT (Jin et al. 2021): the fine-tuned classifier with LSQ fake-quantized weights, dense
inputs and word embeddings (learned step sizes) distilled from its full-precision self.

Registered as the `kdlsq` strategy; the step sizes are the stage's trainable extras
(`params["aux"]["lsq_steps"]`), initialised from the starting weights and a real batch.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from mobilebert_jax import objectives
from mobilebert_jax.distill import strategies
from mobilebert_jax.pretrained import init_params
from mobilebert_jax.quantization import common
from mobilebert_jax.quantization.lsq import STEP_INITS, init_lsq_steps, lsq_apply, lsq_interceptor

LSQ_STEP_FLOOR = 1e-6  # steps are kept positive
STEPS_FILE = "lsq_steps.npz"
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
# The stage's keys and their defaults, KDLSQ-BERT's (Jin et al. 2021) 14.9x setting:
#   weight_bits 2, act_bits 8     2-bit weights, 8-bit activations (the abstract's "14.9x
#                                 compression ratio" for BERT-base; the paper runs 2 to 8 bits).
#   temperature 1.0               T of the prediction soft cross-entropy (the authors' release,
#                                 beyondliangcai/kdlsq run_kdlsq_glue.py, uses the logits as is).
#   ground_truth_weight 0.0       gamma of the optional hard-label term: the paper adds the ground
#                                 truth as an option (the release runs with and without it, at
#                                 weight 1); 0 = distillation only.
#   step_init "kdlsq"             the initial steps: KDLSQ's truncated range ("kdlsq") or LSQ's
#                                 2<|x|>/sqrt(Qp) ("lsq"), see `lsq.init_step`.
#   quantize_embeddings True      LSQ-quantize the word embedding table too (the embeddings are
#                                 quantized in KDLSQ / TernaryBERT's 14.9x; float embeddings cap
#                                 BERT-base at ~3.7x).
#   embedding_bits 0              the table's bits; 0 = weight_bits (the release quantizes every
#                                 weight, the embeddings included, at one width).
STAGE_KEYS = dict(weight_bits=2, act_bits=8, temperature=1.0, ground_truth_weight=0.0,
                  step_init="kdlsq", quantize_embeddings=True, embedding_bits=0)


def setting(stage, key: str):
  """`stage.<key>`, or its `STAGE_KEYS` default where the stage block lacks it."""
  return getattr(stage, key, STAGE_KEYS[key])


def bits(stage) -> dict:
  """The stage's `lsq_apply` widths: weight_bits, act_bits and embedding_bits (None: float)."""
  weight = int(setting(stage, "weight_bits"))
  embedding = None
  if setting(stage, "quantize_embeddings"):
    embedding = int(setting(stage, "embedding_bits")) or weight
  return {"weight_bits": weight, "act_bits": int(setting(stage, "act_bits")),
          "embedding_bits": embedding}


def check(name: str, stage, teacher, student) -> None:
  """The pair as `strategies.check_pair`, equal widths and heads (hidden-state and attention-score
  MSE without projections), and the stage's own keys."""
  strategies.check_pair(name, stage, teacher, student)
  for field in ("hidden_size", "num_heads"):
    t, s = getattr(teacher, field), getattr(student, field)
    if t != s:
      raise ValueError(f"config.{name} (kdlsq): the hidden-state and attention-score MSE need "
                       f"equal {field} (teacher {t}, student {s})")
  for key in ("weight_bits", "act_bits"):
    common.check_bits(stage[key], f"config.{name}.{key}")
  if stage.embedding_bits:
    common.check_bits(stage.embedding_bits, f"config.{name}.embedding_bits")
  if stage.step_init not in STEP_INITS:
    raise ValueError(f"config.{name}.step_init={stage.step_init!r} is not one of "
                     f"{list(STEP_INITS)}")
  if not stage.ground_truth_weight >= 0:
    raise ValueError(f"config.{name}.ground_truth_weight must be >= 0, got "
                     f"{stage.ground_truth_weight!r}")


def positive_steps(steps):
  return jax.tree.map(lambda x: jnp.maximum(x, LSQ_STEP_FLOOR), steps)


def kdlsq_aux_from(ctx, model_params, batch) -> dict:
  """LSQ step sizes from the starting weights and the activations of a real batch."""
  return {"lsq_steps": init_lsq_steps(ctx.model, model_params, {k: batch[k] for k in INPUT_KEYS},
                                      step_init=setting(ctx.stage, "step_init"),
                                      **bits(ctx.stage))}


def kdlsq_aux_init(ctx, rng) -> dict:
  """Step sizes of a freshly initialised model on a dummy batch (shapes for checkpoints)."""
  length = min(8, ctx.model.config.max_position_embeddings)
  dummy = {k: jnp.ones((1, length), jnp.int32) for k in INPUT_KEYS}
  return kdlsq_aux_from(ctx, init_params(ctx.model, ctx.model.config, rng), dummy)


def ground_truth_loss(logits, labels):
  """The hard-label term: mean_b -log softmax(z_b)[y_b]; one logit (regression): mean_b
  (z_b - y_b)^2 (`objectives.prediction_loss` against the labels)."""
  if logits.shape[-1] == 1:
    return objectives.prediction_loss(logits, jnp.asarray(labels, jnp.float32)[:, None])
  return jnp.mean(objectives.integer_cross_entropy(logits, labels))


def kdlsq_loss(ctx, params, teacher_params, batch, rng, step):
  """KDLSQ-BERT (Jin et al. 2021): the LSQ-quantized student distils the full-precision teacher's
  hidden states, attention scores and predictions, as TinyBERT (Jiao et al. 2020):

    L = sum_{l=0..L} MSE(H_s^l, H_t^g(l)) + sum_{l=1..L} MSE(A_s^l, A_t^g(l))
        + SCE(z_s / T, z_t / T) + gamma * GT

  H the hidden states (l = 0 the embeddings) over real tokens, A the attention scores before the
  softmax (`objectives.tinybert_intermediate_loss`, uniform layer mapping g), SCE the prediction
  soft cross-entropy (a squared error for one logit, `objectives.prediction_loss`) and GT the
  optional hard-label term (`ground_truth_loss`, gamma = `ground_truth_weight`). The student runs
  with dropout when `rng` is given (None: deterministic)."""
  with nn.intercept_methods(lsq_interceptor(positive_steps(params["aux"]["lsq_steps"]),
                                            **bits(ctx.stage))):
    student = strategies.apply_model(ctx.model, params["model"], batch, rng=rng, hidden=True,
                                     scores=True)
  teacher = strategies.teacher_forward(ctx, teacher_params, batch, hidden=True, scores=True)
  _, terms = objectives.tinybert_intermediate_loss(student, teacher, "uniform", None,
                                                   batch["attention_mask"])
  metrics = {"hidden": terms["embedding"] + terms["hidden"], "attention": terms["attention"],
             "prediction": objectives.prediction_loss(
                 student.logits, teacher.logits, temperature=setting(ctx.stage, "temperature"))}
  loss = metrics["hidden"] + metrics["attention"] + metrics["prediction"]
  gamma = float(setting(ctx.stage, "ground_truth_weight"))
  if gamma:
    metrics["ground_truth"] = ground_truth_loss(student.logits, batch["labels"])
    loss = loss + gamma * metrics["ground_truth"]
  if student.logits.shape[-1] > 1:
    metrics["accuracy"] = objectives.accuracy(student.logits, batch["labels"])
  return loss, metrics


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
