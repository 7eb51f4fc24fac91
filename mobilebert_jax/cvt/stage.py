"""The `cvt` stage: a CNN-BiLSTM tagger trained with cross-view training on the training core.

A stage with ``strategy="cvt"`` (see configs/cvt.py) reads `config.tagging_data` (CoNLL train
and dev files, an optional file of unlabelled sentences) and drives its own loop
(`run_cvt_stage`, a `StageEnv`): the run's mesh and logical-axis rules, the project's optimizer
(`training.optimizer.create_optimizer` on the stage's `optimizer` block), `make_train_step`,
and `env.train` (logging, checkpoints with exact resume of both data streams, stop signals).
Each step takes a labelled and an unlabelled minibatch (`mobilebert_jax.cvt.losses`); with
`config.tagging_data.unlabeled_file` empty the stage trains the primary module alone.

At the end it scores the dev file (`downstream.metrics.tagging_metrics`: span P/R/F1 for BIO
tags, accuracy) and reports `<stage>_dev_<metric>`, the parameter count (`<stage>_num_params`:
the encoder and the primary module used at test time; `<stage>_num_params_training` with the
auxiliary modules) and the training cost (`<stage>_train_steps`; `<stage>_flops_per_step`, XLA's
count for the compiled step over every device, `core.step_flops`; `<stage>_train_flops`) into
eval_results.json, writes the dev predictions to `<stage>/dev_predictions.conll`, and the model
to `<stage>/final/` (`load_cvt`, `predict_tags`); a rerun after that reports it done.

Optimizer: the authors train with SGD, momentum 0.9, learning rate
0.5 x min(1, t / 5000) / (1 + 0.005 sqrt(t)) and gradients clipped to norm 1 (the release's
`model/multitask_model.py` `_get_optimizer`, `base/configure.py`); the project's optimizer
offers LAMB and AdamW, and configs/cvt.py uses AdamW for a short run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Sequence

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from mobilebert_jax.cvt.data import (INPUT_KEYS, UNLABELED_PREFIX, CVTDataset, TaggingVocab,
                                     build_vocab)
from mobilebert_jax.cvt.losses import cvt_loss
from mobilebert_jax.cvt.model import (PAPER_VIEWS, VIEWS, CVTConfig, CVTTagger, count_params,
                                      inference_modules, init_params)
from mobilebert_jax.downstream.metrics import TAGGING_SCHEMES, tagging_metrics
from mobilebert_jax.downstream.tagging import read_conll, read_unlabeled, tag_vocabulary
from mobilebert_jax.parallel import sharding
from mobilebert_jax.training import optimizer as optim
from mobilebert_jax.training.context import Evaluation
from mobilebert_jax.training.core import (batched_predict, jit_train_step, make_train_step,
                                          put_global, state_layout, step_flops, to_host)

log = logging.getLogger("mobilebert_jax")

FINAL_DIR = "final"
PARAMS_FILE = "params.msgpack"
META_FILE = "cvt.json"          # written last: marks the stage finished
PREDICTIONS_FILE = "dev_predictions.conll"

# The cvt stage's keys and defaults (the stage registry fills them in). Sizes, dropout, label
# smoothing and batch size are the paper's / release's (`base/configure.py`; see
# `cvt.model.CVTConfig`, `cvt.losses`). `views` are the auxiliary modules (the paper's four;
# "full" adds the release's fifth); `unlabeled_weight` w scales L_CVT (1: the paper's
# L_sup + L_CVT; 1 / len(views) averages the modules instead of summing them).
# `word_dropout` (not in the paper, off by default) zeroes the vectors of that share of the
# words of labelled minibatches and of the students' copies of unlabelled ones (whole-word
# dropout, Iyyer et al., 2015). The paper's word vectors start as GloVe vectors, where a word
# never seen tagged already sits near similar words; trained from scratch, the teacher has to
# tag such a word by its characters and context, and the students learn to do the same.
# `min_word_count`, `lowercase`, `max_word_length` shape the vocabulary (`cvt.data`); training
# sentences are cut to `max_sentence_length` words (the release's 100).
STAGE_KEYS = dict(
    word_embedding_size=300, char_embedding_size=50, char_filter_widths=(2, 3, 4),
    char_filters=100, first_lstm_size=1024, second_lstm_size=512, projection_size=512,
    views=PAPER_VIEWS, labeled_dropout=0.5, unlabeled_dropout=0.2, label_smoothing=0.1,
    unlabeled_weight=1.0, word_dropout=0.0, batch_size=64, unlabeled_batch_size=64,
    min_word_count=2, lowercase=True, max_sentence_length=100, max_word_length=20)
SIZE_KEYS = ("word_embedding_size", "char_embedding_size", "char_filters", "first_lstm_size",
             "second_lstm_size", "projection_size")
COUNT_KEYS = ("batch_size", "unlabeled_batch_size", "min_word_count", "max_sentence_length",
              "max_word_length")
RATE_KEYS = ("labeled_dropout", "unlabeled_dropout", "word_dropout", "label_smoothing")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_stage(name: str, stage, teacher_config=None, student_config=None) -> None:
  """Validates a cvt stage block before any compute (the registry's `check`); the teacher and
  student architectures play no part. Raises ValueError naming `config.<name>.<key>`."""
  del teacher_config, student_config
  where = f"config.{name}"
  for key in SIZE_KEYS + COUNT_KEYS:
    if not _is_int(stage[key]) or stage[key] < 1:
      raise ValueError(f"{where}.{key} must be a positive integer, got {stage[key]!r}")
  widths = stage.char_filter_widths
  if (not isinstance(widths, (tuple, list)) or not widths or
      not all(_is_int(w) and w >= 1 for w in widths)):
    raise ValueError(f"{where}.char_filter_widths must be a non-empty tuple of positive "
                     f"integers, got {widths!r}")
  views = stage.views
  if isinstance(views, str) or not isinstance(views, (tuple, list)) or not views:
    raise ValueError(f"{where}.views must be a non-empty tuple of views from {list(VIEWS)}, got "
                     f"{views!r}")
  unknown = [v for v in views if v not in VIEWS]
  if unknown or len(set(views)) != len(views):
    raise ValueError(f"{where}.views={tuple(views)!r}: each view must be one of {list(VIEWS)}, "
                     "once")
  for key in RATE_KEYS:
    if isinstance(stage[key], bool) or not 0.0 <= float(stage[key]) < 1.0:
      raise ValueError(f"{where}.{key} must be in [0, 1), got {stage[key]!r}")
  if isinstance(stage.unlabeled_weight, bool) or not float(stage.unlabeled_weight) >= 0.0:
    raise ValueError(f"{where}.unlabeled_weight must be >= 0, got {stage.unlabeled_weight!r}")
  if not isinstance(stage.lowercase, bool):
    raise ValueError(f"{where}.lowercase must be True or False, got {stage.lowercase!r}")


def model_config(stage, vocab: TaggingVocab) -> CVTConfig:
  """The tagger's sizes from a (checked) stage block and the vocabularies."""
  return CVTConfig(
      word_vocab_size=len(vocab.words), char_vocab_size=len(vocab.chars),
      num_tags=len(vocab.tags), word_embedding_size=int(stage.word_embedding_size),
      char_embedding_size=int(stage.char_embedding_size),
      char_filter_widths=tuple(int(w) for w in stage.char_filter_widths),
      char_filters=int(stage.char_filters), first_lstm_size=int(stage.first_lstm_size),
      second_lstm_size=int(stage.second_lstm_size), projection_size=int(stage.projection_size),
      views=tuple(stage.views))


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class TaggingData:
  """The stage's sentences, vocabularies and arrays (`cvt.data`)."""
  vocab: TaggingVocab
  train: list
  dev: list
  unlabeled: list | None
  train_arrays: dict[str, np.ndarray]
  unlabeled_arrays: dict[str, np.ndarray] | None
  dev_arrays: dict[str, np.ndarray]


def load_data(tagging, stage, where: str = "config.tagging_data") -> TaggingData:
  """Reads `config.tagging_data`'s files and encodes them with vocabularies built from the labelled
  training sentences and the unlabelled ones."""
  if not tagging.train_file or not tagging.dev_file:
    raise ValueError(f"{where}.train_file and {where}.dev_file must name CoNLL files (got "
                     f"{tagging.train_file!r}, {tagging.dev_file!r})")
  if tagging.scheme not in TAGGING_SCHEMES:
    raise ValueError(f"{where}.scheme={tagging.scheme!r} is not one of {list(TAGGING_SCHEMES)}")
  column = int(tagging.tag_column)
  train = read_conll(tagging.train_file, column)
  dev = read_conll(tagging.dev_file, column)
  unlabeled = read_unlabeled(tagging.unlabeled_file) if tagging.unlabeled_file else None
  vocab = build_vocab([s.tokens for s in train] + list(unlabeled or []),
                      tag_vocabulary(train), min_count=int(stage.min_word_count),
                      lowercase=bool(stage.lowercase),
                      max_word_length=int(stage.max_word_length))
  cut = int(stage.max_sentence_length) + 2
  train_arrays = vocab.encode([s.tokens for s in train], cut, [s.tags for s in train],
                              where=tagging.train_file)
  dev_arrays = vocab.encode([s.tokens for s in dev], None, [s.tags for s in dev],
                            where=tagging.dev_file)
  unlabeled_arrays = None if unlabeled is None else vocab.encode(unlabeled, cut)
  return TaggingData(vocab, train, dev, unlabeled, train_arrays, unlabeled_arrays, dev_arrays)


# ----------------------------------------------------------------------------- the stage


def global_example(dataset: CVTDataset) -> dict[str, np.ndarray]:
  """Zero arrays shaped like one global batch (what the step is compiled for)."""
  parts = [("", dataset.labeled)]
  if dataset.unlabeled is not None:
    parts.append((UNLABELED_PREFIX, dataset.unlabeled))
  return {prefix + k: np.zeros((part.global_batch_size,) + v.shape[1:], v.dtype)
          for prefix, part in parts for k, v in part.arrays.items()}


def run_cvt_stage(env) -> bool:
  """Runs (or resumes) the cvt stage of `env` (a `StageEnv`); False if a stop signal ended it."""
  name, stage = env.name, env.stage
  final_dir = os.path.join(env.stage_dir, FINAL_DIR)
  if epath.Path(final_dir, META_FILE).exists():
    log.info("stage %r already finished; the tagger is in %s", name, final_dir)
    return True
  check_stage(name, stage)
  mesh = env.mesh
  shards = sharding.batch_shards(mesh)
  for key in ("batch_size", "unlabeled_batch_size"):
    if int(stage[key]) % shards:
      raise ValueError(f"config.{name}.{key}={stage[key]} does not split over the mesh's "
                       f"dcn_data x data x fsdp = {shards} devices: use a multiple of {shards}")
  data = load_data(env.config.tagging_data, stage)
  vocab = data.vocab
  config = model_config(stage, vocab)
  model = CVTTagger(config)
  dataset = CVTDataset(
      data.train_arrays, data.unlabeled_arrays, int(stage.batch_size),
      int(stage.unlabeled_batch_size), seed=int(env.config.data.seed) + env.index,
      process_index=jax.process_index(), process_count=jax.process_count(),
      vocab_size=len(vocab.words))
  dataset.check_vocab_size(config.word_vocab_size)
  num_steps = int(stage.num_steps) or max(1, math.ceil(float(stage.num_epochs) *
                                                       dataset.batches_per_epoch))
  log.info("stage %r: %d labelled, %d unlabelled, %d dev sentences; %d words, %d chars, %d "
           "tags; views %s; %d steps", name, len(data.train), len(data.unlabeled or ()),
           len(data.dev), len(vocab.words), len(vocab.chars), len(vocab.tags),
           ",".join(config.views) if data.unlabeled else "none (supervised only)", num_steps)

  opt_cfg = ml_collections.ConfigDict(stage.optimizer.to_dict())
  opt_cfg.total_steps = num_steps
  accum = int(opt_cfg.get("grad_accum_steps", 1))
  if float(stage.warmup_fraction) > 0:
    opt_cfg.warmup_steps = int(round(float(stage.warmup_fraction) * (num_steps // accum)))
  tx, schedule = optim.create_optimizer(opt_cfg)
  rng = jax.random.PRNGKey(env.seed + 1000 * env.index)
  abstract_boxed = jax.eval_shape(lambda k: init_params(model, k, boxed=True), rng)
  init_state, shardings, abstract_state = state_layout(abstract_boxed, tx, rng, mesh, env.rules)

  def loss_fn(params, context, batch, step_rng, step):
    del context, step
    return cvt_loss(model, params, batch, step_rng,
                    labeled_dropout=float(stage.labeled_dropout),
                    unlabeled_dropout=float(stage.unlabeled_dropout),
                    label_smoothing=float(stage.label_smoothing),
                    unlabeled_weight=float(stage.unlabeled_weight),
                    word_dropout=float(stage.word_dropout))

  batch_sh = env.batch_sharding
  step_fn = jit_train_step(make_train_step(loss_fn, tx, schedule, accum), shardings, (),
                           batch_sh)

  checkpointer = env.checkpointer()
  try:
    if checkpointer.latest_step() is not None:
      state, extra = checkpointer.restore(abstract_state)
      dataset.restore(extra["data"])
      log.info("stage %r: resumed from step %d", name, int(state.step))
    else:
      params = jax.tree.map(np.asarray, jax.jit(lambda k: init_params(model, k))(rng))
      state = init_state(put_global(params, shardings.params), rng)
    state = env.train(name, num_steps, step_fn, state, dataset, checkpointer, batch_sh,
                      context=lambda: ())
  finally:
    checkpointer.close()
  if state is None:
    return False

  def forward(params, batch):
    return {"logits": model.apply({"params": params}, *(batch[k] for k in INPUT_KEYS))[
        "primary"]}

  logits = batched_predict(jax.jit(forward), state.params, data.dev_arrays,
                           int(stage.batch_size), batch_sh, keys=INPUT_KEYS)["logits"]
  dev_tokens = [s.tokens for s in data.dev]
  predicted = vocab.decode(logits, dev_tokens)
  scores = tagging_metrics([list(s.tags) for s in data.dev], predicted,
                           env.config.tagging_data.scheme)
  params = to_host(state.params)
  metrics = {f"{name}_dev_{k}": float(v) for k, v in scores.items()}
  metrics.update({
      f"{name}_num_params": float(count_params(params, inference_modules(params))),
      f"{name}_num_params_training": float(count_params(params)),
      f"{name}_train_steps": float(num_steps),
  })
  example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
             for k, v in global_example(dataset).items()}
  flops = step_flops(step_fn, abstract_state, (), example)
  if flops is not None:
    metrics.update({f"{name}_flops_per_step": flops, f"{name}_train_flops": flops * num_steps})
  lines = []
  for sentence, tags in zip(data.dev, predicted):
    lines += [f"{w} {g} {p}" for w, g, p in zip(sentence.tokens, sentence.tags, tags)] + [""]
  env.write_evaluation(num_steps, Evaluation(
      metrics, {os.path.join(name, PREDICTIONS_FILE): "\n".join(lines)}))
  if env.primary:
    save_cvt(final_dir, config, params, vocab, extra={"stage": name, "steps": num_steps})
  return True


# ----------------------------------------------------------------------------- the saved tagger


def save_cvt(path: str, config: CVTConfig, params: Any, vocab: TaggingVocab,
             extra: dict | None = None) -> None:
  """Writes a tagger directory: `params.msgpack` (flax serialization of the host parameters)
  and `cvt.json` (the model config, vocabularies and tags), the latter last."""
  directory = epath.Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  host = jax.tree.map(np.asarray, params)
  (directory / PARAMS_FILE).write_bytes(flax.serialization.to_bytes(host))
  meta = {"format": "mobilebert_jax.cvt", "model": config.to_dict(), "vocab": vocab.to_dict(),
          **(extra or {})}
  (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def load_cvt(path: str) -> tuple[CVTTagger, dict, TaggingVocab]:
  """(model, params, vocab) of a tagger directory written by the cvt stage (`save_cvt`)."""
  directory = epath.Path(path)
  if not (directory / META_FILE).exists():
    raise FileNotFoundError(f"{path}: no {META_FILE}; not a finished cvt stage's output")
  meta = json.loads((directory / META_FILE).read_text())
  model = CVTTagger(CVTConfig.from_dict(meta["model"]))
  vocab = TaggingVocab.from_dict(meta["vocab"])
  params = flax.serialization.msgpack_restore((directory / PARAMS_FILE).read_bytes())
  return model, jax.tree.map(jnp.asarray, params), vocab


def predict_tags(model: CVTTagger, params, vocab: TaggingVocab,
                 sentences: Sequence[Sequence[str]], batch_size: int = 64) -> list[list[str]]:
  """The primary module's tag for every word of `sentences` (lists of tokens), on the default
  device, in batches of `batch_size`."""
  sentences = [list(s) for s in sentences]
  if not sentences:
    return []
  arrays = vocab.encode(sentences)
  apply = jax.jit(lambda p, w, c, n: model.apply({"params": p}, w, c, n)["primary"])
  n = len(sentences)
  logits = []
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size) % n   # a fixed shape: wrap the last batch
    logits.append(np.asarray(apply(params, *(arrays[k][rows] for k in INPUT_KEYS))))
  return vocab.decode(np.concatenate(logits)[:n], sentences)
