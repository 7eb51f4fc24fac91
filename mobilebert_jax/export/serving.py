"""The serving function every on-device format exports, and what the exporters share.

`load_serving(native_dir)` reads a native checkpoint into a `Serving`: the pure function
``serve(params, input_ids, attention_mask, token_type_ids) -> dict`` of the checkpoint's head,
its float32 parameters and the fixed input shape. The LiteRT and ONNX exporters trace that one
function; the dict's keys (`HEAD_OUTPUTS`) are the exported model's output names:

  base                  last_hidden_state [B, L, hidden], pooler_output [B, hidden]
  pretraining           prediction_logits [B, L, vocab], seq_relationship_logits [B, 2]
  masked_lm             prediction_logits [B, L, vocab]
  classification        logits [B, num_labels]
  question_answering    start_logits [B, L], end_logits [B, L]
  token_classification  logits [B, L, num_labels]

Inputs are int32 [B, L]: `input_ids`, `attention_mask` (1 = real token) and `token_type_ids`.
The heavy runtimes (TensorFlow, LiteRT, ONNX) are imported only through `require`, which names
the `export` extra when one is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mobilebert_jax import pretrained
from mobilebert_jax.interop import hf
from mobilebert_jax.models import (HEADS, ModelConfig, build_model, num_params,
                                   to_canonical_layout)

log = logging.getLogger(__name__)

SERVING_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
HEAD_OUTPUTS = {
    "base": ("last_hidden_state", "pooler_output"),
    "pretraining": ("prediction_logits", "seq_relationship_logits"),
    "masked_lm": ("prediction_logits",),
    "classification": ("logits",),
    "question_answering": ("start_logits", "end_logits"),
    "token_classification": ("logits",),
}
DEFAULT_SEQ_LENGTH = 128
EXTRA_INSTALL = "pip install 'mobilebert_jax[export]'"
# At most this many lines of a --calibration file are used (the converter's calibration cost
# grows with it; a few hundred sentences set int8 ranges well).
MAX_CALIBRATION_SENTENCES = 1000


class ExportError(hf.ConversionError):
  """An export request that cannot be carried out (bad option, checkpoint or output path)."""


class MissingDependencyError(ExportError, ImportError):
  """A runtime of the `export` extra is not installed."""


@dataclasses.dataclass(frozen=True)
class ExportReport:
  """What an export wrote: the file, the signature and how close it runs to JAX.

  `max_abs_diff` is the largest |exported - JAX| over the outputs on an example batch, or None
  when the runtime needed to check it is not installed.
  """
  path: str
  head: str
  inputs: dict[str, tuple]
  outputs: tuple[str, ...]
  quantize: str
  size_bytes: int
  max_abs_diff: float | None
  notes: tuple[str, ...] = ()


def require(module: str, package: str, purpose: str, load: bool = True) -> Any:
  """Imports `module` (its native start-up logs silenced), or raises MissingDependencyError
  naming `package` and the extra. With `load=False` only checks that it is installed."""
  error = None
  try:
    if importlib.util.find_spec(module) is None:
      error = f"no module named {module!r}"
  except ImportError as e:  # a parent package is missing
    error = str(e)
  if error is None and load:
    try:
      with native_stderr_captured():
        return importlib.import_module(module)
    except ImportError as e:
      error = str(e)
  if error is not None:
    raise MissingDependencyError(
        f"{purpose} needs the {package} package, which is not installed ({error}); install the "
        f"export extra: {EXTRA_INSTALL}")
  return None


def serving_fn(config: ModelConfig, head: str) -> Callable[..., dict]:
  """The pure ``serve(params, input_ids, attention_mask, token_type_ids) -> dict`` of `head`.

  `params` is the model-layout parameter tree; the dict holds `HEAD_OUTPUTS[head]` (outputs the
  model does not produce, such as a base model's pooler without a pooling layer, are left out).
  """
  model = build_model(config, head)
  names = HEAD_OUTPUTS[head]

  def serve(params, input_ids, attention_mask, token_type_ids):
    out = model.apply({"params": params}, input_ids, attention_mask, token_type_ids)
    return {name: out[name] for name in names if out[name] is not None}

  return serve


@dataclasses.dataclass(frozen=True)
class Serving:
  """A checkpoint ready to export: config, head, float32 params and the input shape.

  `batch_size` None means a dynamic batch (ONNX only); `seq_length` is always fixed.
  """
  source: str
  config: ModelConfig
  head: str
  params: Any
  seq_length: int
  batch_size: int | None = 1

  @property
  def fn(self) -> Callable[..., dict]:
    return serving_fn(self.config, self.head)

  def __call__(self, input_ids, attention_mask, token_type_ids) -> dict:
    return self.fn(self.params, input_ids, attention_mask, token_type_ids)

  @property
  def output_names(self) -> tuple[str, ...]:
    shapes = jax.eval_shape(self, *[jax.ShapeDtypeStruct((1, self.seq_length), jnp.int32)] * 3)
    return tuple(name for name in HEAD_OUTPUTS[self.head] if name in shapes)

  def example_inputs(self, batch_size: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A random int32 batch: [CLS]-free ids, the second half of row 0 padded, two segments."""
    batch = batch_size or self.batch_size or 2
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, self.config.vocab_size, (batch, self.seq_length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, max(1, self.seq_length // 2):] = 0
    types = np.zeros_like(ids)
    types[:, self.seq_length // 2:] = min(1, self.config.type_vocab_size - 1)
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types * mask}


def load_serving(path: str, head: str | None = None, seq_length: int | None = None,
                 batch_size: int | None = 1) -> Serving:
  """Reads a native checkpoint directory into a `Serving` with `head` (default: its own).

  Another head is allowed only when the checkpoint holds all its parameters (e.g. `base` from a
  classifier); a head that would start from fresh random weights is an error.
  """
  if not pretrained.is_native_dir(path):
    raise ExportError(f"{path}: not a native mobilebert_jax checkpoint (no "
                      f"{pretrained.NATIVE_CONFIG}); convert a Hugging Face directory first with "
                      "`python -m mobilebert_jax.convert import-hf`")
  config, src_head, params = pretrained.read_checkpoint(path)
  config = config.replace(scan_layers=False, remat=False)  # unrolled layers export best
  if seq_length is None:
    seq_length = min(DEFAULT_SEQ_LENGTH, config.max_position_embeddings)
  check_shape(path, config, seq_length, batch_size)
  head = head or src_head
  if head not in HEADS:
    raise ExportError(f"{path}: unknown head {head!r}; valid heads: {sorted(HEADS)}")
  if head != src_head:
    _check_head_params(path, config, src_head, head, params)
    params = pretrained.adapt_params(params, src_head, head, config)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  return Serving(source=str(path), config=config, head=head, params=params,
                 seq_length=int(seq_length), batch_size=batch_size)


def check_shape(path: str, config: ModelConfig, seq_length: int, batch_size: int | None) -> None:
  """Raises unless 1 <= seq_length <= max_position_embeddings and batch_size is None or >= 1."""
  if not isinstance(seq_length, int) or seq_length < 1:
    raise ExportError(f"{path}: --seq-length must be a positive integer, got {seq_length!r}")
  if seq_length > config.max_position_embeddings:
    raise ExportError(f"{path}: --seq-length={seq_length} exceeds the model's "
                      f"max_position_embeddings={config.max_position_embeddings}")
  if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
    raise ExportError(f"{path}: --batch-size must be a positive integer, got {batch_size!r}")


def _flat_shapes(tree: Any, prefix: tuple = ()) -> dict[str, tuple]:
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      out.update(_flat_shapes(value, prefix + (key,)))
    return out
  return {"/".join(prefix): tuple(np.shape(tree))}


def _check_head_params(path: str, config: ModelConfig, src_head: str, head: str,
                       params: Mapping) -> None:
  """Raises unless the checkpoint (saved with `src_head`) holds every parameter of `head`."""
  reference = pretrained.abstract_params(build_model(config, head), config)
  reference = _flat_shapes(to_canonical_layout(reference, config))
  if src_head == "base":
    params = {"backbone": params}
  have = _flat_shapes(params)
  if head == "base":
    have = {k[len("backbone/"):]: v for k, v in have.items() if k.startswith("backbone/")}
  missing = sorted(k for k, shape in reference.items() if have.get(k) != shape)
  if missing:
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    raise ExportError(
        f"{path}: holds a {src_head!r} model, which lacks the parameters of head {head!r} "
        f"({shown}); exporting would use random weights. Fine-tune that head first, or export "
        f"the checkpoint's own head (--head={src_head})")


# ---------------------------------------------------------------------------------------------
# Calibration data for full-integer quantization.

def check_calibration_given(calibration: Any) -> None:
  if calibration is None:
    raise ExportError("--quantize=int8 needs representative inputs: pass --calibration=FILE, a "
                      "text file with one sentence (or tab-separated pair) per line")


def calibration_batches(serving: Serving, calibration: Any) -> list[dict[str, np.ndarray]]:
  """Batches of `serving`'s input shape for int8 calibration.

  `calibration` is a text file (one sentence, or a tab-separated sentence pair, per line;
  tokenised with the vocab.txt / tokenizer.json in the checkpoint directory) or, from Python, an
  iterable of input dicts such as `Serving.example_inputs` returns.
  """
  check_calibration_given(calibration)
  batch = serving.batch_size or 1
  if isinstance(calibration, (str, os.PathLike)):
    arrays = _tokenise_file(serving, os.fspath(calibration))
    count = len(arrays["input_ids"]) // batch
    if count == 0:
      raise ExportError(f"--calibration={calibration}: {len(arrays['input_ids'])} sentences, "
                        f"fewer than one batch of --batch-size={batch}")
    return [{k: v[i * batch:(i + 1) * batch] for k, v in arrays.items()} for i in range(count)]
  batches = []
  for i, item in enumerate(calibration):
    missing = [k for k in SERVING_INPUTS if k not in item]
    if missing:
      raise ExportError(f"calibration batch {i} lacks {missing}")
    item = {k: np.asarray(item[k], np.int32) for k in SERVING_INPUTS}
    for key, value in item.items():
      if value.shape != (batch, serving.seq_length):
        raise ExportError(f"calibration batch {i}: {key} has shape {value.shape}, expected "
                          f"{(batch, serving.seq_length)} (--batch-size, --seq-length)")
    batches.append(item)
  if not batches:
    raise ExportError("the calibration data holds no batch")
  return batches


def _tokenise_file(serving: Serving, path: str) -> dict[str, np.ndarray]:
  from mobilebert_jax.data import tokenizer as tokenization
  file = epath.Path(path)
  if not file.is_file():
    raise ExportError(f"--calibration={path}: no such file")
  lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
  lines = [line for line in lines if line][:MAX_CALIBRATION_SENTENCES]
  if not lines:
    raise ExportError(f"--calibration={path}: the file holds no sentence")
  try:
    tokenizer = tokenization.load_tokenizer(serving.source)
  except (FileNotFoundError, ValueError) as e:
    raise ExportError(f"{serving.source}: cannot tokenise --calibration={path}: {e}") from e
  pairs = [line.split("\t", 1) for line in lines]
  try:
    arrays = tokenization.encode_pairs(tokenizer, [p[0] for p in pairs],
                                       [p[1] if len(p) > 1 else None for p in pairs],
                                       serving.seq_length)
  except ValueError as e:
    raise ExportError(f"--calibration={path}: {e}") from e
  top = int(arrays["input_ids"].max())
  if top >= serving.config.vocab_size:
    raise ExportError(f"{serving.source}: its tokenizer gives id {top} for --calibration={path}, "
                      f"outside the model's vocab_size={serving.config.vocab_size}")
  return arrays


# ---------------------------------------------------------------------------------------------
# Output files.

SERVING_FILE = "serving.json"
SERVING_FORMAT = "mobilebert_jax-serving"


@dataclasses.dataclass(frozen=True)
class ExportTarget:
  """Where an export goes: `model_path`, and `directory` when the export is a model directory
  (the model file `model.<suffix>` + serving.json + tokenizer files + model card) rather than a
  bare file."""
  model_path: str
  directory: str | None


def export_target(dst: str, suffix: str, overwrite: bool) -> ExportTarget:
  """`dst` ending in `suffix` (".tflite", ".onnx") is a bare model file; anything else a model
  directory. Raises if the output exists (a file, or a directory that is not empty) and
  `overwrite` is not set, or if a file name names a directory."""
  path = epath.Path(dst)
  if str(dst).endswith(suffix):
    if path.is_dir():
      raise ExportError(f"{dst}: the output is a directory; give a file name")
    if path.exists() and not overwrite:
      raise ExportError(f"{dst}: the output file exists; pass --overwrite to replace it")
    return ExportTarget(model_path=os.fspath(dst), directory=None)
  if path.exists() and not path.is_dir():
    raise ExportError(f"{dst}: exists and is not a directory; a model file name ends in {suffix}")
  if path.is_dir() and any(True for _ in path.iterdir()) and not overwrite:
    raise ExportError(f"{dst}: the output directory is not empty; pass --overwrite to write "
                      "into it anyway")
  return ExportTarget(model_path=os.path.join(os.fspath(dst), "model" + suffix),
                      directory=os.fspath(dst))


def write_model_directory(target: ExportTarget, serving: Serving, report: "ExportReport",
                          runtime: str) -> None:
  """Writes serving.json (the signature, label names, quantization and parity, the source's
  metadata), the tokenizer files and the model card beside an exported model file."""
  if target.directory is None:
    return
  from mobilebert_jax import model_files
  meta = dict(pretrained.read_native_meta(serving.source), head=serving.head)
  description = {
      "format": SERVING_FORMAT, "version": 1, "runtime": runtime,
      "model_file": os.path.basename(target.model_path), "head": serving.head,
      "inputs": {k: list(v) for k, v in report.inputs.items()},
      "outputs": list(report.outputs), "seq_length": serving.seq_length,
      "batch_size": serving.batch_size, "quantize": report.quantize,
      "max_abs_diff_vs_jax": report.max_abs_diff, "notes": list(report.notes),
      "source": serving.source, "model": meta["model"]}
  if serving.head in pretrained.LABELLED_HEADS:
    description["id2label"] = model_files.id2label(
        model_files.label_names(meta, serving.config.num_labels), serving.config.num_labels)
  epath.Path(target.directory, SERVING_FILE).write_text(
      json.dumps(description, indent=2, sort_keys=True))
  shape = "x".join(str(d) for d in next(iter(report.inputs.values())))
  model_file = description["model_file"]
  model_files.write_companions(
      target.directory, meta, tokenizer_dir=serving.source,
      num_params=num_params(serving.params),
      details=[("format", f"{runtime} ({model_file}, quantize={report.quantize}), int32 inputs "
                f"[{shape}], max |diff| vs JAX {report.max_abs_diff}")],
      usage=(f"python -m mobilebert_jax.predict THIS_DIR --input=sentences.txt   # {runtime}",))


def write_atomically(dst: str, data: bytes) -> None:
  """Writes `data` to `dst` through a temporary file in the same directory and a rename, so a
  failure never leaves a partial file (remote paths are written in one request)."""
  if "://" in str(dst):
    epath.Path(dst).write_bytes(data)
    return
  directory = os.path.dirname(os.path.abspath(dst))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, dst)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def native_stderr_captured():
  """Captures what native libraries write to file descriptor 2 (converter banners, C++ logs);
  it is dropped on success and passed on to stderr if the block raises."""
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError):  # no real stderr (e.g. some embedded interpreters)
    yield
    return
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      sink.seek(0)
      captured = sink.read().decode("utf-8", "replace")
      if captured.strip():
        sys.stderr.write(captured)
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def max_abs_diff(expected: Mapping[str, Any], got: Mapping[str, Any]) -> float:
  """The largest |expected - got| over the outputs both hold (by name)."""
  return max(float(np.max(np.abs(np.asarray(expected[k], np.float32) -
                                 np.asarray(got[k], np.float32)))) for k in expected)




def check_and_write(src: str, dst: str, model: bytes, expected: Mapping[str, Any],
                    got: Mapping[str, Any] | None, runtime: str) -> float | None:
  """Writes `model` to `dst` (atomically) once its runtime outputs `got` are finite; returns
  their largest difference from the JAX outputs `expected` (None when the runtime is absent)."""
  diff = None
  if got is not None:
    diff = max_abs_diff(jax.device_get(expected), got)
    if not np.isfinite(diff):
      raise ExportError(f"{src}: the exported {runtime} model gives non-finite outputs")
  write_atomically(dst, model)
  return diff
