"""Prepared pretraining data on disk: array_record shards of sentence pairs, and their manifest.

A prepared directory (local or `gs://`) holds

  manifest.json              what was prepared from what (see `Manifest`); written last, so its
                             presence means the preparation is complete
  shard-00000.array_record   the shard's records, written with `group_size:1` (random access),
                             uncompressed
  shard-00000.json           the shard's counts, written once the shard is complete (resuming)
  prepare.json               the preparation's parameters, written first (resuming)

One record is one NSP sentence pair `[CLS] A [SEP] B [SEP]` before masking, as little-endian
integers `[len([CLS] A [SEP]), nsp_label, ids...]` of the manifest's `token_dtype` (uint16 for
vocabularies up to 65,536 tokens, else uint32): 2 bytes a token for BERT's vocabulary.
`PreparedRecords` reads them by global index through grain's `ArrayRecordDataSource`.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from mobilebert_jax.data.sources import epath_of

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
PARAMS_FILE = "prepare.json"
WRITER_OPTIONS = "group_size:1,uncompressed"  # ~250-byte records gain nothing from zstd


class PreparedDataError(ValueError):
  """A prepared directory is missing, incomplete, damaged or does not fit the config."""


def shard_name(index: int) -> str:
  return f"shard-{index:05d}.array_record"


def shard_info_name(index: int) -> str:
  return f"shard-{index:05d}.json"


def token_dtype(vocab_size: int) -> np.dtype:
  """The narrowest unsigned little-endian integer that holds every token id."""
  return np.dtype("<u2") if int(vocab_size) <= 1 << 16 else np.dtype("<u4")


def encode_record(sequence: np.ndarray, len_a: int, label: int, dtype: np.dtype) -> bytes:
  """Bytes of one record: [len_a, label, ids...] in `dtype`."""
  out = np.empty(len(sequence) + 2, dtype=dtype)
  out[0], out[1] = len_a, label
  out[2:] = sequence
  return out.tobytes()


def decode_record(record: bytes, dtype: np.dtype) -> tuple[np.ndarray, int, int]:
  """(int32 ids, len_a, nsp label) of one record."""
  values = np.frombuffer(record, dtype=dtype)
  return values[2:].astype(np.int32), int(values[0]), int(values[1])


def vocab_fingerprint(tokens: Sequence[str]) -> str:
  """sha256 of the id-ordered vocabulary: equal fingerprints tokenise to the same ids."""
  return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


def read_json(path, what: str) -> dict:
  """A JSON object from a local or remote file; errors name the file."""
  path = epath_of(path)
  try:
    value = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise PreparedDataError(f"{what} {os.fspath(path)} is not valid JSON ({e}); it is damaged: "
                            "rerun the preparation to rewrite it") from e
  if not isinstance(value, dict):
    raise PreparedDataError(f"{what} {os.fspath(path)} holds a {type(value).__name__}, not "
                            "an object")
  return value


def write_json(path, value: Mapping[str, Any]) -> None:
  """Writes JSON atomically where the filesystem allows (see `write_text_atomic`)."""
  write_text_atomic(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def write_text_atomic(path, text: str) -> None:
  """Writes `text` atomically where the filesystem allows: a per-process temporary file renamed
  over `path` (gs:// objects are atomic by themselves)."""
  path = epath_of(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if "://" in os.fspath(path):
    path.write_text(text)
    return
  tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
  tmp.write_text(text)
  os.replace(os.fspath(tmp), os.fspath(path))


@dataclasses.dataclass(frozen=True)
class Manifest:
  """What a prepared directory holds.

  params: the preparation's parameters (source, vocab fingerprint and size, lower-casing,
    max_seq_length, short_seq_prob, dupe_factor, seed, shard size, format version).
  shards: per shard {file, num_records, num_tokens, num_documents, size_bytes}.
  decode_errors: {input file: undecodable byte sequences replaced by U+FFFD}.
  """
  directory: str
  params: dict
  shards: list
  decode_errors: dict
  stats: dict

  @property
  def num_records(self) -> int:
    return sum(int(s["num_records"]) for s in self.shards)

  @property
  def token_dtype(self) -> np.dtype:
    return token_dtype(self.params["vocab_size"])

  @property
  def fingerprint(self) -> str:
    """Identifies the prepared records (parameters and shard contents by size and count)."""
    body = json.dumps([self.params, [[s["num_records"], s["size_bytes"]] for s in self.shards]],
                      sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]

  def shard_paths(self) -> list[str]:
    return [os.fspath(epath_of(self.directory) / s["file"]) for s in self.shards]

  def to_json(self) -> dict:
    return {"format_version": FORMAT_VERSION, "params": self.params, "shards": self.shards,
            "decode_errors": self.decode_errors, "num_records": self.num_records,
            "num_tokens": sum(int(s["num_tokens"]) for s in self.shards),
            "num_documents": sum(int(s["num_documents"]) for s in self.shards),
            "stats": self.stats}

  @classmethod
  def read(cls, directory) -> "Manifest":
    """The manifest of a prepared directory; errors say what is missing or damaged."""
    directory = os.fspath(directory)
    root = epath_of(directory)
    if not root.is_dir():
      raise PreparedDataError(f"prepared data directory {directory} does not exist; "
                              "prepare it with `python -m mobilebert_jax.data.prepare`")
    path = root / MANIFEST_FILE
    if not path.is_file():
      partial = (root / PARAMS_FILE).is_file()
      raise PreparedDataError(
          f"prepared data directory {directory} has no {MANIFEST_FILE}: "
          + ("its preparation was interrupted; rerun the same prepare command to finish it"
             if partial else "it is not a prepared directory"))
    raw = read_json(path, "prepared data manifest")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
      raise PreparedDataError(f"{os.fspath(path)} has format_version {version!r}, this "
                              f"version of mobilebert_jax reads {FORMAT_VERSION}: prepare "
                              "the corpus again")
    try:
      return cls(directory, dict(raw["params"]), list(raw["shards"]),
                 dict(raw.get("decode_errors", {})), dict(raw.get("stats", {})))
    except KeyError as e:
      raise PreparedDataError(f"{os.fspath(path)} lacks the key {e}; it is damaged: rerun "
                              "the preparation") from e

  def check(self, expected: Mapping[str, Any], where: str, note: str = "") -> None:
    """Raises PreparedDataError naming both values for every parameter that differs."""
    diff = [f"{k}: prepared {self.params.get(k)!r} vs {where} {v!r}"
            for k, v in expected.items() if self.params.get(k) != v]
    if diff:
      raise PreparedDataError(
          f"prepared data {self.directory} does not fit {where} (" + "; ".join(diff)
          + f"){note}: prepare the corpus again with these settings or point to a "
          "matching directory")

  def verify_shards(self) -> None:
    """Raises PreparedDataError naming the first shard that is missing or of the wrong size
    (one stat per shard, 32 at a time; the records' own checksums catch damage on read)."""
    from concurrent.futures import ThreadPoolExecutor
    paths = self.shard_paths()
    sizes = [int(info["size_bytes"]) for info in self.shards]
    with ThreadPoolExecutor(max(1, min(32, len(paths)))) as pool:  # remote stats are slow
      problems = list(pool.map(shard_problem, paths, sizes))
    for path, problem in zip(paths, problems):
      if problem:
        raise PreparedDataError(f"prepared shard {path} {problem}; rerun the same prepare "
                                "command to rebuild it (the other shards are kept)")


def shard_problem(path, size_bytes: int) -> str | None:
  """Why the shard file at `path` is not the complete shard of `size_bytes` bytes (or None)."""
  p = epath_of(path)
  if not p.exists():
    return "is missing"
  size = p.stat().length
  if size != size_bytes:
    return f"is damaged: {size} bytes where {size_bytes} were written"
  return None


class PreparedRecords:
  """Random access to the records of a prepared directory by global index (all shards in
  manifest order), through grain's `ArrayRecordDataSource`; picklable, so grain's worker
  processes open their own readers. A read that fails names the shard."""

  def __init__(self, manifest: Manifest):
    from grain.sources import ArrayRecordDataSource
    self.paths = manifest.shard_paths()
    counts = [int(s["num_records"]) for s in manifest.shards]
    self._ends = list(np.cumsum(counts))
    self.dtype = manifest.token_dtype
    # "path[0:n]" read instructions: no shard is opened before it is read.
    self._source = ArrayRecordDataSource([f"{p}[0:{n}]" for p, n in zip(self.paths, counts)])

  def __len__(self) -> int:
    return int(self._ends[-1]) if self._ends else 0

  def shard_of(self, index: int) -> str:
    return self.paths[bisect.bisect_right(self._ends, int(index))]

  def _failed(self, indices: Sequence[int], error: Exception) -> PreparedDataError:
    shards = sorted({self.shard_of(i) for i in indices})
    return PreparedDataError(
        f"reading record(s) {list(indices)[:4]} failed in prepared shard(s) {shards}: "
        f"{type(error).__name__}: {error}; the shard is damaged: delete it and rerun the "
        "same prepare command (for data the trainer prepared, the training command) to "
        "rebuild it")

  def read(self, indices: Sequence[int]) -> list[tuple[np.ndarray, int, int]]:
    """Decoded records (ids, len_a, label) at global `indices`."""
    indices = [int(i) for i in indices]
    try:
      raw = self._source.__getitems__(indices)
    except Exception as e:  # array_record raises plain runtime errors naming no shard
      raise self._failed(indices, e) from e
    out = []
    for index, record in zip(indices, raw):
      try:
        out.append(decode_record(record, self.dtype))
      except ValueError as e:
        raise self._failed([index], e) from e
    return out
