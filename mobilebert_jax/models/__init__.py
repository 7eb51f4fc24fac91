"""Flax models: one configurable BERT-family encoder and its task heads."""

from mobilebert_jax.models.config import ModelConfig
from mobilebert_jax.models.encoder import Backbone
from mobilebert_jax.models.heads import (HEADS, ForMaskedLM, ForPreTraining, ForQuestionAnswering,
                                         ForSequenceClassification, build_model)
from mobilebert_jax.models.layout import num_params, to_canonical_layout, to_model_layout
from mobilebert_jax.models.outputs import (EncoderOutput, PreTrainingOutput,
                                           QuestionAnsweringOutput, SequenceClassifierOutput)
from mobilebert_jax.models.presets import PRESETS, get_preset, tiny

__all__ = [
    "ModelConfig", "Backbone", "HEADS", "ForMaskedLM", "ForPreTraining", "ForQuestionAnswering",
    "ForSequenceClassification", "build_model", "EncoderOutput", "PreTrainingOutput",
    "QuestionAnsweringOutput", "SequenceClassifierOutput", "PRESETS", "get_preset", "tiny",
    "to_canonical_layout", "to_model_layout", "num_params",
]
