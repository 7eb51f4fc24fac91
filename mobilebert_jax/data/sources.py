"""Where pretraining text comes from: local text files or a prepared tensorflow-datasets builder.

A *document* is a list of sentences (strings). Text files follow BERT's convention: one sentence
per line, a blank line between documents. `tokenize_documents` turns documents into lists of
per-sentence token-id lists, the input of `pretraining.create_instances`.
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

Document = list[str]
TokenizedDocument = list[list[int]]

_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_paths(patterns: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expands file paths and glob patterns (sorted per pattern, first occurrence kept).

    Raises FileNotFoundError naming the path for a missing file or a glob that matches nothing.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    if not patterns:
        raise ValueError("no input files given (an empty list of paths/patterns)")
    out: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(os.fspath(pattern))
        if _GLOB_CHARS.search(pattern):
            matches = sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))
            if not matches:
                raise FileNotFoundError(f"input glob {pattern!r} matches no files")
        else:
            if not os.path.isfile(pattern):
                what = "is a directory, not a file" if os.path.isdir(pattern) else "does not exist"
                raise FileNotFoundError(f"input file {pattern!r} {what}")
            matches = [pattern]
        for m in matches:
            path = Path(m)
            if path not in out:
                out.append(path)
    return out


def parse_documents(lines: Iterable[str]) -> list[Document]:
    """Groups lines into documents: one sentence per line, blank line(s) between documents."""
    docs: list[Document] = []
    current: Document = []
    for line in lines:
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            docs.append(current)
            current = []
    if current:
        docs.append(current)
    return docs


def read_text_documents(patterns: str | os.PathLike | Sequence[str | os.PathLike]
                        ) -> list[Document]:
    """Reads documents from text files / globs (BERT format). A file ends its last document.

    Raises FileNotFoundError for missing files and globs matching nothing, and ValueError naming
    the file for a file that holds no text.
    """
    docs: list[Document] = []
    for path in expand_paths(patterns):
        with open(path, encoding="utf-8") as f:
            file_docs = parse_documents(f)
        if not file_docs:
            raise ValueError(f"input file {str(path)!r} is empty (no non-blank lines)")
        docs.extend(file_docs)
    return docs


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

def read_tfds_documents(name: str, data_dir: str | os.PathLike, split: str = "train",
                        text_key: str = "text", max_documents: int | None = None
                        ) -> list[Document]:
    """Reads articles from an already-prepared tfds builder and splits them into sentences.

    Never downloads: `data_dir` must hold the prepared dataset (e.g. after running
    `tfds build wikipedia/20230601.en --data_dir=...` elsewhere). Each example's `text_key`
    feature is one document; empty articles are skipped.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"reading tfds dataset {name!r} needs tensorflow-datasets, which is not installed; "
            "install it with `pip install 'mobilebert_jax[tfds]'` (tensorflow-datasets and "
            "tensorflow-cpu), or use local text files instead") from e
    if data_dir is None or not os.path.isdir(os.fspath(data_dir)):
        raise FileNotFoundError(f"tfds data_dir {data_dir!r} for dataset {name!r} does not exist")
    builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    prepared_dir = os.fspath(builder.data_dir)
    if not os.path.isfile(os.path.join(prepared_dir, "dataset_info.json")):
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in data_dir {os.fspath(data_dir)!r} (no "
            f"dataset_info.json in {prepared_dir!r}); prepare it first, this pipeline never "
            "downloads")
    features = builder.info.features
    if text_key not in features:
        raise KeyError(f"tfds dataset {name!r} has no feature {text_key!r}; it has "
                       f"{sorted(features.keys())}")
    ds = builder.as_dataset(split=split, shuffle_files=False)
    docs: list[Document] = []
    for example in tfds.as_numpy(ds):
        text = example[text_key]
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        sentences = split_sentences(str(text))
        if sentences:
            docs.append(sentences)
        if max_documents is not None and len(docs) >= max_documents:
            break
    if not docs:
        raise ValueError(f"tfds dataset {name!r} split {split!r} in {os.fspath(data_dir)!r} "
                         f"yielded no text in feature {text_key!r}")
    return docs


# ---------------------------------------------------------------------------------------------
# Tokenisation.

def tokenize_documents(documents: Sequence[Document], tokenizer, batch_size: int = 4096
                       ) -> list[TokenizedDocument]:
    """Tokenises every sentence (fast tokenizer, batch mode, no special tokens).

    Returns one list of token-id lists per document; sentences that tokenise to nothing and
    documents left empty are dropped.
    """
    flat = [s for doc in documents for s in doc]
    ids: list[list[int]] = []
    for i in range(0, len(flat), batch_size):
        enc = tokenizer(flat[i:i + batch_size], add_special_tokens=False,
                        return_attention_mask=False, return_token_type_ids=False)
        ids.extend(enc["input_ids"])
    out: list[TokenizedDocument] = []
    pos = 0
    for doc in documents:
        sents = [s for s in ids[pos:pos + len(doc)] if s]
        pos += len(doc)
        if sents:
            out.append(sents)
    return out
