"""Downstream data and metrics: the GLUE tasks and SQuAD (reading, encoding, evaluation)."""
from mobilebert_jax.downstream.glue_data import (GlueExample, encode_examples, parse_tsv,
                                                 read_glue, read_tfds, split_path,
                                                 truncate_pair, write_predictions)
from mobilebert_jax.downstream.metrics import (accuracy, f1_score, glue_metrics, glue_score,
                                               jensen_shannon, label_loyalty, matthews_corrcoef,
                                               pearson, probability_loyalty, spearman)
from mobilebert_jax.downstream.squad import (SquadExample, SquadFeatures, decode_predictions,
                                             make_features, normalize_answer, read_squad,
                                             squad_evaluate)
from mobilebert_jax.downstream.tasks import GLUE_TASKS, TASKS, GlueTask, SplitLayout, get_task

__all__ = [
    "GLUE_TASKS", "TASKS", "GlueExample", "GlueTask", "SplitLayout", "SquadExample",
    "SquadFeatures", "accuracy", "decode_predictions", "encode_examples", "f1_score",
    "get_task", "glue_metrics", "glue_score", "jensen_shannon", "label_loyalty",
    "make_features", "matthews_corrcoef", "normalize_answer", "parse_tsv", "pearson",
    "probability_loyalty", "read_glue", "read_squad", "read_tfds", "spearman", "split_path",
    "squad_evaluate", "truncate_pair", "write_predictions",
]
