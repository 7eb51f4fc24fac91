"""Performance approximation for the NAS search: analytic parameters/FLOPs and a latency table.

Parameter counts and FLOPs are computed from the architecture alone (no model is built). Latency
comes from a table of measured per-op times on the device the search targets: one entry per
(hidden size, op) and one for the embeddings per hidden size, at a fixed batch and sequence
length; an architecture's latency is the sum of its entries. The table is JSON, so it can be
measured once on the target device (`measure_latency_table`) and reused by any search.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mobilebert_jax.compilation import jit_inference
from mobilebert_jax.models import ModelConfig
from mobilebert_jax.models.config import parse_op
from mobilebert_jax.models.encoder import Embeddings
from mobilebert_jax.models.nas_layers import NasLayer

log = logging.getLogger(__name__)
LATENCY_TABLE_VERSION = 1


def op_params(op: str, hidden: int) -> int:
  """Parameters of one NAS layer op at `hidden` (its LayerNorm included)."""
  kind, size = parse_op(op)
  norm = 2 * hidden
  if kind == "mha":
    return 4 * (hidden * hidden + hidden) + norm
  if kind == "ffn":
    return 2 * hidden * size + size + hidden + norm
  if kind == "conv":
    return size * hidden + hidden + hidden * hidden + hidden + norm
  return 0


def embedding_params(config: ModelConfig) -> int:
  """Parameters of the embeddings (token table, widening transform, positions, segments, norm)."""
  h, e = config.hidden_size, config.embedding_size
  total = config.vocab_size * e + (config.max_position_embeddings + config.type_vocab_size) * h
  total += 2 * h
  if config.uses_embedding_transformation:
    total += e * (3 if config.trigram_input else 1) * h + h
  return total


def model_params(config: ModelConfig) -> int:
  """Parameters of a NAS architecture's backbone (embeddings, layers, pooler)."""
  total = embedding_params(config) + sum(op_params(op, config.hidden_size)
                                         for op in config.layer_ops)
  if config.classifier_activation:
    total += config.hidden_size * config.hidden_size + config.hidden_size
  return total


def op_flops(op: str, hidden: int, seq_length: int) -> int:
  """Forward FLOPs per token of one op (2 per multiply-add; matmuls only)."""
  kind, size = parse_op(op)
  if kind == "mha":
    return 2 * 4 * hidden * hidden + 2 * 2 * seq_length * hidden
  if kind == "ffn":
    return 2 * 2 * hidden * size
  if kind == "conv":
    return 2 * size * hidden + 2 * hidden * hidden
  return 0


def model_flops(config: ModelConfig, seq_length: int) -> int:
  """Forward FLOPs per sequence of a NAS architecture's backbone (without the pooler)."""
  per_token = sum(op_flops(op, config.hidden_size, seq_length) for op in config.layer_ops)
  if config.uses_embedding_transformation:
    per_token += 2 * config.embedding_size * (3 if config.trigram_input else 1) * \
        config.hidden_size
  return per_token * seq_length


class LatencyTable:
  """Measured milliseconds per (hidden size, op) and per embedding width, for one device."""

  def __init__(self, ops: Mapping[str, Mapping[str, float]], embeddings: Mapping[str, float],
               *, device: str, batch_size: int, seq_length: int, source: str = "table"):
    self.ops = {str(h): {str(op): float(ms) for op, ms in table.items()}
                for h, table in ops.items()}
    self.embeddings = {str(h): float(ms) for h, ms in embeddings.items()}
    self.device, self.batch_size, self.seq_length = device, int(batch_size), int(seq_length)
    self.source = source

  def op_ms(self, op: str, hidden: int) -> float:
    if op == "identity":
      return 0.0
    try:
      return self.ops[str(hidden)][op]
    except KeyError:
      raise KeyError(f"{self.source}: no latency for op {op!r} at hidden size {hidden}; measure "
                     "a table that covers the search space") from None

  def embeddings_ms(self, hidden: int) -> float:
    try:
      return self.embeddings[str(hidden)]
    except KeyError:
      raise KeyError(f"{self.source}: no embedding latency at hidden size {hidden}") from None

  def latency_ms(self, hidden: int, ops: Iterable[str]) -> float:
    """Approximate forward latency of an architecture: embeddings plus every op."""
    return self.embeddings_ms(hidden) + sum(self.op_ms(op, hidden) for op in ops)

  def to_json(self) -> dict:
    return {"version": LATENCY_TABLE_VERSION, "device": self.device,
            "batch_size": self.batch_size, "seq_length": self.seq_length,
            "embeddings_ms": self.embeddings, "ops_ms": self.ops}

  def save(self, path: str) -> None:
    epath.Path(path).write_text(json.dumps(self.to_json(), indent=2, sort_keys=True))

  @classmethod
  def load(cls, path: str) -> "LatencyTable":
    try:
      data = json.loads(epath.Path(path).read_text())
    except FileNotFoundError:
      raise FileNotFoundError(f"latency table {path} does not exist") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"latency table {path} is not valid JSON: {e}") from None
    missing = [k for k in ("device", "batch_size", "seq_length", "embeddings_ms", "ops_ms")
               if k not in data]
    if missing:
      raise ValueError(f"latency table {path} lacks the keys {missing}")
    return cls(data["ops_ms"], data["embeddings_ms"], device=data["device"],
               batch_size=data["batch_size"], seq_length=data["seq_length"], source=path)

  def covers(self, space) -> list[str]:
    """The (hidden, op) entries a search space needs that the table lacks."""
    missing = []
    for hidden in space.hidden_sizes:
      if str(hidden) not in self.embeddings:
        missing.append(f"embeddings@{hidden}")
      missing += [f"{op}@{hidden}" for op in space.ops_for(hidden)
                  if op != "identity" and op not in self.ops.get(str(hidden), {})]
    return missing


def device_name() -> str:
  """A readable name of the device latencies are measured on."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"cpu ({platform.processor() or platform.machine()}, {jax.device_count()} devices)"
  return f"{device.platform} ({device.device_kind})"


def _time_ms(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def measure_latency_table(space, *, batch_size: int, seq_length: int, repeats: int = 10,
                          seed: int = 0) -> LatencyTable:
  """Times every (hidden size, op) of `space` and its embeddings on the default device.

  Each entry is the median of `repeats` jitted forward calls on random weights and inputs of
  shape [batch_size, seq_length] after a warm-up call.
  """
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, space.base.vocab_size, (batch_size, seq_length)), jnp.int32)
  mask = jnp.ones((batch_size, seq_length), bool)
  positions = jnp.broadcast_to(jnp.arange(seq_length), ids.shape)
  ops, embeddings = {}, {}
  for hidden in space.hidden_sizes:
    config = space.model_config(hidden)
    emb = Embeddings(config)
    emb_params = emb.init(jax.random.PRNGKey(seed), ids, ids * 0, positions, True)
    embeddings[str(hidden)] = _time_ms(
        jit_inference(lambda p, i: emb.apply(p, i, i * 0, positions, True)), (emb_params, ids),
        repeats)
    x = jnp.asarray(rng.standard_normal((batch_size, seq_length, hidden)), jnp.float32)
    ops[str(hidden)] = {}
    for op in space.ops_for(hidden):
      if op == "identity":
        continue
      layer = NasLayer(config, op)
      params = layer.init(jax.random.PRNGKey(seed), x, mask)
      ops[str(hidden)][op] = _time_ms(
          jit_inference(lambda p, h, layer=layer: layer.apply(p, h, mask)[0]), (params, x),
          repeats)
    log.info("latency table: hidden %d measured (%s)", hidden,
             ", ".join(f"{op} {ms:.3f} ms" for op, ms in ops[str(hidden)].items()))
  return LatencyTable(ops, embeddings, device=device_name(), batch_size=batch_size,
                      seq_length=seq_length)
