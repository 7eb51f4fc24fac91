"""`PretrainingDataset`: deterministic, resumable, multi-host MLM + NSP batches (pure numpy).

The corpus is read and tokenised once; `dupe_factor` passes of sentence-pair packing give a fixed
set of N instances. Epoch e visits them in the order `permutation(seed, e)`, in global batches of
`batch_size` (the remainder is dropped), and process i of n takes rows [i*B, (i+1)*B) with
B = batch_size // n, so every process count sees the same global batches. Masks are drawn when a
batch is built, from a generator keyed by (seed, epoch, instance index): dynamic across epochs,
yet exactly reproducible, which makes `state()` / `restore()` exact.

    ds = PretrainingDataset(config.data, process_index=jax.process_index(),
                            process_count=jax.process_count())
    ds.check_vocab_size(model_config.vocab_size)
    for batch in ds: ...          # infinite unless num_epochs is set
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from mobilebert_jax.data import pretraining, sources
from mobilebert_jax.data.paths import sample_vocab_path
from mobilebert_jax.data.tokenizer import load_tokenizer


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Options of `PretrainingDataset` (the keys accepted from a ConfigDict / mapping).

    Source: exactly one of `input_files` (paths/globs of BERT-format text) or `tfds_name`
    (+ `tfds_data_dir`, `tfds_split`, `tfds_text_key`, `max_documents`, over a prepared data_dir).
    `vocab_path`: a vocab.txt or a directory with vocab.txt/tokenizer.json (None: the shipped
    demo vocab). `batch_size` is the global batch over all processes. `num_epochs=None` iterates
    forever.
    """
    input_files: Any = None
    tfds_name: str | None = None
    tfds_data_dir: str | None = None
    tfds_split: str = "train"
    tfds_text_key: str = "text"
    max_documents: int | None = None
    vocab_path: str | None = None
    do_lower_case: bool = True
    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    whole_word_masking: bool = False
    dupe_factor: int = 1
    seed: int = 0
    batch_size: int = 32
    num_epochs: int | None = None

    @classmethod
    def from_any(cls, config: Any = None, *, require_source: bool = True,
                 **overrides) -> "DataConfig":
        """Builds a DataConfig from None, a DataConfig, a mapping or a ConfigDict, plus overrides.

        Unknown keys raise ValueError naming them; then `validate(require_source)` runs.
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
        out = cls(**values)
        out.validate(require_source)
        return out

    def validate(self, require_source: bool = True) -> None:
        """Raises ValueError naming the first bad option (`require_source`: one source is set)."""
        def bad(key, why):
            raise ValueError(f"data config {key}={getattr(self, key)!r}: {why}")
        if self.input_files is not None and self.tfds_name is not None:
            raise ValueError(f"data config: set only one of input_files ({self.input_files!r}) "
                             f"and tfds_name ({self.tfds_name!r})")
        if require_source and self.input_files is None and self.tfds_name is None:
            raise ValueError("data config: set exactly one of input_files "
                             f"(got {self.input_files!r}) and tfds_name (got {self.tfds_name!r})")
        if self.tfds_name is not None and not self.tfds_data_dir:
            bad("tfds_data_dir", "required with tfds_name (the dir holding the prepared dataset)")
        if not _is_int(self.max_seq_length) or self.max_seq_length < 5:
            bad("max_seq_length", "must be an int >= 5 ([CLS] A [SEP] B [SEP])")
        if not _is_int(self.max_predictions_per_seq) or self.max_predictions_per_seq < 1:
            bad("max_predictions_per_seq", "must be an int >= 1")
        if not 0.0 < self.masked_lm_prob < 1.0:
            bad("masked_lm_prob", "must be in (0, 1)")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            bad("short_seq_prob", "must be in [0, 1]")
        if not _is_int(self.dupe_factor) or self.dupe_factor < 1:
            bad("dupe_factor", "must be an int >= 1")
        if not _is_int(self.seed) or self.seed < 0:
            bad("seed", "must be a non-negative int")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            bad("batch_size", "must be an int >= 1 (the global batch)")
        if self.num_epochs is not None and (not _is_int(self.num_epochs)
                                            or self.num_epochs < 1):
            bad("num_epochs", "must be None (forever) or an int >= 1")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _default_process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only for the defaults; the dataset itself is pure numpy
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


class PretrainingDataset:
    """Infinite iterator of per-process MLM + NSP batches (dicts of numpy arrays).

    Args:
      config: a DataConfig, mapping or ConfigDict with DataConfig's keys; `**overrides` win.
      process_index, process_count: this host's slice of each global batch (default: jax's).
      state: a dict from `state()` to resume from.
      tokenizer: an already-loaded tokenizer (skips `vocab_path`).
      documents: already-read documents (lists of sentence strings), instead of the source.
    """

    def __init__(self, config: Any = None, *, process_index: int | None = None,
                 process_count: int | None = None, state: Mapping[str, Any] | None = None,
                 tokenizer=None, documents: Sequence[Sequence[str]] | None = None, **overrides):
        self.config = cfg = DataConfig.from_any(config, require_source=documents is None,
                                                **overrides)
        self.process_index, self.process_count = _default_process(process_index, process_count)
        if self.process_count < 1 or not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index={self.process_index} must be in "
                             f"[0, process_count={self.process_count})")
        if cfg.batch_size % self.process_count:
            raise ValueError(f"global batch_size={cfg.batch_size} is not divisible by "
                             f"process_count={self.process_count}")
        self.global_batch_size = int(cfg.batch_size)
        self.local_batch_size = self.global_batch_size // self.process_count

        # Tokenizer and vocab facts.
        if tokenizer is None:
            vocab = cfg.vocab_path if cfg.vocab_path is not None else sample_vocab_path()
            tokenizer = load_tokenizer(vocab, do_lower_case=cfg.do_lower_case)
        self.tokenizer = tokenizer
        self.vocab_path = str(getattr(tokenizer, "vocab_path", None) or cfg.vocab_path
                              or getattr(tokenizer, "name_or_path", "<tokenizer>"))
        self.vocab_size = len(tokenizer)
        vocab_tokens = tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
        self.pad_id = int(tokenizer.pad_token_id)
        self.masking = pretraining.MaskingConfig.from_vocab(
            vocab_tokens, tokenizer.all_special_ids, int(tokenizer.mask_token_id),
            masked_lm_prob=cfg.masked_lm_prob,
            max_predictions_per_seq=cfg.max_predictions_per_seq,
            whole_word_masking=cfg.whole_word_masking)

        # Corpus -> tokenised documents -> packed instances (once).
        if documents is None:
            documents = self._read_documents()
        tokenized = sources.tokenize_documents(documents, tokenizer)
        if len(tokenized) < 2:
            raise ValueError(f"the corpus ({self._source_name()}) has {len(tokenized)} non-empty "
                             "document(s); next-sentence prediction needs at least 2")
        self.num_documents = len(tokenized)
        self.instances = pretraining.create_instances(
            tokenized, cfg.max_seq_length, cfg.short_seq_prob, cfg.dupe_factor, int(cfg.seed),
            int(tokenizer.cls_token_id), int(tokenizer.sep_token_id))
        self.num_examples = len(self.instances)
        self.batches_per_epoch = self.num_examples // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"the corpus ({self._source_name()}) gives only {self.num_examples} "
                             f"examples, fewer than one global batch of {self.global_batch_size}; "
                             "use a smaller batch_size, a larger dupe_factor or more text")

        self._epoch = 0
        self._batch_in_epoch = 0
        self._perm_cache: tuple[int, np.ndarray] | None = None
        if state is not None:
            self.restore(state)

    # -- sources -------------------------------------------------------------------------------
    def _source_name(self) -> str:
        cfg = self.config
        if cfg.tfds_name is None and cfg.input_files is None:
            return "documents passed in"
        if cfg.tfds_name is not None:
            return f"tfds {cfg.tfds_name!r} split {cfg.tfds_split!r} in {cfg.tfds_data_dir!r}"
        return f"input_files {cfg.input_files!r}"

    def _read_documents(self) -> list[list[str]]:
        cfg = self.config
        if cfg.tfds_name is not None:
            return sources.read_tfds_documents(cfg.tfds_name, cfg.tfds_data_dir, cfg.tfds_split,
                                               cfg.tfds_text_key, cfg.max_documents)
        files = cfg.input_files
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        return sources.read_text_documents(list(files))

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
        """The instance indices in the order epoch `epoch` visits them."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = pretraining.example_rng(self.config.seed, pretraining.STREAM_SHUFFLE, epoch)
            self._perm_cache = (epoch, rng.permutation(self.num_examples))
        return self._perm_cache[1]

    def _rows(self, epoch: int, batch_index: int, start: int, stop: int) -> dict[str, np.ndarray]:
        if epoch < 0 or not 0 <= batch_index < self.batches_per_epoch:
            raise IndexError(f"batch {batch_index} of epoch {epoch} does not exist "
                             f"({self.batches_per_epoch} batches per epoch)")
        base = batch_index * self.global_batch_size
        indices = self.epoch_order(epoch)[base + start:base + stop]
        rngs = [pretraining.example_rng(self.config.seed, pretraining.STREAM_MASK, epoch, int(n))
                for n in indices]
        return pretraining.make_batch(self.instances, indices, rngs, self.config.max_seq_length,
                                      self.masking, pad_id=self.pad_id)

    def get_batch(self, epoch: int, batch_index: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `batch_index` of `epoch` (does not move the
        iterator)."""
        start = self.process_index * self.local_batch_size
        return self._rows(epoch, batch_index, start, start + self.local_batch_size)

    def get_global_batch(self, epoch: int, batch_index: int) -> dict[str, np.ndarray]:
        """All rows of global batch `batch_index` of `epoch` (what every process together sees)."""
        return self._rows(epoch, batch_index, 0, self.global_batch_size)

    # -- iteration and resumption --------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.config.num_epochs is not None and self._epoch >= self.config.num_epochs:
            raise StopIteration
        batch = self.get_batch(self._epoch, self._batch_in_epoch)
        self._batch_in_epoch += 1
        if self._batch_in_epoch == self.batches_per_epoch:
            self._epoch, self._batch_in_epoch = self._epoch + 1, 0
        return batch

    def state(self) -> dict[str, int]:
        """JSON-serialisable position of the iterator (the next batch to be yielded)."""
        return {"epoch": self._epoch, "batch_in_epoch": self._batch_in_epoch,
                "seed": int(self.config.seed), "global_batch_size": self.global_batch_size,
                "num_examples": self.num_examples}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Moves the iterator to `state` (from `state()`); the next batch is the one a run that
        produced `state` would have yielded next. Process count may differ; seed, global batch
        and corpus must not."""
        try:
            epoch, k = int(state["epoch"]), int(state["batch_in_epoch"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"data iterator state {state!r} needs integer 'epoch' and "
                             "'batch_in_epoch'") from e
        current = self.state()
        for key in ("seed", "global_batch_size", "num_examples"):
            if key in state and int(state[key]) != current[key]:
                raise ValueError(f"data iterator state has {key}={state[key]!r} but this dataset "
                                 f"has {key}={current[key]!r}: the batches would differ")
        if epoch < 0 or not 0 <= k <= self.batches_per_epoch:
            raise ValueError(f"data iterator state {state!r} is out of range "
                             f"({self.batches_per_epoch} batches per epoch)")
        if k == self.batches_per_epoch:
            epoch, k = epoch + 1, 0
        self._epoch, self._batch_in_epoch = epoch, k

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self._epoch
