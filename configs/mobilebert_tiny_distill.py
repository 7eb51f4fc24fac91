"""Reference MobileBERT-TINY distillation (q/k/v from the bottleneck, F=2): as mobilebert_distill."""

import ml_collections

from mobilebert_jax.default_config import model_block, sibling_config


def get_config() -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "mobilebert_distill")
  c.student = model_block("mobilebert_tiny")
  return c
