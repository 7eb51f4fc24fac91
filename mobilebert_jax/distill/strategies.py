"""Pretraining and distillation losses, one top-level function per strategy.

Each is `loss(ctx, params, teacher_params, batch, rng, step) -> (loss, metrics)` with `ctx` a
`LossContext` (the stage block with its defaults, the trained model, the frozen teacher) and
params {"model": ..., "aux": ...}; registered in `mobilebert_jax.stages.builtin`:

  pretrain           MLM + NSP on the trained model (teacher pretraining).
  akt                auxiliary KT: every layer's transfer losses summed, plus PD.
  jkt                joint KT: every layer's transfer losses summed (followed by a `pd` stage).
  pkt                progressive KT: phase p trains layer p on its own transfer loss; lower
                     layers are frozen (or get `lower_layer_multiplier`), higher ones,
                     embeddings and heads frozen (`pkt_multipliers`).
  pd                 pretraining distillation: alpha * MLM + (1 - alpha) * KD(teacher MLM) + NSP.
  tinybert, task_intermediate
                     TinyBERT: embedding + attention-score + hidden MSE over a layer mapping,
                     with learned projections where the widths differ.
  task_prediction    TinyBERT's prediction layer: soft cross-entropy against the teacher's logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mobilebert_jax import objectives
from mobilebert_jax.models import ForMaskedLM, ForPreTraining, ModelConfig

LAYERWISE = ("akt", "jkt", "pkt")


def apply_model(model, params, batch, *, rng=None, hidden=False, attentions=False,
                scores=False):
  """`model` on a batch: dropout when `rng` is given; MLM heads score masked slots only."""
  train = rng is not None
  extra = {}
  if isinstance(model, (ForPreTraining, ForMaskedLM)):  # vocabulary logits at masked slots only
    extra["masked_lm_positions"] = batch["masked_lm_positions"]
  return model.apply(
      {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
      deterministic=not train, output_hidden_states=hidden, output_attentions=attentions,
      output_attention_scores=scores, rngs={"dropout": rng} if train else None, **extra)


def teacher_forward(ctx, teacher_params, batch, **flags):
  """The frozen teacher on a batch (no dropout, no gradient)."""
  return apply_model(ctx.teacher_model, jax.lax.stop_gradient(teacher_params), batch, **flags)


def pretraining_terms(out, batch) -> dict[str, jax.Array]:
  return {
      "mlm": objectives.mlm_loss(out.prediction_logits, batch["masked_lm_ids"],
                                 batch["masked_lm_weights"]),
      "nsp": objectives.nsp_loss(out.seq_relationship_logits, batch["next_sentence_labels"]),
      "mlm_accuracy": objectives.mlm_accuracy(out.prediction_logits, batch["masked_lm_ids"],
                                              batch["masked_lm_weights"]),
  }


def pretrain_loss(ctx, params, teacher_params, batch, rng, step):
  """BERT pretraining: L = MLM + NSP, the mean cross-entropies over masked slots and pairs."""
  terms = pretraining_terms(apply_model(ctx.model, params["model"], batch, rng=rng), batch)
  return terms["mlm"] + terms["nsp"], terms


def layerwise_transfer(teacher_out, student_out, mask, stage) -> dict[str, jax.Array]:
  """Per-layer feature-map + attention transfer losses, stacked over layers: each [L]."""
  terms = {"fmt_hidden": [], "fmt_beta": [], "fmt_gamma": [], "attention": []}
  for layer in range(1, len(student_out.hidden_states)):
    _, fmt = objectives.feature_map_transfer(
        teacher_out.hidden_states[layer], student_out.hidden_states[layer], mask,
        hidden_factor=stage.hidden_factor, beta_factor=stage.beta_factor,
        gamma_factor=stage.gamma_factor)
    terms["fmt_hidden"].append(fmt["hidden"])
    terms["fmt_beta"].append(fmt["beta"])
    terms["fmt_gamma"].append(fmt["gamma"])
    terms["attention"].append(objectives.attention_transfer(
        teacher_out.attentions[layer - 1], student_out.attentions[layer - 1], mask,
        factor=stage.attention_factor))
  return {k: jnp.stack(v) for k, v in terms.items()}


def _transfer_outputs(ctx, params, teacher_params, batch, rng):
  student = apply_model(ctx.model, params["model"], batch, rng=rng, hidden=True, attentions=True)
  teacher = teacher_forward(ctx, teacher_params, batch, hidden=True, attentions=True)
  return student, teacher, layerwise_transfer(teacher, student, batch["attention_mask"],
                                              ctx.stage)


def _transfer_total(terms) -> jax.Array:
  return terms["fmt_hidden"] + terms["fmt_beta"] + terms["fmt_gamma"] + terms["attention"]


def _pd_terms(ctx, student, teacher, batch):
  return objectives.pretraining_distillation(
      student.prediction_logits, teacher.prediction_logits, batch["masked_lm_ids"],
      batch["masked_lm_weights"], alpha=ctx.stage.alpha, temperature=ctx.stage.temperature,
      nsp_logits=student.seq_relationship_logits, nsp_labels=batch["next_sentence_labels"])


def jkt_loss(ctx, params, teacher_params, batch, rng, step):
  """Joint knowledge transfer (MobileBERT): L = sum_l [FMT_l + AT_l] over every layer l, with
  FMT_l = hidden_factor * MSE(H_t, H_s) + beta_factor * mean-gap + gamma_factor * var-gap and
  AT_l = attention_factor * KL(A_t || A_s) (see `objectives.mobilebert`)."""
  _, _, per_layer = _transfer_outputs(ctx, params, teacher_params, batch, rng)
  metrics = {k: jnp.sum(v) for k, v in per_layer.items()}
  return _transfer_total(metrics), metrics


def akt_loss(ctx, params, teacher_params, batch, rng, step):
  """Auxiliary knowledge transfer (MobileBERT): L = sum_l [FMT_l + AT_l] + PD, PD as `pd_loss`."""
  student, teacher, per_layer = _transfer_outputs(ctx, params, teacher_params, batch, rng)
  metrics = {k: jnp.sum(v) for k, v in per_layer.items()}
  pd, pd_terms = _pd_terms(ctx, student, teacher, batch)
  metrics.update(pd_terms)
  return _transfer_total(metrics) + pd, metrics


def pkt_phase(step, num_steps: int, num_layers: int):
  """The layer (0-based) progressive KT trains at `step`: num_steps / L steps per phase."""
  steps_per_phase = max(num_steps // num_layers, 1)
  return jnp.minimum(step // steps_per_phase, num_layers - 1)


def pkt_loss(ctx, params, teacher_params, batch, rng, step):
  """Progressive knowledge transfer (MobileBERT): in phase p (num_steps / L steps each),
  L = FMT_p + AT_p of layer p only; `pkt_multipliers` keeps the other layers still."""
  _, _, per_layer = _transfer_outputs(ctx, params, teacher_params, batch, rng)
  phase = pkt_phase(step, ctx.stage.num_steps, ctx.model.config.num_layers)
  metrics = {k: v[phase] for k, v in per_layer.items()}
  metrics["phase"] = phase.astype(jnp.float32)
  return _transfer_total(metrics), metrics


def pkt_multipliers(ctx, step, params) -> dict:
  """Learning-rate multipliers of PKT phase p: layer p gets `current_layer_multiplier`, lower
  layers `lower_layer_multiplier` (0 = frozen), higher layers, embeddings and heads 0."""
  stage, num_layers = ctx.stage, ctx.model.config.num_layers
  phase = pkt_phase(step, stage.num_steps, num_layers)
  model = params["model"]
  tree = {"backbone": {name: 0.0 for name in model["backbone"]}}
  for i in range(num_layers):
    tree["backbone"][f"layer_{i}"] = jnp.where(
        i == phase, stage.current_layer_multiplier,
        jnp.where(i < phase, stage.lower_layer_multiplier, 0.0))
  for name in model:
    if name != "backbone":
      tree[name] = 0.0
  return {"model": tree, "aux": 1.0}


def pd_loss(ctx, params, teacher_params, batch, rng, step):
  """Pretraining distillation (MobileBERT): L = alpha * MLM(y) + (1 - alpha) * KL(p_t^T || p_s^T)
  over masked slots at temperature T, + NSP."""
  student = apply_model(ctx.model, params["model"], batch, rng=rng)
  teacher = teacher_forward(ctx, teacher_params, batch)
  loss, terms = _pd_terms(ctx, student, teacher, batch)
  terms["mlm_accuracy"] = objectives.mlm_accuracy(
      student.prediction_logits, batch["masked_lm_ids"], batch["masked_lm_weights"])
  return loss, terms


def tinybert_mapping(ctx):
  """The stage's layer mapping (student layer m -> teacher layer g(m)); a free (non-monotone)
  mapping, e.g. from the layer-mapping search, needs layer_mapping_order="any"."""
  return objectives.parse_layer_mapping(
      ctx.stage.layer_mapping, ctx.model.config.num_layers, ctx.teacher_model.config.num_layers,
      order=ctx.stage.layer_mapping_order)


def tinybert_aux_init(ctx, rng) -> dict:
  """TinyBERT's learned projections W_e, W_h [d_s, d_t] where the widths differ."""
  s_cfg, t_cfg = ctx.model.config, ctx.teacher_model.config
  if s_cfg.hidden_size == t_cfg.hidden_size:
    return {}
  k1, k2 = jax.random.split(rng)
  shape = (s_cfg.hidden_size, t_cfg.hidden_size)
  std = s_cfg.initializer_range
  return {"projections": {"embedding": std * jax.random.normal(k1, shape),
                          "hidden": std * jax.random.normal(k2, shape)}}


def tinybert_loss(ctx, params, teacher_params, batch, rng, step):
  """TinyBERT intermediate-layer distillation: L = MSE(E_s W_e, E_t) + sum_m [MSE(H_s^m W_h,
  H_t^g(m)) + MSE(A_s^m, A_t^g(m))], attention scores before softmax (see
  `objectives.tinybert_intermediate_loss`)."""
  student = apply_model(ctx.model, params["model"], batch, rng=rng, hidden=True, scores=True)
  teacher = teacher_forward(ctx, teacher_params, batch, hidden=True, scores=True)
  as_dict = lambda o: {"hidden_states": o.hidden_states, "attention_scores": o.attention_scores}
  return objectives.tinybert_intermediate_loss(
      as_dict(student), as_dict(teacher), tinybert_mapping(ctx), params["aux"].get("projections"),
      batch["attention_mask"])


def task_prediction_loss(ctx, params, teacher_params, batch, rng, step):
  """TinyBERT prediction-layer distillation: L = -sum_c softmax(z_t / T)_c log softmax(z_s / T)_c,
  averaged over the batch (no T^2 factor, as TinyBERT)."""
  student = apply_model(ctx.model, params["model"], batch, rng=rng)
  teacher = teacher_forward(ctx, teacher_params, batch)
  loss = objectives.prediction_loss(student.logits, teacher.logits,
                                    temperature=ctx.stage.temperature)
  return loss, {"prediction": loss,
                "accuracy": objectives.accuracy(student.logits, batch["labels"])}


def check_pair(name: str, stage, teacher: ModelConfig, student: ModelConfig) -> None:
  """Errors for a teacher/student pair the strategy cannot transfer between."""
  strategy = stage.strategy
  if teacher.vocab_size != student.vocab_size:
    raise ValueError(f"config.{name} ({strategy}): teacher vocab_size={teacher.vocab_size} "
                     f"differs from student vocab_size={student.vocab_size}")
  if strategy in LAYERWISE:
    for field in ("num_layers", "hidden_size", "num_heads"):
      t, s = getattr(teacher, field), getattr(student, field)
      if t != s:
        raise ValueError(f"config.{name} ({strategy}): layer-wise knowledge transfer needs equal "
                         f"{field} (teacher {t}, student {s})")
  if "layer_mapping" in stage:  # TinyBERT: attention scores are compared head by head
    if teacher.num_heads != student.num_heads:
      raise ValueError(f"config.{name} ({strategy}): the attention-score loss needs equal "
                       f"num_heads (teacher {teacher.num_heads}, student {student.num_heads}); "
                       f"set --config.student.num_heads={teacher.num_heads}")
    objectives.parse_layer_mapping(stage.layer_mapping, student.num_layers, teacher.num_layers,
                                   order=stage.layer_mapping_order)
