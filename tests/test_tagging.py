"""Token classification: the CoNLL reader, span F1 as conlleval counts it, word-piece alignment,
and a BERT-family student fine-tuned on a tagging set through the trainer."""

import json

import numpy as np
import pytest

from mobilebert_jax import default_config, load_pretrained, predict
from mobilebert_jax.data import load_tokenizer, sample_vocab_path
from mobilebert_jax.downstream import tagging
from mobilebert_jax.downstream.metrics import bio_spans, span_f1, tagging_metrics
from mobilebert_jax.stages import Trainer
from mobilebert_jax.stages.planner import PlanError, plan
from tagging_data import write_tagging_set


def test_read_conll_takes_the_tag_column_skips_docstart_and_names_bad_lines(tmp_path):
  path = tmp_path / "ner.conll"
  path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n"
                  "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n")
  sentences = tagging.read_conll(path)
  assert [s.tokens for s in sentences] == [("EU", "rejects"), ("Peter", "Blackburn")]
  assert [s.tags for s in sentences] == [("B-ORG", "O"), ("B-PER", "I-PER")]
  assert tagging.read_conll(path, tag_column=2)[0].tags == ("B-NP", "B-VP")  # chunking column
  assert tagging.tag_vocabulary(sentences) == ["O", "B-ORG", "B-PER", "I-PER"]
  path.write_text("EU B-ORG\nrejects\n")
  with pytest.raises(ValueError, match=r"ner.conll:2: 'rejects' has a token but no tag"):
    tagging.read_conll(path)
  with pytest.raises(ValueError, match="not among the training tags"):
    tagging.tag_ids([tagging.TaggedSentence(("x",), ("B-MISC",))], ["O"], "dev.conll")


def test_spans_and_f1_count_as_conlleval():
  # An I- after O or after another type opens a span (conlleval's IOB1 leniency).
  assert bio_spans(["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == {
      ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 6)}
  gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
  pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]  # 2 of 3 spans right, 3 predicted
  assert span_f1(gold, pred) == pytest.approx(dict(precision=2 / 3, recall=2 / 3, f1=2 / 3))
  cut_short = [["B-PER", "O", "O", "B-LOC"], ["O", "O"]]  # PER(0, 1) is not PER(0, 2)
  assert span_f1(gold, cut_short) == pytest.approx(dict(precision=1 / 2, recall=1 / 3, f1=0.4))
  scores = tagging_metrics(gold, pred, "accuracy")
  assert scores == {"accuracy": pytest.approx(5 / 6)}


def test_each_word_tag_sits_on_its_first_piece_and_decodes_back():
  tokenizer = load_tokenizer(sample_vocab_path())
  sentences = [tagging.TaggedSentence(("the", "refrigerators", "fell"), ("O", "B-X", "O"))]
  tags = ["O", "B-X"]
  arrays = tagging.encode_tagged(sentences, tokenizer, tags, max_seq_length=16)
  pieces = tokenizer.convert_ids_to_tokens(arrays["input_ids"][0][arrays["attention_mask"][0]
                                                                 .astype(bool)])
  assert len(pieces) > 5  # "refrigerators" spans three pieces
  positions = arrays["word_positions"][0, :3]
  assert pieces[positions[1]] == tokenizer.tokenize("refrigerators")[0]
  assert list(arrays["labels"][0][positions]) == [0, 1, 0]
  assert (arrays["labels"][0] >= 0).sum() == 3  # one label per word, none on other pieces
  logits = np.zeros((1, 16, 2))
  logits[0, positions[1], 1] = 1.0
  assert tagging.decode_word_tags(logits, arrays["word_positions"], sentences, tags) == [
      ["O", "B-X", "O"]]
  short = tagging.encode_tagged(sentences, tokenizer, tags, max_seq_length=4)
  assert tagging.decode_word_tags(np.zeros((1, 4, 2)), short["word_positions"], sentences,
                                  tags)[0][2] == "O"  # a truncated word is predicted "O"


def tagging_config(paths, stages="tagging"):
  c = default_config.get_config()
  c.stages = stages
  c.student = default_config.model_block("bert_base", tiny=True, vocab_size=2972,
                                         max_position_embeddings=64)
  c.tagging_data.update(dict(train_file=paths["train_file"], dev_file=paths["dev_file"]))
  c.data.update(dict(max_seq_length=32, batch_size=16))
  c.mesh.update(dict(data=1, fsdp=1, tensor=1))
  c.log_every_steps = 20
  opt = default_config.optimizer(learning_rate=3e-3, warmup_steps=0)
  opt.optimizer = "adamw"
  c.tagging_stage = dict(strategy="tagging", model="student", num_epochs=0.0, num_steps=150,
                         optimizer=opt)
  c.stages = stages.replace("tagging", "tagging_stage")
  for name in ("teacher_pretrain", "pkt", "pd"):
    del c[name]
  return c


def test_plan_names_missing_tagging_files(tmp_path):
  c = tagging_config({"train_file": "", "dev_file": ""})
  with pytest.raises(PlanError, match="config.tagging_data.train_file is empty"):
    plan(c)


@pytest.fixture(scope="module")
def tagging_set(tmp_path_factory):
  """The synthetic NER set of tests/tagging_data.py (small)."""
  return write_tagging_set(tmp_path_factory.mktemp("tagging"), seed=7, num_train=300,
                           num_unlabeled=10, num_dev=100)


def test_a_bert_student_learns_a_tagging_task(tmp_path, tagging_set):
  workdir = tmp_path / "run"
  outputs = Trainer(tagging_config(tagging_set), str(workdir)).run()
  results = json.loads((workdir / "eval_results.json").read_text())
  # Far above an all-"O" tagger (F1 0, accuracy = the share of "O"); the dev set's names are
  # mostly unseen in training and in neutral contexts, so a tagger from scratch cannot get them
  # all (cross-view training on unlabelled text can, tests/test_cvt.py).
  gold = [t for s in tagging.read_conll(tagging_set["dev_file"]) for t in s.tags]
  assert results["dev_f1"] > 0.3, results
  assert results["dev_accuracy"] > gold.count("O") / len(gold) + 0.03, results
  assert results["tagging_stage_num_params"] > 0 and results["tagging_stage_train_flops"] > 0
  lines = (workdir / "tagging_predictions.txt").read_text().splitlines()
  assert len(lines[0].split()) == 3  # token gold predicted
  model, params = load_pretrained(outputs["student"], "token_classification")
  tags = tagging.tag_vocabulary(tagging.read_conll(tagging_set["train_file"]))
  assert model.config.num_labels == len(tags)

  # `predict` on the student directory (its id2label names the tags) tags the dev sentences as
  # the evaluator did.
  sentences = tagging.read_conll(tagging_set["dev_file"])[:20]
  predictor = predict.load_predictor(outputs["student"], seq_length=32)
  assert predictor.labels == list(tags)
  results = list(predict.predict(predictor, predict.read_examples(
      [json.dumps({"tokens": list(s.tokens)}) for s in sentences], predictor.head)))
  evaluated = [line.split()[2] for line in lines if line.strip()]
  assert [t for r in results for t in r["tags"]] == evaluated[:sum(len(s.tokens)
                                                                    for s in sentences)]
