"""Training objectives: BERT pre-training, MobileBERT knowledge transfer, TinyBERT distillation.

Every loss is a pure, jit-able function computing in float32; see each module's docstrings
for the formulas and the shape conventions.
"""

from mobilebert_jax.objectives.common import (accuracy, as_f32, integer_cross_entropy, masked_mean,
                                              soft_cross_entropy, weighted_mean)
from mobilebert_jax.objectives.mobilebert import (attention_transfer, feature_map_mse,
                                                  feature_map_transfer, pretraining_distillation)
from mobilebert_jax.objectives.pretraining import mlm_accuracy, mlm_loss, nsp_accuracy, nsp_loss
from mobilebert_jax.objectives.tinybert import (attention_score_loss, embedding_loss,
                                                hidden_loss, parse_layer_mapping,
                                                prediction_loss, tinybert_intermediate_loss,
                                                uniform_layer_mapping)

__all__ = [
    "accuracy", "as_f32", "integer_cross_entropy", "masked_mean", "soft_cross_entropy", "weighted_mean",
    "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy",
    "feature_map_mse", "feature_map_transfer", "attention_transfer", "pretraining_distillation",
    "embedding_loss", "hidden_loss", "attention_score_loss", "prediction_loss",
    "uniform_layer_mapping", "parse_layer_mapping", "tinybert_intermediate_loss",
]
