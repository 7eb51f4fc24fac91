"""Pretraining and distillation losses, one top-level function per strategy.

Each is `loss(ctx, params, teacher_params, batch, rng, step) -> (loss, metrics)` with `ctx` a
`LossContext` (the stage block with its defaults, the trained model, the frozen teacher) and
params {"model": ..., "aux": ...}; registered in `mobilebert_jax.stages.builtin`:

  pretrain           MLM + NSP on the trained model (teacher pretraining).
  akt                auxiliary KT: the transfer losses averaged over layers, plus PD.
  jkt                joint KT: the transfer losses averaged over layers (followed by a `pd`
                     stage); embeddings and heads copied from the teacher and frozen.
  pkt                progressive KT: phase p trains layer p on its own transfer loss at the
                     release's per-layer rates (`pkt_multipliers`); embeddings and heads copied
                     from the teacher and frozen.
  pd                 pretraining distillation: alpha * MLM + (1 - alpha) * KD(teacher MLM) + NSP.
  tinybert, task_intermediate
                     TinyBERT: embedding + attention-score + hidden MSE over a layer mapping,
                     with learned projections where the widths differ.
  task_prediction    TinyBERT's prediction layer: soft cross-entropy against the teacher's logits.

The MobileBERT strategies (akt, jkt, pkt, pd) run the student without dropout unless the stage
sets `student_dropout`: the release builds the student with `is_training=False` whenever a
teacher is present (google-research mobilebert/run_pretraining.py, `model_fn_builder`: the
`bert_teacher_config is not None` branch), while teacher pretraining keeps dropout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mobilebert_jax import objectives
from mobilebert_jax.models import ForMaskedLM, ForPreTraining, ModelConfig

LAYERWISE = ("akt", "jkt", "pkt")
# Strategies that freeze what they copy from the teacher (embeddings, pooler, heads), and the
# architecture fields those tensors' shapes depend on beyond the layer-wise ones.
FREEZES_COPIED = ("jkt", "pkt")
EMBEDDING_FIELDS = ("embedding_size", "trigram_input", "max_position_embeddings",
                    "type_vocab_size")


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


def student_rng(ctx, rng):
  """The dropout rng of a MobileBERT distillation student: None (no dropout, as the release)
  unless the stage sets `student_dropout`."""
  return rng if ctx.stage.student_dropout else None


def _transfer_outputs(ctx, params, teacher_params, batch, rng):
  student = apply_model(ctx.model, params["model"], batch, rng=student_rng(ctx, rng), hidden=True,
                        attentions=True)
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
  """Joint knowledge transfer (MobileBERT): L = (1/L) sum_l [FMT_l + AT_l], the mean over the
  L layers, with FMT_l = hidden_factor * MSE(N(H_t), N(H_s)) + beta_factor * mean-gap +
  gamma_factor * var-gap and AT_l = attention_factor * KL(A_t || A_s) (`objectives.mobilebert`).
  The mean, not the sum, as the release: each transfer loss is summed over layers then
  multiplied by its factor / num_layers (run_pretraining.py, `extra_loss1..4`)."""
  _, _, per_layer = _transfer_outputs(ctx, params, teacher_params, batch, rng)
  metrics = {k: jnp.mean(v) for k, v in per_layer.items()}
  return _transfer_total(metrics), metrics


def akt_loss(ctx, params, teacher_params, batch, rng, step):
  """Auxiliary knowledge transfer (MobileBERT): L = (1/L) sum_l [FMT_l + AT_l] + PD, the layer
  terms averaged over layers as in `jkt_loss` (so they do not weigh L x against PD), PD as
  `pd_loss`."""
  student, teacher, per_layer = _transfer_outputs(ctx, params, teacher_params, batch, rng)
  metrics = {k: jnp.mean(v) for k, v in per_layer.items()}
  pd, pd_terms = _pd_terms(ctx, student, teacher, batch)
  metrics.update(pd_terms)
  return _transfer_total(metrics) + pd, metrics


def pkt_steps_per_phase(stage, num_layers: int) -> int:
  """S = (num_steps // k) // L optimizer steps per PKT phase, k = grad_accum_steps (the release:
  `num_train_steps // num_hidden_layers`, run_pretraining.py and lamb_optimizer.py); at least 1."""
  accum = int(stage.optimizer.get("grad_accum_steps", 1))
  return max((int(stage.num_steps) // accum) // num_layers, 1)


def pkt_phase(update, steps_per_phase: int, num_layers: int):
  """(p, t) at optimizer step `update`: the layer (0-based) PKT trains, p = update // S, and the
  step within its phase, t = update - p * S. The last phase also takes the updates left after
  L * S (the release gives those every layer its after-phase rate and a zero loss)."""
  update = jnp.asarray(update)
  phase = jnp.minimum(update // steps_per_phase, num_layers - 1)
  return phase, update - phase * steps_per_phase


def phase_warmup(t, steps_per_phase: int):
  """The release's periodic "background" rate at step t of a phase of S steps
  (distill_util.py `get_background_lr`):

      b(t) = min(0.9 + 0.1 * sqrt(1 - t/S), 10 * t/S)      (t/S clipped to [0, 1]; b = 1 if S = 1)

  i.e. a linear warm-up from 0 over the first ~S/10 steps, then a slow decay to 0.9."""
  if steps_per_phase <= 1:
    return jnp.ones([], jnp.float32)
  frac = jnp.clip(jnp.asarray(t, jnp.float32) / steps_per_phase, 0.0, 1.0)
  return jnp.minimum(0.9 + 0.1 * jnp.sqrt(1.0 - frac), 10.0 * frac)


def pkt_loss(ctx, params, teacher_params, batch, rng, step):
  """Progressive knowledge transfer (MobileBERT): in phase p, L = (1/L) [FMT_p + AT_p], layer p's
  transfer loss only. The release gates every layer's term with 1 in its phase, 0 otherwise, and
  averages over the L layers (run_pretraining.py `get_layerwise_gate`, `extra_loss1..4`). The
  phase is counted in optimizer steps, p = (step // grad_accum_steps) // S (`pkt_phase`), as
  `pkt_multipliers`."""
  _, _, per_layer = _transfer_outputs(ctx, params, teacher_params, batch, rng)
  num_layers = ctx.model.config.num_layers
  accum = int(ctx.stage.optimizer.get("grad_accum_steps", 1))
  phase, _ = pkt_phase(step // accum, pkt_steps_per_phase(ctx.stage, num_layers), num_layers)
  metrics = {k: v[phase] / num_layers for k, v in per_layer.items()}
  metrics["phase"] = phase.astype(jnp.float32)
  return _transfer_total(metrics), metrics


def _outside_layers(params, value) -> dict:
  """A multiplier tree (a prefix of params) giving `value` to everything but the backbone's
  transformer layers (embeddings, pooler, heads), and None in the layers' places."""
  model = params["model"]
  tree = {name: value for name in model if name != "backbone"}
  tree["backbone"] = {name: (None if name.startswith("layer") else value)
                      for name in model["backbone"]}
  return tree


def jkt_multipliers(ctx, step, params) -> dict:
  """JKT's learning-rate multipliers: 1 on the transformer layers; the embeddings, pooler and
  heads 0 when copied from the teacher (`copy_from_teacher`), else 1. The release's layer-wise
  phase trains only `bert/encoder/layer_*` (lamb_optimizer.py: every other variable gets rate
  and gate 0); JKT is that phase with every layer's loss at once."""
  frozen = 0.0 if ctx.stage.copy_from_teacher else 1.0
  tree = _outside_layers(params, frozen)
  tree["backbone"] = {k: (1.0 if v is None else v) for k, v in tree["backbone"].items()}
  return {"model": tree, "aux": 1.0}


def pkt_multipliers(ctx, step, params) -> dict:
  """PKT's learning-rate multipliers at optimizer step n (phase p, step t within it, S steps per
  phase, `pkt_phase`), as the release's LAMB (lamb_optimizer.py with distill_util.py
  `layer_wise_learning_rate`, `get_background_lr`):

      m_l(n) = current_layer_multiplier * b(t)   l = p   (release: 3 * 1.0 * b(t))
               lower_layer_multiplier * b(t)     l < p   (release: 3 * 0.1 * b(t))
               0                                 l > p

  with b(t) the per-phase warm-up `phase_warmup` (b(0) = 0: nothing moves on a phase's first
  step). Embeddings, pooler and heads: 0 when copied from the teacher (`copy_from_teacher`,
  the release), else trained like layer p. The paper's strict variant freezes the lower layers
  (lower_layer_multiplier=0)."""
  stage, num_layers = ctx.stage, ctx.model.config.num_layers
  steps_per_phase = pkt_steps_per_phase(stage, num_layers)
  phase, t = pkt_phase(step, steps_per_phase, num_layers)
  warm = phase_warmup(t, steps_per_phase)
  current = stage.current_layer_multiplier * warm
  tree = _outside_layers(params, 0.0 if stage.copy_from_teacher else current)
  for i in range(num_layers):
    tree["backbone"][f"layer_{i}"] = jnp.where(
        i == phase, current, jnp.where(i < phase, stage.lower_layer_multiplier * warm, 0.0))
  return {"model": tree, "aux": 1.0}


def pd_loss(ctx, params, teacher_params, batch, rng, step):
  """Pretraining distillation (MobileBERT): L = alpha * MLM(y) + (1 - alpha) * KL(p_t^T || p_s^T)
  over masked slots at temperature T, + NSP; the student without dropout unless
  `student_dropout` (the release)."""
  student = apply_model(ctx.model, params["model"], batch, rng=student_rng(ctx, rng))
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
  if strategy in FREEZES_COPIED and stage.copy_from_teacher:
    for field in EMBEDDING_FIELDS:  # else a frozen embedding would keep its random init
      t, s = getattr(teacher, field), getattr(student, field)
      if t != s:
        raise ValueError(f"config.{name} ({strategy}): copy_from_teacher copies and freezes the "
                         f"teacher's embeddings, which needs equal {field} (teacher {t}, student "
                         f"{s}); set --config.{name}.copy_from_teacher=False to train them")
  if "layer_mapping" in stage:  # TinyBERT: attention scores are compared head by head
    if teacher.num_heads != student.num_heads:
      raise ValueError(f"config.{name} ({strategy}): the attention-score loss needs equal "
                       f"num_heads (teacher {teacher.num_heads}, student {student.num_heads}); "
                       f"set --config.student.num_heads={teacher.num_heads}")
    objectives.parse_layer_mapping(stage.layer_mapping, student.num_layers, teacher.num_layers,
                                   order=stage.layer_mapping_order)
