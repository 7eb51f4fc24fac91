"""The built-in strategies: one registry entry each (see `mobilebert_jax.stages.registry`)."""

from __future__ import annotations

import numpy as np

from mobilebert_jax import quantization
from mobilebert_jax.cvt import stage as cvt_stage
from mobilebert_jax.distill import strategies
from mobilebert_jax.downstream import evaluation, losses
from mobilebert_jax.models import build_model
from mobilebert_jax.quantization import kdlsq
from mobilebert_jax.search import nas
from mobilebert_jax.stages.registry import StageSpec, register
from mobilebert_jax.training import optimizer as optim
from mobilebert_jax.training.context import EvalContext, Evaluation

# MobileBERT's layer-wise transfer weights (Sun et al., 2020; the original release's
# distill_util defaults): hidden MSE x100, mean gap x5000, variance gap x5, attention KL x1.
TRANSFER_KEYS = dict(hidden_factor=100.0, beta_factor=5000.0, gamma_factor=5.0,
                     attention_factor=1.0)
# Pretraining distillation: alpha * MLM + (1 - alpha) * KD at temperature T (the release's
# distill_ground_truth_ratio=0.5, distill_temperature=1).
PD_KEYS = dict(alpha=0.5, temperature=1.0)
# MobileBERT's distillation runs the student without dropout (run_pretraining.py builds it with
# is_training=False whenever a teacher is present); True turns its dropout back on.
NO_DROPOUT = dict(student_dropout=False)
# The layer-wise phases start from the teacher's embeddings and heads and keep them frozen
# (run_pretraining.py: init_embedding=True copies every teacher variable outside bert/encoder).
COPY_KEYS = dict(copy_from_teacher=True)
# PKT's per-layer rates (lamb_optimizer.py, distill_util.layer_wise_learning_rate): 3 x the
# per-phase warm-up on the layer being trained, 3 x 0.1 x it on the layers below.
PKT_KEYS = dict(current_layer_multiplier=3.0, lower_layer_multiplier=0.3)
TINYBERT_KEYS = dict(layer_mapping="uniform", layer_mapping_order="nondecreasing")
# Fine-tuning by epochs with a 10% linear warm-up (BERT's GLUE/SQuAD recipe).
EPOCH_KEYS = dict(num_epochs=3.0, warmup_fraction=0.1)


def evaluate_classifier(ev: EvalContext) -> Evaluation:
  """GLUE dev metrics and test predictions; loyalty to a classifier teacher when there is one;
  the word-substitution attack (`config.robustness`) and post-training int8
  (`config.quantization.ptq_eval`) when enabled."""
  config = ev.config
  student = ev.predict_logits(ev.model, ev.params)
  results = [evaluation.evaluate_glue(student, ev.dataset)]
  teacher = ev.teacher
  if teacher.params is not None and teacher.head == "classification":
    results.append(evaluation.evaluate_loyalty(
        ev.predict_logits(build_model(teacher.config, "classification"), teacher.params),
        student, ev.dataset))
  attack = config.robustness
  if attack.enabled:
    table = np.asarray(ev.params["backbone"]["embeddings"]["word_embeddings"]["embedding"])
    options = {key: value for key, value in attack.items() if key != "enabled"}
    results.append(evaluation.evaluate_attack(student, ev.dataset, table, **options))
  if config.quantization.ptq_eval:
    results.append(evaluate_ptq(ev))
  metrics, files = {}, {}
  for result in results:
    metrics.update(result.metrics)
    files.update(result.files)
  return Evaluation(metrics, files)


def evaluate_ptq(ev: EvalContext) -> Evaluation:
  """Post-training quantization of the fine-tuned classifier: calibrate the dense-layer inputs
  on `calibration_batches` training batches, then score every dev split with quantized weights
  and activations (`int<bits>_<split>_<metric>`)."""
  q = ev.config.quantization
  quantizer = quantization.PostTrainingQuantizer(
      weight_bits=int(q.weight_bits), act_bits=int(q.act_bits),
      embedding_bits=int(q.embedding_bits), method=q.calibration)
  train, size = ev.dataset.arrays, ev.dataset.global_batch_size
  count = min(len(train["input_ids"]), size * int(q.calibration_batches))
  batches = [{k: train[k][i:i + size] for k in kdlsq.INPUT_KEYS} for i in range(0, count, size)]
  scales = quantizer.calibrate(ev.model, ev.params, batches)

  def forward(params, batch):
    return {"logits": quantizer.quantized_apply(ev.model, params, scales, **batch).logits}

  predict = ev.predict(forward, ev.params)
  return evaluation.evaluate_quantized(
      lambda arrays: predict(arrays)["logits"], ev.dataset, f"int{quantizer.weight_bits}",
      quantizer.model_size_bits(ev.params), quantizer.compression_ratio(ev.params))


def evaluate_lsq(ev: EvalContext) -> Evaluation:
  """The LSQ-quantized classifier (learned steps) on every dev split
  (`lsq<bits>_<split>_<metric>`), with the stored integer model's size and its compression ratio
  against float32 (`quantization.lsq_size_bits`: quantized tensors at their bits, the steps and
  everything else at 32)."""
  steps, b = ev.aux["lsq_steps"], kdlsq.bits(ev.stage)
  predict = ev.predict(kdlsq.lsq_forward(ev.model, steps, ev.stage), ev.params)
  return evaluation.evaluate_quantized(
      lambda arrays: predict(arrays)["logits"], ev.dataset, f"lsq{b['weight_bits']}",
      quantization.lsq_size_bits(ev.params, steps, b["weight_bits"], b["embedding_bits"]),
      quantization.lsq_compression_ratio(ev.params, steps, b["weight_bits"], b["embedding_bits"]))


def evaluate_squad(ev: EvalContext) -> Evaluation:
  """SQuAD EM/F1 on the dev file (`config.squad_data` decoding options)."""
  sq = ev.config.squad_data

  def forward(params, batch):
    out = ev.model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         batch["token_type_ids"])
    return {"start_logits": out.start_logits, "end_logits": out.end_logits}

  return evaluation.evaluate_squad(
      ev.predict(forward, ev.params), ev.dataset, version_2=bool(sq.version_2),
      n_best=int(sq.n_best), max_answer_length=int(sq.max_answer_length),
      null_threshold=float(sq.null_threshold))


def evaluate_tagging(ev: EvalContext) -> Evaluation:
  """The token classifier on `config.tagging_data.dev_file`: span precision/recall/F1 (BIO) and
  per-word accuracy (`dev_<metric>`), predictions in `tagging_predictions.txt`."""
  return evaluation.evaluate_tagging(ev.predict_logits(ev.model, ev.params), ev.dataset)


def check_pkt(name, stage, teacher, student) -> None:
  """PKT's rates are `pkt_multipliers` x a constant base rate: the release runs the layer-wise
  phase with no decay (optimization.py `create_optimizer(..., num_warmup_steps=0,
  end_lr_rate=1.0)`), so the stage's optimizer must have schedule="constant"."""
  strategies.check_pair(name, stage, teacher, student)
  schedule = stage.optimizer.get("schedule", optim.DEFAULTS["schedule"])
  if schedule != "constant":
    raise ValueError(f"config.{name}.optimizer.schedule={schedule!r}: progressive knowledge "
                     "transfer runs at a constant base rate shaped per layer and phase (the "
                     f"release); set --config.{name}.optimizer.schedule=constant")


for spec in (
    StageSpec("pretrain", loss=strategies.pretrain_loss, role="teacher"),
    StageSpec("akt", loss=strategies.akt_loss, teacher_head="pretraining",
              keys=dict(TRANSFER_KEYS, **PD_KEYS, **NO_DROPOUT), check=strategies.check_pair),
    StageSpec("jkt", loss=strategies.jkt_loss, teacher_head="pretraining",
              keys=dict(TRANSFER_KEYS, **NO_DROPOUT, **COPY_KEYS), check=strategies.check_pair,
              multipliers=strategies.jkt_multipliers),
    StageSpec("pkt", loss=strategies.pkt_loss, teacher_head="pretraining",
              keys=dict(TRANSFER_KEYS, **PKT_KEYS, **NO_DROPOUT, **COPY_KEYS), check=check_pkt,
              multipliers=strategies.pkt_multipliers, scan_layers=False),
    StageSpec("pd", loss=strategies.pd_loss, teacher_head="pretraining",
              keys=dict(PD_KEYS, **NO_DROPOUT), check=strategies.check_pair),
    StageSpec("tinybert", loss=strategies.tinybert_loss, teacher_head="pretraining",
              keys=TINYBERT_KEYS, check=strategies.check_pair,
              aux_init=strategies.tinybert_aux_init),
    StageSpec("finetune", loss=losses.finetune_loss, head="classification", data="glue",
              keys=EPOCH_KEYS, evaluate=evaluate_classifier),
    StageSpec("squad", loss=losses.squad_loss, head="question_answering", data="squad",
              keys=EPOCH_KEYS, evaluate=evaluate_squad),
    StageSpec("tagging", loss=losses.tagging_loss, head="token_classification", data="tagging",
              keys=EPOCH_KEYS, evaluate=evaluate_tagging),
    StageSpec("task_intermediate", loss=strategies.tinybert_loss, head="classification",
              teacher_head="classification", data="glue", keys=TINYBERT_KEYS,
              check=strategies.check_pair, aux_init=strategies.tinybert_aux_init),
    StageSpec("task_prediction", loss=strategies.task_prediction_loss, head="classification",
              teacher_head="classification", data="glue", keys=dict(temperature=1.0),
              check=strategies.check_pair, evaluate=evaluate_classifier),
    StageSpec("kdlsq", loss=kdlsq.kdlsq_loss, head="classification",
              teacher_head="classification", data="glue",
              keys=kdlsq.STAGE_KEYS, check=kdlsq.check, aux_init=kdlsq.kdlsq_aux_init,
              aux_from=kdlsq.kdlsq_aux_from, evaluate=evaluate_lsq, save_aux=kdlsq.save_steps,
              scan_layers=False),
    # Cross-view training (Clark et al., 2018): a CNN-BiLSTM tagger, driving its own loop.
    StageSpec("cvt", run=cvt_stage.run_cvt_stage, data="tagging", exports="{stage}/final",
              keys=cvt_stage.STAGE_KEYS, check=cvt_stage.check_stage),
    StageSpec("nas", run=nas.run_nas_stage, teacher_head="base", exports=nas.ARCHITECTURES_FILE,
              keys=nas.STAGE_KEYS, check=nas.check_stage, scan_layers=False),
):
  register(spec)
