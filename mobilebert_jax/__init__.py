"""mobilebert_jax: compress BERT into small task-agnostic models with JAX/Flax on TPU and GPU."""

from mobilebert_jax.models import ModelConfig, build_model, get_preset
from mobilebert_jax.pretrained import load_pretrained, save_pretrained

__version__ = "0.1.0"
__all__ = ["ModelConfig", "build_model", "get_preset", "load_pretrained", "save_pretrained"]
