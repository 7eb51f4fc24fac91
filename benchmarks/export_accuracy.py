"""Dev accuracy and size on disk of each export format of a fine-tuned MobileBERT classifier.

    python -m benchmarks.export_accuracy --steps=300 --output=export_accuracy.json

Builds its own task (no network): sentences of the shipped demo corpus with marker words from
two small sets inserted; the label is the set with more markers in the sentence (1 or 2 of the
label's set, 0 or 1 of the other). Train and dev rows come from disjoint corpus sentences and are
written as GLUE SST-2 TSV files. A randomly initialised tiny MobileBERT is fine-tuned on it with
the project's trainer; the result is exported to LiteRT (float, dynamic-range int8, calibrated
full int8) and ONNX, and every format, the native JAX model included, is scored on the dev set
through `mobilebert_jax.predict`. Reports accuracy differences vs JAX in points, whether int8
stays within `--max_int8_drop` points, and the model file size of each format.
"""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
import time

from absl import app, flags

from benchmarks.reporting import write_report

FLAGS = flags.FLAGS
flags.DEFINE_string("output", "export_accuracy.json", "JSON report path ('' to skip).")
flags.DEFINE_integer("steps", 300, "Fine-tuning steps.")
flags.DEFINE_integer("train_rows", 3000, "Synthetic training rows.")
flags.DEFINE_integer("dev_rows", 500, "Synthetic dev rows.")
flags.DEFINE_integer("calibration_rows", 200, "Training sentences for int8 calibration.")
flags.DEFINE_integer("seq_len", 32, "Sequence length of training and export.")
flags.DEFINE_integer("litert_batch_size", 1, "Fixed batch size of the LiteRT exports.")
flags.DEFINE_integer("threads", 1, "Threads for the LiteRT / ONNX Runtime predictors.")
flags.DEFINE_float("max_int8_drop", 1.0, "Allowed int8 accuracy drop vs JAX, in points.")
flags.DEFINE_integer("seed", 0, "Seed for the task and the initial weights.")
flags.DEFINE_string("workdir", "", "Where to write data, checkpoints and exports (default: a "
                    "temporary directory, removed after).")

# format -> LiteRT quantize mode (None: ONNX)
FORMATS = {"litert": "none", "litert_dynamic": "dynamic", "litert_int8": "int8", "onnx": None}
VERSIONED = ("jax", "jaxlib", "flax", "numpy", "tensorflow", "tensorflow-cpu", "ai-edge-litert",
             "onnx", "onnxruntime", "jax2onnx")
MAX_WORDS = 18  # corpus words kept per sentence, so that markers survive truncation at 32


def marker_sets(vocab_path, corpus_words, rng, size: int = 5) -> tuple[list[str], list[str]]:
  """Two disjoint sets of vocab words that are also whole words of the corpus (so not word
  pieces that begin other words)."""
  vocab = set(vocab_path.read_text().split("\n"))
  words = sorted(w for w in corpus_words if w in vocab and 4 <= len(w) <= 8)
  picked = [str(w) for w in rng.choice(words, 2 * size, replace=False)]
  return sorted(picked[:size]), sorted(picked[size:])


def make_rows(sentences, markers, n: int, rng) -> list[tuple[str, int]]:
  """`n` (sentence, label) rows: the label's markers outnumber the other set's by one."""
  rows = []
  for _ in range(n):
    label = int(rng.integers(0, 2))
    words = list(sentences[int(rng.integers(len(sentences)))])
    own = int(rng.integers(1, 3))
    inserted = list(rng.choice(markers[label], own)) + list(rng.choice(markers[1 - label],
                                                                        own - 1))
    for word in inserted:
      words.insert(int(rng.integers(0, len(words) + 1)), word)
    rows.append((" ".join(words), label))
  return rows


def build_task(directory: str, vocab_path, corpus_path, rng) -> dict:
  """Writes SST-2/train.tsv and dev.tsv under `directory`; returns the rows and the markers."""
  lines = corpus_path.read_text().splitlines()
  corpus_words = {re.sub(r"[^a-z]", "", w.lower()) for line in lines for w in line.split()}
  markers = marker_sets(vocab_path, corpus_words, rng)
  taken = set(markers[0]) | set(markers[1])
  sentences = []
  for line in lines:
    words = [w for w in line.split() if re.sub(r"[^a-z]", "", w.lower()) not in taken]
    if len(words) >= 4:
      sentences.append(words[:MAX_WORDS])
  order = rng.permutation(len(sentences))
  n_dev = len(sentences) // 5
  dev_base = [sentences[i] for i in order[:n_dev]]
  train_base = [sentences[i] for i in order[n_dev:]]
  splits = {"train": make_rows(train_base, markers, FLAGS.train_rows, rng),
            "dev": make_rows(dev_base, markers, FLAGS.dev_rows, rng)}
  task_dir = os.path.join(directory, "SST-2")
  os.makedirs(task_dir, exist_ok=True)
  for split, rows in splits.items():
    with open(os.path.join(task_dir, f"{split}.tsv"), "w") as f:
      f.write("sentence\tlabel\n")
      f.writelines(f"{s}\t{l}\n" for s, l in rows)
  return {"markers": markers, "base_sentences": {"train": len(train_base), "dev": n_dev},
          **splits}


def finetune(data_dir: str, workdir: str, steps: int, seed: int) -> tuple[str, dict]:
  """Fine-tunes a random tiny MobileBERT on `data_dir`'s SST-2; returns (final dir, results)."""
  import jax
  from mobilebert_jax import default_config, save_pretrained
  from mobilebert_jax.data import sample_vocab_path
  from mobilebert_jax.models import build_model, get_preset
  from mobilebert_jax.pretrained import init_params
  from mobilebert_jax.stages import Trainer

  model_cfg = get_preset("mobilebert", tiny_variant=True, vocab_size=2972,
                         max_position_embeddings=64)
  params = init_params(build_model(model_cfg, "pretraining"), model_cfg, jax.random.PRNGKey(seed))
  init = os.path.join(workdir, "init")
  save_pretrained(init, model_cfg, params, "pretraining",
                  tokenizer_dir=str(sample_vocab_path().parent))
  c = default_config.get_config()
  c.stages = "finetune"
  c.task = "sst2"
  c.init_checkpoint = init
  c.data_dir = data_dir
  c.data.update(dict(max_seq_length=FLAGS.seq_len, batch_size=16))
  c.mesh.update(dict(data=1, fsdp=1, tensor=1))
  c.finetune = dict(strategy="finetune", model="student", num_steps=steps,
                    optimizer=default_config.optimizer(learning_rate=3e-3, warmup_steps=10))
  c.finetune.optimizer.optimizer = "adamw"
  run_dir = os.path.join(workdir, "run")
  Trainer(c, run_dir).run()
  with open(os.path.join(run_dir, "eval_results.json")) as f:
    results = json.load(f)
  return os.path.join(run_dir, "finetune", "final"), results


def export_all(native: str, directory: str, calibration: str) -> dict:
  """Exports `native` to every format as a model directory; returns {format: info}."""
  from mobilebert_jax.export import export_litert, export_onnx
  out = {}
  for fmt, quantize in FORMATS.items():
    dst = os.path.join(directory, fmt)
    start = time.perf_counter()
    if quantize is None:
      report = export_onnx(native, dst, seq_length=FLAGS.seq_len)
    else:
      report = export_litert(native, dst, seq_length=FLAGS.seq_len,
                             batch_size=FLAGS.litert_batch_size, quantize=quantize,
                             calibration=calibration if quantize == "int8" else None)
    out[fmt] = {"dir": dst, "model_file": os.path.basename(report.path),
                "size_bytes": os.path.getsize(report.path),
                "export_s": round(time.perf_counter() - start, 1),
                "max_abs_diff_vs_jax": report.max_abs_diff}
  return out


def dir_bytes(path: str) -> int:
  """Total size of the files under `path`."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def score(model: str, sentences, labels) -> dict:
  """Dev accuracy of `model` (any format `predict.load_predictor` takes) and its wall time."""
  from mobilebert_jax import predict
  start = time.perf_counter()
  predictor = predict.load_predictor(model, seq_length=FLAGS.seq_len, threads=FLAGS.threads)
  results = list(predict.predict(predictor, predict.read_examples(sentences, predictor.head)))
  correct = sum(r["label"] == str(l) for r, l in zip(results, labels))
  return {"runtime": predictor.runtime, "dev_accuracy": correct / len(labels),
          "predict_s": round(time.perf_counter() - start, 1)}


def machine() -> dict:
  """Platform, cores, load and library versions."""
  from mobilebert_jax.training.operations import installed_versions
  versions = installed_versions(VERSIONED)
  return {"platform": platform.platform(), "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
          "load_average": [round(x, 2) for x in os.getloadavg()], "versions": versions}


def print_table(rows) -> None:
  print(f"{'format':<16}{'runtime':<14}{'dev acc %':>10}{'vs jax (pts)':>14}{'size (KiB)':>12}")
  for r in rows:
    print(f"{r['format']:<16}{r['runtime']:<14}{100 * r['dev_accuracy']:>10.2f}"
          f"{r['diff_points']:>+14.2f}{r['size_bytes'] / 1024:>12.1f}")


def run(workdir: str) -> dict:
  import numpy as np
  from mobilebert_jax.data import sample_text_path, sample_vocab_path
  start = time.perf_counter()
  info = machine()
  rng = np.random.default_rng(FLAGS.seed)
  data_dir = os.path.join(workdir, "glue")
  task = build_task(data_dir, sample_vocab_path(), sample_text_path(), rng)
  calibration = os.path.join(workdir, "calibration.txt")
  with open(calibration, "w") as f:
    f.writelines(s + "\n" for s, _ in task["train"][:FLAGS.calibration_rows])

  t = time.perf_counter()
  native, results = finetune(data_dir, workdir, FLAGS.steps, FLAGS.seed)
  finetune_s = time.perf_counter() - t
  t = time.perf_counter()
  exports = export_all(native, os.path.join(workdir, "exports"), calibration)
  export_s = time.perf_counter() - t

  sentences = [s for s, _ in task["dev"]]
  labels = [l for _, l in task["dev"]]
  jax_row = {"format": "jax (native)", **score(native, sentences, labels),
             "size_bytes": dir_bytes(os.path.join(native, "params")), "size_of": "params dir"}
  trainer_acc = results["dev_accuracy"]
  jax_matches_trainer = abs(jax_row["dev_accuracy"] - trainer_acc) < 0.5 / len(labels)
  rows = [jax_row]
  for fmt, exp in exports.items():
    rows.append({"format": fmt, **score(exp["dir"], sentences, labels),
                 "size_bytes": exp["size_bytes"], "size_of": exp["model_file"],
                 "export_s": exp["export_s"], "max_abs_diff_vs_jax": exp["max_abs_diff_vs_jax"]})
  for r in rows:
    r["diff_points"] = round(100 * (r["dev_accuracy"] - jax_row["dev_accuracy"]), 2)
    r["size_ratio_vs_litert"] = round(r["size_bytes"] / exports["litert"]["size_bytes"], 3)
  int8 = next(r for r in rows if r["format"] == "litert_int8")
  int8_ok = int8["diff_points"] >= -FLAGS.max_int8_drop

  print_table(rows)
  print(f"trainer dev_accuracy {trainer_acc:.4f}; native predict {jax_row['dev_accuracy']:.4f} "
        f"({'matches' if jax_matches_trainer else 'DIFFERS'})")
  print(f"int8 LiteRT within {FLAGS.max_int8_drop} point of float JAX: {int8_ok} "
        f"({int8['diff_points']:+.2f} points)")
  return {
      "settings": {"steps": FLAGS.steps, "train_rows": FLAGS.train_rows,
                   "dev_rows": FLAGS.dev_rows, "calibration_rows": FLAGS.calibration_rows,
                   "seq_len": FLAGS.seq_len, "litert_batch_size": FLAGS.litert_batch_size,
                   "threads": FLAGS.threads, "seed": FLAGS.seed, "batch_size": 16,
                   "learning_rate": 3e-3, "model": "mobilebert tiny_variant, random init"},
      "task": {"markers": {"label_0": task["markers"][0], "label_1": task["markers"][1]},
               "base_sentences": task["base_sentences"],
               "dev_positive_fraction": float(np.mean(labels))},
      "machine": info,
      "trainer_dev_accuracy": trainer_acc,
      "native_matches_trainer": jax_matches_trainer,
      "int8_within_max_drop": int8_ok,
      "max_int8_drop_points": FLAGS.max_int8_drop,
      "results": rows,
      "finetune_s": round(finetune_s, 1),
      "export_s": round(export_s, 1),
      "load_average_end": [round(x, 2) for x in os.getloadavg()],
      "wall_s": round(time.perf_counter() - start, 1),
  }


def main(argv):
  del argv
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  if FLAGS.workdir:
    report = run(FLAGS.workdir)
  else:
    with tempfile.TemporaryDirectory() as workdir:
      report = run(workdir)
  if FLAGS.output:
    write_report(FLAGS.output, report)
  if not report["native_matches_trainer"]:
    raise SystemExit("native predictions disagree with the trainer's dev accuracy")


if __name__ == "__main__":
  app.run(main)
