"""SQuAD: reading, official normalisation and EM/F1, doc-stride features and span decoding."""

import json

import numpy as np
import pytest

from mobilebert_jax.data import load_tokenizer, sample_vocab_path
from mobilebert_jax.downstream import squad
from mobilebert_jax.downstream.squad import SquadExample

CONTEXT = "The cat sat on the mat. A dog barked at the cat in 1999."
DATA_V2 = {"version": "v2.0", "data": [{"title": "Pets", "paragraphs": [{
    "context": CONTEXT,
    "qas": [
        {"id": "q1", "question": "Where did the cat sit?", "is_impossible": False,
         "answers": [{"text": "on the mat", "answer_start": 12},
                     {"text": "the mat", "answer_start": 15}]},
        {"id": "q2", "question": "When did the dog bark?",
         "answers": [{"text": "1999", "answer_start": 51}]},
        {"id": "q3", "question": "What did the cow eat?", "is_impossible": True, "answers": [],
         "plausible_answers": [{"text": "the mat", "answer_start": 15}]},
    ]}]}]}


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer(sample_vocab_path())


def test_read_squad(tmp_path):
  path = tmp_path / "dev-v2.0.json"
  path.write_text(json.dumps(DATA_V2))
  examples = squad.read_squad(path)
  assert [e.qid for e in examples] == ["q1", "q2", "q3"]
  q1, q2, q3 = examples
  assert q1.answers == ("on the mat", "the mat") and q1.answer_starts == (12, 15)
  assert q1.title == "Pets" and q1.context == CONTEXT and not q1.is_impossible
  assert CONTEXT[q2.answer_starts[0]:][:4] == "1999"
  assert q3.is_impossible and q3.answers == ()


def test_read_squad_errors_name_file_and_key(tmp_path):
  bad = json.loads(json.dumps(DATA_V2))
  del bad["data"][0]["paragraphs"][0]["qas"][1]["question"]
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(bad))
  with pytest.raises(KeyError, match=r"bad\.json: data\[0\]\.paragraphs\[0\]\.qas\[1\] has no "
                     r"key 'question'"):
    squad.read_squad(path)
  bad = json.loads(json.dumps(DATA_V2))
  del bad["data"][0]["paragraphs"][0]["qas"][0]["answers"][1]["answer_start"]
  path.write_text(json.dumps(bad))
  with pytest.raises(KeyError, match=r"qas\[0\]\.answers\[1\] has no key 'answer_start'"):
    squad.read_squad(path)
  path.write_text(json.dumps({"version": "1.1"}))
  with pytest.raises(KeyError, match=r"bad\.json: the top level has no key 'data'"):
    squad.read_squad(path)
  with pytest.raises(FileNotFoundError, match="missing.json"):
    squad.read_squad(tmp_path / "missing.json")


def test_normalize_answer():
  assert squad.normalize_answer("The  Quick, brown-fox!") == "quick brownfox"
  assert squad.normalize_answer("An apple a day") == "apple day"
  assert squad.normalize_answer("Theater thereof") == "theater thereof"
  assert squad.normalize_answer("  (A) ") == ""
  assert squad.normalize_answer("Élan\tVITAL.") == "élan vital"


def test_exact_match_and_f1():
  assert squad.exact_match("The Mat!", "mat") == 1.0
  assert squad.exact_match("on the mat", "mat") == 0.0
  # pred {cat, sat}, gold {cat, sat, on, mat}: P = 1, R = 1/2, F1 = 2/3.
  assert squad.f1("the cat sat", "cat sat on the mat") == pytest.approx(2 / 3)
  # Repeated tokens count as a multiset: pred {a1 a1 b}, gold {a1 b b}: c = 2, P = R = 2/3.
  assert squad.f1("a1 a1 b", "a1 b b") == pytest.approx(2 / 3)
  assert squad.f1("dog", "cat") == 0.0
  assert squad.f1("", "") == 1.0 and squad.f1("", "cat") == 0.0 and squad.f1("the", "") == 1.0


def test_squad_evaluate_v2_with_multiple_golds_and_no_answer(tmp_path):
  predictions = {"q1": "the mat", "q2": "in 1999 year", "q3": ""}
  # q1: EM 1 (second gold), F1 1. q2: F1 = 2 * (1/3 * 1) / (1/3 + 1) = 1/2, EM 0. q3: 1, 1.
  result = squad.squad_evaluate(DATA_V2, predictions)
  assert result == {
      "exact": pytest.approx(200 / 3), "f1": pytest.approx(250 / 3), "total": 3,
      "HasAns_exact": pytest.approx(50.0), "HasAns_f1": pytest.approx(75.0), "HasAns_total": 2,
      "NoAns_exact": pytest.approx(100.0), "NoAns_f1": pytest.approx(100.0), "NoAns_total": 1}
  # The same from a path, the "data" list and parsed examples.
  path = tmp_path / "d.json"
  path.write_text(json.dumps(DATA_V2))
  assert squad.squad_evaluate(path, predictions) == result
  assert squad.squad_evaluate(DATA_V2["data"], predictions) == result
  assert squad.squad_evaluate(squad.parse_squad(DATA_V2), predictions) == result
  # An answer to an unanswerable question scores 0; a missing prediction scores 0.
  result = squad.squad_evaluate(DATA_V2, {"q1": "on the mat", "q3": "the mat"})
  assert result["NoAns_exact"] == 0.0 and result["HasAns_f1"] == 50.0
  assert result["missing"] == 1


def test_squad_evaluate_v1_has_no_breakdown():
  v1 = json.loads(json.dumps(DATA_V2))
  del v1["data"][0]["paragraphs"][0]["qas"][2]
  result = squad.squad_evaluate(v1, {"q1": "mat", "q2": "1999"})
  assert result == {"exact": 100.0, "f1": 100.0, "total": 2}


def test_na_probs_threshold_and_best_threshold():
  predictions = {"q1": "on the mat", "q2": "dog", "q3": "the cat"}
  na_probs = {"q1": 0.1, "q2": 0.5, "q3": 0.9}
  # Threshold 1.0: nothing abstains: q1 1, q2 0, q3 0.
  assert squad.squad_evaluate(DATA_V2, predictions, na_probs)["exact"] == pytest.approx(100 / 3)
  # Threshold 0.6: q3 abstains (correctly) -> 2/3.
  result = squad.squad_evaluate(DATA_V2, predictions, na_probs, na_threshold=0.6)
  assert result["exact"] == pytest.approx(200 / 3)
  assert result["NoAns_exact"] == 100.0
  # Best: abstain where na_prob > 0.1 (q2 wrong anyway, q3 right) -> 2/3 at thresh 0.1.
  assert result["best_exact"] == pytest.approx(200 / 3) and result["best_exact_thresh"] == 0.1
  assert result["best_f1_thresh"] == 0.1
  with pytest.raises(KeyError, match="na_probs has no entry"):
    squad.squad_evaluate(DATA_V2, predictions, {"q1": 0.0})


def _long_example(words=80):
  filler = " ".join(f"word{i % 7} is here." for i in range(words // 3))
  answer = "the lazy dog"
  context = f"{filler} Then {answer} slept in 1999. {filler}"
  return SquadExample("long", "who slept?", context, (answer,), (context.index(answer),))


def test_features_windows_overlap_and_map_back(tokenizer):
  ex = _long_example()
  impossible = SquadExample("none", "who slept?", ex.context, is_impossible=True)
  max_len, stride = 48, 10
  features = squad.make_features([ex, impossible], tokenizer, max_len, stride, 64)
  q_ids = tokenizer(["who slept?"], add_special_tokens=False)["input_ids"][0]
  doc_ids = tokenizer([ex.context], add_special_tokens=False)["input_ids"][0]
  window = max_len - len(q_ids) - 3
  n = len(squad.doc_spans(len(doc_ids), window, stride))
  assert n >= 4 and len(features) == 2 * n
  np.testing.assert_array_equal(features.example_index, [0] * n + [1] * n)
  for k, arr in features.inputs().items():
    assert arr.dtype == np.int32, k
  first = len(q_ids) + 2
  cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
  found = 0
  for f in range(n):
    ids = features.input_ids[f]
    assert ids[0] == cls and ids[first - 1] == sep
    np.testing.assert_array_equal(ids[1:first - 1], q_ids)
    length = int(features.attention_mask[f].sum()) - first - 1
    np.testing.assert_array_equal(ids[first:first + length],
                                  doc_ids[f * stride:f * stride + length])
    assert (features.token_type_ids[f, first:first + length + 1] == 1).all()
    assert (features.offsets[f, :first] == -1).all()
    assert (features.offsets[f, first + length:] == -1).all()
    if f + 1 < n:  # consecutive windows overlap by window - stride tokens
      np.testing.assert_array_equal(features.offsets[f, first + stride:first + window],
                                    features.offsets[f + 1, first:first + window - stride])
    s, e = features.start_positions[f], features.end_positions[f]
    if s:
      found += 1
      start_char, end_char = features.offsets[f, s, 0], features.offsets[f, e, 1]
      assert ex.context[start_char:end_char] == "the lazy dog"
    else:
      assert e == 0
  assert found >= 2  # the answer lies wholly inside at least two overlapping windows
  assert not features.start_positions[n:].any() and not features.end_positions[n:].any()
  # Every context token has its max context in exactly one window.
  counts = np.zeros(len(doc_ids), int)
  for f in range(n):
    length = int(features.attention_mask[f].sum()) - first - 1
    counts[f * stride:f * stride + length] += features.max_context[f, first:first + length]
  assert (counts == 1).all()
  # max_query_length cuts the question.
  cut = squad.make_features([ex], tokenizer, max_len, stride, max_query_length=2)
  np.testing.assert_array_equal(cut.input_ids[0, :4], [cls] + q_ids[:2] + [sep])


def test_features_answer_with_word_pieces(tokenizer):
  context = "A dog barked at the cat in 1999."
  ex = SquadExample("y", "when?", context, ("1999",), (context.index("1999"),))
  features = squad.make_features([ex], tokenizer, 32, 8, 8)
  s, e = features.start_positions[0], features.end_positions[0]
  assert e - s == 2  # 19 ##9 ##9
  assert context[features.offsets[0, s, 0]:features.offsets[0, e, 1]] == "1999"


def _plant(features, f, start, end, value=10.0):
  start_logits = np.zeros(features.input_ids.shape)
  end_logits = np.zeros(features.input_ids.shape)
  start_logits[f, start] = end_logits[f, end] = value
  return start_logits, end_logits


def _answer_window(features):
  """A window holding the answer where its first and last tokens have their max context."""
  for f in np.nonzero(features.start_positions)[0]:
    s, e = features.start_positions[f], features.end_positions[f]
    if features.max_context[f, s] and features.max_context[f, e]:
      return int(f), s, e
  raise AssertionError("no window gives the answer its max context")


def test_decode_recovers_planted_span(tokenizer):
  ex = _long_example()
  features = squad.make_features([ex], tokenizer, 48, 10, 64)
  f, s, e = _answer_window(features)
  start_logits, end_logits = _plant(features, f, s, e)
  assert squad.decode_predictions(features, start_logits, end_logits) == {"long": "the lazy dog"}
  # Too long for max_answer_length: the best valid span (the single token at s) wins instead.
  end_logits[f, s] = 5.0
  got = squad.decode_predictions(features, start_logits, end_logits, max_answer_length=2)
  assert got == {"long": "the"}
  # Spans ending before they start or touching the question / padding are never chosen.
  start_logits, end_logits = _plant(features, f, e, s)  # reversed: invalid
  end_logits[f, e] = 5.0  # (e, e) = "dog" is the best valid span
  end_logits[f, 0] = end_logits[f, 1] = 50.0  # [CLS] and a question token
  start_logits[f, -1] = 50.0  # padding
  assert squad.decode_predictions(features, start_logits, end_logits) == {"long": "dog"}
  # Without any valid span the answer is empty.
  start_logits, end_logits = _plant(features, f, e, s)
  assert squad.decode_predictions(features, start_logits, end_logits, n_best=1) == {"long": ""}


def test_decode_null_threshold(tokenizer):
  context = "A dog barked at the cat in 1999."
  ex = SquadExample("y", "when?", context, ("1999",), (context.index("1999"),))
  features = squad.make_features([ex], tokenizer, 32, 8, 8)
  s, e = features.start_positions[0], features.end_positions[0]
  start_logits, end_logits = _plant(features, 0, s, e, value=3.0)  # span score 6
  start_logits[0, 0] = end_logits[0, 0] = 4.0  # null score 8: null - best = 2
  preds, odds = squad.decode_predictions(features, start_logits, end_logits, version_2=True,
                                         return_null_odds=True)
  assert preds == {"y": ""} and odds == {"y": pytest.approx(2.0)}
  assert squad.decode_predictions(features, start_logits, end_logits, version_2=True,
                                  null_threshold=2.5) == {"y": "1999"}
  assert squad.decode_predictions(features, start_logits, end_logits) == {"y": "1999"}  # v1
  with pytest.raises(ValueError, match="shape"):
    squad.decode_predictions(features, start_logits[:, :5], end_logits)
