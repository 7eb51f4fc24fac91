"""Checkpoint conversion between Hugging Face directories and native orbax directories.

  python -m mobilebert_jax.convert import-hf SRC_HF_DIR DST_NATIVE_DIR [--head HEAD]
  python -m mobilebert_jax.convert export-hf SRC_NATIVE_DIR DST_HF_DIR [--head HEAD]

Tokenizer files (vocab.txt, tokenizer.json, ...) are carried along in both directions.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mobilebert_jax import pretrained
from mobilebert_jax.interop import hf
from mobilebert_jax.models import HEADS


def import_hf(src: str, dst: str, head: str | None = None) -> str:
  """Converts a transformers directory to a native one; returns the head written."""
  if not hf.is_hf_dir(src) or pretrained.is_native_dir(src):
    raise hf.ConversionError(f"{src}: not a Hugging Face checkpoint directory (no config.json)")
  config, src_head, params = pretrained.read_checkpoint(src)
  head = head or src_head
  if head != src_head:
    params = pretrained.adapt_params(params, src_head, head, config)
  pretrained.save_pretrained(dst, config, params, head, tokenizer_dir=src,
                             extra={"converted_from": os.path.abspath(src)})
  return head


def export_hf(src: str, dst: str, head: str | None = None) -> str:
  """Converts a native directory to a transformers one; returns the head written."""
  if not pretrained.is_native_dir(src):
    raise hf.ConversionError(f"{src}: not a native mobilebert_jax checkpoint (no "
                             f"{pretrained.NATIVE_CONFIG})")
  config, src_head, params = pretrained.read_checkpoint(src)
  hf.check_exportable(config)
  head = head or src_head
  if head != src_head:
    params = pretrained.adapt_params(params, src_head, head, config)
  hf.write_hf_dir(dst, config, head, params, tokenizer_dir=src)
  return head


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mobilebert_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=["import-hf", "export-hf"])
  parser.add_argument("src")
  parser.add_argument("dst")
  parser.add_argument("--head", choices=sorted(HEADS), default=None,
                      help="head to write (default: the source checkpoint's head)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  convert = import_hf if args.command == "import-hf" else export_hf
  try:
    head = convert(args.src, args.dst, args.head)
  except (hf.ConversionError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{args.command}: wrote {args.dst} (head={head})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
