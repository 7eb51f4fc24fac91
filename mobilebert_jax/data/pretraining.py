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
class Instance:
    """One NSP pair before special tokens: `is_random_next` is the NSP label (1 = random B)."""
    tokens_a: list[int]
    tokens_b: list[int]
    is_random_next: int


def truncate_seq_pair(tokens_a: list[int], tokens_b: list[int], max_num_tokens: int,
                      rng: np.random.Generator) -> None:
    """Truncates the longer segment, one token at a time from a random end, in place."""
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if len(longer) <= 1:
            raise ValueError(f"cannot fit a segment pair into {max_num_tokens} tokens")
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def create_instances_from_document(documents: Sequence[TokenizedDocument], document_index: int,
                                   max_seq_length: int, short_seq_prob: float,
                                   rng: np.random.Generator) -> list[Instance]:
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
    if len(documents) < 2:
        raise ValueError(f"next-sentence pairs need at least 2 documents, got {len(documents)}")
    if max_seq_length < 5:
        raise ValueError(f"max_seq_length={max_seq_length} is too small: [CLS] A [SEP] B [SEP] "
                         "needs at least 5")
    document = documents[document_index]
    max_num_tokens = max_seq_length - 3
    target = max_num_tokens
    if rng.random() < short_seq_prob:
        target = int(rng.integers(2, max_num_tokens + 1))

    instances: list[Instance] = []
    chunk: list[Sequence[int]] = []
    chunk_len = 0
    i = 0
    last = len(document) - 1
    while i <= last:
        chunk.append(document[i])
        chunk_len += len(document[i])
        if i == last or (chunk_len >= target and len(chunk) >= 2):
            borrowed = len(chunk) == 1 and i > 0
            if borrowed:  # give a lone last sentence a true predecessor
                chunk.insert(0, document[i - 1])
            a_end = 1 if len(chunk) < 2 else int(rng.integers(1, len(chunk)))
            tokens_a = [t for sent in chunk[:a_end] for t in sent]
            if len(chunk) == 1 or rng.random() < 0.5:
                is_random_next = 1
                target_b = max(1, target - len(tokens_a))
                other = int(rng.integers(len(documents) - 1))
                other += other >= document_index  # uniform over the other documents
                random_doc = documents[other]
                tokens_b: list[int] = []
                for j in range(int(rng.integers(len(random_doc))), len(random_doc)):
                    tokens_b.extend(random_doc[j])
                    if len(tokens_b) >= target_b:
                        break
                if not borrowed:
                    i -= len(chunk) - a_end  # the unused sentences start the next chunk
            else:
                is_random_next = 0
                tokens_b = [t for sent in chunk[a_end:] for t in sent]
            if tokens_a and tokens_b:
                truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
                instances.append(Instance(tokens_a, tokens_b, is_random_next))
            chunk = []
            chunk_len = 0
        i += 1
    return instances


@dataclasses.dataclass(frozen=True)
class PackedInstances:
    """Instances stored ragged: sequence n is `tokens[offsets[n]:offsets[n + 1]]`, already
    `[CLS] A [SEP] B [SEP]`; its first `len_a[n]` tokens ([CLS] A [SEP]) have token type 0."""
    tokens: np.ndarray          # int32 [T]
    offsets: np.ndarray         # int64 [N + 1]
    len_a: np.ndarray           # int32 [N]
    next_sentence_labels: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.len_a)

    def sequence(self, n: int) -> np.ndarray:
        """The token ids of instance n (unpadded)."""
        return self.tokens[self.offsets[n]:self.offsets[n + 1]]


def pack_instances(instances: Sequence[Instance], cls_id: int, sep_id: int) -> PackedInstances:
    """Adds [CLS]/[SEP] and stores the instances compactly."""
    seqs, len_a = [], []
    for inst in instances:
        seqs.append([cls_id, *inst.tokens_a, sep_id, *inst.tokens_b, sep_id])
        len_a.append(len(inst.tokens_a) + 2)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    return PackedInstances(tokens=tokens, offsets=offsets, len_a=np.array(len_a, dtype=np.int32),
                           next_sentence_labels=np.array([i.is_random_next for i in instances],
                                                         dtype=np.int32))


def create_instances(documents: Sequence[TokenizedDocument], max_seq_length: int,
                     short_seq_prob: float, dupe_factor: int, seed: int, cls_id: int,
                     sep_id: int) -> PackedInstances:
    """All instances of `dupe_factor` passes over the documents (each pass segments differently).

    Document d of pass p uses the generator `example_rng(seed, STREAM_INSTANCES, p, d)`, so the
    result is a deterministic function of the inputs. Order: pass-major, then document order.
    """
    instances: list[Instance] = []
    for p in range(dupe_factor):
        for d in range(len(documents)):
            rng = example_rng(seed, STREAM_INSTANCES, p, d)
            instances.extend(create_instances_from_document(documents, d, max_seq_length,
                                                            short_seq_prob, rng))
    if not instances:
        raise ValueError("the documents produced no pretraining instances")
    return pack_instances(instances, cls_id, sep_id)


# ---------------------------------------------------------------------------------------------
# Masking.

_BRACKETED = re.compile(r"^\[[^\[\]]+\]$")


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    """What `mask_tokens` needs to know about the vocab.

    special_ids: ids never masked ([PAD], [UNK], [CLS], [SEP], [MASK], ...).
    random_ids: ids drawn for the 10% random replacements (the vocab minus bracketed tokens).
    is_continuation: bool [V], True for "##" pieces (used by whole-word masking).
    """
    mask_id: int
    special_ids: np.ndarray
    random_ids: np.ndarray
    is_continuation: np.ndarray
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
        return cls(mask_id=int(mask_id), special_ids=special, random_ids=random_ids,
                   is_continuation=is_cont, **kwargs)


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
    candidates = np.nonzero(~np.isin(ids, cfg.special_ids))[0]
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

def make_batch(packed: PackedInstances, indices: Sequence[int], rngs: Sequence[np.random.Generator],
               max_seq_length: int, cfg: MaskingConfig, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Masks and pads instances `indices` (one generator each) into a batch dict of numpy arrays.

    Keys/dtypes: input_ids, attention_mask, token_type_ids int32 [B, L]; masked_lm_positions,
    masked_lm_ids int32 [B, P]; masked_lm_weights float32 [B, P]; next_sentence_labels int32 [B].
    Padding slots hold position 0, id 0 and weight 0.
    """
    b, length, p = len(indices), max_seq_length, cfg.max_predictions_per_seq
    batch = {
        "input_ids": np.full((b, length), pad_id, dtype=np.int32),
        "attention_mask": np.zeros((b, length), dtype=np.int32),
        "token_type_ids": np.zeros((b, length), dtype=np.int32),
        "masked_lm_positions": np.zeros((b, p), dtype=np.int32),
        "masked_lm_ids": np.zeros((b, p), dtype=np.int32),
        "masked_lm_weights": np.zeros((b, p), dtype=np.float32),
        "next_sentence_labels": np.zeros((b,), dtype=np.int32),
    }
    for row, (n, rng) in enumerate(zip(indices, rngs)):
        seq = packed.sequence(int(n))
        if seq.size > length:
            raise ValueError(f"instance {n} has {seq.size} tokens > max_seq_length={length}")
        masked, positions, labels = mask_tokens(seq, rng, cfg)
        k = positions.size
        batch["input_ids"][row, :seq.size] = masked
        batch["attention_mask"][row, :seq.size] = 1
        batch["token_type_ids"][row, packed.len_a[n]:seq.size] = 1
        batch["masked_lm_positions"][row, :k] = positions
        batch["masked_lm_ids"][row, :k] = labels
        batch["masked_lm_weights"][row, :k] = 1.0
        batch["next_sentence_labels"][row] = packed.next_sentence_labels[n]
    return batch
