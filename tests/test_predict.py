"""`python -m mobilebert_jax.predict` on native checkpoints (JAX): spans, tags, input formats and
errors. Agreement across LiteRT and ONNX is in tests/test_export.py (it needs the export extra);
classification and tagging against the evaluators' own predictions in test_finetune/test_tagging.
"""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from mobilebert_jax import get_preset, predict
from mobilebert_jax.downstream import squad
from mobilebert_jax.export.serving import load_serving
from mobilebert_jax.models import tiny
from tiny_checkpoints import WORDS, native_checkpoint

SEQ = 16
CONFIG = tiny(get_preset("mobilebert"), vocab_size=64)
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("predict")
  return {
      "qa": native_checkpoint(root / "qa", CONFIG, "question_answering", seed=1),
      "tag": native_checkpoint(root / "tag", CONFIG.replace(num_labels=len(TAGS)),
                               "token_classification", seed=2, labels=TAGS),
      "base": native_checkpoint(root / "base", CONFIG, "base", seed=3),
  }


def test_question_answering_spans_are_the_best_valid_span(models):
  """Each answer is the context's characters [start, end) and the highest start + end logit
  over context-token spans (end >= start, at most max_answer_length pieces), found by brute
  force over the same logits."""
  rng = np.random.RandomState(0)
  lines = [" ".join(rng.choice(WORDS, 2)) + "\t" + " ".join(rng.choice(WORDS, rng.randint(4, 9)))
           for _ in range(6)]
  lines.append(json.dumps({"question": "word1", "context": "word2 word3 word4"}))
  predictor = predict.load_predictor(models["qa"], seq_length=SEQ)
  examples = predict.read_examples(lines, predictor.head)
  results = list(predict.predict(predictor, examples, max_answer_length=3))

  serving = load_serving(models["qa"], seq_length=SEQ, batch_size=None)
  for example, result in zip(examples, results):
    features = squad.make_features(
        [squad.SquadExample("q", example.text, example.text_pair)], predictor.tokenizer,
        max_seq_length=SEQ, doc_stride=SEQ // 2, max_query_length=SEQ // 4)
    out = jax.device_get(serving(*(features.inputs()[k] for k in
                                   ("input_ids", "attention_mask", "token_type_ids"))))
    start, end = out["start_logits"][0], out["end_logits"][0]
    offsets = features.offsets[0]
    context = [i for i in range(SEQ) if offsets[i, 0] >= 0]
    best = max((start[i] + end[j], i, j) for i in context for j in context if 0 <= j - i < 3)
    # Only the top 20 starts/ends are candidates (BERT's decoding); at this length all are.
    assert result["start"] == offsets[best[1], 0] and result["end"] == offsets[best[2], 1]
    assert result["answer"] == example.text_pair[result["start"]:result["end"]]
    assert result["score"] == pytest.approx(float(best[0]), abs=1e-4)


def test_tagging_gives_one_tag_per_word_entities_and_flags_truncation(models):
  predictor = predict.load_predictor(models["tag"], seq_length=SEQ)
  assert predictor.labels == TAGS
  lines = ["word1 word2 word3", " ".join(WORDS[:30]), json.dumps({"tokens": ["word5"]})]
  results = list(predict.predict(predictor, predict.read_examples(lines, predictor.head)))
  assert [len(r["tags"]) for r in results] == [3, 30, 1]
  assert all(set(r["tags"]) <= set(TAGS) for r in results)
  assert [r.get("truncated", False) for r in results] == [False, True, False]
  assert results[1]["tags"][SEQ:] == ["O"] * (30 - SEQ)  # words past the window: "O"
  for r in results:
    for entity in r["entities"]:
      assert r["tags"][entity["start"]] in (f"B-{entity['type']}", f"I-{entity['type']}")
      assert entity["text"] == " ".join(r["tokens"][entity["start"]:entity["end"]])


def test_errors_name_the_line_the_head_or_the_model(models, tmp_path):
  with pytest.raises(predict.PredictError, match=r"<input>:2: question answering needs "
                     r"question<TAB>context"):
    predict.read_examples(["a\tb", "only a question"], "question_answering")
  with pytest.raises(predict.PredictError, match=r"in.txt:3: not valid JSON"):
    predict.read_examples(["a", "", "{bad json"], "classification", "in.txt")
  with pytest.raises(predict.PredictError, match=r"base.*has a 'base' head; predict handles "
                     r"classification, question_answering, token_classification"):
    predict.load_predictor(models["base"])
  with pytest.raises(predict.PredictError, match=r"nowhere: no such model"):
    predict.load_predictor(str(tmp_path / "nowhere"))
  (tmp_path / "weights.bin").write_bytes(b"")
  with pytest.raises(predict.PredictError, match=r"weights.bin: not a model"):
    predict.load_predictor(str(tmp_path / "weights.bin"))
  # A sequence longer than the model's positions, through the command line: exit 2, one line.
  result = subprocess.run([sys.executable, "-m", "mobilebert_jax.predict", models["tag"],
                           "--seq-length=4096"], input="word1\n", capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.strip().endswith("--seq-length=4096 exceeds the model's "
                                        "max_position_embeddings=128"), result.stderr
