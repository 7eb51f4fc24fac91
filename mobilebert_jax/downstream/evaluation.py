"""Evaluation of fine-tuned models: GLUE dev metrics and submission files, SQuAD EM/F1 and
answers; every score is merged into `workdir/eval_results.json`."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
from etils import epath

from mobilebert_jax.compilation import jit_inference
from mobilebert_jax.downstream import glue_data, squad
from mobilebert_jax.downstream.metrics import glue_metrics

log = logging.getLogger("mobilebert_jax")


def predict(cs, params, arrays: dict, batch_size: int, fields: tuple[str, ...]) -> dict:
  """Model outputs `fields` (e.g. ("logits",)) over `arrays`, in global batches on the mesh
  (the last batch filled by wrapping around; the extra rows are dropped)."""
  from mobilebert_jax.training.trainer import put_global, to_host
  model = cs.model
  params = put_global(params, cs.shardings.params["model"])
  keys = ("input_ids", "attention_mask", "token_type_ids")

  @jit_inference
  def forward(params, batch):
    out = model.apply({"params": params}, *(batch[k] for k in keys))
    return {f: getattr(out, f) for f in fields}

  n = len(arrays["input_ids"])
  outputs = []
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size) % n
    batch = put_global({k: arrays[k][rows] for k in keys}, {k: cs.batch_sharding for k in keys})
    outputs.append(to_host(forward(params, batch)))
  return {f: np.concatenate([o[f] for o in outputs])[:n].astype(np.float32) for f in fields}


def write_results(cs, results: dict, workdir: str, writer) -> None:
  """eval_results.json (merged with what is there) and a metrics line, on process 0."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir, "eval_results.json")
  merged = json.loads(path.read_text()) if path.exists() else {}
  merged.update(results)
  path.write_text(json.dumps(merged, indent=2, sort_keys=True))
  writer.write(int(cs.stage.num_steps), results, stage=cs.name)
  log.info("%s: %s", cs.name, results)


def evaluate_glue(cs, params, dataset, workdir: str, writer) -> dict[str, float]:
  """Scores every available dev split with the task's official metrics and writes
  `workdir/eval_results.json` ({"<split>_<metric>": value}); test splits present are predicted
  into `workdir/predictions/<GLUE file name>`."""
  task = dataset.task
  results: dict[str, float] = {}
  for split in dataset.available_splits("eval"):
    arrays = dataset.encode(split)
    logits = predict(cs, params, arrays, dataset.global_batch_size, ("logits",))["logits"]
    for metric, value in glue_metrics(task, logits, arrays["labels"]).items():
      results[f"{split}_{metric}"] = float(value)
  primary = jax.process_index() == 0
  for split in dataset.available_splits("test"):
    arrays = dataset.encode(split)
    logits = predict(cs, params, arrays, dataset.global_batch_size, ("logits",))["logits"]
    if primary:
      out_dir = epath.Path(workdir, "predictions")
      out_dir.mkdir(parents=True, exist_ok=True)
      glue_data.write_predictions(task, split, logits, out_dir)
  write_results(cs, results, workdir, writer)
  return results


def evaluate_squad(cs, params, dataset, workdir: str, writer, *, version_2: bool = False,
                   n_best: int = 20, max_answer_length: int = 30,
                   null_threshold: float = 0.0) -> dict[str, float]:
  """Decodes the dev file's windows into answers, scores them with the official EM/F1 and writes
  `eval_results.json` ({"squad_exact", "squad_f1", ...}) and `predictions.json`."""
  features = dataset.features(dataset.dev_file)
  out = predict(cs, params, features.inputs(), dataset.global_batch_size,
                ("start_logits", "end_logits"))
  answers, null_odds = squad.decode_predictions(
      features, out["start_logits"], out["end_logits"], n_best=n_best,
      max_answer_length=max_answer_length, null_threshold=null_threshold, version_2=version_2,
      return_null_odds=True)
  scores = squad.squad_evaluate(features.examples, answers,
                                na_probs=null_odds if version_2 else None)
  results = {f"squad_{k}": float(v) for k, v in scores.items()}
  if jax.process_index() == 0:
    epath.Path(workdir, "predictions.json").write_text(
        json.dumps(answers, indent=2, sort_keys=True))
  write_results(cs, results, workdir, writer)
  return results


def evaluate_teacher_student(cs, params, dataset, workdir: str, *, teacher=None,
                             attack_config=None) -> dict[str, float]:
  """Loyalty of the student to `teacher` ((model, params), e.g. after task distillation) and an
  adversarial word-substitution attack on the student (`attack_config`: enabled, max_examples, k,
  max_fraction), both on the first dev split, merged into `eval_results.json`."""
  from mobilebert_jax.downstream import loyalty, robustness
  split = dataset.available_splits("eval")[0]
  student_predict = loyalty.predict_fn(cs.model, params)
  results = {}
  loyalty_scores = None
  if teacher is not None:
    arrays = dataset.encode(split)
    loyalty_scores = loyalty.evaluate_loyalty(loyalty.predict_fn(*teacher), student_predict,
                                              arrays, dataset.global_batch_size)
  summary = None
  if attack_config is not None and attack_config.get("enabled", False):
    examples = dataset.examples(split)[:int(attack_config.get("max_examples", 100))]
    predict_text = robustness.text_predictor(dataset.tokenizer, student_predict,
                                             dataset.max_seq_length, dataset.global_batch_size)
    table = np.asarray(params["backbone"]["embeddings"]["word_embeddings"]["embedding"])
    vocab = dataset.tokenizer.convert_ids_to_tokens(list(range(table.shape[0])))
    _, summary = robustness.attack(examples, predict_text, table, vocab,
                                   k=int(attack_config.get("k", 15)),
                                   max_fraction=float(attack_config.get("max_fraction", 0.3)))
  if jax.process_index() == 0 and (loyalty_scores or summary):
    results = robustness.write_results(workdir, attack_summary=summary, loyalty=loyalty_scores)
  return results


def evaluate_ptq(cs, params, dataset, workdir: str, writer, qconfig) -> dict[str, float]:
  """Post-training quantization of the fine-tuned classifier: calibrate the dense-layer inputs
  on `calibration_batches` training batches, then score every dev split with int8 weights and
  activations (`int8_<split>_<metric>`), next to the model size in bits and its compression
  ratio against float32."""
  from mobilebert_jax import quantization
  from mobilebert_jax.downstream import loyalty
  quantizer = quantization.PostTrainingQuantizer(
      weight_bits=int(qconfig.get("weight_bits", 8)), act_bits=int(qconfig.get("act_bits", 8)),
      embedding_bits=int(qconfig.get("embedding_bits", 8)),
      method=qconfig.get("calibration", "max"))
  keys = ("input_ids", "attention_mask", "token_type_ids")
  train = dataset.arrays
  size = dataset.global_batch_size
  batches = [{k: train[k][i:i + size] for k in keys}
             for i in range(0, min(len(train["input_ids"]),
                                   size * int(qconfig.get("calibration_batches", 8))), size)]
  scales = quantizer.calibrate(cs.model, params, batches)

  @jit_inference
  def forward(batch):
    return quantizer.quantized_apply(cs.model, params, scales, **batch).logits

  bits = quantizer.weight_bits
  results = {f"int{bits}_model_size_bits": float(quantizer.model_size_bits(params)),
             f"int{bits}_compression_ratio": float(quantizer.compression_ratio(params))}
  for split in dataset.available_splits("eval"):
    arrays = dataset.encode(split)
    logits = loyalty.batched_logits(lambda b: np.asarray(forward(b)), arrays, size)
    for metric, value in glue_metrics(dataset.task, logits, arrays["labels"]).items():
      results[f"int{bits}_{split}_{metric}"] = float(value)
  write_results(cs, results, workdir, writer)
  return results


def evaluate_lsq(cs, params, steps, dataset, final_dir: str, workdir: str,
                 writer) -> dict[str, float]:
  """Scores the LSQ-quantized classifier (learned `steps`) on every dev split
  (`lsq<bits>_<split>_<metric>`), reports the weights' size in bits and the compression ratio
  against float32, and stores the steps beside the model (`final_dir/lsq_steps.npz`)."""
  from flax import traverse_util
  from mobilebert_jax import quantization
  from mobilebert_jax.distill.strategies import LSQ_STEP_FLOOR
  from mobilebert_jax.downstream import loyalty
  stage = cs.stage
  bits = dict(weight_bits=int(stage.get("weight_bits", 8)), act_bits=int(stage.get("act_bits", 8)))
  steps = jax.tree.map(lambda x: np.maximum(x, LSQ_STEP_FLOOR), steps)
  keys = ("input_ids", "attention_mask", "token_type_ids")

  @jit_inference
  def forward(batch):
    return quantization.lsq_apply(cs.model, params, steps, *(batch[k] for k in keys),
                                  **bits).logits

  def leaf_bits(path, leaf):
    return bits["weight_bits"] if path.endswith("/kernel") else 32

  w = bits["weight_bits"]
  results = {f"lsq{w}_model_size_bits": float(quantization.model_size_bits(params, leaf_bits)),
             f"lsq{w}_compression_ratio": float(quantization.compression_ratio(params, leaf_bits))}
  for split in dataset.available_splits("eval"):
    arrays = dataset.encode(split)
    logits = loyalty.batched_logits(lambda b: np.asarray(forward(b)), arrays,
                                    dataset.global_batch_size)
    for metric, value in glue_metrics(dataset.task, logits, arrays["labels"]).items():
      results[f"lsq{w}_{split}_{metric}"] = float(value)
  if jax.process_index() == 0:
    flat = traverse_util.flatten_dict(steps, sep="/")
    np.savez(os.path.join(final_dir, "lsq_steps.npz"), **{k: np.asarray(v) for k, v in flat.items()})
  write_results(cs, results, workdir, writer)
  return results
