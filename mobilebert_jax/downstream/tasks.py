"""The nine GLUE tasks: labels, TSV column layouts, metrics, splits and submission file names.

Layouts follow the official GLUE distribution (the official GLUE download script, one directory per task:
CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI). Files are tab-separated without quoting.
Every task has `train`, `dev` and `test` splits except MNLI, whose evaluation and test files come
matched and mismatched (`dev_matched`, `dev_mismatched`, `test_matched`, `test_mismatched`), plus
the diagnostic set `ax` (unlabelled, predicted with the MNLI model).

Label lists are the label strings of the TSV files, in the order of the tensorflow-datasets /
Hugging Face `glue` builders, so that label id i means the same class for both readers
(e.g. MNLI: 0 entailment, 1 neutral, 2 contradiction). STS-B is a regression task in [0, 5].
"""

from __future__ import annotations

import dataclasses
import types
from typing import Mapping

GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")

STSB_RANGE = (0.0, 5.0)


@dataclasses.dataclass(frozen=True)
class SplitLayout:
  """Where the fields of one split's TSV file are.

  files: candidate file names relative to the task directory, tried in order (the first is the
    official one and the one named in errors).
  header: whether the first line is a header row.
  num_columns: tab-separated fields on every line (the header included).
  text_a, text_b: column of the first / second sentence (text_b None for single-sentence tasks).
  label: label column, or None for unlabelled (test) splits.
  index: column holding the example index, or None to number rows 0, 1, ... in file order.
  """
  files: tuple[str, ...]
  header: bool
  num_columns: int
  text_a: int
  text_b: int | None
  label: int | None
  index: int | None = None

  @property
  def has_labels(self) -> bool:
    return self.label is not None


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """One GLUE task.

  name: registry key ("sst2"); glue_name: the official name ("SST-2") and task directory.
  labels: label strings as written in the TSV files (id = position); None for regression.
  splits: split name -> `SplitLayout`.
  eval_splits / test_splits: the labelled evaluation splits and the unlabelled test splits.
  metrics: official metric names, as keys of `metrics.glue_metrics` (GLUE score = their mean).
  submission_files: test split -> file name of the GLUE leaderboard submission.
  tfds_builder: tensorflow-datasets builder; tfds_splits: split -> (builder, tfds split).
  tfds_text_fields: tfds feature names of text_a and text_b.
  """
  name: str
  glue_name: str
  labels: tuple[str, ...] | None
  splits: Mapping[str, SplitLayout]
  eval_splits: tuple[str, ...]
  test_splits: tuple[str, ...]
  metrics: tuple[str, ...]
  submission_files: Mapping[str, str]
  tfds_builder: str
  tfds_splits: Mapping[str, tuple[str, str]]
  tfds_text_fields: tuple[str, str | None]

  @property
  def is_regression(self) -> bool:
    return self.labels is None

  @property
  def num_labels(self) -> int:
    """Number of classifier outputs (1 for regression)."""
    return 1 if self.labels is None else len(self.labels)

  @property
  def is_pair(self) -> bool:
    return self.tfds_text_fields[1] is not None

  def split(self, split: str) -> SplitLayout:
    """The layout of `split`; raises listing the task's splits for an unknown one."""
    if split not in self.splits:
      raise KeyError(f"GLUE task {self.name!r} has no split {split!r}; valid splits: "
                     f"{sorted(self.splits)}")
    return self.splits[split]

  def label_id(self, value: str) -> int:
    """Id of a label string; raises listing the valid labels."""
    if self.labels is None:
      raise ValueError(f"GLUE task {self.name!r} is a regression task without label names")
    try:
      return self.labels.index(value)
    except ValueError:
      raise ValueError(f"GLUE task {self.name!r}: label {value!r} is not one of "
                       f"{list(self.labels)}") from None


def _layouts(train_dev: SplitLayout, test: SplitLayout) -> dict[str, SplitLayout]:
  return {"train": dataclasses.replace(train_dev, files=("train.tsv",)),
          "dev": dataclasses.replace(train_dev, files=("dev.tsv",)),
          "test": dataclasses.replace(test, files=("test.tsv",))}


def _std_tfds(builder: str) -> dict[str, tuple[str, str]]:
  return {"train": (builder, "train"), "dev": (builder, "validation"), "test": (builder, "test")}


def _task(name, glue_name, labels, splits, metrics, text_fields, eval_splits=("dev",),
          test_splits=("test",), submission_files=None, tfds_splits=None) -> GlueTask:
  builder = f"glue/{name}"
  return GlueTask(
      name=name, glue_name=glue_name, labels=labels, splits=types.MappingProxyType(splits),
      eval_splits=eval_splits, test_splits=test_splits, metrics=metrics,
      submission_files=types.MappingProxyType(submission_files or {"test": f"{glue_name}.tsv"}),
      tfds_builder=builder, tfds_splits=types.MappingProxyType(tfds_splits or _std_tfds(builder)),
      tfds_text_fields=text_fields)


_NO_FILE = ("",)  # placeholder, replaced by _layouts
_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

# Index / sentence1 / sentence2 / label, as in QNLI, RTE and WNLI (test: no label column).
_PAIR4 = SplitLayout(_NO_FILE, header=True, num_columns=4, text_a=1, text_b=2, label=3, index=0)
_PAIR3_TEST = SplitLayout(_NO_FILE, header=True, num_columns=3, text_a=1, text_b=2, label=None,
                          index=0)
_SINGLE_TEST = SplitLayout(_NO_FILE, header=True, num_columns=2, text_a=1, text_b=None,
                           label=None, index=0)

_MNLI_SPLITS = {
    # index promptID pairID genre s1_binary_parse s2_binary_parse s1_parse s2_parse s1 s2 ...
    # train: ... label1 gold_label (12); dev: ... label1..label5 gold_label (16); test: (10).
    "train": SplitLayout(("train.tsv",), True, 12, text_a=8, text_b=9, label=11, index=0),
    "dev_matched": SplitLayout(("dev_matched.tsv",), True, 16, text_a=8, text_b=9, label=15,
                               index=0),
    "dev_mismatched": SplitLayout(("dev_mismatched.tsv",), True, 16, text_a=8, text_b=9,
                                  label=15, index=0),
    "test_matched": SplitLayout(("test_matched.tsv",), True, 10, text_a=8, text_b=9, label=None,
                                index=0),
    "test_mismatched": SplitLayout(("test_mismatched.tsv",), True, 10, text_a=8, text_b=9,
                                   label=None, index=0),
    # The diagnostic set (index sentence1 sentence2): the GLUE download script writes it to
    # glue_data/diagnostic/diagnostic.tsv; the GLUE site serves it as AX.tsv.
    "ax": SplitLayout(("diagnostic.tsv", "AX.tsv", "../diagnostic/diagnostic.tsv",
                       "../diagnostic/AX.tsv"), True, 3, text_a=1, text_b=2, label=None,
                      index=0),
}

TASKS: Mapping[str, GlueTask] = types.MappingProxyType({
    # CoLA train/dev: no header; source, label, original judgement ("*" or ""), sentence.
    "cola": _task("cola", "CoLA", _BINARY, _layouts(
        SplitLayout(_NO_FILE, header=False, num_columns=4, text_a=3, text_b=None, label=1),
        _SINGLE_TEST), ("mcc",), ("sentence", None)),
    # SST-2: sentence, label; test: index, sentence.
    "sst2": _task("sst2", "SST-2", _BINARY, _layouts(
        SplitLayout(_NO_FILE, header=True, num_columns=2, text_a=0, text_b=None, label=1),
        _SINGLE_TEST), ("accuracy",), ("sentence", None)),
    # MRPC: Quality, #1 ID, #2 ID, #1 String, #2 String; test: index instead of Quality.
    "mrpc": _task("mrpc", "MRPC", _BINARY, _layouts(
        SplitLayout(_NO_FILE, header=True, num_columns=5, text_a=3, text_b=4, label=0),
        SplitLayout(_NO_FILE, header=True, num_columns=5, text_a=3, text_b=4, label=None,
                    index=0)), ("accuracy", "f1"), ("sentence1", "sentence2")),
    # STS-B: index genre filename year old_index source1 source2 sentence1 sentence2 score;
    # test: the same without score.
    "stsb": _task("stsb", "STS-B", None, _layouts(
        SplitLayout(_NO_FILE, header=True, num_columns=10, text_a=7, text_b=8, label=9, index=0),
        SplitLayout(_NO_FILE, header=True, num_columns=9, text_a=7, text_b=8, label=None,
                    index=0)), ("pearson", "spearmanr"), ("sentence1", "sentence2")),
    # QQP: id qid1 qid2 question1 question2 is_duplicate; test: id question1 question2.
    "qqp": _task("qqp", "QQP", _BINARY, _layouts(
        SplitLayout(_NO_FILE, header=True, num_columns=6, text_a=3, text_b=4, label=5, index=0),
        _PAIR3_TEST), ("accuracy", "f1"), ("question1", "question2")),
    "mnli": _task(
        "mnli", "MNLI", ("entailment", "neutral", "contradiction"), _MNLI_SPLITS, ("accuracy",),
        ("premise", "hypothesis"), eval_splits=("dev_matched", "dev_mismatched"),
        test_splits=("test_matched", "test_mismatched", "ax"),
        submission_files={"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv",
                          "ax": "AX.tsv"},
        tfds_splits={"train": ("glue/mnli", "train"),
                     "dev_matched": ("glue/mnli", "validation_matched"),
                     "dev_mismatched": ("glue/mnli", "validation_mismatched"),
                     "test_matched": ("glue/mnli", "test_matched"),
                     "test_mismatched": ("glue/mnli", "test_mismatched"),
                     "ax": ("glue/ax", "test")}),
    # QNLI: index question sentence label.
    "qnli": _task("qnli", "QNLI", _NLI2, _layouts(_PAIR4, _PAIR3_TEST), ("accuracy",),
                  ("question", "sentence")),
    # RTE, WNLI: index sentence1 sentence2 label (WNLI labels 0/1, 1 = entailment).
    "rte": _task("rte", "RTE", _NLI2, _layouts(_PAIR4, _PAIR3_TEST), ("accuracy",),
                 ("sentence1", "sentence2")),
    "wnli": _task("wnli", "WNLI", _BINARY, _layouts(_PAIR4, _PAIR3_TEST), ("accuracy",),
                  ("sentence1", "sentence2")),
})


# N_a, the augmented copies tried per example and field in TinyBERT's data augmentation, as the
# release sets them by task (data_augmentation.py, `default_params`, lines 300-312 of
# huawei-noah/Pretrained-Language-Model@0598f02). Its STS-B entry is spelt "STS-b" and never
# matches the task name "STS-B", so STS-B gets the `--N` default, also 30. WNLI has no value
# (the release does not augment it); augmentation.DEFAULT_N_AUG (20, the paper's) applies.
TINYBERT_AUGMENTATION_N: Mapping[str, int] = types.MappingProxyType({
    "cola": 30, "sst2": 20, "mrpc": 30, "stsb": 30, "qqp": 10, "mnli": 10, "qnli": 20,
    "rte": 30})


def _normalise(name: str) -> str:
  return name.strip().lower().replace("-", "").replace("_", "")


def get_task(name: str | GlueTask) -> GlueTask:
  """The task named `name` (case, '-' and '_' ignored: "SST-2" == "sst2"); a `GlueTask` is
  returned as is. Raises KeyError listing the valid names for an unknown task."""
  if isinstance(name, GlueTask):
    return name
  key = _normalise(str(name))
  if key not in TASKS:
    raise KeyError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(GLUE_TASKS)}")
  return TASKS[key]
