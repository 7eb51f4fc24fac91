"""GLUE metrics, teacher-student loyalty metrics and tagging metrics (numpy, float64).

Classification metrics take label ids; `glue_metrics` also accepts logits [N, C] (argmax).
Correlations of a constant input are undefined and returned as NaN.
"""

from __future__ import annotations

import numpy as np

from mobilebert_jax.downstream.tasks import GlueTask, get_task


def _pair(predictions, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
  p, y = np.asarray(predictions), np.asarray(labels)
  if p.ndim != 1 or p.shape != y.shape:
    raise ValueError(f"{name}: predictions and labels must be 1-D of equal length, got shapes "
                     f"{p.shape} and {y.shape}")
  if p.size == 0:
    raise ValueError(f"{name}: no examples")
  return p, y


def accuracy(predictions, labels) -> float:
  """mean(prediction == label)."""
  p, y = _pair(predictions, labels, "accuracy")
  return float(np.mean(p == y))


def f1_score(predictions, labels, positive: int = 1) -> float:
  """Binary F1 of class `positive`: 2 TP / (2 TP + FP + FN); 0 when there is no positive
  prediction or label."""
  p, y = _pair(predictions, labels, "f1_score")
  tp = np.sum((p == positive) & (y == positive))
  fp = np.sum((p == positive) & (y != positive))
  fn = np.sum((p != positive) & (y == positive))
  denominator = 2 * tp + fp + fn
  return float(2 * tp / denominator) if denominator else 0.0


def matthews_corrcoef(predictions, labels) -> float:
  """Matthews correlation (multi-class form, = (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)
  (TN+FN)) for two classes): with the confusion matrix C, t_k = true counts, p_k = predicted
  counts, c = trace(C), s = N:  MCC = (c s - t.p) / sqrt((s^2 - p.p) (s^2 - t.t)); 0 if the
  denominator is 0."""
  p, y = _pair(predictions, labels, "matthews_corrcoef")
  classes, inverse = np.unique(np.concatenate([y, p]), return_inverse=True)
  yi, pi = inverse[:len(y)], inverse[len(y):]
  confusion = np.zeros((len(classes), len(classes)), np.float64)
  np.add.at(confusion, (yi, pi), 1.0)
  t, q = confusion.sum(axis=1), confusion.sum(axis=0)
  c, s = np.trace(confusion), confusion.sum()
  denominator = np.sqrt((s * s - q @ q) * (s * s - t @ t))
  return float((c * s - t @ q) / denominator) if denominator else 0.0


def pearson(x, y) -> float:
  """Pearson r = sum((x - mean x)(y - mean y)) / sqrt(sum((x - mean x)^2) sum((y - mean y)^2))."""
  a, b = _pair(x, y, "pearson")
  a = a.astype(np.float64) - a.mean(dtype=np.float64)
  b = b.astype(np.float64) - b.mean(dtype=np.float64)
  denominator = np.sqrt((a @ a) * (b @ b))
  return float(a @ b / denominator) if denominator else float("nan")


def average_ranks(x) -> np.ndarray:
  """1-based ranks of `x`, tied values sharing the mean of their ranks (e.g. [5, 1, 5] ->
  [2.5, 1, 2.5])."""
  _, inverse, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
  last = np.cumsum(counts)  # rank of each distinct value's last occurrence
  return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(x, y) -> float:
  """Spearman rho = Pearson r of the average ranks (ties share their mean rank)."""
  a, b = _pair(x, y, "spearman")
  return pearson(average_ranks(a), average_ranks(b))


_METRICS = {
    "accuracy": accuracy,
    "f1": f1_score,
    "mcc": matthews_corrcoef,
    "pearson": pearson,
    "spearmanr": spearman,
}


def glue_metrics(task: str | GlueTask, predictions, labels) -> dict[str, float]:
  """The task's official metrics: cola {"mcc"}; sst2, mnli, qnli, rte, wnli {"accuracy"};
  mrpc, qqp {"accuracy", "f1"}; stsb {"pearson", "spearmanr"}.

  `predictions`: label ids [N] or logits [N, C] (argmax taken); STS-B scores [N] or [N, 1].
  """
  task = get_task(task)
  p = np.asarray(predictions)
  if task.is_regression:
    if p.ndim == 2 and p.shape[1] == 1:
      p = p[:, 0]
  elif p.ndim == 2:
    if p.shape[1] != task.num_labels:
      raise ValueError(f"GLUE task {task.name!r}: logits must have {task.num_labels} columns, "
                       f"got shape {p.shape}")
    p = p.argmax(axis=1)
  return {name: _METRICS[name](p, labels) for name in task.metrics}


def glue_score(task: str | GlueTask, metrics: dict[str, float]) -> float:
  """The task's GLUE score: the mean of its official metrics (e.g. MRPC (acc + F1) / 2)."""
  task = get_task(task)
  missing = [m for m in task.metrics if m not in metrics]
  if missing:
    raise KeyError(f"GLUE task {task.name!r} score needs metrics {missing}; got {sorted(metrics)}")
  return float(np.mean([metrics[m] for m in task.metrics]))


# ---------------------------------------------------------------------------------------------
# Loyalty (how faithfully a student mimics its teacher).

def _probs(teacher_probs, student_probs, name: str) -> tuple[np.ndarray, np.ndarray]:
  t = np.asarray(teacher_probs, np.float64)
  s = np.asarray(student_probs, np.float64)
  if t.ndim != 2 or t.shape != s.shape or t.shape[0] == 0:
    raise ValueError(f"{name}: teacher and student probabilities must both be [N, C] with N > 0, "
                     f"got shapes {t.shape} and {s.shape}")
  for who, p in (("teacher", t), ("student", s)):
    if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
      raise ValueError(f"{name}: {who} rows must be probability distributions (non-negative, "
                       "summing to 1); apply a softmax to logits first")
  return t, s


def label_loyalty(teacher_probs, student_probs) -> float:
  """Label loyalty = mean over examples of [argmax teacher == argmax student]."""
  t, s = _probs(teacher_probs, student_probs, "label_loyalty")
  return float(np.mean(t.argmax(axis=1) == s.argmax(axis=1)))


def jensen_shannon(p, q, base: float | None = None) -> np.ndarray:
  """Row-wise Jensen-Shannon divergence, logarithms to `base` (None: natural log, in nats):

      JSD(P, Q) = KL(P || M) / 2 + KL(Q || M) / 2,  M = (P + Q) / 2,  0 log 0 = 0,

  in [0, log_base 2] (so in [0, 1] for base=2). sqrt(JSD) is
  `scipy.spatial.distance.jensenshannon(p, q, base)`, whose default base is also e.
  """
  p = np.asarray(p, np.float64)
  q = np.asarray(q, np.float64)
  if base is not None and not (base > 0 and base != 1):
    raise ValueError(f"base must be None (natural log) or a positive number other than 1, "
                     f"got {base!r}")
  m = (p + q) / 2

  def kl(a):
    with np.errstate(divide="ignore", invalid="ignore"):
      terms = np.where(a > 0, a * np.log(a / m), 0.0)
    return terms.sum(axis=-1)

  jsd = 0.5 * kl(p) + 0.5 * kl(q)
  if base is not None:
    jsd = jsd / np.log(base)
  upper = np.log(2.0) if base is None else np.log(2.0) / np.log(base)
  return np.clip(jsd, 0.0, upper)


def probability_loyalty(teacher_probs, student_probs, base: float | None = None) -> float:
  """Probability loyalty (Xu et al., 2021, "Beyond Preserved Accuracy") = mean over examples of

      1 - sqrt(JSD(teacher, student))

  with natural logarithms by default, as the paper's reference computes it with SciPy's
  `distance.jensenshannon` at its default base (README of JetRunner/beyond-preserved-accuracy):
  1 for identical distributions, 1 - sqrt(ln 2) ~ 0.167 for disjoint ones. `base=2` gives
  JSD in bits, so the loyalty is in [0, 1] (0 for disjoint distributions).
  """
  t, s = _probs(teacher_probs, student_probs, "probability_loyalty")
  return float(np.mean(1.0 - np.sqrt(jensen_shannon(t, s, base))))


# ---------------------------------------------------------------------------------------------
# Sequence tagging.

TAGGING_SCHEMES = ("bio", "accuracy")


def bio_spans(tags) -> set[tuple[str, int, int]]:
  """The labelled spans (type, start, end exclusive) of a BIO tag sequence, read as the CoNLL
  shared tasks' `conlleval` reads them: `B-X` starts a span, `I-X` continues a span of type X
  and starts one after `O` or after a span of another type (IOB1 leniency), `O` closes it."""
  spans, kind, start = set(), None, 0
  for i, tag in enumerate(list(tags) + ["O"]):
    prefix, _, label = tag.partition("-")
    continues = prefix == "I" and kind == label
    if kind is not None and not continues:
      spans.add((kind, start, i))
      kind = None
    if prefix == "B" or (prefix == "I" and not continues):
      kind, start = label, i
  return spans


def span_f1(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
  """Micro-averaged span precision, recall and F1 over sentences (conlleval's "FB1"): a
  predicted span counts when its type, start and end equal a gold span's."""
  if len(gold) != len(predicted):
    raise ValueError(f"span_f1: {len(gold)} gold sentences but {len(predicted)} predicted")
  correct = found = expected = 0
  for n, (g, p) in enumerate(zip(gold, predicted)):
    if len(g) != len(p):
      raise ValueError(f"span_f1: sentence {n} has {len(g)} gold tags but {len(p)} predicted")
    gs, ps = bio_spans(g), bio_spans(p)
    correct, found, expected = correct + len(gs & ps), found + len(ps), expected + len(gs)
  precision = correct / found if found else 0.0
  recall = correct / expected if expected else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f1}


def tagging_metrics(gold: list[list[str]], predicted: list[list[str]], scheme: str = "bio"
                    ) -> dict[str, float]:
  """Per-word accuracy, plus span precision/recall/F1 when `scheme` is "bio" (NER, chunking);
  "accuracy" (POS tagging) reports the accuracy alone."""
  if scheme not in TAGGING_SCHEMES:
    raise ValueError(f"tagging scheme {scheme!r} is not one of {list(TAGGING_SCHEMES)}")
  flat_gold = [t for s in gold for t in s]
  flat_pred = [t for s in predicted for t in s]
  if len(flat_gold) != len(flat_pred):
    raise ValueError(f"tagging_metrics: {len(flat_gold)} gold tags but {len(flat_pred)} "
                     "predicted")
  metrics = {"accuracy": accuracy(np.array(flat_pred, object), np.array(flat_gold, object))}
  if scheme == "bio":
    metrics.update(span_f1(gold, predicted))
  return metrics
