"""Cross-view training: the synthetic tagging set and the shipped sample, vocabularies and
batches, the tagger's restricted views, the losses' gradients, and the stage end to end through
the trainer (CVT with unlabelled text beats the same tagger without it)."""

import importlib.util
import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import tagging_data
from mobilebert_jax.cvt import data as cvt_data
from mobilebert_jax.cvt import losses, stage as cvt_stage
from mobilebert_jax.cvt.model import CVTConfig, CVTTagger, init_params
from mobilebert_jax.data import load_tokenizer, sample_tagging_paths, sample_vocab_path
from mobilebert_jax.downstream.metrics import span_f1
from mobilebert_jax.downstream.tagging import read_conll, read_unlabeled
from mobilebert_jax.parallel import sharding
from mobilebert_jax.stages import Trainer
from mobilebert_jax.stages.planner import PlanError, plan

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "cvt.py"
TINY = CVTConfig(word_vocab_size=40, char_vocab_size=30, num_tags=5, word_embedding_size=8,
                 char_embedding_size=4, char_filter_widths=(2, 3), char_filters=3,
                 first_lstm_size=12, second_lstm_size=10, projection_size=6,
                 views=("forward", "backward", "future", "past", "full"))


def cvt_config(**stage):
  spec = importlib.util.spec_from_file_location("cvt_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.stages = "cvt"  # the config's BERT comparison stage is tested in tests/test_tagging.py
  del c["bert_tagging"]
  c.cvt.update(stage)
  return c


def random_inputs(rng, batch=2, width=9, chars=5, lengths=(9, 6)):
  words = rng.integers(4, TINY.word_vocab_size, (batch, width)).astype(np.int32)
  letters = rng.integers(1, TINY.char_vocab_size, (batch, width, chars)).astype(np.int32)
  return words, letters, np.asarray(lengths, np.int32)


@pytest.fixture(scope="module")
def tiny():
  """The tiny tagger, its parameters, and its jitted forward pass with every view."""
  model = CVTTagger(TINY)
  params = jax.jit(lambda k: init_params(model, k))(jax.random.PRNGKey(0))
  apply = jax.jit(lambda p, w, c, n: model.apply({"params": p}, w, c, n, with_views=True))
  return model, params, apply


# ----------------------------------------------------------------------------- data


def test_shipped_sample_is_the_generator_output(tmp_path):
  written = tagging_data.write_tagging_set(tmp_path, tagging_data.SEED, **tagging_data.SHIPPED)
  shipped = sample_tagging_paths()
  for key, path in written.items():
    assert pathlib.Path(path).read_bytes() == pathlib.Path(shipped[key]).read_bytes(), key
    assert os.path.getsize(shipped[key]) < 200_000
  assert len(read_conll(shipped["train_file"])) == tagging_data.SHIPPED["num_train"]
  assert len(read_unlabeled(shipped["unlabeled_file"])) == tagging_data.SHIPPED["num_unlabeled"]
  # A BERT student reads the same files: every word has WordPiece pieces, none [UNK].
  tokenizer = load_tokenizer(sample_vocab_path())
  words = {t for s in read_conll(shipped["train_file"]) + read_conll(shipped["dev_file"])
           for t in s.tokens} | {t for s in read_unlabeled(shipped["unlabeled_file"]) for t in s}
  assert not [w for w in words if tokenizer.unk_token in tokenizer.tokenize(w)]


def test_unlabelled_half_names_are_never_tagged_in_training():
  halves = tagging_data.split_names(3)
  train, unlabeled, dev = tagging_data.make_tagging_set(3, 200, 400, 200)
  unseen = {n for names in halves["unlabeled"].values() for n in names}
  assert not unseen & {t for s in train for t, _ in s}
  in_unlabeled = {t for s in unlabeled for t, _ in s} & unseen
  dev_entities = [t for s in dev for t, g in s if g != "O"]
  share = np.mean([t in unseen for t in dev_entities])
  assert 0.6 < share < 0.9 and len(in_unlabeled) > 0.9 * len(unseen)
  assert {g for s in train for _, g in s} == {"O", "B-PER", "I-PER", "B-LOC", "B-ORG"}


def test_vocabulary_and_arrays():
  sentences = [["Paris", "is", "12", "."], ["paris", "was", "Far", "34"]]
  tags = [["B-LOC", "O", "O", "O"], ["B-LOC", "O", "O", "O"]]
  vocab = cvt_data.build_vocab(sentences, ["O", "B-LOC"], min_count=2, max_word_length=3)
  # Words as the release normalizes them (lowercase, digits 0), rare ones <unk>.
  assert vocab.words == cvt_data.SPECIAL + ("00", "paris")
  assert vocab.word_id("was") == 1 and vocab.word_id("PARIS") == vocab.word_id("paris")
  assert vocab.word_id("<pad>") == 1  # text never makes padding or boundaries
  arrays = vocab.encode(sentences, tags=tags)
  assert arrays["words"].shape == (2, 6) and arrays["chars"].shape == (2, 6, 3)
  np.testing.assert_array_equal(arrays["lengths"], [6, 6])
  np.testing.assert_array_equal(arrays["labels"][0], [-1, 1, 0, 0, 0, -1])
  np.testing.assert_array_equal(arrays["words"][0], [2, 5, 1, 4, 1, 3])  # <s> ... </s>
  assert [vocab.chars[i] for i in arrays["chars"][0, 1]] == ["P", "a", "r"]  # case kept, cut
  assert arrays["chars"][0, 0].tolist() == [2, 0, 0] and arrays["chars"][0, 5, 0] == 3
  cut = vocab.encode(sentences, max_length=4)
  assert cut["words"].shape == (2, 4) and cut["lengths"].tolist() == [4, 4]
  logits = np.zeros((2, 4, 2))
  logits[0, 1, 1] = 1.0
  assert vocab.decode(logits, sentences) == [["B-LOC", "O", "O", "O"], ["O"] * 4]
  assert cvt_data.TaggingVocab.from_dict(vocab.to_dict()) == vocab
  with pytest.raises(ValueError, match="not among the training tags"):
    vocab.encode(sentences, tags=[["B-PER"] * 4, ["O"] * 4], where="dev.conll")


def test_dataset_splits_processes_and_resumes_both_streams():
  labeled = {"words": np.arange(40).reshape(20, 2), "labels": np.arange(40).reshape(20, 2)}
  unlabeled = {"words": np.arange(60).reshape(30, 2)}
  parts = [cvt_data.CVTDataset(labeled, unlabeled, 4, 6, seed=1, process_index=i,
                               process_count=2) for i in range(2)]
  batches = [next(p) for p in parts]
  assert batches[0]["words"].shape == (2, 2) and batches[0]["unlabeled_words"].shape == (3, 2)
  rows = np.concatenate([b["words"][:, 0] for b in batches]) // 2
  assert len(set(rows.tolist())) == 4  # the processes' rows make one global batch
  full = cvt_data.CVTDataset(labeled, unlabeled, 4, 6, seed=1)
  for _ in range(7):
    next(full)
  state = json.loads(json.dumps(full.state()))
  expected = [next(full) for _ in range(5)]
  resumed = cvt_data.CVTDataset(labeled, unlabeled, 4, 6, seed=1)
  resumed.restore(state)
  for a, b in zip(expected, [next(resumed) for _ in range(5)]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert full.global_batch_size == 4 and full.batches_per_epoch == 5
  alone = cvt_data.CVTDataset(labeled, None, 4, 6)
  assert set(next(alone)) == {"words", "labels"}


# ----------------------------------------------------------------------------- model


def test_shapes_padding_invariance_and_logical_axes(tiny):
  model, params, apply = tiny
  rng = np.random.default_rng(0)
  words, chars, lengths = random_inputs(rng)
  out = apply(params, words, chars, lengths)
  assert set(out) == {"primary", *TINY.views}
  assert all(v.shape == (2, 9, TINY.num_tags) for v in out.values())
  # More padding (words and characters) changes nothing at real positions.
  wider = np.pad(words, ((0, 0), (0, 4)), constant_values=5)
  more_chars = np.pad(np.pad(chars, ((0, 0), (0, 4), (0, 0)), constant_values=7),
                      ((0, 0), (0, 0), (0, 3)))
  padded = apply(params, wider, more_chars, lengths)
  for view in out:
    np.testing.assert_allclose(padded[view][0, :9], out[view][0], atol=1e-6)
    np.testing.assert_allclose(padded[view][1, :6], out[view][1, :6], atol=1e-6)
  boxed = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), boxed=True))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)
  assert boxed["word_embedding"].names == ("vocab", "embed")
  assert boxed["lstm_1"]["cell"]["forward"]["input"]["kernel"].names == ("embed", "mlp")
  assert boxed["primary"]["logits"]["kernel"].names == ("mlp", "labels")
  # The rules lay the parameters out on a data x fsdp x tensor mesh (8 CPU devices here).
  mesh = sharding.create_mesh(dict(data=2, fsdp=2, tensor=2))
  specs = sharding.logical_shardings(boxed, mesh, sharding.LOGICAL_RULES)
  assert specs["lstm_1"]["cell"]["forward"]["input"]["kernel"].spec == P("fsdp", "tensor")
  assert specs["word_embedding"].spec == P("tensor", "fsdp")


def test_paper_sizes():
  """The stage's defaults are the paper's tagger: 300-d words, 3 x 100 char filters, Bi-LSTMs of
  1024 and 512 units projected to 512."""
  stage = ml_collections.ConfigDict(cvt_stage.STAGE_KEYS)
  vocab = cvt_data.TaggingVocab(("w",) * 10_000, ("c",) * 100, ("O", "B-X"))
  model = CVTTagger(cvt_stage.model_config(stage, vocab))
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
  lstm = shapes["lstm_1"]["cell"]["forward"]
  assert lstm["input"]["kernel"].shape == (300 + 3 * 100, 4 * 1024)
  assert lstm["projection"]["kernel"].shape == (1024, 512)
  assert shapes["lstm_2"]["cell"]["backward"]["input"]["kernel"].shape == (2 * 512, 4 * 512)
  assert shapes["primary"]["hidden"]["kernel"].shape == (4 * 512, 512)
  assert set(shapes) >= {"forward", "backward", "future", "past"} and "full" not in shapes


def test_each_view_sees_only_its_side_of_the_sentence(tiny):
  """At position t: forward sees words <= t, backward >= t, future < t, past > t."""
  _, params, apply = tiny
  rng = np.random.default_rng(1)
  words, chars, lengths = random_inputs(rng, batch=1, lengths=(9,))
  base = apply(params, words, chars, lengths)
  sees = {"forward": lambda s, t: s <= t, "backward": lambda s, t: s >= t,
          "future": lambda s, t: s < t, "past": lambda s, t: s > t,
          "full": lambda s, t: True, "primary": lambda s, t: True}
  for s in range(1, 8):  # change word s (its id and its characters)
    changed_words, changed_chars = words.copy(), chars.copy()
    changed_words[0, s] = 4 + (words[0, s] - 3) % (TINY.word_vocab_size - 4)
    changed_chars[0, s] = rng.integers(1, TINY.char_vocab_size, chars.shape[-1])
    out = apply(params, changed_words, changed_chars, lengths)
    for view, visible in sees.items():
      moved = np.abs(np.asarray(out[view] - base[view])[0]).max(-1) > 1e-7
      assert moved[1:8].tolist() == [visible(s, t) for t in range(1, 8)], (view, s)


# ----------------------------------------------------------------------------- losses


def _batch(rng):
  words, chars, lengths = random_inputs(rng, batch=4, lengths=(9, 6, 4, 8))
  labels = np.where(cvt_data_mask(words, lengths), rng.integers(0, TINY.num_tags, words.shape),
                    -1).astype(np.int32)
  u_words, u_chars, u_lengths = random_inputs(rng, batch=4, width=7, lengths=(7, 5, 3, 6))
  return {"words": words, "chars": chars, "lengths": lengths, "labels": labels,
          "unlabeled_words": u_words, "unlabeled_chars": u_chars, "unlabeled_lengths": u_lengths}


def cvt_data_mask(words, lengths):
  return np.asarray(losses.word_mask(jnp.asarray(words), jnp.asarray(lengths)))


def test_unlabelled_term_trains_the_encoder_through_the_views_only(tiny):
  model, params, apply = tiny
  batch = _batch(np.random.default_rng(2))

  def terms(p, unlabeled_dropout):
    return losses.cvt_terms(model, p, batch, jax.random.PRNGKey(0), labeled_dropout=0.5,
                            unlabeled_dropout=unlabeled_dropout, label_smoothing=0.1)

  grads = jax.jit(jax.grad(lambda p: terms(p, 0.2)[1]))(params)
  norm = lambda tree: float(optax_norm(tree))
  assert norm(grads["primary"]) == 0.0  # the teacher is held fixed
  assert norm(grads["lstm_1"]) > 0 and norm(grads["word_embedding"]) > 0
  assert all(norm(grads[v]) > 0 for v in TINY.views)
  # Without student dropout, L_CVT is the KL between the primary's and each view's
  # predictions, computed here one by one.
  forward = jax.jit(lambda p: terms(p, 0.0))
  sup, cvt, metrics = forward(params)
  inputs = [batch["unlabeled_" + k] for k in ("words", "chars", "lengths")]
  out = apply(params, *inputs)
  mask = np.asarray(losses.word_mask(jnp.asarray(inputs[0]), jnp.asarray(inputs[2])))
  p = jax.nn.softmax(out["primary"])
  for view in TINY.views:
    kl = np.sum(np.asarray(p * (jnp.log(p) - jax.nn.log_softmax(out[view]))), -1)
    np.testing.assert_allclose(metrics[f"{view}_kl"], kl[mask].mean(), rtol=1e-4)
  assert float(cvt) == pytest.approx(sum(float(metrics[f"{v}_kl"]) for v in TINY.views))
  # Labelled data trains the primary module alone: L_sup ignores the auxiliary modules.
  shifted = dict(params, **{v: jax.tree.map(lambda x: x + 1.0, params[v]) for v in TINY.views})
  assert float(forward(shifted)[0]) == float(sup)


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_supervised_loss_smooths_and_skips_non_words():
  logits = jnp.asarray([[[2.0, 0.0], [0.0, 5.0], [9.0, 9.0]]])
  labels = jnp.asarray([[0, 1, -1]])
  plain = losses.supervised_loss(logits, labels, 0.0)
  expected = -np.mean([jax.nn.log_softmax(logits[0, 0])[0], jax.nn.log_softmax(logits[0, 1])[1]])
  assert float(plain) == pytest.approx(float(expected), rel=1e-6)
  smooth = losses.supervised_loss(logits, labels, 0.2)
  ls = jax.nn.log_softmax(logits[0, :2])
  target = jnp.asarray([[0.9, 0.1], [0.1, 0.9]])
  assert float(smooth) == pytest.approx(float(-jnp.mean(jnp.sum(target * ls, -1))), rel=1e-6)


# ----------------------------------------------------------------------------- the stage


def test_stage_keys_are_checked_before_any_compute(tmp_path):
  for key, value, match in (("views", ("forward", "sideways"), "config.cvt.views"),
                            ("first_lstm_size", 0, "config.cvt.first_lstm_size"),
                            ("labeled_dropout", 1.0, "config.cvt.labeled_dropout"),
                            ("char_filter_widths", (), "config.cvt.char_filter_widths")):
    with pytest.raises(PlanError, match=match):
      plan(cvt_config(**{key: value}))
  plan(cvt_config())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The same tagger trained with and without the unlabelled sentences (same seeds, steps)."""
  root = tmp_path_factory.mktemp("cvt")
  paths = tagging_data.write_tagging_set(root / "data", seed=1, num_train=400,
                                         num_unlabeled=800, num_dev=200)
  runs = {}
  for name, unlabeled in (("cvt", paths["unlabeled_file"]), ("supervised", "")):
    c = acceptance_config(paths, unlabeled)
    workdir = str(root / name)
    outputs = Trainer(c, workdir).run()
    runs[name] = (c, workdir, outputs,
                  json.loads(pathlib.Path(workdir, "eval_results.json").read_text()))
  return runs


def acceptance_config(paths, unlabeled_file):
  c = cvt_config(num_steps=300, word_embedding_size=32, char_embedding_size=8,
                 char_filters=16, first_lstm_size=64, second_lstm_size=32, projection_size=32,
                 labeled_dropout=0.2, unlabeled_weight=0.25,
                 word_dropout=0.3, max_word_length=12)
  c.cvt.optimizer.learning_rate = 1e-2
  c.tagging_data.update(dict(paths, unlabeled_file=unlabeled_file))
  c.mesh = dict(data=1, fsdp=1, tensor=1)  # one device: the fastest on a 2-core CPU
  c.checkpoint.update(dict(async_save=False, save_every_steps=1000))
  return c


def test_cvt_learns_the_tags_and_unlabelled_text_helps(trained):
  c, workdir, outputs, cvt = trained["cvt"]
  supervised = trained["supervised"][3]
  # A trivial tagger: every capitalised word after the first is an entity of the commonest type.
  train, dev = read_conll(c.tagging_data.train_file), read_conll(c.tagging_data.dev_file)
  common = max(("PER", "LOC", "ORG"), key=[t for s in train for t in s.tags].count)
  guess = [["O"] + [f"B-{common}" if w[:1].isupper() else "O" for w in s.tokens[1:]]
           for s in dev]
  trivial = span_f1([list(s.tags) for s in dev], guess)["f1"]
  assert trivial < 0.35 < supervised["cvt_dev_f1"]
  # The dev names mostly occur only in the unlabelled text, in contexts that say their type;
  # CVT learns them there (over 4 data and 3 model seeds: 0.81-0.94; without it 0.47-0.68).
  assert cvt["cvt_dev_f1"] > 0.75
  assert cvt["cvt_dev_f1"] > supervised["cvt_dev_f1"] + 0.1
  for key in ("precision", "recall", "accuracy"):
    assert 0.0 <= cvt[f"cvt_dev_{key}"] <= 1.0
  assert cvt["cvt_train_steps"] == 300
  assert cvt["cvt_num_params"] < cvt["cvt_num_params_training"]
  assert cvt["cvt_train_flops"] > supervised["cvt_train_flops"] > 0  # the unlabelled pass
  assert outputs == {"cvt": os.path.join(workdir, "cvt", "final")}


def test_saved_tagger_reproduces_the_dev_predictions(trained):
  c, workdir, outputs, _ = trained["cvt"]
  model, params, vocab = cvt_stage.load_cvt(outputs["cvt"])
  rows = pathlib.Path(workdir, "cvt", cvt_stage.PREDICTIONS_FILE).read_text().split("\n\n")
  sentences = [[line.split() for line in row.strip().split("\n")] for row in rows if row.strip()]
  dev = read_conll(c.tagging_data.dev_file)
  assert [[w for w, _, _ in s] for s in sentences] == [list(s.tokens) for s in dev]
  predicted = cvt_stage.predict_tags(model, params, vocab, [s.tokens for s in dev],
                                     batch_size=64)
  assert predicted == [[p for _, _, p in s] for s in sentences]


def test_a_finished_stage_reruns_as_done(trained):
  c, workdir, outputs, results = trained["cvt"]
  metrics = pathlib.Path(workdir, "metrics.jsonl")
  before = metrics.read_text()
  assert Trainer(c, workdir).run() == outputs
  assert metrics.read_text() == before
  assert json.loads(pathlib.Path(workdir, "eval_results.json").read_text()) == results
