"""Per-chip memory of the reference training steps on TPU v4, v5e and v5p (issue #15 item 7).

    python -m benchmarks.memory [--runs=pkt:16x512,teacher_pretrain:16x512,...] \
        [--variants=plain,remat,bf16_probs,remat+bf16_probs] [--method=auto] [--output=memory.json]

A run is `case:<per-chip batch>x<sequence length>`, the case one stage of `benchmarks.train_step`
(IB-BERT-large teacher pretraining, MobileBERT PKT and PD from IB-BERT-large, TinyBERT-4L general
distillation from BERT-base), built by the real stage runner in bfloat16 (`--dtype`). A variant
sets the trained model's `remat` (policy nothing_saveable) and `attention_probs_dtype`.

Each step is compiled for pure data parallelism and XLA's memory analysis of the compiled step
gives the per-chip figure: arguments (parameters, optimizer state, the frozen teacher, the
batch) + outputs - donated (aliased) bytes + temporaries. Where it comes from (`--method`):

  tpu_topology  compiled for each chip's TPU topology (`jax.experimental.topologies`, abstract
                devices; needs libtpu installed, no TPU needed), the batch split over its chips;
  cpu           compiled on one CPU device for one chip's share (the per-chip batch), with
                XLA's CPU pipeline set to schedule for memory and not to merge a rematerialised
                forward back into the first (`CPU_XLA_FLAGS`). Even so, XLA CPU hoists the
                recomputation of layers in a Python loop, so loop figures with remat are upper
                bounds; under `--scan_layers` remat is honoured. XLA CPU also runs bf16 ops
                through float32 copies, and TPU layout padding is not modelled.
  auto          tpu_topology when libtpu is importable, else cpu.

Each row also has an analytic estimate (`analytic_bytes`: exact state and teacher sizes plus the
activations the backward pass keeps, counted from the configs) to compare with XLA's figure.
A config fits a chip when the per-chip total is below `FIT_FRACTION` of its HBM.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import tempfile
import time

from absl import app, flags, logging

from benchmarks import train_step
from benchmarks.reporting import write_report

FLAGS = flags.FLAGS
# The issue's target (PKT at 16 x 512 per chip) and the reference configs' own per-chip
# batches: teacher 4096 and distillation 2048 sequences of 512 on 256 chips (the paper's TPU
# v3-256), TinyBERT 256 sequences of 128 on 8 GPUs.
DEFAULT_RUNS = ["pkt:16x512", "teacher_pretrain:16x512", "pkt:8x512", "pd:16x512", "pd:8x512",
                "tinybert:32x128"]
flags.DEFINE_list("runs", DEFAULT_RUNS, "case:<per-chip batch>x<sequence length>, one per run.")
# variant: (remat the trained model's layers, bfloat16 attention probabilities)
VARIANTS = {"plain": (False, False), "remat": (True, False), "bf16_probs": (False, True),
            "remat+bf16_probs": (True, True)}
flags.DEFINE_list("variants", list(VARIANTS), f"Variants of the trained model: {list(VARIANTS)}.")
flags.DEFINE_enum("method", "auto", ["auto", "tpu_topology", "cpu"], "Where the step is compiled "
                  "(see the module docstring).")
# chip: (one host's topology for jax.experimental.topologies: name, chip config; HBM GiB)
CHIPS = {"v4": (("v4:2x2x1", "megacore"), 32), "v5e": (("v5e:2x2", "default"), 16),
         "v5p": (("v5:2x2x1", "megacore"), 95)}
flags.DEFINE_list("chips", list(CHIPS), "TPU generations to check the fit on.")
flags.DEFINE_bool("compile", True, "Compile the steps for XLA's figures; False gives the "
                  "analytic estimate alone (seconds per run instead of minutes on CPU).")

FIT_FRACTION = 0.9  # of HBM, leaving room for XLA's runtime buffers and fragmentation
REMAT_POLICY = "nothing_saveable"
# Memory-ordered scheduling and no CSE (which folds the remat's recomputation into the first
# forward once XLA CPU drops the optimization barriers). CPU compilation only.
CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false "
                 "--xla_disable_hlo_passes=cse")
GIB = 2 ** 30


def parse_run(run: str) -> tuple[str, int, int]:
  """'pkt:16x512' -> ('pkt', 16, 512)."""
  try:
    case, size = run.split(":")
    batch, length = (int(x) for x in size.split("x"))
  except ValueError:
    raise app.UsageError(f"run {run!r} is not case:<batch>x<length>, e.g. pkt:16x512") from None
  if case not in train_step.CASES:
    raise app.UsageError(f"run {run!r}: unknown case; valid: {sorted(train_step.CASES)}")
  return case, batch, length


def choose_method(requested: str) -> str:
  if requested != "auto":
    return requested
  return "tpu_topology" if importlib.util.find_spec("libtpu") else "cpu"


def variant_config(case: str, batch: int, length: int, variant: str):
  """`train_step.case_config` with the variant's remat and attention probabilities on the trained
  model."""
  remat, bf16_probs = VARIANTS[variant]
  config = train_step.case_config(case, batch, length, REMAT_POLICY if remat else "none")
  role = train_step.CASES[case][1]
  config[role].attention_probs_dtype = "bfloat16" if bf16_probs else "float32"
  return config


def teacher_checkpoint(config, cache_dir: str) -> str:
  """A random teacher of `config.teacher`, saved once per architecture under `cache_dir`."""
  import jax
  from mobilebert_jax.models import build_model
  from mobilebert_jax.pretrained import init_params, save_pretrained
  from mobilebert_jax.stages import model_config
  teacher_cfg = model_config(config.teacher, "teacher")
  key = hashlib.sha1(json.dumps(teacher_cfg.to_dict(), sort_keys=True).encode()).hexdigest()
  path = os.path.join(cache_dir, f"teacher_{key[:12]}")
  if not os.path.exists(path):
    params = init_params(build_model(teacher_cfg, "pretraining"), teacher_cfg,
                         jax.random.PRNGKey(1))
    save_pretrained(path, teacher_cfg, params, "pretraining")
  return path


def nbytes(tree) -> int:
  import jax
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def build_stage(config, workdir: str):
  """The stage runner's (trainer, built stage) for the config's one stage; nothing compiled."""
  from mobilebert_jax.stages import Trainer
  trainer = Trainer(config, workdir)
  planned = trainer.plan.stages[0]
  return trainer, trainer.build_stage(planned, planned.stage)


def lower_step(trainer, built, devices, per_chip_batch: int, length: int):
  """The built stage's train step lowered for `devices` (data parallel, `per_chip_batch`
  sequences each) from abstract inputs: the runner's shardings moved onto these devices."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from mobilebert_jax.parallel import sharding
  from mobilebert_jax.training import core

  mesh = sharding.create_mesh({}, list(devices))
  on_mesh = lambda x: NamedSharding(mesh, x.sharding.spec)
  state_sh = jax.tree.map(on_mesh, built.abstract_state)
  teacher_sh = (jax.tree.map(on_mesh, built.teacher_params)
                if built.teacher_params is not None else None)
  batch_sh = sharding.batch_sharding(mesh)
  step = core.jit_train_step(built.step_fn.__wrapped__, state_sh, teacher_sh, batch_sh)
  abstract = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  vocab = trainer.roles[trainer.plan.stages[0].role].config.vocab_size
  host_batch = train_step.synthetic_batch(vocab, np.random.default_rng(0),
                                          per_chip_batch * len(devices), length)
  teacher = (jax.tree.map(abstract, built.teacher_params, teacher_sh)
             if teacher_sh is not None else None)
  return step.lower(jax.tree.map(abstract, built.abstract_state, state_sh), teacher,
                    {k: abstract(v, batch_sh) for k, v in host_batch.items()})


def xla_bytes(compiled) -> dict[str, int]:
  """XLA's per-device memory analysis; total = arguments + outputs - aliased + temporaries."""
  memory = compiled.memory_analysis()
  got = {k: int(getattr(memory, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp", "generated_code")}
  got["total"] = got["argument"] + got["output"] - got["alias"] + got["temp"]
  return got


def layer_tensors(cfg) -> int:
  """Per token, the [B, L, width] elements one transformer layer keeps for its backward pass:
  every input of a matmul, activation or norm (counted once where shared)."""
  hidden, intra, inner = cfg.hidden_size, cfg.intra_size, cfg.intermediate_size
  count = hidden                      # the layer input (bottleneck / q, k, v projections)
  count += 3 * intra + intra          # q, k, v and the attention context
  count += 2 * intra                  # attention output before and after its norm
  count += cfg.num_ffn * (2 * inner + 2 * intra)  # per FFN: activation in/out, norm in/out
  if cfg.use_bottleneck:
    count += 2 * intra                # input bottleneck before and after its norm
    if cfg.attention_input == "shared_bottleneck":
      count += 2 * intra              # the shared query/key bottleneck
    count += hidden                   # output bottleneck before its norm
  else:
    count -= intra                    # the last FFN's output is the next layer's input
  return count


def probs_bytes(compute_bytes: int, bf16_probs: bool, dropout: bool) -> int:
  """Bytes kept per attention probability: the softmax's saved output (float32, or the one
  bfloat16 array), plus what the probs x values product keeps when it reads another array
  (the compute-dtype cast, or the dropped-out copy and its mask)."""
  kept = 2 if bf16_probs else 4
  if dropout:
    kept += compute_bytes + 1
  elif not bf16_probs and compute_bytes != 4:
    kept += compute_bytes
  return kept


def analytic_bytes(trained, teacher, strategy: str, batch: int, length: int, masked: int,
                   compute_bytes: int, remat: bool, bf16_probs: bool, dropout: bool,
                   state_bytes: int, teacher_bytes: int, param_bytes: int) -> dict[str, int]:
  """Per-chip bytes from sizes: train state + frozen teacher + gradients (exact) + the
  activations kept for the backward pass (counted).

  Each trained layer keeps layer_tensors x c + heads x L x probs_bytes per token (c: compute
  bytes); with remat only its input (H x c) and the attention maps a layer-wise loss reads,
  plus one layer's full set while it is recomputed. Embeddings keep (3E + 3H) x c per token,
  the MLM head 2H x c + 4 V per masked slot. A frozen teacher keeps what the loss reads: every
  layer's hidden state and attention map (PKT, TinyBERT's mapped layers) or its MLM logits (PD),
  plus one layer's working set. Not counted: the float32 intermediates a layer-wise loss keeps
  (PKT's attention transfer) and any float32 copies the compiler makes of bf16 tensors.
  """
  tokens = batch * length
  layerwise = strategy in ("pkt", "tinybert")
  per_layer = layer_tensors(trained) * compute_bytes + trained.num_heads * length * probs_bytes(
      compute_bytes, bf16_probs, dropout)
  if remat:
    maps = trained.num_heads * length * (2 if bf16_probs else compute_bytes) if layerwise else 0
    layers_bytes = tokens * (trained.num_layers * (trained.hidden_size * compute_bytes + maps)
                             + per_layer)
  else:
    layers_bytes = tokens * trained.num_layers * per_layer
  embeddings = tokens * (3 * trained.embedding_size + 3 * trained.hidden_size) * compute_bytes
  head = batch * masked * (2 * trained.hidden_size * compute_bytes + 4 * trained.vocab_size)
  teacher_outputs = 0
  if strategy != "pretrain":
    working = tokens * (layer_tensors(teacher) * compute_bytes + teacher.num_heads * length * 4)
    if layerwise:
      read = trained.num_layers if strategy == "tinybert" else teacher.num_layers
      teacher_outputs = working + tokens * read * (
          teacher.hidden_size + teacher.num_heads * length) * compute_bytes
    else:
      teacher_outputs = working + batch * masked * 4 * teacher.vocab_size
  parts = {"state": state_bytes, "teacher": teacher_bytes, "gradients": param_bytes,
           "activations": layers_bytes + embeddings + head + teacher_outputs}
  parts["total"] = sum(parts.values())
  return parts


def tpu_devices(chip: str):
  """Abstract (compile-only) devices of one host of `chip` (needs libtpu, not a TPU)."""
  from jax.experimental import topologies
  (name, chip_config), _ = CHIPS[chip]
  return topologies.get_topology_desc(name, "tpu", chip_config_name=chip_config,
                                      chips_per_host_bounds=(2, 2, 1), num_slices=1).devices


def fits(total: int, hbm_gib: float) -> dict:
  budget = FIT_FRACTION * hbm_gib * GIB
  return {"hbm_gib": hbm_gib, "fits": total < budget, "margin_gib": (budget - total) / GIB}


def measure(case: str, batch: int, length: int, variant: str, method: str, cache_dir: str,
            chips: list[str], compile_xla: bool = True) -> dict:
  """One run x variant: XLA's per-chip figures (per chip generation on TPU topologies, one
  CPU figure for all otherwise; none without `compile_xla`), the analytic estimate and the
  fit on each chip (by XLA's figure, else by the analytic one)."""
  import jax
  import numpy as np

  config = variant_config(case, batch, length, variant)
  strategy, role, _, _ = train_step.CASES[case]
  if strategy != "pretrain":
    config.teacher_checkpoint = teacher_checkpoint(config, cache_dir)
  if not compile_xla:
    device_sets = {}
  elif method == "tpu_topology":
    device_sets = {chip: tpu_devices(chip) for chip in chips}
  else:  # one chip's share on one CPU device
    device_sets = {"cpu": jax.devices("cpu")[:1]}
  xla, compile_s = {}, {}
  with tempfile.TemporaryDirectory() as workdir:
    trainer, built = build_stage(config, workdir)
    for name, devices in device_sets.items():
      start = time.perf_counter()
      xla[name] = xla_bytes(lower_step(trainer, built, devices, batch, length).compile())
      compile_s[name] = time.perf_counter() - start
  remat, bf16_probs = VARIANTS[variant]
  stage = trainer.plan.stages[0].stage
  analytic = analytic_bytes(
      trainer.roles[role].config, trainer.roles["teacher"].config, strategy, batch, length,
      train_step.FLAGS.predictions, np.dtype(trainer.dtype).itemsize, remat, bf16_probs,
      dropout=bool(stage.get("student_dropout", True)),  # teacher pretraining, TinyBERT: on
      state_bytes=nbytes(built.abstract_state),
      teacher_bytes=nbytes(built.teacher_params) if built.teacher_params is not None else 0,
      param_bytes=nbytes(built.abstract_state.params))
  method_name = {"tpu_topology": "xla-tpu-topology", "cpu": "xla-cpu-1-device"}[method]
  if train_step.FLAGS.scan_layers:
    method_name += "+scan_layers"
  if not compile_xla:
    method_name = "analytic"
    figure = lambda chip: analytic["total"]
  else:
    figure = lambda chip: xla[chip if method == "tpu_topology" else "cpu"]["total"]
  return {
      "case": case, "strategy": strategy, "trained": role, "batch_per_chip": batch,
      "seq_len": length, "variant": variant, "remat": REMAT_POLICY if remat else "none",
      "attention_probs_dtype": "bfloat16" if bf16_probs else "float32", "method": method_name,
      "xla_bytes": xla, "compile_s": compile_s, "analytic_bytes": analytic,
      "fits": {chip: fits(figure(chip), CHIPS[chip][1]) for chip in chips},
      "fits_analytic": {chip: fits(analytic["total"], CHIPS[chip][1]) for chip in chips},
  }


def summary_line(result: dict) -> str:
  method = result["method"]
  xla = result["xla_bytes"]
  figures = " ".join(f"{name} {v['total'] / GIB:6.2f}" for name, v in xla.items()) or "-"
  fit = " ".join(f"{chip}:{'fits' if v['fits'] else 'NO'}({v['margin_gib']:+.1f})"
                 for chip, v in result["fits"].items())
  return (f"{result['case']:16s} {result['batch_per_chip']:3d}x{result['seq_len']:<4d} "
          f"{result['variant']:17s} {method}: {figures} GiB, analytic "
          f"{result['analytic_bytes']['total'] / GIB:6.2f} GiB | {fit}")


def main(argv):
  del argv
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  logging.set_verbosity(logging.WARNING)
  method = choose_method(FLAGS.method)
  if method == "cpu":  # before jax starts its CPU backend
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_XLA_FLAGS}".strip()
  else:  # compile-only TPU devices on a host without a TPU
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  for variant in FLAGS.variants:
    if variant not in VARIANTS:
      raise app.UsageError(f"unknown variant {variant!r}; valid: {list(VARIANTS)}")
  for chip in FLAGS.chips:
    if chip not in CHIPS:
      raise app.UsageError(f"unknown chip {chip!r}; valid: {list(CHIPS)}")
  runs = [parse_run(run) for run in FLAGS.runs]
  if method == "tpu_topology" and FLAGS.compile:
    try:
      tpu_devices(FLAGS.chips[0])
    except (RuntimeError, NotImplementedError) as e:
      raise app.UsageError(f"--method=tpu_topology: no TPU topology here ({e}); install libtpu "
                           "or pass --method=cpu") from None
  print(f"method: {method} (jax {jax.__version__}, {jax.default_backend()})", flush=True)
  start = time.perf_counter()
  results = []
  with tempfile.TemporaryDirectory() as cache_dir:
    for case, batch, length in runs:
      for variant in FLAGS.variants:
        results.append(measure(case, batch, length, variant, method, cache_dir, FLAGS.chips,
                               FLAGS.compile))
        print(summary_line(results[-1]), flush=True)
  report = {
      "settings": {"runs": FLAGS.runs, "variants": FLAGS.variants, "method": method,
                   "compile": FLAGS.compile,
                   "dtype": FLAGS.dtype, "predictions": FLAGS.predictions, "tiny": FLAGS.tiny,
                   "scan_layers": FLAGS.scan_layers, "fit_fraction": FIT_FRACTION,
                   "chips": {c: {"topology": CHIPS[c][0][0], "hbm_gib": CHIPS[c][1]}
                             for c in FLAGS.chips},
                   "xla_flags": os.environ.get("XLA_FLAGS", "")},
      "machine": {"platform": platform.platform(), "backend": jax.default_backend(),
                  "jax": jax.__version__, "cpu_count": os.cpu_count()},
      "results": results, "wall_s": time.perf_counter() - start,
  }
  if FLAGS.output:
    write_report(FLAGS.output, report)


if __name__ == "__main__":
  FLAGS.set_default("dtype", "bfloat16")
  FLAGS.set_default("output", "memory.json")
  app.run(main)
