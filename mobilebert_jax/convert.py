"""Checkpoint conversion between Hugging Face directories and native orbax directories, and
export of native checkpoints to on-device formats (LiteRT, ONNX).

  python -m mobilebert_jax.convert import-hf SRC_HF_DIR DST_NATIVE_DIR [--head HEAD] [--overwrite]
  python -m mobilebert_jax.convert export-hf SRC_NATIVE_DIR DST_HF_DIR [--head HEAD] [--overwrite]
  python -m mobilebert_jax.convert export-litert SRC_NATIVE_DIR OUT.tflite [--head HEAD]
      [--seq-length N] [--batch-size N] [--quantize none|dynamic|int8 --calibration FILE]
  python -m mobilebert_jax.convert export-onnx SRC_NATIVE_DIR OUT.onnx [--head HEAD]
      [--seq-length N] [--batch-size N]

Tokenizer files (vocab.txt, tokenizer.json, ...) are carried along in both directions. A
destination that exists and is not empty is refused unless --overwrite is given; with it, the
files the conversion writes are replaced and any others are left as they are. Conversion runs
on the host CPU (set JAX_PLATFORMS to choose otherwise).

The on-device exports take int32 input_ids, attention_mask and token_type_ids [batch, seq]
and return the head's outputs (mobilebert_jax.export); they need the export extra
(pip install 'mobilebert_jax[export]'). --quantize=int8 calibrates on --calibration, a text
file with one sentence (or tab-separated pair) per line, tokenised with the checkpoint's vocab.
An existing output file is refused unless --overwrite is given; a failed export writes nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from etils import epath

from mobilebert_jax import model_files, pretrained
from mobilebert_jax.interop import hf
from mobilebert_jax.models import HEADS, num_params


HF_USAGE = (
    "from transformers import pipeline",
    "pipeline('text-classification', model=THIS_DIR)   # or token-classification, "
    "question-answering",
)


def check_destination(src: str, dst: str, overwrite: bool = False) -> None:
  """Raises unless `dst` is missing, an empty directory, or `overwrite` is set (never `src`)."""
  path = epath.Path(dst)
  local = "://" not in str(src) and "://" not in str(dst)
  if local and os.path.abspath(src) == os.path.abspath(dst):
    raise hf.ConversionError(f"{dst}: the destination is the source directory; choose another")
  if not path.exists():
    return
  if not path.is_dir():
    raise hf.ConversionError(f"{dst}: the destination exists and is not a directory")
  if not overwrite and any(True for _ in path.iterdir()):
    raise hf.ConversionError(f"{dst}: the destination directory is not empty; pass --overwrite "
                             "to write into it anyway")


def import_hf(src: str, dst: str, head: str | None = None, overwrite: bool = False) -> str:
  """Converts a transformers directory to a native one; returns the head written."""
  if not hf.is_hf_dir(src) or pretrained.is_native_dir(src):
    raise hf.ConversionError(f"{src}: not a Hugging Face checkpoint directory (no config.json)")
  check_destination(src, dst, overwrite)
  config, src_head, params = pretrained.read_checkpoint(src)
  head = head or src_head
  if head != src_head:
    params = pretrained.adapt_params(params, src_head, head, config)
  mapping = hf.read_hf_config(src).get("id2label") or {}
  labels = [mapping[k] for k in sorted(mapping, key=int)]
  fits = head in pretrained.LABELLED_HEADS and len(labels) == config.num_labels
  pretrained.save_pretrained(dst, config, params, head, tokenizer_dir=src,
                             extra={"converted_from": os.path.abspath(src)},
                             labels=labels if fits else None)
  return head


def export_hf(src: str, dst: str, head: str | None = None, overwrite: bool = False) -> str:
  """Converts a native directory to a transformers one; returns the head written."""
  if not pretrained.is_native_dir(src):
    raise hf.ConversionError(f"{src}: not a native mobilebert_jax checkpoint (no "
                             f"{pretrained.NATIVE_CONFIG})")
  check_destination(src, dst, overwrite)
  config, src_head, params = pretrained.read_checkpoint(src)
  hf.check_exportable(config)
  head = head or src_head
  if head != src_head:
    params = pretrained.adapt_params(params, src_head, head, config)
  meta = dict(pretrained.read_native_meta(src), head=head)
  labels = (model_files.label_names(meta, config.num_labels)
            if head == src_head and head in pretrained.LABELLED_HEADS else None)
  hf.write_hf_dir(dst, config, head, params, tokenizer_dir=src, labels=labels)
  model_files.write_companions(
      dst, meta, tokenizer_dir=None, num_params=num_params(params),
      details=[("format", "Hugging Face transformers (config.json, model.safetensors)")],
      usage=HF_USAGE)
  return head


def export_device(command: str, args: argparse.Namespace) -> str:
  """Runs export-litert or export-onnx (`mobilebert_jax.export`); returns the line to print."""
  from mobilebert_jax import export
  if command == "export-litert":
    report = export.export_litert(
        args.src, args.dst, head=args.head, seq_length=args.seq_length,
        batch_size=args.batch_size or 1, quantize=args.quantize or "none",
        calibration=args.calibration, overwrite=args.overwrite)
  else:
    if args.quantize not in (None, "none") or args.calibration:
      raise export.ExportError("--quantize and --calibration apply to export-litert only")
    report = export.export_onnx(args.src, args.dst, head=args.head, seq_length=args.seq_length,
                                batch_size=args.batch_size, overwrite=args.overwrite)
  shape = "x".join(str(d) for d in next(iter(report.inputs.values())))
  check = ("not run: runtime not installed" if report.max_abs_diff is None
           else f"max |diff| vs JAX {report.max_abs_diff:.2g}")
  return (f"{command}: wrote {report.path} (head={report.head}, inputs [{shape}] int32, outputs "
          f"{', '.join(report.outputs)}, quantize={report.quantize}, "
          f"{report.size_bytes / 1e6:.2f} MB; {'; '.join(report.notes + (check,))})")


def main(argv: list[str] | None = None) -> int:
  prog = os.path.basename(sys.argv[0])  # the console script's name, else `python -m ...`
  if prog.endswith(".py") or prog in ("-c", ""):
    prog = "python -m mobilebert_jax.convert"
  parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=["import-hf", "export-hf", "export-litert", "export-onnx"])
  parser.add_argument("src")
  parser.add_argument("dst")
  parser.add_argument("--head", choices=sorted(HEADS), default=None,
                      help="head to write (default: the source checkpoint's head)")
  parser.add_argument("--overwrite", action="store_true",
                      help="write into a destination directory that is not empty (export-litert, "
                      "export-onnx: replace an existing output file)")
  parser.add_argument("--seq-length", type=int, default=None,
                      help="export-*: fixed sequence length (default: min(128, the model's "
                      "max_position_embeddings))")
  parser.add_argument("--batch-size", type=int, default=None,
                      help="export-*: fixed batch size (default: 1 for LiteRT, dynamic for ONNX)")
  parser.add_argument("--quantize", choices=["none", "dynamic", "int8"], default=None,
                      help="export-litert: dynamic = int8 weights; int8 = int8 weights and "
                      "activations, calibrated on --calibration")
  parser.add_argument("--calibration", default=None,
                      help="export-litert --quantize=int8: text file, one sentence (or "
                      "tab-separated pair) per line")
  args = parser.parse_args(argv)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  if args.command in ("export-litert", "export-onnx"):
    try:
      print(export_device(args.command, args))
    except (hf.ConversionError, FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    return 0
  convert = import_hf if args.command == "import-hf" else export_hf
  try:
    head = convert(args.src, args.dst, args.head, args.overwrite)
  except (hf.ConversionError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{args.command}: wrote {args.dst} (head={head})")
  return 0


def quiet_logging() -> None:
  """Keeps stderr to the project's own lines: no backend probing, library INFO logs or banners."""
  import jax
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")  # no GPU/TPU probe, nor their fallback warnings
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  logging.getLogger("mobilebert_jax").setLevel(logging.INFO)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


def run() -> int:
  """The command-line entry (`mobilebert-jax-convert`, `python -m mobilebert_jax.convert`)."""
  quiet_logging()
  return main()


if __name__ == "__main__":
  sys.exit(run())
