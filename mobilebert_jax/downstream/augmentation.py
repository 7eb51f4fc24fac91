"""TinyBERT's task data augmentation: word replacement by the teacher's MLM or embeddings.

  predict = mlm_predict_fn(teacher_model, teacher_params)        # pretraining / masked_lm head
  table = token_embedding_table(teacher_params)                  # or load_glove("glove.txt")
  train = load_or_augment("workdir/sst2_aug.jsonl", read_glue("sst2", "train", data_dir),
                          tokenizer, predict, table)             # 21x the examples

For every word of an example (a whitespace token, surrounding punctuation kept aside) the
candidates are computed once: a word the tokenizer keeps as one WordPiece is masked in its
sentence and the teacher's top-K MLM predictions that are whole words become its candidates; a
word split into several pieces gets the K whole-word tokens nearest (cosine) to the mean of its
piece embeddings (with GloVe vectors: the K GloVe words nearest to the word's own vector). Each
augmented copy then replaces every word that has candidates with probability p_t by one of them,
drawn uniformly. Words that are not alphanumeric (after stripping leading/trailing punctuation,
e.g. "don't", "e-mail"), and single-piece words past `max_seq_length`, are left as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mobilebert_jax.compilation import jit_inference
from mobilebert_jax.downstream.glue_data import GlueExample, truncate_pair
from mobilebert_jax.models.heads import ForMaskedLM, ForPreTraining

log = logging.getLogger("mobilebert_jax")

# (input_ids [B, L], attention_mask [B, L], token_type_ids [B, L], masked_lm_positions [B, P])
# -> logits [B, P, vocab]; numpy in, numpy out.
MlmPredict = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]

CACHE_FORMAT = "mobilebert_jax.augmentation"
CACHE_VERSION = 1
_FIELDS = ("text_a", "text_b")
_WORD = re.compile(r"\S+")


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
  """Reads a GloVe text file (`word v1 ... vD` per line), the first `max_words` lines at most."""
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

  One compilation per input shape; `augment_examples` pads its batches to few shapes.
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

  return predict


# ---------------------------------------------------------------------------------------------
# Words and candidates.

@dataclasses.dataclass
class _Word:
  start: int             # the replaceable core: text[start:end]
  end: int
  key: str               # the core as the tokenizer normalises it (lower-cased when uncased)
  pieces: list[int]      # WordPiece ids of the core
  first_piece: int       # index of the first piece in the field's tokens
  candidates: list[str] = dataclasses.field(default_factory=list)


def _core_span(text: str, start: int, end: int) -> tuple[int, int]:
  while start < end and not text[start].isalnum():
    start += 1
  while end > start and not text[end - 1].isalnum():
    end -= 1
  return start, end


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


def _find_words(tokenizer, text: str, ids, offsets) -> list[_Word]:
  """The replaceable words of `text` with their pieces (from the fast tokenizer's offsets)."""
  words = []
  t = 0
  for m in _WORD.finditer(text):
    start, end = _core_span(text, m.start(), m.end())
    while t < len(offsets) and offsets[t][1] <= start:
      t += 1
    first = t
    while t < len(offsets) and offsets[t][0] < end:
      t += 1
    inside = all(start <= s and e <= end for s, e in offsets[first:t])
    if start == end or not text[start:end].isalnum() or first == t or not inside:
      continue
    key = _normalize(tokenizer, text[start:end])
    if not key or not key.isalnum():
      continue
    words.append(_Word(start, end, key, list(ids[first:t]), first))
  return words


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


def _mlm_candidates(rows, sequences, tokenizer, mlm_predict, k, whole, batch_size,
                    max_seq_length):
  """Fills the candidates of single-piece words: one masked word per row, rows batched."""
  vocab = tokenizer.convert_ids_to_tokens
  rows = sorted(rows, key=lambda r: len(sequences[r[0]][0]))   # similar lengths together
  for b in range(0, len(rows), batch_size):
    chunk = rows[b:b + batch_size]
    length = _bucket(max(len(sequences[i][0]) for i, _, _ in chunk), max_seq_length)
    shape = (batch_size, length)
    ids = np.full(shape, tokenizer.pad_token_id, np.int32)
    mask = np.zeros(shape, np.int32)
    types = np.zeros(shape, np.int32)
    positions = np.zeros((batch_size, 1), np.int32)
    ids[len(chunk):, :2] = tokenizer.cls_token_id, tokenizer.sep_token_id   # filler rows
    mask[len(chunk):, :2] = 1
    for r, (i, pos, _) in enumerate(chunk):
      seq, seg = sequences[i]
      ids[r, :len(seq)], mask[r, :len(seq)], types[r, :len(seq)] = seq, 1, seg
      ids[r, pos] = tokenizer.mask_token_id
      positions[r, 0] = pos
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

def _check_settings(p_t, n_aug, k, seed, max_seq_length, fields):
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
  if bad or not fields:
    raise ValueError(f"fields must name some of {list(_FIELDS)}, got {list(fields)}")


def _replace(text: str, words: Sequence[_Word], choice: Mapping[int, str]) -> str:
  out, last = [], 0
  for n, w in enumerate(words):
    if n in choice:
      out += [text[last:w.start], choice[n]]
      last = w.end
  return "".join(out) + text[last:]


def augment_examples(examples: Sequence[GlueExample], tokenizer, mlm_predict: MlmPredict | None,
                     word_embeddings: np.ndarray | WordVectors | None, *, p_t: float = 0.4,
                     n_aug: int = 20, k: int = 15, seed: int = 0, max_seq_length: int = 128,
                     fields: Sequence[str] = _FIELDS, batch_size: int = 128
                     ) -> list[GlueExample]:
  """TinyBERT's augmentation: each original followed by `n_aug` copies (guid "<guid>-aug<j>").

  Args:
    examples: the task's examples; label and index are kept in the copies.
    tokenizer: the teacher's fast WordPiece tokenizer (`load_tokenizer`).
    mlm_predict: the teacher's MLM (`mlm_predict_fn`); None leaves single-piece words alone.
    word_embeddings: [vocab, dim] token embeddings for multi-piece words (the teacher's,
      `token_embedding_table`), or GloVe `WordVectors`; None leaves multi-piece words alone.
    p_t: probability of replacing a word that has candidates; n_aug: copies per example;
    k: candidates per word (top-k, then non-whole-word tokens and the word itself dropped).
    seed: the output is a function of (seed, examples, models); max_seq_length: the MLM's
      input length (pairs truncated longest-first); fields: the text fields to augment.
    batch_size: masked words per MLM call (one masked word per row).
  """
  _check_settings(p_t, n_aug, k, seed, max_seq_length, fields)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not getattr(tokenizer, "is_fast", False):
    raise ValueError("augment_examples needs a fast tokenizer (for word offsets); use "
                     "mobilebert_jax.data.load_tokenizer")
  examples = list(examples)
  if not examples:
    return []
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

  encoded = {}
  for field in _FIELDS:
    texts = [getattr(ex, field) or "" for ex in examples]
    encoded[field] = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
  cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
  per_example, sequences, rows, multi = [], [], [], []
  for i, ex in enumerate(examples):
    ids_a = list(encoded["text_a"]["input_ids"][i])
    ids_b = list(encoded["text_b"]["input_ids"][i]) if ex.text_b is not None else None
    truncate_pair(ids_a, ids_b, max_seq_length - (3 if ids_b is not None else 2))
    seq, seg = [cls] + ids_a + [sep], [0] * (len(ids_a) + 2)
    if ids_b is not None:
      seq, seg = seq + ids_b + [sep], seg + [1] * (len(ids_b) + 1)
    sequences.append((seq, seg))
    words = {}
    for field in fields:
      text = getattr(ex, field)
      if text is None:
        continue
      words[field] = _find_words(tokenizer, text, encoded[field]["input_ids"][i],
                                 encoded[field]["offset_mapping"][i])
      kept, offset = (len(ids_a), 1) if field == "text_a" else (len(ids_b), len(ids_a) + 2)
      for w in words[field]:
        if len(w.pieces) > 1:
          multi.append(w)
        elif w.first_piece < kept:
          rows.append((i, offset + w.first_piece, w))
    per_example.append(words)

  active = n_aug > 0 and p_t > 0
  log.info("augmentation: %d examples, %d single-piece words (MLM, batches of %d), %d "
           "multi-piece words", len(examples), len(rows), batch_size, len(multi))
  if mlm_predict is not None and rows and active:
    _mlm_candidates(rows, sequences, tokenizer, mlm_predict, k, whole, batch_size,
                    max_seq_length)
  if table is not None and multi and active:
    _neighbour_candidates(multi, table, whole, k, tokenizer)

  out: list[GlueExample] = []
  for i, (ex, words) in enumerate(zip(examples, per_example)):
    out.append(ex)
    rng = np.random.default_rng([seed, i])
    for j in range(1, n_aug + 1):
      texts = {}
      for field, ws in words.items():
        choice = {}
        for n, w in enumerate(ws):
          if w.candidates and rng.random() < p_t:
            choice[n] = w.candidates[rng.integers(len(w.candidates))]
        texts[field] = _replace(getattr(ex, field), ws, choice)
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
                   teacher: str | None = None) -> dict:
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
          "embeddings": embeddings, "teacher": teacher}


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
                    n_aug: int = 20, k: int = 15, seed: int = 0, max_seq_length: int = 128,
                    fields: Sequence[str] = _FIELDS, batch_size: int = 128,
                    teacher: str | None = None) -> list[GlueExample]:
  """`augment_examples`, cached as JSON lines at `cache_path` (a header, then one example a line;
  local or gs://..., through `etils.epath`).

  The cache is reused when its header matches `cache_settings` (the settings and hashes of the
  examples, the vocab and the embeddings, plus `teacher`), otherwise rebuilt and replaced
  atomically (temporary file + rename). Arguments as for augment_examples.
  """
  path = os.fspath(cache_path)
  path = epath.Path(path if "://" in path else os.path.expanduser(path))
  examples = list(examples)
  knobs = dict(p_t=p_t, n_aug=n_aug, k=k, seed=seed, max_seq_length=max_seq_length,
               fields=tuple(fields))
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
