"""Export to ONNX with jax2onnx (JAX primitives to ONNX operators, no TensorFlow involved).

The graph takes int32 `input_ids`, `attention_mask`, `token_type_ids` of [batch, seq_length] and
returns the head's outputs (`serving.HEAD_OUTPUTS`) as float32. The batch dimension is symbolic
("batch") unless `batch_size` fixes it; the sequence length is fixed (position ids are an
`arange` of it). Parameters are stored as initializers in the one .onnx file (so models up to
protobuf's 2 GiB limit: BERT-large fits). Before anything is written, the model is run once in
onnxruntime (when installed) and compared with JAX on an example batch.
"""

from __future__ import annotations


from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mobilebert_jax.export import serving as serving_lib
from mobilebert_jax.export.serving import ExportError, ExportReport, Serving

# Opset 17 has LayerNormalization and runs on onnxruntime >= 1.14 (mobile builds included).
DEFAULT_OPSET = 17
DYNAMIC_BATCH = "batch"
RUNTIME = "ONNX"


def _libraries(load: bool = True):
  onnx = serving_lib.require("onnx", "onnx", "export-onnx", load)
  jax2onnx = serving_lib.require("jax2onnx", "jax2onnx", "export-onnx", load)
  return jax2onnx, onnx


def convert(serving: Serving, opset: int = DEFAULT_OPSET):
  """The `onnx.ModelProto` of `serving` (unused initializers removed)."""
  jax2onnx, _ = _libraries()
  names = serving.output_names
  batch = DYNAMIC_BATCH if serving.batch_size is None else serving.batch_size
  shape = jax.export.symbolic_shape(f"{batch}, {serving.seq_length}")
  spec = jax.ShapeDtypeStruct(shape, jnp.int32)

  def fn(input_ids, attention_mask, token_type_ids):
    out = serving(input_ids, attention_mask, token_type_ids)
    return tuple(out[name] for name in names)

  try:
    model = jax2onnx.to_onnx(fn, [spec] * 3, model_name=f"mobilebert_jax_{serving.head}",
                             opset=opset, input_names=list(serving_lib.SERVING_INPUTS),
                             output_names=list(names))
  except Exception as e:
    raise ExportError(f"{serving.source}: jax2onnx could not convert the model: "
                      f"{type(e).__name__}: {e}") from e
  _drop_unused_initializers(model.graph)
  return model


def _drop_unused_initializers(graph) -> None:
  """Removes initializers no node reads (jax2onnx leaves some reshape constants behind)."""
  used = set(o.name for o in graph.output)

  def collect(g):
    for node in g.node:
      used.update(node.input)
      for attribute in node.attribute:
        for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
          collect(sub)

  collect(graph)
  keep = [init for init in graph.initializer if init.name in used]
  if len(keep) != len(graph.initializer):
    del graph.initializer[:]
    graph.initializer.extend(keep)


def onnx_runner(model: bytes | str, threads: int | None = None
                ) -> Callable[..., dict[str, np.ndarray]] | None:
  """`run(**inputs) -> outputs` of `model` (a .onnx file path or its bytes) in onnxruntime on
  CPU with `threads` intra-op threads; None without onnxruntime. The runner's `input_shape` is
  [batch, seq], the batch None where it is dynamic."""
  try:
    import onnxruntime as ort
  except ImportError:
    return None
  options = ort.SessionOptions()
  options.log_severity_level = 3  # errors only
  if threads:
    options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
  session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
  names = [o.name for o in session.get_outputs()]

  def run(**inputs):
    return dict(zip(names, session.run(names, inputs)))

  run.input_shape = tuple(d if isinstance(d, int) else None for d in session.get_inputs()[0].shape)
  return run


def run_onnx(model: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
  """Runs `model` in onnxruntime on CPU; None without onnxruntime."""
  run = onnx_runner(model)
  return None if run is None else run(**inputs)


def export_onnx(src: str, dst: str, *, head: str | None = None, seq_length: int | None = None,
                batch_size: int | None = None, opset: int = DEFAULT_OPSET,
                overwrite: bool = False) -> ExportReport:
  """Exports the native checkpoint `src` to the ONNX file `dst` (see the module docstring).

  `batch_size` None keeps the batch dimension dynamic; `dst` is a .onnx file or a model
  directory (model.onnx, serving.json, tokenizer files, model card); the other arguments are as
  for `export_litert`.
  """
  target = serving_lib.export_target(dst, ".onnx", overwrite)
  _libraries(load=False)  # a missing dependency is reported before the checkpoint is read
  serving = serving_lib.load_serving(src, head, seq_length, batch_size)
  model = convert(serving, opset).SerializeToString()
  example = serving.example_inputs()
  got = run_onnx(model, example)
  diff = serving_lib.check_and_write(src, target.model_path, model, serving(**example), got,
                                     RUNTIME)
  shape = (serving.batch_size or DYNAMIC_BATCH, serving.seq_length)
  report = ExportReport(path=target.model_path, head=serving.head,
                        inputs={k: shape for k in serving_lib.SERVING_INPUTS},
                        outputs=serving.output_names, quantize="none", size_bytes=len(model),
                        max_abs_diff=diff)
  serving_lib.write_model_directory(target, serving, report, RUNTIME)
  return report
