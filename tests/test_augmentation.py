"""TinyBERT data augmentation: MLM / embedding candidates, sampling, cache, the real-model MLM."""

import json
import re

import jax
import numpy as np
import pytest

from mobilebert_jax import build_model, get_preset
from mobilebert_jax.data import load_tokenizer, sample_vocab_path
from mobilebert_jax.downstream import augmentation as aug
from mobilebert_jax.downstream.glue_data import GlueExample
from mobilebert_jax.pretrained import init_params

# In the shipped vocab: single WordPieces ...
SINGLE = ["the", "dog", "sat", "on", "mat", "quickly", "running", "red", "blue", "green"]
# ... and words split into several pieces.
MULTI = {"cat": ["ca", "##t"], "model": ["mo", "##d", "##el"], "kitten": ["kit", "##ten"]}


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer(sample_vocab_path())


def test_vocab_assumptions(tokenizer):
  for word in SINGLE:
    assert tokenizer.tokenize(word) == [word]
  for word, pieces in MULTI.items():
    assert tokenizer.tokenize(word) == pieces


class PlantedMLM:
  """Fake teacher MLM: every masked slot ranks `ranked` (best first) above all other tokens."""

  def __init__(self, tokenizer, ranked):
    self.vocab_size = len(tokenizer)
    self.ids = tokenizer.convert_tokens_to_ids(ranked)
    self.calls = []

  def __call__(self, input_ids, attention_mask, token_type_ids, positions):
    self.calls.append(tuple(np.array(x) for x in (input_ids, attention_mask, token_type_ids,
                                                  positions)))
    logits = np.zeros(positions.shape + (self.vocab_size,), np.float32)
    for rank, i in enumerate(self.ids):
      logits[..., i] = len(self.ids) - rank
    return logits


def words(text):
  return [w.strip(",.!;") for w in text.split()]


def ex(text_a, text_b=None, label=1, index=0, guid="t-0"):
  return GlueExample(guid=guid, text_a=text_a, text_b=text_b, label=label, index=index)


def test_single_piece_words_take_mlm_whole_word_candidates(tokenizer):
  # '##er', '[MASK]' and ',' outrank the planted words but are not whole words; 'the' is
  # the word itself where 'the' is masked.
  mlm = PlantedMLM(tokenizer, ["##er", "[MASK]", ",", "the", "red", "blue", "green", "sun"])
  example = ex("The dog sat on the mat.", "quickly running")
  out = aug.augment_examples([example], tokenizer, mlm, None, p_t=1.0, n_aug=30, k=7)
  assert out[0] == example and len(out) == 31
  seen = set()
  for copy in out[1:]:
    new = words(copy.text_a) + words(copy.text_b)
    assert all(w in {"red", "blue", "green", "the"} for w in new), new
    # 'the' only where some other word was: never the masked word itself.
    assert new[0] != "the" and new[4] != "the"
    assert copy.text_a.endswith(".")
    seen.update(new)
  assert {"red", "blue", "green"} <= seen and "sun" not in seen   # "sun" is rank 8 > k

  # One forward for all 8 words: one masked word per row, the rest the unchanged pair.
  assert len(mlm.calls) == 1
  ids, mask, types, positions = mlm.calls[0]
  full = tokenizer("The dog sat on the mat.", "quickly running")["input_ids"]
  n = len(full)
  rows = [r for r in range(ids.shape[0]) if (ids[r] == tokenizer.mask_token_id).any()]
  assert len(rows) == 8 and positions.shape[1] == 1
  masked = sorted(int(positions[r, 0]) for r in rows)
  assert masked == [1, 2, 3, 4, 5, 6, 9, 10]    # not '.', [CLS] or [SEP]
  for r in rows:
    expect = list(full)
    expect[positions[r, 0]] = tokenizer.mask_token_id
    assert list(ids[r, :n]) == expect and mask[r].sum() == n
    assert list(types[r, :n]) == [0] * 9 + [1] * 3


def test_top_k_is_taken_before_the_whole_word_filter(tokenizer):
  mlm = PlantedMLM(tokenizer, ["##er", "[MASK]", ",", "red"])
  example = ex("the dog sat")
  out = aug.augment_examples([example], tokenizer, mlm, None, p_t=1.0, n_aug=3, k=3)
  assert all(o.text_a == "the dog sat" for o in out)


def test_mlm_calls_are_batched(tokenizer):
  examples = [ex("the dog sat on the mat", guid=f"t-{i}", index=i) for i in range(5)]
  big, small = (PlantedMLM(tokenizer, ["red", "blue"]) for _ in range(2))
  a = aug.augment_examples(examples, tokenizer, big, None, p_t=0.5, n_aug=4, batch_size=64)
  b = aug.augment_examples(examples, tokenizer, small, None, p_t=0.5, n_aug=4, batch_size=8)
  assert a == b
  assert len(big.calls) == 1 and len(small.calls) == 4      # 30 masked words
  assert all(c[0].shape[0] == 8 for c in small.calls)


def planted_embeddings(tokenizer, targets, dim=16, seed=0):
  """Random embeddings where each multi-piece word's mean piece vector is (up to scale) the
  embedding of its planted target; '##er' is planted too but is not a whole word."""
  table = np.random.default_rng(seed).normal(size=(len(tokenizer), dim)).astype(np.float32)
  vocab = tokenizer.get_vocab()
  for word, target in targets.items():
    mean = table[[vocab[p] for p in MULTI[word]]].mean(axis=0)
    table[vocab[target]] = 3.0 * mean
    table[vocab["##er"]] = mean
  return table


def test_multi_piece_words_take_nearest_embedding(tokenizer):
  table = planted_embeddings(tokenizer, {"cat": "dog", "model": "sat"})
  example = ex("Cat, the model!")
  out = aug.augment_examples([example], tokenizer, None, table, p_t=1.0, n_aug=5, k=1)
  assert [o.text_a for o in out[1:]] == ["dog, the sat!"] * 5

  # With k=3 the planted neighbour is one of the candidates, and all are whole words.
  out = aug.augment_examples([example], tokenizer, None, table, p_t=1.0, n_aug=40, k=3)
  firsts = {words(o.text_a)[0] for o in out[1:]}
  assert "dog" in firsts and len(firsts) <= 3
  assert all(w.isalnum() and w in tokenizer.get_vocab() for w in firsts)


def test_glove_vectors_for_multi_piece_words(tokenizer, tmp_path):
  path = tmp_path / "glove.txt"
  path.write_text("cat 1 0 0\nkitten 0.9 0.1 0\ndog 0 1 0\nmodel 0 0 1\nblah-x 1 0 0\n")
  vectors = aug.load_glove(path)
  assert vectors.words == ("cat", "kitten", "dog", "model", "blah-x")
  out = aug.augment_examples([ex("the cat")], tokenizer, None, vectors, p_t=1.0, n_aug=2, k=1)
  assert [o.text_a for o in out] == ["the cat", "the kitten", "the kitten"]
  bad = tmp_path / "bad.txt"
  bad.write_text("cat 1 0 0\ndog 0 1\n")
  with pytest.raises(ValueError, match="bad.txt:2"):
    aug.load_glove(bad)


@pytest.fixture(scope="module")
def both(tokenizer):
  """A fake MLM and embeddings giving every word of TEXT candidates other than itself."""
  mlm = PlantedMLM(tokenizer, ["red", "blue", "green", "sun", "tree"])
  table = planted_embeddings(tokenizer, {"cat": "dog", "model": "water"})
  return mlm, table


TEXT_A, TEXT_B = "The cat sat, on the mat!", "a model was running quickly."


def test_p_zero_copies_originals(tokenizer, both):
  examples = [ex(TEXT_A, TEXT_B, label=2, index=7, guid="mnli-train-7"),
              ex("Quickly, the cat.", None, label=0, index=8, guid="mnli-train-8")]
  out = aug.augment_examples(examples, tokenizer, *both, p_t=0.0, n_aug=3)
  assert len(out) == 8
  for i, original in enumerate(examples):
    group = out[4 * i:4 * i + 4]
    assert group[0] is original
    for j, copy in enumerate(group[1:], start=1):
      assert copy == GlueExample(f"{original.guid}-aug{j}", original.text_a, original.text_b,
                                 original.label, original.index)


def test_p_one_changes_every_word(tokenizer, both):
  example = ex(TEXT_A, TEXT_B, label=0.5)
  out = aug.augment_examples([example], tokenizer, *both, p_t=1.0, n_aug=10)
  for copy in out[1:]:
    for before, after in ((TEXT_A, copy.text_a), (TEXT_B, copy.text_b)):
      assert all(a != b.lower() for a, b in zip(words(after), words(before)))
      assert re.sub(r"\w+", "W", after) == re.sub(r"\w+", "W", before)  # punctuation kept
    assert copy.label == 0.5 and copy.index == example.index


def test_fields_and_unreplaceable_words(tokenizer, both):
  example = ex("don't e-mail the cat", "the dog sat")
  out = aug.augment_examples([example], tokenizer, *both, p_t=1.0, n_aug=3, k=5,
                             fields=("text_b",))
  for copy in out[1:]:
    assert copy.text_a == example.text_a
    assert all(w in {"red", "blue", "green", "sun", "tree"} for w in words(copy.text_b))
  out = aug.augment_examples([example], tokenizer, *both, p_t=1.0, n_aug=3)
  assert all(o.text_a.startswith("don't e-mail ") for o in out)


def test_words_past_max_seq_length_are_not_masked(tokenizer):
  mlm = PlantedMLM(tokenizer, ["red"])
  example = ex("the dog sat on the mat", "the dog sat on the mat")
  out = aug.augment_examples([example], tokenizer, mlm, None, p_t=1.0, n_aug=1, k=1,
                             max_seq_length=9)   # [CLS] 3 [SEP] 3 [SEP]
  assert out[1].text_a == "red red red on the mat"
  assert out[1].text_b == "red red red on the mat"
  assert all(c[0].shape[1] <= 9 for c in mlm.calls)


def test_deterministic_given_seed(tokenizer, both):
  examples = [ex(TEXT_A, TEXT_B, guid=f"t-{i}", index=i) for i in range(3)]
  run = lambda seed: aug.augment_examples(examples, tokenizer, *both, p_t=0.5, n_aug=8,
                                          seed=seed)
  first = run(0)
  assert run(0) == first
  assert run(1) != first
  assert len({(o.text_a, o.text_b) for o in first}) > 10


def test_bad_settings(tokenizer, both):
  for kwargs, match in [({"p_t": 1.5}, "p_t"), ({"k": 0}, "k"), ({"n_aug": -1}, "n_aug"),
                        ({"fields": ("label",)}, "fields")]:
    with pytest.raises(ValueError, match=match):
      aug.augment_examples([ex("a")], tokenizer, *both, **kwargs)
  with pytest.raises(ValueError, match="word_embeddings"):
    aug.augment_examples([ex("a")], tokenizer, None, np.zeros((10, 4)))
  with pytest.raises(ValueError, match="mlm_predict returned"):
    aug.augment_examples([ex("the dog")], tokenizer, lambda *a: np.zeros((1, 5)), None)


def test_cache_reused_and_rebuilt(tokenizer, tmp_path):
  table = planted_embeddings(tokenizer, {"cat": "dog"})
  examples = [ex(TEXT_A, TEXT_B, label=1, guid="t-0"), ex("the cat", None, label=0.25,
                                                         guid="t-1", index=1)]
  path = tmp_path / "cache" / "aug.jsonl"

  def build(mlm, examples=examples, **kwargs):
    return aug.load_or_augment(path, examples, tokenizer, mlm, table, n_aug=3, **kwargs)

  first_mlm = PlantedMLM(tokenizer, ["red", "blue"])
  first = build(first_mlm)
  assert first_mlm.calls and len(first) == 8
  header = json.loads(path.read_text().splitlines()[0])
  assert header["settings"]["n_aug"] == 3 and header["settings"]["p_t"] == 0.4
  assert {"k", "seed", "vocab", "examples", "embeddings"} <= set(header["settings"])
  assert [p.name for p in path.parent.iterdir()] == ["aug.jsonl"]     # no temporary left

  again = PlantedMLM(tokenizer, ["red", "blue"])
  assert build(again) == first and not again.calls
  assert isinstance(first[-1].label, float) and first[0].text_b == TEXT_B

  for change in ({"p_t": 0.9}, {"seed": 3}, {"k": 4}, {"examples": examples[:1]},
                 {"teacher": "teacher-2"}):
    mlm = PlantedMLM(tokenizer, ["red", "blue"])
    rebuilt = build(mlm, **change)
    assert mlm.calls, change
    reused = PlantedMLM(tokenizer, ["red", "blue"])
    assert build(reused, **change) == rebuilt and not reused.calls

  path.write_text("not json\n")
  mlm = PlantedMLM(tokenizer, ["red", "blue"])
  assert build(mlm) == first and mlm.calls


def test_mlm_predict_fn_with_a_real_model(tokenizer):
  config = get_preset("mobilebert", tiny_variant=True, vocab_size=len(tokenizer))
  model = build_model(config, "pretraining")
  params = init_params(model, config, jax.random.PRNGKey(0))
  predict = aug.mlm_predict_fn(model, params)
  ids = np.full((3, 16), tokenizer.pad_token_id, np.int32)
  ids[:, :5] = tokenizer("the dog sat")["input_ids"]
  mask = (ids != tokenizer.pad_token_id).astype(np.int32)
  logits = predict(ids, mask, np.zeros_like(ids), np.array([[1, 2]] * 3))
  assert isinstance(logits, np.ndarray) and logits.shape == (3, 2, len(tokenizer))
  assert np.isfinite(logits).all()

  table = aug.token_embedding_table(params)
  assert table.shape == (len(tokenizer), config.embedding_size)
  out = aug.augment_examples([ex("The cat sat on the mat.", "a dog")], tokenizer, predict, table,
                             p_t=1.0, n_aug=2, batch_size=4)
  assert len(out) == 3 and all(o.text_a.endswith(".") for o in out)
  with pytest.raises(ValueError, match="MLM head"):
    aug.mlm_predict_fn(build_model(config, "classification"), params)
