"""Reference MobileBERT-TINY distillation (q/k/v from the bottleneck, F=2): as mobilebert_distill."""

import importlib.util
import os

import ml_collections


def _sibling(name: str):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config() -> ml_collections.ConfigDict:
  c = _sibling("mobilebert_distill").get_config()
  c.student = ml_collections.ConfigDict(dict(preset="mobilebert_tiny"))
  return c
