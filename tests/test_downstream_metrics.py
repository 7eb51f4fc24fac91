"""GLUE metrics against scikit-learn / scipy, and the teacher-student loyalty metrics."""

import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial import distance
from sklearn import metrics as skm

from mobilebert_jax.downstream import metrics
from mobilebert_jax.downstream.tasks import GLUE_TASKS, get_task

RNG = np.random.default_rng(0)
BINARY_LABELS = RNG.integers(0, 2, 200)
BINARY_PREDS = np.where(RNG.random(200) < 0.7, BINARY_LABELS, 1 - BINARY_LABELS)
MULTI_LABELS = RNG.integers(0, 3, 150)
MULTI_PREDS = np.where(RNG.random(150) < 0.6, MULTI_LABELS, RNG.integers(0, 3, 150))


def test_accuracy_f1_mcc_match_sklearn():
  for p, y in ((BINARY_PREDS, BINARY_LABELS), (MULTI_PREDS, MULTI_LABELS)):
    assert metrics.accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p))
    assert metrics.matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
  assert metrics.f1_score(BINARY_PREDS, BINARY_LABELS) == pytest.approx(
      skm.f1_score(BINARY_LABELS, BINARY_PREDS))
  # Hand-checked small case: TP=2, FP=1, FN=1, TN=1.
  p, y = [1, 1, 1, 0, 0], [1, 1, 0, 1, 0]
  assert metrics.f1_score(p, y) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
  mcc = (2 * 1 - 1 * 1) / math.sqrt((2 + 1) * (2 + 1) * (1 + 1) * (1 + 1))  # 1/6
  assert metrics.matthews_corrcoef(p, y) == pytest.approx(mcc)
  assert metrics.matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))


def test_degenerate_cases_match_sklearn():
  y = np.array([0, 0, 1, 1])
  const = np.zeros(4, int)
  assert metrics.matthews_corrcoef(const, y) == skm.matthews_corrcoef(y, const) == 0.0
  assert metrics.f1_score(const, np.zeros(4, int)) == 0.0
  assert metrics.matthews_corrcoef(y, y) == pytest.approx(1.0)
  assert metrics.matthews_corrcoef(1 - y, y) == pytest.approx(-1.0)
  assert math.isnan(metrics.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
  with pytest.raises(ValueError, match="equal length"):
    metrics.accuracy([0, 1], [0, 1, 1])


def test_pearson_spearman_match_scipy_including_ties():
  x = RNG.normal(size=100)
  y = x + RNG.normal(scale=0.5, size=100)
  assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
  assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
  # Heavy ties (STS-B gold scores are often multiples of 0.2).
  xt = np.round(RNG.uniform(0, 5, 120) * 5) / 5
  yt = np.clip(np.round(xt + RNG.normal(scale=1.0, size=120)), 0, 5)
  assert metrics.spearman(xt, yt) == pytest.approx(stats.spearmanr(xt, yt)[0])
  assert metrics.pearson(xt, yt) == pytest.approx(stats.pearsonr(xt, yt)[0])
  np.testing.assert_allclose(metrics.average_ranks([5, 1, 5, 3, 3, 3]),
                             stats.rankdata([5, 1, 5, 3, 3, 3]))
  np.testing.assert_allclose(metrics.average_ranks([5, 1, 5]), [2.5, 1, 2.5])


def test_glue_metrics_names_per_task():
  expected = {"cola": {"mcc"}, "sst2": {"accuracy"}, "mrpc": {"accuracy", "f1"},
              "stsb": {"pearson", "spearmanr"}, "qqp": {"accuracy", "f1"}, "mnli": {"accuracy"},
              "qnli": {"accuracy"}, "rte": {"accuracy"}, "wnli": {"accuracy"}}
  assert set(expected) == set(GLUE_TASKS)
  for name, keys in expected.items():
    task = get_task(name)
    if task.is_regression:
      p, y = RNG.uniform(0, 5, 50), RNG.uniform(0, 5, 50)
    else:
      y = RNG.integers(0, task.num_labels, 50)
      p = RNG.integers(0, task.num_labels, 50)
    assert set(metrics.glue_metrics(name, p, y)) == keys

  mrpc = metrics.glue_metrics("mrpc", BINARY_PREDS, BINARY_LABELS)
  assert mrpc["accuracy"] == pytest.approx(skm.accuracy_score(BINARY_LABELS, BINARY_PREDS))
  assert mrpc["f1"] == pytest.approx(skm.f1_score(BINARY_LABELS, BINARY_PREDS))
  assert metrics.glue_score("mrpc", mrpc) == pytest.approx((mrpc["accuracy"] + mrpc["f1"]) / 2)
  cola = metrics.glue_metrics("CoLA", BINARY_PREDS, BINARY_LABELS)
  assert cola == {"mcc": pytest.approx(skm.matthews_corrcoef(BINARY_LABELS, BINARY_PREDS))}
  # Logits are reduced with argmax; STS-B accepts [N, 1] scores.
  logits = np.eye(3)[MULTI_PREDS] + 0.1
  assert metrics.glue_metrics("mnli", logits, MULTI_LABELS)["accuracy"] == pytest.approx(
      skm.accuracy_score(MULTI_LABELS, MULTI_PREDS))
  x = RNG.uniform(0, 5, 30)
  y = x + RNG.normal(size=30)
  assert metrics.glue_metrics("stsb", x[:, None], y) == {
      "pearson": pytest.approx(stats.pearsonr(x, y)[0]),
      "spearmanr": pytest.approx(stats.spearmanr(x, y)[0])}
  with pytest.raises(ValueError, match="3 columns"):
    metrics.glue_metrics("mnli", np.zeros((4, 2)), np.zeros(4, int))
  with pytest.raises(KeyError, match="f1"):
    metrics.glue_score("qqp", {"accuracy": 0.5})


def test_label_loyalty():
  teacher = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
  assert metrics.label_loyalty(teacher, teacher) == 1.0
  student = np.array([[0.6, 0.4], [0.4, 0.6], [0.1, 0.9], [0.5, 0.5 + 1e-9]])
  assert metrics.label_loyalty(teacher, student) == pytest.approx(3 / 4)


def test_probability_loyalty_hand_computed():
  p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
  assert metrics.probability_loyalty(p, p) == pytest.approx(1.0)
  disjoint = np.eye(3), np.eye(3)[[1, 2, 0]]     # JSD = ln 2 (1 bit)
  assert metrics.probability_loyalty(*disjoint) == pytest.approx(1 - math.sqrt(math.log(2)))
  assert metrics.probability_loyalty(*disjoint, base=2) == pytest.approx(0.0)
  # P = (1, 0), Q = (1/2, 1/2): M = (3/4, 1/4); KL(P||M) = ln(4/3),
  # KL(Q||M) = 1/2 ln(2/3) + 1/2 ln(2); JSD = (KL(P||M) + KL(Q||M)) / 2 (nats).
  jsd = 0.5 * math.log(4 / 3) + 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2))
  assert jsd == pytest.approx(0.3112781 * math.log(2), abs=1e-6)
  t, s = np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]])
  assert metrics.jensen_shannon(t, s)[0] == pytest.approx(jsd)
  assert metrics.jensen_shannon(t, s, base=2)[0] == pytest.approx(jsd / math.log(2))
  both = metrics.probability_loyalty(np.vstack([t, t]), np.vstack([t, s]))
  assert both == pytest.approx((1.0 + 1 - math.sqrt(jsd)) / 2)
  both = metrics.probability_loyalty(np.vstack([t, t]), np.vstack([t, s]), base=2)
  assert both == pytest.approx((1.0 + 1 - math.sqrt(jsd / math.log(2))) / 2)
  with pytest.raises(ValueError, match="base"):
    metrics.jensen_shannon(t, s, base=1)
  with pytest.raises(ValueError, match="softmax"):
    metrics.probability_loyalty(np.array([[2.0, -1.0]]), t)
  with pytest.raises(ValueError, match="shapes"):
    metrics.label_loyalty(np.ones((2, 2)) / 2, np.ones((3, 2)) / 2)


def test_probability_loyalty_matches_scipy_jensenshannon():
  """The loyalty paper's reference: 1 - scipy.spatial.distance.jensenshannon(teacher, student)
  at SciPy's default (natural) base; base=2 as the named option."""
  rng = np.random.default_rng(3)
  for classes in (2, 3, 7):
    t = rng.dirichlet(np.full(classes, 0.5), size=64)
    s = rng.dirichlet(np.full(classes, 0.5), size=64)
    s[0] = t[0]                                   # identical rows, and a zero probability
    t[1] = np.eye(classes)[0]
    for base in (None, 2):
      ref = np.array([distance.jensenshannon(a, b, base=base) for a, b in zip(t, s)])
      np.testing.assert_allclose(np.sqrt(metrics.jensen_shannon(t, s, base=base)), ref,
                                 rtol=1e-9, atol=1e-7)
      kwargs = {} if base is None else {"base": base}
      assert metrics.probability_loyalty(t, s, **kwargs) == pytest.approx(np.mean(1 - ref))
