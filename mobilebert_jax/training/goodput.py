"""Goodput of a training run: model FLOPs utilisation, tokens/s per device and where the wall
time goes, for every log line of the training loop (and the benchmarks).

Model FLOPs are counted analytically (the convention of the PaLM paper's MFU): a transformer's
forward pass costs, per token, 2 x its non-embedding parameters (each weight one multiply-add),
plus the attention products 2 x 2 x layers x length x attention width (scores QK^T and the
weighted sum of V), plus 2 x hidden x vocab on each masked position for the MLM output
projection. Training costs 3 x the forward pass (forward, and backward for activations and
weights); a frozen teacher's forward pass 1 x. Recomputation under remat is not counted, which
is what makes them *model* FLOPs.

    MFU = model FLOPs per step x steps/s / (peak FLOP/s per device x devices)

The peak is the dense bf16 matrix peak of one chip (`PEAK_TFLOPS`, by `device_kind`), or
`config.peak_tflops` when set (needed on CPU and on chips the table lacks). float32 runs are
measured against the same bf16 peak, the usual convention, so their MFU reads low.
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Any, Iterator

import jax
import numpy as np

# Dense bf16 TFLOP/s per chip, from the vendors' data sheets; matched as substrings of
# `device.device_kind` in this order (so "TPU v5 lite" is found before "TPU v5").
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v4", 275.0), ("TPU v3", 123.0),
    ("TPU v2", 45.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
    ("L4", 121.0), ("A10", 125.0), ("V100", 125.0),
)
# Time activities the loop measures; "step" is the rest of the wall time (dispatch, the device
# work the loop waits for, logging).
ACTIVITIES = ("step", "data", "checkpoint", "compile")


def peak_tflops(device: Any = None, override: float = 0.0) -> float | None:
  """Peak dense bf16 TFLOP/s of one `device` (default: the first), `override` when > 0; None
  when unknown (e.g. CPU)."""
  if override and override > 0:
    return float(override)
  kind = getattr(device if device is not None else jax.devices()[0], "device_kind", "")
  for name, peak in PEAK_TFLOPS:
    if name.lower() in kind.lower():
      return peak
  return None


def _size(leaf: Any) -> int:
  return int(np.prod(np.shape(leaf)))


def non_embedding_params(params: Any) -> int:
  """Parameters outside the token/position/type tables and the MLM output rows (arrays or
  ShapeDtypeStructs, canonical or model layout)."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [str(getattr(k, "key", k)) for k in path]
    if "embeddings" in names and names[-1] == "embedding":
      continue
    if names[-1] == "extra_decoder" or names[-2:] == ["mlm", "bias"]:
      continue
    total += _size(leaf)
  return total


def forward_flops(config: Any, params: Any, tokens: int, length: int, masked: int = 0) -> float:
  """Model FLOPs of one forward pass over `tokens` tokens in sequences of `length`, with the
  MLM vocabulary projection on `masked` positions (see the module docstring)."""
  dense = 2 * non_embedding_params(params) * tokens
  attention = 2 * 2 * config.num_layers * length * config.intra_size * tokens
  vocab = 2 * config.hidden_size * config.vocab_size * masked
  return float(dense + attention + vocab)


def train_step_flops(trained: tuple[Any, Any], teacher: tuple[Any, Any] | None, *, batch: int,
                     length: int, masked_per_sequence: int = 0) -> float:
  """Model FLOPs of one training step of `trained` = (config, params), 3 x forward, plus a
  frozen `teacher` = (config, params) forward when given."""
  tokens, masked = batch * length, batch * masked_per_sequence
  flops = 3 * forward_flops(*trained, tokens, length, masked)
  if teacher is not None:
    flops += forward_flops(*teacher, tokens, length, masked)
  return flops


class WallClock:
  """Splits the wall time between reads into `ACTIVITIES`: time measured under
  `measure(activity)` counts for that activity, the rest for "step"."""

  def __init__(self):
    self._start = time.perf_counter()
    self._spent: dict[str, float] = collections.defaultdict(float)

  @contextlib.contextmanager
  def measure(self, activity: str) -> Iterator[None]:
    if activity not in ACTIVITIES[1:]:
      raise ValueError(f"unknown activity {activity!r}; valid: {list(ACTIVITIES[1:])}")
    start = time.perf_counter()
    try:
      yield
    finally:
      self._spent[activity] += time.perf_counter() - start

  def fractions(self) -> dict[str, float]:
    """`time_<activity>_frac` since the last read (summing to 1), then starts a new interval."""
    now = time.perf_counter()
    wall = max(now - self._start, 1e-9)
    shares = {a: min(self._spent.get(a, 0.0) / wall, 1.0) for a in ACTIVITIES[1:]}
    shares["step"] = max(0.0, 1.0 - sum(shares.values()))
    self._start, self._spent = now, collections.defaultdict(float)
    return {f"time_{a}_frac": shares[a] for a in ACTIVITIES}


def utilisation(steps_per_sec: float, *, flops_per_step: float | None, peak: float | None,
                tokens_per_sec: float, num_devices: int) -> dict[str, float]:
  """`tokens_per_sec_per_device`, and `mfu` and `model_tflops_per_device` where the step's
  FLOPs and the peak (TFLOP/s per device) are known."""
  out = {"tokens_per_sec_per_device": tokens_per_sec / max(num_devices, 1)}
  if flops_per_step:
    achieved = flops_per_step * steps_per_sec / max(num_devices, 1) / 1e12
    out["model_tflops_per_device"] = achieved
    if peak:
      out["mfu"] = achieved / peak
  return out
