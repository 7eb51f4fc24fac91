"""mobilebert_jax: compress BERT into small task-agnostic models with JAX/Flax on TPU and GPU."""

import importlib

__version__ = "0.1.0"
__all__ = ["ModelConfig", "build_model", "get_preset", "load_pretrained", "save_pretrained"]
_HOMES = {"ModelConfig": "models", "build_model": "models", "get_preset": "models",
          "load_pretrained": "pretrained", "save_pretrained": "pretrained"}


def __getattr__(name):
  # Lazy: data worker processes import mobilebert_jax.data without paying for jax and flax.
  if name in _HOMES:
    return getattr(importlib.import_module(f"mobilebert_jax.{_HOMES[name]}"), name)
  raise AttributeError(f"module 'mobilebert_jax' has no attribute {name!r}")
