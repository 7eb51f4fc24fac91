"""bf16 step time and MFU of the four reference training steps on a GPU or TPU, in one command.

    python -m benchmarks.accelerator --output=accelerator.json     # one H100: 5-8 min (estimated)
    python -m benchmarks.accelerator --tiny --output=''            # CPU smoke run, 1-2 minutes

Each case (`--sizes`, per-device batch x sequence length) is one stage of the real stage runner
timed by `benchmarks.train_step.run_case` in `--dtype` (bfloat16): IB-BERT-large teacher
pretraining (MLM + NSP), MobileBERT PKT and PD from IB-BERT-large, TinyBERT-4L general
distillation from BERT-base. The global batch is the per-device batch x the local devices.

Per case it checks that the loss after the timed steps is finite and that the compiled step fits
the device: XLA's memory analysis (arguments + temporaries; the new state is donated into the
old one's buffers) against `memory_stats()["bytes_limit"]`, and reports the device's
`peak_bytes_in_use` (a high-water mark over the whole process). MFU is analytic FLOPs per second
over the device's bf16 peak (known for H100/H200/A100, else `--peak_tflops`), against the goals
in `GOALS`. Prints one line per case, writes the JSON report, and exits with status 1 if a loss
is not finite or a case failed. Cases not started before `--budget_s` are skipped (reported).
"""

from __future__ import annotations

import math
import os
import platform
import sys
import tempfile
import time

from absl import app, flags, logging

from benchmarks import memory, train_step
from benchmarks.reporting import write_report

FLAGS = flags.FLAGS
# Per-device batches that keep an 80 GB H100 busy: the teacher at the 32 x 128, the
# MobileBERT stages at the target 16 x 512, TinyBERT at 64 x 128.
SIZES = ["teacher_pretrain:32x128", "pkt:16x512", "pd:16x512", "tinybert:64x128"]
TINY_SIZES = ["teacher_pretrain:2x32", "pkt:2x32", "pd:2x32", "tinybert:2x32"]
flags.DEFINE_list("sizes", SIZES, "case:<per-device batch>x<sequence length> (with --tiny, "
                  f"default {TINY_SIZES}).")
flags.DEFINE_float("budget_s", 420.0, "Start no new case after this many seconds.")

# MFU goals (issue #15): the teacher step and the distillation steps in bfloat16.
GOALS = {"pretrain": 0.45, "pkt": 0.35, "pd": 0.35, "tinybert": 0.35}


def device_memory(device) -> dict:
  """bytes_limit and peak_bytes_in_use of `device`, where the backend reports them."""
  stats = device.memory_stats() or {}
  return {k: stats.get(k) for k in ("bytes_limit", "peak_bytes_in_use")}


def check(result: dict, memory_limit: int | None) -> dict:
  """The goal, fit and finiteness verdicts of one `run_case` result."""
  strategy = result["strategy"]
  needed = result["memory_bytes"]["argument"] + result["memory_bytes"]["temp"]
  verdict = {"goal_mfu": GOALS[strategy], "compiled_bytes": needed,
             "finite_loss": result["loss"] is not None and math.isfinite(result["loss"]),
             "fits": None if memory_limit is None else needed <= memory_limit}
  verdict["meets_goal"] = (None if result["mfu"] is None
                           else result["mfu"] >= verdict["goal_mfu"])
  return verdict


def run(case: str, batch: int, length: int, devices) -> dict:
  """One case through `train_step.run_case` at the per-device size; failures become a result
  with an error."""
  global_batch = batch * len(devices)
  try:
    with tempfile.TemporaryDirectory() as workdir:
      result = train_step.run_case(case, workdir, global_batch, length)
  except Exception as e:  # an OOM or a failed compile is a result, not the end of the run
    logging.exception("case %s failed", case)
    return {"case": case, "batch_per_device": batch, "seq_len": length,
            "error": f"{type(e).__name__}: {str(e)[:500]}"}
  memory_now = device_memory(devices[0])
  result.update(batch_per_device=batch, device_memory=memory_now)
  result.update(check(result, memory_now["bytes_limit"]))
  return result


def summary_line(result: dict) -> str:
  head = f"{result['case']:16s} {result['batch_per_device']:3d}x{result['seq_len']:<4d}"
  if "error" in result:
    return f"{head} FAILED {result['error'][:200]}"
  mfu = (f"MFU {100 * result['mfu']:5.1f}% (goal {100 * result['goal_mfu']:.0f}%: "
         f"{'met' if result['meets_goal'] else 'NOT met'})" if result["mfu"] is not None
         else "MFU n/a (no known peak: --peak_tflops)")
  fit = {None: "fit unknown", True: "fits", False: "DOES NOT FIT"}[result["fits"]]
  return (f"{head} {result['step_ms']:9.1f} ms/step {result['tokens_per_sec']:9.0f} tok/s "
          f"{mfu} loss {result['loss']:.4f}{'' if result['finite_loss'] else ' NOT FINITE'} "
          f"memory {result['compiled_bytes'] / memory.GIB:.2f} GiB {fit}")


def main(argv):
  del argv
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  logging.set_verbosity(logging.WARNING)
  import jax
  if FLAGS.steps < 1:
    raise app.UsageError("--steps must be at least 1 (the losses are checked after the steps)")
  sizes = FLAGS.sizes
  if FLAGS.tiny and sizes == SIZES:
    sizes = TINY_SIZES
  runs = [memory.parse_run(size) for size in sizes]
  devices = jax.local_devices()
  start = time.perf_counter()
  results = []
  for case, batch, length in runs:
    if time.perf_counter() - start > FLAGS.budget_s:
      results.append({"case": case, "batch_per_device": batch, "seq_len": length,
                      "skipped": f"time budget of {FLAGS.budget_s:.0f} s spent"})
      print(f"{case:16s} skipped: time budget spent", flush=True)
      continue
    results.append(run(case, batch, length, devices))
    print(summary_line(results[-1]), flush=True)
  failed = [r["case"] for r in results
            if "error" in r or ("finite_loss" in r and not r["finite_loss"])]
  report = {
      "settings": {"sizes": sizes, "steps": FLAGS.steps, "dtype": FLAGS.dtype,
                   "predictions": FLAGS.predictions, "tiny": FLAGS.tiny,
                   "scan_layers": FLAGS.scan_layers, "peak_tflops": FLAGS.peak_tflops,
                   "budget_s": FLAGS.budget_s, "goals": GOALS},
      "machine": {"platform": platform.platform(), "backend": jax.default_backend(),
                  "devices": [d.device_kind for d in devices], "jax": jax.__version__},
      "results": results, "failed": failed, "wall_s": time.perf_counter() - start,
  }
  if FLAGS.output:
    write_report(FLAGS.output, report)
  if failed:
    print(f"FAILED (non-finite loss or error): {failed}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  FLAGS.set_default("dtype", "bfloat16")
  FLAGS.set_default("steps", 3)
  FLAGS.set_default("output", "accelerator.json")
  app.run(main)
