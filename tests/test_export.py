"""On-device export (mobilebert_jax.export): LiteRT and ONNX files that run in their runtimes and
match JAX, int8 quantization, the CLI, and clear errors.

The runtime tests need the export extra (pip install 'mobilebert_jax[export]') and are skipped
without it; the serving-function and error tests run everywhere.
"""

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mobilebert_jax import get_preset
from mobilebert_jax.data import load_tokenizer
from mobilebert_jax.export import serving as serving_lib
from mobilebert_jax.export.serving import ExportError, MissingDependencyError, load_serving
from mobilebert_jax.models import HEADS, build_model, tiny
from mobilebert_jax.pretrained import init_params
from tiny_checkpoints import LABELS, NAS, VOCAB, WORDS, native_checkpoint as _native

SEQ = 16
CONFIGS = {"mobilebert": tiny(get_preset("mobilebert"), vocab_size=64).replace(num_labels=3),
           "nas": NAS}


@pytest.fixture(scope="module")
def native(tmp_path_factory):
  root = tmp_path_factory.mktemp("native")
  return {name: _native(root / name, config) for name, config in CONFIGS.items()}


def _batch(config, batch, seed):
  """Random `[CLS] words [SEP] words [SEP]` pairs of random lengths, padded to SEQ."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(len(VOCAB) - len(WORDS), config.vocab_size, (batch, SEQ)).astype(np.int32)
  lengths = rng.randint(5, SEQ + 1, (batch, 1))
  middle = lengths // 2
  positions = np.arange(SEQ)[None]
  ids[:, 0] = VOCAB.index("[CLS]")
  ids[(positions == middle) | (positions == lengths - 1)] = VOCAB.index("[SEP]")
  mask = (positions < lengths).astype(np.int32)
  types = ((positions > middle) & (mask == 1)).astype(np.int32)
  return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types}


@functools.lru_cache(maxsize=None)
def _reference(path):
  serving = load_serving(path, None, SEQ, None)
  return jax.jit(serving.fn), serving.params


def _expected(path, batch):
  fn, params = _reference(path)
  return {k: np.asarray(v) for k, v in fn(params, **batch).items()}


def _litert(path, batch):
  from mobilebert_jax.export.litert import litert_runner
  return litert_runner(str(path))(**batch)


def _onnx(path, batch):
  from mobilebert_jax.export.onnx import onnx_runner
  return onnx_runner(str(path))(**batch)


def _needs_litert():
  pytest.importorskip("tensorflow")
  pytest.importorskip("ai_edge_litert")


def _needs_onnx():
  pytest.importorskip("jax2onnx")
  pytest.importorskip("onnxruntime")


# ------------------------------------------------------------------------ no runtime needed


@pytest.mark.parametrize("head", sorted(HEADS))
def test_serving_outputs_per_head(head):
  config = CONFIGS["mobilebert"]
  fn = serving_lib.serving_fn(config, head)
  params = jax.eval_shape(lambda: init_params(build_model(config, head), config,
                                              jax.random.PRNGKey(0)))
  ids = jax.ShapeDtypeStruct((2, SEQ), np.int32)
  out = jax.eval_shape(fn, params, ids, ids, ids)
  assert set(out) == set(serving_lib.HEAD_OUTPUTS[head])
  shapes = {k: v.shape for k, v in out.items()}
  expected = {"logits": (2, 3) if head == "classification" else (2, SEQ, 3),
              "start_logits": (2, SEQ), "end_logits": (2, SEQ),
              "prediction_logits": (2, SEQ, 64), "seq_relationship_logits": (2, 2),
              "last_hidden_state": (2, SEQ, config.hidden_size),
              "pooler_output": (2, config.hidden_size)}
  assert shapes == {k: expected[k] for k in shapes}


def test_error_sequence_longer_than_the_model(native):
  with pytest.raises(ExportError, match=r"native.*mobilebert.*--seq-length=129 exceeds the "
                     r"model's max_position_embeddings=128"):
    load_serving(native["mobilebert"], seq_length=129)


def test_error_head_missing_from_checkpoint(native):
  with pytest.raises(ExportError, match=r"holds a 'classification' model, which lacks the "
                     r"parameters of head 'question_answering' \(qa_outputs"):
    load_serving(native["nas"], head="question_answering")
  serving = load_serving(native["nas"], head="base", seq_length=SEQ)  # a subset is fine
  assert serving.output_names == ("last_hidden_state", "pooler_output")


def test_error_int8_without_calibration_and_missing_extra(native, tmp_path):
  from mobilebert_jax.export import export_litert
  out = tmp_path / "model.tflite"
  with pytest.raises(ExportError, match="--quantize=int8 needs representative inputs: pass "
                     "--calibration=FILE"):
    export_litert(native["mobilebert"], str(out), quantize="int8")
  with pytest.raises(ExportError, match="--quantize='int4' is not one of"):
    export_litert(native["mobilebert"], str(out), quantize="int4")
  assert not out.exists()
  with pytest.raises(MissingDependencyError, match=r"export-litert needs the tensorflow-cpu "
                     r"package.*pip install 'mobilebert_jax\[export\]'"):
    serving_lib.require("tensorflow_not_installed_here", "tensorflow-cpu", "export-litert")


# ------------------------------------------------------------------------------------ LiteRT


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_litert_float_matches_jax(native, tmp_path, name):
  _needs_litert()
  from mobilebert_jax.export import export_litert
  out = tmp_path / f"{name}.tflite"
  report = export_litert(native[name], str(out), seq_length=SEQ, batch_size=4)
  assert report.outputs == ("logits",) and report.max_abs_diff < 1e-4
  batch = _batch(CONFIGS[name], 4, seed=1)
  got = _litert(out, batch)
  np.testing.assert_allclose(got["logits"], _expected(native[name], batch)["logits"], atol=1e-4)


def _calibration_file(path):
  rng = np.random.RandomState(0)
  pairs = [" ".join(rng.choice(WORDS, rng.randint(2, 7))) + "\t" +
           " ".join(rng.choice(WORDS, rng.randint(2, 7))) for _ in range(48)]
  path.write_text("\n".join(pairs) + "\n")
  return path


def _check_int8(native_dir, config, model_path):
  """The model's matmuls are int8 and its logits stay close to JAX's float ones (on inputs shaped
  like the calibration sentences: int8 ranges hold only for what calibration saw)."""
  from ai_edge_litert.interpreter import Interpreter
  interpreter = Interpreter(model_path=str(model_path))
  tensors = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
  matmuls = [op for op in interpreter._get_ops_details()
             if op["op_name"] in ("FULLY_CONNECTED", "BATCH_MATMUL")]
  assert matmuls and all(tensors[op["inputs"][0]] == np.int8 for op in matmuls)
  got, want = [], []
  for seed in range(3):
    batch = _batch(config, 8, seed=seed + 10)
    got.append(_litert(model_path, batch)["logits"])
    want.append(_expected(native_dir, batch)["logits"])
  got, want = np.concatenate(got), np.concatenate(want)
  assert np.abs(got - want).max() < 0.15 * np.abs(want).max(), (got, want)
  assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.75, (got, want)


def test_litert_int8_cli_with_calibration_text(native, tmp_path):
  """Full-integer int8 through the CLI, calibrated on sentences tokenised with the vocab."""
  _needs_litert()
  out = tmp_path / "int8.tflite"
  result = subprocess.run([sys.executable, "-m", "mobilebert_jax.convert", "export-litert",
                           native["mobilebert"], str(out), f"--seq-length={SEQ}",
                           "--batch-size=8", "--quantize=int8",
                           f"--calibration={_calibration_file(tmp_path / 'sentences.txt')}"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stderr == "", result.stderr
  assert result.stdout.startswith(f"export-litert: wrote {out} (head=classification, inputs "
                                  f"[8x{SEQ}] int32, outputs logits, quantize=int8")
  _check_int8(native["mobilebert"], CONFIGS["mobilebert"], out)


def test_litert_int8_nas_with_gelu(native, tmp_path):
  """A NAS architecture (attention, FFN, convolution, identity ops; exact GELU) runs in int8."""
  _needs_litert()
  from mobilebert_jax.export import export_litert
  out = tmp_path / "nas_int8.tflite"
  report = export_litert(native["nas"], str(out), seq_length=SEQ, batch_size=8, quantize="int8",
                         calibration=_calibration_file(tmp_path / "sentences.txt"))
  assert report.notes == ("GELU evaluated with its tanh approximation",)
  _check_int8(native["nas"], NAS, out)


def test_litert_dynamic_range_and_no_partial_output(native, tmp_path, monkeypatch):
  _needs_litert()
  from mobilebert_jax.export import export_litert
  out = tmp_path / "dynamic.tflite"
  report = export_litert(native["mobilebert"], str(out), seq_length=SEQ, quantize="dynamic")
  assert report.quantize == "dynamic" and report.max_abs_diff < 0.05
  from ai_edge_litert.interpreter import Interpreter
  assert any(t["dtype"] == np.int8 for t in Interpreter(model_path=str(out)).get_tensor_details())
  batch = _batch(CONFIGS["mobilebert"], 1, seed=3)
  np.testing.assert_allclose(_litert(out, batch)["logits"],
                             _expected(native["mobilebert"], batch)["logits"], atol=0.05)

  with pytest.raises(ExportError, match="the output file exists; pass --overwrite"):
    export_litert(native["mobilebert"], str(out), seq_length=SEQ)
  # A failure after conversion (here: the check run) leaves neither the file nor a temp file.
  monkeypatch.setattr(serving_lib, "max_abs_diff", lambda *a: float("nan"))
  with pytest.raises(ExportError, match="non-finite outputs"):
    export_litert(native["mobilebert"], str(tmp_path / "bad.tflite"), seq_length=SEQ)
  assert sorted(os.listdir(tmp_path)) == ["dynamic.tflite"]


# -------------------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_onnx_matches_jax_with_dynamic_batch(native, tmp_path, name):
  _needs_onnx()
  from mobilebert_jax.export import export_onnx
  out = tmp_path / f"{name}.onnx"
  report = export_onnx(native[name], str(out), seq_length=SEQ)
  assert report.inputs["input_ids"] == ("batch", SEQ) and report.max_abs_diff < 1e-4
  for rows in (1, 5):
    batch = _batch(CONFIGS[name], rows, seed=rows)
    got = _onnx(out, batch)
    assert list(got) == ["logits"]
    np.testing.assert_allclose(got["logits"], _expected(native[name], batch)["logits"],
                               atol=1e-4)


def test_onnx_question_answering_outputs(tmp_path):
  _needs_onnx()
  from mobilebert_jax.export import export_onnx
  path = _native(tmp_path / "qa", CONFIGS["mobilebert"], head="question_answering", seed=2)
  out = tmp_path / "qa.onnx"
  export_onnx(path, str(out), seq_length=SEQ, batch_size=2)
  batch = _batch(CONFIGS["mobilebert"], 2, seed=4)
  got, want = _onnx(out, batch), _expected(path, batch)
  assert list(got) == ["start_logits", "end_logits"]
  for key in got:
    np.testing.assert_allclose(got[key], want[key], atol=1e-4)


# ------------------------------------------------------------ model directories and predict


def _pairs(count=10, seed=5):
  rng = np.random.RandomState(seed)
  return [" ".join(rng.choice(WORDS, rng.randint(2, 9))) + "\t" +
          " ".join(rng.choice(WORDS, rng.randint(2, 9))) for _ in range(count)]


def test_predict_gives_the_same_labels_from_native_litert_and_onnx(native, tmp_path):
  """Model directories (model file, serving.json with the label names, tokenizer files that
  AutoTokenizer reads, model card) from both exporters; `predict` labels sentence pairs alike
  in JAX, LiteRT and ONNX Runtime, through the API and the command line."""
  _needs_litert()
  _needs_onnx()
  import json
  from transformers import AutoTokenizer
  from mobilebert_jax import predict
  from mobilebert_jax.export import export_litert, export_onnx
  src = native["mobilebert"]
  export_litert(src, str(tmp_path / "litert"), seq_length=SEQ, batch_size=4)
  export_onnx(src, str(tmp_path / "onnx"), seq_length=SEQ)
  lines = _pairs()
  first, second = zip(*(line.split("\t") for line in lines))
  reference = load_tokenizer(src)(list(first), list(second))["input_ids"]
  for name, model_file in (("litert", "model.tflite"), ("onnx", "model.onnx")):
    directory = tmp_path / name
    assert {model_file, "serving.json", "vocab.txt", "tokenizer_config.json",
            "README.md"} <= set(os.listdir(directory))
    description = json.loads((directory / "serving.json").read_text())
    assert description["id2label"] == {str(i): label for i, label in enumerate(LABELS)}
    assert "| labels | negative, neutral, positive |" in (directory / "README.md").read_text()
    assert AutoTokenizer.from_pretrained(directory)(list(first), list(second))[
        "input_ids"] == reference

  results = {}
  for model in (src, tmp_path / "litert", tmp_path / "onnx", tmp_path / "onnx" / "model.onnx"):
    predictor = predict.load_predictor(str(model), seq_length=SEQ)
    examples = predict.read_examples(lines, "classification")
    results[model] = list(predict.predict(predictor, examples))
  want = results[src]
  assert {r["label"] for r in want} <= set(LABELS)
  for model, got in results.items():
    assert [r["label"] for r in got] == [r["label"] for r in want], model
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-4)

  (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
  cli = subprocess.run([sys.executable, "-m", "mobilebert_jax.predict", str(tmp_path / "litert"),
                        f"--input={tmp_path / 'in.txt'}", "--threads=1"],
                       capture_output=True, text=True, timeout=300)
  assert cli.returncode == 0 and cli.stderr == "", cli.stderr
  assert [json.loads(line)["label"] for line in cli.stdout.splitlines()] == [
      r["label"] for r in want]
