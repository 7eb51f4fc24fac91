"""Train-step throughput and model FLOPs utilisation of the trainer's jitted steps.

    python -m benchmarks.train_step --cases=teacher_pretrain,pkt,pd,tinybert \
        --batch_sizes=8 --seq_lens=128 --steps=5 [--tiny] [--dtype=bfloat16] [--peak_tflops=989]

Several --batch_sizes / --seq_lens give the cost-of-scaling sweep: step time, tokens/s and the
compiled step's memory per device (XLA's memory analysis: temporaries, arguments, outputs).
--remat=none,nothing_saveable,dots_saveable compares rematerialisation policies of the trained
model's layers (memory against recompute time). --inference_compiler_options compiles the steps
with the options the project's inference forwards use, to compare with XLA's defaults.

Each case is one stage of the real stage runner (`Trainer.build_stage`): IB-BERT-large teacher
pretraining (MLM + NSP), MobileBERT PKT and PD from an IB-BERT teacher, and TinyBERT-4L general
distillation from BERT-base. Weights are random, batches synthetic (no padding); the step is the
same jitted function training runs, with its shardings over all local devices (data parallel).

FLOPs per step are counted two ways: analytically (6 x trained non-embedding params x tokens +
2 x teacher params x tokens, attention score/value products, and the vocabulary projection on
the masked slots; `mobilebert_jax.training.goodput`, the count every training log line uses) and
by XLA's cost analysis of the compiled step. MFU = analytic FLOPs per second / peak (given with
--peak_tflops, or the device kind's bf16 peak from goodput.PEAK_TFLOPS in bf16).
"""

from __future__ import annotations

import os
import platform
import time

from absl import app, flags

from benchmarks.reporting import write_report

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", ["teacher_pretrain", "pkt", "pd", "tinybert"], "Stages to time.")
flags.DEFINE_list("batch_sizes", ["8"], "Global batch sizes (a sweep when several).")
flags.DEFINE_list("seq_lens", ["128"], "Sequence lengths (a sweep when several).")
flags.DEFINE_integer("predictions", 20, "Masked positions per sequence.")
flags.DEFINE_integer("steps", 5, "Timed steps per case (after one warm-up step); 0 compiles only "
                     "(FLOPs and memory analysis, no timing: for sizes too slow to run here).")
flags.DEFINE_bool("tiny", False, "Use the tiny variants of the presets (quick smoke runs).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of one device for MFU (0: known GPUs only).")
flags.DEFINE_string("output", "train_step_benchmark.json", "JSON report path ('' to skip).")
flags.DEFINE_bool("inference_compiler_options", False, "Compile the steps with "
                  "mobilebert_jax.compilation's inference options (to compare with XLA's "
                  "defaults, which the trainer uses).")
flags.DEFINE_bool("scan_layers", False, "Run both models' layers under nn.scan "
                  "(ModelConfig.scan_layers).")
flags.DEFINE_list("remat", ["none"], "Rematerialisation of the trained model's layers: 'none' or "
                  "a ModelConfig.remat_policy (a sweep when several).")

CASES = {
    # case: (strategy, trained role, teacher preset, student preset)
    "teacher_pretrain": ("pretrain", "teacher", "ib_bert_large", "mobilebert"),
    "pkt": ("pkt", "student", "ib_bert_large", "mobilebert"),
    "pd": ("pd", "student", "ib_bert_large", "mobilebert"),
    "tinybert": ("tinybert", "student", "bert_base", "tinybert_4l"),
}


def case_config(case: str, batch: int, length: int, remat: str = "none"):
  """A trainer config with one stage, `case`, at the benchmark's sizes (and `remat` on the
  trained model's layers)."""
  import ml_collections
  from mobilebert_jax import default_config
  strategy, role, teacher, student = CASES[case]
  c = default_config.get_config()
  c.dtype = FLAGS.dtype
  c.stages = case
  # Tiny variants keep a vocabulary the shipped tokenizer fits in (the trainer checks it).
  vocab = {"vocab_size": 4096} if FLAGS.tiny else {}
  c.teacher = default_config.model_block(teacher, **vocab)
  c.student = default_config.model_block(student, **vocab)
  c.teacher.tiny = c.student.tiny = bool(FLAGS.tiny)
  if remat != "none":
    c[role].update(dict(remat=True, remat_policy=remat))
  c.teacher.scan_layers = c.student.scan_layers = bool(FLAGS.scan_layers)
  c.data.batch_size = batch
  c.data.max_seq_length = length
  c.teacher.max_position_embeddings = c.student.max_position_embeddings = max(length, 128)
  c.data.max_predictions_per_seq = FLAGS.predictions
  # The strategy's other keys (transfer factors, alpha, mapping) are its registry defaults.
  c[case] = ml_collections.ConfigDict(dict(
      strategy=strategy, model=role, num_steps=1000,
      optimizer=default_config.optimizer(1e-4, 10)))
  if strategy == "pkt":  # PKT's plan requires the release's constant base rate
    c[case].optimizer.schedule = "constant"
  # No persistent cache: the workdir is temporary, and memory analysis needs a fresh compile.
  c.compilation_cache_dir = "none"
  return c


def synthetic_batch(vocab: int, rng, b: int, l: int):
  import numpy as np
  p = FLAGS.predictions
  positions = np.sort(np.stack([rng.choice(np.arange(1, l), p, replace=False) for _ in range(b)]),
                      axis=1).astype(np.int32)
  types = np.zeros((b, l), np.int32)
  types[:, l // 2:] = 1
  return {
      "input_ids": rng.integers(5, vocab, (b, l)).astype(np.int32),
      "attention_mask": np.ones((b, l), np.int32),
      "token_type_ids": types,
      "masked_lm_positions": positions,
      "masked_lm_ids": rng.integers(5, vocab, (b, p)).astype(np.int32),
      "masked_lm_weights": np.ones((b, p), np.float32),
      "next_sentence_labels": rng.integers(0, 2, (b,)).astype(np.int32),
  }


def peak_tflops(device) -> float | None:
  """--peak_tflops, else the device's bf16 peak (goodput.PEAK_TFLOPS) when computing in bf16."""
  from mobilebert_jax.training import goodput
  if FLAGS.peak_tflops > 0:
    return FLAGS.peak_tflops
  return goodput.peak_tflops(device) if FLAGS.dtype == "bfloat16" else None


def run_case(case: str, workdir: str, batch_size: int, length: int, remat: str = "none") -> dict:
  import jax
  import numpy as np
  from mobilebert_jax.compilation import inference_compiler_options
  from mobilebert_jax.models import build_model
  from mobilebert_jax.pretrained import init_params, save_pretrained
  from mobilebert_jax.stages import Trainer, model_config
  from mobilebert_jax.training import goodput
  from mobilebert_jax.training.core import put_global, to_host

  config = case_config(case, batch_size, length, remat)
  strategy, role, _, _ = CASES[case]
  if strategy != "pretrain":  # a random teacher, loaded the way a real run loads one
    teacher_cfg = model_config(config.teacher, "teacher")
    teacher = init_params(build_model(teacher_cfg, "pretraining"), teacher_cfg,
                          jax.random.PRNGKey(1))
    config.teacher_checkpoint = os.path.join(workdir, "teacher")
    save_pretrained(config.teacher_checkpoint, teacher_cfg, teacher, "pretraining")
  trainer = Trainer(config, workdir)
  teacher_cfg = trainer.roles["teacher"].config
  planned = trainer.plan.stages[0]
  cs = trainer.build_stage(planned, planned.stage)
  model_cfg = cs.ctx.model.config
  spec = planned.spec
  params = {"model": init_params(cs.ctx.model, model_cfg, jax.random.PRNGKey(2)),
            "aux": spec.aux_init(cs.ctx, jax.random.PRNGKey(3)) if spec.aux_init else {}}
  state = cs.init_state(put_global(to_host(params), cs.shardings.params), cs.rng)
  rng = np.random.default_rng(0)
  host_batch = synthetic_batch(model_cfg.vocab_size, rng, batch_size, length)
  batch = put_global(host_batch, {k: cs.batch_sharding for k in host_batch})

  start = time.perf_counter()
  options = inference_compiler_options() if FLAGS.inference_compiler_options else {}
  compiled = cs.step_fn.lower(state, cs.teacher_params, batch).compile(
      compiler_options=options or None)
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float((cost or {}).get("flops", float("nan")))

  times, loss = [], None
  if FLAGS.steps > 0:
    state, metrics = compiled(state, cs.teacher_params, batch)
    jax.block_until_ready(metrics)
    for _ in range(FLAGS.steps):
      t = time.perf_counter()
      state, metrics = compiled(state, cs.teacher_params, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
    loss = float(np.asarray(metrics["loss"]))
  step_s = float(np.median(times)) if times else None

  tokens = batch_size * length
  teacher = (teacher_cfg, trainer.roles["teacher"].params) if strategy != "pretrain" else None
  flops = goodput.train_step_flops((model_cfg, params["model"]), teacher, batch=batch_size,
                                   length=length, masked_per_sequence=FLAGS.predictions)
  memory = compiled.memory_analysis()
  devices = jax.devices()
  peak = peak_tflops(devices[0])
  achieved = flops / step_s / 1e12 if step_s else None
  return {
      "case": case, "strategy": strategy, "trained": role, "batch_size": batch_size,
      "seq_len": length, "remat": remat, "compiler_options": options,
      # Per device: the step's live temporaries, its inputs (state, teacher, batch), outputs.
      "memory_bytes": {k: int(getattr(memory, f"{k}_size_in_bytes", 0) or 0)
                       for k in ("temp", "argument", "output", "generated_code")},
      "trained_params": int(sum(x.size for x in jax.tree.leaves(params["model"]))),
      "step_ms": 1000 * step_s if step_s else None, "step_ms_all": [1000 * t for t in times],
      "tokens_per_sec": tokens / step_s if step_s else None, "compile_s": compile_s,
      "analytic_tflop_per_step": flops / 1e12, "xla_tflop_per_step": xla_flops / 1e12,
      "achieved_tflops": achieved,
      "mfu": achieved / (peak * len(devices)) if peak and achieved else None,
      "loss": loss,
  }


def main(argv):
  del argv
  import tempfile
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import jax
  results = []
  sweep = [(case, int(b), int(l), remat) for case in FLAGS.cases for b in FLAGS.batch_sizes
           for l in FLAGS.seq_lens for remat in FLAGS.remat]
  for case, batch_size, length, remat in sweep:
    if case not in CASES:
      raise app.UsageError(f"unknown case {case!r}; valid: {sorted(CASES)}")
    with tempfile.TemporaryDirectory() as workdir:
      result = run_case(case, workdir, batch_size, length, remat)
    results.append(result)
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
    mem = result["memory_bytes"]
    timing = (f"{result['step_ms']:9.1f} ms/step {result['tokens_per_sec']:10.0f} tok/s "
              f"{result['achieved_tflops']:8.3f} TFLOP/s" if result["step_ms"] else "not run")
    print(f"{case:17s} b={batch_size:<4d} l={length:<4d} remat={remat:<8.8s} {timing} "
          f"temp {mem['temp'] / 2**20:8.1f} MiB (analytic {result['analytic_tflop_per_step']:.4f}"
          f" vs XLA {result['xla_tflop_per_step']:.4f} TFLOP/step) MFU {mfu}", flush=True)
  report = {
      "settings": {k: getattr(FLAGS, k) for k in ("cases", "batch_sizes", "seq_lens", "remat",
                                                  "predictions", "steps", "tiny", "dtype",
                                                  "peak_tflops")},
      "machine": {"platform": platform.platform(), "backend": jax.default_backend(),
                  "devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__},
      "results": results,
  }
  if FLAGS.output:
    write_report(FLAGS.output, report)


if __name__ == "__main__":
  app.run(main)
