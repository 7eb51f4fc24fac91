"""Evaluators of fine-tuned models: each takes a predict function and a dataset and returns
`Evaluation(metrics, files)`; the caller writes `eval_results.json` and the files.

A predict function maps encoded arrays (input_ids, attention_mask, token_type_ids, [N, L]) to
model outputs over all N rows: `predict_logits(arrays) -> [N, C]` for classifiers,
`predict_spans(arrays) -> {"start_logits", "end_logits"}` for SQuAD. The stage runner builds
them on the one batched, sharded prediction path (`mobilebert_jax.training.core.batched_predict`).
"""

from __future__ import annotations

import json
from typing import Callable, Mapping

import numpy as np

from mobilebert_jax.downstream import glue_data, loyalty, robustness, squad, tagging
from mobilebert_jax.downstream.metrics import glue_metrics, tagging_metrics
from mobilebert_jax.training.context import Evaluation

ArrayPredictor = Callable[[Mapping[str, np.ndarray]], np.ndarray]


def evaluate_glue(predict_logits: ArrayPredictor, dataset, prefix: str = "") -> Evaluation:
  """Every available dev split scored with the task's official metrics
  (`<prefix><split>_<metric>`); test splits present are predicted into
  `predictions/<GLUE file name>` (only without a prefix: the model's own submission)."""
  task = dataset.task
  metrics: dict[str, float] = {}
  for split in dataset.available_splits("eval"):
    arrays = dataset.encode(split)
    for metric, value in glue_metrics(task, predict_logits(arrays), arrays["labels"]).items():
      metrics[f"{prefix}{split}_{metric}"] = float(value)
  files = {}
  if not prefix:
    for split in dataset.available_splits("test"):
      name, text = glue_data.format_predictions(task, split, predict_logits(dataset.encode(split)))
      files[f"predictions/{name}"] = text
  return Evaluation(metrics, files)


def evaluate_squad(predict_spans: Callable[[Mapping[str, np.ndarray]], dict], dataset, *,
                   version_2: bool, n_best: int, max_answer_length: int,
                   null_threshold: float) -> Evaluation:
  """The dev file's windows decoded into answers and scored with the official EM/F1
  (`squad_<exact|f1|...>`); the answers go to `predictions.json`."""
  features = dataset.features(dataset.dev_file)
  out = predict_spans(features.inputs())
  answers, null_odds = squad.decode_predictions(
      features, out["start_logits"], out["end_logits"], n_best=n_best,
      max_answer_length=max_answer_length, null_threshold=null_threshold, version_2=version_2,
      return_null_odds=True)
  scores = squad.squad_evaluate(features.examples, answers,
                                na_probs=null_odds if version_2 else None)
  return Evaluation({f"squad_{k}": float(v) for k, v in scores.items()},
                    {"predictions.json": json.dumps(answers, indent=2, sort_keys=True)})


def evaluate_loyalty(teacher_logits: ArrayPredictor, student_logits: ArrayPredictor,
                     dataset) -> Evaluation:
  """Label and probability loyalty of the student to the teacher on the first dev split
  (`loyalty_label`, `loyalty_probability`)."""
  arrays = dataset.encode(dataset.available_splits("eval")[0])
  scores = loyalty.loyalty_scores(teacher_logits(arrays), student_logits(arrays))
  return Evaluation({f"loyalty_{k.removesuffix('_loyalty')}": v for k, v in scores.items()})


def evaluate_attack(student_logits: ArrayPredictor, dataset, embeddings: np.ndarray, *,
                    max_examples: int, k: int, min_similarity: float, max_fraction: float,
                    fields: str, importance: str, word_vectors: str, sentence_encoder: str,
                    sentence_threshold: float, sentence_window: int,
                    sentence_threshold_short: float, sentence_metric: str,
                    pos_tagger: str) -> Evaluation:
  """TextFooler (Jin et al., 2020; `robustness.attack`) on the student over the first dev
  split's first `max_examples` examples, with the keys of `config.robustness`.

  Synonyms come from `word_vectors` (a "word v1 v2 ..." text file) or, when empty, from the
  student's own token `embeddings`; `sentence_encoder` is a local checkpoint directory (empty:
  no sentence-similarity check) and `pos_tagger` a "module:function" (empty: no POS check).
  Metrics: `attack_<summary key>` and, 1.0 or 0.0, `attack_word_vectors` (a file gave the
  synonyms), `attack_sentence_check`, `attack_pos_check` (the checks ran); one record per
  example goes to `attack_examples.jsonl`.
  """
  split = dataset.available_splits("eval")[0]
  examples = dataset.examples(split)[:max_examples]
  predict_text = robustness.text_predictor(dataset.tokenizer, student_logits,
                                           dataset.max_seq_length, dataset.global_batch_size)
  vocab = dataset.tokenizer.convert_ids_to_tokens(list(range(embeddings.shape[0])))
  vectors, words = robustness.synonym_space(word_vectors, embeddings, vocab)
  check = robustness.build_sentence_check(
      sentence_encoder, threshold=float(sentence_threshold), window=int(sentence_window),
      short_text_threshold=float(sentence_threshold_short), metric=sentence_metric)
  pos_tag = robustness.load_pos_tagger(pos_tagger)
  records, summary = robustness.attack(
      examples, predict_text, vectors, words, k=int(k), min_similarity=float(min_similarity),
      max_fraction=float(max_fraction), fields=fields, importance=importance,
      sentence_check=check, pos_tag=pos_tag)
  metrics = {f"attack_{key}": float(value) for key, value in summary.items()}
  metrics.update(attack_word_vectors=float(bool(word_vectors)),
                 attack_sentence_check=float(check is not None),
                 attack_pos_check=float(pos_tag is not None))
  return Evaluation(metrics, {"attack_examples.jsonl": robustness.records_jsonl(records)})


def evaluate_quantized(predict_logits: ArrayPredictor, dataset, prefix: str,
                       model_size_bits: float, compression_ratio: float) -> Evaluation:
  """A quantized classifier (PTQ int8, LSQ) on every dev split (`<prefix>_<split>_<metric>`),
  next to its weights' size in bits and compression ratio against float32."""
  result = evaluate_glue(predict_logits, dataset, prefix=f"{prefix}_")
  metrics = {f"{prefix}_model_size_bits": float(model_size_bits),
             f"{prefix}_compression_ratio": float(compression_ratio), **result.metrics}
  return Evaluation(metrics)


def evaluate_tagging(predict_logits: ArrayPredictor, dataset, prefix: str = "") -> Evaluation:
  """A token classifier on the dev file of a `TaggingDataset`: per-word accuracy, and span
  precision/recall/F1 for BIO tags (`<prefix>dev_<metric>`); the predictions in CoNLL layout go
  to `<prefix>tagging_predictions.txt`."""
  sentences, arrays = dataset.dev()
  predicted = tagging.decode_word_tags(predict_logits(arrays), arrays["word_positions"],
                                       sentences, dataset.tags)
  gold = [list(s.tags) for s in sentences]
  scores = tagging_metrics(gold, predicted, dataset.scheme)
  return Evaluation({f"{prefix}dev_{k}": float(v) for k, v in scores.items()},
                    {f"{prefix}tagging_predictions.txt":
                     tagging.format_predictions(sentences, predicted)})
