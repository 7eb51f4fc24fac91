"""Compile time against depth: the layers as a Python loop vs under `nn.scan` (`scan_layers`).

    python -m benchmarks.compile_time --preset=ib_bert_large --depths=6,12,24 \
        --output=compile_time.json [--steps=1] [--remat]

For each depth and each `ModelConfig.scan_layers` value, the preset (full size, `num_layers`
replaced) with its pretraining head gets one jitted step: `jax.value_and_grad` of an MLM + NSP
cross-entropy with dropout on, then (`--optimizer=lamb` or `adamw`) the project's optimiser
update (`training.optimizer.create_optimizer`, as the trainer's step does; `none`: forward and
backward only). The step is lowered over abstract parameters (nothing is allocated unless
`--steps` > 0); lowering (trace to StableHLO) and XLA compilation are timed separately. Each
(depth, scan) case runs in its own fresh process, so no trace or compile cache is shared.
`--steps=N` also times N executions after one warm-up (random weights), to show what the scan
costs at run time.

With stacked parameters LAMB's per-leaf trust ratio spans all layers of a stacked leaf, so the
`lamb` figures time the right amount of work but not the reference optimiser's exact update.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

from absl import app, flags

from benchmarks.reporting import write_report

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "ib_bert_large", "Model preset (full size).")
flags.DEFINE_list("depths", ["6", "12", "24"], "num_layers values to compile.")
flags.DEFINE_list("scan", ["false", "true"], "scan_layers values to compare.")
flags.DEFINE_integer("batch_size", 8, "Batch size of the compiled step.")
flags.DEFINE_integer("seq_len", 128, "Sequence length of the compiled step.")
flags.DEFINE_integer("predictions", 20, "Masked positions per sequence.")
flags.DEFINE_bool("remat", False, "Rematerialise the layers (the config's remat_policy).")
flags.DEFINE_enum("optimizer", "none", ["none", "lamb", "adamw"],
                  "Optimiser update in the step ('none': forward + backward only).")
flags.DEFINE_integer("steps", 0, "Timed executions after a warm-up (0: compile only).")
flags.DEFINE_string("output", "compile_time.json", "JSON report path ('' to skip).")
flags.DEFINE_string("case", "", "Internal: run one case as JSON {depth, scan} and print JSON.")


def loss_fn(model, params, batch, rng):
  """Mean masked-token cross-entropy plus next-sentence cross-entropy."""
  import jax
  import jax.numpy as jnp
  out = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                    batch["token_type_ids"], masked_lm_positions=batch["masked_lm_positions"],
                    deterministic=False, rngs={"dropout": rng})
  mlm = -jnp.take_along_axis(jax.nn.log_softmax(out.prediction_logits),
                             batch["masked_lm_ids"][..., None], axis=-1).mean()
  nsp = -jnp.take_along_axis(jax.nn.log_softmax(out.seq_relationship_logits),
                             batch["next_sentence_labels"][:, None], axis=-1).mean()
  return mlm + nsp


def abstract_batch(b: int, l: int, p: int) -> dict:
  import jax
  import jax.numpy as jnp
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  return {"input_ids": spec(b, l), "attention_mask": spec(b, l), "token_type_ids": spec(b, l),
          "masked_lm_positions": spec(b, p), "masked_lm_ids": spec(b, p),
          "next_sentence_labels": spec(b)}


def run_case(depth: int, scan: bool) -> dict:
  """Lowers and compiles (and optionally runs) one step in this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mobilebert_jax.models import build_model, get_preset
  from mobilebert_jax.pretrained import abstract_params, init_params

  config = get_preset(FLAGS.preset, num_layers=depth, scan_layers=scan, remat=FLAGS.remat)
  model = build_model(config, "pretraining")
  params = abstract_params(model, config)
  batch = abstract_batch(FLAGS.batch_size, FLAGS.seq_len, FLAGS.predictions)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(model, p, b, r))
  if FLAGS.optimizer == "none":
    step = jax.jit(lambda p, _, b, r: grad_fn(p, b, r))
    opt_state = None
  else:
    import optax
    from mobilebert_jax.training.optimizer import create_optimizer
    tx, _ = create_optimizer({"optimizer": FLAGS.optimizer, "total_steps": 1000,
                              "warmup_steps": 10})

    def train_step(p, state, b, r):
      loss, grads = grad_fn(p, b, r)
      updates, state = tx.update(grads, state, p)
      return loss, optax.apply_updates(p, updates), state

    step = jax.jit(train_step, donate_argnums=(0, 1))
    opt_state = jax.eval_shape(tx.init, params)

  start = time.perf_counter()
  lowered = step.lower(params, opt_state, batch, rng)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  result = {"depth": depth, "scan_layers": scan, "lower_s": lower_s, "compile_s": compile_s,
            "total_s": lower_s + compile_s,
            "hlo_chars": len(lowered.as_text()),
            "temp_mib": getattr(memory, "temp_size_in_bytes", 0) / 2**20 if memory else None,
            "step_ms": None}
  if FLAGS.steps > 0:
    real = jax.jit(lambda key: init_params(model, config, key))(jax.random.PRNGKey(0))
    state = None if opt_state is None else jax.jit(tx.init)(real)
    gen = np.random.default_rng(0)
    data = {k: gen.integers(0, 2, v.shape).astype(np.int32) for k, v in batch.items()}
    for k in ("input_ids", "masked_lm_ids"):
      data[k] = gen.integers(5, config.vocab_size, batch[k].shape).astype(np.int32)
    data["attention_mask"][:] = 1
    data["masked_lm_positions"] = gen.integers(1, FLAGS.seq_len, batch["masked_lm_positions"].shape
                                               ).astype(np.int32)
    key = jax.random.PRNGKey(1)
    def run(real, state):
      out = jax.block_until_ready(compiled(real, state, data, key))
      return (real, state) if opt_state is None else out[1:]

    real, state = run(real, state)
    times = []
    for _ in range(FLAGS.steps):
      start = time.perf_counter()
      real, state = run(real, state)
      times.append(time.perf_counter() - start)
    result["step_ms"] = 1000 * float(np.median(times))
  return result


def run_in_subprocess(depth: int, scan: bool) -> dict:
  """Runs one case in a fresh interpreter (no shared caches) and returns its result."""
  argv = [sys.executable, "-m", "benchmarks.compile_time", f"--case={json.dumps([depth, scan])}"]
  argv += [f"--{name}={getattr(FLAGS, name)}" for name in
           ("preset", "batch_size", "seq_len", "predictions", "optimizer", "steps")]
  argv.append("--remat" if FLAGS.remat else "--noremat")
  done = subprocess.run(argv, check=True, capture_output=True, text=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  if FLAGS.case:
    depth, scan = json.loads(FLAGS.case)
    print(json.dumps(run_case(depth, scan)))
    return
  import jax
  wall = time.perf_counter()
  scans = [{"true": True, "false": False}[s.lower()] for s in FLAGS.scan]
  results = []
  print(f"{'depth':>5} {'scan':>5} {'lower s':>8} {'compile s':>10} {'total s':>8} "
        f"{'temp MiB':>9} {'step ms':>8}", flush=True)
  for depth in [int(d) for d in FLAGS.depths]:
    for scan in scans:
      r = run_in_subprocess(depth, scan)
      results.append(r)
      step = f"{r['step_ms']:8.0f}" if r["step_ms"] else f"{'-':>8}"
      print(f"{depth:5d} {str(scan):>5} {r['lower_s']:8.1f} {r['compile_s']:10.1f} "
            f"{r['total_s']:8.1f} {r['temp_mib']:9.0f} {step}", flush=True)
  report = {
      "settings": {k: getattr(FLAGS, k) for k in ("preset", "depths", "scan", "batch_size",
                                                  "seq_len", "predictions", "remat",
                                                  "optimizer", "steps")},
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpus": os.cpu_count(), "backend": jax.default_backend(),
                  "devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__},
      "results": results,
      "wall_s": time.perf_counter() - wall,
  }
  if FLAGS.output:
    write_report(FLAGS.output, report)


if __name__ == "__main__":
  app.run(main)
