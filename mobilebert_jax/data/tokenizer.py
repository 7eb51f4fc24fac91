"""Loading the WordPiece tokenizer (transformers' fast BERT tokenizer), offline."""
from __future__ import annotations

import collections
import os
import tempfile

from mobilebert_jax.data.sources import epath_of

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def resolve_vocab_path(vocab_path_or_dir: str | os.PathLike):
  """Returns the vocab.txt (preferred) or tokenizer.json named by a file or directory path
  (local or remote, as an `etils.epath.Path`)."""
  path = epath_of(vocab_path_or_dir)
  if path.is_dir():
    for name in ("vocab.txt", "tokenizer.json"):
      if (path / name).is_file():
        return path / name
    raise FileNotFoundError(f"tokenizer directory {str(path)!r} holds neither vocab.txt nor "
                            "tokenizer.json")
  if not path.is_file():
    raise FileNotFoundError(f"vocab file {str(path)!r} does not exist")
  return path


def read_vocab(vocab_file: str | os.PathLike) -> "collections.OrderedDict[str, int]":
  """Reads a BERT vocab.txt (one token per line, line number = id)."""
  vocab: collections.OrderedDict[str, int] = collections.OrderedDict()
  with epath_of(vocab_file).open("r", encoding="utf-8") as f:
    for i, line in enumerate(f):
      token = line.rstrip("\n").rstrip("\r")
      if not token.strip():
        raise ValueError(f"vocab file {str(vocab_file)!r} line {i + 1} is blank")
      if token in vocab:
        raise ValueError(f"vocab file {str(vocab_file)!r} line {i + 1}: token {token!r} "
                         f"already appears at line {vocab[token] + 1}")
      vocab[token] = i
  if not vocab:
    raise ValueError(f"vocab file {str(vocab_file)!r} is empty")
  return vocab


def load_tokenizer(vocab_path_or_dir: str | os.PathLike, do_lower_case: bool = True):
  """Returns a `transformers.BertTokenizerFast` for a vocab.txt, or a directory holding
  vocab.txt / tokenizer.json (e.g. a Hugging Face checkpoint directory). Offline.

  The vocab must contain [PAD], [UNK], [CLS], [SEP] and [MASK]. The resolved file is stored on
  the tokenizer as `tokenizer.vocab_path` for error messages.
  """
  from transformers import BertTokenizerFast

  path = resolve_vocab_path(vocab_path_or_dir)
  if path.name.endswith(".json"):
    with tempfile.TemporaryDirectory() as tmp:  # the file may be remote (gs://)
      local = os.path.join(tmp, "tokenizer.json")
      with open(local, "w", encoding="utf-8") as f:
        f.write(path.read_text(encoding="utf-8"))
      tokenizer = BertTokenizerFast(tokenizer_file=local, do_lower_case=do_lower_case)
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
  else:
    # NB: transformers 5 silently ignores `vocab_file=`; pass the vocab itself. (It would also
    # silently append missing special tokens, hence the check on the file's own vocab.)
    vocab = read_vocab(path)
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=do_lower_case)
  missing = [t for t in SPECIAL_TOKENS if t not in vocab]
  if missing:
    raise ValueError(f"vocab {str(path)!r} lacks the special tokens {missing}")
  if len(vocab) <= len(SPECIAL_TOKENS):
    raise ValueError(f"vocab {str(path)!r} holds only {len(vocab)} tokens: was it read?")
  tokenizer.vocab_path = str(path)
  return tokenizer


ENCODED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def encode_pairs(tokenizer, firsts, seconds=None, max_length: int = 128) -> dict:
  """`[CLS] first [SEP] (second [SEP])` per row, truncated (longest first) and padded to
  `max_length`: int32 input_ids, attention_mask, token_type_ids [N, max_length]. `seconds` is
  None or a list with None for rows without a second text."""
  import numpy as np
  if seconds is not None and not any(s is not None for s in seconds):
    seconds = None
  if seconds is not None and any(s is None for s in seconds):
    raise ValueError("either every row has a second text (a pair) or none does")
  encoded = tokenizer(list(firsts), list(seconds) if seconds is not None else None,
                      padding="max_length", truncation=True, max_length=max_length,
                      return_tensors="np")
  return {k: np.asarray(encoded[k], np.int32) for k in ENCODED_INPUTS}
