"""Prepare a pretraining corpus once: sharded array_record files of NSP sentence pairs + manifest.

    python -m mobilebert_jax.data.prepare --input='corpus/*.txt' --vocab=VOCAB --output=DIR \
        --max_seq_length=128 [--dupe_factor=5 --num_workers=8 --shard_size_mb=8]

Inputs: BERT-format text files or globs (one sentence per line, blank line between documents),
JSON-lines files (`--text_key`, default "text", holding a document's running text; chosen by a
.jsonl/.json extension or `--input_format=jsonl`), or a prepared tensorflow-datasets builder
(`--tfds_name=wikipedia/20230601.en --tfds_data_dir=gs://...`). Paths may be local or gs://.

How (see `prepare_corpus`): the main process streams documents and cuts them into chunks of about
`shard_size_mb` of text; worker processes (`num_workers`, default every core) tokenise a chunk
with the `tokenizers` library's batch encoding, pack it into BERT's sentence pairs (`dupe_factor`
passes, each segmenting differently; a random-next B comes from another document of the same
chunk, as BERT's `create_pretraining_data` draws it from the documents of its own invocation) and
write one shard. At most `num_workers + 2` chunks are in memory at once, whatever the corpus
size. Masking is not done here: the loader masks anew every epoch. A finished shard leaves a
`shard-NNNNN.json` beside it, so an interrupted preparation rerun with the same command skips the
finished shards, and a shard found missing or damaged is rebuilt alone. The manifest is written
last (see `mobilebert_jax.data.records`).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import tempfile
import time
from concurrent import futures
from typing import Any, Iterator, Sequence

import numpy as np

from mobilebert_jax.data import pretraining, records, sources
from mobilebert_jax.data.paths import sample_text_path, sample_vocab_path

log = logging.getLogger("mobilebert_jax")

SENTENCE_BATCH = 2048  # sentences per call into the tokenizer


@dataclasses.dataclass(frozen=True)
class CorpusSource:
  """Where documents come from: files (`input_files`, paths/globs, comma-separated in a
  string) or a prepared tfds builder (`tfds_name` in `tfds_data_dir`)."""
  input_files: Any = ()
  input_format: str = "auto"
  text_key: str = "text"
  tfds_name: str = ""
  tfds_data_dir: str = ""
  tfds_split: str = "train"
  max_documents: int = 0  # tfds only; 0 = every document

  def __post_init__(self):
    has_files = bool(sources.split_patterns(self.input_files or ()))
    if has_files == bool(self.tfds_name):
      raise ValueError(f"a corpus is either input files ({self.input_files!r}) or a tfds "
                       f"dataset ({self.tfds_name!r}): set exactly one")
    if self.tfds_name and not self.tfds_data_dir:
      raise ValueError(f"tfds dataset {self.tfds_name!r} needs its tfds_data_dir (the "
                       "directory holding the prepared dataset)")

  def files(self) -> list[str]:
    return sources.expand_paths(self.input_files) if not self.tfds_name else []

  def describe(self) -> dict:
    """The source as it enters the preparation's parameters (files with their sizes)."""
    if self.tfds_name:
      return {"tfds_name": self.tfds_name, "tfds_data_dir": str(self.tfds_data_dir),
              "tfds_split": self.tfds_split, "text_key": self.text_key,
              "max_documents": int(self.max_documents)}
    files = [[f, sources.epath_of(f).stat().length] for f in self.files()]
    for path, size in files:
      if size == 0:
        raise ValueError(f"input file {path!r} is empty (0 bytes)")
    return {"files": files,
            "input_format": self.input_format, "text_key": self.text_key}

  def total_bytes(self) -> int | None:
    if self.tfds_name:
      return None
    return sum(sources.epath_of(f).stat().length for f in self.files())

  def raw_documents(self) -> Iterator[sources.RawDocument]:
    """Documents in corpus order, undecoded (see `sources.iter_raw_documents`)."""
    if self.tfds_name:
      for text in sources.iter_tfds_documents(self.tfds_name, self.tfds_data_dir,
                                              self.tfds_split, self.text_key,
                                              self.max_documents or None):
        yield sources.RawDocument(None, "running", text)
      return
    for path in self.files():
      yield from sources.iter_raw_documents(path, self.input_format)


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  """How documents become records. `num_workers=None`: one process per core for corpora of
  several shards, none (in-process) for a corpus of one shard."""
  max_seq_length: int = 128
  short_seq_prob: float = 0.1
  dupe_factor: int = 1
  seed: int = 0
  do_lower_case: bool = True
  shard_size_mb: float = 8.0
  num_workers: int | None = None

  def validate(self) -> None:
    if not isinstance(self.max_seq_length, int) or self.max_seq_length < 5:
      raise ValueError(f"max_seq_length={self.max_seq_length!r} must be an int >= 5 "
                       "([CLS] A [SEP] B [SEP])")
    if not 0.0 <= self.short_seq_prob <= 1.0:
      raise ValueError(f"short_seq_prob={self.short_seq_prob!r} must be in [0, 1]")
    if not isinstance(self.dupe_factor, int) or self.dupe_factor < 1:
      raise ValueError(f"dupe_factor={self.dupe_factor!r} must be an int >= 1")
    if self.shard_size_mb <= 0:
      raise ValueError(f"shard_size_mb={self.shard_size_mb!r} must be positive")


@dataclasses.dataclass(frozen=True)
class VocabInfo:
  """What the preparation needs of a tokenizer, in a picklable form."""
  path: str
  fingerprint: str
  size: int
  tokenizer_json: str
  cls_id: int
  sep_id: int

  @classmethod
  def load(cls, vocab_path, do_lower_case: bool) -> "VocabInfo":
    from mobilebert_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(vocab_path, do_lower_case=do_lower_case)
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    return cls(str(tok.vocab_path), records.vocab_fingerprint(tokens), len(tokens),
               tok.backend_tokenizer.to_str(), int(tok.cls_token_id), int(tok.sep_token_id))


def preparation_params(source: CorpusSource, vocab: VocabInfo, options: PrepareOptions) -> dict:
  """The parameters that determine the prepared records (compared on every rerun)."""
  return {"format_version": records.FORMAT_VERSION, "source": source.describe(),
          "vocab_fingerprint": vocab.fingerprint, "vocab_size": vocab.size,
          "do_lower_case": bool(options.do_lower_case),
          "max_seq_length": int(options.max_seq_length),
          "short_seq_prob": float(options.short_seq_prob),
          "dupe_factor": int(options.dupe_factor), "seed": int(options.seed),
          "shard_size_mb": float(options.shard_size_mb)}


def params_digest(params: dict) -> str:
  return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# One shard (runs in a worker process, or in-process).

@dataclasses.dataclass(frozen=True)
class _ShardJob:
  vocab: VocabInfo
  output_dir: str
  max_seq_length: int
  short_seq_prob: float
  dupe_factor: int
  seed: int
  digest: str
  parallel_tokenizer: bool
  text_key: str = "text"


_tokenizers: dict[str, Any] = {}


def _tokenizer(job: _ShardJob):
  if job.vocab.fingerprint not in _tokenizers:
    if not job.parallel_tokenizer:  # one worker process per core: no threads inside
      os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer
    _tokenizers[job.vocab.fingerprint] = Tokenizer.from_str(job.vocab.tokenizer_json)
  return _tokenizers[job.vocab.fingerprint]


def tokenize_chunk(documents: Sequence[list[str] | str], tokenizer
                   ) -> tuple[pretraining.TokenizedDocuments, int]:
  """Tokenises documents (sentence lists, or running text split by `split_sentences`) into
  the flat layout (empty sentences and documents dropped); returns it and the number of
  sentences read. Ids go to numpy batch by batch, never held as Python lists."""
  sentences: list[str] = []
  per_doc: list[int] = []
  for doc in documents:
    doc_sentences = sources.split_sentences(doc) if isinstance(doc, str) else doc
    sentences.extend(doc_sentences)
    per_doc.append(len(doc_sentences))
  encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
  tokens, lengths = [], []
  for i in range(0, len(sentences), SENTENCE_BATCH):
    ids = [e.ids for e in encode(sentences[i:i + SENTENCE_BATCH], add_special_tokens=False)]
    lengths.append(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)))
    tokens.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32))
  tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
  lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
  return pretraining.TokenizedDocuments.from_lengths(tokens, lengths, per_doc), len(sentences)


def _write_shard(path: str, payloads: Sequence[bytes]) -> int:
  """Writes the records as an array_record file at a local or remote path; returns its size.

  The file appears whole or not at all (a temporary file of this process, then a rename or an
  upload), so a crash, a full disk or a second preparation of the same directory never leaves
  a partial shard under the shard's name.
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  remote = sources.is_remote(path)
  tmp_dir = tempfile.mkdtemp(prefix="mbj_shard_") if remote else None
  local = (os.path.join(tmp_dir, os.path.basename(path)) if remote else
           os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp"))
  try:
    try:
      writer = ArrayRecordWriter(local, records.WRITER_OPTIONS)
      for payload in payloads:
        writer.write(payload)
      writer.close()
      size = os.path.getsize(local)
      if remote:
        sources.epath_of(local).copy(sources.epath_of(path), overwrite=True)
      else:
        os.replace(local, path)
    except (OSError, RuntimeError, ValueError) as e:
      raise OSError(f"writing prepared shard {path} failed ({type(e).__name__}: {e}); is "
                    "the disk full? The shards already written are kept: rerun the same "
                    "command to go on") from e
  finally:
    if remote:
      import shutil
      shutil.rmtree(tmp_dir, ignore_errors=True)
    elif os.path.exists(local):
      os.remove(local)
  return size


def prepare_shard(index: int, raw: Sequence[sources.RawDocument], job: _ShardJob) -> dict:
  """Decodes, tokenises, packs and writes shard `index`, then its info file; returns the info
  (counts, size, undecodable bytes per input file)."""
  start = time.perf_counter()
  errors = sources.DecodeErrors()
  documents = list(sources.decode_documents(raw, job.text_key, errors))
  docs, num_sentences = tokenize_chunk(documents, _tokenizer(job))
  if len(docs) < 2:
    files = sorted({d.path for d in raw if d.path})
    raise ValueError(f"shard {index} (from {files or 'tfds'}) holds {len(docs)} non-empty "
                     "document(s) after tokenisation; next-sentence pairs need at least 2")
  instances = pretraining.create_instances(docs, job.max_seq_length, job.short_seq_prob,
                                           job.dupe_factor, (job.seed, index))
  dtype = records.token_dtype(job.vocab.size)
  payloads = []
  for inst in instances:
    seq, len_a = pretraining.instance_sequence(inst, job.vocab.cls_id, job.vocab.sep_id)
    payloads.append(records.encode_record(seq, len_a, inst.is_random_next, dtype))
  root = sources.epath_of(job.output_dir)
  size = _write_shard(os.fspath(root / records.shard_name(index)), payloads)
  info = {"file": records.shard_name(index), "num_records": len(payloads),
          "num_tokens": int(docs.tokens.size), "num_documents": len(docs),
          "num_sentences": num_sentences, "size_bytes": size, "digest": job.digest,
          "decode_errors": dict(errors), "seconds": round(time.perf_counter() - start, 3)}
  records.write_json(root / records.shard_info_name(index), info)
  return info


def finished_shard(output_dir: str, index: int, digest: str) -> dict | None:
  """The info of shard `index` if it was completed by a preparation with the same parameters
  and its file is intact (by size), else None."""
  root = sources.epath_of(output_dir)
  info_path = root / records.shard_info_name(index)
  if not info_path.exists():
    return None
  try:
    info = records.read_json(info_path, "shard info")
  except records.PreparedDataError:
    return None
  if info.get("digest") != digest:
    return None
  problem = records.shard_problem(root / records.shard_name(index), int(info["size_bytes"]))
  if problem:
    log.warning("prepare: shard %s %s; rebuilding it", records.shard_name(index), problem)
    return None
  return info


# ---------------------------------------------------------------------------------------------
# The corpus.

def chunk_documents(documents: Iterator[sources.RawDocument], chunk_bytes: int
                    ) -> Iterator[tuple[list, int]]:
  """Cuts the document stream into chunks of >= `chunk_bytes` and >= 2 documents (a last
  chunk of one document joins the chunk before it); yields (chunk, its size)."""
  previous: tuple[list, int] | None = None
  chunk: list = []
  size = 0
  for doc in documents:
    chunk.append(doc)
    size += len(doc.data)
    if size >= chunk_bytes and len(chunk) >= 2:
      if previous is not None:
        yield previous
      previous, chunk, size = (chunk, size), [], 0
  if chunk:
    if previous is not None and len(chunk) < 2:
      previous = (previous[0] + chunk, previous[1] + size)
    else:
      if previous is not None:
        yield previous
      previous = (chunk, size)
  if previous is not None:
    yield previous


class _InlineExecutor(futures.Executor):
  """Runs each task at submission, in this process (a corpus of one shard needs no workers)."""

  @staticmethod
  def done(value) -> futures.Future:
    future = futures.Future()
    future.set_result(value)
    return future

  def submit(self, fn, /, *args, **kwargs) -> futures.Future:
    return self.done(fn(*args, **kwargs))


class _Progress:
  """Logs shards, documents, tokens, tokens/s and (for files) the fraction read and ETA."""

  def __init__(self, total_bytes: int | None, every_s: float):
    self.total, self.every = total_bytes, every_s
    self.start = self.last = time.perf_counter()
    self.bytes = self.shards = self.docs = self.tokens = self.records = 0

  def add(self, info: dict, size: int) -> None:
    self.bytes += size
    self.shards += 1
    self.docs += int(info["num_documents"])
    self.tokens += int(info["num_tokens"])
    self.records += int(info["num_records"])
    if time.perf_counter() - self.last >= self.every:
      self.report()

  def report(self) -> None:
    now = self.last = time.perf_counter()
    rate = self.tokens / max(now - self.start, 1e-9)
    where = ""
    if self.total:
      done = min(self.bytes / self.total, 1.0)
      eta = (now - self.start) * (1 - done) / max(done, 1e-9)
      where = f", {100 * done:.1f}% of the input, ETA {eta / 60:.1f} min"
    log.info("prepare: %d shards, %d documents, %d tokens, %d sequences, %.0f tokens/s%s",
             self.shards, self.docs, self.tokens, self.records, rate, where)


def _start_params(output_dir: str, params: dict) -> None:
  """Writes prepare.json, or checks it against `params` if a preparation already started."""
  root = sources.epath_of(output_dir)
  path = root / records.PARAMS_FILE
  if path.exists():
    old = records.read_json(path, "preparation parameters")
    diff = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
    if diff:
      detail = "; ".join(f"{k}: in the directory {old.get(k)!r} vs now {params.get(k)!r}"
                         for k in diff)
      raise records.PreparedDataError(
          f"output directory {output_dir} holds a preparation with other parameters "
          f"({detail}); nothing was changed: use another output directory")
    return
  root.mkdir(parents=True, exist_ok=True)
  records.write_json(path, params)


def prepare_corpus(source: CorpusSource, vocab, output_dir: str,
                   options: PrepareOptions = PrepareOptions(), *, log_every_s: float = 30.0
                   ) -> records.Manifest:
  """Prepares `source` into `output_dir` (local or gs://) and returns the manifest.

  `vocab`: a VocabInfo, or a vocab path (empty: the shipped demo vocab). Idempotent: a
  complete directory with the same parameters is returned as it is; an interrupted one is
  finished (finished shards are kept, missing or damaged ones rebuilt); a directory prepared
  with other parameters raises PreparedDataError naming them and changes nothing.
  """
  options.validate()
  output_dir = os.fspath(output_dir)
  if not sources.is_remote(output_dir):
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
  if not isinstance(vocab, VocabInfo):
    vocab = VocabInfo.load(vocab or sample_vocab_path(), options.do_lower_case)
  params = preparation_params(source, vocab, options)
  digest = params_digest(params)
  root = sources.epath_of(output_dir)
  if (root / records.MANIFEST_FILE).exists():
    manifest = records.Manifest.read(output_dir)
    if manifest.params == params:
      try:
        manifest.verify_shards()
        return manifest
      except records.PreparedDataError as e:
        log.warning("prepare: %s", e)
  _start_params(output_dir, params)

  chunk_bytes = int(options.shard_size_mb * 2**20)
  total = source.total_bytes()
  workers = options.num_workers
  if workers is None:
    workers = (os.cpu_count() or 1) if total is None or total > chunk_bytes else 0
  job = _ShardJob(vocab, output_dir, int(options.max_seq_length), float(options.short_seq_prob),
                  int(options.dupe_factor), int(options.seed), digest,
                  parallel_tokenizer=workers <= 1, text_key=source.text_key)
  progress = _Progress(total, log_every_s)
  infos: dict[int, dict] = {}
  start = time.perf_counter()
  what = params["source"].get("tfds_name") or f"{len(params['source']['files'])} file(s)"
  log.info("prepare: %s -> %s (%s worker process(es), shards of ~%g MB of text)", what,
           output_dir, workers or "no", options.shard_size_mb)

  # Shards are collected in order, with at most `workers + 1` chunks in flight (none inline).
  in_flight = workers + 1 if workers > 1 else 0
  executor = (futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(
      "spawn")) if workers > 1 else _InlineExecutor())  # spawn: the caller may run jax threads
  pending: collections.deque = collections.deque()

  def collect() -> None:
    i, size, future = pending.popleft()
    infos[i] = future.result()
    progress.add(infos[i], size)

  with executor as pool:
    for index, (docs, size) in enumerate(chunk_documents(source.raw_documents(),
                                                          chunk_bytes)):
      done = finished_shard(output_dir, index, digest)
      pending.append((index, size, _InlineExecutor.done(done) if done is not None
                      else pool.submit(prepare_shard, index, docs, job)))
      del docs
      while len(pending) > in_flight:
        collect()
    while pending:
      collect()
  if not infos:
    raise ValueError(f"the corpus {params['source']} holds no documents")
  shards = [infos[i] for i in range(len(infos))]
  errors = sources.DecodeErrors()
  for info in shards:
    errors.update(info.pop("decode_errors", {}))
  seconds = time.perf_counter() - start
  tokens = sum(int(s["num_tokens"]) for s in shards)
  manifest = records.Manifest(
      output_dir, params, shards, dict(errors),
      {"seconds": round(seconds, 2), "tokens_per_second": round(tokens / max(seconds, 1e-9)),
       "num_workers": workers, "vocab_file": vocab.path})
  for path, count in errors.items():
    log.warning("prepare: %s held %d undecodable byte sequence(s), replaced by U+FFFD",
                path, count)
  records.write_json(root / records.MANIFEST_FILE, manifest.to_json())
  progress.report()
  return records.Manifest.read(output_dir)


# ---------------------------------------------------------------------------------------------
# Preparation on the fly, for the trainer.

def source_from_config(cfg) -> CorpusSource:
  """The corpus a pretraining data config names: input_files, tfds_name, or the shipped text."""
  if cfg.tfds_name:
    return CorpusSource(tfds_name=cfg.tfds_name, tfds_data_dir=cfg.tfds_data_dir,
                        tfds_split=cfg.tfds_split, text_key=cfg.text_key,
                        max_documents=int(cfg.max_documents))
  files = cfg.input_files or str(sample_text_path())
  return CorpusSource(input_files=files, input_format=cfg.input_format, text_key=cfg.text_key)


def ensure_prepared(cfg, default_cache_dir: str) -> str:
  """The prepared directory for a pretraining data config (a `pipeline.DataConfig`):
  `prepared_dir` as it is, or the config's corpus prepared once into
  `<cache_dir or default_cache_dir>/<digest of the parameters>/` (reused by every stage and
  every rerun; a changed input file or option gives a new digest)."""
  if cfg.prepared_dir:
    return cfg.prepared_dir
  if cfg.require_prepared:
    raise ValueError(
        "this config reads prepared data: set --config.data.prepared_dir=DIR, a directory "
        "made once with `python -m mobilebert_jax.data.prepare --input=... --vocab=... "
        "--output=DIR` (or set --config.data.require_prepared=False to prepare "
        "data.input_files / data.tfds_name on the fly, on one host)")
  source = source_from_config(cfg)
  options = cfg.prepare_options()
  vocab = VocabInfo.load(cfg.vocab_path or sample_vocab_path(), options.do_lower_case)
  digest = params_digest(preparation_params(source, vocab, options))
  root = cfg.cache_dir or default_cache_dir
  return prepare_corpus(source, vocab, os.path.join(root, digest), options).directory


# ---------------------------------------------------------------------------------------------
# The command line.

def main(argv: Sequence[str] | None = None) -> records.Manifest:
  """`python -m mobilebert_jax.data.prepare`: see the module docstring and `--help`."""
  import argparse
  p = argparse.ArgumentParser(prog="python -m mobilebert_jax.data.prepare",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--input", default="", help="text/JSON-lines files or globs, comma-separated "
                 "(local or gs://)")
  p.add_argument("--input_format", default="auto", choices=("auto",) + sources.TEXT_FORMATS)
  p.add_argument("--text_key", default="text", help="JSON-lines / tfds field with the text")
  p.add_argument("--tfds_name", default="", help="a prepared tfds builder, e.g. "
                 "wikipedia/20230601.en (instead of --input)")
  p.add_argument("--tfds_data_dir", default="")
  p.add_argument("--tfds_split", default="train")
  p.add_argument("--max_documents", type=int, default=0, help="tfds: stop after N (0: all)")
  p.add_argument("--vocab", default="", help="vocab.txt, tokenizer.json or a directory with "
                 "one (default: the shipped demo vocab)")
  p.add_argument("--output", required=True, help="the prepared directory (local or gs://)")
  p.add_argument("--max_seq_length", type=int, default=128)
  p.add_argument("--short_seq_prob", type=float, default=0.1)
  p.add_argument("--dupe_factor", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--do_lower_case", default="true", choices=("true", "false"))
  p.add_argument("--shard_size_mb", type=float, default=8.0)
  p.add_argument("--num_workers", type=int, default=None,
                 help="worker processes (default: one per core)")
  p.add_argument("--log_every_s", type=float, default=30.0)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  log.setLevel(logging.INFO)
  source = CorpusSource(input_files=args.input, input_format=args.input_format,
                        text_key=args.text_key, tfds_name=args.tfds_name,
                        tfds_data_dir=args.tfds_data_dir, tfds_split=args.tfds_split,
                        max_documents=args.max_documents)
  options = PrepareOptions(args.max_seq_length, args.short_seq_prob, args.dupe_factor,
                           args.seed, args.do_lower_case == "true", args.shard_size_mb,
                           args.num_workers if args.num_workers is not None
                           else (os.cpu_count() or 1))
  manifest = prepare_corpus(source, args.vocab, args.output, options,
                            log_every_s=args.log_every_s)
  print(f"prepared {manifest.num_records} sequences in {len(manifest.shards)} shard(s): "
        f"{manifest.directory}  (train with --config.data.prepared_dir={manifest.directory})")
  return manifest


if __name__ == "__main__":
  main()
