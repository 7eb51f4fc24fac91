"""GLUE examples: reading the official TSV files or prepared tfds datasets, encoding, submissions.

  examples = read_glue("mrpc", "dev", "/data/glue_data")     # or read_tfds("mrpc", "dev", dir)
  arrays = encode_examples(examples, tokenizer, max_seq_length=128)
  write_predictions("mrpc", "test", predicted_ids, "/tmp/submission")  # -> .../MRPC.tsv
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from etils import epath

from mobilebert_jax.data.sources import epath_of
from mobilebert_jax.downstream.tasks import STSB_RANGE, GlueTask, SplitLayout, get_task


@dataclasses.dataclass(frozen=True)
class GlueExample:
  """One sentence (pair). `label` is the label id (int), the STS-B score (float) or None for
  unlabelled splits; `index` is the example's index in its split (the submission's index)."""
  guid: str
  text_a: str
  text_b: str | None
  label: int | float | None
  index: int


# ---------------------------------------------------------------------------------------------
# TSV files.

def task_dir(task: str | GlueTask, data_dir: str | os.PathLike) -> epath.Path:
  """The task's directory: `data_dir/<GLUE name>` (e.g. glue_data/SST-2) when it exists,
  otherwise `data_dir` itself."""
  task = get_task(task)
  root = epath_of(data_dir)
  return root / task.glue_name if (root / task.glue_name).is_dir() else root


def split_path(task: str | GlueTask, split: str, data_dir: str | os.PathLike) -> epath.Path:
  """The TSV file of `split`; raises FileNotFoundError naming the expected file."""
  task = get_task(task)
  layout = task.split(split)
  directory = task_dir(task, data_dir)
  for name in layout.files:
    if (directory / name).is_file():
      return directory / name
  tried = ", ".join(str(directory / n) for n in layout.files)
  raise FileNotFoundError(
      f"GLUE task {task.name!r} split {split!r}: no file {str(directory / layout.files[0])!r} "
      f"(expected the official {task.glue_name}/{layout.files[0]}; tried {tried})")


def _parse_label(task: GlueTask, value: str, where: str) -> int | float:
  value = value.strip()
  if task.is_regression:
    try:
      score = float(value)
    except ValueError:
      raise ValueError(f"{where}: label {value!r} is not a number (task {task.name!r} is a "
                       f"regression task with scores in {list(STSB_RANGE)})") from None
    if not STSB_RANGE[0] <= score <= STSB_RANGE[1]:
      raise ValueError(f"{where}: label {value!r} is outside the task's range "
                       f"{list(STSB_RANGE)}")
    return score
  if value not in task.labels:
    raise ValueError(f"{where}: label {value!r} is not a valid label of GLUE task "
                     f"{task.name!r}; valid labels: {list(task.labels)}")
  return task.labels.index(value)


def _read_lines(path: epath.Path):
  """Yields (line number, line) splitting on '\\n' only (GLUE text may hold a lone '\\r')."""
  with epath.Path(path).open("rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e})") from None
      if lineno == 1:
        line = line.lstrip("\ufeff")
      yield lineno, line.rstrip("\n").removesuffix("\r")


def parse_tsv(task: str | GlueTask, split: str, path: str | os.PathLike,
              skip_malformed: bool = False) -> list[GlueExample]:
  """Parses one GLUE TSV file laid out as `task`'s `split`.

  Every line (the header included) must have the layout's column count; a wrong count raises
  naming the file and line, or is skipped with `skip_malformed=True` (old QQP downloads hold a
  few such rows; QQP-clean does not). Labels must be in the
  task's label set (STS-B: a number in [0, 5]). Blank lines are ignored.
  """
  task = get_task(task)
  layout: SplitLayout = task.split(split)
  path = epath.Path(path)
  examples: list[GlueExample] = []
  header_seen = not layout.header
  for lineno, line in _read_lines(path):
    if not line:
      continue
    where = f"{path}:{lineno}"
    columns = line.split("\t")
    if len(columns) != layout.num_columns:
      if skip_malformed and header_seen:
        continue
      raise ValueError(
          f"{where}: expected {layout.num_columns} tab-separated columns for GLUE task "
          f"{task.name!r} split {split!r} ({'header then ' if layout.header else 'no header, '}"
          f"{layout.num_columns} columns per row), found {len(columns)}")
    if not header_seen:
      header_seen = True
      continue
    if layout.index is None:
      index = len(examples)
    else:
      try:
        index = int(columns[layout.index])
      except ValueError:
        raise ValueError(f"{where}: index column {layout.index} holds "
                         f"{columns[layout.index]!r}, not an integer") from None
    label = None if layout.label is None else _parse_label(task, columns[layout.label], where)
    text_b = None if layout.text_b is None else columns[layout.text_b]
    examples.append(GlueExample(guid=f"{task.name}-{split}-{index}", text_a=columns[layout.text_a],
                                text_b=text_b, label=label, index=index))
  return examples


def read_glue(task: str | GlueTask, split: str, data_dir: str | os.PathLike,
              skip_malformed: bool = False) -> list[GlueExample]:
  """Reads `split` of `task` from a GLUE directory (`data_dir` is the task directory, e.g.
  glue_data/SST-2, or the glue_data root). Test splits come back with `label=None`."""
  return parse_tsv(task, split, split_path(task, split, data_dir), skip_malformed)


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets.

def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "reading GLUE from tfds needs tensorflow-datasets, which is not installed; install it "
        "with `pip install 'mobilebert_jax[tfds]'`, or read the GLUE TSV files with "
        "read_glue") from e
  return tfds


def _text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return str(value)


def read_tfds(task: str | GlueTask, split: str, data_dir: str | os.PathLike
              ) -> list[GlueExample]:
  """Reads `split` (this package's split names, e.g. "dev", "dev_matched", "ax") of a GLUE task
  prepared with tensorflow-datasets in `data_dir`. Never downloads (`download=False`).

  tfds features map as: sentence / sentence1 / question1 / question / premise -> text_a,
  sentence2 / question2 / sentence / hypothesis -> text_b, label -> label (-1: None), idx -> index.
  """
  task = get_task(task)
  if split not in task.tfds_splits:
    raise KeyError(f"GLUE task {task.name!r} has no split {split!r}; valid splits: "
                   f"{sorted(task.tfds_splits)}")
  tfds = _import_tfds()
  if not data_dir or not epath.Path(os.fspath(data_dir)).is_dir():  # local or gs://
    raise FileNotFoundError(f"tfds data_dir {data_dir!r} for GLUE task {task.name!r} does not "
                            "exist")
  builder, tfds_split = task.tfds_splits[split]
  try:
    ds = tfds.load(builder, split=tfds_split, data_dir=os.fspath(data_dir), download=False,
                   shuffle_files=False)
  except AssertionError as e:  # tfds' "not prepared" error with download=False
    raise FileNotFoundError(f"tfds dataset {builder!r} is not prepared in data_dir "
                            f"{os.fspath(data_dir)!r}; prepare it first (`tfds build {builder} "
                            f"--data_dir=...`), this reader never downloads: {e}") from e
  field_a, field_b = task.tfds_text_fields
  examples: list[GlueExample] = []
  for n, record in enumerate(tfds.as_numpy(ds)):
    needed = [f for f in (field_a, field_b, "label") if f is not None]
    missing = [f for f in needed if f not in record]
    if missing:
      raise KeyError(f"tfds {builder!r} split {tfds_split!r} example {n} has no feature(s) "
                     f"{missing}; it has {sorted(record)}")
    index = int(record["idx"]) if "idx" in record else n
    where = f"tfds {builder!r} split {tfds_split!r} example {n} (idx {index})"
    raw = record["label"]
    if task.is_regression:
      label = None if float(raw) < 0 else float(raw)
    else:
      label = int(raw)
      if label == -1:
        label = None
      elif not 0 <= label < task.num_labels:
        raise ValueError(f"{where}: label {label} is not a valid label id of GLUE task "
                         f"{task.name!r}; valid ids: 0..{task.num_labels - 1} "
                         f"({list(task.labels)})")
    text_b = None if field_b is None else _text(record[field_b])
    examples.append(GlueExample(guid=f"{task.name}-{split}-{index}",
                                text_a=_text(record[field_a]), text_b=text_b, label=label,
                                index=index))
  return examples


# ---------------------------------------------------------------------------------------------
# Encoding.

def truncate_pair(tokens_a: list, tokens_b: list | None, max_tokens: int) -> None:
  """Longest-first truncation in place: while len(a) + len(b) > max_tokens, drop the last token
  of the longer sequence (of b on ties), as BERT's `_truncate_seq_pair`."""
  if tokens_b is None:
    del tokens_a[max(max_tokens, 0):]
    return
  while len(tokens_a) + len(tokens_b) > max_tokens:
    (tokens_a if len(tokens_a) > len(tokens_b) else tokens_b).pop()


def encode_examples(examples: Sequence[GlueExample], tokenizer, max_seq_length: int,
                    task: str | GlueTask | None = None) -> dict[str, np.ndarray]:
  """Encodes examples as `[CLS] a [SEP] (b [SEP])` padded to `max_seq_length`.

  Returns int32 arrays input_ids, attention_mask, token_type_ids [N, max_seq_length] and labels
  [N]: int32 label ids (-1 where unlabelled), or float32 scores (NaN where unlabelled) for a
  regression task (`task` STS-B; without `task`: iff some label is a float, so pass it for
  unlabelled STS-B test examples). Pairs are truncated longest-first (`truncate_pair`).
  """
  if not examples:
    raise ValueError("encode_examples got no examples")
  is_pair = examples[0].text_b is not None
  odd = next((ex for ex in examples if (ex.text_b is not None) != is_pair), None)
  if odd is not None:
    raise ValueError(f"encode_examples got a mix of single sentences and sentence pairs: "
                     f"{examples[0].guid!r} is {'a pair' if is_pair else 'single'}, "
                     f"{odd.guid!r} is not")
  specials = 3 if is_pair else 2
  if max_seq_length < specials + (2 if is_pair else 1):
    raise ValueError(f"max_seq_length {max_seq_length} is too short for "
                     f"{'pairs' if is_pair else 'single sentences'}")
  if task is not None:
    task = get_task(task)
    if task.is_pair != is_pair:
      kind = "sentence pairs" if task.is_pair else "single sentences"
      raise ValueError(f"GLUE task {task.name!r} takes {kind} but example {examples[0].guid!r} "
                       f"is {'a pair' if is_pair else 'a single sentence'}")
    regression = task.is_regression
  else:
    regression = any(isinstance(ex.label, float) for ex in examples)
  kw = dict(add_special_tokens=False)
  ids_a = tokenizer([ex.text_a for ex in examples], **kw)["input_ids"]
  ids_b = tokenizer([ex.text_b for ex in examples], **kw)["input_ids"] if is_pair else None
  n = len(examples)
  input_ids = np.full((n, max_seq_length), tokenizer.pad_token_id, np.int32)
  attention_mask = np.zeros((n, max_seq_length), np.int32)
  token_type_ids = np.zeros((n, max_seq_length), np.int32)
  cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
  for i in range(n):
    a = list(ids_a[i])
    b = list(ids_b[i]) if is_pair else None
    truncate_pair(a, b, max_seq_length - specials)
    seq = [cls] + a + [sep]
    types_ = [0] * len(seq)
    if is_pair:
      seq += b + [sep]
      types_ += [1] * (len(b) + 1)
    input_ids[i, :len(seq)] = seq
    attention_mask[i, :len(seq)] = 1
    token_type_ids[i, :len(seq)] = types_
  if regression:
    labels = np.array([np.nan if ex.label is None else ex.label for ex in examples], np.float32)
  else:
    labels = np.array([-1 if ex.label is None else ex.label for ex in examples], np.int32)
  return {"input_ids": input_ids, "attention_mask": attention_mask,
          "token_type_ids": token_type_ids, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Submission files.

def format_predictions(task: str | GlueTask, split: str, predictions,
                       indices: Sequence[int] | None = None) -> tuple[str, str]:
  """A GLUE submission file's (official name, text): header `index\\tprediction`, then one row
  per example.

  `predictions`: label ids [N], logits [N, num_labels] (argmax is taken) or STS-B scores [N]
  (written with 3 decimals). Label ids are written as the task's label names (e.g. entailment).
  `indices`: the examples' indices (default 0..N-1). The name is the official one (e.g.
  MNLI-m.tsv).
  """
  task = get_task(task)
  task.split(split)
  preds = np.asarray(predictions)
  if task.is_regression:
    if preds.ndim == 2 and preds.shape[1] == 1:
      preds = preds[:, 0]
    if preds.ndim != 1:
      raise ValueError(f"STS-B predictions must be scores of shape [N], got {preds.shape}")
    rows = [f"{float(p):.3f}" for p in preds]
  else:
    if preds.ndim == 2:
      if preds.shape[1] != task.num_labels:
        raise ValueError(f"{task.name!r} logits must have {task.num_labels} columns, got "
                         f"shape {preds.shape}")
      preds = preds.argmax(axis=1)
    if preds.ndim != 1 or (preds.size and preds.dtype.kind not in "iu"):
      raise ValueError(f"{task.name!r} predictions must be integer label ids of shape [N] or "
                       f"logits [N, {task.num_labels}], got {preds.dtype} {preds.shape}")
    bad = [int(p) for p in preds if not 0 <= p < task.num_labels]
    if bad:
      raise ValueError(f"{task.name!r} prediction {bad[0]} is not a label id in "
                       f"0..{task.num_labels - 1} ({list(task.labels)})")
    rows = [task.labels[int(p)] for p in preds]
  if indices is None:
    indices = range(len(rows))
  elif len(indices) != len(rows):
    raise ValueError(f"got {len(indices)} indices for {len(rows)} predictions")
  name = task.submission_files.get(split, f"{task.glue_name}-{split}.tsv")
  return name, "index\tprediction\n" + "".join(f"{int(index)}\t{row}\n"
                                                 for index, row in zip(indices, rows))


def write_predictions(task: str | GlueTask, split: str, predictions, path: str | os.PathLike,
                      indices: Sequence[int] | None = None) -> epath.Path:
  """Writes `format_predictions` to `path`: a file, or an existing directory to write the
  official name into (e.g. MNLI-m.tsv). Returns the path written."""
  name, text = format_predictions(task, split, predictions, indices)
  path = os.fspath(path)
  out = epath_of(path)
  if out.is_dir():
    out = out / name
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  return out
