"""Locations of the small corpus, vocabulary and tagging sample shipped with the package."""
from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def _asset(name: str) -> Path:
  path = ASSETS_DIR / name
  if not path.is_file():
    raise FileNotFoundError(
        f"Packaged asset {path} is missing; reinstall mobilebert_jax with its package data "
        "(setup.py ships mobilebert_jax/data/assets/*).")
  return path


def sample_text_path() -> Path:
  """Path of the shipped demo corpus (one sentence per line, blank line between documents)."""
  return _asset("sample_text.txt")


def sample_vocab_path() -> Path:
  """Path of the shipped uncased WordPiece vocab trained on the demo corpus."""
  return _asset("vocab.txt")


def sample_tagging_paths() -> dict[str, str]:
  """The shipped tagging sample (a synthetic English NER set in CoNLL format, BIO tags):
  {"train_file", "dev_file", "unlabeled_file"}."""
  return {"train_file": str(_asset("tagging_train.conll")),
          "dev_file": str(_asset("tagging_dev.conll")),
          "unlabeled_file": str(_asset("tagging_unlabeled.txt"))}
