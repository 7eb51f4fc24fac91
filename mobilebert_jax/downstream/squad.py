"""SQuAD v1.1 / v2.0: reading, the official EM/F1 evaluation, doc-stride features, span decoding.

  examples = read_squad("dev-v2.0.json")
  features = make_features(examples, tokenizer, max_seq_length=384, doc_stride=128,
                           max_query_length=64)
  # model on features.inputs() -> start_logits, end_logits [F, max_seq_length]
  predictions = decode_predictions(features, start_logits, end_logits, version_2=True)
  squad_evaluate(examples, predictions)  # {"exact": .., "f1": .., "HasAns_exact": .., ...}
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import string
from typing import Mapping, Sequence

import numpy as np

from mobilebert_jax.data.sources import epath_of


@dataclasses.dataclass(frozen=True)
class SquadExample:
  """One question. `answers` / `answer_starts`: gold texts and their character offsets in
  `context` (empty for unanswerable SQuAD 2.0 questions)."""
  qid: str
  question: str
  context: str
  answers: tuple[str, ...] = ()
  answer_starts: tuple[int, ...] = ()
  is_impossible: bool = False
  title: str = ""


# ---------------------------------------------------------------------------------------------
# Reading.

def _get(obj, key: str, where: str, path, kind=None):
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: {where} should be a JSON object, got {type(obj).__name__}")
  if key not in obj:
    raise KeyError(f"{path}: {where} has no key {key!r} (it has {sorted(obj)})")
  value = obj[key]
  if kind is not None and not isinstance(value, kind):
    raise ValueError(f"{path}: {where}.{key} should be {kind.__name__}, got "
                     f"{type(value).__name__}")
  return value


def parse_squad(data: Mapping, path: str = "<squad json>") -> list[SquadExample]:
  """Examples from a parsed SQuAD JSON object ({"version", "data": [articles]}); errors name
  `path` and the position of the missing key, e.g. data[0].paragraphs[2].qas[1]."""
  examples: list[SquadExample] = []
  for a, article in enumerate(_get(data, "data", "the top level", path, list)):
    where_a = f"data[{a}]"
    title = article.get("title", "") if isinstance(article, dict) else ""
    for p, paragraph in enumerate(_get(article, "paragraphs", where_a, path, list)):
      where_p = f"{where_a}.paragraphs[{p}]"
      context = _get(paragraph, "context", where_p, path, str)
      for q, qa in enumerate(_get(paragraph, "qas", where_p, path, list)):
        where_q = f"{where_p}.qas[{q}]"
        qid = str(_get(qa, "id", where_q, path))
        question = _get(qa, "question", where_q, path, str)
        answers = _get(qa, "answers", where_q, path, list)
        is_impossible = bool(qa.get("is_impossible", False))
        texts, starts = [], []
        for n, answer in enumerate(answers):
          where_n = f"{where_q}.answers[{n}]"
          texts.append(_get(answer, "text", where_n, path, str))
          start = _get(answer, "answer_start", where_n, path, int)
          if not 0 <= start <= len(context):
            raise ValueError(f"{path}: {where_n}.answer_start {start} is outside its context "
                             f"of {len(context)} characters")
          starts.append(start)
        if is_impossible and answers:
          raise ValueError(f"{path}: {where_q} (id {qid!r}) is marked is_impossible but has "
                           f"{len(answers)} answers")
        examples.append(SquadExample(qid, question, context, tuple(texts), tuple(starts),
                                     is_impossible, title))
  ids = collections.Counter(ex.qid for ex in examples)
  duplicates = [qid for qid, n in ids.items() if n > 1]
  if duplicates:
    raise ValueError(f"{path}: question ids must be unique; {duplicates[:5]} repeat")
  return examples


def read_squad(path: str | os.PathLike) -> list[SquadExample]:
  """Reads a local SQuAD v1.1 / v2.0 JSON file (train-v1.1.json, dev-v2.0.json, ...)."""
  path = epath_of(path)
  if not path.is_file():
    raise FileNotFoundError(f"SQuAD file {str(path)!r} does not exist")
  with path.open("r", encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
  return parse_squad(data, str(path))


def _as_examples(dataset) -> list[SquadExample]:
  if isinstance(dataset, (str, os.PathLike)):
    return read_squad(dataset)
  if isinstance(dataset, Mapping):
    return parse_squad(dataset)
  dataset = list(dataset)
  if dataset and not isinstance(dataset[0], SquadExample):
    return parse_squad({"data": dataset})  # the "data" list of articles, as the official script
  return dataset


# ---------------------------------------------------------------------------------------------
# Official evaluation (SQuAD v2.0 evaluate script, which reduces to v1.1's for answerable data).

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
  """Lowercases, removes ASCII punctuation, the articles a/an/the and extra whitespace."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
  """1 if the normalised strings are equal, else 0."""
  return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
  """Token F1 of the normalised answers: with c = |pred tokens & gold tokens| (multiset),
  P = c / |pred|, R = c / |gold|, F1 = 2 P R / (P + R); if either is empty, 1 iff both are."""
  pred_tokens = normalize_answer(prediction).split()
  gold_tokens = normalize_answer(gold).split()
  if not pred_tokens or not gold_tokens:
    return float(pred_tokens == gold_tokens)
  common = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred_tokens), common / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def _gold_answers(example: SquadExample) -> list[str]:
  """Gold texts that do not normalise to empty; [""] for no-answer questions."""
  golds = [a for a in example.answers if normalize_answer(a)]
  return golds or [""]


def _best_threshold(predictions, scores, na_probs, has_answer) -> tuple[float, float]:
  """The official search: sweep questions by na_prob, abstaining on all with na_prob <= thresh."""
  score = best = sum(1 for qid in scores if not has_answer[qid])
  best_thresh = 0.0
  for qid in sorted(scores, key=lambda k: na_probs[k]):
    if has_answer[qid]:
      score += scores[qid]
    elif predictions.get(qid, ""):
      score -= 1
    if score > best:
      best, best_thresh = score, na_probs[qid]
  return 100.0 * best / len(scores), float(best_thresh)


def squad_evaluate(dataset, predictions: Mapping[str, str],
                   na_probs: Mapping[str, float] | None = None,
                   na_threshold: float = 1.0) -> dict[str, float]:
  """SQuAD EM / F1 in percent, each the max over a question's gold answers.

  `dataset`: a SQuAD JSON path, its parsed object, its "data" list or `SquadExample`s.
  `predictions`: {qid: answer text}, "" meaning no answer. A missing prediction scores 0.
  `na_probs`: {qid: no-answer probability}; where na_prob > `na_threshold` the prediction
  is taken as "no answer" (scores 1 iff the question has none) and best_exact / best_f1 and
  their thresholds are added. With unanswerable questions present (v2.0) the result also has
  HasAns_* and NoAns_* (exact, f1, total).
  """
  examples = _as_examples(dataset)
  if not examples:
    raise ValueError("squad_evaluate: the dataset has no questions")
  exact_scores, f1_scores, has_answer = {}, {}, {}
  for ex in examples:
    golds = _gold_answers(ex)
    has_answer[ex.qid] = bool(ex.answers)
    pred = predictions.get(ex.qid)
    if pred is None:
      exact_scores[ex.qid] = f1_scores[ex.qid] = 0.0
      continue
    exact_scores[ex.qid] = max(exact_match(pred, g) for g in golds)
    f1_scores[ex.qid] = max(f1(pred, g) for g in golds)
  raw_exact, raw_f1 = dict(exact_scores), dict(f1_scores)
  if na_probs is not None:
    missing = [qid for qid in exact_scores if qid not in na_probs]
    if missing:
      raise KeyError(f"na_probs has no entry for {len(missing)} questions, e.g. {missing[:3]}")
    for qid in exact_scores:
      if na_probs[qid] > na_threshold:
        exact_scores[qid] = f1_scores[qid] = float(not has_answer[qid])

  def summary(qids, prefix=""):
    return {f"{prefix}exact": 100.0 * float(np.mean([exact_scores[q] for q in qids])),
            f"{prefix}f1": 100.0 * float(np.mean([f1_scores[q] for q in qids])),
            f"{prefix}total": len(qids)}

  result = summary(list(exact_scores))
  if not all(has_answer.values()):
    for prefix, flag in (("HasAns_", True), ("NoAns_", False)):
      qids = [q for q in exact_scores if has_answer[q] == flag]
      if qids:
        result.update(summary(qids, prefix))
  missing_preds = sum(1 for q in exact_scores if q not in predictions)
  if missing_preds:
    result["missing"] = missing_preds
  if na_probs is not None:
    result["best_exact"], result["best_exact_thresh"] = _best_threshold(
        predictions, raw_exact, na_probs, has_answer)
    result["best_f1"], result["best_f1_thresh"] = _best_threshold(
        predictions, raw_f1, na_probs, has_answer)
  return result


# ---------------------------------------------------------------------------------------------
# Doc-stride features.

@dataclasses.dataclass
class SquadFeatures:
  """Windows `[CLS] question [SEP] context window [SEP] pad`, several per long example.

  input_ids, attention_mask, token_type_ids: int32 [F, L]; start_positions, end_positions:
  int32 [F], token indices of the first answer (0 = [CLS]: no answer or not in this window);
  example_index: int32 [F], position of the window's example in `examples`; offsets: int32
  [F, L, 2], the (start, end) character span in the example's context of each context token,
  (-1, -1) for other tokens; max_context: bool [F, L], True where this window gives the token
  its most centred view (BERT's rule; only such tokens may start a predicted span).
  """
  input_ids: np.ndarray
  attention_mask: np.ndarray
  token_type_ids: np.ndarray
  start_positions: np.ndarray
  end_positions: np.ndarray
  example_index: np.ndarray
  offsets: np.ndarray
  max_context: np.ndarray
  examples: list[SquadExample]

  def __len__(self) -> int:
    return len(self.input_ids)

  def inputs(self) -> dict[str, np.ndarray]:
    """The model's arrays: input_ids, attention_mask, token_type_ids, start/end_positions."""
    return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids, "start_positions": self.start_positions,
            "end_positions": self.end_positions}


def doc_spans(num_tokens: int, window: int, doc_stride: int) -> list[tuple[int, int]]:
  """(start, length) windows over `num_tokens` context tokens: starts advance by
  min(length, doc_stride) until a window reaches the end (BERT's run_squad)."""
  spans, start = [], 0
  while True:
    length = min(num_tokens - start, window)
    spans.append((start, length))
    if start + length >= num_tokens:
      return spans
    start += min(length, doc_stride)


def max_context_span(spans: list[tuple[int, int]], num_tokens: int) -> np.ndarray:
  """For each context token, the span maximising min(left, right) + 0.01 * length, where left /
  right count the span's tokens on each side of it (first such span on ties; BERT's rule)."""
  position = np.arange(num_tokens)
  scores = np.full((len(spans), num_tokens), -np.inf)
  for i, (start, length) in enumerate(spans):
    end = start + length - 1
    inside = (position >= start) & (position <= end)
    score = np.minimum(position - start, end - position) + 0.01 * length
    scores[i] = np.where(inside, score, -np.inf)
  return scores.argmax(axis=0)


def _answer_tokens(offsets: np.ndarray, char_start: int, char_end: int) -> tuple[int, int] | None:
  """First and last context tokens overlapping the characters [char_start, char_end)."""
  inside = np.nonzero((offsets[:, 1] > char_start) & (offsets[:, 0] < char_end))[0]
  if inside.size == 0:
    return None
  return int(inside[0]), int(inside[-1])


def make_features(examples: Sequence[SquadExample], tokenizer, max_seq_length: int = 384,
                  doc_stride: int = 128, max_query_length: int = 64) -> SquadFeatures:
  """Tokenizes examples into doc-stride windows (see `SquadFeatures`).

  The question is cut to `max_query_length` tokens; each window holds up to
  max_seq_length - len(question) - 3 context tokens, window starts `doc_stride` tokens apart.
  Character offsets come from the fast tokenizer's offset mapping. The first gold answer gives
  start/end positions where it lies wholly inside the window, [CLS] (0) otherwise.
  """
  if not examples:
    raise ValueError("make_features got no examples")
  if doc_stride < 1 or max_query_length < 1:
    raise ValueError(f"doc_stride ({doc_stride}) and max_query_length ({max_query_length}) "
                     "must be positive")
  contexts = list(dict.fromkeys(ex.context for ex in examples))
  encoded = tokenizer(contexts, add_special_tokens=False, return_offsets_mapping=True)
  context_tokens = {c: (ids, np.asarray(offs, np.int64).reshape(-1, 2)) for c, ids, offs in
                    zip(contexts, encoded["input_ids"], encoded["offset_mapping"])}
  questions = tokenizer([ex.question for ex in examples], add_special_tokens=False)["input_ids"]
  cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id

  rows = collections.defaultdict(list)
  for e, ex in enumerate(examples):
    query = list(questions[e][:max_query_length])
    window = max_seq_length - len(query) - 3
    if window < 1:
      raise ValueError(f"max_seq_length {max_seq_length} leaves no room for context after a "
                       f"question of {len(query)} tokens (question {ex.qid!r}); raise it or "
                       "lower max_query_length")
    doc_ids, doc_offsets = context_tokens[ex.context]
    answer = None
    if ex.answers and not ex.is_impossible:
      start_char = ex.answer_starts[0]
      answer = _answer_tokens(doc_offsets, start_char, start_char + len(ex.answers[0]))
    spans = doc_spans(len(doc_ids), window, doc_stride)
    best_span = max_context_span(spans, len(doc_ids))
    first = len(query) + 2  # sequence index of the first context token
    for s, (start, length) in enumerate(spans):
      ids = [cls] + query + [sep] + list(doc_ids[start:start + length]) + [sep]
      n = len(ids)
      input_ids = np.full(max_seq_length, pad, np.int32)
      input_ids[:n] = ids
      mask = np.zeros(max_seq_length, np.int32)
      mask[:n] = 1
      types_ = np.zeros(max_seq_length, np.int32)
      types_[first:n] = 1
      offsets = np.full((max_seq_length, 2), -1, np.int32)
      offsets[first:first + length] = doc_offsets[start:start + length]
      max_context = np.zeros(max_seq_length, bool)
      max_context[first:first + length] = best_span[start:start + length] == s
      start_pos = end_pos = 0
      if answer is not None and start <= answer[0] and answer[1] < start + length:
        start_pos, end_pos = first + answer[0] - start, first + answer[1] - start
      for key, value in (("input_ids", input_ids), ("attention_mask", mask),
                         ("token_type_ids", types_), ("start_positions", start_pos),
                         ("end_positions", end_pos), ("example_index", e), ("offsets", offsets),
                         ("max_context", max_context)):
        rows[key].append(value)
  arrays = {k: np.asarray(v, bool if k == "max_context" else np.int32) for k, v in rows.items()}
  return SquadFeatures(examples=list(examples), **arrays)


# ---------------------------------------------------------------------------------------------
# Decoding.

@dataclasses.dataclass(frozen=True)
class BestSpan:
  """An example's best answer span: its text, character offsets [start, end) in the context
  (-1 without a valid span), score = start + end logit, and the null ([CLS]) score."""
  text: str
  start: int
  end: int
  score: float
  null_score: float


def best_spans(features: SquadFeatures, start_logits, end_logits, n_best: int = 20,
               max_answer_length: int = 30) -> dict[str, BestSpan]:
  """{qid: BestSpan} from per-window start/end logits [F, L].

  For each window, the `n_best` highest start and end logits form candidate spans, kept if both
  ends are context tokens, end >= start, end - start + 1 <= max_answer_length and the start has
  its max context in the window; the answer is the best start + end logit over the example's
  windows, cut from the context by the character offsets ("" if no span is valid). The null
  score is the minimum over windows of start[0] + end[0].
  """
  start_logits = np.asarray(start_logits, np.float64)
  end_logits = np.asarray(end_logits, np.float64)
  shape = features.input_ids.shape
  if start_logits.shape != shape or end_logits.shape != shape:
    raise ValueError(f"start/end logits must have the features' shape {shape}, got "
                     f"{start_logits.shape} and {end_logits.shape}")
  by_example = collections.defaultdict(list)
  for f, e in enumerate(features.example_index):
    by_example[int(e)].append(f)
  spans = {}
  for e, ex in enumerate(features.examples):
    best_score, best = -np.inf, (-1, -1)
    null_score = np.inf
    for f in by_example.get(e, ()):
      s_logits, e_logits = start_logits[f], end_logits[f]
      offsets, max_context = features.offsets[f], features.max_context[f]
      null_score = min(null_score, s_logits[0] + e_logits[0])
      starts = np.argsort(-s_logits, kind="stable")[:n_best]
      ends = np.argsort(-e_logits, kind="stable")[:n_best]
      for i in starts:
        if offsets[i, 0] < 0 or not max_context[i]:
          continue
        for j in ends:
          if offsets[j, 0] < 0 or j < i or j - i + 1 > max_answer_length:
            continue
          score = s_logits[i] + e_logits[j]
          if score > best_score:
            best_score, best = score, (int(offsets[i, 0]), int(offsets[j, 1]))
    text = ex.context[best[0]:best[1]] if best[0] >= 0 else ""
    spans[ex.qid] = BestSpan(text, best[0], best[1], float(best_score), float(null_score))
  return spans


def decode_predictions(features: SquadFeatures, start_logits, end_logits, n_best: int = 20,
                       max_answer_length: int = 30, null_threshold: float = 0.0,
                       version_2: bool = False, return_null_odds: bool = False):
  """{qid: answer text} from per-window start/end logits [F, L] (the spans of `best_spans`).

  v2: answer "" when null score - best span score > null_threshold. `return_null_odds` also
  returns {qid: that difference} (+inf without a valid span), usable as `na_probs` for
  squad_evaluate.
  """
  spans = best_spans(features, start_logits, end_logits, n_best, max_answer_length)
  predictions, null_odds = {}, {}
  for qid, span in spans.items():
    diff = span.null_score - span.score  # +inf without a valid span
    null_odds[qid] = float(diff)
    predictions[qid] = "" if version_2 and diff > null_threshold else span.text
  return (predictions, null_odds) if return_null_odds else predictions
