"""Hugging Face `transformers` checkpoints (MobileBERT and BERT families), both directions.

One table of names (`weight_map`) serves import and export: each entry pairs a transformers tensor
name with a flax parameter path and says how the layout differs (a PyTorch Linear stores
[out, in], a flax kernel [in, ..., out], attention kernels are split per head).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Mapping, Sequence

import numpy as np
from etils import epath

from mobilebert_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")
SUPPORTED_MODEL_TYPES = ("mobilebert", "bert")

# transformers architecture name suffix for each of this project's heads.
_ARCHITECTURE_SUFFIX = {
    "base": "Model",
    "pretraining": "ForPreTraining",
    "masked_lm": "ForMaskedLM",
    "classification": "ForSequenceClassification",
    "question_answering": "ForQuestionAnswering",
    "token_classification": "ForTokenClassification",
}
_CLASS_PREFIX = {"mobilebert": "MobileBert", "bert": "Bert"}


class ConversionError(ValueError):
  """A checkpoint does not fit the model it is converted to or from."""


# ----------------------------------------------------------------------------- configs


def config_from_hf(hf: Mapping, source: str = "config.json") -> ModelConfig:
  """Translates a transformers config dict (MobileBERT or BERT) into a `ModelConfig`."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ConversionError(f"{source}: unsupported model_type {model_type!r}; supported: "
                          f"{list(SUPPORTED_MODEL_TYPES)}")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ConversionError(f"{source}: position_embedding_type="
                          f"{hf['position_embedding_type']!r} is not supported (only 'absolute')")
  if not hf.get("tie_word_embeddings", True):
    raise ConversionError(f"{source}: tie_word_embeddings=false is not supported; this project "
                          "ties the MLM decoder to the token embedding")
  hidden = hf.get("hidden_size", 512 if model_type == "mobilebert" else 768)
  common = dict(
      vocab_size=hf.get("vocab_size", 30522),
      hidden_size=hidden,
      num_layers=hf.get("num_hidden_layers"),
      num_heads=hf.get("num_attention_heads"),
      intermediate_size=hf.get("intermediate_size"),
      hidden_act=hf.get("hidden_act"),
      max_position_embeddings=hf.get("max_position_embeddings", 512),
      type_vocab_size=hf.get("type_vocab_size", 2),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
      hidden_dropout=hf.get("hidden_dropout_prob"),
      attention_dropout=hf.get("attention_probs_dropout_prob"),
      classifier_dropout=hf.get("classifier_dropout"),
      initializer_range=hf.get("initializer_range", 0.02),
      pad_token_id=hf.get("pad_token_id") or 0,
      num_labels=_num_labels(hf),
      model_type=model_type,
  )
  if model_type == "bert":
    specific = dict(embedding_size=hidden, intra_size=hidden, num_ffn=1,
                    normalization="layer_norm", trigram_input=False, use_bottleneck=False,
                    attention_input="layer_input", classifier_activation=True)
  else:
    use_bottleneck = hf.get("use_bottleneck", True)
    if not use_bottleneck:
      attention_input = "layer_input"
    elif hf.get("use_bottleneck_attention", False):
      attention_input = "bottleneck"
    elif hf.get("key_query_shared_bottleneck", True):
      attention_input = "shared_bottleneck"
    else:
      attention_input = "layer_input"
    specific = dict(
        embedding_size=hf.get("embedding_size", 128),
        intra_size=hf.get("intra_bottleneck_size", 128) if use_bottleneck else hidden,
        num_ffn=hf.get("num_feedforward_networks", 4),
        normalization=hf.get("normalization_type", "no_norm"),
        trigram_input=hf.get("trigram_input", True),
        use_bottleneck=use_bottleneck,
        attention_input=attention_input,
        classifier_activation=hf.get("classifier_activation", True))
  values = {k: v for k, v in {**common, **specific}.items() if v is not None}
  try:
    return ModelConfig(**values)
  except ValueError as e:
    raise ConversionError(f"{source}: {e}") from e


def _num_labels(hf: Mapping) -> int:
  if "id2label" in hf and hf["id2label"]:
    return len(hf["id2label"])
  return hf.get("num_labels", 2)


def config_to_hf(config: ModelConfig, head: str, labels: Sequence[str] | None = None) -> dict:
  """The transformers config dict for `config` with `head` (`labels`: the names of a
  classification or tagging head's outputs); errors for unexpressible models."""
  check_exportable(config)
  arch = _CLASS_PREFIX[config.model_type] + _ARCHITECTURE_SUFFIX[head]
  # transformers sizes the span head by num_labels; this project's span head is start/end.
  num_labels = 2 if head == "question_answering" else config.num_labels
  names = list(labels) if labels and len(labels) == num_labels else [
      f"LABEL_{i}" for i in range(num_labels)]
  hf = dict(
      architectures=[arch],
      model_type=config.model_type,
      vocab_size=config.vocab_size,
      hidden_size=config.hidden_size,
      num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads,
      intermediate_size=config.intermediate_size,
      hidden_act=config.hidden_act,
      hidden_dropout_prob=config.hidden_dropout,
      attention_probs_dropout_prob=config.attention_dropout,
      max_position_embeddings=config.max_position_embeddings,
      type_vocab_size=config.type_vocab_size,
      initializer_range=config.initializer_range,
      layer_norm_eps=config.layer_norm_eps,
      pad_token_id=config.pad_token_id,
      classifier_dropout=config.classifier_dropout,
      tie_word_embeddings=True,
      id2label={str(i): name for i, name in enumerate(names)},
      label2id={name: i for i, name in enumerate(names)},
  )
  if config.model_type == "mobilebert":
    hf.update(
        embedding_size=config.embedding_size,
        trigram_input=config.trigram_input,
        use_bottleneck=config.use_bottleneck,
        intra_bottleneck_size=config.intra_size,
        use_bottleneck_attention=config.attention_input == "bottleneck",
        key_query_shared_bottleneck=config.attention_input == "shared_bottleneck",
        num_feedforward_networks=config.num_ffn,
        normalization_type=config.normalization,
        classifier_activation=config.classifier_activation)
  return hf


def check_exportable(config: ModelConfig) -> None:
  """Raises `ConversionError` when transformers cannot express `config`."""
  if config.layer_ops:
    raise ConversionError(
        f"this model is a NAS architecture (layer_ops={list(config.layer_ops)}), which no "
        "transformers model class expresses; keep it as a native checkpoint")
  if config.model_type == "bert":
    bert_like = (config.embedding_size == config.hidden_size and not config.trigram_input and
                 not config.use_bottleneck and config.num_ffn == 1 and
                 config.normalization == "layer_norm" and config.classifier_activation)
    if not bert_like:
      raise ConversionError(
          "model_type='bert' export needs embedding_size == hidden_size, no trigram input, no "
          "bottleneck, num_ffn=1, layer_norm and the tanh pooler; export it as 'mobilebert'")
  elif (config.use_bottleneck and config.attention_input == "layer_input" and
        config.intra_size != config.hidden_size):
    raise ConversionError(
        "this model is the original IB-BERT attention (queries/keys/values projected from the "
        f"{config.hidden_size}-d layer input to the {config.intra_size}-d intra size), which "
        "transformers' MobileBERT cannot express (its query/key layers read the "
        f"{config.intra_size}-d bottleneck); use attention_input='shared_bottleneck' or "
        "'bottleneck' for a model you intend to export")


# ----------------------------------------------------------------------------- names


@dataclasses.dataclass(frozen=True)
class WeightEntry:
  """One tensor: transformers name, flax path, and layout.

  kind 'linear': transformers stores [out, in]; the flax kernel is [in..., out...] with
  `in_ndims` leading input dims. kind 'copy': same values, possibly reshaped (biases per head).
  """
  hf_name: str
  path: tuple[str, ...]
  kind: str = "copy"
  in_ndims: int = 1


def weight_map(config: ModelConfig, head: str) -> list[WeightEntry]:
  """All tensors of `config` with `head`, as (transformers name, flax path) entries."""
  if head not in _ARCHITECTURE_SUFFIX:
    raise ConversionError(f"unknown head {head!r}; valid: {sorted(_ARCHITECTURE_SUFFIX)}")
  base_prefix = "" if head == "base" else config.model_type + "."
  flax_prefix = () if head == "base" else ("backbone",)
  entries: list[WeightEntry] = []

  def linear(hf, path, in_ndims=1):
    entries.append(WeightEntry(f"{hf}.weight", path + ("kernel",), "linear", in_ndims))
    entries.append(WeightEntry(f"{hf}.bias", path + ("bias",)))

  def norm(hf, path, scale="scale"):
    entries.append(WeightEntry(f"{hf}.weight", path + (scale,)))
    entries.append(WeightEntry(f"{hf}.bias", path + ("bias",)))

  def backbone(hf, *path):
    return base_prefix + hf, flax_prefix + path

  def table(hf, *path):
    hf_name, p = backbone(hf, *path)
    entries.append(WeightEntry(hf_name + ".weight", p + ("embedding",)))

  table("embeddings.word_embeddings", "embeddings", "word_embeddings")
  table("embeddings.position_embeddings", "embeddings", "position_embeddings")
  table("embeddings.token_type_embeddings", "embeddings", "token_type_embeddings")
  if config.uses_embedding_transformation:
    linear(*backbone("embeddings.embedding_transformation", "embeddings",
                     "embedding_transformation"))
  norm(*backbone("embeddings.LayerNorm", "embeddings", "norm"))

  for i in range(config.num_layers):
    hf_layer, layer = f"encoder.layer.{i}.", f"layer_{i}"
    if config.use_bottleneck:
      linear(*backbone(hf_layer + "bottleneck.input.dense", layer, "bottleneck_input"))
      norm(*backbone(hf_layer + "bottleneck.input.LayerNorm", layer, "bottleneck_input_norm"))
      if config.attention_input == "shared_bottleneck":
        linear(*backbone(hf_layer + "bottleneck.attention.dense", layer, "bottleneck_attention"))
        norm(*backbone(hf_layer + "bottleneck.attention.LayerNorm", layer,
                       "bottleneck_attention_norm"))
    for proj in ("query", "key", "value"):
      linear(*backbone(hf_layer + f"attention.self.{proj}", layer, "attention", proj))
    linear(*backbone(hf_layer + "attention.output.dense", layer, "attention", "output"),
           in_ndims=2)
    norm(*backbone(hf_layer + "attention.output.LayerNorm", layer, "attention", "norm"))
    for j in range(config.num_ffn - 1):
      ffn = f"stacked_ffn_{j}"
      linear(*backbone(hf_layer + f"ffn.{j}.intermediate.dense", layer, ffn, "intermediate"))
      linear(*backbone(hf_layer + f"ffn.{j}.output.dense", layer, ffn, "output"))
      norm(*backbone(hf_layer + f"ffn.{j}.output.LayerNorm", layer, ffn, "norm"))
    linear(*backbone(hf_layer + "intermediate.dense", layer, "ffn", "intermediate"))
    linear(*backbone(hf_layer + "output.dense", layer, "ffn", "output"))
    norm(*backbone(hf_layer + "output.LayerNorm", layer, "ffn", "norm"))
    if config.use_bottleneck:
      linear(*backbone(hf_layer + "output.bottleneck.dense", layer, "output_bottleneck"))
      norm(*backbone(hf_layer + "output.bottleneck.LayerNorm", layer, "output_bottleneck_norm"))

  if head in ("base", "pretraining", "classification") and config.classifier_activation:
    linear(*backbone("pooler.dense", "pooler"))
  if head in ("pretraining", "masked_lm"):
    linear("cls.predictions.transform.dense", ("mlm", "transform"))
    norm("cls.predictions.transform.LayerNorm", ("mlm", "transform_norm"))
    if config.hidden_size > config.embedding_size:
      entries.append(WeightEntry("cls.predictions.dense.weight", ("mlm", "extra_decoder")))
    entries.append(WeightEntry("cls.predictions.bias", ("mlm", "bias")))
  if head == "pretraining":
    linear("cls.seq_relationship", ("nsp",))
  if head in ("classification", "token_classification"):
    linear("classifier", ("classifier",))
  if head == "question_answering":
    linear("qa_outputs", ("qa_outputs",))
  return entries


# Tensors transformers stores that carry no information of their own.
_DERIVED_SUFFIXES = ("embeddings.position_ids", "cls.predictions.decoder.weight",
                     "cls.predictions.decoder.bias")


def head_from_architectures(hf: Mapping, tensor_names) -> str:
  """Guesses this project's head from a transformers config's `architectures` and tensors."""
  for arch in hf.get("architectures") or []:
    for head, suffix in _ARCHITECTURE_SUFFIX.items():
      if arch.endswith(suffix) and arch[:-len(suffix)] in _CLASS_PREFIX.values():
        return head
  names = set(tensor_names)
  if "cls.seq_relationship.weight" in names:
    return "pretraining"
  if "cls.predictions.bias" in names:
    return "masked_lm"
  if "classifier.weight" in names:
    return "classification"
  if "qa_outputs.weight" in names:
    return "question_answering"
  return "base"


def normalize_names(state: Mapping[str, np.ndarray]) -> dict:
  """Renames legacy tensor names (LayerNorm gamma/beta) to the current ones."""
  out = {}
  for name, value in state.items():
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                         "LayerNorm.bias")
    out[name] = value
  return out


# ----------------------------------------------------------------------------- tensors


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def to_flax(value: np.ndarray, entry: WeightEntry, shape: tuple[int, ...]) -> np.ndarray:
  """transformers layout -> flax layout of `shape` (shapes already checked)."""
  value = np.asarray(value)
  return (value.T if entry.kind == "linear" else value).reshape(shape)


def _hf_shape(entry: WeightEntry, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The transformers shape of a tensor whose flax shape is `shape`."""
  if entry.kind == "linear":
    n_in = int(np.prod(shape[:entry.in_ndims]))
    return (int(np.prod(shape[entry.in_ndims:])), n_in)
  if entry.path[-1] in ("bias", "scale"):
    return (int(np.prod(shape)),)
  return tuple(shape)


def to_hf(value: np.ndarray, entry: WeightEntry) -> np.ndarray:
  """flax layout -> transformers layout."""
  value = np.asarray(value)
  if entry.kind == "linear":
    n_in = int(np.prod(value.shape[:entry.in_ndims]))
    return np.ascontiguousarray(value.reshape(n_in, -1).T)
  if entry.path[-1] in ("bias", "scale") and value.ndim > 1:
    return value.reshape(-1)
  return value


def state_to_params(state: Mapping[str, np.ndarray], config: ModelConfig, head: str,
                    abstract_params: Mapping, source: str = "checkpoint") -> dict:
  """Builds the flax params tree for (config, head) from a transformers state dict.

  `abstract_params` holds the expected shapes (from `jax.eval_shape` of `model.init`). Missing
  tensors are listed together; a shape mismatch names the tensor and both shapes.
  """
  state = normalize_names(state)
  entries = weight_map(config, head)
  missing = [e.hf_name for e in entries if e.hf_name not in state]
  if missing:
    raise ConversionError(f"{source}: {len(missing)} tensors missing for a {config.model_type} "
                          f"'{head}' model: {missing}")
  params: dict = {}
  for e in entries:
    shape = tuple(_get(abstract_params, e.path).shape)
    value = np.asarray(state[e.hf_name])
    expected = _hf_shape(e, shape)
    if tuple(value.shape) != expected:
      raise ConversionError(f"{source}: tensor {e.hf_name} has shape {tuple(value.shape)}, the "
                            f"model expects {expected}")
    _set(params, e.path, to_flax(value, e, shape).astype(np.float32))
  used = {e.hf_name for e in entries}
  ignored = sorted(n for n in state if n not in used and not n.endswith(_DERIVED_SUFFIXES))
  if ignored:
    log.warning("%s: %d tensors not used by the '%s' model: %s", source, len(ignored), head,
                ignored[:20])
  return params


def params_to_state(params: Mapping, config: ModelConfig, head: str) -> dict[str, np.ndarray]:
  """The transformers state dict (float32 numpy) of flax `params` for (config, head)."""
  check_exportable(config)
  state = {}
  for e in weight_map(config, head):
    try:
      value = _get(params, e.path)
    except KeyError as err:
      raise ConversionError(f"parameter {'/'.join(e.path)} missing from the params tree") from err
    state[e.hf_name] = to_hf(np.asarray(value, dtype=np.float32), e)
  if config.model_type == "mobilebert" and not config.uses_embedding_transformation:
    # transformers' MobileBERT always owns this layer, even when it does not use it.
    prefix = "" if head == "base" else "mobilebert."
    width = config.embedding_size * (3 if config.trigram_input else 1)
    state[prefix + "embeddings.embedding_transformation.weight"] = np.zeros(
        (config.hidden_size, width), np.float32)
    state[prefix + "embeddings.embedding_transformation.bias"] = np.zeros(
        (config.hidden_size,), np.float32)
  return state


# ----------------------------------------------------------------------------- files


def is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


def read_hf_config(path: str) -> dict:
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise ConversionError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
  with open(config_path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{config_path}: not valid JSON ({e})") from e


def read_hf_weights(path: str) -> dict[str, np.ndarray]:
  """Reads model.safetensors (or pytorch_model.bin, through torch) as float32 numpy arrays."""
  safetensors_path = os.path.join(path, "model.safetensors")
  bin_path = os.path.join(path, "pytorch_model.bin")
  if os.path.isfile(safetensors_path):
    from safetensors.numpy import load_file
    state = load_file(safetensors_path)
  elif os.path.isfile(bin_path):
    try:
      import torch
    except ImportError as e:
      raise ConversionError(f"{bin_path}: reading PyTorch .bin weights needs torch installed "
                            "(pip install torch), or convert them to model.safetensors") from e
    raw = torch.load(bin_path, map_location="cpu", weights_only=True)
    state = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in raw.items()}
  else:
    raise ConversionError(f"{path}: no weights file (looked for {list(WEIGHT_FILES)})")
  return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
          for k, v in state.items()}


def strip_base_prefix(state: dict, config: ModelConfig, head: str) -> dict:
  """Lets a bare-model checkpoint (no 'mobilebert.'/'bert.' prefix) load into a head model."""
  prefix = config.model_type + "."
  if head == "base":
    if any(k.startswith(prefix) for k in state):
      return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state
  if not any(k.startswith(prefix) for k in state):
    return {prefix + k if k.startswith(("embeddings.", "encoder.", "pooler.")) else k: v
            for k, v in state.items()}
  return state


def write_hf_dir(path: str, config: ModelConfig, head: str, params: Mapping,
                 tokenizer_dir: str | None = None, labels: Sequence[str] | None = None) -> None:
  """Writes config.json + model.safetensors (+ tokenizer files) loadable by transformers."""
  from safetensors.numpy import save_file
  hf_config = config_to_hf(config, head, labels)
  state = params_to_state(params, config, head)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  copy_tokenizer_files(tokenizer_dir, path)


def copy_tokenizer_files(src: str | None, dst: str) -> list[str]:
  """Copies the tokenizer files present in `src` to `dst`; returns their names."""
  copied = []
  if not src:
    return copied
  for name in TOKENIZER_FILES:
    source, target = epath.Path(src, name), epath.Path(dst, name)
    same = "://" not in str(dst) and os.path.abspath(source) == os.path.abspath(target)
    if source.is_file() and not same:
      source.copy(target, overwrite=True)
      copied.append(name)
  return copied
