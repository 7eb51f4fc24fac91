"""The README's main run: tiny IB-BERT teacher pretraining, PKT, then PD, on the shipped corpus."""

from mobilebert_jax.default_config import get_config  # noqa: F401  (one definition, two paths)
