"""Training strategies: each is a loss over (trainable params, frozen teacher params, batch).

A strategy is a config entry (`stage.strategy`) plus one function here, not a new trainer:

  pretrain   MLM + NSP on the trained model (teacher pretraining).
  akt        auxiliary KT: every layer's feature-map + attention transfer plus PD, one summed loss.
  jkt        joint KT: every layer's transfer losses together (followed by a `pd` stage).
  pkt        progressive KT: phase p trains layer p on its own transfer loss; lower layers are
             frozen (or get `lower_layer_multiplier`), higher ones, embeddings and heads frozen.
  pd         pretraining distillation: alpha * MLM + (1 - alpha) * KD(teacher MLM) + NSP.
  tinybert   TinyBERT general distillation: embedding + attention-score + hidden MSE with learned
             projections and a layer mapping.
  finetune   sequence classification (cross-entropy) or regression (MSE, num_labels = 1) on a
             downstream task, e.g. GLUE.
  squad      extractive question answering: mean of the start and end position cross-entropies.
  task_intermediate, task_prediction
             TinyBERT task distillation from a fine-tuned classifier teacher: first the
             intermediate layers (as `tinybert`), then the prediction layer (soft cross-entropy
             against the teacher's logits at a temperature).
  nas        NAS-BERT block-wise supernet training, pruning, search and extraction of several
             architectures (run by `mobilebert_jax.search.nas`, not a loss here).
  kdlsq      KDLSQ-BERT: the fine-tuned model with LSQ fake-quantized weights and dense inputs
             (learned step sizes, `weight_bits` / `act_bits`) distilled from its full-precision
             self: prediction soft cross-entropy + hidden-state MSE over every layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mobilebert_jax import objectives
from mobilebert_jax.models import ForMaskedLM, ForPreTraining, ModelConfig

STRATEGIES = ("pretrain", "akt", "jkt", "pkt", "pd", "tinybert", "finetune", "squad",
              "task_intermediate", "task_prediction", "kdlsq", "nas")
DISTILLATION_STRATEGIES = ("akt", "jkt", "pkt", "pd", "tinybert", "task_intermediate",
                           "task_prediction", "kdlsq")
# The model head each strategy trains (the rest train the MLM + NSP model), and the head of the
# teacher it reads (a fine-tuned classifier for task distillation).
HEADS = {"finetune": "classification", "squad": "question_answering",
         "task_intermediate": "classification", "task_prediction": "classification",
         "kdlsq": "classification"}
TEACHER_HEADS = {"task_intermediate": "classification", "task_prediction": "classification",
                 "kdlsq": "classification"}
LSQ_STEP_FLOOR = 1e-6  # steps are kept positive
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Strategy:
  """What a stage needs from its strategy.

  loss_fn(params, teacher_params, batch, rng, step) -> (loss, metrics), where params is
  {"model": ..., "aux": ...}; multipliers(step, params) -> per-parameter learning-rate
  multipliers (a prefix tree of params) or None; aux_init(rng) -> extra trainable parameters
  (projections).
  """
  name: str
  loss_fn: LossFn
  needs_teacher: bool
  multipliers: Callable[[jax.Array, Any], Any] | None = None
  aux_init: Callable[[jax.Array], dict] = lambda rng: {}
  # aux_from(model_params, batch) -> aux computed from the starting weights and real data
  # (LSQ step sizes); used instead of aux_init's values when a stage starts fresh.
  aux_from: Callable[[Any, dict], dict] | None = None


def head_for(strategy: str) -> str:
  """The model head a strategy trains."""
  return HEADS.get(strategy, "pretraining")


def teacher_head_for(strategy: str) -> str:
  """The head of the teacher a distillation strategy reads."""
  return TEACHER_HEADS.get(strategy, "pretraining")


def check_strategy(name: str, where: str) -> None:
  if name not in STRATEGIES:
    raise ValueError(f"{where}: unknown strategy {name!r}; valid strategies: {list(STRATEGIES)}")


def _apply(model, params, batch, *, rng=None, hidden=False, attentions=False, scores=False):
  train = rng is not None
  extra = {}
  if isinstance(model, (ForPreTraining, ForMaskedLM)):  # vocabulary logits at masked slots only
    extra["masked_lm_positions"] = batch["masked_lm_positions"]
  return model.apply(
      {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
      deterministic=not train, output_hidden_states=hidden, output_attentions=attentions,
      output_attention_scores=scores, rngs={"dropout": rng} if train else None, **extra)


def _pretraining_terms(out, batch) -> dict[str, jax.Array]:
  return {
      "mlm": objectives.mlm_loss(out.prediction_logits, batch["masked_lm_ids"],
                                 batch["masked_lm_weights"]),
      "nsp": objectives.nsp_loss(out.seq_relationship_logits, batch["next_sentence_labels"]),
      "mlm_accuracy": objectives.mlm_accuracy(out.prediction_logits, batch["masked_lm_ids"],
                                              batch["masked_lm_weights"]),
  }


def layerwise_transfer(teacher_out, student_out, mask, cfg) -> dict[str, jax.Array]:
  """Per-layer feature-map + attention transfer losses, stacked over layers: each [L]."""
  terms = {"fmt_hidden": [], "fmt_beta": [], "fmt_gamma": [], "attention": []}
  for layer in range(1, len(student_out.hidden_states)):
    _, fmt = objectives.feature_map_transfer(
        teacher_out.hidden_states[layer], student_out.hidden_states[layer], mask,
        hidden_factor=cfg.hidden_factor, beta_factor=cfg.beta_factor,
        gamma_factor=cfg.gamma_factor)
    terms["fmt_hidden"].append(fmt["hidden"])
    terms["fmt_beta"].append(fmt["beta"])
    terms["fmt_gamma"].append(fmt["gamma"])
    terms["attention"].append(objectives.attention_transfer(
        teacher_out.attentions[layer - 1], student_out.attentions[layer - 1], mask,
        factor=cfg.attention_factor))
  return {k: jnp.stack(v) for k, v in terms.items()}


def pkt_phase(step, num_steps: int, num_layers: int):
  """The layer (0-based) progressive KT trains at `step`: num_steps / L steps per phase."""
  steps_per_phase = max(num_steps // num_layers, 1)
  return jnp.minimum(step // steps_per_phase, num_layers - 1)


def pkt_multipliers(params_model: dict, step, cfg, num_layers: int) -> dict:
  """Learning-rate multipliers of PKT phase p: layer p gets `current_layer_multiplier`, lower
  layers `lower_layer_multiplier` (0 = frozen), higher layers, embeddings and heads 0."""
  phase = pkt_phase(step, cfg.num_steps, num_layers)
  backbone = params_model["backbone"]
  tree = {"backbone": {name: 0.0 for name in backbone}}
  for i in range(num_layers):
    tree["backbone"][f"layer_{i}"] = jnp.where(
        i == phase, cfg.current_layer_multiplier,
        jnp.where(i < phase, cfg.lower_layer_multiplier, 0.0))
  for name in params_model:
    if name != "backbone":
      tree[name] = 0.0
  return tree


def check_pair(teacher: ModelConfig, student: ModelConfig, strategy: str) -> None:
  """Errors for a teacher/student pair the strategy cannot transfer between."""
  if teacher.vocab_size != student.vocab_size:
    raise ValueError(f"{strategy}: teacher vocab_size={teacher.vocab_size} differs from student "
                     f"vocab_size={student.vocab_size}")
  if strategy in ("akt", "jkt", "pkt"):
    for field in ("num_layers", "hidden_size", "num_heads"):
      t, s = getattr(teacher, field), getattr(student, field)
      if t != s:
        raise ValueError(f"{strategy}: layer-wise knowledge transfer needs equal {field} "
                         f"(teacher {t}, student {s})")


def build_strategy(stage_cfg, student_model, teacher_model=None) -> Strategy:
  """Returns the Strategy named by `stage_cfg.strategy` for these models."""
  name = stage_cfg.strategy
  check_strategy(name, "stage")
  num_layers = student_model.config.num_layers
  if name in DISTILLATION_STRATEGIES:
    if teacher_model is None:
      raise ValueError(f"strategy {name!r} needs a teacher model")
    check_pair(teacher_model.config, student_model.config, name)

  def teacher_forward(teacher_params, batch, **flags):
    return _apply(teacher_model, jax.lax.stop_gradient(teacher_params), batch, **flags)

  if name == "finetune":
    def loss_fn(params, teacher_params, batch, rng, step):
      logits = student_model.apply(
          {"params": params["model"]}, batch["input_ids"], batch["attention_mask"],
          batch["token_type_ids"], deterministic=False, rngs={"dropout": rng}).logits
      logits = logits.astype(jnp.float32)
      if student_model.config.num_labels == 1:
        loss = jnp.mean((logits[:, 0] - batch["labels"]) ** 2)
        return loss, {"mse": loss}
      labels = batch["labels"].astype(jnp.int32)
      loss = objectives.integer_cross_entropy(logits, labels).mean()
      return loss, {"cross_entropy": loss,
                    "accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))}
    return Strategy(name, loss_fn, needs_teacher=False)

  if name == "squad":
    def loss_fn(params, teacher_params, batch, rng, step):
      out = student_model.apply(
          {"params": params["model"]}, batch["input_ids"], batch["attention_mask"],
          batch["token_type_ids"], deterministic=False, rngs={"dropout": rng})
      start = objectives.integer_cross_entropy(out.start_logits, batch["start_positions"]).mean()
      end = objectives.integer_cross_entropy(out.end_logits, batch["end_positions"]).mean()
      return (start + end) / 2, {"start": start, "end": end}
    return Strategy(name, loss_fn, needs_teacher=False)

  if name == "pretrain":
    def loss_fn(params, teacher_params, batch, rng, step):
      terms = _pretraining_terms(_apply(student_model, params["model"], batch, rng=rng), batch)
      return terms["mlm"] + terms["nsp"], terms
    return Strategy(name, loss_fn, needs_teacher=False)

  if name in ("akt", "jkt", "pkt"):
    def loss_fn(params, teacher_params, batch, rng, step):
      student = _apply(student_model, params["model"], batch, rng=rng, hidden=True,
                       attentions=True)
      teacher = teacher_forward(teacher_params, batch, hidden=True, attentions=True)
      per_layer = layerwise_transfer(teacher, student, batch["attention_mask"], stage_cfg)
      if name == "pkt":
        phase = pkt_phase(step, stage_cfg.num_steps, num_layers)
        metrics = {k: v[phase] for k, v in per_layer.items()}
        metrics["phase"] = phase.astype(jnp.float32)
      else:
        metrics = {k: jnp.sum(v) for k, v in per_layer.items()}
      loss = metrics["fmt_hidden"] + metrics["fmt_beta"] + metrics["fmt_gamma"] + \
          metrics["attention"]
      if name == "akt":
        pd, pd_terms = objectives.pretraining_distillation(
            student.prediction_logits, teacher.prediction_logits, batch["masked_lm_ids"],
            batch["masked_lm_weights"], alpha=stage_cfg.alpha, temperature=stage_cfg.temperature,
            nsp_logits=student.seq_relationship_logits, nsp_labels=batch["next_sentence_labels"])
        loss = loss + pd
        metrics.update(pd_terms)
      return loss, metrics

    multipliers = None
    if name == "pkt":
      multipliers = lambda step, params: {
          "model": pkt_multipliers(params["model"], step, stage_cfg, num_layers), "aux": 1.0}
    return Strategy(name, loss_fn, needs_teacher=True, multipliers=multipliers)

  if name == "pd":
    def loss_fn(params, teacher_params, batch, rng, step):
      student = _apply(student_model, params["model"], batch, rng=rng)
      teacher = teacher_forward(teacher_params, batch)
      loss, terms = objectives.pretraining_distillation(
          student.prediction_logits, teacher.prediction_logits, batch["masked_lm_ids"],
          batch["masked_lm_weights"], alpha=stage_cfg.alpha, temperature=stage_cfg.temperature,
          nsp_logits=student.seq_relationship_logits, nsp_labels=batch["next_sentence_labels"])
      terms["mlm_accuracy"] = objectives.mlm_accuracy(
          student.prediction_logits, batch["masked_lm_ids"], batch["masked_lm_weights"])
      return loss, terms
    return Strategy(name, loss_fn, needs_teacher=True)

  if name == "kdlsq":
    from mobilebert_jax import quantization
    bits = dict(weight_bits=int(stage_cfg.get("weight_bits", 8)),
                act_bits=int(stage_cfg.get("act_bits", 8)))
    keys = ("input_ids", "attention_mask", "token_type_ids")

    def aux_from(model_params, batch):
      steps = quantization.init_lsq_steps(student_model, model_params,
                                          {k: batch[k] for k in keys}, **bits)
      return {"lsq_steps": steps}

    def aux_init(rng):
      length = min(8, student_model.config.max_position_embeddings)
      dummy = {k: jnp.ones((1, length), jnp.int32) for k in keys}
      from mobilebert_jax.pretrained import init_params
      return aux_from(init_params(student_model, student_model.config, rng), dummy)

    def loss_fn(params, teacher_params, batch, rng, step):
      steps = jax.tree.map(lambda x: jnp.maximum(x, LSQ_STEP_FLOOR), params["aux"]["lsq_steps"])
      student = quantization.lsq_apply(
          student_model, params["model"], steps, *(batch[k] for k in keys),
          deterministic=False, output_hidden_states=True, rngs={"dropout": rng}, **bits)
      teacher = teacher_forward(teacher_params, batch, hidden=True)
      prediction = objectives.prediction_loss(student.logits, teacher.logits,
                                              temperature=stage_cfg.get("temperature", 1.0))
      hidden = sum(objectives.hidden_loss(s, t, attention_mask=batch["attention_mask"])
                   for s, t in zip(student.hidden_states, teacher.hidden_states))
      labels = batch["labels"].astype(jnp.int32)
      accuracy = jnp.mean((jnp.argmax(student.logits, -1) == labels).astype(jnp.float32))
      return prediction + hidden, {"prediction": prediction, "hidden": hidden,
                                   "accuracy": accuracy}
    return Strategy(name, loss_fn, needs_teacher=True, aux_init=aux_init, aux_from=aux_from)

  if name == "task_prediction":
    def loss_fn(params, teacher_params, batch, rng, step):
      student = _apply(student_model, params["model"], batch, rng=rng)
      teacher = teacher_forward(teacher_params, batch)
      loss = objectives.prediction_loss(student.logits, teacher.logits,
                                        temperature=stage_cfg.get("temperature", 1.0))
      labels = batch["labels"].astype(jnp.int32)
      accuracy = jnp.mean((jnp.argmax(student.logits, -1) == labels).astype(jnp.float32))
      return loss, {"prediction": loss, "accuracy": accuracy}
    return Strategy(name, loss_fn, needs_teacher=True)

  # tinybert, task_intermediate
  s_cfg, t_cfg = student_model.config, teacher_model.config
  # A free (non-monotone) mapping, e.g. from the layer-mapping search, needs
  # layer_mapping_order="any".
  mapping = objectives.parse_layer_mapping(
      stage_cfg.layer_mapping, s_cfg.num_layers, t_cfg.num_layers,
      order=stage_cfg.get("layer_mapping_order", "nondecreasing"))

  def aux_init(rng):
    if s_cfg.hidden_size == t_cfg.hidden_size:
      return {}
    k1, k2 = jax.random.split(rng)
    shape = (s_cfg.hidden_size, t_cfg.hidden_size)
    std = s_cfg.initializer_range
    return {"projections": {"embedding": std * jax.random.normal(k1, shape),
                            "hidden": std * jax.random.normal(k2, shape)}}

  def loss_fn(params, teacher_params, batch, rng, step):
    student = _apply(student_model, params["model"], batch, rng=rng, hidden=True, scores=True)
    teacher = teacher_forward(teacher_params, batch, hidden=True, scores=True)
    as_dict = lambda o: {"hidden_states": o.hidden_states, "attention_scores": o.attention_scores}
    loss, terms = objectives.tinybert_intermediate_loss(
        as_dict(student), as_dict(teacher), mapping, params["aux"].get("projections"),
        batch["attention_mask"])
    return loss, terms
  return Strategy(name, loss_fn, needs_teacher=True, aux_init=aux_init)

