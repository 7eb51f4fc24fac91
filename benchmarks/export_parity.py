"""On-device export at full size: conversion time, file size, parity with JAX and CPU latency.

    python -m benchmarks.export_parity --presets=mobilebert,tinybert_4l --seq_len=128 \
        --formats=litert,litert_dynamic,litert_int8,onnx --output=export_parity.json

Needs the export extra (pip install 'mobilebert_jax[export]'). Each preset (full size, random
weights, classification head) is written as a native checkpoint to a temporary directory and
exported with `mobilebert_jax.export` (batch 1, `--seq_len`); int8 is calibrated on
`--calibration_batches` random batches (`Serving.example_inputs`, so a pessimistic figure for
int8 parity). Each file is then run `--repeats` times in its runtime (LiteRT interpreter with
its default XNNPACK delegate, onnxruntime on CPU) after one warm-up call; the report gives the
median latency, the file size and the largest |exported - JAX| logit difference on a batch the
export did not see. `benchmarks.export_latency` builds on the helpers here (`native_checkpoint`,
`export_format`, `runtime_call`).
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time

from absl import app, flags

from benchmarks.reporting import write_report

FLAGS = flags.FLAGS
# The export formats this script and benchmarks.export_latency know: the `quantize` argument of
# `export_litert`, or None for ONNX.
FORMATS = {"litert": "none", "litert_dynamic": "dynamic", "litert_int8": "int8", "onnx": None}


def define_flags() -> None:
  """Defines this script's flags (only when it runs: benchmarks.export_latency imports the
  helpers below, and absl refuses two definitions of `--output` or `--seq_len`)."""
  flags.DEFINE_list("presets", ["mobilebert"], "Model presets (full size).")
  flags.DEFINE_list("formats", list(FORMATS), "Exports to make: " + ", ".join(FORMATS) + ".")
  flags.DEFINE_integer("seq_len", 128, "Fixed sequence length of the exported signature.")
  flags.DEFINE_integer("calibration_batches", 8, "Random batches for int8 calibration.")
  flags.DEFINE_integer("repeats", 10, "Timed runtime calls per file.")
  flags.DEFINE_string("output", "export_parity.json", "JSON report path ('' to skip).")


def _time(run, inputs, repeats: int) -> float:
  run(inputs)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run(inputs)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def native_checkpoint(preset: str, directory: str, tiny: bool = False) -> str:
  """Saves `preset` (random weights, classification head) as a native checkpoint in
  `directory`; `tiny` shrinks it (`presets.tiny`). Returns the checkpoint's path."""
  import jax
  import numpy as np
  from mobilebert_jax import save_pretrained
  from mobilebert_jax.models import build_model, get_preset
  from mobilebert_jax.pretrained import init_params
  config = get_preset(preset, tiny_variant=tiny)
  model = build_model(config, "classification")
  # Eager: jitting the init compiles for longer than it runs (MobileBERT: 40 s).
  params = init_params(model, config, jax.random.PRNGKey(0))
  path = os.path.join(directory, preset)
  save_pretrained(path, config, jax.tree.map(np.asarray, params), "classification")
  return path


def export_format(native: str, fmt: str, directory: str, seq_len: int,
                  calibration_batches: int):
  """Exports `native` to `fmt` (a key of FORMATS) at batch 1; returns (ExportReport, seconds).

  int8 is calibrated on `calibration_batches` random batches (`Serving.example_inputs`).
  """
  from mobilebert_jax.export import litert, onnx, serving as serving_lib
  path = os.path.join(directory, f"{os.path.basename(native)}_{fmt}")
  start = time.perf_counter()
  if fmt == "onnx":
    report = onnx.export_onnx(native, path + ".onnx", seq_length=seq_len, batch_size=1)
  else:
    calibration = None
    if FORMATS[fmt] == "int8":
      serving = serving_lib.load_serving(native, seq_length=seq_len, batch_size=1)
      calibration = [serving.example_inputs(seed=i) for i in range(calibration_batches)]
    report = litert.export_litert(native, path + ".tflite", seq_length=seq_len,
                                  quantize=FORMATS[fmt], calibration=calibration)
  return report, time.perf_counter() - start


def runtime_call(path: str, threads: int | None = None):
  """A call `inputs -> logits` running the exported file `path` on CPU in its runtime (LiteRT
  with its default XNNPACK delegate for .tflite, onnxruntime for .onnx) with `threads` intra-op
  threads (None: the runtime's default)."""
  from mobilebert_jax.export import litert, onnx
  make = onnx.onnx_runner if path.endswith(".onnx") else litert.litert_runner
  runner = make(path, threads)
  return lambda inputs: runner(**inputs)["logits"]


def _case(native: str, fmt: str, directory: str) -> dict:
  import numpy as np
  from mobilebert_jax.export import serving as serving_lib
  report, convert_s = export_format(native, fmt, directory, FLAGS.seq_len,
                                    FLAGS.calibration_batches)
  run = runtime_call(report.path)
  serving = serving_lib.load_serving(native, seq_length=FLAGS.seq_len, batch_size=1)
  inputs = serving.example_inputs(seed=1000)
  diff = float(np.abs(np.asarray(run(inputs)) - np.asarray(serving(**inputs)["logits"])).max())
  return {"format": fmt, "convert_s": round(convert_s, 1), "size_mb": report.size_bytes / 1e6,
          "max_abs_diff": diff, "latency_ms": 1e3 * _time(run, inputs, FLAGS.repeats)}


def main(argv):
  del argv
  import jax
  jax.config.update("jax_platforms", "cpu")
  start = time.time()
  rows = []
  with tempfile.TemporaryDirectory() as directory:
    for preset in FLAGS.presets:
      native = native_checkpoint(preset, directory)
      for fmt in FLAGS.formats:
        row = {"preset": preset, "batch": 1, "seq_len": FLAGS.seq_len,
               **_case(native, fmt, directory)}
        print(row, flush=True)
        rows.append(row)
  report = {"machine": platform.machine(), "cpus": os.cpu_count(), "rows": rows,
            "wall_s": time.time() - start}
  if FLAGS.output:
    write_report(FLAGS.output, report)


if __name__ == "__main__":
  define_flags()
  app.run(main)
