"""Checkpoint conversion between Hugging Face directories and native orbax directories.

  python -m mobilebert_jax.convert import-hf SRC_HF_DIR DST_NATIVE_DIR [--head HEAD] [--overwrite]
  python -m mobilebert_jax.convert export-hf SRC_NATIVE_DIR DST_HF_DIR [--head HEAD] [--overwrite]

Tokenizer files (vocab.txt, tokenizer.json, ...) are carried along in both directions. A
destination that exists and is not empty is refused unless --overwrite is given; with it, the
files the conversion writes are replaced and any others are left as they are. Conversion runs
on the host CPU (set JAX_PLATFORMS to choose otherwise).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from etils import epath

from mobilebert_jax import pretrained
from mobilebert_jax.interop import hf
from mobilebert_jax.models import HEADS


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
  pretrained.save_pretrained(dst, config, params, head, tokenizer_dir=src,
                             extra={"converted_from": os.path.abspath(src)})
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
  hf.write_hf_dir(dst, config, head, params, tokenizer_dir=src)
  return head


def main(argv: list[str] | None = None) -> int:
  prog = os.path.basename(sys.argv[0])  # the console script's name, else `python -m ...`
  if prog.endswith(".py") or prog in ("-c", ""):
    prog = "python -m mobilebert_jax.convert"
  parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=["import-hf", "export-hf"])
  parser.add_argument("src")
  parser.add_argument("dst")
  parser.add_argument("--head", choices=sorted(HEADS), default=None,
                      help="head to write (default: the source checkpoint's head)")
  parser.add_argument("--overwrite", action="store_true",
                      help="write into a destination directory that is not empty")
  args = parser.parse_args(argv)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  convert = import_hf if args.command == "import-hf" else export_hf
  try:
    head = convert(args.src, args.dst, args.head, args.overwrite)
  except (hf.ConversionError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{args.command}: wrote {args.dst} (head={head})")
  return 0


def _quiet() -> None:
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
  _quiet()
  return main()


if __name__ == "__main__":
  sys.exit(run())
