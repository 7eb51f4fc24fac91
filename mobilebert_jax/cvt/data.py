"""Data for the CVT tagger: word and character vocabularies, sentences as arrays, and the
training batches (a labelled and an unlabelled minibatch per step).

Words. The authors' tagger looks words up in 300-d GloVe vectors (glove.6B, uncased) under the
release's `normalize_word` (lowercase, every digit 0; `base/embeddings.py`) and reads case and
morphology from the character CNN. Without pretrained vectors the word vocabulary here is built
from the labelled training sentences and the unlabelled ones, normalized the same way
(`lowercase`; False keeps words as written); words seen fewer than `min_count` times map to
<unk> (so its embedding is trained on rare words). Characters keep their case; a word is cut to
`max_word_length` characters (the release's max_word_length 20).

Every sentence is wrapped in <s> ... </s> (as the release's minibatches), so the future and
past modules have a left and right neighbour at every real word. Arrays:

  words   [N, W] int32    word ids, 0 = padding
  chars   [N, W, C] int32 char ids, 0 = padding
  lengths [N] int32       tokens including <s> and </s>
  labels  [N, W] int32    tag ids at real words, -1 at <s>, </s> and padding (labelled data)
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np

from mobilebert_jax.downstream.finetune_data import ArrayDataset
from mobilebert_jax.downstream.tagging import IGNORE, TaggedSentence, tag_ids

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL = (PAD, UNK, BOS, EOS)
INPUT_KEYS = ("words", "chars", "lengths")
UNLABELED_PREFIX = "unlabeled_"


def normalize(word: str) -> str:
  """The release's `normalize_word`: lowercase, every digit 0."""
  return re.sub(r"\d", "0", word.lower())


@dataclasses.dataclass(frozen=True)
class TaggingVocab:
  """Word, character and tag vocabularies (ids are list positions; words and chars both start
  with <pad>, <unk>, <s>, </s>; <s> and </s> are one-character words of their own char)."""
  words: tuple[str, ...]
  chars: tuple[str, ...]
  tags: tuple[str, ...]
  lowercase: bool = True
  max_word_length: int = 20

  def __post_init__(self):
    for name in ("words", "chars", "tags"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    object.__setattr__(self, "_word_index", {w: i for i, w in enumerate(self.words)})
    object.__setattr__(self, "_char_index", {c: i for i, c in enumerate(self.chars)})

  def word_id(self, token: str) -> int:
    """The id of a word of the text (<unk>: 1 when not in the vocabulary)."""
    if token in SPECIAL:
      return 1
    return self._word_index.get(normalize(token) if self.lowercase else token, 1)

  def char_ids(self, token: str) -> list[int]:
    """The char ids of a word of the text, cut to `max_word_length` (<unk>: 1)."""
    return [self._char_index.get(c, 1) for c in token[:self.max_word_length]]

  def encode(self, sentences: Sequence[Sequence[str]], max_length: int | None = None,
             tags: Sequence[Sequence[str]] | None = None, where: str = "tagging data"
             ) -> dict[str, np.ndarray]:
    """Arrays of `sentences` (module docstring) padded to the longest sentence + 2 (or
    `max_length` tokens, cutting longer sentences); `tags` adds labels (unknown tags are an
    error naming `where`)."""
    longest = max((len(s) for s in sentences), default=0) + 2
    width = longest if max_length is None else min(int(max_length), longest)
    if width < 3:
      raise ValueError(f"{where}: max_length {max_length} leaves no room for a word")
    n = len(sentences)
    words = np.zeros((n, width), np.int32)
    chars = np.zeros((n, width, self.max_word_length), np.int32)
    lengths = np.zeros((n,), np.int32)
    bos, eos = SPECIAL.index(BOS), SPECIAL.index(EOS)  # as words and as their one char
    for i, sentence in enumerate(sentences):
      tokens = list(sentence)[:width - 2]
      lengths[i] = len(tokens) + 2
      words[i, 0], chars[i, 0, 0] = bos, bos
      words[i, len(tokens) + 1], chars[i, len(tokens) + 1, 0] = eos, eos
      for j, token in enumerate(tokens, start=1):
        words[i, j] = self.word_id(token)
        ids = self.char_ids(token)
        chars[i, j, :len(ids)] = ids
    arrays = {"words": words, "chars": chars, "lengths": lengths}
    if tags is not None:
      ids = tag_ids([TaggedSentence(tuple(s), tuple(t)) for s, t in zip(sentences, tags)],
                    self.tags, where)
      labels = np.full((n, width), IGNORE, np.int32)
      for i, row in enumerate(ids):
        row = row[:width - 2]
        labels[i, 1:1 + len(row)] = row
      arrays["labels"] = labels
    return arrays

  def decode(self, logits: np.ndarray, sentences: Sequence[Sequence[str]]) -> list[list[str]]:
    """Per-word tags: the argmax of [N, W, num_tags] logits at each real word; words cut off
    by `max_length` get "O" (or the first tag without an "O")."""
    best = np.asarray(logits).argmax(-1)
    fallback = "O" if "O" in self.tags else self.tags[0]
    width = best.shape[1] - 2
    return [[self.tags[best[i, j + 1]] if j < width else fallback for j in range(len(s))]
            for i, s in enumerate(sentences)]

  def to_dict(self) -> dict[str, Any]:
    return {"words": list(self.words), "chars": list(self.chars), "tags": list(self.tags),
            "lowercase": self.lowercase, "max_word_length": self.max_word_length}

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "TaggingVocab":
    return cls(**dict(values))


def build_vocab(sentences: Sequence[Sequence[str]], tags: Sequence[str], *, min_count: int = 2,
                lowercase: bool = True, max_word_length: int = 20) -> TaggingVocab:
  """The vocabularies of `sentences` (labelled and unlabelled together): words seen at least
  `min_count` times, most frequent first (ties alphabetical), every character seen."""
  if min_count < 1:
    raise ValueError(f"min_count must be >= 1, got {min_count}")
  if max_word_length < 1:
    raise ValueError(f"max_word_length must be >= 1, got {max_word_length}")
  words = collections.Counter(normalize(t) if lowercase else t for s in sentences for t in s)
  chars = collections.Counter(c for s in sentences for t in s for c in t[:max_word_length])
  order = lambda counts: sorted(counts, key=lambda k: (-counts[k], k))
  kept = [w for w in order(words) if words[w] >= min_count and w not in SPECIAL]
  return TaggingVocab(SPECIAL + tuple(kept), SPECIAL + tuple(order(chars)), tuple(tags),
                      lowercase=lowercase, max_word_length=max_word_length)


class CVTDataset:
  """Each step's batch: a labelled minibatch (words, chars, lengths, labels) and, when there
  is unlabelled text, an unlabelled one (the same keys, prefixed "unlabeled_", no labels).

  Two `ArrayDataset`s, each shuffled by its own seed and resumed by its own position; the
  contract of the training loop (local rows of a global batch per process, `state()` /
  `restore()`, `global_batch_size`, `batches_per_epoch`) is the labelled one's.
  """

  def __init__(self, labeled: Mapping[str, np.ndarray], unlabeled: Mapping[str, np.ndarray] | None,
               batch_size: int, unlabeled_batch_size: int, *, seed: int = 0,
               process_index: int = 0, process_count: int = 1, vocab_size: int | None = None):
    where = dict(process_index=process_index, process_count=process_count)
    self.labeled = ArrayDataset(labeled, batch_size, seed=seed, name="tagging train", **where)
    self.unlabeled = None
    if unlabeled is not None:
      self.unlabeled = ArrayDataset(unlabeled, unlabeled_batch_size, seed=seed + 1,
                                    name="unlabelled sentences", **where)
    self.global_batch_size = self.labeled.global_batch_size
    self.local_batch_size = self.labeled.local_batch_size
    self.batches_per_epoch = self.labeled.batches_per_epoch
    self.vocab_size = vocab_size

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self.labeled)
    if self.unlabeled is not None:
      batch.update({UNLABELED_PREFIX + k: v for k, v in next(self.unlabeled).items()})
    return batch

  def state(self) -> dict[str, Any]:
    return {"labeled": self.labeled.state(),
            "unlabeled": None if self.unlabeled is None else self.unlabeled.state()}

  def restore(self, state: Mapping[str, Any]) -> None:
    self.labeled.restore(state["labeled"])
    if self.unlabeled is not None:
      if state.get("unlabeled") is None:
        raise ValueError("the checkpoint was written without unlabelled data; this run has some")
      self.unlabeled.restore(state["unlabeled"])

  def check_vocab_size(self, model_vocab_size: int) -> None:
    """Raises if the word vocabulary has ids the model's embedding table does not have."""
    if self.vocab_size is not None and self.vocab_size > model_vocab_size:
      raise ValueError(f"the word vocabulary has {self.vocab_size} words but the model's table "
                       f"has {model_vocab_size} rows")
