"""Predictions of a trained or exported model on text, as JSON lines.

  python -m mobilebert_jax.predict MODEL [--input=FILE|-] [--output=FILE|-] [--batch-size=N]
      [--seq-length=N] [--threads=N] [--tokenizer=DIR] [--max-answer-length=N]

MODEL is a native checkpoint directory (run with JAX), an exported model directory
(`convert export-litert|export-onnx NATIVE_DIR OUT_DIR`: serving.json beside model.tflite or
model.onnx, run in LiteRT or ONNX Runtime), or a bare .tflite / .onnx file (its tokenizer from
--tokenizer or the files beside it; labels LABEL_i unless a serving.json names them).
Every format is tokenised with the model's own vocabulary, so the three give the same answers.

Input, one example per line (blank lines skipped):
  text                      or   {"text": "..."}
  text<TAB>second text      or   {"text": "...", "text_pair": "..."}   (sentence pairs)
  question<TAB>context      or   {"question": "...", "context": "..."} (question answering)
  words split at spaces     or   {"tokens": ["...", ...]}              (tagging)

Output, one JSON object per example:
  classification        {"label": "entailment", "score": 0.93, "scores": {"entailment": ...}}
                        ({"score": x} for a one-output regression head)
  question_answering    {"answer": "...", "start": 17, "end": 29, "score": 7.1}
                        (character offsets in the context; long contexts read in windows)
  token_classification  {"tokens": [...], "tags": [...],
                         "entities": [{"type": "PER", "start": 0, "end": 2, "text": "..."}]}
Inputs longer than the model's sequence length are truncated, and say so ("truncated": true).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from etils import epath

from mobilebert_jax import model_files
from mobilebert_jax.export import serving as serving_lib
from mobilebert_jax.export.serving import ExportError, SERVING_INPUTS

log = logging.getLogger(__name__)

PREDICTABLE_HEADS = model_files.PREDICT_HEADS
MODEL_FILES = {".tflite": "LiteRT", ".onnx": "ONNX"}
DEFAULT_BATCH_SIZE = 8


class PredictError(ExportError):
  """A model or input that cannot be predicted on (names the file, line or option)."""


@dataclasses.dataclass
class Predictor:
  """A model ready to predict: `run(arrays) -> outputs` on [batch_size, seq_length] int32
  inputs, its head, label names and tokenizer. `batch_size` None takes any batch."""
  source: str
  runtime: str
  head: str
  seq_length: int
  batch_size: int | None
  labels: list[str] | None
  tokenizer: Any
  run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

  def __call__(self, arrays: dict[str, np.ndarray], chunk: int = DEFAULT_BATCH_SIZE
               ) -> dict[str, np.ndarray]:
    """The outputs for every row of `arrays`, fed in batches of the model's fixed batch size
    (or `chunk`); the last batch is filled with copies of its first row, dropped after."""
    n = len(arrays["input_ids"])
    size = self.batch_size or chunk
    outputs = []
    for start in range(0, n, size):
      rows = np.arange(start, start + size)
      rows = np.where(rows < n, rows, start)
      out = self.run({k: np.ascontiguousarray(arrays[k][rows], np.int32) for k in SERVING_INPUTS})
      keep = min(size, n - start)
      outputs.append({k: np.asarray(v, np.float32)[:keep] for k, v in out.items()})
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


# ---------------------------------------------------------------------------------------------
# Loading a model in its runtime.

def load_predictor(model: str, *, seq_length: int | None = None, threads: int | None = None,
                   tokenizer: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE
                   ) -> Predictor:
  """A `Predictor` for a native directory (JAX), an exported model directory or a .tflite /
  .onnx file (LiteRT / ONNX Runtime; see the module docstring)."""
  path = epath.Path(model)
  if not path.exists():
    raise PredictError(f"{model}: no such model file or directory")
  from mobilebert_jax import pretrained
  if path.is_dir() and pretrained.is_native_dir(model):
    return _native_predictor(model, seq_length, tokenizer, batch_size)
  if path.is_dir():
    description = _read_description(path / serving_lib.SERVING_FILE, model)
    model_file = str(path / description["model_file"])
    return _exported_predictor(model_file, description, seq_length, threads, tokenizer or model)
  suffix = os.path.splitext(model)[1]
  if suffix not in MODEL_FILES:
    raise PredictError(f"{model}: not a model (expected a native checkpoint directory, an "
                       f"exported model directory with {serving_lib.SERVING_FILE}, or a file "
                       f"ending in {' or '.join(MODEL_FILES)})")
  beside = path.parent / serving_lib.SERVING_FILE
  description = None
  if beside.exists():
    description = _read_description(beside, str(beside.parent))
    if description.get("model_file") != path.name:
      description = None
  return _exported_predictor(model, description, seq_length, threads,
                             tokenizer or str(path.parent))


def _read_description(path: epath.Path, model: str) -> dict:
  if not path.exists():
    raise PredictError(f"{model}: a directory without {serving_lib.SERVING_FILE} or "
                       "mobilebert_jax.json: neither an exported nor a native model")
  try:
    description = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise PredictError(f"{path}: not valid JSON ({e})") from e
  if description.get("format") != serving_lib.SERVING_FORMAT:
    raise PredictError(f"{path}: format {description.get('format')!r} is not "
                       f"{serving_lib.SERVING_FORMAT!r}")
  return description


def _tokenizer(directory: str, model: str):
  from mobilebert_jax.data import tokenizer as tokenization
  try:
    return tokenization.load_tokenizer(directory)
  except (FileNotFoundError, ValueError) as e:
    raise PredictError(f"{model}: no usable tokenizer in {directory} ({e}); pass "
                       "--tokenizer=DIR with the model's vocab.txt") from e


def _check_head(head: str, model: str) -> None:
  if head not in PREDICTABLE_HEADS:
    raise PredictError(f"{model}: has a {head!r} head; predict handles "
                       f"{', '.join(PREDICTABLE_HEADS)}")


def _native_predictor(model: str, seq_length: int | None, tokenizer: str | None,
                      batch_size: int) -> Predictor:
  import jax
  from mobilebert_jax import pretrained
  serving = serving_lib.load_serving(model, None, seq_length, None)
  _check_head(serving.head, model)
  meta = pretrained.read_native_meta(model)
  labels = (model_files.label_names(meta, serving.config.num_labels)
            if serving.head in pretrained.LABELLED_HEADS else None)
  forward = jax.jit(serving.fn)
  params = jax.device_put(serving.params)

  def run(arrays):
    return jax.device_get(forward(params, *(arrays[k] for k in SERVING_INPUTS)))

  return Predictor(model, "JAX", serving.head, serving.seq_length, batch_size, labels,
                   _tokenizer(tokenizer or model, model), run)


def _exported_predictor(model_file: str, description: dict | None, seq_length: int | None,
                        threads: int | None, tokenizer: str) -> Predictor:
  suffix = os.path.splitext(model_file)[1]
  runtime = MODEL_FILES.get(suffix)
  if runtime == "LiteRT":
    from mobilebert_jax.export.litert import litert_runner
    serving_lib.require("ai_edge_litert", "ai-edge-litert", "predict on a LiteRT model",
                        load=False)
    runner = litert_runner(model_file, threads)
  elif runtime == "ONNX":
    from mobilebert_jax.export.onnx import onnx_runner
    serving_lib.require("onnxruntime", "onnxruntime", "predict on an ONNX model", load=False)
    runner = onnx_runner(model_file, threads)
  else:
    raise PredictError(f"{model_file}: unknown model file type {suffix!r}")
  batch, length = runner.input_shape
  if seq_length is not None and seq_length != length:
    raise PredictError(f"{model_file}: the model was exported for sequence length {length}; "
                       f"--seq-length={seq_length} needs a new export with --seq-length")
  sample = runner(**_zeros(batch or 1, length))  # output names and shapes
  head = description["head"] if description else _head_from_outputs(sample)
  _check_head(head, model_file)
  labels = (model_files.label_names(description or {}, sample["logits"].shape[-1])
            if head in ("classification", "token_classification") else None)
  return Predictor(model_file, runtime, head, int(length), batch, labels,
                   _tokenizer(tokenizer, model_file), lambda arrays: runner(**arrays))


def _zeros(batch: int, length: int) -> dict[str, np.ndarray]:
  ids = np.zeros((batch, length), np.int32)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": ids}


def _head_from_outputs(outputs: dict[str, np.ndarray]) -> str:
  """The head of a bare exported file, from its outputs on a sample batch
  (serving.HEAD_OUTPUTS)."""
  if "start_logits" in outputs:
    return "question_answering"
  if "logits" in outputs:
    return "token_classification" if outputs["logits"].ndim == 3 else "classification"
  return "base" if "last_hidden_state" in outputs else "pretraining"


# ---------------------------------------------------------------------------------------------
# Reading examples and writing predictions.

@dataclasses.dataclass(frozen=True)
class Example:
  line: int
  text: str = ""
  text_pair: str | None = None
  tokens: tuple[str, ...] = ()


def read_examples(lines: Iterable[str], head: str, where: str = "<input>") -> list[Example]:
  """Parses input lines (plain or JSON, see the module docstring) for `head`; errors name the
  line."""
  examples = []
  for number, raw in enumerate(lines, 1):
    line = raw.rstrip("\n")
    if not line.strip():
      continue
    at = f"{where}:{number}"
    if line.lstrip().startswith("{"):
      try:
        item = json.loads(line)
      except json.JSONDecodeError as e:
        raise PredictError(f"{at}: not valid JSON ({e})") from e
      if not isinstance(item, dict):
        raise PredictError(f"{at}: a JSON line must be an object")
      first = item.get("question", item.get("text"))
      second = item.get("context", item.get("text_pair"))
      tokens = item.get("tokens")
      if tokens is not None:
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
          raise PredictError(f"{at}: \"tokens\" must be a list of strings")
        first = " ".join(tokens)
      if not isinstance(first, str):
        raise PredictError(f"{at}: needs \"text\" (or \"question\" and \"context\", or "
                           "\"tokens\")")
    else:
      first, _, second = line.partition("\t")
      second = second if "\t" in line else None
      tokens = None
    if head == "question_answering" and not second:
      raise PredictError(f"{at}: question answering needs question<TAB>context (or JSON "
                         "{\"question\": ..., \"context\": ...})")
    words = tuple(tokens) if tokens is not None else tuple(first.split())
    if head == "token_classification" and not words:
      raise PredictError(f"{at}: no words to tag")
    examples.append(Example(number, first, second, words))
  return examples


def predict(predictor: Predictor, examples: Sequence[Example], max_answer_length: int = 30
            ) -> Iterator[dict]:
  """One JSON-ready dict per example (see the module docstring)."""
  if not examples:
    return iter(())
  decode = {"classification": _classify, "question_answering": _answer,
            "token_classification": _tag}[predictor.head]
  return decode(predictor, examples, max_answer_length)


def _classify(predictor: Predictor, examples, _) -> Iterator[dict]:
  from mobilebert_jax.data.tokenizer import encode_pairs
  seconds = [e.text_pair for e in examples]
  if any(s is not None for s in seconds) and any(s is None for s in seconds):
    lines = [e.line for e in examples if e.text_pair is None][:3]
    raise PredictError(f"mixed single texts and pairs (single texts on lines {lines}); give "
                       "every line a second text or none")
  arrays = encode_pairs(predictor.tokenizer, [e.text for e in examples], seconds,
                        predictor.seq_length)
  full = _untruncated_lengths(predictor.tokenizer, examples)
  logits = predictor(arrays)["logits"]
  for i, row in enumerate(logits):
    if row.shape[-1] == 1:
      result = {"score": round(float(row[0]), 6)}
    else:
      probs = np.exp(row - row.max())
      probs /= probs.sum()
      best = int(np.argmax(probs))
      result = {"label": predictor.labels[best], "score": round(float(probs[best]), 6),
                "scores": {name: round(float(p), 6) for name, p in zip(predictor.labels, probs)}}
    if full[i] > predictor.seq_length:
      result["truncated"] = True
    yield result


def _untruncated_lengths(tokenizer, examples) -> list[int]:
  encoded = tokenizer([e.text for e in examples],
                      [e.text_pair for e in examples] if examples[0].text_pair is not None
                      else None, truncation=False)
  return [len(ids) for ids in encoded["input_ids"]]


def _answer(predictor: Predictor, examples, max_answer_length: int) -> Iterator[dict]:
  from mobilebert_jax.downstream import squad
  length = predictor.seq_length
  questions = [squad.SquadExample(qid=str(i), question=e.text, context=e.text_pair)
               for i, e in enumerate(examples)]
  features = squad.make_features(questions, predictor.tokenizer, max_seq_length=length,
                                 doc_stride=max(1, length // 2),
                                 max_query_length=max(1, length // 4))
  out = predictor(features.inputs())
  spans = squad.best_spans(features, out["start_logits"], out["end_logits"],
                           max_answer_length=max_answer_length)
  for i in range(len(examples)):
    span = spans[str(i)]
    if span.start < 0:
      yield {"answer": "", "start": -1, "end": -1, "score": None}
    else:
      yield {"answer": span.text, "start": span.start, "end": span.end,
             "score": round(span.score, 6)}


def _tag(predictor: Predictor, examples, _) -> Iterator[dict]:
  from mobilebert_jax.downstream import metrics, tagging
  labels = predictor.labels
  filler = "O" if "O" in labels else labels[0]
  sentences = [tagging.TaggedSentence(e.tokens, (filler,) * len(e.tokens)) for e in examples]
  arrays = tagging.encode_tagged(sentences, predictor.tokenizer, labels, predictor.seq_length)
  logits = predictor(arrays)["logits"]
  tags = tagging.decode_word_tags(logits, arrays["word_positions"], sentences, labels)
  for i, (example, sentence_tags) in enumerate(zip(examples, tags)):
    words = list(example.tokens)
    entities = sorted(metrics.bio_spans(sentence_tags), key=lambda s: (s[1], s[2]))
    result = {"tokens": words, "tags": sentence_tags,
              "entities": [{"type": kind, "start": start, "end": end,
                            "text": " ".join(words[start:end])}
                           for kind, start, end in entities]}
    if int((arrays["word_positions"][i] >= 0).sum()) < len(words):
      result["truncated"] = True
    yield result


# ---------------------------------------------------------------------------------------------
# The command line.

def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mobilebert_jax.predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("model", help="native checkpoint dir, exported model dir, .tflite or .onnx")
  parser.add_argument("--input", default="-", help="input file, or - for stdin (default)")
  parser.add_argument("--output", default="-", help="output file, or - for stdout (default)")
  parser.add_argument("--seq-length", type=int, default=None,
                      help="native models: sequence length (default min(128, positions)); "
                      "exported models are fixed at their export's length")
  parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                      help="native models and dynamic-batch ONNX: examples per forward pass")
  parser.add_argument("--threads", type=int, default=None,
                      help="LiteRT / ONNX Runtime CPU threads (default: the runtime's)")
  parser.add_argument("--tokenizer", default=None,
                      help="directory or vocab.txt with the model's vocabulary (default: the "
                      "model's directory)")
  parser.add_argument("--max-answer-length", type=int, default=30,
                      help="question answering: longest answer in word pieces")
  args = parser.parse_args(argv)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  if args.batch_size < 1:
    parser.error(f"--batch-size must be positive, got {args.batch_size}")
  try:
    predictor = load_predictor(args.model, seq_length=args.seq_length, threads=args.threads,
                               tokenizer=args.tokenizer, batch_size=args.batch_size)
    if args.input == "-":
      examples = read_examples(sys.stdin, predictor.head, "<stdin>")
    else:
      if not epath.Path(args.input).is_file():
        raise PredictError(f"--input={args.input}: no such file")
      with epath.Path(args.input).open("r") as f:
        examples = read_examples(f, predictor.head, args.input)
    results = [json.dumps(r, ensure_ascii=False)
               for r in predict(predictor, examples, args.max_answer_length)]
  except (ExportError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  text = "".join(line + "\n" for line in results)
  if args.output == "-":
    sys.stdout.write(text)
  else:
    serving_lib.write_atomically(args.output, text.encode("utf-8"))
  log.info("predict: %d examples with %s (%s head, %s)", len(results), predictor.source,
           predictor.head, predictor.runtime)
  return 0


def run() -> int:
  """The command-line entry (`mobilebert-jax-predict`, `python -m mobilebert_jax.predict`)."""
  from mobilebert_jax.convert import quiet_logging
  quiet_logging()
  return main()


if __name__ == "__main__":
  sys.exit(run())
