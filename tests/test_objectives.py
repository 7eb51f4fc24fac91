"""Objectives checked against float64 numpy loops / torch.nn.functional on small fixed arrays."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mobilebert_jax import objectives as obj

RTOL = 1e-5
ATOL = 1e-6


def rng(seed=0):
  return np.random.RandomState(seed)


def softmax64(x, axis=-1):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def log_softmax64(x, axis=-1):
  x = np.asarray(x, np.float64)
  m = x.max(axis=axis, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def assert_finite_tree(tree):
  for leaf in jax.tree_util.tree_leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf))), leaf


# Fixed batch: B=2, L=5, second example has 2 padded tokens.
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)


# ------------------------------------------------------------------------------------
# Pre-training
# ------------------------------------------------------------------------------------

def mlm_batch(seed=0):
  r = rng(seed)
  logits = r.randn(2, 3, 7).astype(np.float32) * 2
  ids = r.randint(0, 7, size=(2, 3)).astype(np.int32)
  weights = np.array([[1.0, 1.0, 0.5], [1.0, 0.0, 0.0]], np.float32)
  return logits, ids, weights


def test_mlm_loss_matches_torch_weighted_mean():
  logits, ids, weights = mlm_batch()
  ce = F.cross_entropy(torch.tensor(logits, dtype=torch.float64).reshape(-1, 7),
                       torch.tensor(ids, dtype=torch.long).reshape(-1), reduction="none").numpy()
  w = weights.reshape(-1).astype(np.float64)
  expected = (ce * w).sum() / w.sum()
  assert_close(jax.jit(obj.mlm_loss)(logits, ids, weights), expected)


def test_mlm_loss_ignores_padding_slots_and_handles_no_slots():
  logits, ids, weights = mlm_batch()
  base = obj.mlm_loss(logits, ids, weights)
  changed = logits.copy()
  changed[1, 1:] = np.nan  # weight-0 slots
  ids2 = ids.copy()
  ids2[1, 1:] = 0
  assert_close(obj.mlm_loss(changed, ids2, weights), float(base))
  grads = jax.grad(obj.mlm_loss)(jnp.asarray(changed), ids2, weights)
  assert_finite_tree(grads)
  assert np.all(np.asarray(grads)[1, 1:] == 0)
  zero = obj.mlm_loss(logits, ids, np.zeros_like(weights))
  assert float(zero) == 0.0
  grads = jax.grad(obj.mlm_loss)(jnp.asarray(logits), ids, np.zeros_like(weights))
  assert_finite_tree(grads)


def test_mlm_accuracy_hand_computed():
  logits = np.zeros((1, 4, 3), np.float32)
  logits[0, 0, 2] = logits[0, 1, 0] = logits[0, 2, 1] = logits[0, 3, 1] = 1.0
  ids = np.array([[2, 1, 1, 1]], np.int32)  # correct, wrong, correct, (padding) correct
  weights = np.array([[1.0, 1.0, 1.0, 0.0]], np.float32)
  assert_close(obj.mlm_accuracy(logits, ids, weights), 2.0 / 3.0)


def test_nsp_loss_and_accuracy():
  r = rng(1)
  logits = r.randn(4, 2).astype(np.float32)
  labels = np.array([0, 1, 1, 0], np.int32)
  expected = F.cross_entropy(torch.tensor(logits, dtype=torch.float64),
                             torch.tensor(labels, dtype=torch.long)).item()
  assert_close(jax.jit(obj.nsp_loss)(logits, labels), expected)
  acc = np.mean(np.argmax(logits, -1) == labels)
  assert_close(obj.nsp_accuracy(logits, labels), acc)


def test_shape_errors_name_the_values():
  logits, ids, weights = mlm_batch()
  with pytest.raises(ValueError, match=r"\(2, 2\)"):
    obj.mlm_loss(logits, ids[:, :2], weights[:, :2])
  with pytest.raises(ValueError, match="NSP labels"):
    obj.nsp_loss(np.zeros((4, 2)), np.zeros((3,), np.int32))


# ------------------------------------------------------------------------------------
# MobileBERT: feature-map transfer
# ------------------------------------------------------------------------------------

def hidden_pair(seed=2, h=6):
  r = rng(seed)
  t = (r.randn(2, 5, h) * 1.5 + 0.3).astype(np.float32)
  s = r.randn(2, 5, h).astype(np.float32)
  return t, s


def fmt_reference(t, s, mask, hf, bf, gf, eps):
  t, s = t.astype(np.float64), s.astype(np.float64)
  hid, beta, gamma, n = 0.0, 0.0, 0.0, 0
  for b in range(t.shape[0]):
    for l in range(t.shape[1]):
      if not mask[b, l]:
        continue
      n += 1
      mt, ms = t[b, l].mean(), s[b, l].mean()
      vt, vs = ((t[b, l] - mt) ** 2).mean(), ((s[b, l] - ms) ** 2).mean()
      nt = (t[b, l] - mt) / np.sqrt(vt + eps)
      ns = (s[b, l] - ms) / np.sqrt(vs + eps)
      hid += ((nt - ns) ** 2).mean()
      beta += (mt - ms) ** 2
      gamma += abs(vt - vs)
  return hf * hid / n, bf * beta / n, gf * gamma / n


def test_feature_map_mse_reference():
  t, s = hidden_pair()
  per_token = ((t.astype(np.float64) - s) ** 2).mean(-1)
  expected = (per_token * MASK).sum() / MASK.sum()
  assert_close(jax.jit(obj.feature_map_mse)(t, s, MASK), expected)


def test_feature_map_transfer_reference():
  t, s = hidden_pair()
  total, comps = jax.jit(obj.feature_map_transfer)(t, s, MASK)
  hid, beta, gamma = fmt_reference(t, s, MASK, 100.0, 5000.0, 5.0, 1e-6)
  assert_close(comps["hidden"], hid)
  assert_close(comps["beta"], beta)
  assert_close(comps["gamma"], gamma)
  assert_close(total, hid + beta + gamma)
  # custom factors
  total2, comps2 = obj.feature_map_transfer(t, s, MASK, hidden_factor=1.0, beta_factor=2.0,
                                            gamma_factor=3.0, eps=1e-3)
  ref = fmt_reference(t, s, MASK, 1.0, 2.0, 3.0, 1e-3)
  assert_close([comps2["hidden"], comps2["beta"], comps2["gamma"]], ref)


def test_feature_map_transfer_zero_when_equal_and_mask_honoured():
  t, s = hidden_pair()
  total, comps = obj.feature_map_transfer(t, t, MASK)
  assert float(total) == pytest.approx(0.0, abs=1e-6)
  base, _ = obj.feature_map_transfer(t, s, MASK)
  s2, t2 = s.copy(), t.copy()
  s2[1, 3:] = 1e6
  t2[1, 3:] = np.nan
  changed, _ = obj.feature_map_transfer(t2, s2, MASK)
  assert_close(changed, float(base))
  assert_close(obj.feature_map_mse(t2, s2, MASK), float(obj.feature_map_mse(t, s, MASK)))


def test_feature_map_transfer_gradients_finite_with_constant_tokens():
  t, s = hidden_pair()
  s[0, 0] = 2.0  # zero variance over channels
  s[1, 4] = np.inf  # padded token
  grads = jax.grad(lambda x: obj.feature_map_transfer(t, x, MASK)[0])(jnp.asarray(s))
  assert_finite_tree(grads)
  assert np.all(np.asarray(grads)[1, 3:] == 0)


# ------------------------------------------------------------------------------------
# MobileBERT: attention transfer
# ------------------------------------------------------------------------------------

def attention_probs(seed, heads=2, mask=MASK):
  r = rng(seed)
  scores = r.randn(2, heads, 5, 5).astype(np.float32)
  scores = scores + np.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(np.float32)
  return softmax64(scores).astype(np.float32)


def kl_reference(t, s, mask):
  t, s = t.astype(np.float64), s.astype(np.float64)
  total, n = 0.0, 0
  for b in range(t.shape[0]):
    for h in range(t.shape[1]):
      for q in range(t.shape[2]):
        if not mask[b, q]:
          continue
        n += 1
        keys = mask[b] > 0
        total += np.sum(t[b, h, q, keys] * (np.log(t[b, h, q, keys]) - np.log(s[b, h, q, keys])))
  return total / n


def test_attention_transfer_reference_and_torch():
  t, s = attention_probs(3), attention_probs(4)
  expected = kl_reference(t, s, MASK)
  assert_close(jax.jit(obj.attention_transfer)(t, s, MASK), expected)
  # torch KL on the unpadded example (all queries and keys real)
  kl = F.kl_div(torch.tensor(np.log(s[0]), dtype=torch.float64),
                torch.tensor(t[0], dtype=torch.float64), reduction="none").sum(-1).mean().item()
  assert_close(obj.attention_transfer(t[:1], s[:1], MASK[:1]), kl)
  # log-prob inputs and factor
  got = obj.attention_transfer(np.log(np.maximum(t, 1e-30)), np.log(np.maximum(s, 1e-30)), MASK,
                               factor=2.0, log_inputs=True)
  assert_close(got, 2.0 * expected, rtol=1e-4)


def test_attention_transfer_zero_mask_and_head_errors():
  t, s = attention_probs(3), attention_probs(4)
  assert float(obj.attention_transfer(t, t, MASK)) == pytest.approx(0.0, abs=1e-7)
  base = float(obj.attention_transfer(t, s, MASK))
  s2 = s.copy()
  s2[1, :, 3:, :] = 0.0  # padded queries
  s2[1, :, :, 3:] = 0.7  # padded keys
  assert_close(obj.attention_transfer(t, s2, MASK), base)
  s2[1, :, 3:, :] = np.nan
  grads = jax.grad(lambda x: obj.attention_transfer(t, x, MASK))(jnp.asarray(s2))
  assert_finite_tree(grads)
  with pytest.raises(ValueError, match="teacher has 2 heads, student has 4"):
    obj.attention_transfer(t, attention_probs(4, heads=4), MASK)


def test_attention_transfer_gradients_finite_with_zero_student_probs():
  t = attention_probs(3)
  s = attention_probs(4)
  s[0, 0, 0, 0] = 0.0
  grads = jax.grad(lambda x: obj.attention_transfer(t, x, MASK))(jnp.asarray(s))
  assert_finite_tree(grads)


# ------------------------------------------------------------------------------------
# MobileBERT: pre-training distillation
# ------------------------------------------------------------------------------------

def test_pretraining_distillation_reference():
  logits, ids, weights = mlm_batch()
  teacher = rng(5).randn(*logits.shape).astype(np.float32)
  w = weights.reshape(-1).astype(np.float64)
  ce = F.cross_entropy(torch.tensor(logits, dtype=torch.float64).reshape(-1, 7),
                       torch.tensor(ids, dtype=torch.long).reshape(-1), reduction="none").numpy()
  mlm = (ce * w).sum() / w.sum()
  for temp, scaled in [(1.0, False), (2.0, False), (2.0, True)]:
    soft = -(softmax64(teacher / temp) * log_softmax64(logits / temp)).sum(-1).reshape(-1)
    kd = (soft * w).sum() / w.sum() * (temp ** 2 if scaled else 1.0)
    total, comps = obj.pretraining_distillation(
        logits, teacher, ids, weights, alpha=0.3, temperature=temp,
        scale_by_temperature_squared=scaled)
    assert_close(comps["mlm"], mlm)
    assert_close(comps["kd"], kd)
    assert_close(total, 0.3 * mlm + 0.7 * kd)
  nsp_logits = np.array([[1.0, -1.0], [0.2, 0.4]], np.float32)
  nsp_labels = np.array([0, 1], np.int32)
  total, comps = jax.jit(obj.pretraining_distillation)(
      logits, teacher, ids, weights, nsp_logits=nsp_logits, nsp_labels=nsp_labels)
  nsp = F.cross_entropy(torch.tensor(nsp_logits, dtype=torch.float64),
                        torch.tensor(nsp_labels, dtype=torch.long)).item()
  assert_close(comps["nsp"], nsp)
  assert_close(total, 0.5 * comps["mlm"] + 0.5 * comps["kd"] + nsp)


def test_pretraining_distillation_kd_stationary_when_equal_and_masked():
  logits, ids, weights = mlm_batch()
  kd_grad = jax.grad(lambda s: obj.pretraining_distillation(s, logits, ids, weights)[1]["kd"])(
      jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(kd_grad), 0.0, atol=1e-6)
  base, _ = obj.pretraining_distillation(logits, logits + 1.0, ids, weights)
  s2 = logits.copy()
  s2[1, 1:] = 1e4
  changed, _ = obj.pretraining_distillation(s2, logits + 1.0, ids, weights)
  assert_close(changed, float(base))
  with pytest.raises(ValueError, match="alpha"):
    obj.pretraining_distillation(logits, logits, ids, weights, alpha=1.5)


# ------------------------------------------------------------------------------------
# TinyBERT
# ------------------------------------------------------------------------------------

def test_embedding_and_hidden_loss_with_projection():
  r = rng(6)
  s = r.randn(2, 5, 3).astype(np.float32)
  t = r.randn(2, 5, 4).astype(np.float32)
  w = r.randn(3, 4).astype(np.float32)
  proj = s.astype(np.float64) @ w.astype(np.float64)
  per_token = ((proj - t) ** 2).mean(-1)
  expected = (per_token * MASK).sum() / MASK.sum()
  assert_close(jax.jit(obj.embedding_loss)(s, t, w, MASK), expected, rtol=1e-5)
  assert_close(obj.hidden_loss(s, t, w, attention_mask=MASK), expected, rtol=1e-5)
  assert_close(obj.hidden_loss(s, t, w), ((proj - t) ** 2).mean(), rtol=1e-5)
  with pytest.raises(ValueError, match=r"width 3 differs from teacher width 4.*\[3, 4\]"):
    obj.embedding_loss(s, t)
  with pytest.raises(ValueError, match=r"\[Ds, Dt\]=\[3, 4\], got \(4, 3\)"):
    obj.hidden_loss(s, t, w.T)
  assert float(obj.hidden_loss(t, t)) == 0.0
  grads = jax.grad(lambda p: obj.hidden_loss(s, t, p, MASK))(jnp.asarray(w))
  assert_finite_tree(grads)


def scores_pair(seed=7, heads=3):
  r = rng(seed)
  s = r.randn(2, heads, 5, 5).astype(np.float32)
  t = r.randn(2, heads, 5, 5).astype(np.float32)
  neg = np.where(MASK[:, None, None, :] > 0, 0.0, -10000.0).astype(np.float32)
  return s + neg, t + neg


def test_attention_score_loss_reference():
  s, t = scores_pair()
  total, n = 0.0, 0
  for b in range(2):
    for h in range(3):
      for q in range(5):
        for k in range(5):
          if MASK[b, q] and MASK[b, k]:
            total += (float(s[b, h, q, k]) - float(t[b, h, q, k])) ** 2
            n += 1
  assert_close(jax.jit(obj.attention_score_loss)(s, t, MASK), total / n)
  # padded keys/queries changed: no effect; -inf on the student side: finite gradients
  s2 = s.copy()
  s2[1, :, :, 3:] = -np.inf
  s2[1, :, 3:, :] = 123.0
  assert_close(obj.attention_score_loss(s2, t, MASK), total / n)
  s3 = s.copy()
  s3[1, :, :, 3:] = -np.inf
  assert_finite_tree(jax.grad(lambda x: obj.attention_score_loss(x, t, MASK))(jnp.asarray(s3)))
  assert float(obj.attention_score_loss(t, t, MASK)) == 0.0


def test_attention_score_loss_threshold_without_mask():
  s, t = scores_pair()
  s_masked = s.copy()
  s_masked[1, :, :, 3:] = -2e4  # different very negative values on the two sides
  diff = np.where(MASK[:, None, None, :] > 0, s - t, 0.0).astype(np.float64)
  expected = (diff ** 2).mean()  # every (q, k) pair counts when no mask is given
  assert_close(obj.attention_score_loss(s_masked, t), expected)
  with pytest.raises(ValueError, match="teacher has 2 heads, student has 3"):
    obj.attention_score_loss(s, t[:, :2])


def test_prediction_loss_torch():
  r = rng(8)
  s = r.randn(4, 3).astype(np.float32)
  t = r.randn(4, 3).astype(np.float32)
  for temp in (1.0, 3.0):
    ts, tt = torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
    ref = (-(F.softmax(tt / temp, -1) * F.log_softmax(ts / temp, -1)).sum(-1)).mean().item()
    assert_close(obj.prediction_loss(s, t, temperature=temp), ref)
    assert_close(obj.prediction_loss(s, t, temp, scale_by_temperature_squared=True),
                 ref * temp ** 2)
  weights = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
  soft = -(softmax64(t) * log_softmax64(s)).sum(-1)
  assert_close(obj.prediction_loss(s, t, weights=weights), (soft[0] + soft[2]) / 2)
  with pytest.raises(ValueError, match="temperature"):
    obj.prediction_loss(s, t, temperature=0.0)


def test_prediction_loss_regression_is_mse():
  """One logit (STS-B): a soft cross-entropy over it is identically 0; the loss is the MSE
  between student and teacher scores (TinyBERT task_distill.py, regression), with a
  non-zero gradient for the student."""
  s = np.array([[0.5], [2.0], [-1.0], [3.0]], np.float32)
  t = np.array([[1.5], [2.0], [0.5], [4.5]], np.float32)
  mse = ((0.5 - 1.5) ** 2 + 0.0 + (-1.0 - 0.5) ** 2 + (3.0 - 4.5) ** 2) / 4   # = 1.375
  for temp in (1.0, 2.0):   # the temperature does not scale a regression score
    assert_close(obj.prediction_loss(s, t, temperature=temp), mse)
    assert_close(obj.prediction_loss(s, t, temp, scale_by_temperature_squared=True), mse)
  grad = np.asarray(jax.grad(lambda x: obj.prediction_loss(x, t))(jnp.asarray(s)))
  assert_close(grad, 2 * (s - t) / 4)      # d/ds mean (s - t)^2
  assert np.abs(grad).sum() > 0
  assert_close(jax.grad(lambda x: obj.prediction_loss(s, x))(jnp.asarray(t)), np.zeros_like(t))
  weights = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
  assert_close(obj.prediction_loss(s, t, weights=weights), (1.0 + 1.5 ** 2) / 2)
  with pytest.raises(ValueError, match="same shape"):
    obj.prediction_loss(s, t[:, :0])


def test_layer_mappings():
  assert obj.uniform_layer_mapping(4, 12) == (3, 6, 9, 12)
  assert obj.uniform_layer_mapping(6, 24) == (4, 8, 12, 16, 20, 24)
  assert obj.uniform_layer_mapping(5, 12)[-1] == 12
  assert obj.parse_layer_mapping("uniform", 4, 12) == (3, 6, 9, 12)
  assert obj.parse_layer_mapping(" 3, 6,9 ,12", 4, 12) == (3, 6, 9, 12)
  assert obj.parse_layer_mapping([2, 2, 5, 12], 4, 12) == (2, 2, 5, 12)
  assert obj.parse_layer_mapping(np.array([1, 3]), 2, 4) == (1, 3)
  assert obj.parse_layer_mapping([5, 2], 2, 6, order="any") == (5, 2)
  with pytest.raises(ValueError, match="3 entries, expected one per student layer \\(4\\)"):
    obj.parse_layer_mapping("3,6,9", 4, 12)
  with pytest.raises(ValueError, match="student layer 4 maps to teacher layer 13"):
    obj.parse_layer_mapping("3,6,9,13", 4, 12)
  with pytest.raises(ValueError, match="teacher layer 0"):
    obj.parse_layer_mapping([0, 6, 9, 12], 4, 12)
  with pytest.raises(ValueError, match="not nondecreasing: student layer 2 -> 6, layer 3 -> 5"):
    obj.parse_layer_mapping("3,6,5,12", 4, 12)
  with pytest.raises(ValueError, match="not increasing"):
    obj.parse_layer_mapping("3,3,9,12", 4, 12, order="increasing")
  with pytest.raises(ValueError, match="entry 1 \\('x'\\)"):
    obj.parse_layer_mapping("3,x,9,12", 4, 12)
  with pytest.raises(ValueError, match="num_student_layers"):
    obj.uniform_layer_mapping(0, 12)
  with pytest.raises(ValueError, match="order"):
    obj.parse_layer_mapping("uniform", 4, 12, order="sorted")


def fake_outputs(seed, layers, width, heads=2):
  r = rng(seed)
  hidden = tuple(r.randn(2, 5, width).astype(np.float32) for _ in range(layers + 1))
  neg = np.where(MASK[:, None, None, :] > 0, 0.0, -10000.0).astype(np.float32)
  scores = tuple(r.randn(2, heads, 5, 5).astype(np.float32) + neg for _ in range(layers))
  return hidden, scores


def test_tinybert_intermediate_loss_combines_terms():
  s_hidden, s_scores = fake_outputs(9, layers=2, width=3)
  t_hidden, t_scores = fake_outputs(10, layers=4, width=4)
  student = {"hidden_states": s_hidden, "attention_scores": s_scores}
  teacher = types.SimpleNamespace(hidden_states=t_hidden, attention_scores=t_scores)
  r = rng(11)
  w_e = r.randn(3, 4).astype(np.float32)
  w_h = [r.randn(3, 4).astype(np.float32) for _ in range(2)]
  teacher_dict = {"hidden_states": t_hidden, "attention_scores": t_scores}
  total, comps = jax.jit(obj.tinybert_intermediate_loss, static_argnums=2)(
      student, teacher_dict, "uniform", {"embedding": w_e, "hidden": w_h}, MASK)
  emb = obj.embedding_loss(s_hidden[0], t_hidden[0], w_e, MASK)
  att = obj.attention_score_loss(s_scores[0], t_scores[1], MASK) + \
      obj.attention_score_loss(s_scores[1], t_scores[3], MASK)
  hid = obj.hidden_loss(s_hidden[1], t_hidden[2], w_h[0], MASK) + \
      obj.hidden_loss(s_hidden[2], t_hidden[4], w_h[1], MASK)
  assert_close(comps["embedding"], float(emb))
  assert_close(comps["attention"], float(att))
  assert_close(comps["hidden"], float(hid))
  assert_close(total, float(emb + att + hid))
  # one shared projection and an explicit mapping
  total_shared, _ = obj.tinybert_intermediate_loss(student, teacher, "1,3", w_e, MASK)
  ref = (obj.embedding_loss(s_hidden[0], t_hidden[0], w_e, MASK)
         + obj.attention_score_loss(s_scores[0], t_scores[0], MASK)
         + obj.attention_score_loss(s_scores[1], t_scores[2], MASK)
         + obj.hidden_loss(s_hidden[1], t_hidden[1], w_e, MASK)
         + obj.hidden_loss(s_hidden[2], t_hidden[3], w_e, MASK))
  assert_close(total_shared, float(ref))
  with pytest.raises(ValueError, match="width 3 differs"):
    obj.tinybert_intermediate_loss(student, teacher, "uniform", None, MASK)
  with pytest.raises(ValueError, match="lack 'attention_scores'"):
    obj.tinybert_intermediate_loss({"hidden_states": s_hidden}, teacher, "uniform", w_e, MASK)
  with pytest.raises(ValueError, match="projections\\['hidden'\\] has 1 entries"):
    obj.tinybert_intermediate_loss(student, teacher, "uniform", {"hidden": w_h[:1]}, MASK)


def test_tinybert_intermediate_loss_zero_when_equal_and_gradients():
  hidden, scores = fake_outputs(12, layers=2, width=4)
  out = {"hidden_states": hidden, "attention_scores": scores}
  total, _ = obj.tinybert_intermediate_loss(out, out, (1, 2), None, MASK)
  assert float(total) == 0.0
  t_hidden, t_scores = fake_outputs(13, layers=2, width=4)
  teacher = {"hidden_states": t_hidden, "attention_scores": t_scores}

  def loss(h):
    student = {"hidden_states": h, "attention_scores": scores}
    return obj.tinybert_intermediate_loss(student, teacher, (1, 2), None, MASK)[0]

  assert_finite_tree(jax.grad(loss)(tuple(jnp.asarray(h) for h in hidden)))


# ------------------------------------------------------------------------------------
# bf16 inputs -> float32 results
# ------------------------------------------------------------------------------------

def test_bf16_inputs_give_float32_results():
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  logits, ids, weights = mlm_batch()
  t, s = hidden_pair()
  pt, ps = attention_probs(3), attention_probs(4)
  st, tt = scores_pair()
  results = {
      "mlm": obj.mlm_loss(bf(logits), ids, bf(weights)),
      "mlm_acc": obj.mlm_accuracy(bf(logits), ids, weights),
      "nsp": obj.nsp_loss(bf(logits[:, 0, :2]), np.array([0, 1])),
      "fmse": obj.feature_map_mse(bf(t), bf(s), MASK),
      "fmt": obj.feature_map_transfer(bf(t), bf(s), MASK)[0],
      "at": obj.attention_transfer(bf(pt), bf(ps), MASK),
      "pd": obj.pretraining_distillation(bf(logits), bf(logits * 0.5), ids, weights)[0],
      "emb": obj.embedding_loss(bf(s), bf(t), None, MASK),
      "hid": obj.hidden_loss(bf(s), bf(t[..., :4]), bf(np.eye(6, 4)), MASK),
      "att_score": obj.attention_score_loss(bf(st), bf(tt), MASK),
      "pred": obj.prediction_loss(bf(logits), bf(logits * 0.5)),
  }
  for name, value in results.items():
    assert value.dtype == jnp.float32, name
    assert np.isfinite(float(value)), name
  # the bf16 result equals the float32 computation on the bf16-rounded values
  t16 = np.asarray(bf(t).astype(jnp.float32))
  s16 = np.asarray(bf(s).astype(jnp.float32))
  assert_close(results["fmt"], float(obj.feature_map_transfer(t16, s16, MASK)[0]), rtol=1e-6)
