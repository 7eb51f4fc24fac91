"""Batches for fine-tuning: encoded GLUE splits as resumable, multi-host, shuffled iterators.

`ArrayDataset` follows the contract of the pretraining pipeline (`PretrainingDataset`): the
global order is a function of (seed, epoch), process i takes rows [i*B, (i+1)*B) of every global
batch, and `state()` / `restore()` put the iterator exactly where a checkpoint left it.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from mobilebert_jax.data.tokenizer import load_tokenizer
from mobilebert_jax.downstream import glue_data, squad, tagging
from mobilebert_jax.downstream.tasks import get_task


class ArrayDataset:
  """Shuffled global batches over equal-length arrays; infinite over epochs, remainder dropped."""

  def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0,
               process_index: int = 0, process_count: int = 1, name: str = "dataset"):
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"{name}: arrays of different lengths {sizes}")
    self.arrays = dict(arrays)
    self.num_examples = next(iter(sizes.values()))
    if batch_size % process_count:
      raise ValueError(f"{name}: global batch_size {batch_size} is not divisible by "
                       f"{process_count} processes")
    if batch_size > self.num_examples:
      raise ValueError(f"{name}: global batch_size {batch_size} exceeds the {self.num_examples} "
                       "examples")
    self.global_batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.process_index = process_index
    self.seed = seed
    self.batches_per_epoch = self.num_examples // batch_size
    self._epoch, self._batch = 0, 0

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._batch >= self.batches_per_epoch:
      self._epoch, self._batch = self._epoch + 1, 0
    start = self._batch * self.global_batch_size + self.process_index * self.local_batch_size
    rows = self._order(self._epoch)[start:start + self.local_batch_size]
    self._batch += 1
    return {k: v[rows] for k, v in self.arrays.items()}

  def state(self) -> dict[str, int]:
    return {"epoch": self._epoch, "batch_in_epoch": self._batch}

  def restore(self, state: Mapping[str, Any]) -> None:
    self._epoch, self._batch = int(state["epoch"]), int(state["batch_in_epoch"])


class TokenizedDataset(ArrayDataset):
  """An ArrayDataset whose arrays come from a WordPiece tokenizer (a vocab.txt or a checkpoint
  directory holding one)."""

  def __init__(self, vocab_path: str, arrays_fn, batch_size: int, **kwargs):
    self.tokenizer = load_tokenizer(vocab_path)
    self.vocab_path = getattr(self.tokenizer, "vocab_path", vocab_path)
    self.vocab_size = len(self.tokenizer)
    super().__init__(arrays_fn(), batch_size, **kwargs)

  def check_vocab_size(self, model_vocab_size: int) -> None:
    """Raises if the tokenizer can emit ids the model's embedding table does not have."""
    if self.vocab_size > model_vocab_size:
      raise ValueError(f"tokenizer vocab {self.vocab_path!r} has {self.vocab_size} tokens but the "
                       f"model's vocab_size is {model_vocab_size}")


class GlueDataset(TokenizedDataset):
  """The training split of a GLUE task, encoded, plus its evaluation splits on demand.

  Data come from `data_dir` (GLUE TSV files) or, when it is empty, from tensorflow-datasets
  (`tfds_data_dir`). The tokenizer is `vocab_path` (a vocab.txt or a checkpoint directory).
  `augment(examples, tokenizer) -> examples` may enlarge the training split (TinyBERT's data
  augmentation).
  """

  def __init__(self, task: str, *, data_dir: str, vocab_path: str, max_seq_length: int,
               batch_size: int, seed: int = 0, tfds_data_dir: str = "", process_index: int = 0,
               process_count: int = 1, augment=None):
    self.task = get_task(task)
    self.label_names = self.task.labels  # None for a regression task
    self.augment = augment
    self.data_dir, self.tfds_data_dir = data_dir, tfds_data_dir
    self.max_seq_length = max_seq_length
    super().__init__(vocab_path, self._train_arrays, batch_size, seed=seed,
                     process_index=process_index, process_count=process_count,
                     name=f"GLUE {self.task.name} train")

  def _train_arrays(self) -> dict[str, np.ndarray]:
    examples = self.examples("train")
    if self.augment is not None:
      examples = self.augment(examples, self.tokenizer)
    return glue_data.encode_examples(examples, self.tokenizer, self.max_seq_length,
                                     task=self.task)

  def examples(self, split: str):
    if self.data_dir:
      return glue_data.read_glue(self.task, split, self.data_dir)
    return glue_data.read_tfds(self.task, split, self.tfds_data_dir)

  def encode(self, split: str) -> dict[str, np.ndarray]:
    return glue_data.encode_examples(self.examples(split), self.tokenizer, self.max_seq_length,
                                     task=self.task)

  def available_splits(self, kind: str) -> list[str]:
    """Evaluation ('eval') or test ('test') splits whose files exist (all of them for tfds)."""
    splits = self.task.eval_splits if kind == "eval" else self.task.test_splits
    if not self.data_dir:
      return list(splits)
    found = []
    for split in splits:
      try:
        glue_data.split_path(self.task, split, self.data_dir)
        found.append(split)
      except FileNotFoundError:
        pass
    return found


class SquadDataset(TokenizedDataset):
  """Doc-stride windows of a SQuAD training file; the dev file's windows on demand."""

  def __init__(self, *, train_file: str, dev_file: str, vocab_path: str, max_seq_length: int,
               doc_stride: int, max_query_length: int, batch_size: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    self.train_file, self.dev_file = train_file, dev_file
    self.window = dict(max_seq_length=max_seq_length, doc_stride=doc_stride,
                       max_query_length=max_query_length)
    super().__init__(vocab_path, lambda: self.features(train_file).inputs(), batch_size,
                     seed=seed, process_index=process_index, process_count=process_count,
                     name=f"SQuAD {train_file}")

  def features(self, path: str) -> squad.SquadFeatures:
    return squad.make_features(squad.read_squad(path), self.tokenizer, **self.window)


class TaggingDataset(TokenizedDataset):
  """A CoNLL-format tagging training file encoded as word pieces, each word's tag on its first
  piece (`tagging.encode_tagged`); the dev file's sentences and arrays on demand. The tag set
  is the training file's (`tags`, "O" first)."""

  def __init__(self, *, train_file: str, dev_file: str, vocab_path: str, max_seq_length: int,
               batch_size: int, tag_column: int = -1, scheme: str = "bio", seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    self.train_file, self.dev_file, self.scheme = train_file, dev_file, scheme
    self.tag_column, self.max_seq_length = tag_column, max_seq_length
    self.train_sentences = tagging.read_conll(train_file, tag_column)
    self.tags = tagging.tag_vocabulary(self.train_sentences)
    self.num_labels = len(self.tags)
    self.label_names = self.tags
    super().__init__(vocab_path, lambda: self._encode(self.train_sentences, train_file,
                                                      keep_positions=False),
                     batch_size, seed=seed, process_index=process_index,
                     process_count=process_count, name=f"tagging {train_file}")

  def _encode(self, sentences, where: str, keep_positions: bool = True) -> dict[str, np.ndarray]:
    arrays = tagging.encode_tagged(sentences, self.tokenizer, self.tags, self.max_seq_length,
                                   where=where)
    if not keep_positions:
      arrays.pop("word_positions")
    return arrays

  def dev(self) -> tuple[list[tagging.TaggedSentence], dict[str, np.ndarray]]:
    """The dev file's sentences and their arrays (with `word_positions` for decoding)."""
    if not self.dev_file:
      raise ValueError("config.tagging_data.dev_file is empty: nothing to evaluate the tagger on")
    sentences = tagging.read_conll(self.dev_file, self.tag_column)
    return sentences, self._encode(sentences, self.dev_file)
