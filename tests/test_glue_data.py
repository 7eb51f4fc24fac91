"""GLUE task registry, TSV / tfds readers, encoding and submission files."""

import sys
import types

import numpy as np
import pytest

from mobilebert_jax.data import load_tokenizer, sample_vocab_path
from mobilebert_jax.downstream import glue_data, tasks
from mobilebert_jax.downstream.glue_data import GlueExample

# The official GLUE headers (CoLA train/dev have none: source, label, judgement, sentence).
_MNLI = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse "
         "sentence1_parse sentence2_parse sentence1 sentence2").split()
_STSB = "index genre filename year old_index source1 source2 sentence1 sentence2".split()
HEADERS = {
    "cola": (["source", "label", "judgement", "sentence"], ["index", "sentence"]),
    "sst2": (["sentence", "label"], ["index", "sentence"]),
    "mrpc": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"]),
    "stsb": (_STSB + ["score"], _STSB),
    "qqp": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            ["id", "question1", "question2"]),
    "qnli": (["index", "question", "sentence", "label"], ["index", "question", "sentence"]),
    "rte": (["index", "sentence1", "sentence2", "label"], ["index", "sentence1", "sentence2"]),
    "wnli": (["index", "sentence1", "sentence2", "label"], ["index", "sentence1", "sentence2"]),
}
# (text_a column, text_b column, label column) by official column name.
FIELDS = {"cola": ("sentence", None, "label"), "sst2": ("sentence", None, "label"),
          "mrpc": ("#1 String", "#2 String", "Quality"),
          "stsb": ("sentence1", "sentence2", "score"),
          "qqp": ("question1", "question2", "is_duplicate"),
          "qnli": ("question", "sentence", "label"), "rte": ("sentence1", "sentence2", "label"),
          "wnli": ("sentence1", "sentence2", "label"), "mnli": ("sentence1", "sentence2",
                                                                "gold_label")}


def official_header(task, split):
  if task == "mnli":
    if split == "train":
      return _MNLI + ["label1", "gold_label"]
    if split.startswith("dev"):
      return _MNLI + [f"label{i}" for i in range(1, 6)] + ["gold_label"]
    return ["index", "sentence1", "sentence2"] if split == "ax" else list(_MNLI)
  return HEADERS[task][split == "test"]


def label_value(task, row):
  spec = tasks.get_task(task)
  return f"{row * 1.2:.3f}" if spec.is_regression else spec.labels[row % spec.num_labels]


def write_split(directory, task, split, rows=3):
  """Writes an official-layout file whose cells are '<column>-<row>' (labels and indices valid)."""
  header = official_header(task, split)
  spec = tasks.get_task(task)
  layout = spec.split(split)
  label_col = FIELDS[task][2]
  lines = ["\t".join(header)] if layout.header else []
  for r in range(rows):
    cells = []
    for name in header:
      if name in ("index", "id"):
        cells.append(str(100 + r))
      elif name == label_col and layout.has_labels:
        cells.append(label_value(task, r))
      else:
        cells.append(f"{name} {r}")
    lines.append("\t".join(cells))
  path = directory / layout.files[0]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer(sample_vocab_path())


def test_registry():
  assert tasks.GLUE_TASKS == ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte",
                              "wnli")
  assert tasks.get_task("SST-2") is tasks.get_task("sst2") is tasks.TASKS["sst2"]
  assert tasks.get_task("STS_B").is_regression and tasks.get_task("stsb").num_labels == 1
  with pytest.raises(KeyError, match="valid tasks: cola, sst2, mrpc"):
    tasks.get_task("squad")
  mnli = tasks.get_task("mnli")
  assert mnli.labels == ("entailment", "neutral", "contradiction") and mnli.is_pair
  assert mnli.eval_splits == ("dev_matched", "dev_mismatched")
  assert dict(mnli.submission_files) == {"test_matched": "MNLI-m.tsv",
                                         "test_mismatched": "MNLI-mm.tsv", "ax": "AX.tsv"}
  assert mnli.tfds_splits["ax"] == ("glue/ax", "test")
  assert tasks.get_task("sst2").submission_files["test"] == "SST-2.tsv"
  assert tasks.get_task("sst2").tfds_builder == "glue/sst2"
  assert not tasks.get_task("cola").is_pair and not tasks.get_task("cola").split("dev").header
  assert tasks.get_task("cola").split("test").header
  with pytest.raises(KeyError, match="valid splits"):
    tasks.get_task("rte").split("dev_matched")
  for spec in tasks.TASKS.values():
    assert set(spec.eval_splits) | set(spec.test_splits) | {"train"} == set(spec.splits)
    assert set(spec.test_splits) == set(spec.submission_files) == {
        s for s, layout in spec.splits.items() if not layout.has_labels}
    assert set(spec.tfds_splits) == set(spec.splits)


@pytest.mark.parametrize("task", tasks.GLUE_TASKS)
def test_reads_every_split_of_every_task(tmp_path, task):
  spec = tasks.get_task(task)
  field_a, field_b, label_col = FIELDS[task]
  for split in spec.splits:
    write_split(tmp_path / spec.glue_name, task, split)
    # The glue_data root and the task directory both work.
    examples = glue_data.read_glue(task, split, tmp_path)
    assert examples == glue_data.read_glue(task, split, tmp_path / spec.glue_name)
    assert len(examples) == 3
    for r, ex in enumerate(examples):
      a, b = (field_a, field_b) if split != "ax" else ("sentence1", "sentence2")
      assert ex.text_a == f"{a} {r}"
      assert ex.text_b == (None if b is None else f"{b} {r}")
      layout = spec.split(split)
      assert ex.index == (100 + r if layout.index is not None else r)
      assert ex.guid == f"{task}-{split}-{ex.index}"
      if not layout.has_labels:
        assert ex.label is None
      elif spec.is_regression:
        assert ex.label == pytest.approx(r * 1.2)
      else:
        assert ex.label == r % spec.num_labels


def test_literal_files(tmp_path):
  (tmp_path / "CoLA").mkdir()
  (tmp_path / "CoLA" / "dev.tsv").write_text(
      "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
      "gj04\t0\t*\tThe more we study verbs, the crazier they get get.\r\n")
  cola = glue_data.read_glue("cola", "dev", tmp_path)
  assert [(e.text_a, e.label, e.index) for e in cola] == [
      ("The sailors rode the breeze clear of the rocks.", 1, 0),
      ("The more we study verbs, the crazier they get get.", 0, 1)]
  mnli_dev = "\t".join(official_header("mnli", "dev_matched")) + "\n" + "\t".join(
      ["7", "31193", "31193n", "government", "( ( bp", "( bp2", "(ROOT p1)", "(ROOT p2)",
       'He said "hi" \ralone.', "Product and geography.", "neutral", "neutral", "entailment",
       "neutral", "neutral", "neutral"]) + "\n\n"
  (tmp_path / "dev_matched.tsv").write_text(mnli_dev, encoding="utf-8", newline="")
  [ex] = glue_data.read_glue("mnli", "dev_matched", tmp_path)
  assert ex == GlueExample("mnli-dev_matched-7", 'He said "hi" \ralone.',
                           "Product and geography.", 1, 7)


def test_errors_name_file_line_and_value(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"'mnli' split 'dev_matched'.*dev_matched\.tsv"):
    glue_data.read_glue("mnli", "dev_matched", tmp_path)
  with pytest.raises(KeyError, match="valid splits"):
    glue_data.read_glue("mnli", "dev", tmp_path)

  path = write_split(tmp_path, "rte", "train", rows=4)
  lines = path.read_text().splitlines()
  lines[3] = lines[3] + "\textra"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"train\.tsv:4: expected 4 tab-separated columns.*found 5"):
    glue_data.read_glue("rte", "train", tmp_path)
  assert [e.index for e in glue_data.read_glue("rte", "train", tmp_path, skip_malformed=True)] == [
      100, 101, 103]

  lines = path.read_text().splitlines()
  lines[3] = "102\ta\tb\tcontradiction"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"train\.tsv:4: label 'contradiction' is not a valid label "
                     r"of GLUE task 'rte'; valid labels: \['entailment', 'not_entailment'\]"):
    glue_data.read_glue("rte", "train", tmp_path)
  lines[3] = "x\ta\tb\tentailment"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"train\.tsv:4: index column 0 holds 'x'"):
    glue_data.read_glue("rte", "train", tmp_path)

  stsb = write_split(tmp_path / "STS-B", "stsb", "dev")
  stsb.write_text(stsb.read_text().replace("\t2.400\n", "\t5.5\n"))
  with pytest.raises(ValueError, match=r"dev\.tsv:4: label '5.5' is outside"):
    glue_data.read_glue("stsb", "dev", tmp_path)
  stsb.write_text(stsb.read_text().replace("\t5.5\n", "\tn/a\n"))
  with pytest.raises(ValueError, match=r"dev\.tsv:4: label 'n/a' is not a number"):
    glue_data.read_glue("stsb", "dev", tmp_path)

  # A CoLA test file (with header) mistaken for train (no header, 4 columns): line 1 is wrong.
  (tmp_path / "CoLA").mkdir()
  (tmp_path / "CoLA" / "train.tsv").write_text("index\tsentence\n0\tHi.\n")
  with pytest.raises(ValueError, match=r"train\.tsv:1: expected 4 .*no header"):
    glue_data.read_glue("cola", "train", tmp_path)


def test_read_tfds_with_fake_module(monkeypatch, tmp_path):
  records = {
      ("glue/mnli", "validation_mismatched"): [
          {"premise": b"A man eats.", "hypothesis": b"Someone eats.", "label": 0, "idx": 5},
          {"premise": "It rains.", "hypothesis": b"It is dry.", "label": 2, "idx": 6}],
      ("glue/sst2", "test"): [{"sentence": b"fine", "label": -1, "idx": 0}],
      ("glue/stsb", "train"): [{"sentence1": b"a", "sentence2": b"b", "label": 3.2, "idx": 9}],
      ("glue/cola", "train"): [{"sentence": b"x", "label": 4, "idx": 1}],
      ("glue/qnli", "validation"): [{"question": b"q", "label": 0, "idx": 0}],
  }
  calls = []

  def load(name, split, data_dir, download, shuffle_files):
    calls.append((name, split, download))
    if (name, split) not in records:
      raise AssertionError(f"Dataset {name}: could not find data in {data_dir}")
    return records[(name, split)]

  fake = types.ModuleType("tensorflow_datasets")
  fake.load = load
  fake.as_numpy = iter
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)

  examples = glue_data.read_tfds("mnli", "dev_mismatched", tmp_path)
  assert examples == [
      GlueExample("mnli-dev_mismatched-5", "A man eats.", "Someone eats.", 0, 5),
      GlueExample("mnli-dev_mismatched-6", "It rains.", "It is dry.", 2, 6)]
  assert calls == [("glue/mnli", "validation_mismatched", False)]
  assert glue_data.read_tfds("sst2", "test", tmp_path) == [
      GlueExample("sst2-test-0", "fine", None, None, 0)]
  assert glue_data.read_tfds("stsb", "train", tmp_path)[0].label == pytest.approx(3.2)
  with pytest.raises(ValueError, match=r"label 4 is not a valid label id of GLUE task 'cola'"):
    glue_data.read_tfds("cola", "train", tmp_path)
  with pytest.raises(KeyError, match=r"no feature\(s\) \['sentence'\]"):
    glue_data.read_tfds("qnli", "dev", tmp_path)
  with pytest.raises(FileNotFoundError, match="'glue/rte' is not prepared"):
    glue_data.read_tfds("rte", "train", tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    glue_data.read_tfds("rte", "train", tmp_path / "nowhere")
  with pytest.raises(KeyError, match="valid splits"):
    glue_data.read_tfds("rte", "validation", tmp_path)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match="tensorflow-datasets"):
    glue_data.read_tfds("rte", "train", tmp_path)


def test_encode_single_and_pairs(tokenizer):
  single = [GlueExample("a", "the quick brown fox", None, 1, 0),
            GlueExample("b", "dog", None, None, 1)]
  out = glue_data.encode_examples(single, tokenizer, max_seq_length=8)
  assert {k: v.dtype for k, v in out.items()} == {
      "input_ids": np.int32, "attention_mask": np.int32, "token_type_ids": np.int32,
      "labels": np.int32}
  ids = tokenizer(["the quick brown fox"], add_special_tokens=False)["input_ids"][0]
  cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
  assert len(ids) == 6  # the qu ##ick brown f ##ox
  np.testing.assert_array_equal(out["input_ids"][0], [cls] + ids + [sep])
  np.testing.assert_array_equal(out["input_ids"][1, 3:], [pad] * 5)
  out7 = glue_data.encode_examples(single, tokenizer, max_seq_length=7)
  np.testing.assert_array_equal(out7["input_ids"][0], [cls] + ids[:5] + [sep])
  np.testing.assert_array_equal(out["labels"], [1, -1])
  assert out["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
  assert not out["token_type_ids"].any()

  a_text, b_text = "one two three four five six", "seven eight"
  ids_a = tokenizer([a_text], add_special_tokens=False)["input_ids"][0]
  ids_b = tokenizer([b_text], add_special_tokens=False)["input_ids"][0]
  assert len(ids_a) == 6 and len(ids_b) == 2
  pair = [GlueExample("p", a_text, b_text, 2.5, 0)]
  out = glue_data.encode_examples(pair, tokenizer, max_seq_length=10)
  # 7 content tokens fit: longest-first trims a (6 tokens) to 5, b (2) stays.
  assert out["labels"].dtype == np.float32 and out["labels"][0] == 2.5
  np.testing.assert_array_equal(out["input_ids"][0],
                                [cls] + ids_a[:5] + [sep] + ids_b + [sep])
  np.testing.assert_array_equal(out["token_type_ids"][0], [0] * 7 + [1] * 3)
  out = glue_data.encode_examples(pair, tokenizer, max_seq_length=7)  # 4 content: a=2, b=2
  np.testing.assert_array_equal(out["input_ids"][0], [cls] + ids_a[:2] + [sep] + ids_b + [sep])
  a, b = [1, 2, 3], [4, 5, 6]
  glue_data.truncate_pair(a, b, 4)  # ties pop from b first
  assert (a, b) == ([1, 2], [4, 5])
  test = [GlueExample("stsb-test-0", a_text, b_text, None, 0)]
  out = glue_data.encode_examples(test, tokenizer, 10, task="stsb")
  assert out["labels"].dtype == np.float32 and np.isnan(out["labels"][0])
  assert glue_data.encode_examples(test, tokenizer, 10)["labels"].tolist() == [-1]
  with pytest.raises(ValueError, match="'sst2' takes single sentences"):
    glue_data.encode_examples(test, tokenizer, 10, task="sst2")
  with pytest.raises(ValueError, match="mix of single sentences and sentence pairs"):
    glue_data.encode_examples(single + pair, tokenizer, 16)


def test_write_predictions(tmp_path):
  path = glue_data.write_predictions("mnli", "test_mismatched", [0, 2, 1], tmp_path)
  assert path == tmp_path / "MNLI-mm.tsv"
  assert path.read_text() == "index\tprediction\n0\tentailment\n1\tcontradiction\n2\tneutral\n"
  logits = np.array([[0.1, 0.9], [2.0, -1.0]])
  path = glue_data.write_predictions("qnli", "test", logits, tmp_path / "sub" / "QNLI.tsv",
                                     indices=[5, 6])
  assert path.read_text() == "index\tprediction\n5\tnot_entailment\n6\tentailment\n"
  path = glue_data.write_predictions("stsb", "test", np.array([[4.12345], [0.5]]), tmp_path)
  assert path.name == "STS-B.tsv"
  assert path.read_text() == "index\tprediction\n0\t4.123\n1\t0.500\n"
  assert glue_data.write_predictions("cola", "test", [1, 0], tmp_path).read_text() == (
      "index\tprediction\n0\t1\n1\t0\n")
  with pytest.raises(ValueError, match="not a label id"):
    glue_data.write_predictions("rte", "test", [0, 2], tmp_path)
  with pytest.raises(ValueError, match="3 indices for 2"):
    glue_data.write_predictions("rte", "test", [0, 1], tmp_path, indices=[0, 1, 2])
