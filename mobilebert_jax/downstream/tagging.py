"""Sequence tagging data (NER, chunking, POS): CoNLL-format files, unlabelled sentences, and
WordPiece encoding with one label per word.

CoNLL format: one token per line, its columns separated by whitespace (the token first, the tag
in `tag_column`, default the last column), a blank line between sentences; `-DOCSTART-` lines
are skipped. CoNLL-2003 NER (`word POS chunk NER`), CoNLL-2000 chunking (`word POS chunk`) and
POS files (`word POS`) all read this way, choosing the column.

Unlabelled text (for cross-view training): one sentence per line, tokens separated by spaces.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from mobilebert_jax.data.sources import epath_of

DOCSTART = "-DOCSTART-"
IGNORE = -1  # label of a position that carries no word's tag ([CLS], pieces after the first)


@dataclasses.dataclass(frozen=True)
class TaggedSentence:
  """One sentence: its tokens and their tags (equal lengths)."""
  tokens: tuple[str, ...]
  tags: tuple[str, ...]


def _lines(path: str | os.PathLike):
  """(line number, stripped line) of a UTF-8 text file, local or remote."""
  file = epath_of(path)
  if not file.exists():
    raise FileNotFoundError(f"tagging data file {os.fspath(path)!r} does not exist")
  with file.open("rb") as f:
    for number, raw in enumerate(f, start=1):
      try:
        yield number, raw.decode("utf-8").strip()
      except UnicodeDecodeError as e:
        raise ValueError(f"{os.fspath(path)}:{number}: not valid UTF-8 ({e})") from None


def read_conll(path: str | os.PathLike, tag_column: int = -1) -> list[TaggedSentence]:
  """The sentences of a CoNLL-format file (module docstring); a line with too few columns for
  `tag_column` is an error naming the file and line."""
  sentences, tokens, tags = [], [], []

  def close():
    if tokens:
      sentences.append(TaggedSentence(tuple(tokens), tuple(tags)))
      tokens.clear()
      tags.clear()

  for number, line in _lines(path):
    if not line:
      close()
      continue
    columns = line.split()
    if columns[0] == DOCSTART:
      close()
      continue
    try:
      tag = columns[tag_column]
    except IndexError:
      raise ValueError(f"{os.fspath(path)}:{number}: {line!r} has {len(columns)} column(s), no "
                       f"tag column {tag_column}") from None
    if len(columns) < 2:
      raise ValueError(f"{os.fspath(path)}:{number}: {line!r} has a token but no tag (expected "
                       "'token ... tag')")
    tokens.append(columns[0])
    tags.append(tag)
  close()
  if not sentences:
    raise ValueError(f"tagging data file {os.fspath(path)!r} holds no sentences")
  return sentences


def read_unlabeled(path: str | os.PathLike) -> list[tuple[str, ...]]:
  """Unlabelled sentences, one per line (tokens separated by whitespace); blank lines skipped."""
  sentences = [tuple(line.split()) for _, line in _lines(path) if line]
  if not sentences:
    raise ValueError(f"unlabelled data file {os.fspath(path)!r} holds no sentences")
  return sentences


def tag_vocabulary(sentences: Sequence[TaggedSentence]) -> list[str]:
  """The tags of `sentences`, sorted, with "O" (outside any span) first when present."""
  tags = sorted({t for s in sentences for t in s.tags})
  return (["O"] + [t for t in tags if t != "O"]) if "O" in tags else tags


def tag_ids(sentences: Sequence[TaggedSentence], tags: Sequence[str], where: str
            ) -> list[list[int]]:
  """Tag ids of every sentence; a tag outside `tags` is an error naming `where` and the tag."""
  index = {t: i for i, t in enumerate(tags)}
  out = []
  for n, sentence in enumerate(sentences):
    unknown = [t for t in sentence.tags if t not in index]
    if unknown:
      raise ValueError(f"{where}: sentence {n} has tag {unknown[0]!r}, not among the training "
                       f"tags {list(tags)}")
    out.append([index[t] for t in sentence.tags])
  return out


def encode_tagged(sentences: Sequence[TaggedSentence], tokenizer, tags: Sequence[str],
                  max_seq_length: int, where: str = "tagging data") -> dict[str, np.ndarray]:
  """`[CLS] word pieces [SEP]` padded to `max_seq_length`, each word's tag on its first piece.

  Returns int32 input_ids, attention_mask, token_type_ids, labels [N, L] (IGNORE on [CLS],
  [SEP], padding and non-first pieces) and word_positions [N, L] (the position of word j's first
  piece at column j, -1 past the sentence's last encoded word). Words that do not fit after
  truncation have no position: their prediction is "O" (so they count against recall).
  """
  if max_seq_length < 3:
    raise ValueError(f"max_seq_length {max_seq_length} is too short for tagging")
  ids = tag_ids(sentences, tags, where)
  n = len(sentences)
  input_ids = np.full((n, max_seq_length), tokenizer.pad_token_id, np.int32)
  attention_mask = np.zeros((n, max_seq_length), np.int32)
  labels = np.full((n, max_seq_length), IGNORE, np.int32)
  word_positions = np.full((n, max_seq_length), -1, np.int32)
  pieces = tokenizer([list(s.tokens) for s in sentences], is_split_into_words=True,
                     add_special_tokens=False)
  for i in range(n):
    seq = [tokenizer.cls_token_id]
    for j, piece in enumerate(pieces.word_ids(i)):
      if len(seq) >= max_seq_length - 1:
        break
      if piece is None:
        continue
      if piece == (pieces.word_ids(i)[j - 1] if j else None):
        seq.append(pieces["input_ids"][i][j])
        continue
      if piece < max_seq_length:
        word_positions[i, piece] = len(seq)
      labels[i, len(seq)] = ids[i][piece]
      seq.append(pieces["input_ids"][i][j])
    seq.append(tokenizer.sep_token_id)
    input_ids[i, :len(seq)] = seq
    attention_mask[i, :len(seq)] = 1
  return {"input_ids": input_ids, "attention_mask": attention_mask,
          "token_type_ids": np.zeros_like(input_ids), "labels": labels,
          "word_positions": word_positions}


def decode_word_tags(logits: np.ndarray, word_positions: np.ndarray,
                     sentences: Sequence[TaggedSentence], tags: Sequence[str]) -> list[list[str]]:
  """Per-word predicted tags from piece logits [N, L, C]: the argmax at each word's first
  piece; a word with no position (truncated) gets "O" (or the first tag without an "O")."""
  best = np.asarray(logits).argmax(-1)
  fallback = "O" if "O" in tags else tags[0]
  out = []
  for i, sentence in enumerate(sentences):
    words = []
    for j in range(len(sentence.tokens)):
      position = word_positions[i, j] if j < word_positions.shape[1] else -1
      words.append(tags[best[i, position]] if position >= 0 else fallback)
    out.append(words)
  return out


def format_predictions(sentences: Sequence[TaggedSentence], predicted: Sequence[Sequence[str]]
                       ) -> str:
  """CoNLL-format predictions, `token gold predicted` per line (the layout `conlleval` reads),
  a blank line after each sentence."""
  lines = []
  for sentence, tags in zip(sentences, predicted):
    lines += [f"{w} {g} {p}" for w, g, p in zip(sentence.tokens, sentence.tags, tags)] + [""]
  return "\n".join(lines)
