"""BERT pretraining examples in pure numpy: sentence-pair packing (NSP) and MLM masking.

Everything here is deterministic given a `numpy.random.Generator`.

* `create_instances_from_document` packs consecutive sentences of a tokenised document into
  segment pairs `[CLS] A [SEP] B [SEP]` of up to `max_seq_length` tokens, as in BERT's
  `create_pretraining_data`: B is the true continuation of A (label 0) or, with probability 0.5,
  text from another random document (label 1).
* `mask_tokens` picks `masked_lm_prob` of the non-special tokens (at least 1, at most
  `max_predictions_per_seq`); each picked token becomes [MASK] (80%), a random token (10%) or
  stays (10%). With whole-word masking the "##" pieces of a word are picked together.
* `example_rng` derives the per-example generator from (seed, epoch, example index), so masks are
  dynamic (new each epoch) yet any example can be re-created exactly.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

TokenizedDocument = Sequence[Sequence[int]]

# Independent random streams derived from the user seed.
STREAM_INSTANCES = 1
STREAM_SHUFFLE = 2
STREAM_MASK = 3

BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "masked_lm_positions",
              "masked_lm_ids", "masked_lm_weights", "next_sentence_labels")


def example_rng(seed: int, stream: int, *indices: int) -> np.random.Generator:
  """A generator that depends only on (seed, stream, *indices) (all non-negative ints)."""
  return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream),
                                                       *map(int, indices)]))


# ---------------------------------------------------------------------------------------------
# Sentence-pair instances.

@dataclasses.dataclass(frozen=True)
class TokenizedDocuments:
  """Tokenised documents stored flat: sentence s is `tokens[sentence_offsets[s]:
  sentence_offsets[s + 1]]`, and document d holds sentences `document_offsets[d]` to
  `document_offsets[d + 1] - 1`, so a run of a document's sentences is one contiguous slice."""
  tokens: np.ndarray            # int32 [T]
  sentence_offsets: np.ndarray  # int64 [S + 1]
  document_offsets: np.ndarray  # int64 [D + 1]

  @classmethod
  def from_lists(cls, documents: Sequence[TokenizedDocument]) -> "TokenizedDocuments":
    """From documents given as lists of token-id lists (empty sentences/documents dropped)."""
    sentences = [s for doc in documents for s in doc]
    tokens = (np.concatenate([np.asarray(s, dtype=np.int32) for s in sentences])
              if sentences else np.zeros(0, np.int32))
    return cls.from_lengths(tokens, [len(s) for s in sentences], [len(d) for d in documents])

  @classmethod
  def from_lengths(cls, tokens: np.ndarray, sentence_lengths: Sequence[int],
                   sentences_per_document: Sequence[int]) -> "TokenizedDocuments":
    """From all sentences' tokens concatenated in document order, each sentence's length and
    each document's sentence count; empty sentences and documents left empty are dropped."""
    lengths = np.asarray(sentence_lengths, dtype=np.int64)
    per_doc = np.asarray(sentences_per_document, dtype=np.int64)
    kept = lengths > 0
    kept_per_doc = np.zeros(len(per_doc), dtype=np.int64)
    np.add.at(kept_per_doc, np.repeat(np.arange(len(per_doc)), per_doc), kept)
    kept_per_doc = kept_per_doc[kept_per_doc > 0]
    sentence_offsets = np.zeros(int(kept.sum()) + 1, dtype=np.int64)
    np.cumsum(lengths[kept], out=sentence_offsets[1:])
    document_offsets = np.zeros(len(kept_per_doc) + 1, dtype=np.int64)
    np.cumsum(kept_per_doc, out=document_offsets[1:])
    return cls(np.asarray(tokens, dtype=np.int32), sentence_offsets, document_offsets)

  def __len__(self) -> int:
    return len(self.document_offsets) - 1

  @property
  def num_sentences(self) -> int:
    return len(self.sentence_offsets) - 1

  def span(self, first: int, stop: int) -> tuple[int, int]:
    """Token range [lo, hi) of sentences first..stop-1 (global sentence indices)."""
    return int(self.sentence_offsets[first]), int(self.sentence_offsets[stop])


@dataclasses.dataclass(frozen=True)
class Instance:
  """One NSP pair before special tokens: `is_random_next` is the NSP label (1 = random B)."""
  tokens_a: np.ndarray
  tokens_b: np.ndarray
  is_random_next: int


def truncate_seq_pair(len_a: int, len_b: int, max_num_tokens: int, rng: np.random.Generator
                      ) -> tuple[tuple[int, int], tuple[int, int]]:
  """BERT's truncation of a segment pair to `max_num_tokens`: one token at a time from the
  longer segment (B on a tie), from its front or back with probability 1/2 each.

  Returns ((front_a, back_a), (front_b, back_b)), the tokens to drop at each end.
  """
  excess = len_a + len_b - max_num_tokens
  trims = [[0, 0], [0, 0]]
  if excess <= 0:
    return (0, 0), (0, 0)
  lengths = [len_a, len_b]
  for u in rng.random(excess):
    longer = 0 if lengths[0] > lengths[1] else 1
    if lengths[longer] <= 1:
      raise ValueError(f"cannot fit a segment pair into {max_num_tokens} tokens")
    trims[longer][0 if u < 0.5 else 1] += 1
    lengths[longer] -= 1
  return tuple(trims[0]), tuple(trims[1])


def _trimmed(tokens: np.ndarray, lo: int, hi: int, trim: tuple[int, int]) -> np.ndarray:
  return tokens[lo + trim[0]:hi - trim[1]]


def create_instances_from_document(documents: TokenizedDocuments | Sequence[TokenizedDocument],
                                   document_index: int, max_seq_length: int,
                                   short_seq_prob: float, rng: np.random.Generator
                                   ) -> list[Instance]:
  """Packs one document's sentences into NSP sentence pairs (BERT's algorithm).

  Sentences are accumulated into a chunk until it reaches the target length
  (`max_seq_length - 3`, or with probability `short_seq_prob` a random length in
  [2, max_seq_length - 3]). A = the first k >= 1 chunk sentences; B = the rest of the chunk
  (label 0) or, with probability 0.5, sentences from a random other document (label 1), in
  which case the unused chunk sentences are put back. The pair is then truncated to fit.

  One change from BERT, which forces label 1 for a one-sentence chunk and so skews the labels
  towards 1 on short documents or short targets: a chunk is only closed with >= 2 sentences
  (a final lone sentence is paired with the sentence before it), so the label is a fair coin
  except for one-sentence documents. Needs at least 2 documents.
  """
  if not isinstance(documents, TokenizedDocuments):
    documents = TokenizedDocuments.from_lists(documents)
  if len(documents) < 2:
    raise ValueError(f"next-sentence pairs need at least 2 documents, got {len(documents)}")
  if max_seq_length < 5:
    raise ValueError(f"max_seq_length={max_seq_length} is too small: [CLS] A [SEP] B [SEP] "
                     "needs at least 5")
  tokens, offsets = documents.tokens, documents.sentence_offsets
  first = int(documents.document_offsets[document_index])
  last = int(documents.document_offsets[document_index + 1]) - 1
  max_num_tokens = max_seq_length - 3
  target = max_num_tokens
  if rng.random() < short_seq_prob:
    target = int(rng.integers(2, max_num_tokens + 1))

  instances: list[Instance] = []
  chunk_start = first  # the chunk is sentences chunk_start..i
  i = first
  while i <= last:
    chunk_len = int(offsets[i + 1] - offsets[chunk_start])
    n_chunk = i - chunk_start + 1
    if i == last or (chunk_len >= target and n_chunk >= 2):
      borrowed = n_chunk == 1 and i > first
      if borrowed:  # give a lone last sentence a true predecessor
        chunk_start -= 1
        n_chunk = 2
      a_end = 1 if n_chunk < 2 else int(rng.integers(1, n_chunk))
      a_lo, a_hi = documents.span(chunk_start, chunk_start + a_end)
      if n_chunk == 1 or rng.random() < 0.5:
        is_random_next = 1
        target_b = max(1, target - (a_hi - a_lo))
        other = int(rng.integers(len(documents) - 1))
        other += other >= document_index  # uniform over the other documents
        o_first = int(documents.document_offsets[other])
        o_stop = int(documents.document_offsets[other + 1])
        j = o_first + int(rng.integers(o_stop - o_first))
        b_lo = int(offsets[j])
        while j < o_stop and offsets[j + 1] - b_lo < target_b:
          j += 1
        b_hi = int(offsets[min(j + 1, o_stop)])
        if not borrowed:
          i -= n_chunk - a_end  # the unused sentences start the next chunk
      else:
        is_random_next = 0
        b_lo, b_hi = documents.span(chunk_start + a_end, chunk_start + n_chunk)
      if a_hi > a_lo and b_hi > b_lo:
        trim_a, trim_b = truncate_seq_pair(a_hi - a_lo, b_hi - b_lo, max_num_tokens, rng)
        instances.append(Instance(_trimmed(tokens, a_lo, a_hi, trim_a),
                                  _trimmed(tokens, b_lo, b_hi, trim_b), is_random_next))
      chunk_start = i + 1
    i += 1
  return instances


def instance_sequence(instance: Instance, cls_id: int, sep_id: int) -> tuple[np.ndarray, int]:
  """`[CLS] A [SEP] B [SEP]` as int32 ids, and the length of its first segment ([CLS] A [SEP])."""
  a, b = instance.tokens_a, instance.tokens_b
  seq = np.empty(len(a) + len(b) + 3, dtype=np.int32)
  seq[0] = cls_id
  seq[1:len(a) + 1] = a
  seq[len(a) + 1] = sep_id
  seq[len(a) + 2:-1] = b
  seq[-1] = sep_id
  return seq, len(a) + 2


def create_instances(documents: TokenizedDocuments | Sequence[TokenizedDocument],
                     max_seq_length: int, short_seq_prob: float, dupe_factor: int,
                     seed: int | Sequence[int]) -> list[Instance]:
  """All instances of `dupe_factor` passes over the documents (each pass segments differently).

  Pass p draws from the generator `example_rng(seed, STREAM_INSTANCES, *rest, p)`, document
  after document, for `seed` an int or a tuple (seed, *rest) such as (seed, shard), so the
  result is a deterministic function of the inputs. Order: pass-major, then document order.
  """
  if not isinstance(documents, TokenizedDocuments):
    documents = TokenizedDocuments.from_lists(documents)
  seeds = (seed,) if isinstance(seed, (int, np.integer)) else tuple(seed)
  instances: list[Instance] = []
  for p in range(dupe_factor):
    rng = example_rng(seeds[0], STREAM_INSTANCES, *seeds[1:], p)
    for d in range(len(documents)):
      instances.extend(create_instances_from_document(documents, d, max_seq_length,
                                                      short_seq_prob, rng))
  return instances


# ---------------------------------------------------------------------------------------------
# Masking.

_BRACKETED = re.compile(r"^\[[^\[\]]+\]$")


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  """What `mask_tokens` needs to know about the vocab.

  special_ids: ids never masked ([PAD], [UNK], [CLS], [SEP], [MASK], ...).
  random_ids: ids drawn for the 10% random replacements (the vocab minus bracketed tokens).
  is_continuation: bool [V], True for "##" pieces (used by whole-word masking).
  is_special: bool [V], True at `special_ids` (a lookup, cheaper than a set test per token).
  """
  mask_id: int
  special_ids: np.ndarray
  random_ids: np.ndarray
  is_continuation: np.ndarray
  is_special: np.ndarray
  masked_lm_prob: float = 0.15
  max_predictions_per_seq: int = 20
  whole_word_masking: bool = False

  @classmethod
  def from_vocab(cls, tokens: Sequence[str], special_ids: Sequence[int], mask_id: int,
                 **kwargs) -> "MaskingConfig":
    """Builds the config from the id-ordered vocab tokens."""
    special = np.unique(np.asarray(list(special_ids), dtype=np.int32))
    bracketed = np.array([bool(_BRACKETED.match(t)) for t in tokens], dtype=bool)
    keep = ~bracketed
    keep[special] = False
    random_ids = np.nonzero(keep)[0].astype(np.int32)
    if random_ids.size == 0:
      raise ValueError("the vocab has no ordinary tokens to draw random replacements from")
    is_cont = np.array([t.startswith("##") and len(t) > 2 for t in tokens], dtype=bool)
    is_special = np.zeros(len(tokens), dtype=bool)
    is_special[special] = True
    return cls(mask_id=int(mask_id), special_ids=special, random_ids=random_ids,
               is_continuation=is_cont, is_special=is_special, **kwargs)


def _word_groups(ids: np.ndarray, candidates: np.ndarray, is_continuation: np.ndarray
                 ) -> list[np.ndarray]:
  """Splits candidate positions into whole words: a "##" piece joins the word before it."""
  if candidates.size == 0:
    return []
  starts = ~is_continuation[ids[candidates]]
  starts[0] = True
  starts[1:] |= np.diff(candidates) != 1  # a special token in between breaks the word
  return np.split(candidates, np.nonzero(starts)[0][1:])


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, cfg: MaskingConfig
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Applies BERT's MLM corruption to one unpadded sequence.

  Returns (masked_ids, positions, labels): the corrupted copy of `ids`, the sorted masked
  positions, and the original ids there. The number of predictions is
  min(max_predictions_per_seq, max(1, round(masked_lm_prob * #non-special tokens))); with
  whole-word masking a word whose pieces would overflow that budget is skipped.
  """
  ids = np.asarray(ids)
  candidates = np.nonzero(~cfg.is_special[ids])[0]
  if candidates.size == 0:
    empty = np.zeros(0, dtype=np.int32)
    return ids.astype(np.int32), empty, empty
  num_to_predict = min(cfg.max_predictions_per_seq,
                       max(1, int(round(candidates.size * cfg.masked_lm_prob))))
  if cfg.whole_word_masking:
    groups = _word_groups(ids, candidates, cfg.is_continuation)
    chosen: list[int] = []
    for g in rng.permutation(len(groups)):
      if len(chosen) >= num_to_predict:
        break
      if len(chosen) + len(groups[g]) > num_to_predict:
        continue
      chosen.extend(groups[g].tolist())
    positions = np.sort(np.asarray(chosen, dtype=np.int64))
  else:
    positions = np.sort(rng.permutation(candidates)[:num_to_predict])
  labels = ids[positions].astype(np.int32)
  out = ids.astype(np.int32)  # a copy
  u = rng.random(positions.size)
  random_tokens = cfg.random_ids[rng.integers(cfg.random_ids.size, size=positions.size)]
  out[positions] = np.where(u < 0.8, cfg.mask_id, np.where(u < 0.9, labels, random_tokens))
  return out, positions.astype(np.int32), labels


# ---------------------------------------------------------------------------------------------
# Batches.

def make_batch(sequences: Sequence[tuple[np.ndarray, int, int]],
               rngs: Sequence[np.random.Generator], max_seq_length: int, cfg: MaskingConfig,
               pad_id: int = 0) -> dict[str, np.ndarray]:
  """Masks and pads sequences into a batch dict of numpy arrays, one generator each.

  Each sequence is (ids `[CLS] A [SEP] B [SEP]`, length of `[CLS] A [SEP]`, NSP label).
  Keys/dtypes: input_ids, attention_mask, token_type_ids int32 [B, L]; masked_lm_positions,
  masked_lm_ids int32 [B, P]; masked_lm_weights float32 [B, P]; next_sentence_labels int32 [B].
  Padding slots hold position 0, id 0 and weight 0.
  """
  b, length, p = len(sequences), max_seq_length, cfg.max_predictions_per_seq
  batch = {
      "input_ids": np.full((b, length), pad_id, dtype=np.int32),
      "attention_mask": np.zeros((b, length), dtype=np.int32),
      "token_type_ids": np.zeros((b, length), dtype=np.int32),
      "masked_lm_positions": np.zeros((b, p), dtype=np.int32),
      "masked_lm_ids": np.zeros((b, p), dtype=np.int32),
      "masked_lm_weights": np.zeros((b, p), dtype=np.float32),
      "next_sentence_labels": np.zeros((b,), dtype=np.int32),
  }
  for row, ((seq, len_a, label), rng) in enumerate(zip(sequences, rngs)):
    if seq.size > length:
      raise ValueError(f"a sequence of {seq.size} tokens exceeds max_seq_length={length}")
    masked, positions, labels = mask_tokens(seq, rng, cfg)
    k = positions.size
    batch["input_ids"][row, :seq.size] = masked
    batch["attention_mask"][row, :seq.size] = 1
    batch["token_type_ids"][row, len_a:seq.size] = 1
    batch["masked_lm_positions"][row, :k] = positions
    batch["masked_lm_ids"][row, :k] = labels
    batch["masked_lm_weights"][row, :k] = 1.0
    batch["next_sentence_labels"][row] = label
  return batch
