"""BERT pretraining data: text sources, WordPiece tokenizer, preparation into records, batches."""
from mobilebert_jax.data.paths import (sample_tagging_paths, sample_text_path,
                                       sample_vocab_path)
from mobilebert_jax.data.pipeline import DataConfig, PretrainingDataset
from mobilebert_jax.data.prefetch import DevicePrefetcher, data_sharding, prefetch_to_device
from mobilebert_jax.data.prepare import CorpusSource, PrepareOptions, ensure_prepared, prepare_corpus
from mobilebert_jax.data.pretraining import (BATCH_KEYS, MaskingConfig, create_instances,
                                             create_instances_from_document, mask_tokens)
from mobilebert_jax.data.records import Manifest, PreparedDataError
from mobilebert_jax.data.sources import (read_text_documents, read_tfds_documents,
                                         split_sentences)
from mobilebert_jax.data.tokenizer import load_tokenizer

__all__ = [
    "BATCH_KEYS", "CorpusSource", "DataConfig", "DevicePrefetcher", "Manifest", "MaskingConfig",
    "PrepareOptions", "PreparedDataError", "PretrainingDataset", "create_instances",
    "create_instances_from_document", "data_sharding", "ensure_prepared", "load_tokenizer",
    "mask_tokens", "prefetch_to_device", "prepare_corpus", "read_text_documents",
    "read_tfds_documents", "sample_tagging_paths", "sample_text_path", "sample_vocab_path",
    "split_sentences",
]
