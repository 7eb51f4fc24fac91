"""Robustness to adversarial word substitution (in the style of TextFooler and BERT-Attack).

For every example the model classifies correctly: rank its words by importance (the drop of the
true-class probability when the word is deleted, or replaced by [UNK]); then, most important
first, try the word's K nearest neighbours (cosine, in a token-embedding matrix, among the whole
words of the vocabulary) and keep the one that lowers the true-class probability most; stop when
the prediction flips (success) or the budget of changed words is spent (failure).

  predict_text = text_predictor(tokenizer, predict_fn(model, params), max_seq_length=128)
  embeddings = params["backbone"]["embeddings"]["word_embeddings"]["embedding"]
  vocab = tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size))
  records, summary = attack(examples, predict_text, embeddings, vocab)
  write_results(workdir, attack_summary=summary, records=records)

The attack only sees `predict_text(list[GlueExample]) -> probabilities [N, C]`, so it works for
any model; texts are re-tokenised after each substitution (a substitute may span several pieces).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from etils import epath

from mobilebert_jax.downstream.glue_data import GlueExample, encode_examples
from mobilebert_jax.downstream.loyalty import Predictor, batched_logits, softmax

PredictText = Callable[[Sequence[GlueExample]], np.ndarray]

# Function words neither attacked nor used as substitutes (as TextFooler's stop-word filter).
STOP_WORDS = frozenset("""
    a about after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has
    have having he her here hers herself him himself his how i if in into is it its itself just me
    more most my myself no nor not now of off on once only or other our ours ourselves out over own
    same she should so some such than that the their theirs them themselves then there these they
    this those through to too under until up very was we were what when where which while who whom
    why will with would you your yours yourself yourselves
""".split())

_SPACE = re.compile(r"(\s+)")
_WORD = re.compile(r"(\W*)([^\W\d_]+)(\W*)")  # punctuation, letters, punctuation


def _is_whole_word(token: str) -> bool:
  """A WordPiece token usable as a word: alphabetic, not a '##' continuation, not special."""
  return token.isalpha()  # excludes '##x', '[UNK]', '[unused0]', digits and punctuation


class WordNeighbours:
  """Cosine nearest neighbours among the whole words of a vocabulary.

  `embeddings`: [V, D] token-embedding matrix (numpy or jax); `id_to_token`: the vocabulary as a
  sequence indexed by id or a mapping id -> token. Words whose token is in `skip_words`
  (lower-cased) are never returned.
  """

  def __init__(self, embeddings, id_to_token: Sequence[str] | Mapping[int, str],
               skip_words: Iterable[str] = STOP_WORDS):
    table = np.asarray(embeddings, np.float32)
    if table.ndim != 2:
      raise ValueError(f"embeddings must be a [vocab, dim] matrix, got shape {table.shape}")
    skip = {w.lower() for w in skip_words}
    items = id_to_token.items() if isinstance(id_to_token, Mapping) else enumerate(id_to_token)
    self.words: list[str] = []
    rows: list[int] = []
    for i, token in items:
      i = int(i)
      if not 0 <= i < len(table):
        raise ValueError(f"token {token!r} has id {i}, outside the embedding matrix's "
                         f"{len(table)} rows: do the vocabulary and the embeddings match?")
      if _is_whole_word(token) and token.lower() not in skip:
        self.words.append(token)
        rows.append(i)
    if not self.words:
      raise ValueError("the vocabulary holds no whole words (alphabetic tokens without '##')")
    vectors = table[rows]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    self._unit = vectors / np.maximum(norms, 1e-12)
    self._index = {w: n for n, w in enumerate(self.words)}
    self._cache: dict[tuple, list[str]] = {}

  def lookup(self, word: str) -> str | None:
    """The vocabulary word for `word` (as is, else lower-cased), or None."""
    for key in (word, word.lower()):
      if key in self._index:
        return key
    return None

  def neighbours(self, word: str, k: int, min_similarity: float | None = None) -> list[str]:
    """Up to `k` words nearest to `word` by cosine similarity, nearest first (ties by id), with
    similarity >= `min_similarity` if given; [] for a word outside the vocabulary."""
    key = self.lookup(word)
    if key is None or k < 1:
      return []
    cache_key = (key, k, min_similarity)
    if cache_key not in self._cache:
      similarity = self._unit @ self._unit[self._index[key]]
      found = []
      for j in np.argsort(-similarity, kind="stable"):
        if len(found) == k or (min_similarity is not None and similarity[j] < min_similarity):
          break
        if self.words[j].lower() != key.lower():
          found.append(self.words[j])
      self._cache[cache_key] = found
    return list(self._cache[cache_key])


@dataclasses.dataclass(frozen=True)
class AttackRecord:
  """The outcome for one example. `adversarial` is the last perturbed text (the original when
  `skipped`, i.e. the model got it wrong and it was not attacked); `num_words` counts the words
  of the attacked text(s); `num_queries` the texts scored while attacking it."""
  original: GlueExample
  adversarial: GlueExample
  label: int
  original_prediction: int
  adversarial_prediction: int
  num_words: int
  num_changed: int
  success: bool
  skipped: bool
  num_queries: int

  @property
  def perturbed_fraction(self) -> float:
    return self.num_changed / self.num_words if self.num_words else 0.0

  def to_json(self) -> dict:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name not in ("original", "adversarial")}
    out.update(guid=self.original.guid, original_text_a=self.original.text_a,
               original_text_b=self.original.text_b, adversarial_text_a=self.adversarial.text_a,
               adversarial_text_b=self.adversarial.text_b,
               perturbed_fraction=self.perturbed_fraction)
    return out


def _query(predict_text: PredictText, examples: list[GlueExample]) -> np.ndarray:
  probs = np.asarray(predict_text(examples), np.float64)
  if probs.ndim != 2 or probs.shape[0] != len(examples):
    raise ValueError(f"predict_text must return probabilities [{len(examples)}, C] for "
                     f"{len(examples)} examples, got shape {probs.shape}")
  return probs


def _match_case(word: str, like: str) -> str:
  if word != word.lower():
    return word  # a cased vocabulary's own spelling
  if len(like) > 1 and like.isupper():
    return word.upper()
  return word.capitalize() if like[:1].isupper() else word


class _Text:
  """An example's attacked fields as alternating word / whitespace parts (spacing kept)."""

  def __init__(self, example: GlueExample, fields: tuple[str, ...]):
    self.example = example
    self.parts = {f: _SPACE.split(getattr(example, f)) for f in fields}
    self.slots = [(f, i) for f in fields for i in range(0, len(self.parts[f]), 2)
                  if self.parts[f][i]]

  def core(self, slot) -> re.Match | None:
    return _WORD.fullmatch(self.parts[slot[0]][slot[1]])

  def with_part(self, slot, value: str) -> GlueExample:
    field, i = slot
    parts = list(self.parts[field])
    parts[i] = value
    return dataclasses.replace(self.example, **{field: "".join(parts)})

  def set(self, slot, value: str) -> None:
    self.parts[slot[0]][slot[1]] = value
    self.example = self.with_part(slot, value)


def _substitute(match: re.Match, word: str) -> str:
  prefix, core, suffix = match.groups()
  return prefix + _match_case(word, core) + suffix


def _attack_one(example: GlueExample, clean: np.ndarray, predict_text: PredictText,
                neighbours: WordNeighbours, fields: tuple[str, ...], k: int,
                min_similarity: float | None, max_fraction: float, importance: str,
                unk_token: str) -> tuple[GlueExample, int, int, int, int, bool]:
  """(adversarial example, prediction, words, words changed, queries, success)."""
  label = example.label
  text = _Text(example, fields)
  budget = math.floor(max_fraction * len(text.slots) + 1e-9)
  candidates = {}
  for slot in text.slots:
    match = text.core(slot)
    found = neighbours.neighbours(match.group(2), k, min_similarity) if match else []
    if found:
      candidates[slot] = found
  prediction, changed, queries = label, 0, 0
  if budget == 0 or not candidates:
    return text.example, prediction, len(text.slots), changed, queries, False
  slots = list(candidates)
  blanked = [text.with_part(s, "" if importance == "delete" else unk_token) for s in slots]
  current = float(clean[label])
  drops = current - _query(predict_text, blanked)[:, label]
  queries += len(blanked)
  for n in np.argsort(-drops, kind="stable"):  # most important first, ties by position
    slot = slots[n]
    match = text.core(slot)
    swaps = [_substitute(match, word) for word in candidates[slot]]
    probs = _query(predict_text, [text.with_part(slot, s) for s in swaps])
    queries += len(swaps)
    true = probs[:, label]
    flipped = probs.argmax(axis=1) != label
    pool = np.flatnonzero(flipped) if flipped.any() else np.arange(len(swaps))
    best = pool[np.argmin(true[pool])]  # nearest neighbour first among ties
    if not flipped[best] and true[best] >= current:
      continue  # no substitute helps: keep the word, spend no budget
    text.set(slot, swaps[best])
    changed += 1
    current = float(true[best])
    prediction = int(probs[best].argmax())
    if flipped[best]:
      return text.example, prediction, len(text.slots), changed, queries, True
    if changed >= budget:
      break
  return text.example, prediction, len(text.slots), changed, queries, False


def attack(examples: Sequence[GlueExample], predict_text: PredictText, embeddings,
           id_to_token: Sequence[str] | Mapping[int, str], *, k: int = 50,
           max_fraction: float = 0.3, attack_text_b: bool = False,
           importance: str = "delete", min_similarity: float | None = None,
           skip_words: Iterable[str] = STOP_WORDS, unk_token: str = "[UNK]"
           ) -> tuple[list[AttackRecord], dict[str, float]]:
  """Greedy word-substitution attack on the correctly classified `examples`.

  Args:
    examples: labelled classification examples (integer labels).
    predict_text: examples -> class probabilities [N, C] (e.g. from `text_predictor`).
    embeddings, id_to_token: token-embedding matrix [V, D] and its vocabulary (see
      `WordNeighbours`); candidates are a word's `k` nearest whole words by cosine similarity
      (at least `min_similarity` if given).
    max_fraction: at most floor(max_fraction * words) words of an example are changed.
    attack_text_b: also substitute words of `text_b` (pairs); the budget then counts both.
    importance: "delete" (drop the word) or "unk" (replace it by `unk_token`) to rank words.
    skip_words: words never attacked nor used as substitutes (default: English stop words).

  Returns:
    (one `AttackRecord` per example, `summarize(records)`).
  """
  if not examples:
    raise ValueError("attack got no examples")
  if not 0.0 < max_fraction <= 1.0:
    raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
  if k < 1:
    raise ValueError(f"k (candidates per word) must be positive, got {k}")
  if importance not in ("delete", "unk"):
    raise ValueError(f"importance must be 'delete' or 'unk', got {importance!r}")
  for ex in examples:
    if isinstance(ex.label, bool) or not isinstance(ex.label, (int, np.integer)):
      raise ValueError(f"example {ex.guid!r} has label {ex.label!r}; the attack needs integer "
                       "class labels (not unlabelled or regression examples)")
    if attack_text_b and ex.text_b is None:
      raise ValueError(f"attack_text_b=True but example {ex.guid!r} has no text_b")
  neighbours = WordNeighbours(embeddings, id_to_token, skip_words)
  fields = ("text_a", "text_b") if attack_text_b else ("text_a",)
  examples = list(examples)
  clean = _query(predict_text, examples)
  bad = [ex.guid for ex in examples if not 0 <= ex.label < clean.shape[1]]
  if bad:
    raise ValueError(f"examples {bad[:5]} have labels outside 0..{clean.shape[1] - 1}")
  records = []
  for ex, probs in zip(examples, clean):
    predicted = int(probs.argmax())
    if predicted != ex.label:
      words = len(_Text(ex, fields).slots)
      records.append(AttackRecord(ex, ex, int(ex.label), predicted, predicted, words, 0,
                                  success=False, skipped=True, num_queries=0))
      continue
    adversarial, prediction, words, changed, queries, success = _attack_one(
        ex, probs, predict_text, neighbours, fields, k, min_similarity, max_fraction, importance,
        unk_token)
    records.append(AttackRecord(ex, adversarial, int(ex.label), predicted, prediction, words,
                                changed, success=success, skipped=False, num_queries=queries))
  return records, summarize(records)


def summarize(records: Sequence[AttackRecord]) -> dict[str, float]:
  """Clean accuracy, accuracy under attack, attack success rate (successes / originally correct
  examples), mean perturbed-word fraction and mean queries (both over successful attacks; NaN
  when there is none), and the counts."""
  if not records:
    raise ValueError("summarize got no records")
  n = len(records)
  correct = sum(not r.skipped for r in records)
  successes = [r for r in records if r.success]
  nan = float("nan")
  return {
      "num_examples": n,
      "num_correct": correct,
      "num_successful": len(successes),
      "clean_accuracy": correct / n,
      "accuracy_under_attack": (correct - len(successes)) / n,
      "success_rate": len(successes) / correct if correct else nan,
      "mean_perturbed_fraction": (float(np.mean([r.perturbed_fraction for r in successes]))
                             if successes else nan),
      "mean_queries": float(np.mean([r.num_queries for r in successes])) if successes else nan,
  }


def text_predictor(tokenizer, predict: Predictor, max_seq_length: int,
                   batch_size: int = 32) -> PredictText:
  """`predict_text` for a tokenizer and a batch predictor (e.g. `loyalty.predict_fn`): encodes
  with `encode_examples` and returns float64 softmax probabilities [N, C]."""

  def predict_text(examples: Sequence[GlueExample]) -> np.ndarray:
    arrays = encode_examples(list(examples), tokenizer, max_seq_length)
    return softmax(batched_logits(predict, arrays, batch_size))

  return predict_text


def write_results(path: str | os.PathLike, attack_summary: Mapping[str, float] | None = None,
                  loyalty: Mapping[str, float] | None = None,
                  records: Sequence[AttackRecord] | None = None) -> dict:
  """Merges `attack_<key>` (from `summarize`) and `loyalty_<label|probability>` (from
  `evaluate_loyalty`) into `eval_results.json` (`path` is the file or its directory; the file is
  created if missing, other keys are kept). `records` go to `attack_examples.jsonl` beside it.
  Returns the merged results. Local or remote (gs://...) paths, through `etils.epath`."""
  path = epath.Path(path)
  if path.is_dir():
    path = path / "eval_results.json"
  results = {}
  if path.exists():
    try:
      results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(results, dict):
      raise ValueError(f"{path}: expected a JSON object of metrics, got {type(results).__name__}")
  for key, value in (attack_summary or {}).items():
    results[f"attack_{key}"] = value
  for key, value in (loyalty or {}).items():
    results[f"loyalty_{key.removesuffix('_loyalty')}"] = value
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
  tmp.write_text(json.dumps(results, indent=2, sort_keys=True), encoding="utf-8")
  tmp.replace(path)
  if records is not None:
    with (path.parent / "attack_examples.jsonl").open("w", encoding="utf-8") as f:
      for record in records:
        f.write(json.dumps(record.to_json()) + "\n")
  return results
