"""Robustness to adversarial word substitution: TextFooler (Jin et al., AAAI 2020, "Is BERT
Really Robust? A Strong Baseline for Natural Language Attack on Text Classification and
Entailment"), the attack with which Xu et al. (EMNLP 2021, "Beyond Preserved Accuracy:
Evaluating Loyalty and Robustness of BERT Compression") measure the robustness of compressed
BERTs.

For every example the model classifies correctly:
  1. Word importance: the drop of the true-class probability when the word is deleted (or
     replaced by [UNK]), plus, when that changes the prediction to y', the rise of P(y')
     (Jin et al., Eq. 2). Every word is scored; stop words are then never substituted.
  2. Most important word first, candidates are its `k` = 50 nearest neighbours with cosine
     >= 0.5 in a word-embedding space (counter-fitted vectors in TextFooler; here a GloVe /
     word2vec text file, or the model's own whole-word token embeddings).
  3. Each candidate text is scored by the model and checked: sentence similarity (the sentence
     encoder's similarity between a 15-word window around the word in the current text and in
     the candidate text must reach 0.7; TextFooler uses the Universal Sentence Encoder) and,
     given a tagger, the part of speech.
  4. If valid candidates flip the prediction, the most similar one is kept: success. Otherwise
     the valid candidate with the lowest true-class probability replaces the word if that
     probability is below the original text's, and the next word is tried. Failure when the
     words run out (or the optional budget of changed words is spent).

The details are those of the authors' release (jind11/TextFooler, `attack_classification.py`;
its defaults: synonym_num=50, cosine 0.5, sim_score_threshold=0.7, sim_score_window=15,
data_size=1000, no budget of changed words):
  - the window holds the (window - 1) // 2 words each side of the substituted one, shifted
    to stay inside the text, and is compared with the same window of the text *before* this
    substitution (the current adversarial text, not the original);
  - texts shorter than the window are compared whole, with the threshold lowered to 0.1;
  - similarity is USE's angular score 1 - arccos(cos) (`metric="cosine"`: plain cosine);
  - the part of speech of a candidate is tagged in its 9-word context (the whole text up to 10
    words), NOUN and VERB may replace each other (universal tags);
  - for a sentence pair the hypothesis (`text_b`) is attacked (`attack_nli.py`).
Deliberate differences: importance deletes the word by default, as the paper defines it (the
release writes '<oov>' in its place; `importance="unk"` is the nearest); substitutes are never
stop words (the release only keeps stop words from being replaced); a window of a text shorter
than it starts at 0 (the release's slice start can go negative and wrap around); words are the
whitespace-separated parts of the text, their surrounding punctuation and case kept (the
release lower-cases and splits off punctuation); the release's minimum importance (-1, which
every word passes) is not a parameter.

  predict_text = text_predictor(tokenizer, predict_fn(model, params), max_seq_length=128)
  words, vectors = read_word_vectors("counter-fitted-vectors.txt")
  check = SentenceCheck(load_sentence_encoder("all-MiniLM-L6-v2/"))
  records, summary = attack(examples, predict_text, vectors, words, sentence_check=check)
  write_results(workdir, attack_summary=summary, records=records)

The attack only sees `predict_text(list[GlueExample]) -> probabilities [N, C]` and
`encode(list[str]) -> [N, D]`, so it works for any model and any sentence encoder; texts are
re-tokenised after each substitution (a substitute may span several pieces).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from etils import epath

from mobilebert_jax.downstream.glue_data import GlueExample, encode_examples
from mobilebert_jax.downstream.loyalty import Predictor, batched_logits, softmax

log = logging.getLogger(__name__)

PredictText = Callable[[Sequence[GlueExample]], np.ndarray]
Encode = Callable[[Sequence[str]], np.ndarray]          # texts -> sentence embeddings [N, D]
PosTagger = Callable[[Sequence[str]], Sequence[str]]    # words -> one universal POS tag each

# TextFooler's stop words (the release's criteria.get_stopwords, 266 words): never substituted.
STOP_WORDS = frozenset("""
    a about above across after afterwards again against ain all almost alone along already also
    although am among amongst an and another any anyhow anyone anything anyway anywhere are aren
    aren't around as at back been before beforehand behind being below beside besides between
    beyond both but by can cannot could couldn couldn't d didn didn't doesn doesn't don don't
    down due during either else elsewhere empty enough even ever everyone everything everywhere
    except first for former formerly from hadn hadn't hasn hasn't haven haven't he hence her
    here hereafter hereby herein hereupon hers herself him himself his how however hundred i if
    in indeed into is isn isn't it it's its itself just latter latterly least ll may me
    meanwhile mightn mightn't mine more moreover most mostly must mustn mustn't my myself namely
    needn needn't neither never nevertheless next no nobody none noone nor not nothing now
    nowhere o of off on once one only onto or other others otherwise our ours ourselves out over
    per please s same shan shan't she she's should've shouldn shouldn't somehow something
    sometime somewhere such t than that that'll the their theirs them themselves then thence
    there thereafter thereby therefore therein thereupon these they this those through
    throughout thru thus to too toward towards under unless until up upon used ve was wasn
    wasn't we were weren weren't what whatever when whence whenever where whereafter whereas
    whereby wherein whereupon wherever whether which while whither who whoever whole whom whose
    why with within without won won't would wouldn wouldn't y yet you you'd you'll you're you've
    your yours yourself yourselves
""".split())

FIELDS = ("auto", "text_a", "text_b", "both")
METRICS = ("angular", "cosine")
# The release's POS filter: equal universal tags, or a noun and a verb.
_INTERCHANGEABLE_TAGS = frozenset({"NOUN", "VERB"})

_SPACE = re.compile(r"(\s+)")
_WORD = re.compile(r"(\W*)([^\W\d_]+)(\W*)")  # punctuation, letters, punctuation


def _is_whole_word(token: str) -> bool:
  """A WordPiece token usable as a word: alphabetic, not a '##' continuation, not special."""
  return token.isalpha()  # excludes '##x', '[UNK]', '[unused0]', digits and punctuation


class WordNeighbours:
  """Cosine nearest neighbours among the whole words of a vocabulary.

  `embeddings`: [V, D] embedding matrix (numpy or jax), e.g. a model's token embeddings or the
  vectors of `read_word_vectors`; `id_to_token`: the vocabulary as a sequence indexed by id or
  a mapping id -> token. Words whose token is in `skip_words` (lower-cased) are never returned.
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


def read_word_vectors(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
  """(words, vectors [V, D] float32) from a text file of "word v1 v2 ... vD" lines: GloVe,
  word2vec text format (its "count dim" header line is skipped) or TextFooler's counter-fitted
  vectors (Mrksic et al., 2016). A repeated word keeps its first vector."""
  words: list[str] = []
  rows: list[np.ndarray] = []
  seen: set[str] = set()
  dim = None
  with epath.Path(path).open("r", encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      fields = line.split()
      if not fields or (n == 1 and len(fields) == 2 and all(x.isdigit() for x in fields)):
        continue
      word, values = fields[0], fields[1:]
      dim = len(values) if dim is None else dim
      if not values or len(values) != dim:
        raise ValueError(f"{path} line {n}: {len(values)} values after {word!r}, expected "
                         f"{dim or 'at least 1'} (one 'word v1 v2 ...' per line)")
      if word in seen:
        continue
      try:
        rows.append(np.array(values, np.float32))
      except ValueError:
        raise ValueError(f"{path} line {n}: the values after {word!r} are not all "
                         "numbers") from None
      seen.add(word)
      words.append(word)
  if not words:
    raise ValueError(f"{path}: no word vectors")
  return words, np.stack(rows)


@dataclasses.dataclass(frozen=True)
class SentenceCheck:
  """TextFooler's sentence-similarity constraint around a substituted word.

  `encode(texts) -> [N, D]` embeds texts (e.g. `load_sentence_encoder`). A candidate is valid
  when the similarity of the `window` words around the substituted word in the current text and
  in the candidate text is >= `threshold`; texts shorter than `window` are compared whole with
  `short_text_threshold` (the release's 0.1, i.e. hardly checked). `metric`: "angular" (USE's
  1 - arccos(cos), as the release) or "cosine".
  """
  encode: Encode
  threshold: float = 0.7
  window: int = 15
  short_text_threshold: float = 0.1
  metric: str = "angular"

  def __post_init__(self):
    if self.metric not in METRICS:
      raise ValueError(f"sentence similarity metric must be one of {METRICS}, got {self.metric!r}")
    if self.window < 1:
      raise ValueError(f"the sentence window must be at least 1 word, got {self.window}")

  def window_bounds(self, length: int, position: int) -> tuple[int, int]:
    """[start, end) of the window around word `position` of a `length`-word text: (window-1)//2
    words each side, shifted to stay inside the text (the start clamped at 0)."""
    half = (self.window - 1) // 2
    left, right = position >= half, length - position - 1 >= half
    if left and right:
      return position - half, position + half + 1
    if right:
      return 0, min(self.window, length)
    if left:
      return max(length - self.window, 0), length
    return 0, length

  def threshold_for(self, length: int) -> float:
    return self.threshold if length >= self.window else self.short_text_threshold

  def similarities(self, words: Sequence[str], position: int,
                   substitutes: Sequence[str]) -> np.ndarray:
    """Similarity [len(substitutes)] of the window around `position` in `words` with the same
    window once `words[position]` is replaced by each substitute."""
    start, end = self.window_bounds(len(words), position)
    before, after = list(words[start:position]), list(words[position + 1:end])
    texts = [" ".join(words[start:end])] + [" ".join(before + [s] + after) for s in substitutes]
    vectors = np.asarray(self.encode(texts), np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
      raise ValueError(f"a sentence encoder must return embeddings [{len(texts)}, D] for "
                       f"{len(texts)} texts, got shape {vectors.shape}")
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    cosine = np.clip(unit[1:] @ unit[0], -1.0, 1.0)
    return 1.0 - np.arccos(cosine) if self.metric == "angular" else cosine


def load_sentence_encoder(path: str | os.PathLike, *, max_seq_length: int = 128,
                          batch_size: int = 32) -> Encode:
  """`encode(texts) -> [N, D]`: mean-pooled last-layer token embeddings (over the attention
  mask, as sentence-transformers' mean pooling) of a local checkpoint directory: a Hugging Face
  BERT-family one (e.g. sentence-transformers/all-MiniLM-L6-v2) or a native one, with its
  tokenizer files. Offline: nothing is downloaded. Batches hold `batch_size` rows and are padded
  to a power of two (at least 16) up to `max_seq_length`, so few shapes compile."""
  import jax.numpy as jnp

  from mobilebert_jax.compilation import jit_inference
  from mobilebert_jax.data.tokenizer import load_tokenizer
  from mobilebert_jax.pretrained import load_pretrained

  if not epath.Path(path).is_dir():
    raise FileNotFoundError(f"sentence encoder {str(path)!r}: no such checkpoint directory (a "
                            "local Hugging Face BERT-family or native checkpoint directory)")
  model, params = load_pretrained(os.fspath(path), "base")
  tokenizer = load_tokenizer(path, do_lower_case=_do_lower_case(path))

  @jit_inference
  def pooled(params, input_ids, attention_mask, token_type_ids):
    hidden = model.apply({"params": params}, input_ids, attention_mask,
                         token_type_ids).last_hidden_state
    mask = attention_mask[..., None].astype(hidden.dtype)
    return (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)

  def encode(texts: Sequence[str]) -> np.ndarray:
    texts = list(texts)
    if not texts:
      raise ValueError("encode got no texts")
    enc = tokenizer(texts, truncation=True, max_length=max_seq_length)
    longest = max(len(ids) for ids in enc["input_ids"])
    length = min(max_seq_length, max(16, 1 << (longest - 1).bit_length()))
    arrays = {k: np.zeros((len(texts), length), np.int32)
              for k in ("input_ids", "attention_mask", "token_type_ids")}
    for row, ids in enumerate(enc["input_ids"]):
      arrays["input_ids"][row, :len(ids)] = ids
      arrays["attention_mask"][row, :len(ids)] = 1
    return batched_logits(lambda b: np.asarray(pooled(params, b["input_ids"],
                                                      b["attention_mask"],
                                                      b["token_type_ids"]), np.float32),
                          arrays, batch_size)

  return encode


def _do_lower_case(path) -> bool:
  config = epath.Path(path) / "tokenizer_config.json"
  if config.is_file():
    return bool(json.loads(config.read_text(encoding="utf-8")).get("do_lower_case", True))
  return True


def load_pos_tagger(spec: str) -> PosTagger | None:
  """The tagger named "package.module:function": `function(words) -> tags`, one universal POS
  tag (NOUN, VERB, ADJ, ...) per word, e.g. a wrapper of `nltk.pos_tag(words,
  tagset="universal")` as TextFooler uses; None (logged: no POS check) when `spec` is empty."""
  if not spec:
    log.warning("attack: no POS tagger given (robustness.pos_tagger): the part-of-speech check "
                "is not applied")
    return None
  module, _, name = spec.partition(":")
  if not module or not name:
    raise ValueError(f"POS tagger {spec!r}: expected 'package.module:function'")
  tagger = getattr(importlib.import_module(module), name, None)
  if not callable(tagger):
    raise ValueError(f"POS tagger {spec!r}: {module} has no function {name!r}")
  return tagger


def synonym_space(word_vectors: str, embeddings, id_to_token
                  ) -> tuple[np.ndarray, Sequence[str] | Mapping[int, str]]:
  """(vectors, words) the synonyms come from: the `word_vectors` file when given (TextFooler:
  counter-fitted vectors), else `embeddings` / `id_to_token`, a model's own token embeddings
  (whole words only), which the log says."""
  if word_vectors:
    words, vectors = read_word_vectors(word_vectors)
    log.info("attack: synonyms from %s (%d words, dimension %d)", word_vectors, len(words),
             vectors.shape[1])
    return vectors, words
  log.warning("attack: no word vectors given (robustness.word_vectors): synonyms are nearest "
              "neighbours in the model's own token embeddings (whole-word tokens), not "
              "TextFooler's counter-fitted vectors")
  return np.asarray(embeddings), id_to_token


def build_sentence_check(sentence_encoder: str, **options) -> SentenceCheck | None:
  """`SentenceCheck(load_sentence_encoder(sentence_encoder), **options)`, or None (logged: the
  check is skipped) when `sentence_encoder` is empty."""
  if not sentence_encoder:
    log.warning("attack: no sentence encoder given (robustness.sentence_encoder): the "
                "sentence-similarity check is skipped")
    return None
  log.info("attack: sentence similarity from %s, %s", sentence_encoder, options)
  return SentenceCheck(load_sentence_encoder(sentence_encoder), **options)


@dataclasses.dataclass(frozen=True)
class AttackRecord:
  """The outcome for one example. `adversarial` is the last perturbed text (the original when
  `skipped`, i.e. the model got it wrong and it was not attacked); `num_words` counts the words
  of the attacked text(s); `num_queries` the texts the model scored for it (the original, one
  per word for the importance, one per candidate), as TextFooler counts them."""
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
    self.position = {}  # slot -> its index among the words of its field
    for f in fields:
      for n, slot in enumerate(s for s in self.slots if s[0] == f):
        self.position[slot] = n

  def core(self, slot) -> re.Match | None:
    return _WORD.fullmatch(self.parts[slot[0]][slot[1]])

  def words(self, field: str) -> list[str]:
    return [p for p in self.parts[field][::2] if p]

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


def _tag_at(pos_tag: PosTagger, words: Sequence[str], position: int) -> str:
  """The tag of `words[position]`, tagged within its 9-word context (whole texts of up to 10
  words), as the release."""
  start = max(position - 4, 0) if len(words) > 10 else 0
  end = position + 5 if len(words) > 10 else len(words)
  tags = list(pos_tag(list(words[start:end])))
  if len(tags) != end - start:
    raise ValueError(f"a POS tagger must return one tag per word: {end - start} words, "
                     f"{len(tags)} tags")
  return tags[position - start]


def _pos_match(original: str, tags: Sequence[str]) -> np.ndarray:
  return np.array([t == original or {t, original} <= _INTERCHANGEABLE_TAGS for t in tags])


def _fields_of(example: GlueExample, fields: str) -> tuple[str, ...]:
  if fields == "auto":
    return ("text_a",) if example.text_b is None else ("text_b",)
  return ("text_a", "text_b") if fields == "both" else (fields,)


def _attack_one(example: GlueExample, clean: np.ndarray, predict_text: PredictText,
                neighbours: WordNeighbours, fields: tuple[str, ...], k: int,
                min_similarity: float | None, max_fraction: float, importance: str,
                unk_token: str, skip: frozenset, check: SentenceCheck | None,
                pos_tag: PosTagger | None) -> tuple[GlueExample, int, int, int, int, bool]:
  """(adversarial example, prediction, words, words changed, queries, success)."""
  label = example.label
  text = _Text(example, fields)
  budget = math.floor(max_fraction * len(text.slots) + 1e-9)
  prediction, changed, queries = label, 0, 1  # the original text's prediction
  if budget == 0 or not text.slots:
    return text.example, prediction, len(text.slots), changed, queries, False
  # Importance (Jin et al., Eq. 2) of every word: P_y(x) - P_y(x without w), plus
  # P_y'(x without w) - P_y'(x) when the prediction moves to y'.
  blanked = [text.with_part(s, "" if importance == "delete" else unk_token) for s in text.slots]
  probs = _query(predict_text, blanked)
  queries += len(blanked)
  moved = probs.argmax(axis=1)
  rows = np.arange(len(blanked))
  scores = (clean[label] - probs[:, label]
            + (moved != label) * (probs[rows, moved] - clean[moved]))
  original_words = {f: text.words(f) for f in fields}
  original_prob = float(clean[label])
  for n in np.argsort(-scores, kind="stable"):  # most important first, ties by position
    slot = text.slots[n]
    match = text.core(slot)
    if match is None or match.group(2).lower() in skip:
      continue
    candidates = neighbours.neighbours(match.group(2), k, min_similarity)
    if not candidates:
      continue
    swaps = [_substitute(match, word) for word in candidates]
    probs = _query(predict_text, [text.with_part(slot, s) for s in swaps])
    queries += len(swaps)
    field, position = slot[0], text.position[slot]
    words = text.words(field)
    valid = np.ones(len(swaps), bool)
    similarity = np.ones(len(swaps))
    if check is not None:
      similarity = check.similarities(words, position, swaps)
      valid &= similarity >= check.threshold_for(len(words))
    if pos_tag is not None:
      original_tag = _tag_at(pos_tag, original_words[field], position)
      valid &= _pos_match(original_tag, [
          _tag_at(pos_tag, words[:position] + [s] + words[position + 1:], position)
          for s in swaps])
    true = probs[:, label]
    winners = valid & (probs.argmax(axis=1) != label)
    if winners.any():  # the most similar valid flip (nearest neighbour first among ties)
      best = int(np.argmax(np.where(winners, similarity, -np.inf)))
      text.set(slot, swaps[best])
      return (text.example, int(probs[best].argmax()), len(text.slots), changed + 1, queries,
              True)
    penalised = true + ~valid  # invalid candidates are never kept
    best = int(np.argmin(penalised))
    if penalised[best] < original_prob:  # the release compares with the original text
      text.set(slot, swaps[best])
      changed += 1
      prediction = int(probs[best].argmax())
      if changed >= budget:
        break
  return text.example, prediction, len(text.slots), changed, queries, False


def attack(examples: Sequence[GlueExample], predict_text: PredictText, embeddings,
           id_to_token: Sequence[str] | Mapping[int, str], *, k: int = 50,
           min_similarity: float | None = 0.5, max_fraction: float = 1.0, fields: str = "auto",
           importance: str = "delete", sentence_check: SentenceCheck | None = None,
           pos_tag: PosTagger | None = None, skip_words: Iterable[str] = STOP_WORDS,
           unk_token: str = "[UNK]") -> tuple[list[AttackRecord], dict[str, float]]:
  """TextFooler on the correctly classified `examples` (defaults: the release's).

  Args:
    examples: labelled classification examples (integer labels).
    predict_text: examples -> class probabilities [N, C] (e.g. from `text_predictor`).
    embeddings, id_to_token: word-embedding matrix [V, D] and its vocabulary (see
      `WordNeighbours`); candidates are a word's `k` nearest whole words with cosine similarity
      >= `min_similarity` (None: no threshold).
    max_fraction: at most floor(max_fraction * words) words of an example are changed (1.0:
      no budget, as TextFooler).
    fields: the text attacked: "auto" (`text_b`, the hypothesis, of a pair, as TextFooler's NLI
      attack; `text_a` of a single sentence), "text_a", "text_b" or "both".
    importance: "delete" (drop the word, Jin et al.'s definition) or "unk" (replace it by
      `unk_token`, as the release's '<oov>') to rank the words.
    sentence_check: the sentence-similarity constraint; None skips it.
    pos_tag: words -> universal POS tags; candidates must keep the word's tag (NOUN and VERB
      interchangeable). None skips the check.
    skip_words: words never substituted nor used as substitutes (TextFooler's stop words).

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
  if fields not in FIELDS:
    raise ValueError(f"fields must be one of {FIELDS}, got {fields!r}")
  for ex in examples:
    if isinstance(ex.label, bool) or not isinstance(ex.label, (int, np.integer)):
      raise ValueError(f"example {ex.guid!r} has label {ex.label!r}; the attack needs integer "
                       "class labels (not unlabelled or regression examples)")
    if fields in ("text_b", "both") and ex.text_b is None:
      raise ValueError(f"fields={fields!r} but example {ex.guid!r} has no text_b")
  skip = frozenset(w.lower() for w in skip_words)
  neighbours = WordNeighbours(embeddings, id_to_token, skip)
  examples = list(examples)
  clean = _query(predict_text, examples)
  bad = [ex.guid for ex in examples if not 0 <= ex.label < clean.shape[1]]
  if bad:
    raise ValueError(f"examples {bad[:5]} have labels outside 0..{clean.shape[1] - 1}")
  records = []
  for ex, probs in zip(examples, clean):
    predicted = int(probs.argmax())
    attacked = _fields_of(ex, fields)
    if predicted != ex.label:
      words = len(_Text(ex, attacked).slots)
      records.append(AttackRecord(ex, ex, int(ex.label), predicted, predicted, words, 0,
                                  success=False, skipped=True, num_queries=0))
      continue
    adversarial, prediction, words, changed, queries, success = _attack_one(
        ex, probs, predict_text, neighbours, attacked, k, min_similarity, max_fraction,
        importance, unk_token, skip, sentence_check, pos_tag)
    records.append(AttackRecord(ex, adversarial, int(ex.label), predicted, prediction, words,
                                changed, success=success, skipped=False, num_queries=queries))
  return records, summarize(records)


def summarize(records: Sequence[AttackRecord]) -> dict[str, float]:
  """What TextFooler's release reports: `clean_accuracy` (original accuracy),
  `accuracy_under_attack` (after-attack accuracy), `mean_perturbed_fraction` (changed words /
  words, over successful attacks) and `mean_queries` (over the attacked, i.e. originally
  correct, examples); with `success_rate` (successes / attacked) and the counts. NaN where
  there is nothing to average."""
  if not records:
    raise ValueError("summarize got no records")
  n = len(records)
  attacked = [r for r in records if not r.skipped]
  successes = [r for r in records if r.success]
  nan = float("nan")
  return {
      "num_examples": n,
      "num_correct": len(attacked),
      "num_successful": len(successes),
      "clean_accuracy": len(attacked) / n,
      "accuracy_under_attack": (len(attacked) - len(successes)) / n,
      "success_rate": len(successes) / len(attacked) if attacked else nan,
      "mean_perturbed_fraction": (float(np.mean([r.perturbed_fraction for r in successes]))
                                  if successes else nan),
      "mean_queries": float(np.mean([r.num_queries for r in attacked])) if attacked else nan,
  }


def records_jsonl(records: Sequence[AttackRecord]) -> str:
  """One JSON object per record and line (`AttackRecord.to_json`)."""
  return "".join(json.dumps(record.to_json()) + "\n" for record in records)


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
      f.write(records_jsonl(records))
  return results
