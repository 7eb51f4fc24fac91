"""Tests of mobilebert_jax.data: sources, tokenizer, MLM/NSP example creation, batches."""
import json
import sys
import types

import numpy as np
import pytest

from mobilebert_jax.data import build_vocab, pretraining, sources
from mobilebert_jax.data.paths import sample_text_path, sample_vocab_path
from mobilebert_jax.data.pipeline import DataConfig, PretrainingDataset
from mobilebert_jax.data.prepare import (CorpusSource, PrepareOptions, prepare_corpus,
                                         tokenize_chunk)
from mobilebert_jax.data.tokenizer import SPECIAL_TOKENS, load_tokenizer

PAD, UNK, CLS, SEP, MASK = range(5)


# ---------------------------------------------------------------------------------------------
# Fixtures.

@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer(sample_vocab_path())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The shipped corpus prepared into 3 shards (sequences of up to 64 tokens, 2 passes)."""
  out = tmp_path_factory.mktemp("prepared")
  manifest = prepare_corpus(CorpusSource(input_files=str(sample_text_path())), "", str(out),
                            PrepareOptions(max_seq_length=64, dupe_factor=2,
                                           shard_size_mb=0.015, num_workers=0))
  assert len(manifest.shards) == 3
  return str(out)


@pytest.fixture(scope="module")
def make_dataset(prepared):
  def make(tokenizer, **kw):
    opts = dict(prepared_dir=prepared, batch_size=8, max_seq_length=64,
                max_predictions_per_seq=10, seed=3, process_index=0, process_count=1)
    opts.update(kw)
    return PretrainingDataset(tokenizer=tokenizer, **opts)
  return make


@pytest.fixture(scope="module")
def dataset(tokenizer, make_dataset):
  return make_dataset(tokenizer)


def all_records(dataset):
  return dataset.source.read(range(dataset.num_examples))


def synthetic_vocab(n_words=600):
  """Specials, then whole words "wN" and continuation pieces "##pN"."""
  tokens = list(SPECIAL_TOKENS)
  tokens += [f"w{i}" for i in range(n_words)] + [f"##p{i}" for i in range(n_words)]
  return tokens


def masking_config(tokens, **kw):
  return pretraining.MaskingConfig.from_vocab(tokens, special_ids=range(5), mask_id=MASK, **kw)


def random_sequence(rng, length, n_words):
  """[CLS] x [SEP] y [SEP] with ordinary word tokens."""
  ids = rng.integers(5, 5 + n_words, size=length)
  ids[0] = CLS
  ids[length // 2] = SEP
  ids[-1] = SEP
  return ids.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Masking.

def test_masking_rates_80_10_10_and_specials_untouched():
  tokens = synthetic_vocab()
  cfg = masking_config(tokens, max_predictions_per_seq=128)
  rng = np.random.default_rng(0)
  n_cand = n_masked = n_mask_tok = n_same = n_random = 0
  for _ in range(1500):
    ids = random_sequence(rng, 128, 600)
    out, pos, labels = pretraining.mask_tokens(ids, rng, cfg)
    special = np.isin(ids, [CLS, SEP])
    assert not special[pos].any(), "a special token was picked for prediction"
    np.testing.assert_array_equal(out[special], ids[special])
    assert np.all(np.diff(pos) > 0)
    np.testing.assert_array_equal(labels, ids[pos])
    untouched = np.ones(len(ids), bool)
    untouched[pos] = False
    np.testing.assert_array_equal(out[untouched], ids[untouched])
    assert not np.isin(out[pos], [PAD, UNK, CLS, SEP]).any()
    n_cand += (~special).sum()
    n_masked += len(pos)
    n_mask_tok += (out[pos] == MASK).sum()
    n_same += (out[pos] == ids[pos]).sum()
    n_random += ((out[pos] != MASK) & (out[pos] != ids[pos])).sum()
  assert abs(n_masked / n_cand - 0.15) < 0.005
  assert abs(n_mask_tok / n_masked - 0.8) < 0.015
  assert abs(n_same / n_masked - 0.1) < 0.01
  assert abs(n_random / n_masked - 0.1) < 0.01


def test_masking_cap_and_minimum():
  cfg = masking_config(synthetic_vocab(), max_predictions_per_seq=5)
  rng = np.random.default_rng(1)
  _, pos, _ = pretraining.mask_tokens(random_sequence(rng, 128, 600), rng, cfg)
  assert len(pos) == 5  # 15% of 125 = 19, capped at 5
  _, pos, _ = pretraining.mask_tokens(np.array([CLS, 7, 8, SEP, 9, SEP]), rng, cfg)
  assert len(pos) == 1  # round(3 * 0.15) = 0 -> at least 1
  _, pos, _ = pretraining.mask_tokens(np.array([CLS, SEP, SEP]), rng, cfg)
  assert len(pos) == 0


def _words(rng, n_words_vocab, n_words):
  """A sequence of words, each a head piece plus 0-2 "##" pieces; returns ids and word spans."""
  ids, spans = [CLS], []
  for w in range(n_words):
    start = len(ids)
    ids.append(5 + int(rng.integers(n_words_vocab)))
    for _ in range(int(rng.integers(0, 3))):
      ids.append(5 + n_words_vocab + int(rng.integers(n_words_vocab)))
    spans.append((start, len(ids)))
    if w == n_words // 2:
      ids.append(SEP)
  ids.append(SEP)
  return np.array(ids, np.int32), spans


@pytest.mark.parametrize("wwm", [True, False])
def test_whole_word_masking(wwm):
  cfg = masking_config(synthetic_vocab(), max_predictions_per_seq=40, whole_word_masking=wwm)
  rng = np.random.default_rng(2)
  partial = total = 0
  for _ in range(300):
    ids, spans = _words(rng, 600, 50)
    _, pos, _ = pretraining.mask_tokens(ids, rng, cfg)
    picked = set(pos.tolist())
    n_non_special = int((~np.isin(ids, [CLS, SEP])).sum())
    assert 1 <= len(pos) <= min(40, round(0.15 * n_non_special))
    for s, e in spans:
      k = sum(p in picked for p in range(s, e))
      partial += 0 < k < e - s
    total += len(pos)
  if wwm:
    assert partial == 0, "whole-word masking split a word"
    assert total > 300 * 5
  else:
    assert partial > 0  # the check above can fail


# ---------------------------------------------------------------------------------------------
# Sentence pairs (NSP).

def _synthetic_documents(rng, n_docs=80):
  """Every token id is unique and encodes (doc, position in doc): id = 5 + doc*10000 + pos."""
  docs, starts, ends = [], set(), set()
  for d in range(n_docs):
    pos, doc = 0, []
    for _ in range(int(rng.integers(1, 15))):
      n = int(rng.integers(2, 12))
      doc.append([5 + d * 10000 + pos + j for j in range(n)])
      starts.add(doc[-1][0])
      ends.add(doc[-1][-1])
      pos += n
    docs.append(doc)
  return docs, starts, ends


def test_nsp_labels_balanced_and_label0_is_true_continuation():
  rng = np.random.default_rng(4)
  docs, starts, ends = _synthetic_documents(rng)
  max_len = 40
  labels, exact = [], 0
  for p in range(6):
    for d in range(len(docs)):
      r = pretraining.example_rng(9, pretraining.STREAM_INSTANCES, p, d)
      for inst in pretraining.create_instances_from_document(docs, d, max_len, 0.1, r):
        a, b = np.array(inst.tokens_a), np.array(inst.tokens_b)
        assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) <= max_len - 3
        doc_a, doc_b = (a - 5) // 10000, (b - 5) // 10000
        assert np.all(doc_a == doc_a[0]) and np.all(doc_b == doc_b[0])
        assert np.all(np.diff(a) == 1) or len(a) + len(b) == max_len - 3
        labels.append(inst.is_random_next)
        if inst.is_random_next:
          assert doc_b[0] != doc_a[0]
        else:
          assert doc_b[0] == doc_a[0] and b[0] > a[-1]
          seq = np.concatenate([a, b])
          assert np.all(np.diff(seq) > 0)
          if len(seq) < max_len - 3:  # not truncated: exactly consecutive sentences
            assert np.all(np.diff(seq) == 1)
            assert a[0] in starts and b[0] in starts and b[-1] in ends
            exact += 1
  assert len(labels) > 1000
  assert abs(np.mean(labels) - 0.5) < 0.04
  assert exact > 200


def test_nsp_label0_on_shipped_corpus_is_consecutive_text(dataset, tokenizer):
  docs = sources.read_text_documents(sample_text_path())
  text = " ".join(" ".join(d) for d in docs)
  norm = lambda s: " ".join(tokenizer.tokenize(s))
  corpus = norm(text)
  checked = 0
  for seq, _, label in all_records(dataset):
    if label != 0:
      continue
    if len(seq) >= dataset.config.max_seq_length:  # possibly truncated in the middle
      continue
    pieces = tokenizer.convert_ids_to_tokens(
        [t for t in seq.tolist() if t not in (CLS, SEP)])
    assert " ".join(pieces) in corpus
    checked += 1
  assert checked > 20


def test_truncate_seq_pair():
  rng = np.random.default_rng(0)
  (fa, ba), (fb, bb) = pretraining.truncate_seq_pair(30, 10, 20, rng)
  assert (fb, bb) == (0, 0) and fa + ba == 20 and fa > 0 and ba > 0
  # Both segments shrink once they are equally long; B on a tie.
  (fa, ba), (fb, bb) = pretraining.truncate_seq_pair(12, 10, 14, rng)
  assert 12 - fa - ba == 7 and 10 - fb - bb == 7
  assert pretraining.truncate_seq_pair(3, 4, 7, rng) == ((0, 0), (0, 0))


# ---------------------------------------------------------------------------------------------
# Batches.

def test_batch_format(dataset):
  batch = dataset.get_batch(0, 0)
  length, p, b = 64, 10, 8
  expected = {"input_ids": ((b, length), np.int32), "attention_mask": ((b, length), np.int32),
              "token_type_ids": ((b, length), np.int32),
              "masked_lm_positions": ((b, p), np.int32), "masked_lm_ids": ((b, p), np.int32),
              "masked_lm_weights": ((b, p), np.float32), "next_sentence_labels": ((b,), np.int32)}
  assert set(batch) == set(expected) == set(pretraining.BATCH_KEYS)
  for k, (shape, dtype) in expected.items():
    assert batch[k].shape == shape and batch[k].dtype == dtype, k
    assert dataset.batch_spec()[k] == (shape, np.dtype(dtype))
  order = dataset.epoch_order(0)[:b]
  for row in range(b):
    original, len_a, label = dataset.source.read([int(order[row])])[0]
    n = len(original)
    ids, mask, types_ = (batch[k][row] for k in ("input_ids", "attention_mask",
                                                 "token_type_ids"))
    np.testing.assert_array_equal(mask, (np.arange(length) < n).astype(np.int32))
    assert np.all(ids[n:] == PAD) and np.all(types_[n:] == 0)
    assert ids[0] == CLS and ids[n - 1] == SEP
    seps = np.nonzero(ids == SEP)[0]
    assert len(seps) == 2 and seps[1] == n - 1
    np.testing.assert_array_equal(types_[:n], (np.arange(n) > seps[0]).astype(np.int32))
    w = batch["masked_lm_weights"][row]
    k = int(w.sum())
    assert k >= 1 and np.all(w[:k] == 1.0) and np.all(w[k:] == 0.0)
    pos, lab = batch["masked_lm_positions"][row], batch["masked_lm_ids"][row]
    assert np.all(pos[k:] == 0) and np.all(lab[k:] == 0)
    assert np.all(np.diff(pos[:k]) > 0) and np.all((pos[:k] > 0) & (pos[:k] < n - 1))
    np.testing.assert_array_equal(lab[:k], original[pos[:k]])
    keep = np.ones(n, bool)
    keep[pos[:k]] = False
    np.testing.assert_array_equal(ids[:n][keep], original[keep])
    assert seps[0] == len_a - 1
    assert batch["next_sentence_labels"][row] == label
  assert set(np.unique(batch["next_sentence_labels"])) <= {0, 1}


def test_determinism_and_dynamic_masking(tokenizer, make_dataset):
  a = make_dataset(tokenizer)
  b = make_dataset(tokenizer)
  c = make_dataset(tokenizer, seed=4)
  for _ in range(3):
    ba, bb, bc = next(a), next(b), next(c)
    for k in ba:
      np.testing.assert_array_equal(ba[k], bb[k])
    assert not np.array_equal(ba["input_ids"], bc["input_ids"])
  # Epoch 1 is a new order, and the same instance gets a new mask.
  assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
  order0, order1 = a.epoch_order(0), a.epoch_order(1)
  n = int(order0[0])
  row1, batch1 = divmod(int(np.nonzero(order1 == n)[0][0]), a.global_batch_size)
  m0 = a.get_global_batch(0, 0)["masked_lm_positions"][0]
  m1 = a.get_global_batch(1, row1)["masked_lm_positions"][batch1]
  assert not np.array_equal(m0, m1)
  # Any batch can be re-created out of order by a fresh dataset.
  fresh = make_dataset(tokenizer)
  np.testing.assert_array_equal(fresh.get_global_batch(1, row1)["masked_lm_positions"][batch1],
                                m1)


def test_two_process_split_equals_global_batch(tokenizer, make_dataset):
  one = make_dataset(tokenizer, batch_size=8)
  halves = [make_dataset(tokenizer, batch_size=8, process_index=i, process_count=2)
            for i in range(2)]
  assert halves[0].local_batch_size == 4
  for _ in range(one.batches_per_epoch + 2):  # crosses an epoch boundary
    full = next(one)
    parts = [next(h) for h in halves]
    for k in full:
      np.testing.assert_array_equal(full[k], np.concatenate([p[k] for p in parts]))


def test_state_restore_resumes_exactly_across_epochs(tokenizer, make_dataset):
  ref = make_dataset(tokenizer)
  bpe = ref.batches_per_epoch
  reference = [next(ref) for _ in range(bpe + 3)]
  for k in (0, 2, bpe - 1, bpe):
    run = make_dataset(tokenizer)
    for _ in range(k):
      next(run)
    state = json.loads(json.dumps(run.state()))
    resumed = make_dataset(tokenizer, state=state)
    for j in range(3):
      got = next(resumed)
      for key in got:
        np.testing.assert_array_equal(got[key], reference[k + j][key])
  # restore() on a live iterator, and into a 2-process run.
  run = make_dataset(tokenizer)
  run.restore({"epoch": 0, "batch_in_epoch": bpe - 1})
  np.testing.assert_array_equal(next(run)["input_ids"], reference[bpe - 1]["input_ids"])
  assert run.state()["epoch"] == 1 and run.state()["batch_in_epoch"] == 0
  half = make_dataset(tokenizer, process_index=1, process_count=2, state=run.state())
  np.testing.assert_array_equal(next(half)["input_ids"], reference[bpe]["input_ids"][4:])


def test_restore_rejects_other_config(tokenizer, dataset, make_dataset):
  state = dataset.state()
  with pytest.raises(ValueError, match="seed"):
    make_dataset(tokenizer, seed=5, state=state)
  with pytest.raises(ValueError, match="batch_in_epoch"):
    dataset.restore({"epoch": 0})


def test_num_epochs_stops(tokenizer, make_dataset):
  ds = make_dataset(tokenizer, num_epochs=1)
  assert sum(1 for _ in ds) == ds.batches_per_epoch


def test_whole_word_masking_pipeline(tokenizer, make_dataset):
  ds = make_dataset(tokenizer, whole_word_masking=True)
  batch = next(ds)
  assert batch["masked_lm_weights"].sum() > 0


def test_config_dict_and_errors(tmp_path, tokenizer, make_dataset, prepared):
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict(dict(prepared_dir=prepared, batch_size=4, max_seq_length=64))
  ds = PretrainingDataset(cfg, tokenizer=tokenizer, process_index=0, process_count=1)
  assert next(ds)["input_ids"].shape == (4, 64)
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    make_dataset(tokenizer, batch_size=8, process_count=3)
  with pytest.raises(ValueError, match="bogus"):
    DataConfig.from_any({"input_files": "x", "bogus": 1})
  with pytest.raises(ValueError, match="prepared_dir"):
    PretrainingDataset({"input_files": "x"}, tokenizer=tokenizer, process_index=0,
                       process_count=1)
  with pytest.raises(ValueError, match="only one"):
    DataConfig.from_any({"input_files": "x", "tfds_name": "wiki", "tfds_data_dir": "/d"})
  with pytest.raises(ValueError, match="masked_lm_prob"):
    DataConfig.from_any({"input_files": "x", "masked_lm_prob": 1.5})
  with pytest.raises(ValueError, match="num_workers"):
    DataConfig.from_any({"num_workers": -1})
  with pytest.raises(ValueError, match="fewer than one global batch"):
    make_dataset(tokenizer, batch_size=100000)
  assert DataConfig.from_any({"num_epochs": None, "input_files": None}).num_epochs == 0


def test_check_vocab_size(dataset):
  dataset.check_vocab_size(dataset.vocab_size)
  dataset.check_vocab_size(30522)
  with pytest.raises(ValueError, match=rf"vocab.txt.*{dataset.vocab_size}.*vocab_size is 1000"):
    dataset.check_vocab_size(1000)


def test_prefetch_to_device(tokenizer, make_dataset):
  jax = pytest.importorskip("jax")
  from mobilebert_jax.data.prefetch import prefetch_to_device
  ds = make_dataset(tokenizer)
  expected = [ds.get_batch(0, k) for k in range(3)]
  with prefetch_to_device(ds, size=2) as it:
    for k in range(3):
      got = next(it)
      assert isinstance(got["input_ids"], jax.Array)
      for key in got:
        np.testing.assert_array_equal(np.asarray(got[key]), expected[k][key])
        assert got[key].dtype == expected[k][key].dtype
      assert it.state()["batch_in_epoch"] == k + 1  # not the prefetched position
  assert ds.state()["batch_in_epoch"] >= 3


def test_prefetch_propagates_errors_and_stops():
  pytest.importorskip("jax")
  from mobilebert_jax.data.prefetch import prefetch_to_device

  def source():
    yield {"x": np.zeros((8, 2), np.int32)}
    raise RuntimeError("broken source")

  it = prefetch_to_device(source(), size=1)
  assert next(it)["x"].shape == (8, 2)
  with pytest.raises(RuntimeError, match="broken source"):
    next(it)
  with pytest.raises(StopIteration):
    next(it)
  endless = prefetch_to_device(({"x": np.ones((8,), np.float32)} for _ in iter(int, 1)), size=2)
  next(endless)
  endless.close()
  assert not endless._thread.is_alive()


# ---------------------------------------------------------------------------------------------
# Sources, tokenizer, vocab.

def test_read_text_documents_and_globs(tmp_path):
  (tmp_path / "a.txt").write_text("One.\nTwo.\n\n\nThree.\n")
  (tmp_path / "b.txt").write_text("Four.\n\nFive.\nSix.")
  docs = sources.read_text_documents(str(tmp_path / "*.txt"))
  assert docs == [["One.", "Two."], ["Three."], ["Four."], ["Five.", "Six."]]
  assert sources.read_text_documents([tmp_path / "b.txt"]) == [["Four."], ["Five.", "Six."]]
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    sources.read_text_documents([str(tmp_path / "a.txt"), str(tmp_path / "missing.txt")])


def test_split_sentences():
  text = ("Dr. Smith went to Washington. He arrived at 5 p.m. on Monday! Was it J. Doe? "
          "Yes.\nA new paragraph starts here")
  assert sources.split_sentences(text) == [
      "Dr. Smith went to Washington.", "He arrived at 5 p.m. on Monday!", "Was it J. Doe?",
      "Yes.", "A new paragraph starts here"]
  assert sources.split_sentences("") == []


def test_tfds_missing_package_error(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match="tensorflow-datasets"):
    sources.read_tfds_documents("wikipedia/20230601.en", tmp_path)


def test_tfds_reader_with_fake_builder(monkeypatch, tmp_path):
  prepared = tmp_path / "fake" / "1.0.0"
  prepared.mkdir(parents=True)
  (prepared / "dataset_info.json").write_text("{}")
  articles = [{"text": b"First article. It has two sentences."},
              {"text": b""},
              {"text": "Second one!\nNew line here."}]

  class Builder:
    data_dir = str(prepared)
    info = types.SimpleNamespace(features={"text": None, "title": None})

    def as_dataset(self, split, shuffle_files):
      assert split == "train"
      return articles

  fake = types.ModuleType("tensorflow_datasets")
  fake.builder = lambda name, data_dir: Builder()
  fake.as_numpy = lambda ds: iter(ds)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  docs = sources.read_tfds_documents("fake", tmp_path)
  assert docs == [["First article.", "It has two sentences."], ["Second one!", "New line here."]]
  with pytest.raises(KeyError, match="body"):
    sources.read_tfds_documents("fake", tmp_path, text_key="body")
  with pytest.raises(FileNotFoundError, match="not prepared"):
    Builder.data_dir = str(tmp_path / "elsewhere")
    sources.read_tfds_documents("fake", tmp_path)


def test_shipped_vocab_and_corpus(tokenizer):
  lines = sample_vocab_path().read_text(encoding="utf-8").splitlines()
  assert lines[:5] == list(SPECIAL_TOKENS)
  assert 2000 <= len(lines) <= 4000 and len(set(lines)) == len(lines)
  assert len(tokenizer) == len(lines)
  assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id,
          tokenizer.sep_token_id, tokenizer.mask_token_id] == [0, 1, 2, 3, 4]
  docs = sources.read_text_documents(sample_text_path())
  assert 40 <= len(docs) <= 70 and all(8 <= len(d) <= 15 for d in docs)
  ids = tokenize_chunk(docs, tokenizer.backend_tokenizer)[0].tokens.tolist()
  assert len(ids) > 5000 and ids.count(UNK) / len(ids) < 0.001
  other = "Seventeen quick zebras jumped over the lazy fox in 2024."
  assert UNK not in tokenizer(other, add_special_tokens=False)["input_ids"]


def test_load_tokenizer_paths(tmp_path, tokenizer):
  with pytest.raises(FileNotFoundError, match="no_such_vocab.txt"):
    load_tokenizer(tmp_path / "no_such_vocab.txt")
  with pytest.raises(FileNotFoundError, match="neither vocab.txt nor tokenizer.json"):
    load_tokenizer(tmp_path)
  vocab_dir = tmp_path / "ckpt"
  vocab_dir.mkdir()
  (vocab_dir / "vocab.txt").write_text(sample_vocab_path().read_text())
  text = "The moon reflects light from the sun."
  expected = tokenizer(text)["input_ids"]
  assert load_tokenizer(vocab_dir)(text)["input_ids"] == expected
  json_dir = tmp_path / "json_only"
  tokenizer.save_pretrained(json_dir)
  assert (json_dir / "tokenizer.json").exists() and not (json_dir / "vocab.txt").exists()
  assert load_tokenizer(json_dir)(text)["input_ids"] == expected
  bad = tmp_path / "bad_vocab.txt"
  bad.write_text("hello\nworld\n")
  with pytest.raises(ValueError, match=r"bad_vocab.txt.*\[PAD\]"):
    load_tokenizer(bad)


def test_build_vocab_cli(tmp_path):
  out = tmp_path / "vocab.txt"
  build_vocab.main(["--input", str(sample_text_path()), "--output", str(out), "--size", "500"])
  lines = out.read_text().splitlines()
  assert lines[:5] == list(SPECIAL_TOKENS) and len(lines) <= 500
  assert "##z" in lines and "z" in lines
  tok = load_tokenizer(out)
  ids = tok("The heart pumps blood.", add_special_tokens=False)["input_ids"]
  assert UNK not in ids


def test_grain_worker_processes_give_the_same_batches(tokenizer, make_dataset):
  ref = make_dataset(tokenizer)
  bpe = ref.batches_per_epoch
  expected = [next(ref) for _ in range(bpe + 2)]  # crosses an epoch boundary
  halves = [make_dataset(tokenizer, num_workers=2, process_index=i, process_count=2)
            for i in range(2)]
  try:
    for k in range(bpe + 2):
      parts = [next(h) for h in halves]
      for key in expected[k]:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                      expected[k][key])
    # Resuming a worker-backed iterator restarts its workers at the saved position.
    state = halves[0].state()
    resumed = make_dataset(tokenizer, num_workers=1, state=state)
    np.testing.assert_array_equal(next(resumed)["input_ids"], next(ref)["input_ids"])
    resumed.close()
  finally:
    for h in halves:
      h.close()
