"""Where pretraining text comes from: text files, JSON lines or a prepared tensorflow-datasets builder.

A *document* is a list of sentences (strings), or its running text (a string that
`split_sentences` splits later, in the worker that tokenises it). Text files follow BERT's
convention: one sentence per line, a blank line between documents. JSON-lines files hold one
document per line, an object whose `text_key` field is the document's running text. Reading is
split in two: `iter_raw_documents` streams a file's documents as raw bytes (cutting only at
document boundaries: the cheap, serial part), and `decode_documents` decodes and parses them (in
the preparation's worker processes). Memory is bounded by the largest document.

Paths may be local or remote (`gs://bucket/...`): files are opened and globbed through
`etils.epath`. Bytes that are not UTF-8 are replaced by U+FFFD and counted per file in a
`DecodeErrors` tally, which the preparation writes into its manifest.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re
from typing import Iterator, Sequence

Document = list[str]
TEXT_FORMATS = ("text", "jsonl")

_GLOB_CHARS = re.compile(r"[*?\[]")
_REPLACEMENT = "\ufffd"


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL (gs://, s3://, ...) rather than a local path."""
  return "://" in os.fspath(path)


def epath_of(path: str | os.PathLike):
  """An `etils.epath.Path` for a local or remote path (user home expanded for local ones)."""
  from etils import epath
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.expanduser(path))


def split_patterns(patterns) -> list[str]:
  """Paths/globs from a string (comma-separated, as given on a command line) or a sequence."""
  if isinstance(patterns, os.PathLike):
    patterns = [os.fspath(patterns)]
  if isinstance(patterns, str):
    patterns = patterns.split(",")
  out = [os.fspath(p).strip() for p in patterns]
  return [p for p in out if p]


def _glob(pattern: str) -> list[str]:
  if not is_remote(pattern):
    return sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))
  # Remote: glob below the longest directory prefix that holds no wildcard.
  first = _GLOB_CHARS.search(pattern).start()
  base = pattern[:pattern.rfind("/", 0, first) + 1]
  return sorted(os.fspath(p) for p in epath_of(base).glob(pattern[len(base):])
                if not p.is_dir())


def expand_paths(patterns) -> list[str]:
  """Expands file paths and glob patterns, local or remote (sorted per pattern, first
  occurrence kept). A string may hold several, comma-separated.

  Raises FileNotFoundError naming the path for a missing file or a glob that matches nothing.
  """
  patterns = split_patterns(patterns)
  if not patterns:
    raise ValueError("no input files given (an empty list of paths/patterns)")
  out: list[str] = []
  for pattern in patterns:
    pattern = pattern if is_remote(pattern) else os.path.expanduser(pattern)
    if _GLOB_CHARS.search(pattern):
      matches = _glob(pattern)
      if not matches:
        raise FileNotFoundError(f"input glob {pattern!r} matches no files")
    else:
      path = epath_of(pattern)
      if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"input file {pattern!r} {what}")
      matches = [pattern]
    for m in matches:
      if m not in out:
        out.append(m)
  return out


def input_format(path: str, declared: str = "auto") -> str:
  """"text" or "jsonl" for a file: `declared`, or by extension (.jsonl/.json: JSON lines)."""
  if declared != "auto":
    if declared not in TEXT_FORMATS:
      raise ValueError(f"input format {declared!r} is not one of {('auto',) + TEXT_FORMATS}")
    return declared
  return "jsonl" if path.lower().endswith((".jsonl", ".json")) else "text"


class DecodeErrors(collections.Counter):
  """Per file, how many undecodable byte sequences were replaced by U+FFFD."""


def decode_line(raw: bytes, path: str, errors: DecodeErrors | None) -> str:
  """UTF-8 text of one line; undecodable bytes are replaced and counted against `path`."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    text = raw.decode("utf-8", errors="replace")
    if errors is not None:
      errors[path] += text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode("utf-8"))
    return text


@dataclasses.dataclass(frozen=True)
class RawDocument:
  """One document as read, before decoding: the bytes of a text file's document (its lines,
  each ending in a newline) or of one JSON line, with the file and its first line number; or,
  from tfds, the running text itself (`path` None)."""
  path: str | None
  format: str            # "text", "jsonl" or "running"
  data: bytes | str
  line: int = 0


def iter_raw_documents(path: str, fmt: str = "auto") -> Iterator[RawDocument]:
  """Streams the documents of one file as raw bytes, cut at document boundaries only (blank
  lines in text files, lines in JSON-lines files): the cheap, serial part of reading, leaving
  decoding and parsing to `decode_documents` (in parallel workers).

  Raises ValueError naming the file if it holds no text.
  """
  fmt = input_format(path, fmt)
  empty = True
  lines: list[bytes] = []
  first = 0
  with epath_of(path).open("rb") as f:
    for number, raw in enumerate(f, start=1):
      if not raw.endswith(b"\n"):
        raw += b"\n"
      if not raw.strip():
        if lines:
          yield RawDocument(path, fmt, b"".join(lines), first)
          lines = []
        continue
      empty = False
      if fmt == "jsonl":
        yield RawDocument(path, fmt, raw, number)
        continue
      if not lines:
        first = number
      lines.append(raw)
  if lines:
    yield RawDocument(path, fmt, b"".join(lines), first)
  if empty:
    raise ValueError(f"input file {path!r} is empty (no non-blank lines)")


def _json_text(raw: bytes, path: str, number: int, text_key: str,
               errors: DecodeErrors | None) -> str:
  try:
    record = json.loads(decode_line(raw, path, errors))
  except json.JSONDecodeError as e:
    raise ValueError(f"input file {path!r} line {number} is not JSON: {e}") from e
  if not isinstance(record, dict) or text_key not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise KeyError(f"input file {path!r} line {number} has no field {text_key!r} "
                   f"(it has {keys}); set the text key to the field holding the text")
  text = record[text_key]
  if not isinstance(text, str):
    raise ValueError(f"input file {path!r} line {number}: field {text_key!r} is a "
                     f"{type(text).__name__}, not text")
  return text


def decode_documents(raw: Sequence[RawDocument], text_key: str = "text",
                     errors: DecodeErrors | None = None) -> Iterator[Document | str]:
  """Decodes raw documents: text-file documents into sentence lists (one per line), JSON
  lines into the running text of field `text_key` (blank texts skipped). Undecodable bytes are
  replaced and counted in `errors`; JSON errors name the file, the line and the key."""
  for doc in raw:
    if doc.format == "running":
      yield doc.data
    elif doc.format == "jsonl":
      text = _json_text(doc.data, doc.path, doc.line, text_key, errors)
      if text.strip():
        yield text
    else:
      sentences = [line.strip() for line in
                   (decode_line(r, doc.path, errors) for r in doc.data.split(b"\n"))]
      sentences = [s for s in sentences if s]
      if sentences:
        yield sentences


def read_text_documents(patterns) -> list[Document]:
  """Reads every document of BERT-format text files / globs into memory (small corpora).

  Raises FileNotFoundError for missing files and globs matching nothing, and ValueError naming
  the file for a file that holds no text.
  """
  return [doc for path in expand_paths(patterns)
          for doc in decode_documents(list(iter_raw_documents(path, "text")))]


# ---------------------------------------------------------------------------------------------
# Rule-based sentence splitting, for sources whose text is not already one sentence per line.

_ABBREVIATIONS = frozenset("""
    mr mrs ms dr prof sr jr st vs e.g i.e cf al approx ca fig figs eq vol pp ed eds inc ltd co
    corp gen col lt sgt capt gov sen rep rev mt ft jan feb mar apr jun jul aug sep sept oct nov
    dec u.s u.k a.m p.m no
    """.split())
# A run of terminal punctuation, optional closing quotes/brackets, whitespace, then something that
# can start a sentence (optionally behind an opening quote/bracket).
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
  """Splits running text into sentences with simple rules.

  Line breaks always end a sentence (paragraphs); inside a line a sentence ends at `.`, `!` or
  `?` followed by whitespace and an upper-case letter or digit, unless the period ends a common
  abbreviation ("Dr.", "e.g.") or a single-letter initial ("J.").
  """
  sentences: list[str] = []
  for paragraph in text.splitlines():
    paragraph = paragraph.strip()
    start = 0
    for m in _BOUNDARY.finditer(paragraph):
      punct = m.group(0).rstrip()
      if punct.rstrip("\"'\u201d\u2019)]") == ".":
        words = paragraph[start:m.start()].split()
        last = words[-1].lower().lstrip("\"'(\u201c[") if words else ""
        if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
          continue
      sentence = paragraph[start:m.end()].strip()
      if sentence:
        sentences.append(sentence)
      start = m.end()
    tail = paragraph[start:].strip()
    if tail:
      sentences.append(tail)
  return sentences


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets.

def tfds_builder(name: str, data_dir: str | os.PathLike):
  """The prepared tfds builder `name` in `data_dir` (local or gs://); never downloads."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
        f"reading tfds dataset {name!r} needs tensorflow-datasets, which is not installed; "
        "install it with `pip install 'mobilebert_jax[tfds]'` (tensorflow-datasets and "
        "tensorflow-cpu), or use local text files instead") from e
  if not data_dir or not epath_of(data_dir).is_dir():
    raise FileNotFoundError(f"tfds data_dir {data_dir!r} for dataset {name!r} does not exist")
  data_dir = os.fspath(data_dir)
  builder = tfds.builder(name, data_dir=data_dir)
  prepared_dir = os.fspath(builder.data_dir)
  if not (epath_of(prepared_dir) / "dataset_info.json").is_file():
    raise FileNotFoundError(
        f"tfds dataset {name!r} is not prepared in data_dir {data_dir!r} (no "
        f"dataset_info.json in {prepared_dir!r}); prepare it first, this pipeline never "
        "downloads")
  return tfds, builder


def iter_tfds_documents(name: str, data_dir: str | os.PathLike, split: str = "train",
                        text_key: str = "text", max_documents: int | None = None
                        ) -> Iterator[str]:
  """Streams the articles of a prepared tfds builder as running text (one per document).

  `data_dir` may be local or gs://, and must hold the prepared dataset (e.g. after `tfds build
  wikipedia/20230601.en --data_dir=...` elsewhere). Each example's `text_key` feature is one
  document; empty articles are skipped. Raises ValueError if the split yields no text.
  """
  tfds, builder = tfds_builder(name, data_dir)
  features = builder.info.features
  if text_key not in features:
    raise KeyError(f"tfds dataset {name!r} has no feature {text_key!r}; it has "
                   f"{sorted(features.keys())}")
  ds = builder.as_dataset(split=split, shuffle_files=False)
  count = 0
  for example in tfds.as_numpy(ds):
    text = example[text_key]
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    if str(text).strip():
      count += 1
      yield str(text)
      if max_documents is not None and count >= max_documents:
        return
  if not count:
    raise ValueError(f"tfds dataset {name!r} split {split!r} in {os.fspath(data_dir)!r} "
                     f"yielded no text in feature {text_key!r}")


def read_tfds_documents(name: str, data_dir: str | os.PathLike, split: str = "train",
                        text_key: str = "text", max_documents: int | None = None
                        ) -> list[Document]:
  """Reads articles of a prepared tfds builder into memory, split into sentences (small
  samples; see `iter_tfds_documents`)."""
  docs = (split_sentences(text) for text in
          iter_tfds_documents(name, data_dir, split, text_key, max_documents))
  return [d for d in docs if d]
