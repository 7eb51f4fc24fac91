"""Corpus preparation: shards and manifest, workers, resume, remote paths and bad input."""
import json
import os
import sys
import types

import numpy as np
import pytest

from mobilebert_jax.data import build_vocab, prepare, records, sources
from mobilebert_jax.data.paths import sample_text_path, sample_vocab_path
from mobilebert_jax.data.pipeline import PretrainingDataset
from mobilebert_jax.data.prepare import CorpusSource, PrepareOptions, prepare_corpus
from mobilebert_jax.data.tokenizer import load_tokenizer

CLS, SEP = 2, 3
SMALL_SHARDS = dict(max_seq_length=64, dupe_factor=2, shard_size_mb=0.015)


def shipped(**kw):
  return CorpusSource(input_files=str(sample_text_path()), **kw)


def run(out, source=None, workers=0, **options):
  opts = dict(SMALL_SHARDS, num_workers=workers)
  opts.update(options)
  return prepare_corpus(source or shipped(), "", str(out), PrepareOptions(**opts))


def shard_bytes(manifest):
  return [open(p, "rb").read() for p in manifest.shard_paths()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return run(tmp_path_factory.mktemp("reference"))


def loader(prepared_dir, **kw):
  opts = dict(prepared_dir=str(prepared_dir), batch_size=8, max_seq_length=64,
              process_index=0, process_count=1)
  opts.update(kw)
  return PretrainingDataset(**opts)


def test_shards_manifest_and_records(reference):
  m = reference
  assert len(m.shards) == 3 and m.num_records == sum(s["num_records"] for s in m.shards)
  body = json.loads(open(os.path.join(m.directory, records.MANIFEST_FILE)).read())
  assert body["num_documents"] == 63 and body["num_records"] == m.num_records
  tok = load_tokenizer(sample_vocab_path())
  vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
  assert m.params["vocab_fingerprint"] == records.vocab_fingerprint(vocab)
  assert m.params["max_seq_length"] == 64 and m.params["do_lower_case"] is True
  assert m.params["source"]["files"] == [[str(sample_text_path()),
                                          os.path.getsize(sample_text_path())]]
  assert m.token_dtype == np.dtype("<u2")
  source = records.PreparedRecords(m)
  labels, total_tokens = [], 0
  for seq, len_a, label in source.read(range(len(source))):
    assert 5 <= len(seq) <= 64 and seq[0] == CLS and seq[-1] == SEP and seq[len_a - 1] == SEP
    assert np.count_nonzero(seq == SEP) == 2
    labels.append(label)
    total_tokens += len(seq) - 3
  assert 0.35 < np.mean(labels) < 0.65
  # Two passes over every token, minus truncation: about twice the corpus.
  corpus_tokens = sum(s["num_tokens"] for s in m.shards)
  assert 1.5 * corpus_tokens < total_tokens <= 2 * corpus_tokens + 64 * m.num_records


def test_worker_processes_write_identical_shards(tmp_path, reference):
  assert shard_bytes(run(tmp_path, workers=2)) == shard_bytes(reference)


def test_interrupted_preparation_resumes_shard_by_shard(tmp_path, reference, monkeypatch):
  real = prepare.prepare_shard
  calls = []

  def failing(index, docs, job):
    calls.append(index)
    if len(calls) == 3:
      raise KeyboardInterrupt  # the process dies while preparing the third shard
    return real(index, docs, job)

  monkeypatch.setattr(prepare, "prepare_shard", failing)
  with pytest.raises(KeyboardInterrupt):
    run(tmp_path)
  assert not (tmp_path / records.MANIFEST_FILE).exists()
  with pytest.raises(records.PreparedDataError, match="interrupted"):
    loader(tmp_path)
  first = {i: os.stat(tmp_path / records.shard_name(i)).st_mtime_ns for i in (0, 1)}
  calls.clear()
  m = run(tmp_path)
  assert calls == [2]  # only the unfinished shard is prepared again
  assert {i: os.stat(tmp_path / records.shard_name(i)).st_mtime_ns for i in (0, 1)} == first
  assert shard_bytes(m) == shard_bytes(reference)
  calls.clear()
  run(tmp_path)  # complete: nothing to do
  assert calls == []


def test_damaged_and_missing_shards_are_named_and_rebuilt(tmp_path, reference):
  m = run(tmp_path)
  shard = m.shard_paths()[1]
  good = open(shard, "rb").read()
  with open(shard, "r+b") as f:  # a truncated copy
    f.truncate(len(good) // 2)
  with pytest.raises(records.PreparedDataError, match=rf"{shard} is damaged"):
    loader(tmp_path)
  untouched = os.stat(m.shard_paths()[0]).st_mtime_ns
  assert shard_bytes(run(tmp_path)) == shard_bytes(reference)  # rebuilt alone
  assert os.stat(m.shard_paths()[0]).st_mtime_ns == untouched
  # Same size, damaged bytes: the read fails and names the shard.
  with open(shard, "r+b") as f:
    f.seek(100)
    f.write(bytes(b ^ 0xFF for b in good[100:400]))
  ds = loader(tmp_path)
  with pytest.raises(records.PreparedDataError, match=rf"{shard}"):
    ds.source.read(range(ds.num_examples))
  os.remove(shard)
  with pytest.raises(records.PreparedDataError, match=rf"{shard} is missing"):
    loader(tmp_path)
  assert shard_bytes(run(tmp_path)) == shard_bytes(reference)


def test_prepared_data_must_match_the_config(tmp_path, reference):
  with pytest.raises(records.PreparedDataError,
                     match="max_seq_length: prepared 64 vs the config 128"):
    loader(reference.directory, max_seq_length=128)
  other_vocab = tmp_path / "vocab.txt"
  build_vocab.main(["--input", str(sample_text_path()), "--output", str(other_vocab),
                    "--size", "500"])
  with pytest.raises(records.PreparedDataError,
                     match=rf"vocab_fingerprint: prepared .* vs the config .*the config's vocab "
                           rf"is {other_vocab}, the data was prepared with {sample_vocab_path()}"):
    loader(reference.directory, vocab_path=str(other_vocab))
  with pytest.raises(records.PreparedDataError, match="do_lower_case"):
    loader(reference.directory, do_lower_case=False)


def test_rerun_with_other_parameters_changes_nothing(tmp_path):
  m = run(tmp_path)
  before = shard_bytes(m)
  with pytest.raises(records.PreparedDataError,
                     match=r"max_seq_length: in the directory 64 vs now 128"):
    run(tmp_path, max_seq_length=128)
  assert shard_bytes(records.Manifest.read(tmp_path)) == before


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
  text = sample_text_path().read_bytes()
  bad = tmp_path / "latin1.txt"
  bad.write_bytes(text[:2000] + b"caf\xe9 na\xefve \xff\xfe.\n" + text[2000:])
  m = run(tmp_path / "out", source=CorpusSource(input_files=str(bad)))
  assert m.decode_errors == {str(bad): 4}


def test_empty_and_missing_input_name_the_file(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  with pytest.raises(ValueError, match="empty.txt"):
    run(tmp_path / "a", source=CorpusSource(input_files=f"{sample_text_path()},{empty}"))
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    run(tmp_path / "b", source=CorpusSource(input_files=str(tmp_path / "nope.txt")))
  with pytest.raises(FileNotFoundError, match=r"\*\.zzz"):
    run(tmp_path / "c", source=CorpusSource(input_files=str(tmp_path / "*.zzz")))
  with pytest.raises(ValueError, match="exactly one"):
    CorpusSource()


def test_json_lines_input(tmp_path):
  docs = sources.read_text_documents(sample_text_path())
  path = tmp_path / "corpus.jsonl"
  path.write_text("".join(json.dumps({"id": i, "body": " ".join(d)}) + "\n"
                          for i, d in enumerate(docs)))
  m = run(tmp_path / "out", source=CorpusSource(input_files=str(path), text_key="body"))
  assert sum(s["num_documents"] for s in m.shards) == len(docs)
  assert next(loader(tmp_path / "out"))["input_ids"].shape == (8, 64)
  with pytest.raises(KeyError, match=r"corpus.jsonl.* line 1 has no field 'text'"):
    run(tmp_path / "o2", source=CorpusSource(input_files=str(path)))
  broken = tmp_path / "broken.jsonl"
  broken.write_text('{"text": "One. Two."}\n{"text": \n')
  with pytest.raises(ValueError, match=r"broken.jsonl.* line 2 is not JSON"):
    run(tmp_path / "o3", source=CorpusSource(input_files=str(broken)))


def test_cli(tmp_path, capsys):
  m = prepare.main(["--input", str(sample_text_path()), "--output", str(tmp_path),
                    "--max_seq_length", "32", "--num_workers", "0", "--log_every_s", "0"])
  assert m.params["max_seq_length"] == 32
  assert f"--config.data.prepared_dir={tmp_path}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# gs:// paths, through etils.epath (a bucket mocked onto a local directory: no network).

@pytest.fixture
def fake_bucket(tmp_path):
  from etils.epath import testing
  root = tmp_path / "bucket"
  root.mkdir()

  def local(path):
    return os.fspath(path).replace("gs://bucket", str(root))

  def mocked(orig, path, *args, **kwargs):
    args = [local(a) if isinstance(a, (str, os.PathLike)) else a for a in args]
    return orig(local(path), *args, **kwargs)

  def glob(orig, pattern):
    return [os.fspath(p).replace(str(root), "gs://bucket") for p in orig(local(pattern))]

  names = ("copy", "exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove",
           "rename", "replace", "rmtree", "stat", "walk")
  with testing.mock_epath(glob=glob, **{n: mocked for n in names}):
    yield root


def fake_tfds(monkeypatch, prepared_dir, articles):
  class Builder:
    data_dir = prepared_dir
    info = types.SimpleNamespace(features={"text": None})

    def as_dataset(self, split, shuffle_files):
      return articles

  seen = {}

  def builder(name, data_dir):
    seen["data_dir"] = data_dir
    return Builder()

  module = types.ModuleType("tensorflow_datasets")
  module.builder = builder
  module.as_numpy = lambda ds: iter(ds)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)
  return seen


def test_tfds_data_dir_on_gcs(fake_bucket, monkeypatch, tmp_path):
  (fake_bucket / "tfds" / "wiki" / "1.0.0").mkdir(parents=True)
  (fake_bucket / "tfds" / "wiki" / "1.0.0" / "dataset_info.json").write_text("{}")
  docs = sources.read_text_documents(sample_text_path())
  articles = [{"text": " ".join(d).encode()} for d in docs]
  seen = fake_tfds(monkeypatch, "gs://bucket/tfds/wiki/1.0.0", articles)
  got = sources.read_tfds_documents("wiki", "gs://bucket/tfds", max_documents=3)
  assert seen["data_dir"] == "gs://bucket/tfds" and len(got) == 3
  # Prepared from tfds into a bucket: shards and manifest land there through epath.
  m = prepare_corpus(CorpusSource(tfds_name="wiki", tfds_data_dir="gs://bucket/tfds"), "",
                     "gs://bucket/prepared", PrepareOptions(**SMALL_SHARDS, num_workers=0))
  assert m.directory == "gs://bucket/prepared"
  assert sum(s["num_documents"] for s in m.shards) == len(docs)
  on_disk = sorted(os.listdir(fake_bucket / "prepared"))
  assert records.MANIFEST_FILE in on_disk and records.shard_name(len(m.shards) - 1) in on_disk
  m.verify_shards()
  with pytest.raises(FileNotFoundError, match="gs://bucket/nowhere"):
    sources.read_tfds_documents("wiki", "gs://bucket/nowhere")


def test_remote_globs_and_vocab(fake_bucket):
  (fake_bucket / "text").mkdir()
  for name in ("a.txt", "b.txt"):
    (fake_bucket / "text" / name).write_bytes(sample_text_path().read_bytes())
  (fake_bucket / "vocab.txt").write_bytes(sample_vocab_path().read_bytes())
  assert sources.expand_paths("gs://bucket/text/*.txt") == [
      "gs://bucket/text/a.txt", "gs://bucket/text/b.txt"]
  assert len(sources.read_text_documents("gs://bucket/text/a.txt")) == 63
  tok = load_tokenizer("gs://bucket/vocab.txt")
  assert len(tok) == len(load_tokenizer(sample_vocab_path()))
  with pytest.raises(FileNotFoundError, match="gs://bucket/text/c.txt"):
    sources.expand_paths("gs://bucket/text/c.txt")


# ---------------------------------------------------------------------------------------------
# Preparation on the fly (the trainer's path for small corpora).

def test_ensure_prepared_caches_by_parameters(tmp_path, monkeypatch):
  from mobilebert_jax.data.pipeline import DataConfig
  corpus = tmp_path / "corpus.txt"
  corpus.write_bytes(sample_text_path().read_bytes())
  cfg = DataConfig(input_files=str(corpus), max_seq_length=64)
  first = prepare.ensure_prepared(cfg, str(tmp_path / "cache"))
  calls = []
  real = prepare.prepare_shard
  monkeypatch.setattr(prepare, "prepare_shard",
                      lambda *a: calls.append(a[0]) or real(*a))
  assert prepare.ensure_prepared(cfg, str(tmp_path / "cache")) == first and calls == []
  corpus.write_bytes(sample_text_path().read_bytes() + b"\nOne more document.\nIt is new.\n")
  second = prepare.ensure_prepared(cfg, str(tmp_path / "cache"))
  assert second != first and calls == [0]
  with pytest.raises(ValueError, match="--config.data.prepared_dir=DIR"):
    prepare.ensure_prepared(DataConfig(require_prepared=True), str(tmp_path / "cache"))


def test_trainer_prepares_once_for_every_stage_and_rerun(tmp_path, monkeypatch):
  from mobilebert_jax import default_config
  from mobilebert_jax.stages import Trainer
  calls = []
  real = prepare.prepare_shard
  monkeypatch.setattr(prepare, "prepare_shard", lambda *a: calls.append(a[0]) or real(*a))
  c = default_config.get_config()
  c.stages = "teacher_pretrain,pd"
  c.data.update(dict(max_seq_length=32, max_predictions_per_seq=5, batch_size=8))
  c.checkpoint.async_save = False
  for name in ("teacher_pretrain", "pd"):
    c[name].num_steps = 2
    c[name].optimizer.warmup_steps = 1
  Trainer(c, str(tmp_path)).run()
  c.pd.num_steps = 3  # a rerun that trains further (a config change, so allowed explicitly)
  c.allow_config_change = True
  Trainer(c, str(tmp_path)).run()
  assert calls == [0]
  assert len(os.listdir(tmp_path / "prepared_data")) == 1


def test_full_disk_names_the_shard_and_a_rerun_goes_on(tmp_path, reference, monkeypatch):
  from array_record.python import array_record_module
  real = array_record_module.ArrayRecordWriter
  written = []

  class FillingDisk:
    """Lets the first shard through, then fails as a full disk does."""

    def __init__(self, path, options):
      self.inner = real(path, options)
      self.full = bool(written)
      written.append(path)

    def write(self, payload):
      if self.full:
        raise RuntimeError("write() failed: No space left on device")
      self.inner.write(payload)

    def close(self):
      self.inner.close()

  monkeypatch.setattr(array_record_module, "ArrayRecordWriter", FillingDisk)
  with pytest.raises(OSError, match=rf"{tmp_path / records.shard_name(1)} failed .*No space "
                                    r"left on device.*disk full"):
    run(tmp_path)
  assert sorted(os.listdir(tmp_path)) == [records.PARAMS_FILE, records.shard_name(0),
                                          records.shard_info_name(0)]  # no partial file
  monkeypatch.setattr(array_record_module, "ArrayRecordWriter", real)
  assert shard_bytes(run(tmp_path)) == shard_bytes(reference)
