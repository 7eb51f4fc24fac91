"""`PretrainingDataset`: MLM + NSP batches streamed from prepared records through grain.

The corpus is prepared once (`mobilebert_jax.data.prepare`) into array_record shards of N
sentence pairs. Epoch e visits them in a global shuffle, position p holding record
`index_shuffle(p, seed(seed, e))` (a bijection computed per index, no O(N) permutation in memory),
in global batches of `batch_size` (the remainder is dropped). Process i of n takes rows
[i*B, (i+1)*B) of every global batch with B = batch_size // n and reads only those records, so
every process count sees the same global batches. Masks are drawn when a batch is built, from a
generator keyed by (seed, epoch, record index): dynamic across epochs, yet exactly reproducible.
The position (epoch, batch) is the whole iterator state: `state()` / `restore()` are exact and
O(1), whatever the corpus size and the number of processes or workers.

grain runs it: `MapDataset.range(batches).map(build batch)`, `to_iter_dataset()` and, with
`num_workers > 0`, `mp_prefetch` worker processes that build batches in parallel, in order.

    ds = PretrainingDataset(config.data, process_index=jax.process_index(),
                            process_count=jax.process_count())   # data.prepared_dir is set
    ds.check_vocab_size(model_config.vocab_size)
    for batch in ds: ...          # infinite unless num_epochs is set
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import numpy as np

from mobilebert_jax.data import prepare, pretraining, records
from mobilebert_jax.data.paths import sample_vocab_path
from mobilebert_jax.data.tokenizer import load_tokenizer

SHUFFLE_ROUNDS = 4
_FOREVER_EPOCHS = 10**9


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The keys of `config.data` for pretraining (the keys accepted from a ConfigDict / mapping).

  Source, one of: `prepared_dir` (a directory from `python -m mobilebert_jax.data.prepare`,
  local or gs://); `input_files` (BERT-format text or JSON-lines files/globs, comma-separated)
  or `tfds_name` (+ `tfds_data_dir`, `tfds_split`, `max_documents`), which the trainer prepares
  once into `cache_dir` (default: the workdir's `prepared_data/`) and then reads the same way.
  `require_prepared`: refuse the on-the-fly preparation (the full-size configs set it).
  Preparation: `vocab_path` (a vocab.txt or a directory with vocab.txt/tokenizer.json; empty:
  the shipped demo vocab), `do_lower_case`, `max_seq_length`, `short_seq_prob`, `dupe_factor`,
  `shard_size_mb`, `prepare_workers` (-1: automatic) and `text_key` / `input_format` for
  JSON lines. Loading: `batch_size` is the global batch over all processes; masking
  (`max_predictions_per_seq`, `masked_lm_prob`, `whole_word_masking`) and the shuffle use
  `seed`; `num_epochs=0` iterates forever; `num_workers` grain worker processes build batches
  (0: in the training process) with `worker_buffer_size` batches each in flight. Workers are
  spawned processes: a script of your own that trains with them needs the usual
  `if __name__ == "__main__":` guard (`python -m mobilebert_jax.main` has it).
  """
  prepared_dir: str = ""
  input_files: Any = ""
  input_format: str = "auto"
  text_key: str = "text"
  tfds_name: str = ""
  tfds_data_dir: str = ""
  tfds_split: str = "train"
  max_documents: int = 0
  cache_dir: str = ""
  require_prepared: bool = False
  vocab_path: str = ""
  do_lower_case: bool = True
  max_seq_length: int = 128
  short_seq_prob: float = 0.1
  dupe_factor: int = 1
  shard_size_mb: float = 8.0
  prepare_workers: int = -1
  max_predictions_per_seq: int = 20
  masked_lm_prob: float = 0.15
  whole_word_masking: bool = False
  seed: int = 0
  batch_size: int = 32
  num_epochs: int = 0
  num_workers: int = 0
  worker_buffer_size: int = 2

  @classmethod
  def from_any(cls, config: Any = None, **overrides) -> "DataConfig":
    """Builds a DataConfig from None, a DataConfig, a mapping or a ConfigDict, plus overrides.

    None values mean the default. Unknown keys raise ValueError naming them; then
    `validate()` runs.
    """
    if config is None:
      values: dict[str, Any] = {}
    elif isinstance(config, DataConfig):
      values = dataclasses.asdict(config)
    elif hasattr(config, "to_dict"):  # ml_collections.ConfigDict
      values = dict(config.to_dict())
    elif isinstance(config, Mapping):
      values = dict(config)
    else:
      raise TypeError(f"data config must be a mapping, ConfigDict or DataConfig, got "
                      f"{type(config).__name__}")
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown data config key(s) {unknown}; valid keys: {sorted(known)}")
    out = cls(**{k: v for k, v in values.items() if v is not None})
    out.validate()
    return out

  def validate(self) -> None:
    """Raises ValueError naming the first bad option."""
    def bad(key, why):
      raise ValueError(f"data config {key}={getattr(self, key)!r}: {why}")
    if self.input_files and self.tfds_name:
      raise ValueError(f"data config: set only one of input_files ({self.input_files!r}) "
                       f"and tfds_name ({self.tfds_name!r})")
    if self.tfds_name and not self.tfds_data_dir:
      bad("tfds_data_dir", "required with tfds_name (the dir holding the prepared dataset)")
    try:
      self.prepare_options().validate()
    except ValueError as e:
      raise ValueError(f"data config {e}") from e
    if not _is_int(self.max_predictions_per_seq) or self.max_predictions_per_seq < 1:
      bad("max_predictions_per_seq", "must be an int >= 1")
    if not 0.0 < self.masked_lm_prob < 1.0:
      bad("masked_lm_prob", "must be in (0, 1)")
    if not _is_int(self.seed) or self.seed < 0:
      bad("seed", "must be a non-negative int")
    if not _is_int(self.batch_size) or self.batch_size < 1:
      bad("batch_size", "must be an int >= 1 (the global batch)")
    if not _is_int(self.num_epochs) or self.num_epochs < 0:
      bad("num_epochs", "must be 0 (forever) or an int >= 1")
    if not _is_int(self.num_workers) or self.num_workers < 0:
      bad("num_workers", "must be an int >= 0 (0: build batches in this process)")
    if not _is_int(self.worker_buffer_size) or self.worker_buffer_size < 1:
      bad("worker_buffer_size", "must be an int >= 1")

  def prepare_options(self) -> prepare.PrepareOptions:
    """How the trainer prepares this config's corpus on the fly (`prepare_workers` < 0:
    automatic)."""
    return prepare.PrepareOptions(
        max_seq_length=self.max_seq_length, short_seq_prob=self.short_seq_prob,
        dupe_factor=self.dupe_factor, seed=self.seed, do_lower_case=bool(self.do_lower_case),
        shard_size_mb=self.shard_size_mb,
        num_workers=None if self.prepare_workers < 0 else int(self.prepare_workers))


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _default_process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only for the defaults; the dataset itself is pure numpy
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


def shuffle_seed(seed: int, epoch: int) -> int:
  """The seed of epoch `epoch`'s global shuffle."""
  return int(np.random.SeedSequence([int(seed), pretraining.STREAM_SHUFFLE, int(epoch)])
             .generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class BatchBuilder:
  """Builds this process's rows of any global batch from the records (picklable: grain's
  worker processes each get a copy and open their own shard readers)."""
  source: records.PreparedRecords
  masking: pretraining.MaskingConfig
  seed: int
  num_records: int
  global_batch_size: int
  batches_per_epoch: int
  max_seq_length: int
  pad_id: int
  row_start: int
  row_stop: int

  def record_indices(self, epoch: int, batch_index: int, start: int, stop: int) -> list[int]:
    """The record indices at rows [start, stop) of global batch `batch_index` of `epoch`."""
    from grain.experimental import index_shuffle
    base = batch_index * self.global_batch_size
    s = shuffle_seed(self.seed, epoch)
    return [index_shuffle(p, max_index=self.num_records - 1, seed=s, rounds=SHUFFLE_ROUNDS)
            for p in range(base + start, base + stop)]

  def rows(self, epoch: int, batch_index: int, start: int, stop: int) -> dict[str, np.ndarray]:
    if epoch < 0 or not 0 <= batch_index < self.batches_per_epoch:
      raise IndexError(f"batch {batch_index} of epoch {epoch} does not exist "
                       f"({self.batches_per_epoch} batches per epoch)")
    indices = self.record_indices(epoch, batch_index, start, stop)
    rngs = [pretraining.example_rng(self.seed, pretraining.STREAM_MASK, epoch, n)
            for n in indices]
    return pretraining.make_batch(self.source.read(indices), rngs, self.max_seq_length,
                                  self.masking, pad_id=self.pad_id)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the `step`-th global batch since epoch 0."""
    epoch, batch_index = divmod(int(step), self.batches_per_epoch)
    return self.rows(epoch, batch_index, self.row_start, self.row_stop)


class PretrainingDataset:
  """Iterator of per-process MLM + NSP batches (dicts of numpy arrays) from prepared data.

  Args:
    config: a DataConfig, mapping or ConfigDict with DataConfig's keys (`prepared_dir` set);
      `**overrides` win.
    process_index, process_count: this host's slice of each global batch (default: jax's).
    state: a dict from `state()` to resume from.
    tokenizer: an already-loaded tokenizer (skips `vocab_path`).

  The prepared directory must match the config: its vocabulary (by fingerprint), lower-casing
  and max_seq_length; every shard must be present and whole (by size).
  """

  def __init__(self, config: Any = None, *, process_index: int | None = None,
               process_count: int | None = None, state: Mapping[str, Any] | None = None,
               tokenizer=None, **overrides):
    self.config = cfg = DataConfig.from_any(config, **overrides)
    if not cfg.prepared_dir:
      raise ValueError("PretrainingDataset reads prepared data: set data.prepared_dir to a "
                       "directory from `python -m mobilebert_jax.data.prepare` (the trainer "
                       "prepares data.input_files / data.tfds_name into one by itself)")
    self.process_index, self.process_count = _default_process(process_index, process_count)
    if self.process_count < 1 or not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index={self.process_index} must be in "
                       f"[0, process_count={self.process_count})")
    if cfg.batch_size % self.process_count:
      raise ValueError(f"global batch_size={cfg.batch_size} is not divisible by "
                       f"process_count={self.process_count}")
    self.global_batch_size = int(cfg.batch_size)
    self.local_batch_size = self.global_batch_size // self.process_count

    if tokenizer is None:
      tokenizer = load_tokenizer(cfg.vocab_path or sample_vocab_path(),
                                 do_lower_case=cfg.do_lower_case)
    self.tokenizer = tokenizer
    self.vocab_path = str(getattr(tokenizer, "vocab_path", None) or cfg.vocab_path
                          or getattr(tokenizer, "name_or_path", "<tokenizer>"))
    self.vocab_size = len(tokenizer)
    vocab_tokens = tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
    self.pad_id = int(tokenizer.pad_token_id)
    masking = pretraining.MaskingConfig.from_vocab(
        vocab_tokens, tokenizer.all_special_ids, int(tokenizer.mask_token_id),
        masked_lm_prob=cfg.masked_lm_prob,
        max_predictions_per_seq=cfg.max_predictions_per_seq,
        whole_word_masking=cfg.whole_word_masking)

    self.manifest = records.Manifest.read(cfg.prepared_dir)
    vocab_file = self.manifest.stats.get("vocab_file", "?")
    self.manifest.check(
        {"vocab_fingerprint": records.vocab_fingerprint(vocab_tokens),
         "vocab_size": self.vocab_size, "do_lower_case": bool(cfg.do_lower_case),
         "max_seq_length": int(cfg.max_seq_length)},
        "the config", f"; the config's vocab is {self.vocab_path}, the data was prepared "
        f"with {vocab_file}")
    self.manifest.verify_shards()
    self.fingerprint = self.manifest.fingerprint  # stored with the iterator state
    self.source = records.PreparedRecords(self.manifest)
    self.num_examples = len(self.source)
    self.batches_per_epoch = self.num_examples // self.global_batch_size
    if self.batches_per_epoch == 0:
      raise ValueError(f"the prepared data {cfg.prepared_dir} holds only "
                       f"{self.num_examples} sequences, fewer than one global batch of "
                       f"{self.global_batch_size}; use a smaller batch_size, a larger "
                       "dupe_factor or more text")
    start = self.process_index * self.local_batch_size
    self.builder = BatchBuilder(
        self.source, masking, int(cfg.seed), self.num_examples, self.global_batch_size,
        self.batches_per_epoch, int(cfg.max_seq_length), self.pad_id, start,
        start + self.local_batch_size)
    self._step = 0  # global batches handed out since epoch 0
    self._iterator = None
    if state is not None:
      self.restore(state)

  # -- checks --------------------------------------------------------------------------------
  def check_vocab_size(self, model_vocab_size: int) -> None:
    """Raises ValueError if the tokenizer can emit ids >= the model's vocab size."""
    if self.vocab_size > int(model_vocab_size):
      raise ValueError(
          f"tokenizer vocab {self.vocab_path!r} has {self.vocab_size} tokens but the model's "
          f"vocab_size is {int(model_vocab_size)}: token ids up to {self.vocab_size - 1} "
          "would index past the embedding table; use the model's vocab or enlarge "
          "vocab_size")

  def batch_spec(self, global_batch: bool = False) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of the batches (per-process, or global if `global_batch`)."""
    b = self.global_batch_size if global_batch else self.local_batch_size
    length, p = self.config.max_seq_length, self.config.max_predictions_per_seq
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    return {"input_ids": ((b, length), i32), "attention_mask": ((b, length), i32),
            "token_type_ids": ((b, length), i32), "masked_lm_positions": ((b, p), i32),
            "masked_lm_ids": ((b, p), i32), "masked_lm_weights": ((b, p), f32),
            "next_sentence_labels": ((b,), i32)}

  # -- random access -------------------------------------------------------------------------
  def epoch_order(self, epoch: int) -> np.ndarray:
    """The record indices in the order epoch `epoch` visits them (O(N): for inspection)."""
    return np.asarray(self.builder.record_indices(epoch, 0, 0, self.num_examples), np.int64)

  def get_batch(self, epoch: int, batch_index: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch `batch_index` of `epoch` (does not move the
    iterator)."""
    return self.builder.rows(epoch, batch_index, self.builder.row_start,
                             self.builder.row_stop)

  def get_global_batch(self, epoch: int, batch_index: int) -> dict[str, np.ndarray]:
    """All rows of global batch `batch_index` of `epoch` (what every process together sees)."""
    return self.builder.rows(epoch, batch_index, 0, self.global_batch_size)

  # -- iteration and resumption --------------------------------------------------------------
  def _stop_step(self) -> int:
    epochs = self.config.num_epochs or _FOREVER_EPOCHS
    return epochs * self.batches_per_epoch

  def _grain_iterator(self):
    import grain
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags (defaults outside an app)
      flags.FLAGS.mark_as_parsed()
    ds = grain.MapDataset.range(self._step, self._stop_step()).map(self.builder)
    # One element is a whole batch: grain's default read-ahead (16 threads, 500 elements)
    # would hold hundreds of batches and fight over the GIL. Batches are built in order, in
    # this process or in each worker; the prefetch to devices overlaps them with the step.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=1))
    if self.config.num_workers > 0:
      it = it.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=int(self.config.num_workers),
          per_worker_buffer_size=int(self.config.worker_buffer_size)))
    return iter(it)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._step >= self._stop_step():
      raise StopIteration
    if self._iterator is None:
      self._iterator = self._grain_iterator()
    batch = next(self._iterator)
    self._step += 1
    # Own copies: grain hands worker batches over in shared memory, freed with the views.
    return {k: np.array(v) for k, v in batch.items()}

  def close(self) -> None:
    """Stops grain's worker processes (the next `next` starts them again)."""
    iterator, self._iterator = self._iterator, None
    if iterator is not None and hasattr(iterator, "close"):
      iterator.close()

  def state(self) -> dict[str, Any]:
    """JSON-serialisable position of the iterator (the next batch to be yielded)."""
    epoch, batch_in_epoch = divmod(self._step, self.batches_per_epoch)
    return {"epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "seed": int(self.config.seed), "global_batch_size": self.global_batch_size,
            "num_examples": self.num_examples, "data_fingerprint": self.fingerprint}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Moves the iterator to `state` (from `state()`); the next batch is the one a run that
    produced `state` would have yielded next. Process and worker counts may differ; seed,
    global batch and prepared data must not."""
    try:
      epoch, k = int(state["epoch"]), int(state["batch_in_epoch"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"data iterator state {state!r} needs integer 'epoch' and "
                       "'batch_in_epoch'") from e
    current = self.state()
    for key in ("seed", "global_batch_size", "num_examples", "data_fingerprint"):
      if key in state and state[key] != current[key]:
        raise ValueError(f"data iterator state has {key}={state[key]!r} but this dataset "
                         f"has {key}={current[key]!r}: the batches would differ")
    if epoch < 0 or not 0 <= k <= self.batches_per_epoch:
      raise ValueError(f"data iterator state {state!r} is out of range "
                       f"({self.batches_per_epoch} batches per epoch)")
    self.close()
    self._step = epoch * self.batches_per_epoch + k

  @property
  def epoch(self) -> int:
    """The epoch of the next batch."""
    return self._step // self.batches_per_epoch
