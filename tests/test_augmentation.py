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
  # '##er', '[MASK]' and ',' outrank the planted words but are not whole words.
  mlm = PlantedMLM(tokenizer, ["##er", "[MASK]", ",", "the", "red", "blue", "green", "sun"])
  example = ex("The dog sat on the mat.", "quickly running")
  out = aug.augment_examples([example], tokenizer, mlm, None, p_t=1.0, n_aug=30, k=7)
  assert out[0] == example and len(out) > 1
  seen = set()
  for copy in out[1:]:
    a, b = words(copy.text_a), words(copy.text_b)
    assert (copy.text_a == example.text_a) != (copy.text_b == example.text_b)  # one field
    # stop words (the, on) stay; the others take one of the whole-word candidates
    assert [a[i] for i in (0, 3, 4)] == ["The", "on", "the"] and copy.text_a.endswith(".")
    new = [a[i] for i in (1, 2, 5)] if copy.text_a != example.text_a else b
    assert all(w in {"red", "blue", "green", "the"} for w in new), new
    seen.update(new)
  assert {"red", "blue", "green"} <= seen and "sun" not in seen   # "sun" is rank 8 > k

  # One forward for the 5 replaceable words, one masked word per row, each sentence alone:
  # [CLS] masked sentence [SEP] sentence [SEP] (TinyBERT's release).
  assert len(mlm.calls) == 1
  ids, mask, types, positions = mlm.calls[0]
  rows = [r for r in range(ids.shape[0]) if (ids[r] == tokenizer.mask_token_id).any()]
  assert len(rows) == 5 and positions.shape[1] == 1
  got = sorted((int(positions[r, 0]), int(mask[r].sum())) for r in rows)
  assert got == [(1, 7), (2, 7), (2, 17), (3, 17), (6, 17)]   # quickly running | dog sat mat


def test_top_k_is_taken_before_the_whole_word_filter(tokenizer):
  mlm = PlantedMLM(tokenizer, ["##er", "[MASK]", ",", "red"])
  example = ex("the dog sat")
  out = aug.augment_examples([example], tokenizer, mlm, None, p_t=1.0, n_aug=3, k=3)
  assert out == [example]      # no candidate: every try equals the original and is dropped


def test_mlm_calls_are_batched(tokenizer):
  examples = [ex("the dog sat on the mat", guid=f"t-{i}", index=i) for i in range(5)]
  big, small = (PlantedMLM(tokenizer, ["red", "blue"]) for _ in range(2))
  a = aug.augment_examples(examples, tokenizer, big, None, p_t=0.5, n_aug=4, batch_size=64)
  b = aug.augment_examples(examples, tokenizer, small, None, p_t=0.5, n_aug=4, batch_size=8)
  assert a == b
  assert len(big.calls) == 1 and len(small.calls) == 2      # 15 masked words (dog, sat, mat)
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
  assert [o.text_a for o in out] == ["Cat, the model!", "dog, the sat!"]   # 4 duplicates gone

  # With k=3 the planted neighbour is one of the candidates, and all are whole words.
  out = aug.augment_examples([example], tokenizer, None, table, p_t=1.0, n_aug=40, k=3,
                             dedup=False)
  assert len(out) == 41
  firsts = {words(o.text_a)[0] for o in out[1:]}
  assert "dog" in firsts and len(firsts) <= 3
  assert all(w.isalnum() and w in tokenizer.get_vocab() for w in firsts)


def test_glove_vectors_for_multi_piece_words(tokenizer, tmp_path):
  path = tmp_path / "glove.txt"
  path.write_text("cat 1 0 0\nkitten 0.9 0.1 0\ndog 0 1 0\nmodel 0 0 1\nblah-x 1 0 0\n")
  vectors = aug.load_glove(path)
  assert vectors.words == ("cat", "kitten", "dog", "model", "blah-x")
  out = aug.augment_examples([ex("the cat")], tokenizer, None, vectors, p_t=1.0, n_aug=2, k=1)
  assert [o.text_a for o in out] == ["the cat", "the kitten"]
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
  assert aug.augment_examples(examples, tokenizer, *both, p_t=0.0, n_aug=3) == examples
  # The paper's Algorithm 1 (no de-duplication, both fields at once): n_aug copies each.
  out = aug.augment_examples(examples, tokenizer, *both, p_t=0.0, n_aug=3, dedup=False,
                             separate_fields=False)
  assert len(out) == 8
  for i, original in enumerate(examples):
    group = out[4 * i:4 * i + 4]
    assert group[0] is original
    for j, copy in enumerate(group[1:], start=1):
      assert copy == GlueExample(f"{original.guid}-aug{j}", original.text_a, original.text_b,
                                 original.label, original.index)
  # one field at a time without de-duplication: n_aug copies per field
  out = aug.augment_examples(examples, tokenizer, *both, p_t=0.0, n_aug=3, dedup=False)
  assert len(out) == (1 + 2 * 3) + (1 + 3)


def test_p_one_changes_every_word(tokenizer, both):
  example = ex(TEXT_A, TEXT_B, label=0.5)
  out = aug.augment_examples([example], tokenizer, *both, p_t=1.0, n_aug=10)
  stop = {"the", "on", "a", "was"}
  for copy in out[1:]:
    changed = [(b, a) for b, a in ((TEXT_A, copy.text_a), (TEXT_B, copy.text_b)) if a != b]
    assert len(changed) == 1
    before, after = changed[0]
    for a, b in zip(words(after), words(before)):
      assert (a == b) if b.lower() in stop else (a != b.lower()), (before, after)
    assert re.sub(r"\w+", "W", after) == re.sub(r"\w+", "W", before)  # punctuation kept
    assert copy.label == 0.5 and copy.index == example.index


def test_fields_and_unreplaceable_words(tokenizer, both):
  example = ex("don't e-mail the cat 123 times", "the dog sat")
  out = aug.augment_examples([example], tokenizer, *both, p_t=1.0, n_aug=3, k=5,
                             fields=("text_b",))
  assert len(out) > 1
  for copy in out[1:]:
    assert copy.text_a == example.text_a
    assert words(copy.text_b)[0] == "the"
    assert all(w in {"red", "blue", "green", "sun", "tree"} for w in words(copy.text_b)[1:])
  # The release's words are the basic tokenizer's: "don", "'", "t" (stop words or not
  # letters), "e", "-", "mail"; "123" is not made of letters.
  out = aug.augment_examples([example], tokenizer, *both, p_t=1.0, n_aug=3, fields=("text_a",))
  for copy in out[1:]:
    w = re.split(r"[\s'-]+", copy.text_a)
    assert w[:2] == ["don", "t"] and w[4] == "the" and w[6] == "123"
    assert w[2] != "e" and w[3] != "mail" and w[5] != "cat" and w[7] != "times"


def test_stop_words_kept_as_is(tokenizer):
  """Words the release never replaces (data_augmentation.py `_is_valid`, `StopWordsList`)."""
  mlm = PlantedMLM(tokenizer, ["red", "blue", "green"])
  text = "What was very good for you is not there"
  out = aug.augment_examples([ex(text)], tokenizer, mlm, None, p_t=1.0, n_aug=10)
  assert len(out) > 1
  for copy in out[1:]:
    new, old = copy.text_a.split(), text.split()
    for i, word in enumerate(old):
      replaceable = word.lower() in {"what", "good"}   # question words are not stop words
      assert (new[i] != word) if replaceable else (new[i] == word), (i, copy.text_a)
  assert {"what", "good", "dog"}.isdisjoint(aug.STOP_WORDS)
  assert {"the", "is", "very", "not", "you", "there", "don", "t"} <= aug.STOP_WORDS
  assert aug.is_replaceable("Good") and not aug.is_replaceable("The")
  assert not aug.is_replaceable("123") and not aug.is_replaceable("e-mail")
  # stop_words=() is the paper's Algorithm 1: every alphabetic word may be replaced
  out = aug.augment_examples([ex(text)], tokenizer, mlm, None, p_t=1.0, n_aug=5, k=3,
                             stop_words=())
  assert all(w in {"red", "blue", "green"} for o in out[1:] for w in o.text_a.split())


def test_duplicates_removed(tokenizer):
  """A try equal to the original or to an earlier copy is dropped (release L233-234)."""
  mlm = PlantedMLM(tokenizer, ["red", "blue"])
  example = ex("the dog")                       # one replaceable word, two candidates
  out = aug.augment_examples([example], tokenizer, mlm, None, p_t=0.5, n_aug=20, k=2)
  texts = [o.text_a for o in out]
  assert texts[0] == "the dog" and sorted(texts[1:]) == ["the blue", "the red"]
  assert [o.guid for o in out] == ["t-0", "t-0-aug1", "t-0-aug2"]
  kept = aug.augment_examples([example], tokenizer, mlm, None, p_t=0.5, n_aug=20, k=2,
                              dedup=False)
  assert len(kept) == 21 and {o.text_a for o in kept} == {"the dog", "the red", "the blue"}


def test_pairs_change_one_field_at_a_time(tokenizer, both):
  """AugmentProcessor (release L268-273): the copies of sentence 1, then those of sentence 2."""
  example = ex(TEXT_A, TEXT_B)
  out = aug.augment_examples([example], tokenizer, *both, p_t=0.5, n_aug=6)
  changed = [(o.text_a != TEXT_A, o.text_b != TEXT_B) for o in out[1:]]
  assert set(changed) == {(True, False), (False, True)}
  assert changed == sorted(changed, reverse=True)     # all text_a copies come first
  assert len({(o.text_a, o.text_b) for o in out}) == len(out)
  assert [o.guid for o in out[1:]] == [f"t-0-aug{j}" for j in range(1, len(out))]
  together = aug.augment_examples([example], tokenizer, *both, p_t=1.0, n_aug=4,
                                  separate_fields=False)
  assert all(o.text_a != TEXT_A and o.text_b != TEXT_B for o in together[1:])


def test_mlm_input_layout(tokenizer):
  """The release feeds `[CLS] masked [SEP] sentence [SEP]`, token types 0 through the first
  [SEP] and 1 after it, cut at 512 (data_augmentation.py L152-168)."""
  cls, sep, mask = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id
  pieces = tokenizer("the dog sat", add_special_tokens=False)["input_ids"]
  ids, types = aug.mlm_input(tokenizer, pieces, 1)
  assert ids == [cls, pieces[0], mask, pieces[2], sep] + pieces + [sep]
  assert types == [0] * 5 + [1] * 4
  ids, types = aug.mlm_input(tokenizer, pieces, 1, context="masked")
  assert ids == [cls, pieces[0], mask, pieces[2], sep] and types == [0] * 5
  ids, types = aug.mlm_input(tokenizer, pieces, 1, max_length=6)
  assert ids == [cls, pieces[0], mask, pieces[2], sep, pieces[0]] and types == [0] * 5 + [1]
  assert aug.mlm_input(tokenizer, pieces, 2, max_length=3) is None    # [MASK] past the cut
  assert aug.mlm_input(tokenizer, pieces, 1, max_length=3) == ([cls, pieces[0], mask],
                                                                [0, 0, 0])
  # what augment_examples sends for a pair: each sentence alone, one masked word per row
  mlm = PlantedMLM(tokenizer, ["red"])
  aug.augment_examples([ex("the dog sat", "a mat")], tokenizer, mlm, None, p_t=1.0, n_aug=1)
  (ids, attention, types, positions), = mlm.calls
  sent = {(tuple(ids[r][attention[r] > 0]), tuple(types[r][attention[r] > 0]), int(positions[r, 0]))
          for r in range(len(ids)) if (ids[r] == mask).any()}
  mat = tokenizer("a mat", add_special_tokens=False)["input_ids"]
  expect = {(tuple(i), tuple(t), 1 + m) for p, m in ((pieces, 1), (pieces, 2), (mat, 1))
            for i, t in [aug.mlm_input(tokenizer, p, m)]}
  assert sent == expect and np.all(attention == (ids != tokenizer.pad_token_id))


def test_words_past_max_seq_length_are_not_masked(tokenizer):
  mlm = PlantedMLM(tokenizer, ["red"])
  example = ex("dog sat mat dog sat mat")
  out = aug.augment_examples([example], tokenizer, mlm, None, p_t=1.0, n_aug=1, k=1,
                             max_seq_length=5)   # [CLS] dog [MASK] mat dog | cut
  assert out[1].text_a == "red red red red sat mat"
  assert all(c[0].shape[1] <= 5 for c in mlm.calls)


def test_deterministic_given_seed(tokenizer, both):
  examples = [ex(TEXT_A, TEXT_B, guid=f"t-{i}", index=i) for i in range(3)]
  run = lambda seed: aug.augment_examples(examples, tokenizer, *both, p_t=0.5, n_aug=8,
                                          seed=seed)
  first = run(0)
  assert run(0) == first
  assert run(1) != first
  assert len({(o.text_a, o.text_b) for o in first}) > 10


def test_n_aug_by_task(tokenizer):
  """N_a by task from the release's `default_params` (L300-312); 20 otherwise."""
  assert {t: aug.task_n_aug(t) for t in ("CoLA", "sst2", "MRPC", "STS-B", "qqp", "mnli",
                                         "qnli", "rte", "wnli")} == {
      "CoLA": 30, "sst2": 20, "MRPC": 30, "STS-B": 30, "qqp": 10, "mnli": 10, "qnli": 20,
      "rte": 30, "wnli": 20}
  assert aug.task_n_aug(None) == aug.DEFAULT_N_AUG == 20 and aug.task_n_aug("mnli", 4) == 4
  mlm = PlantedMLM(tokenizer, ["red"])
  for task, n in (("mnli", 10), ("cola", 30), (None, 20)):
    out = aug.augment_examples([ex("the dog")], tokenizer, mlm, None, p_t=0.0, task=task,
                               dedup=False)
    assert len(out) == 1 + n, task


def test_bad_settings(tokenizer, both):
  for kwargs, match in [({"p_t": 1.5}, "p_t"), ({"k": 0}, "k"), ({"n_aug": -1}, "n_aug"),
                        ({"fields": ("label",)}, "fields"),
                        ({"fields": ("text_a", "text_a")}, "fields"),
                        ({"mlm_context": "pair"}, "mlm_context")]:
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
  assert first_mlm.calls and len(first) > 2
  assert first == aug.augment_examples(examples, tokenizer, PlantedMLM(tokenizer, ["red", "blue"]),
                                       table, n_aug=3)
  header = json.loads(path.read_text().splitlines()[0])
  assert header["settings"]["n_aug"] == 3 and header["settings"]["p_t"] == 0.4
  assert {"k", "seed", "vocab", "examples", "embeddings"} <= set(header["settings"])
  assert [p.name for p in path.parent.iterdir()] == ["aug.jsonl"]     # no temporary left

  again = PlantedMLM(tokenizer, ["red", "blue"])
  assert build(again) == first and not again.calls
  assert isinstance(first[-1].label, float) and first[0].text_b == TEXT_B

  for change in ({"p_t": 0.9}, {"seed": 3}, {"k": 4}, {"examples": examples[:1]},
                 {"teacher": "teacher-2"}, {"dedup": False}, {"separate_fields": False},
                 {"stop_words": ()}, {"mlm_context": "masked"}):
    mlm = PlantedMLM(tokenizer, ["red", "blue"])
    rebuilt = build(mlm, **change)
    assert mlm.calls, change
    reused = PlantedMLM(tokenizer, ["red", "blue"])
    assert build(reused, **change) == rebuilt and not reused.calls

  path.write_text("not json\n")
  mlm = PlantedMLM(tokenizer, ["red", "blue"])
  assert build(mlm) == first and mlm.calls

  # A version-1 cache (both fields changed in every copy, no stop words, no de-duplication)
  # with otherwise matching settings is rebuilt, not reused.
  lines = path.read_text().splitlines()
  old = json.loads(lines[0])
  old["version"] = 1
  for key in ("stop_words", "dedup", "separate_fields", "mlm_context"):
    del old["settings"][key]
  path.write_text("\n".join([json.dumps(old)] + lines[1:2]) + "\n")
  mlm = PlantedMLM(tokenizer, ["red", "blue"])
  assert build(mlm) == first and mlm.calls
  assert json.loads(path.read_text().splitlines()[0])["version"] == aug.CACHE_VERSION == 2

  # N_a from the task when n_aug is not given
  by_task = aug.load_or_augment(tmp_path / "mnli.jsonl", examples, tokenizer,
                                PlantedMLM(tokenizer, ["red", "blue"]), table, task="mnli")
  assert json.loads((tmp_path / "mnli.jsonl").read_text().splitlines()[0])[
      "settings"]["n_aug"] == 10
  assert len(by_task) > len(first)


def test_mlm_predict_fn_with_a_real_model(tokenizer):
  config = get_preset("mobilebert", tiny_variant=True, vocab_size=len(tokenizer))
  model = build_model(config, "pretraining")
  params = init_params(model, config, jax.random.PRNGKey(0))
  predict = aug.mlm_predict_fn(model, params)
  assert predict.max_positions == config.max_position_embeddings   # caps max_seq_length
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
  assert 1 <= len(out) <= 5 and all(o.text_a.endswith(".") for o in out)
  with pytest.raises(ValueError, match="MLM head"):
    aug.mlm_predict_fn(build_model(config, "classification"), params)
