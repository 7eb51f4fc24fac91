"""Model configuration shared by every BERT-family architecture in this project.

One frozen dataclass describes BERT, IB-BERT, MobileBERT, MobileBERT-TINY and TinyBERT: the
differences are the embedding width and trigram convolution, the bottleneck, where attention reads
its queries/keys/values from, the number of stacked feed-forward networks, the norm and the
activation. Presets with the reference sizes live in `presets.py`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

NORMALIZATIONS = ("layer_norm", "no_norm")
ACTIVATIONS = ("gelu", "gelu_new", "relu", "silu", "swish", "tanh")
ATTENTION_INPUTS = ("layer_input", "shared_bottleneck", "bottleneck")
MODEL_TYPES = ("mobilebert", "bert")
# What a rematerialised layer keeps from its forward pass (`jax.checkpoint_policies` names):
# nothing (recompute the whole layer), or the matmul outputs (recompute only element-wise ops).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
# Storage of the attention probabilities (`ModelConfig.attention_probs_dtype`).
ATTENTION_PROBS_DTYPES = ("float32", "bfloat16")
# NAS-BERT layer ops (`ModelConfig.layer_ops`): "mha<heads>", "ffn<inner size>",
# "conv<kernel>" (separable convolution, odd kernel) and "identity".
OP_KINDS = ("mha", "ffn", "conv", "identity")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and switches of one encoder.

  Attributes:
    vocab_size: WordPiece vocabulary size.
    embedding_size: width of the token embedding table (128 for MobileBERT).
    hidden_size: inter-block width, the residual stream between layers (512 for MobileBERT).
    intra_size: intra-block width (bottleneck); ``None`` means ``hidden_size``.
    num_layers: number of transformer layers.
    num_heads: attention heads; ``intra_size`` must be divisible by it.
    intermediate_size: inner width of every feed-forward network.
    num_ffn: stacked feed-forward networks per layer (F in the MobileBERT paper).
    normalization: ``layer_norm`` or ``no_norm`` (element-wise ``gamma * h + beta``).
    hidden_act: activation of the feed-forward networks and of the MLM transform.
    trigram_input: concatenate embeddings of tokens t+1, t, t-1 (the kernel-3 convolution).
    use_bottleneck: project the layer input to ``intra_size`` and back (MobileBERT, IB-BERT).
    attention_input: where queries/keys/values come from:
      ``layer_input``: all three from the layer input (BERT; IB-BERT as originally released, where
        the ``hidden_size`` input is projected straight to ``intra_size``);
      ``shared_bottleneck``: queries and keys from a second, shared bottleneck of the layer input,
        values from the layer input (MobileBERT);
      ``bottleneck``: all three from the input bottleneck (MobileBERT-TINY).
    max_position_embeddings, type_vocab_size: position and segment tables.
    layer_norm_eps: epsilon of the layer norms.
    hidden_dropout, attention_dropout: dropout rates used when ``deterministic=False``.
    classifier_activation: the pooler applies dense + tanh (otherwise it returns the [CLS] vector).
    classifier_dropout: dropout before the classification head; ``None`` means ``hidden_dropout``.
    num_labels: classes of the sequence-classification head.
    model_type: the Hugging Face family the weights map to (``mobilebert`` or ``bert``). It also
      fixes one numerical detail: transformers' MobileBERT builds the embedding norm and the
      feed-forward output norm with the PyTorch default epsilon (1e-5) instead of
      ``layer_norm_eps``; this model reproduces that for ``mobilebert``.
    pad_token_id: id of [PAD].
    initializer_range: standard deviation of the truncated-normal initialisers.
    remat: rematerialise each layer in the backward pass (saves memory on deep teachers).
    remat_policy: what a rematerialised layer saves (`REMAT_POLICIES`): ``nothing_saveable``
      recomputes the whole layer (least memory), ``dots_saveable`` keeps every matmul output
      (recomputes only activations and norms), ``dots_with_no_batch_dims_saveable`` keeps the
      weight matmuls but recomputes the attention score/context products.
    attention_probs_dtype: how the attention probabilities are kept; the softmax always runs
      in float32. ``float32``: its float32 output is what the softmax gradient uses, and the
      probs x values product reads it cast to the compute dtype (the original numerics).
      ``bfloat16``: the probabilities are rounded to bfloat16 once, and that one array is what
      the product reads (with the values cast to bfloat16 and the compute dtype's
      accumulation), what the attention losses see and all the backward pass keeps: 2 bytes
      per probability instead of 4 (float32 compute) or 6 (bfloat16 compute: the float32
      output and its cast). In bfloat16 compute only the softmax gradient changes.
    layer_ops: a NAS-BERT architecture: one op per layer ("mha<heads>", "ffn<inner>",
      "conv<kernel>", "identity"), each a residual block with a post-LayerNorm at
      ``hidden_size``, in place of the transformer layers; empty for the usual layers. Needs
      ``use_bottleneck=False`` and ``num_layers == len(layer_ops)``.
    scan_layers: run the (identical) transformer layers under ``nn.scan``, their parameters
      stacked on a leading "layers" axis, so compile time does not grow with depth. Only the
      model's own parameter layout changes (`to_model_layout` / `to_canonical_layout`); outputs
      and saved checkpoints are the same. Not available with ``layer_ops``.
  """

  vocab_size: int = 30522
  embedding_size: int = 128
  hidden_size: int = 512
  intra_size: int | None = 128
  num_layers: int = 24
  num_heads: int = 4
  intermediate_size: int = 512
  num_ffn: int = 4
  normalization: str = "no_norm"
  hidden_act: str = "relu"
  trigram_input: bool = True
  use_bottleneck: bool = True
  attention_input: str = "shared_bottleneck"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.0
  attention_dropout: float = 0.1
  classifier_activation: bool = True
  classifier_dropout: float | None = None
  num_labels: int = 2
  model_type: str = "mobilebert"
  pad_token_id: int = 0
  initializer_range: float = 0.02
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  attention_probs_dtype: str = "float32"
  layer_ops: tuple[str, ...] = ()
  scan_layers: bool = False

  def __post_init__(self):
    object.__setattr__(self, "layer_ops", tuple(self.layer_ops))
    if self.intra_size is None:
      object.__setattr__(self, "intra_size", self.hidden_size)
    _check_choice("normalization", self.normalization, NORMALIZATIONS)
    _check_choice("hidden_act", self.hidden_act, ACTIVATIONS)
    _check_choice("attention_input", self.attention_input, ATTENTION_INPUTS)
    _check_choice("model_type", self.model_type, MODEL_TYPES)
    _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
    _check_choice("attention_probs_dtype", self.attention_probs_dtype, ATTENTION_PROBS_DTYPES)
    for name in ("vocab_size", "embedding_size", "hidden_size", "intra_size", "num_layers",
                 "num_heads", "intermediate_size", "num_ffn", "max_position_embeddings",
                 "type_vocab_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
    if self.intra_size % self.num_heads:
      raise ValueError(
          f"ModelConfig.intra_size={self.intra_size} is not divisible by "
          f"num_heads={self.num_heads}")
    if not self.use_bottleneck:
      if self.intra_size != self.hidden_size:
        raise ValueError(
            f"ModelConfig.intra_size={self.intra_size} differs from hidden_size="
            f"{self.hidden_size} but use_bottleneck is False")
      if self.attention_input != "layer_input":
        raise ValueError(
            f"ModelConfig.attention_input={self.attention_input!r} needs use_bottleneck=True")
    if self.layer_ops and self.scan_layers:
      raise ValueError("ModelConfig.scan_layers=True needs identical layers, but layer_ops (a NAS "
                       "architecture) gives each layer its own op; set scan_layers=False")
    if self.layer_ops:
      if self.use_bottleneck:
        raise ValueError("ModelConfig.layer_ops (a NAS architecture) needs use_bottleneck=False")
      if len(self.layer_ops) != self.num_layers:
        raise ValueError(f"ModelConfig.layer_ops has {len(self.layer_ops)} ops but num_layers="
                         f"{self.num_layers}")
      for op in self.layer_ops:
        kind, size = parse_op(op)
        if kind == "mha" and self.hidden_size % size:
          raise ValueError(f"ModelConfig.layer_ops: {op!r} needs hidden_size={self.hidden_size} "
                           f"divisible by its {size} heads")
    if self.embedding_size > self.hidden_size:
      raise ValueError(
          f"ModelConfig.embedding_size={self.embedding_size} exceeds hidden_size="
          f"{self.hidden_size}; the tied MLM decoder needs embedding_size <= hidden_size")

  @property
  def head_dim(self) -> int:
    return self.intra_size // self.num_heads

  @property
  def uses_embedding_transformation(self) -> bool:
    """Whether the token embedding is widened by a dense layer (trigram or narrow table)."""
    return self.trigram_input or self.embedding_size != self.hidden_size

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "ModelConfig":
    """Builds a config from a mapping, naming unknown keys (and where they came from)."""
    values = dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"{source}: unknown model config keys {unknown}; valid keys: {sorted(known)}")
    return cls(**values)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


def parse_op(op: str) -> tuple[str, int]:
  """Splits a NAS layer op into (kind, size): "mha4" -> ("mha", 4), "identity" -> ("identity", 0)."""
  match = re.fullmatch(r"(mha|ffn|conv)([1-9][0-9]*)|identity", str(op))
  if match is None:
    raise ValueError(f"unknown layer op {op!r}; valid: 'mha<heads>', 'ffn<inner size>', "
                     "'conv<odd kernel>', 'identity'")
  if op == "identity":
    return "identity", 0
  kind, size = match.group(1), int(match.group(2))
  if kind == "conv" and size % 2 == 0:
    raise ValueError(f"layer op {op!r}: the convolution kernel must be odd")
  return kind, size


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"ModelConfig.{name}={value!r} is not one of {list(choices)}")
