"""Export to LiteRT (TensorFlow Lite) flatbuffers: float32, dynamic-range or full-integer int8.

  JAX serving function --jax2tf (StableHLO in a TF graph)--> TFLiteConverter --> .tflite

`jax.experimental.jax2tf` wraps the function's StableHLO in one `XlaCallModule` op, which the
TFLite converter lowers to builtin ops. The shapes are static: the signature `serving_default`
takes int32 `input_ids`, `attention_mask`, `token_type_ids` of [batch_size, seq_length]
(the converter cannot lower a symbolic batch dimension yet) and returns the head's outputs
(`serving.HEAD_OUTPUTS`).

Quantization (`quantize`):
  none     float32 everywhere.
  dynamic  int8 weights, float activations (`tf.lite.Optimize.DEFAULT`); weights with fewer
           than 1024 elements stay float.
  int8     full-integer: int8 weights and activations, with ranges calibrated on representative
           inputs (`calibration`), float32 logits at the interface. The exact (erf) GELU is
           evaluated with its tanh approximation here (|difference| < 1e-3, well below int8
           resolution): LiteRT's int8 kernels abort on the erf polynomial.

Before anything is written, the model is run once in the LiteRT interpreter (when
`ai-edge-litert` is installed) and compared with JAX on an example batch.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import jax
import numpy as np

from mobilebert_jax.export import serving as serving_lib
from mobilebert_jax.export.serving import ExportError, ExportReport, Serving

QUANTIZE_MODES = ("none", "dynamic", "int8")
SIGNATURE = "serving_default"
RUNTIME = "LiteRT"


def _tensorflow(load: bool = True):
  tf = serving_lib.require("tensorflow", "tensorflow-cpu", "export-litert", load)
  jax2tf = serving_lib.require("jax.experimental.jax2tf", "jax (with jax2tf)", "export-litert",
                               load)
  return tf, jax2tf


def tf_module(serving: Serving):
  """A `tf.Module` whose `serving_default` tf.function runs `serving` through jax2tf.

  The parameters are TF variables (frozen into constants by the converter), so the graph itself
  stays small for large models.
  """
  tf, jax2tf = _tensorflow()
  leaves, treedef = jax.tree.flatten(serving.params)
  fn = serving.fn
  converted = jax2tf.convert(
      lambda flat, ids, mask, types: fn(jax.tree.unflatten(treedef, flat), ids, mask, types),
      with_gradient=False)
  module = tf.Module()
  module.flat_params = [tf.Variable(np.asarray(x), trainable=False) for x in leaves]
  shape = [serving.batch_size, serving.seq_length]
  signature = [tf.TensorSpec(shape, tf.int32, name=name) for name in serving_lib.SERVING_INPUTS]

  @tf.function(input_signature=signature, autograph=False)
  def serving_default(input_ids, attention_mask, token_type_ids):
    return converted(list(module.flat_params), input_ids, attention_mask, token_type_ids)

  module.serving_default = serving_default
  return module


def convert(serving: Serving, quantize: str = "none",
            calibration: list[dict[str, np.ndarray]] | None = None) -> bytes:
  """The .tflite flatbuffer of `serving` (see the module docstring for `quantize`)."""
  tf, _ = _tensorflow()
  module = tf_module(serving)
  with serving_lib.native_stderr_captured():
    concrete = module.serving_default.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    if quantize in ("dynamic", "int8"):
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "int8":
      converter.representative_dataset = lambda: iter(calibration)
    try:
      with warnings.catch_warnings():  # calibration runs TF's own (deprecated) interpreter
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        return converter.convert()
    except Exception as e:  # the converter raises ConverterError with MLIR diagnostics
      lines = [line for line in str(e).splitlines() if "error" in line.lower()] or [str(e)]
      raise ExportError(f"{serving.source}: the LiteRT converter failed: "
                        + " | ".join(lines[:5])) from e


def litert_runner(model: bytes | str, threads: int | None = None
                  ) -> Callable[..., dict[str, np.ndarray]] | None:
  """`run(**inputs) -> outputs` of `model`'s serving signature (a .tflite file path or its
  bytes) in the LiteRT interpreter with `threads` CPU threads; None without ai-edge-litert.
  The runner's `input_shape` is the fixed [batch, seq] of its inputs."""
  with serving_lib.native_stderr_captured():  # start-up logs, the XNNPACK delegate's banner
    try:
      from ai_edge_litert.interpreter import Interpreter
    except ImportError:
      return None
    source = {"model_content": model} if isinstance(model, bytes) else {"model_path": model}
    interpreter = Interpreter(**source, num_threads=threads)
    interpreter.allocate_tensors()  # applies the XNNPACK delegate now, under the capture
    runner = interpreter.get_signature_runner(SIGNATURE)
  details = runner.get_input_details()

  def run(**inputs):
    return {k: np.asarray(v) for k, v in runner(**inputs).items()}

  run.input_shape = tuple(int(d) for d in details[serving_lib.SERVING_INPUTS[0]]["shape"])
  return run


def run_litert(model: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
  """Runs `model`'s serving signature in the LiteRT interpreter; None without ai-edge-litert."""
  run = litert_runner(model)
  return None if run is None else run(**inputs)


def export_litert(src: str, dst: str, *, head: str | None = None, seq_length: int | None = None,
                  batch_size: int = 1, quantize: str = "none", calibration: Any = None,
                  overwrite: bool = False) -> ExportReport:
  """Exports the native checkpoint `src` to the LiteRT file `dst` (see the module docstring).

  Args:
    src: a native checkpoint directory (`save_pretrained`, `convert import-hf`).
    dst: the .tflite file, or a model directory (any name not ending in .tflite) that gets
      model.tflite, serving.json, the tokenizer files and a model card; an existing file or
      non-empty directory is refused unless `overwrite`.
    head: the head to export (default: the checkpoint's own).
    seq_length: the fixed sequence length (default: min(128, max_position_embeddings)).
    batch_size: the fixed batch size.
    quantize: "none", "dynamic" or "int8".
    calibration: for "int8": a text file (one sentence or tab-separated pair per line, tokenised
      with the checkpoint's vocab) or an iterable of input dicts of [batch_size, seq_length].
  """
  if quantize not in QUANTIZE_MODES:
    raise ExportError(f"--quantize={quantize!r} is not one of {list(QUANTIZE_MODES)}")
  if quantize == "int8":
    serving_lib.check_calibration_given(calibration)
  if calibration is not None and quantize != "int8":
    raise ExportError(f"--calibration is used only with --quantize=int8 (got --quantize="
                      f"{quantize})")
  if batch_size is None:
    raise ExportError(f"{src}: LiteRT needs a fixed --batch-size (the converter cannot lower a "
                      "dynamic batch dimension)")
  target = serving_lib.export_target(dst, ".tflite", overwrite)
  _tensorflow(load=False)  # a missing dependency is reported before the checkpoint is read
  serving = serving_lib.load_serving(src, head, seq_length, batch_size)
  reference, batches, notes = serving, None, ()
  if quantize == "int8":
    batches = serving_lib.calibration_batches(serving, calibration)
    if serving.config.hidden_act == "gelu":
      notes = ("GELU evaluated with its tanh approximation",)
      serving = dataclasses.replace(serving, config=serving.config.replace(hidden_act="gelu_new"))
  model = convert(serving, quantize, batches)
  example = batches[0] if batches else reference.example_inputs()  # int8: in-range inputs
  got = run_litert(model, example)
  diff = serving_lib.check_and_write(src, target.model_path, model, reference(**example), got,
                                     "LiteRT")
  shape = (serving.batch_size, serving.seq_length)
  report = ExportReport(path=target.model_path, head=serving.head,
                        inputs={k: shape for k in serving_lib.SERVING_INPUTS},
                        outputs=serving.output_names, quantize=quantize, size_bytes=len(model),
                        max_abs_diff=diff, notes=notes)
  serving_lib.write_model_directory(target, reference, report, RUNTIME)
  return report
