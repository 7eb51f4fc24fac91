"""The NAS-BERT search space and its weight-sharing supernet, trained block-wise.

Search space (`SearchSpace`): `num_layers` student layers split into `num_blocks` blocks; every
layer picks one op - multi-head attention with one of `mha_heads`, a feed-forward network with one
of `ffn_sizes`, a separable convolution with one of `conv_kernels`, or identity - and the whole
model one hidden size from `hidden_sizes`. A *path* of a block is (hidden size, one op per layer
of the block), encoded as integers: ``[hidden index, op index within ops_for(hidden), ...]``.

Supernet (`init_supernet`): one set of weights per layer and op kind at the largest width, plus
the student embeddings at the largest hidden size and per-block adapters. A smaller op is a prefix
slice of the larger weights (`slice_like`; layouts in `mobilebert_jax.models.nas_layers`), and the
sliced weights run through the very modules the standalone model uses, so a path's output equals
the extracted model's output exactly.

Block-wise training (`block_losses`): block b reproduces the teacher's block output from the
teacher's block input: block 0 starts from the student's own embeddings of the tokens, block b > 0
from the teacher hidden state at its boundary through an input adapter [teacher hidden -> h]; the
block's output goes through an output adapter [h -> teacher hidden] into an MSE against the
teacher hidden state at the block's end (over real tokens). Ops and hidden size are chosen inside
the jitted step with `lax.switch`, so one compilation serves every path.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mobilebert_jax.models import Backbone, ModelConfig, layers
from mobilebert_jax.models.config import parse_op
from mobilebert_jax.models.encoder import Embeddings
from mobilebert_jax.models.nas_layers import NasLayer


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """The ops, widths and block layout of a NAS-BERT search.

  Attributes:
    base: the student template (vocabulary, embedding size, positions, norms, activation); its
      hidden size and layers are replaced by each architecture's.
    hidden_sizes: model-wide hidden sizes (ascending); each >= base.embedding_size.
    mha_heads, ffn_sizes, conv_kernels: op widths; an attention head count is offered at a hidden
      size it divides.
    identity: whether a layer may be skipped.
    num_layers, num_blocks: student layers and the blocks they are split into (equal sizes).
  """
  base: ModelConfig
  hidden_sizes: tuple[int, ...]
  mha_heads: tuple[int, ...]
  ffn_sizes: tuple[int, ...]
  conv_kernels: tuple[int, ...]
  identity: bool
  num_layers: int
  num_blocks: int

  def __post_init__(self):
    for name in ("hidden_sizes", "mha_heads", "ffn_sizes", "conv_kernels"):
      values = tuple(sorted(int(v) for v in getattr(self, name)))
      if any(v < 1 for v in values):
        raise ValueError(f"search space {name}={values} must be positive")
      object.__setattr__(self, name, values)
    if not self.hidden_sizes:
      raise ValueError("search space hidden_sizes is empty")
    if self.num_blocks < 1 or self.num_layers % self.num_blocks:
      raise ValueError(f"search space num_layers={self.num_layers} is not divisible into "
                       f"num_blocks={self.num_blocks} equal blocks")
    if self.base.embedding_size > self.hidden_sizes[0]:
      raise ValueError(f"search space: embedding_size={self.base.embedding_size} exceeds the "
                       f"smallest hidden size {self.hidden_sizes[0]}")
    for kernel in self.conv_kernels:
      parse_op(f"conv{kernel}")
    for hidden in self.hidden_sizes:
      if not self.ops_for(hidden):
        raise ValueError(f"search space offers no op at hidden size {hidden}")

  @property
  def layers_per_block(self) -> int:
    return self.num_layers // self.num_blocks

  @property
  def max_hidden(self) -> int:
    return self.hidden_sizes[-1]

  @functools.lru_cache(maxsize=None)
  def ops_for(self, hidden: int) -> tuple[str, ...]:
    """The op names a layer may take at `hidden`."""
    ops = [f"mha{n}" for n in self.mha_heads if hidden % n == 0]
    ops += [f"ffn{i}" for i in self.ffn_sizes] + [f"conv{k}" for k in self.conv_kernels]
    return tuple(ops + (["identity"] if self.identity else []))

  def shared_ops(self) -> dict[str, str]:
    """Op kind -> the op whose (largest) weights every op of that kind slices."""
    shared = {}
    if self.mha_heads:
      shared["mha"] = f"mha{self.mha_heads[0]}"  # attention weights do not depend on heads
    if self.ffn_sizes:
      shared["ffn"] = f"ffn{self.ffn_sizes[-1]}"
    if self.conv_kernels:
      shared["conv"] = f"conv{self.conv_kernels[-1]}"
    return shared

  def model_config(self, hidden: int, ops: Sequence[str] = ()) -> ModelConfig:
    """The standalone config of an architecture (hidden size and one op per layer)."""
    heads = [n for n in self.mha_heads if hidden % n == 0]
    ops = tuple(ops)
    return self.base.replace(
        hidden_size=hidden, intra_size=hidden, num_heads=max(heads) if heads else 1,
        num_layers=max(len(ops), 1), layer_ops=ops, use_bottleneck=False,
        attention_input="layer_input", num_ffn=1)

  def decode(self, path: Sequence[int]) -> tuple[int, tuple[str, ...]]:
    """(hidden size, op names) of an encoded block path."""
    hidden = self.hidden_sizes[int(path[0])]
    ops = self.ops_for(hidden)
    return hidden, tuple(ops[int(i)] for i in path[1:])

  def encode(self, hidden: int, ops: Sequence[str]) -> list[int]:
    names = self.ops_for(hidden)
    return [self.hidden_sizes.index(hidden)] + [names.index(op) for op in ops]

  def paths_per_block(self) -> int:
    return sum(len(self.ops_for(h)) ** self.layers_per_block for h in self.hidden_sizes)


def candidate_paths(space: SearchSpace, max_per_block: int, seed: int) -> np.ndarray:
  """Candidate paths [blocks, C, 1 + layers_per_block] (int32) each block starts from.

  Every path when a block has at most `max_per_block`; otherwise an equal share per hidden size
  drawn uniformly without repetition (seeded, different per block).
  """
  n = space.layers_per_block
  out = []
  for block in range(space.num_blocks):
    rng = np.random.default_rng([seed, block])
    paths = []
    share = max_per_block // len(space.hidden_sizes)
    for hi, hidden in enumerate(space.hidden_sizes):
      num_ops = len(space.ops_for(hidden))
      total = num_ops ** n
      if space.paths_per_block() <= max_per_block:
        chosen = range(total)
      else:
        chosen = rng.choice(total, size=min(share, total), replace=False)
      for index in sorted(int(c) for c in chosen):
        ops = np.unravel_index(index, (num_ops,) * n) if n else ()
        paths.append([hi] + [int(o) for o in ops])
    out.append(paths)
  size = min(len(p) for p in out)
  return np.asarray([p[:size] for p in out], np.int32)


def slice_like(params: Any, target: Any) -> Any:
  """The leading slices of `params` with `target`'s tree and shapes (weight sharing).

  `target` is an (abstract) parameter tree of a smaller module of the same layout; every leaf of
  it must exist in `params` with sizes at least as large.
  """
  def take(tree, ref, path):
    if isinstance(ref, Mapping):
      if not isinstance(tree, Mapping):
        raise ValueError(f"supernet parameter {'/'.join(path)} is not a subtree")
      return {k: take(tree.get(k) if k in tree else _missing(path + (k,)), v, path + (k,))
              for k, v in ref.items()}
    shape = tuple(ref.shape)
    if len(shape) != tree.ndim or any(s > t for s, t in zip(shape, tree.shape)):
      raise ValueError(f"supernet parameter {'/'.join(path)} has shape {tuple(tree.shape)}, "
                       f"which cannot be sliced to {shape}")
    return tree[tuple(slice(0, s) for s in shape)]
  return take(params, target, ())


def _missing(path):
  raise ValueError(f"supernet has no parameter {'/'.join(path)}")


class _SupernetInit(nn.Module):
  """Creates the supernet's parameters (with logical axes) by touching every shared module."""
  space: SearchSpace
  teacher_hidden: int

  @nn.compact
  def __call__(self, ids):
    space = self.space
    cfg = space.model_config(space.max_hidden)
    mask = jnp.ones(ids.shape, bool)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    x = Embeddings(cfg, name="embeddings")(ids, jnp.zeros_like(ids), positions, True)
    for layer in range(space.num_layers):
      for kind, op in space.shared_ops().items():
        NasLayer(cfg, op, name=f"layer_{layer}_{kind}")(x, mask)
    kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, stddev=cfg.initializer_range)
    teacher_in = jnp.zeros(ids.shape + (self.teacher_hidden,))
    for block in range(space.num_blocks):
      if block:
        layers.dense(space.max_hidden, (None,), ("embed",), name=f"block_{block}_input",
                     **kw)(teacher_in)
      layers.dense(self.teacher_hidden, ("embed",), (None,), name=f"block_{block}_output",
                   **kw)(x)


def init_supernet(space: SearchSpace, teacher_hidden: int, rng: jax.Array) -> Any:
  """Boxed (logical-axis annotated) supernet parameters."""
  ids = jnp.zeros((1, min(8, space.base.max_position_embeddings)), jnp.int32)
  return _SupernetInit(space, teacher_hidden).init({"params": rng}, ids)["params"]


@functools.lru_cache(maxsize=None)
def _abstract_layer(config: ModelConfig, op: str) -> Any:
  ids = jnp.zeros((1, 4, config.hidden_size))
  return nn.meta.unbox(jax.eval_shape(
      lambda: NasLayer(config, op).init(jax.random.PRNGKey(0), ids, jnp.ones((1, 4), bool))))


@functools.lru_cache(maxsize=None)
def _abstract_embeddings(config: ModelConfig) -> Any:
  ids = jnp.zeros((1, 4), jnp.int32)
  return nn.meta.unbox(jax.eval_shape(
      lambda: Embeddings(config).init(jax.random.PRNGKey(0), ids, ids, ids, True)))["params"]


def layer_params(space: SearchSpace, params: Mapping, layer: int, hidden: int, op: str) -> Any:
  """The standalone parameters of `op` at `hidden` in supernet layer `layer` (a slice)."""
  kind, _ = parse_op(op)
  if kind == "identity":
    return {}
  target = _abstract_layer(space.model_config(hidden), op)["params"]
  return slice_like(params[f"layer_{layer}_{kind}"], target)


def embedding_params(space: SearchSpace, params: Mapping, hidden: int) -> Any:
  return slice_like(params["embeddings"], _abstract_embeddings(space.model_config(hidden)))


def apply_op(space: SearchSpace, params: Mapping, layer: int, hidden: int, op: str, x, mask):
  """Runs supernet layer `layer` as `op` at `hidden` (the standalone module on sliced weights)."""
  if op == "identity":
    return x
  config = space.model_config(hidden)
  sliced = layer_params(space, params, layer, hidden, op)
  return NasLayer(config, op).apply({"params": sliced}, x, mask, True)[0]


def embed(space: SearchSpace, params: Mapping, hidden: int, batch: Mapping) -> jax.Array:
  """The student embeddings at `hidden` of a batch's tokens."""
  ids = batch["input_ids"]
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  return Embeddings(space.model_config(hidden)).apply(
      {"params": embedding_params(space, params, hidden)}, ids, batch["token_type_ids"],
      positions, True)


def _block_loss(space: SearchSpace, block: int, hidden: int, params, ops, boundaries, batch):
  mask = batch["attention_mask"].astype(bool)
  if block == 0:
    x = embed(space, params, hidden, batch)
  else:
    adapter = params[f"block_{block}_input"]
    x = boundaries[block] @ adapter["kernel"][:, :hidden] + adapter["bias"][:hidden]
  names = space.ops_for(hidden)
  for j in range(space.layers_per_block):
    layer = block * space.layers_per_block + j
    branches = [functools.partial(apply_op, space, params, layer, hidden, op) for op in names]
    x = jax.lax.switch(ops[j], branches, x, mask)
  adapter = params[f"block_{block}_output"]
  out = x @ adapter["kernel"][:hidden] + adapter["bias"]
  weights = mask.astype(out.dtype)
  per_token = jnp.mean(jnp.square(out - boundaries[block + 1]), axis=-1)
  return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def block_losses(space: SearchSpace, params, boundaries: Sequence[jax.Array], batch: Mapping,
                 paths: jax.Array) -> jax.Array:
  """Per-block MSE [blocks] of one path per block (`paths` [blocks, 1 + layers_per_block])."""
  losses = []
  for block in range(space.num_blocks):
    branches = [functools.partial(_block_loss, space, block, hidden)
                for hidden in space.hidden_sizes]
    losses.append(jax.lax.switch(paths[block, 0], branches, params, paths[block, 1:],
                                 boundaries, batch))
  return jnp.stack(losses)


def teacher_boundaries(teacher_config: ModelConfig, teacher_params: Mapping, batch: Mapping,
                       num_blocks: int) -> list[jax.Array]:
  """The teacher hidden states at the block boundaries (embeddings, ..., last layer)."""
  if teacher_config.num_layers % num_blocks:
    raise ValueError(f"the teacher's num_layers={teacher_config.num_layers} is not divisible "
                     f"into num_blocks={num_blocks} blocks")
  out = Backbone(teacher_config, add_pooling_layer=False).apply(
      {"params": _without_pooler(teacher_params["backbone"])}, batch["input_ids"],
      batch["attention_mask"], batch["token_type_ids"], output_hidden_states=True)
  step = teacher_config.num_layers // num_blocks
  return [jax.lax.stop_gradient(out.hidden_states[b * step]) for b in range(num_blocks + 1)]


def _without_pooler(backbone: Mapping) -> dict:
  return {k: v for k, v in backbone.items() if k != "pooler"}


def sample_paths(rng: jax.Array, candidates: jax.Array, valid: jax.Array) -> jax.Array:
  """One valid candidate path per block, uniformly: [blocks, 1 + layers_per_block]."""
  keys = jax.random.split(rng, candidates.shape[0])
  logits = jnp.where(valid, 0.0, -jnp.inf)
  index = jax.vmap(jax.random.categorical)(keys, logits)
  return jnp.take_along_axis(candidates, index[:, None, None], axis=1)[:, 0]


def extract(space: SearchSpace, params: Mapping, hidden: int, ops: Sequence[str],
            pooler_rng: jax.Array) -> tuple[ModelConfig, dict]:
  """(config, backbone params) of one architecture, weights sliced from the supernet.

  The pooler (not part of block-wise training) is initialised from `pooler_rng`.
  """
  config = space.model_config(hidden, ops)
  backbone = {"embeddings": embedding_params(space, params, hidden)}
  for layer, op in enumerate(ops):
    sliced = layer_params(space, params, layer, hidden, op)
    if sliced:
      backbone[f"layer_{layer}"] = sliced
  if config.classifier_activation:
    model = Backbone(config)
    ids = jnp.zeros((1, 4), jnp.int32)
    backbone["pooler"] = nn.meta.unbox(model.init(pooler_rng, ids)["params"]["pooler"])
  return config, jax.tree.map(np.asarray, backbone)


