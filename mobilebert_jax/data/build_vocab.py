"""Train a small uncased WordPiece vocab with the `tokenizers` library (offline).

    python -m mobilebert_jax.data.build_vocab --input TEXT [TEXT ...] --output VOCAB --size N

Inputs are text files or glob patterns in BERT's format (one sentence per line, blank line between
documents). The output is a BERT `vocab.txt`: one token per line, the line number is the id, with
the special tokens first: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
"""
from __future__ import annotations

import argparse
import string
from pathlib import Path
from typing import Sequence

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Characters always present (alone and as "##" continuations) so that unseen words still split
# into known pieces instead of becoming [UNK].
_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation


def _expand_inputs(inputs: Sequence[str]) -> list[str]:
  # Imported here so that this module stays importable on its own.
  from mobilebert_jax.data.sources import expand_paths
  return [str(p) for p in expand_paths(inputs)]


def train_wordpiece_vocab(inputs: Sequence[str], vocab_size: int, lowercase: bool = True,
                          min_frequency: int = 1) -> list[str]:
  """Trains WordPiece on `inputs` (files or globs); returns the tokens ordered by id."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

  if vocab_size <= len(SPECIAL_TOKENS) + 2 * len(_ALPHABET):
    raise ValueError(f"--size {vocab_size} is too small: it must exceed "
                     f"{len(SPECIAL_TOKENS) + 2 * len(_ALPHABET)} (special tokens + alphabet)")
  files = _expand_inputs(inputs)
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=None, lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  alphabet = _ALPHABET if lowercase else _ALPHABET + string.ascii_uppercase
  trainer = trainers.WordPieceTrainer(
      vocab_size=vocab_size - len(alphabet),  # room for the "##" alphabet appended below
      min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=list(alphabet), continuing_subword_prefix="##", show_progress=False)
  tok.train(files, trainer)
  vocab = tok.get_vocab()
  tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
  if tuple(tokens[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
    raise RuntimeError(f"tokenizers put the special tokens at {tokens[:5]}, expected "
                       f"{SPECIAL_TOKENS}")
  present = set(tokens)
  tokens += [f"##{c}" for c in alphabet if f"##{c}" not in present]
  return tokens[:max(vocab_size, len(SPECIAL_TOKENS))]


def write_vocab(tokens: Sequence[str], path: str | Path) -> None:
  """Writes one token per line (BERT vocab.txt format); rejects duplicates and blank tokens."""
  seen = set()
  for i, t in enumerate(tokens):
    if not t or t != t.strip() or "\n" in t:
      raise ValueError(f"vocab token {i} ({t!r}) is empty or has surrounding whitespace")
    if t in seen:
      raise ValueError(f"vocab token {t!r} appears twice (second time at id {i})")
    seen.add(t)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
  """Command-line entry point."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", nargs="+", required=True, help="text files or glob patterns")
  parser.add_argument("--output", required=True, help="where to write vocab.txt")
  parser.add_argument("--size", type=int, default=3000, help="target vocab size (an upper bound)")
  parser.add_argument("--cased", action="store_true", help="keep case (default: lowercase)")
  parser.add_argument("--min_frequency", type=int, default=1)
  args = parser.parse_args(argv)
  tokens = train_wordpiece_vocab(args.input, args.size, lowercase=not args.cased,
                                 min_frequency=args.min_frequency)
  write_vocab(tokens, args.output)
  print(f"wrote {len(tokens)} tokens to {args.output}")


if __name__ == "__main__":
  main()
