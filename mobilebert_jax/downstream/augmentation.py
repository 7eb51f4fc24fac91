"""TinyBERT's task data augmentation: word replacement by the teacher's MLM or embeddings.

  predict = mlm_predict_fn(teacher_model, teacher_params)        # pretraining / masked_lm head
  table = token_embedding_table(teacher_params)                  # or load_glove("glove.txt")
  train = load_or_augment("workdir/sst2_aug.jsonl", read_glue("sst2", "train", data_dir),
                          tokenizer, predict, table, task="sst2")   # N_a = 20 for SST-2

This follows the authors' release, data_augmentation.py of huawei-noah/Pretrained-Language-Model
(TinyBERT/, commit 0598f02; "L" below are its lines), where it differs from the paper's
Algorithm 1 (Jiao et al., 2020); each difference from the paper is a named option:

* Words are the tokenizer's pre-tokenized words (BERT's basic tokenizer: split at whitespace and
  punctuation, L217). A word is replaced only if it is made of the letters a-z alone and is not
  in the release's stop-word list (`_is_valid` and `StopWordsList`, L40-77, L220); the paper
  replaces every word (`stop_words=()` drops the list; the alphabetic test stays).
* A word that is one WordPiece is masked and the MLM's top-K predictions that are whole words
  become its candidates. The MLM sees `[CLS] masked_sentence [SEP] sentence [SEP]`, token types
  0 up to the first [SEP] and 1 after it, no padding, cut at 512 pieces; a word masked at a
  position past the cut gets no candidate (L152-180). The paper feeds BERT the masked sentence
  alone (`mlm_context="masked"`: `[CLS] masked_sentence [SEP]`).
* A word of several pieces gets the K nearest (cosine) GloVe words (L135-150), or here by
  default the K whole-word tokens nearest to the mean of its piece embeddings in the teacher's
  table.
* Each of N_a tries replaces every word that has candidates with probability p_t by one drawn
  uniformly; a try equal to the original or to an earlier copy is dropped (L224-235), so an
  example gets at most N_a copies per field (`dedup=False`: exactly N_a, as the paper).
* For a sentence pair the two sentences are augmented one at a time, the other kept as it is
  (`AugmentProcessor`, L268-273; `separate_fields=False` changes both in every copy).
* N_a by task (`task_n_aug`, L300-312): CoLA, MRPC, STS-B, RTE 30; SST-2, QNLI 20; MNLI,
  QQP 10; other tasks `DEFAULT_N_AUG` = 20 (the paper's N_a); p_t = 0.4, K = 15 (L290-295).

Not reproduced from the release: it writes the augmented sentence as its basic tokens joined by
spaces (lower-cased for an uncased model) where this module keeps the original text around the
replaced words; its MLM candidates may be the word itself, special tokens or punctuation, which
are dropped here; and for a pair it leaves the first field at its last augmented value while
writing the second field's copies (it reuses one mutable row, L268-273), which here keep the
original first field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Callable, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mobilebert_jax.compilation import jit_inference
from mobilebert_jax.downstream.glue_data import GlueExample
from mobilebert_jax.downstream.tasks import GlueTask, TINYBERT_AUGMENTATION_N, get_task
from mobilebert_jax.models.heads import ForMaskedLM, ForPreTraining

log = logging.getLogger("mobilebert_jax")

# (input_ids [B, L], attention_mask [B, L], token_type_ids [B, L], masked_lm_positions [B, P])
# -> logits [B, P, vocab]; numpy in, numpy out.
MlmPredict = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]

CACHE_FORMAT = "mobilebert_jax.augmentation"
# 2: stop words, per-field copies, de-duplication, the [CLS] masked [SEP] original [SEP] input.
CACHE_VERSION = 2
_FIELDS = ("text_a", "text_b")
_MLM_CONTEXTS = ("masked_and_original", "masked")
_LETTERS = re.compile(r"[a-z]+")

# The paper's N_a, used for tasks without a value in tasks.TINYBERT_AUGMENTATION_N.
DEFAULT_N_AUG = 20
# BERT's position limit, the release's cut of the MLM input (L153, L162).
MLM_MAX_LENGTH = 512

# The stop words of the release (L40-50): an NLTK-style English list without the question
# words (what, which, who, whom, when, where, why, how). Its forms with an apostrophe ("don't",
# "'s", ...) are left out: such a word never passes the a-z test anyway.
STOP_WORDS = frozenset("""
    i me my myself we our ours ourselves you your yours yourself yourselves he him his himself
    she her hers herself it its itself they them their theirs themselves this that these those
    am is are was were be been being have has had having do does did doing a an the and but if
    or because as until while of at by for with about against between into through during
    before after above below to from up down in out on off over under again further then once
    here there all any both each few more most other some such no nor not only own same so than
    too very s t can will just don should now d ll m o re ve y ain aren couldn didn doesn hadn
    hasn haven isn ma mightn mustn needn shan shouldn wasn weren won wouldn
    """.split())


def is_replaceable(word: str, stop_words: Collection[str] = STOP_WORDS) -> bool:
  """True when TinyBERT's release may replace `word` (as the tokenizer normalises it): the
  letters a-z alone, either case, and not a stop word (L75-77, L220)."""
  lower = word.lower()
  return bool(_LETTERS.fullmatch(lower)) and lower not in stop_words


def task_n_aug(task: str | GlueTask | None, n_aug: int | None = None) -> int:
  """N_a, the tries per field: `n_aug` when given, else the release's value for `task`
  (tasks.TINYBERT_AUGMENTATION_N, from data_augmentation.py L300-312), else DEFAULT_N_AUG."""
  if n_aug is not None:
    return int(n_aug)
  if task is None:
    return DEFAULT_N_AUG
  return int(TINYBERT_AUGMENTATION_N.get(get_task(task).name, DEFAULT_N_AUG))


@dataclasses.dataclass(frozen=True)
class WordVectors:
  """Word-level vectors (e.g. GloVe): `words[i]` has the vector `vectors[i]`."""
  words: tuple[str, ...]
  vectors: np.ndarray

  def __post_init__(self):
    if self.vectors.ndim != 2 or len(self.words) != self.vectors.shape[0]:
      raise ValueError(f"WordVectors: {len(self.words)} words but vectors of shape "
                       f"{self.vectors.shape} (expected [{len(self.words)}, dim])")


def load_glove(path: str | os.PathLike, max_words: int | None = None) -> WordVectors:
  """Reads a GloVe text file (`word v1 ... vD` per line), the first `max_words` lines at most
  (the release reads the first 100,000, L92-121)."""
  words, rows, dim = [], [], None
  with epath.Path(path).open("r", encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if max_words is not None and len(words) >= max_words:
        break
      parts = line.rstrip().split(" ")
      if len(parts) < 2:
        continue
      if dim is None:
        dim = len(parts) - 1
      if len(parts) - 1 != dim:
        raise ValueError(f"{path}:{lineno}: {len(parts) - 1} values, expected {dim} (a GloVe "
                         "text file holds `word v1 ... vD` per line)")
      try:
        rows.append(np.asarray(parts[1:], np.float32))
      except ValueError:
        raise ValueError(f"{path}:{lineno}: values are not numbers") from None
      words.append(parts[0])
  if not words:
    raise ValueError(f"{path}: no word vectors found")
  return WordVectors(tuple(words), np.stack(rows))


def token_embedding_table(params: Mapping) -> np.ndarray:
  """The input token embeddings [vocab, embedding_size] of a model's params tree (any head)."""
  tree = params.get("backbone", params)
  try:
    return np.asarray(tree["embeddings"]["word_embeddings"]["embedding"])
  except (KeyError, TypeError):
    raise KeyError("params hold no embeddings/word_embeddings/embedding table (expected a "
                   "mobilebert_jax params tree)") from None


def mlm_predict_fn(model, params) -> MlmPredict:
  """A jitted numpy-in / numpy-out `mlm_predict` for a flax ForPreTraining / ForMaskedLM model.

  One compilation per input shape; `augment_examples` pads its batches to few shapes and cuts
  its inputs at the model's `max_position_embeddings` (the function's `max_positions`).
  """
  if not isinstance(model, (ForPreTraining, ForMaskedLM)):
    raise ValueError(f"mlm_predict_fn needs a model with an MLM head (pretraining or masked_lm), "
                     f"got {type(model).__name__}")

  params = jax.device_put(params)

  @jit_inference
  def logits(params, input_ids, attention_mask, token_type_ids, positions):
    out = model.apply({"params": params}, input_ids, attention_mask, token_type_ids,
                      masked_lm_positions=positions)
    return out.prediction_logits.astype(jnp.float32)

  def predict(input_ids, attention_mask, token_type_ids, masked_lm_positions):
    arrays = [jnp.asarray(x, jnp.int32)
              for x in (input_ids, attention_mask, token_type_ids, masked_lm_positions)]
    return np.asarray(logits(params, *arrays))

  predict.max_positions = int(model.config.max_position_embeddings)   # caps the MLM input
  return predict


# ---------------------------------------------------------------------------------------------
# Words and candidates.

@dataclasses.dataclass
class _Word:
  start: int             # the word: text[start:end]
  end: int
  key: str               # the word as the tokenizer normalises it (lower-cased when uncased)
  pieces: list[int]      # WordPiece ids of the word
  first_piece: int       # index of the first piece in the field's tokens
  candidates: list[str] = dataclasses.field(default_factory=list)


def _whole_word_mask(tokenizer, size: int) -> np.ndarray:
  """True for vocabulary ids that are whole words: no '##', not special, alphanumeric."""
  mask = np.zeros(size, bool)
  special = set(tokenizer.all_special_tokens)
  for token, i in tokenizer.get_vocab().items():
    if i < size and not token.startswith("##") and token not in special and token.isalnum():
      mask[i] = True
  return mask


def _normalize(tokenizer, text: str) -> str:
  normalizer = tokenizer.backend_tokenizer.normalizer
  return normalizer.normalize_str(text) if normalizer is not None else text


def _find_words(tokenizer, text: str, ids, offsets, word_ids,
                stop_words: Collection[str]) -> list[_Word]:
  """The replaceable words of `text` (the tokenizer's pre-tokenized words, its pieces grouped
  by word id) with their pieces."""
  groups: dict[int, list[int]] = {}
  for t, w in enumerate(word_ids):
    if w is not None:
      groups.setdefault(w, []).append(t)
  words = []
  for pieces in groups.values():
    start, end = offsets[pieces[0]][0], offsets[pieces[-1]][1]
    key = _normalize(tokenizer, text[start:end])
    if start < end and is_replaceable(key, stop_words):
      words.append(_Word(start, end, key, [int(ids[t]) for t in pieces], pieces[0]))
  return words


def mlm_input(tokenizer, pieces: Sequence[int], masked: int, max_length: int = MLM_MAX_LENGTH,
              context: str = "masked_and_original") -> tuple[list[int], list[int]] | None:
  """The MLM input (ids, token types) that asks for piece `masked` of a sentence's `pieces`.

  "masked_and_original" (the release, L156-168): [CLS] pieces' [SEP] pieces [SEP], where
  pieces' has [MASK] at `masked`; token types 0 through the first [SEP], 1 after it.
  "masked" (the paper's BERT(x_m)): [CLS] pieces' [SEP], token types 0.
  Both are cut to `max_length`; None when the [MASK] (at 1 + `masked`) falls past the cut.
  """
  if context not in _MLM_CONTEXTS:
    raise ValueError(f"mlm_context must be one of {_MLM_CONTEXTS}, got {context!r}")
  if 1 + masked >= max_length:
    return None
  cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
  first = [cls] + list(pieces) + [sep]
  first[1 + masked] = tokenizer.mask_token_id
  ids, types = first, [0] * len(first)
  if context == "masked_and_original":
    ids = ids + list(pieces) + [sep]
    types = types + [1] * (len(pieces) + 1)
  return ids[:max_length], types[:max_length]


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k largest entries of each row, best first (which of several equal scores
  at the k-th place make the cut is unspecified, but deterministic)."""
  k = min(k, scores.shape[-1])
  part = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
  vals = np.take_along_axis(scores, part, axis=-1)
  order = np.lexsort((part, -vals), axis=-1)
  return np.take_along_axis(part, order, axis=-1)


def _bucket(length: int, max_seq_length: int) -> int:
  size = 16
  while size < length:
    size *= 2
  return min(size, max_seq_length)


def _mlm_input_length(num_pieces: int, max_length: int, context: str) -> int:
  return min(2 * num_pieces + 3 if context == "masked_and_original" else num_pieces + 2,
             max_length)


def _mlm_candidates(rows, tokenizer, mlm_predict, k, whole, batch_size, max_seq_length,
                    mlm_context):
  """Fills the candidates of single-piece words; `rows` holds (sentence pieces, index of the
  masked piece, word), one masked word per MLM row (`mlm_input`), batched."""
  vocab = tokenizer.convert_ids_to_tokens
  rows = sorted(rows, key=lambda r: len(r[0]))   # similar lengths together
  for b in range(0, len(rows), batch_size):
    chunk = rows[b:b + batch_size]
    longest = max(_mlm_input_length(len(r[0]), max_seq_length, mlm_context) for r in chunk)
    shape = (batch_size, _bucket(longest, max_seq_length))
    ids = np.full(shape, tokenizer.pad_token_id, np.int32)
    mask = np.zeros(shape, np.int32)
    types = np.zeros(shape, np.int32)
    positions = np.zeros((batch_size, 1), np.int32)
    ids[len(chunk):, :2] = tokenizer.cls_token_id, tokenizer.sep_token_id   # filler rows
    mask[len(chunk):, :2] = 1
    for r, (pieces, masked, _) in enumerate(chunk):
      seq, seg = mlm_input(tokenizer, pieces, masked, max_seq_length, mlm_context)
      ids[r, :len(seq)], mask[r, :len(seq)], types[r, :len(seq)] = seq, 1, seg
      positions[r, 0] = 1 + masked
    logits = np.asarray(mlm_predict(ids, mask, types, positions))
    if logits.ndim != 3 or logits.shape[:2] != (batch_size, 1):
      raise ValueError(f"mlm_predict returned logits of shape {logits.shape}, expected "
                       f"[{batch_size}, 1, vocab]")
    top = _top_k(logits[:len(chunk), 0, :whole.size], k)
    for r, (_, _, word) in enumerate(chunk):
      tokens = vocab([int(t) for t in top[r] if whole[t]])
      word.candidates = [t for t in tokens if t != word.key]


def _neighbour_candidates(words: list[_Word], table, whole: np.ndarray, k: int, tokenizer,
                          max_scores: int = 2 ** 24) -> None:
  """Fills the candidates of multi-piece words from nearest embeddings (cosine)."""
  unique: dict[str, list[_Word]] = {}
  for w in words:
    unique.setdefault(w.key, []).append(w)
  if not unique:
    return
  if isinstance(table, WordVectors):
    names = table.words
    ok = np.array([w.isalnum() for w in table.words])
    index = {w: i for i, w in enumerate(table.words)}
    keys = [key for key in unique if key in index]
    queries = [table.vectors[index[key]] for key in keys]
    matrix = table.vectors
  else:
    matrix = np.asarray(table, np.float32)
    names = None
    ok = np.zeros(matrix.shape[0], bool)
    ok[:min(whole.size, matrix.shape[0])] = whole[:matrix.shape[0]]
    keys = list(unique)
    queries = [matrix[unique[key][0].pieces].mean(axis=0) for key in keys]
  pool = np.flatnonzero(ok)
  if not keys or not pool.size:
    return
  normed = matrix[pool].astype(np.float32)
  normed /= np.maximum(np.linalg.norm(normed, axis=1, keepdims=True), 1e-12)
  chunk = max(1, max_scores // pool.size)   # bounds the [chunk, pool] similarity matrix
  for c in range(0, len(keys), chunk):
    q = np.stack(queries[c:c + chunk]).astype(np.float32)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    top = pool[_top_k(q @ normed.T, k + 1)]   # +1: the word itself may be among them
    for key, ids in zip(keys[c:c + chunk], top):
      if names is None:
        tokens = tokenizer.convert_ids_to_tokens([int(t) for t in ids])
      else:
        tokens = [names[t] for t in ids]
      cands = [t for t in tokens if t != key][:k]
      for w in unique[key]:
        w.candidates = cands


# ---------------------------------------------------------------------------------------------
# Augmentation.

def _check_settings(p_t, n_aug, k, seed, max_seq_length, fields, mlm_context):
  if not 0.0 <= p_t <= 1.0:
    raise ValueError(f"p_t must be a probability in [0, 1], got {p_t}")
  if n_aug < 0:
    raise ValueError(f"n_aug must be >= 0, got {n_aug}")
  if k < 1:
    raise ValueError(f"k (candidates per word) must be >= 1, got {k}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  if max_seq_length < 3:
    raise ValueError(f"max_seq_length {max_seq_length} is too short")
  bad = [f for f in fields if f not in _FIELDS]
  if bad or not fields or len(set(fields)) != len(fields):
    raise ValueError(f"fields must name some of {list(_FIELDS)} once each, got {list(fields)}")
  if mlm_context not in _MLM_CONTEXTS:
    raise ValueError(f"mlm_context must be one of {_MLM_CONTEXTS}, got {mlm_context!r}")


def _replace(text: str, words: Sequence[_Word], choice: Mapping[int, str]) -> str:
  out, last = [], 0
  for n, w in enumerate(words):
    if n in choice:
      out += [text[last:w.start], choice[n]]
      last = w.end
  return "".join(out) + text[last:]


def augment_examples(examples: Sequence[GlueExample], tokenizer, mlm_predict: MlmPredict | None,
                     word_embeddings: np.ndarray | WordVectors | None, *, p_t: float = 0.4,
                     n_aug: int | None = None, k: int = 15, seed: int = 0,
                     max_seq_length: int = MLM_MAX_LENGTH, fields: Sequence[str] = _FIELDS,
                     batch_size: int = 128, task: str | GlueTask | None = None,
                     stop_words: Collection[str] = STOP_WORDS, dedup: bool = True,
                     separate_fields: bool = True, mlm_context: str = "masked_and_original"
                     ) -> list[GlueExample]:
  """TinyBERT's augmentation: each original followed by its copies (guid "<guid>-aug<j>").

  Args:
    examples: the task's examples; label and index are kept in the copies.
    tokenizer: the teacher's fast WordPiece tokenizer (`load_tokenizer`).
    mlm_predict: the teacher's MLM (`mlm_predict_fn`); None leaves single-piece words alone.
    word_embeddings: [vocab, dim] token embeddings for multi-piece words (the teacher's,
      `token_embedding_table`), or GloVe `WordVectors` (the release); None leaves multi-piece
      words alone.
    p_t: probability of replacing a word that has candidates.
    n_aug: N_a, tries per field; None: `task_n_aug(task)` (the release's value for the task).
    k: candidates per word (top-k, then non-whole-word tokens and the word itself dropped).
    seed: the output is a function of (seed, examples, models and settings).
    max_seq_length: the cut of the MLM's input (512 in the release), at most the MLM's
      `max_positions` when it has one (`mlm_predict_fn`).
    fields: the text fields to augment, in this order.
    batch_size: masked words per MLM call (one masked word per row).
    task: the GLUE task, for its N_a.
    stop_words: words never replaced (lower case; the release's list; () for the paper).
    dedup: drop a try equal to the original or an earlier copy (the release); False keeps
      exactly n_aug copies per field (the paper).
    separate_fields: augment the fields of a pair one at a time, the other kept (the release);
      False changes all of them in every copy.
    mlm_context: "masked_and_original" (the release) or "masked" (the paper); see `mlm_input`.
  """
  n_aug = task_n_aug(task, n_aug)
  _check_settings(p_t, n_aug, k, seed, max_seq_length, fields, mlm_context)
  max_seq_length = min(max_seq_length, getattr(mlm_predict, "max_positions", max_seq_length))
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not getattr(tokenizer, "is_fast", False):
    raise ValueError("augment_examples needs a fast tokenizer (for word offsets); use "
                     "mobilebert_jax.data.load_tokenizer")
  examples = list(examples)
  if not examples:
    return []
  stop_words = frozenset(w.lower() for w in stop_words)
  whole = _whole_word_mask(tokenizer, len(tokenizer))
  if isinstance(word_embeddings, WordVectors):
    table = word_embeddings
  elif word_embeddings is not None:
    table = np.asarray(word_embeddings)
    if table.ndim != 2 or table.shape[0] < len(tokenizer.get_vocab()):
      raise ValueError(f"word_embeddings must be [vocab, dim] with vocab >= the tokenizer's "
                       f"{len(tokenizer.get_vocab())} tokens, got shape {table.shape}")
  else:
    table = None

  per_example, rows, multi = [], [], []
  encoded = {field: tokenizer([getattr(ex, field) or "" for ex in examples],
                              add_special_tokens=False, return_offsets_mapping=True)
             for field in fields}
  for i, ex in enumerate(examples):
    words = {}
    for field in fields:
      text = getattr(ex, field)
      if text is None:
        continue
      enc = encoded[field]
      pieces = enc["input_ids"][i]
      words[field] = _find_words(tokenizer, text, pieces, enc["offset_mapping"][i],
                                 enc.word_ids(i), stop_words)
      for w in words[field]:
        if len(w.pieces) > 1:
          multi.append(w)
          continue
        if 1 + w.first_piece < max_seq_length:   # else the [MASK] falls past the cut
          rows.append((pieces, w.first_piece, w))
    per_example.append(words)

  active = n_aug > 0 and p_t > 0
  log.info("augmentation: %d examples, %d single-piece words (MLM, batches of %d), %d "
           "multi-piece words", len(examples), len(rows), batch_size, len(multi))
  if mlm_predict is not None and rows and active:
    _mlm_candidates(rows, tokenizer, mlm_predict, k, whole, batch_size, max_seq_length,
                    mlm_context)
  if table is not None and multi and active:
    _neighbour_candidates(multi, table, whole, k, tokenizer)

  out: list[GlueExample] = []
  for i, (ex, words) in enumerate(zip(examples, per_example)):
    out.append(ex)
    present = [field for field in fields if field in words]
    groups = [[field] for field in present] if separate_fields else [present] if present else []
    j = 0
    for group in groups:
      rng = np.random.default_rng([seed, i] + [_FIELDS.index(f) for f in group])
      seen = {tuple(getattr(ex, f) for f in group)}
      for _ in range(n_aug):
        texts = {}
        for field in group:
          choice = {}
          for n, w in enumerate(words[field]):
            if w.candidates and rng.random() < p_t:
              choice[n] = w.candidates[rng.integers(len(w.candidates))]
          texts[field] = _replace(getattr(ex, field), words[field], choice)
        key = tuple(texts[f] for f in group)
        if dedup and key in seen:
          continue
        seen.add(key)
        j += 1
        out.append(dataclasses.replace(ex, guid=f"{ex.guid}-aug{j}", **texts))
  return out


# ---------------------------------------------------------------------------------------------
# On-disk cache.

def _digest(*parts) -> str:
  h = hashlib.sha256()
  for part in parts:
    if isinstance(part, np.ndarray):
      h.update(str((part.dtype.str, part.shape)).encode())
      h.update(np.ascontiguousarray(part).tobytes())
    else:
      h.update(json.dumps(part, sort_keys=True, ensure_ascii=False).encode())
  return h.hexdigest()[:32]


def _example_dict(ex: GlueExample) -> dict:
  return {"guid": ex.guid, "text_a": ex.text_a, "text_b": ex.text_b, "label": ex.label,
          "index": ex.index}


def cache_settings(examples: Sequence[GlueExample], tokenizer, word_embeddings, *, p_t: float,
                   n_aug: int, k: int, seed: int, max_seq_length: int, fields: Sequence[str],
                   teacher: str | None = None, stop_words: Collection[str] = STOP_WORDS,
                   dedup: bool = True, separate_fields: bool = True,
                   mlm_context: str = "masked_and_original") -> dict:
  """What an augmented set depends on, as its cache header records it (hashes for the data).

  The MLM is opaque here: the embeddings (when given; the teacher's own table identifies the
  teacher) are hashed and `teacher` (e.g. its checkpoint path) is recorded as given.
  """
  if isinstance(word_embeddings, WordVectors):
    embeddings = _digest(list(word_embeddings.words), np.asarray(word_embeddings.vectors))
  elif word_embeddings is not None:
    embeddings = _digest(np.asarray(word_embeddings))
  else:
    embeddings = None
  vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
  return {"p_t": float(p_t), "n_aug": int(n_aug), "k": int(k), "seed": int(seed),
          "max_seq_length": int(max_seq_length), "fields": list(fields),
          "examples": _digest([_example_dict(ex) for ex in examples]),
          "num_examples": len(examples), "vocab": _digest(vocab),
          "embeddings": embeddings, "teacher": teacher,
          "stop_words": _digest(sorted({w.lower() for w in stop_words})),
          "dedup": bool(dedup), "separate_fields": bool(separate_fields),
          "mlm_context": str(mlm_context)}


def _read_cache(path: epath.Path, settings: dict) -> list[GlueExample] | None:
  """The cached examples, or None when missing, unreadable or made with other settings."""
  if not path.is_file():
    return None
  try:
    with path.open("r", encoding="utf-8") as f:
      header = json.loads(f.readline())
      if (header.get("format"), header.get("version")) != (CACHE_FORMAT, CACHE_VERSION):
        log.info("augmentation cache %s: not a version %d cache; rebuilding", path,
                 CACHE_VERSION)
        return None
      if header.get("settings") != settings:
        changed = sorted(key for key in set(settings) | set(header.get("settings") or {})
                         if (header.get("settings") or {}).get(key) != settings.get(key))
        log.info("augmentation cache %s: settings changed (%s); rebuilding", path,
                 ", ".join(changed))
        return None
      examples = [GlueExample(**json.loads(line)) for line in f if line.strip()]
  except (ValueError, TypeError, OSError) as e:
    log.warning("augmentation cache %s is unreadable (%s); rebuilding", path, e)
    return None
  if len(examples) != header.get("count"):
    log.warning("augmentation cache %s holds %d examples, its header says %s; rebuilding",
                path, len(examples), header.get("count"))
    return None
  return examples


def _write_cache(path: epath.Path, settings: dict, examples: Sequence[GlueExample]) -> None:
  """Writes a temporary file beside `path`, then renames it to `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
  try:
    with tmp.open("w", encoding="utf-8") as f:
      header = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "count": len(examples),
                "settings": settings}
      f.write(json.dumps(header, ensure_ascii=False) + "\n")
      for ex in examples:
        f.write(json.dumps(_example_dict(ex), ensure_ascii=False) + "\n")
      f.flush()
      if "://" not in os.fspath(path):
        os.fsync(f.fileno())
    tmp.replace(path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def load_or_augment(cache_path: str | os.PathLike, examples: Sequence[GlueExample], tokenizer,
                    mlm_predict: MlmPredict | None, word_embeddings, *, p_t: float = 0.4,
                    n_aug: int | None = None, k: int = 15, seed: int = 0,
                    max_seq_length: int = MLM_MAX_LENGTH, fields: Sequence[str] = _FIELDS,
                    batch_size: int = 128, teacher: str | None = None,
                    task: str | GlueTask | None = None, stop_words: Collection[str] = STOP_WORDS,
                    dedup: bool = True, separate_fields: bool = True,
                    mlm_context: str = "masked_and_original") -> list[GlueExample]:
  """`augment_examples`, cached as JSON lines at `cache_path` (a header, then one example a line;
  local or gs://..., through `etils.epath`).

  The cache is reused when its header has this CACHE_VERSION and matches `cache_settings` (the
  settings and hashes of the examples, the vocab and the embeddings, plus `teacher`), otherwise
  rebuilt and replaced atomically (temporary file + rename); a version-1 cache (every field
  changed in each copy, no stop words, no de-duplication) is rebuilt. Arguments as for
  augment_examples.
  """
  path = os.fspath(cache_path)
  path = epath.Path(path if "://" in path else os.path.expanduser(path))
  examples = list(examples)
  knobs = dict(p_t=p_t, n_aug=task_n_aug(task, n_aug), k=k, seed=seed,
               max_seq_length=max_seq_length, fields=tuple(fields), stop_words=stop_words,
               dedup=dedup, separate_fields=separate_fields, mlm_context=mlm_context)
  settings = cache_settings(examples, tokenizer, word_embeddings, teacher=teacher, **knobs)
  cached = _read_cache(path, settings)
  if cached is not None:
    log.info("augmentation: reusing %d examples from %s", len(cached), path)
    return cached
  augmented = augment_examples(examples, tokenizer, mlm_predict, word_embeddings,
                               batch_size=batch_size, **knobs)
  _write_cache(path, settings, augmented)
  log.info("augmentation: wrote %d examples (%d originals) to %s", len(augmented),
           len(examples), path)
  return augmented
