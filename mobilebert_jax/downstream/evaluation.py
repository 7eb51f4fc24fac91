"""Evaluation of a fine-tuned classifier: dev metrics to eval_results.json, test predictions to
GLUE submission files."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from mobilebert_jax.downstream import glue_data
from mobilebert_jax.downstream.metrics import glue_metrics

log = logging.getLogger("mobilebert_jax")


def predict_logits(cs, params, arrays: dict, batch_size: int) -> np.ndarray:
  """Logits [N, num_labels] of the stage's model over `arrays`, in global batches on the mesh
  (the last batch padded and the padding dropped)."""
  from mobilebert_jax.training.trainer import put_global, to_host
  model = cs.model
  params = put_global(params, cs.shardings.params["model"])
  keys = ("input_ids", "attention_mask", "token_type_ids")

  @jax.jit
  def forward(params, batch):
    return model.apply({"params": params}, *(batch[k] for k in keys)).logits

  n = len(arrays["input_ids"])
  outputs = []
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size) % n  # wrap around to fill the last batch
    batch = {k: arrays[k][rows] for k in keys}
    batch = put_global(batch, {k: cs.batch_sharding for k in keys})
    outputs.append(to_host(forward(params, batch)))
  return np.concatenate(outputs)[:n].astype(np.float32)


def evaluate_glue(cs, params, dataset, workdir: str, writer) -> dict[str, float]:
  """Scores every available dev split with the task's official metrics and writes
  `workdir/eval_results.json` ({"<split>_<metric>": value}); test splits present are predicted
  into `workdir/predictions/<GLUE file name>`."""
  task = dataset.task
  results: dict[str, float] = {}
  for split in dataset.available_splits("eval"):
    arrays = dataset.encode(split)
    logits = predict_logits(cs, params, arrays, dataset.global_batch_size)
    for metric, value in glue_metrics(task, logits, arrays["labels"]).items():
      results[f"{split}_{metric}"] = float(value)
  primary = jax.process_index() == 0
  for split in dataset.available_splits("test"):
    arrays = dataset.encode(split)
    logits = predict_logits(cs, params, arrays, dataset.global_batch_size)
    if primary:
      out_dir = os.path.join(workdir, "predictions")
      os.makedirs(out_dir, exist_ok=True)
      glue_data.write_predictions(task, split, logits, out_dir)
  if primary:
    with open(os.path.join(workdir, "eval_results.json"), "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
    writer.write(int(cs.stage.num_steps), results, stage=cs.name)
    log.info("%s %s: %s", cs.name, task.name, results)
  return results
