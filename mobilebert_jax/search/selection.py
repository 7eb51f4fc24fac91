"""Search-space pruning and the budgeted search over blocks.

Pruning (`prune`): within every block and hidden size, the valid candidate paths are ranked by
their block loss and the worst `fraction` dropped, keeping at least `min_keep` (so every hidden
size stays available to every block and a full architecture can still be assembled).

Search (`beam_search`): an architecture takes one path per block at one hidden size; its proxy
loss is the sum of the block losses (NAS-BERT's performance approximation) and its cost the sum of
the blocks' costs plus a fixed part (embeddings, pooler). A beam over the blocks keeps the
`beam_size` lowest-loss partial architectures that can still meet the budget (each partial cost
plus the cheapest way to finish must fit).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np


def prune(valid: np.ndarray, scores: np.ndarray, groups: np.ndarray, fraction: float,
          min_keep: int) -> np.ndarray:
  """The new validity mask [blocks, C] after dropping the worst `fraction` per (block, group).

  `scores` [blocks, C] are losses (lower is better); `groups` [blocks, C] the hidden-size index
  of every candidate. Ties are broken by candidate index, so pruning is deterministic.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"prune fraction must be in [0, 1), got {fraction}")
  if min_keep < 1:
    raise ValueError(f"prune min_keep must be >= 1, got {min_keep}")
  valid = np.asarray(valid, bool).copy()
  scores, groups = np.asarray(scores, np.float64), np.asarray(groups)
  for block in range(valid.shape[0]):
    for group in np.unique(groups[block]):
      members = np.flatnonzero(valid[block] & (groups[block] == group))
      drop = min(int(math.floor(len(members) * fraction)), max(len(members) - min_keep, 0))
      if drop <= 0:
        continue
      order = members[np.lexsort((members, scores[block, members]))]  # by score, then index
      valid[block, order[len(order) - drop:]] = False
  return valid


@dataclasses.dataclass(frozen=True)
class Option:
  """One block's candidate in the search: its proxy loss and costs."""
  index: int
  loss: float
  costs: Mapping[str, float]


def beam_search(options: Sequence[Sequence[Option]], limits: Mapping[str, float],
                fixed: Mapping[str, float],
                beam_size: int = 64) -> tuple[float, list[Option]] | None:
  """The lowest total-loss choice of one option per block within `limits`, or None.

  `limits` maps cost names (e.g. params, latency_ms) to maxima; `fixed` holds each cost's part
  that does not depend on the choice. Exact when `beam_size` covers every feasible partial.
  """
  names = list(limits)
  if any(not block for block in options):
    return None
  # The cheapest possible completion from block i onwards, per cost (a lower bound).
  rest = np.zeros((len(options) + 1, len(names)))
  for i in range(len(options) - 1, -1, -1):
    rest[i] = rest[i + 1] + [min(o.costs[n] for o in options[i]) for n in names]
  beam: list[tuple[float, np.ndarray, list[Option]]] = [
      (0.0, np.asarray([fixed.get(n, 0.0) for n in names], np.float64), [])]
  bound = np.asarray([limits[n] for n in names], np.float64)
  for i, block in enumerate(options):
    grown = []
    for loss, cost, chosen in beam:
      for option in block:
        new_cost = cost + [option.costs[n] for n in names]
        if np.all(new_cost + rest[i + 1] <= bound + 1e-9):
          grown.append((loss + option.loss, new_cost, chosen + [option]))
    if not grown:
      return None
    grown.sort(key=lambda item: (item[0], [o.index for o in item[2]]))
    beam = grown[:beam_size]
  best = beam[0]
  return best[0], best[2]
