"""CPU latency of the exported models (LiteRT, ONNX Runtime) next to JAX and PyTorch.

    python -m benchmarks.export_latency --models=mobilebert,mobilebert_tiny,tinybert_4l,bert_base \
        --threads=1,2 --runs=20 --output=export_latency.json
    python -m benchmarks.export_latency --quick --output=/tmp/export_latency_quick.json

Needs the export extra (pip install 'mobilebert_jax[export]') and torch + transformers. Each preset
(full size, or shrunk with `--quick`; random weights, classification head) is saved as a native
checkpoint, written as a transformers directory (`convert.export_hf`) and exported with
`mobilebert_jax.export` at batch 1 x `--seq_len` to every `--formats` entry (LiteRT float,
dynamic-range int8, calibrated full int8, ONNX; helpers shared with `benchmarks.export_parity`).

Then, for each `--threads` value, a fresh Python process times every (model, runtime) at batch 1:

  jax             the checkpoint's serving function, `jit_inference` (this project's compiler
                  options); XLA's pool sized by PJRT_NPROC, and with one thread also
                  `--xla_cpu_multi_thread_eigen=false` (`benchmarks.inference.set_threads`,
                  set before jax is imported: hence the subprocess).
  torch           transformers' *ForSequenceClassification loaded from the exported directory
                  (same weights), eager, sdpa attention, `torch.set_num_threads`.
  litert*         the LiteRT interpreter with its default XNNPACK delegate, `num_threads`.
  onnx            onnxruntime on CPU, `intra_op_num_threads` = threads, one inter-op thread.

All runtimes of a model get the same input (`Serving.example_inputs(seed=1000)`) and are
compared with JAX's logits first. After `--warmup` untimed calls each, the timed calls go round
robin, one per runtime per round, for `--runs` rounds, so a change in the machine's load hits
every runtime alike; the report gives the median (and p90, min) per case, and the process CPU
time over wall time during its calls, which shows how many threads it really kept busy.

Reported besides: the size on disk of each format (native checkpoint, safetensors, each export),
conversion times, BERT-base / model latency ratios per runtime (the paper's 5.5x is BERT-base
over MobileBERT on a Pixel 4 with TFLite), the fastest path per model, machine, runtime versions
and the load average at the start and end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging

from benchmarks import export_parity
from benchmarks.reporting import write_report

FLAGS = flags.FLAGS
RUNTIMES = ("jax", "torch", *export_parity.FORMATS)
EXPORTED = tuple(export_parity.FORMATS)
FLOAT_RUNTIMES = ("jax", "torch", "litert", "onnx")
PAPER_RATIO = 5.5  # BERT-base / MobileBERT latency, Pixel 4, TFLite (the MobileBERT paper)
VERSIONED = ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "tensorflow",
             "tensorflow-cpu", "ai-edge-litert", "onnx", "onnxruntime", "jax2onnx")


def define_flags() -> None:
  """Defines the flags (only when run as a script: the timing subprocess imports this module
  together with benchmarks.inference, whose flags share names with these)."""
  flags.DEFINE_list("models", ["mobilebert", "mobilebert_tiny", "tinybert_4l", "bert_base"],
                    "Model presets.")
  flags.DEFINE_list("threads", ["1", "2"], "Thread counts; each is timed in its own process.")
  flags.DEFINE_list("formats", list(export_parity.FORMATS), "Exports to make and time.")
  flags.DEFINE_integer("runs", 20, "Timed calls per (model, runtime, threads).")
  flags.DEFINE_integer("warmup", 3, "Untimed calls per case first.")
  flags.DEFINE_integer("seq_len", 128, "Sequence length of the exported signature.")
  flags.DEFINE_integer("calibration_batches", 8, "Random batches for int8 calibration.")
  flags.DEFINE_bool("quick", False, "Smoke run: tiny presets (`presets.tiny`), at most 5 runs, "
                    "2 calibration batches, and mobilebert,bert_base unless --models is given.")
  flags.DEFINE_string("output", "export_latency.json", "JSON report path ('' to skip).")


def dir_bytes(path: str) -> int:
  """Bytes of the file `path`, or of every file under the directory `path`."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def export_model(preset: str, directory: str, formats, seq_len: int, calibration_batches: int,
                 tiny: bool) -> dict:
  """Writes `preset`'s native checkpoint, transformers directory and exports; returns where
  they are, their sizes, conversion times and the exporters' own parity checks."""
  from mobilebert_jax import convert
  start = time.perf_counter()
  native = export_parity.native_checkpoint(preset, directory, tiny)
  hf_dir = native + "_hf"
  convert.export_hf(native, hf_dir)
  entry = {"model": preset, "native": native, "hf": hf_dir, "files": {}, "exports": {},
           "size_bytes": {"native": dir_bytes(native),
                          "safetensors": dir_bytes(os.path.join(hf_dir, "model.safetensors"))},
           "build_s": round(time.perf_counter() - start, 1)}
  for fmt in formats:
    report, seconds = export_parity.export_format(native, fmt, directory, seq_len,
                                                  calibration_batches)
    entry["files"][fmt] = report.path
    entry["size_bytes"][fmt] = dir_bytes(report.path)
    entry["exports"][fmt] = {"convert_s": round(seconds, 1), "max_abs_diff": report.max_abs_diff,
                             "notes": list(report.notes)}
    print(f"  {preset} {fmt}: {seconds:.0f}s, {entry['size_bytes'][fmt] / 1e6:.1f} MB, "
          f"max |diff| vs JAX {report.max_abs_diff:.1e}", flush=True)
  return entry


def time_plan(plan_path: str, threads: int, out_path: str) -> None:
  """The timing subprocess: times every model of the plan at `threads` threads; writes rows."""
  from benchmarks import inference
  if not inference.set_threads(threads):
    raise RuntimeError("jax was imported before the thread settings")
  import jax
  import torch
  import transformers
  jax.config.update("jax_platforms", "cpu")
  torch.set_num_threads(threads)
  torch.set_num_interop_threads(1)
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  with open(plan_path) as f:
    plan = json.load(f)
  machine = inference.machine_info()
  rows = []
  for entry in plan["models"]:
    rows.extend(_time_model(entry, plan, threads))
  with open(out_path, "w") as f:
    json.dump({"machine": dict(machine, load_average_end=list(os.getloadavg())),
               "settings": {"torch_num_threads": torch.get_num_threads(),
                            "torch_num_interop_threads": torch.get_num_interop_threads(),
                            "PJRT_NPROC": os.environ.get("PJRT_NPROC"),
                            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
               "rows": rows}, f)


def _time_model(entry: dict, plan: dict, threads: int) -> list[dict]:
  """One row per runtime for the model `entry` of the plan (see the module docstring)."""
  import jax
  import numpy as np
  import torch
  import transformers
  from mobilebert_jax.compilation import jit_inference
  from mobilebert_jax.export import serving as serving_lib
  serving = serving_lib.load_serving(entry["native"], seq_length=plan["seq_len"], batch_size=1)
  inputs = serving.example_inputs(seed=1000)
  forward, params = jit_inference(serving.fn), jax.device_put(serving.params)
  start = time.perf_counter()
  expected = np.asarray(forward(params, **inputs)["logits"])
  compile_s = time.perf_counter() - start
  torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(
      entry["hf"], attn_implementation="sdpa").eval()
  torch_inputs = {k: torch.from_numpy(v).long() for k, v in inputs.items()}
  calls = {"jax": lambda: forward(params, **inputs)["logits"].block_until_ready(),
           "torch": lambda: torch_model(**torch_inputs).logits}
  for fmt, path in entry["files"].items():
    run = export_parity.runtime_call(path, threads)
    calls[fmt] = lambda run=run: run(inputs)
  with torch.inference_mode():
    stats = _round_robin(calls, plan["warmup"], plan["runs"])
    diffs = {name: float(np.abs(np.asarray(call()) - expected).max())
             for name, call in calls.items()}
  print(f"  {threads} thread(s), {entry['model']}: " + ", ".join(
      f"{name} {stats[name]['median_ms']:.1f}" for name in calls) + " ms", flush=True)
  rows = [{"model": entry["model"], "runtime": name, "threads": threads,
           "max_abs_diff_vs_jax": diffs[name], **stats[name]} for name in calls]
  rows[0]["compile_s"] = compile_s  # the jax row: its first call, compilation included
  return rows


def _round_robin(calls: dict, warmup: int, runs: int) -> dict:
  """{name: latency statistics}: `warmup` calls each, then `runs` rounds of one timed call each;
  `cpu_per_wall` is the process's CPU time over wall time during the timed calls."""
  from benchmarks.inference import summarize
  for call in calls.values():
    for _ in range(warmup):
      call()
  times = {name: [] for name in calls}
  cpu = dict.fromkeys(calls, 0.0)
  for _ in range(runs):
    for name, call in calls.items():
      cpu_start, start = time.process_time(), time.perf_counter()
      call()
      times[name].append(time.perf_counter() - start)
      cpu[name] += time.process_time() - cpu_start
  return {name: dict(summarize(t), cpu_per_wall=cpu[name] / sum(t)) for name, t in times.items()}


def ratios(rows) -> dict:
  """{runtime: {threads: {model: BERT-base median / model median}}}."""
  median = {(r["model"], r["runtime"], r["threads"]): r["median_ms"] for r in rows}
  out = {}
  for (model, runtime, threads), ms in median.items():
    base = median.get(("bert_base", runtime, threads))
    if base is not None and model != "bert_base":
      out.setdefault(runtime, {}).setdefault(str(threads), {})[model] = base / ms
  return out


def fastest(rows) -> dict:
  """Per model: the fastest (runtime, threads) overall and among float32 paths."""
  out = {}
  for model in dict.fromkeys(r["model"] for r in rows):
    mine = [r for r in rows if r["model"] == model]
    best = {}
    for label, pool in (("any", mine), ("float", [r for r in mine
                                                   if r["runtime"] in FLOAT_RUNTIMES])):
      if pool:
        r = min(pool, key=lambda r: r["median_ms"])
        best[label] = {"runtime": r["runtime"], "threads": r["threads"],
                       "median_ms": r["median_ms"], "exported": r["runtime"] in EXPORTED}
    out[model] = best
  return out


def print_tables(rows, entries, ratio, best) -> None:
  runtimes = [name for name in RUNTIMES if any(r["runtime"] == name for r in rows)]
  median = {(r["model"], r["runtime"], r["threads"]): r for r in rows}
  header = f"{'model':<17}{'thr':>4}" + "".join(f"{name:>15}" for name in runtimes)
  print(f"\nmedian latency, ms (batch 1; p90 in brackets)\n{header}\n{'-' * len(header)}")
  for threads in sorted({r["threads"] for r in rows}):
    for entry in entries:
      cells = [median.get((entry["model"], name, threads)) for name in runtimes]
      print(f"{entry['model']:<17}{threads:>4}" + "".join(
          f"{c['median_ms']:>8.1f} ({c['p90_ms']:>4.0f})" if c else f"{'-':>15}" for c in cells))
  kinds = ["native", "safetensors", *entries[0]["files"]] if entries else []
  print("\nsize on disk, MB\n" + f"{'model':<17}" + "".join(f"{k:>15}" for k in kinds))
  for entry in entries:
    print(f"{entry['model']:<17}" + "".join(
        f"{entry['size_bytes'][k] / 1e6:>15.1f}" for k in kinds))
  for runtime in ("litert", "litert_int8", "litert_dynamic"):
    for threads, per_model in ratio.get(runtime, {}).items():
      if "mobilebert" in per_model:
        print(f"BERT-base / MobileBERT under {runtime}, {threads} thread(s): "
              f"{per_model['mobilebert']:.2f}x (paper: {PAPER_RATIO}x, Pixel 4, TFLite)")
  for model, b in best.items():
    text = "; ".join(f"{label}: {v['runtime']} @ {v['threads']} thread(s), {v['median_ms']:.1f} "
                     f"ms{' (exported)' if v['exported'] else ''}" for label, v in b.items())
    print(f"fastest for {model}: {text}")


def versions() -> dict:
  """Installed versions of the frameworks and runtimes involved."""
  from mobilebert_jax.training.operations import installed_versions
  return installed_versions(VERSIONED)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  load_start, start = list(os.getloadavg()), time.perf_counter()
  logging.set_verbosity(logging.WARNING)
  models = FLAGS.models
  if FLAGS.quick and not FLAGS["models"].present:
    models = ["mobilebert", "bert_base"]
  runs = min(FLAGS.runs, 5) if FLAGS.quick else FLAGS.runs
  calibration = min(FLAGS.calibration_batches, 2) if FLAGS.quick else FLAGS.calibration_batches
  unknown = sorted(set(FLAGS.formats) - set(export_parity.FORMATS))
  if unknown:
    raise app.UsageError(f"unknown --formats {unknown}; known: {list(export_parity.FORMATS)}")
  import jax
  jax.config.update("jax_platforms", "cpu")
  with tempfile.TemporaryDirectory() as directory:
    entries = []
    for preset in models:
      print(f"exporting {preset}{' (tiny)' if FLAGS.quick else ''}", flush=True)
      entries.append(export_model(preset, directory, FLAGS.formats, FLAGS.seq_len, calibration,
                                  FLAGS.quick))
    export_s = time.perf_counter() - start
    plan_path = os.path.join(directory, "plan.json")
    with open(plan_path, "w") as f:
      json.dump({"models": entries, "seq_len": FLAGS.seq_len, "runs": runs,
                 "warmup": FLAGS.warmup}, f)
    workers = {}
    for threads in (int(t) for t in FLAGS.threads):
      out_path = os.path.join(directory, f"rows_{threads}.json")
      code = ("from benchmarks.export_latency import time_plan; "
              f"time_plan({plan_path!r}, {threads}, {out_path!r})")
      subprocess.run([sys.executable, "-c", code], check=True)
      with open(out_path) as f:
        workers[threads] = json.load(f)
  rows = [row for worker in workers.values() for row in worker["rows"]]
  ratio, best = ratios(rows), fastest(rows)
  print_tables(rows, entries, ratio, best)
  machine = next(iter(workers.values()))["machine"] if workers else {}
  report = {
      "benchmark": "export_latency",
      "settings": {"models": list(models), "formats": list(FLAGS.formats),
                   "threads": [int(t) for t in FLAGS.threads], "runs": runs,
                   "warmup": FLAGS.warmup, "seq_len": FLAGS.seq_len, "batch_size": 1,
                   "calibration_batches": calibration, "quick": FLAGS.quick,
                   "inputs": "Serving.example_inputs(seed=1000)", "dtype": "float32"},
      "machine": dict(machine, load_average=load_start, load_average_end=list(os.getloadavg())),
      "versions": versions(),
      "timing_processes": {str(t): dict(w["settings"], load_average=w["machine"]["load_average"],
                                        load_average_end=w["machine"]["load_average_end"])
                           for t, w in workers.items()},
      "exports": [{k: v for k, v in e.items() if k not in ("native", "hf", "files")}
                  for e in entries],
      "results": rows,
      "bert_base_over_model_latency": ratio,
      "paper_ratio": {"value": PAPER_RATIO, "what": "BERT-base / MobileBERT latency, Pixel 4, "
                      "TFLite (MobileBERT paper)"},
      "fastest": best,
      "export_s": export_s,
      "wall_s": time.perf_counter() - start,
  }
  if FLAGS.output:
    write_report(FLAGS.output, report)


if __name__ == "__main__":
  define_flags()
  app.run(main)
