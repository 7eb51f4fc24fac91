"""Inference latency: this project's jitted encoders vs transformers' PyTorch models, on CPU.

    python -m benchmarks.inference --models=mobilebert,mobilebert_tiny,bert_base \
        --batch_sizes=1,8 --seq_len=128 --threads=2 --output=inference.json

Both sides run the same weights: each preset is initialised here (random, float32), exported with
`hf.params_to_state` into a transformers `*Model` in memory, and the two outputs are compared
before anything is timed. Both compute embeddings + encoder (no pooler) and return the last hidden
state. The JAX side is AOT-compiled `jax.jit` (compile time reported apart) in up to three
variants: `tuned`, with this project's inference compiler options
(`mobilebert_jax.compilation`, what evaluation and prediction use; the row's headline figure),
`xla_defaults`, with XLA's own, and `tuned_dp<N>`, data parallel over `--cpu_devices=N` host
devices. The PyTorch side runs eager mode under `torch.inference_mode()`. Thread counts are set
before jax or torch is imported: `PJRT_NPROC` sizes XLA's CPU intra-op pool,
`torch.set_num_threads` PyTorch's.
"""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
import time

from absl import app, flags

from benchmarks.reporting import write_report

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mobilebert", "mobilebert_tiny", "bert_base"], "Presets to time.")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes.")
flags.DEFINE_integer("seq_len", 128, "Sequence length (no padding).")
flags.DEFINE_integer("warmup", 2, "Untimed calls per case after compilation.")
flags.DEFINE_integer("repeats", 20, "Most timed calls per case.")
flags.DEFINE_integer("min_repeats", 5, "Fewest timed calls per case, however slow.")
flags.DEFINE_float("budget_s", 15.0, "Timed seconds aimed at per case and framework; slow cases "
                   "get fewer than --repeats calls (never fewer than --min_repeats).")
flags.DEFINE_integer("threads", None, "CPU threads for both frameworks (default: usable cores).")
flags.DEFINE_enum("attn_implementation", "sdpa", ["sdpa", "eager"], "transformers attention.")
flags.DEFINE_float("atol", 1e-3, "Largest allowed |jax - torch| on the last hidden state.")
flags.DEFINE_integer("seed", 0, "Seed for the weights and the token ids.")
flags.DEFINE_string("output", "inference_benchmark.json", "JSON report path ('' to skip).")
flags.DEFINE_integer("peak_size", 2048, "Size of the square matmul timed in both frameworks as "
                     "the machine's practical peak (0 to skip).")
flags.DEFINE_integer("cpu_devices", 1, "Host CPU devices for jax (jax_num_cpu_devices); above 1 "
                     "the JAX side also runs data parallel over them (batches they divide).")


def set_threads(threads: int) -> bool:
  """Sets the thread env for XLA and OpenMP/MKL; returns False if jax was already imported."""
  os.environ["PJRT_NPROC"] = str(threads)
  if threads == 1:
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in xla_flags:
      os.environ["XLA_FLAGS"] = (xla_flags + " --xla_cpu_multi_thread_eigen=false").strip()
  for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[name] = str(threads)
  return "jax" not in sys.modules and "jaxlib" not in sys.modules


def machine_info() -> dict:
  """Processor, core counts, load and library versions."""
  import flax
  import jax
  import numpy as np
  import torch
  import transformers
  model_name = None
  try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    for line in lscpu.splitlines():
      if line.startswith("Model name:"):
        model_name = line.split(":", 1)[1].strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return {
      "platform": platform.platform(),
      "processor": platform.processor(),
      "cpu_model": model_name,
      "cpu_count": os.cpu_count(),
      "usable_cpus": len(os.sched_getaffinity(0)),
      "load_average": list(os.getloadavg()),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      "flax": flax.__version__,
      "numpy": np.__version__,
      "torch": torch.__version__,
      "transformers": transformers.__version__,
  }


def time_calls(fn, warmup: int, repeats: int, min_repeats: int, budget_s: float) -> dict:
  """Calls `fn` `warmup` times untimed, then times up to `repeats` calls (fewer when slow)."""
  warm = []
  for _ in range(warmup):
    start = time.perf_counter()
    fn()
    warm.append(time.perf_counter() - start)
  n = repeats
  if warm and min(warm) > 0:
    n = int(max(min(min_repeats, repeats), min(repeats, budget_s // min(warm))))
  times = []
  for _ in range(n):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return summarize(times)


def summarize(times_s) -> dict:
  """Median / p90 / mean / min latency in ms over the timed calls."""
  import numpy as np
  ms = np.asarray(times_s) * 1e3
  return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
          "mean_ms": float(ms.mean()), "min_ms": float(ms.min()), "n": int(ms.size),
          "times_ms": [round(float(t), 3) for t in ms]}


def build_pair(preset: str, attn_implementation: str, seed: int):
  """(config, jax model, params, torch model) with identical float32 weights."""
  import jax
  import torch
  import transformers
  from mobilebert_jax.interop import hf
  from mobilebert_jax.models import Backbone, build_model, get_preset
  from mobilebert_jax.pretrained import init_params

  config = get_preset(preset)
  model = build_model(config, "base")
  # Eager init: jitting it takes far longer to compile (40s for MobileBERT) than to run.
  params = init_params(model, config, jax.random.PRNGKey(seed))
  # Neither side runs the pooler: the jax module is built without it, the torch model too.
  state = hf.params_to_state(params, config, "base")
  state = {k: torch.from_numpy(v.copy()) for k, v in state.items()
           if not k.startswith("pooler.")}
  jax_model = Backbone(config, add_pooling_layer=False)
  params = {k: v for k, v in params.items() if k != "pooler"}
  hf_config = hf.config_to_hf(config, "base")
  hf_config.pop("architectures")
  cls_prefix = "MobileBert" if config.model_type == "mobilebert" else "Bert"
  config_cls = getattr(transformers, cls_prefix + "Config")
  model_cls = getattr(transformers, cls_prefix + "Model")
  torch_config = config_cls(**hf_config, attn_implementation=attn_implementation)
  torch_model = model_cls(torch_config, add_pooling_layer=False)
  missing, unexpected = torch_model.load_state_dict(state, strict=False)
  missing = [k for k in missing if not k.endswith("position_ids")]
  if missing or unexpected:
    raise RuntimeError(f"{preset}: torch state dict mismatch: missing={missing} "
                       f"unexpected={unexpected}")
  torch_model.eval()
  return config, jax_model, params, torch_model


def bench_model(preset: str, batch_sizes, args) -> list[dict]:
  """Times one preset at every batch size; returns one row per batch size."""
  import jax
  import numpy as np
  import torch

  t0 = time.perf_counter()
  config, model, params, torch_model = build_pair(preset, args["attn_implementation"],
                                                  args["seed"])
  print(f"{preset}: built both models in {time.perf_counter() - t0:.1f}s "
        f"(torch attention: {torch_model.config._attn_implementation})", flush=True)

  def forward(params, ids, mask, types):
    return model.apply({"params": params}, ids, attention_mask=mask,
                       token_type_ids=types).last_hidden_state

  rows = []
  rng = np.random.default_rng(args["seed"])
  for batch in batch_sizes:
    shape = (batch, args["seq_len"])
    ids = rng.integers(1, config.vocab_size, shape).astype(np.int32)
    mask = np.ones(shape, np.int32)
    types = np.zeros(shape, np.int32)
    types[:, args["seq_len"] // 2:] = 1

    variants = jax_variants(forward, params, (ids, mask, types), args["cpu_devices"])
    torch_inputs = dict(input_ids=torch.from_numpy(ids).long(),
                        attention_mask=torch.from_numpy(mask).long(),
                        token_type_ids=torch.from_numpy(types).long())

    def run_torch():
      return torch_model(**torch_inputs).last_hidden_state

    timing = dict(warmup=args["warmup"], repeats=args["repeats"],
                  min_repeats=args["min_repeats"], budget_s=args["budget_s"])
    with torch.inference_mode():
      torch_out = run_torch().numpy()
      max_diff = 0.0
      for name, (run, _, _) in variants.items():
        diff = float(np.abs(np.asarray(run()) - torch_out).max())
        if not diff < args["atol"]:
          raise RuntimeError(f"{preset} batch {batch} ({name}): jax and torch outputs differ by "
                             f"{diff:.3g} (> {args['atol']}); refusing to time different "
                             "computations")
        max_diff = max(max_diff, diff)
      jax_stats = {}
      gflop = variants["tuned"][2] / 1e9  # the whole batch's forward, one device
      for name, (run, compile_s, _) in variants.items():
        stats = time_calls(run, **timing)
        jax_stats[name] = dict(stats, compile_s=compile_s,
                               throughput_seq_s=batch / stats["median_ms"] * 1e3,
                               gflop_per_s=gflop / stats["median_ms"] * 1e3)
        gc.collect()
      torch_stats = time_calls(run_torch, **timing)
    row = {
        "model": preset, "batch_size": batch, "seq_len": args["seq_len"],
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "gflop": gflop,
        "max_abs_diff": max_diff, "output_max_abs": float(np.abs(torch_out).max()),
        "max_rel_diff": max_diff / max(float(np.abs(torch_out).max()), 1e-30),
        "jax": jax_stats["tuned"],
        "jax_variants": jax_stats,
        "torch": dict(torch_stats, throughput_seq_s=batch / torch_stats["median_ms"] * 1e3,
                      gflop_per_s=gflop / torch_stats["median_ms"] * 1e3,
                      attn_implementation=torch_model.config._attn_implementation),
        "speedup_torch_over_jax": torch_stats["median_ms"] / jax_stats["tuned"]["median_ms"],
        "speedup_torch_over_jax_variants": {
            name: torch_stats["median_ms"] / stats["median_ms"]
            for name, stats in jax_stats.items()},
    }
    jax_text = ", ".join(f"{name} {stats['median_ms']:.1f} ms (n={stats['n']}, compile "
                         f"{stats['compile_s']:.1f}s)" for name, stats in jax_stats.items())
    print(f"  batch {batch}: jax {jax_text}; torch {torch_stats['median_ms']:.1f} ms "
          f"(n={torch_stats['n']}), max |diff| {max_diff:.1e}", flush=True)
    rows.append(row)
  return rows


def jax_variants(forward, params, inputs, cpu_devices: int) -> dict:
  """{variant: (call returning the output, compile seconds, XLA's FLOP count)}: `tuned`
  (this project's inference compiler options), `xla_defaults`, and `tuned_dp<N>` (batch split
  over N host devices) when N > 1 divides the batch."""
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from mobilebert_jax.compilation import inference_compiler_options

  placements = {"tuned": None, "xla_defaults": None}
  batch = inputs[0].shape[0]
  if cpu_devices > 1 and batch % cpu_devices == 0:
    mesh = Mesh(np.array(jax.devices()[:cpu_devices]), ("data",))
    placements[f"tuned_dp{cpu_devices}"] = (NamedSharding(mesh, PartitionSpec()),
                                             NamedSharding(mesh, PartitionSpec("data")))
  variants = {}
  for name, placement in placements.items():
    options = {} if name == "xla_defaults" else inference_compiler_options()
    if placement is None:
      p, xs = params, [jax.device_put(x) for x in inputs]
      fn = jax.jit(forward)
    else:
      p = jax.device_put(params, placement[0])
      xs = [jax.device_put(x, placement[1]) for x in inputs]
      fn = jax.jit(forward, out_shardings=placement[1])
    start = time.perf_counter()
    compiled = fn.lower(p, *xs).compile(compiler_options=options or None)
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    variants[name] = (
        lambda compiled=compiled, p=p, xs=xs: compiled(p, *xs).block_until_ready(), compile_s,
        float((cost or {}).get("flops", float("nan"))))
  return variants


def matmul_peak(size: int, args) -> dict:
  """GFLOP/s of one float32 [size, size] x [size, size] product in each framework (the
  practical peak this machine's threads reach)."""
  import jax
  import numpy as np
  import torch
  a = np.random.default_rng(0).standard_normal((size, size), np.float32)
  x, t = jax.device_put(a), torch.from_numpy(a)
  product = jax.jit(lambda m: m @ m)
  timing = dict(warmup=2, repeats=args["repeats"], min_repeats=args["min_repeats"],
                budget_s=args["budget_s"] / 3)
  jax_ms = time_calls(lambda: product(x).block_until_ready(), **timing)["median_ms"]
  with torch.inference_mode():
    torch_ms = time_calls(lambda: torch.mm(t, t), **timing)["median_ms"]
  flop = 2.0 * size ** 3
  return {"size": size, "jax_gflop_per_s": flop / jax_ms / 1e6,
          "torch_gflop_per_s": flop / torch_ms / 1e6}


def bert_base_ratios(rows) -> dict:
  """BERT-base latency / each model's latency, per framework and batch (the paper's 5.5x)."""
  base = {r["batch_size"]: r for r in rows if r["model"] == "bert_base"}
  ratios = {"jax": {}, "torch": {}}
  for r in rows:
    ref = base.get(r["batch_size"])
    if ref is None or r["model"] == "bert_base":
      continue
    for fw in ratios:
      ratios[fw].setdefault(r["model"], {})[str(r["batch_size"])] = (
          ref[fw]["median_ms"] / r[fw]["median_ms"])
  return ratios


def print_table(rows, ratios) -> None:
  header = (f"{'model':<16}{'batch':>6}  {'jax variant':<14}{'jax ms':>9}{'p90':>9}{'torch ms':>10}"
            f"{'p90':>9}{'torch/jax':>10}{'jax GF/s':>10}{'torch GF/s':>11}")
  print(header)
  print("-" * len(header))
  for r in rows:
    t = r["torch"]
    for name, j in r["jax_variants"].items():
      print(f"{r['model']:<16}{r['batch_size']:>6}  {name:<14}{j['median_ms']:>9.1f}"
            f"{j['p90_ms']:>9.1f}{t['median_ms']:>10.1f}{t['p90_ms']:>9.1f}"
            f"{r['speedup_torch_over_jax_variants'][name]:>9.2f}x{j['gflop_per_s']:>10.1f}"
            f"{t['gflop_per_s']:>11.1f}")
  for fw, per_model in ratios.items():
    for name, per_batch in per_model.items():
      text = ", ".join(f"batch {b}: {v:.2f}x" for b, v in per_batch.items())
      print(f"bert_base / {name} latency ({fw}{', tuned' if fw == 'jax' else ''}): {text}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  threads = FLAGS.threads or len(os.sched_getaffinity(0))
  xla_threads_applied = set_threads(threads)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import jax
  import torch
  import transformers
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
  torch.set_num_threads(threads)
  transformers.logging.set_verbosity_error()
  from mobilebert_jax.compilation import inference_compiler_options
  if not xla_threads_applied:
    print("warning: jax was imported before the thread settings; XLA uses its default pool")

  batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  args = dict(seq_len=FLAGS.seq_len, warmup=FLAGS.warmup, repeats=FLAGS.repeats,
              min_repeats=FLAGS.min_repeats, budget_s=FLAGS.budget_s, seed=FLAGS.seed,
              attn_implementation=FLAGS.attn_implementation, atol=FLAGS.atol,
              cpu_devices=FLAGS.cpu_devices)
  start = time.perf_counter()
  machine = machine_info()
  rows = []
  for preset in FLAGS.models:
    rows.extend(bench_model(preset, batch_sizes, args))
  peak = matmul_peak(FLAGS.peak_size, args) if FLAGS.peak_size else None
  ratios = bert_base_ratios(rows)
  print()
  print_table(rows, ratios)
  if peak:
    print(f"float32 {peak['size']}^3 matmul: jax {peak['jax_gflop_per_s']:.0f} GFLOP/s, torch "
          f"{peak['torch_gflop_per_s']:.0f} GFLOP/s")
  report = {
      "benchmark": "inference",
      "settings": dict(args, models=list(FLAGS.models), batch_sizes=batch_sizes,
                       dtype="float32", padding="none (all-ones attention_mask)"),
      "threads": {
          "requested": threads,
          "torch_num_threads": torch.get_num_threads(),
          "torch_num_interop_threads": torch.get_num_interop_threads(),
          "PJRT_NPROC": os.environ.get("PJRT_NPROC"),
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
          "xla_threads_applied": xla_threads_applied,
      },
      "machine": dict(machine, load_average_end=list(os.getloadavg())),
      "jax_compiler_options": inference_compiler_options(),
      "matmul_peak": peak,
      "results": rows,
      "bert_base_over_model_latency": ratios,
      "wall_s": time.perf_counter() - start,
  }
  if FLAGS.output:
    write_report(FLAGS.output, report)


if __name__ == "__main__":
  app.run(main)
