"""On-device export: a native checkpoint to LiteRT (.tflite) or ONNX, with one serving signature.

  from mobilebert_jax.export import export_litert, export_onnx
  export_litert("ckpt", "model.tflite", quantize="int8", calibration="sentences.txt")
  export_onnx("ckpt", "model.onnx")

or `python -m mobilebert_jax.convert export-litert|export-onnx NATIVE_DIR OUT`. Both trace the
same pure function (`serving.serving_fn`): int32 input_ids, attention_mask, token_type_ids
[batch, seq] in, the head's outputs (`serving.HEAD_OUTPUTS`) out. The converters and runtimes
come with the `export` extra (``pip install 'mobilebert_jax[export]'``); importing this package
needs none of them.
"""

import importlib

__all__ = ["ExportError", "ExportReport", "MissingDependencyError", "HEAD_OUTPUTS",
           "SERVING_INPUTS", "Serving", "load_serving", "serving_fn", "export_litert",
           "export_onnx"]
_HOMES = {"export_litert": "litert", "export_onnx": "onnx"}


def __getattr__(name):
  if name in _HOMES:
    return getattr(importlib.import_module(f"mobilebert_jax.export.{_HOMES[name]}"), name)
  if name in __all__:
    return getattr(importlib.import_module("mobilebert_jax.export.serving"), name)
  raise AttributeError(f"module 'mobilebert_jax.export' has no attribute {name!r}")
