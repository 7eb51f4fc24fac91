"""Loading and saving pretrained models: native orbax directories and Hugging Face directories.

A native directory holds `mobilebert_jax.json` (format, head, model config), `params/` (an orbax
checkpoint of the parameter tree) and any tokenizer files. `load_pretrained` reads that or a
transformers directory (config.json + model.safetensors / pytorch_model.bin) and can put a
different head on the loaded backbone (fresh head parameters are initialised and logged).

Parameter layouts: checkpoints always hold the canonical per-layer layout (`layer_0`, ...);
`init_params`, `abstract_params` and `load_pretrained` give the layout of the model built from
the config (stacked `layers` when `ModelConfig.scan_layers`); `read_checkpoint` and
`adapt_params` give the canonical one (`models.to_model_layout` converts).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mobilebert_jax import model_files
from mobilebert_jax.interop import hf
from mobilebert_jax.models import (HEADS, ModelConfig, build_model, num_params,
                                   to_canonical_layout, to_model_layout)

log = logging.getLogger(__name__)

NATIVE_CONFIG = "mobilebert_jax.json"
NATIVE_PARAMS = "params"
FORMAT_VERSION = 1
# Heads whose outputs are named labels (id2label in the metadata).
LABELLED_HEADS = ("classification", "token_classification")
# Backbone subtrees that must come from the checkpoint; anything else may be initialised fresh.
_CORE_PREFIXES = ("embeddings", "layer_")


def abstract_params(model: nn.Module, config: ModelConfig) -> Any:
  """Shapes/dtypes of `model`'s parameters, without allocating (``jax.eval_shape``).

  In the model's own layout (stacked layers when `config.scan_layers`).
  """
  return nn.meta.unbox(jax.eval_shape(lambda: init_params(model, config, jax.random.PRNGKey(0))))


def init_params(model: nn.Module, config: ModelConfig, rng: jax.Array, boxed: bool = False):
  """Initialises `model`'s parameters on a dummy batch; `boxed` keeps the logical-axis boxes.

  Returns the model's own layout, what `model.apply` takes (stacked layers when
  `config.scan_layers`; the values then differ from an unscanned init with the same `rng`).
  """
  length = min(8, config.max_position_embeddings)
  ids = jnp.zeros((1, length), jnp.int32)
  params = model.init({"params": rng}, ids)["params"]
  return params if boxed else nn.meta.unbox(params)


def _absolute(path: str) -> str:
  """Absolute local path; URLs (gs://...) are left as they are."""
  return path if "://" in str(path) else os.path.abspath(path)


def is_native_dir(path: str) -> bool:
  return epath.Path(path, NATIVE_CONFIG).exists()


def read_native_meta(path: str) -> dict:
  meta_path = os.path.join(path, NATIVE_CONFIG)
  meta = json.loads(epath.Path(meta_path).read_text())
  if meta.get("format") != "mobilebert_jax":
    raise ValueError(f"{meta_path}: not a mobilebert_jax checkpoint (format={meta.get('format')!r})")
  if meta.get("head") not in HEADS:
    raise ValueError(f"{meta_path}: unknown head {meta.get('head')!r}; valid: {sorted(HEADS)}")
  return meta


def save_pretrained(path: str, config: ModelConfig, params: Mapping, head: str,
                    tokenizer_dir: str | None = None, extra: Mapping | None = None,
                    labels: Sequence[str] | None = None) -> None:
  """Writes a native directory: metadata + config JSON, orbax params, tokenizer files,
  tokenizer_config.json and a model card (`model_files`).

  `labels` names the outputs of a classification or tagging head (stored as `id2label`;
  LABEL_i without them). `extra` adds metadata: `stages` ([{name, strategy, steps}]) and
  `metrics` (shown in the model card), and anything else JSON (e.g. `converted_from`).

  `params` may be in either layout; the checkpoint always holds the canonical one. In
  multi-process runs every process must call this (the orbax write is collective); only
  process 0 writes the JSON and copies the tokenizer files.
  """
  import orbax.checkpoint as ocp
  if head not in HEADS:
    raise ValueError(f"unknown head {head!r}; valid heads: {sorted(HEADS)}")
  meta = {"format": "mobilebert_jax", "version": FORMAT_VERSION, "head": head,
          "model": config.to_dict(), **(extra or {})}
  if head in LABELLED_HEADS:  # checked before anything is written
    meta["id2label"] = model_files.id2label(labels, config.num_labels)
  path = _absolute(path)
  epath.Path(path).mkdir(parents=True, exist_ok=True)
  params_dir = os.path.join(path, NATIVE_PARAMS)
  params = to_canonical_layout(dict(params), config)
  host_params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(params_dir, host_params, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() != 0:
    return
  epath.Path(path, NATIVE_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
  model_files.write_companions(path, meta, tokenizer_dir=tokenizer_dir,
                               num_params=num_params(params))


def read_checkpoint(path: str) -> tuple[ModelConfig, str, dict]:
  """Reads (config, head, params as numpy, canonical layout) from a native or HF directory."""
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(f"{path}: no such checkpoint directory")
  if is_native_dir(path):
    import orbax.checkpoint as ocp
    meta = read_native_meta(path)
    config = ModelConfig.from_dict(meta["model"], source=os.path.join(path, NATIVE_CONFIG))
    params_dir = os.path.join(_absolute(path), NATIVE_PARAMS)
    if not epath.Path(params_dir).is_dir():
      raise FileNotFoundError(f"{path}: {NATIVE_CONFIG} present but no {NATIVE_PARAMS}/ directory")
    params = ocp.StandardCheckpointer().restore(params_dir)
    params = to_canonical_layout(jax.tree.map(np.asarray, params), config)
    return config, meta["head"], params
  if hf.is_hf_dir(path):
    hf_config = hf.read_hf_config(path)
    config = hf.config_from_hf(hf_config, source=os.path.join(path, "config.json"))
    state = hf.read_hf_weights(path)
    head = hf.head_from_architectures(hf_config, state)
    state = hf.strip_base_prefix(state, config, head)
    reference = to_canonical_layout(abstract_params(build_model(config, head), config), config)
    params = hf.state_to_params(state, config, head, reference, source=path)
    return config, head, params
  raise hf.ConversionError(
      f"{path}: no model config found (expected {NATIVE_CONFIG} for a native checkpoint or "
      "config.json for a Hugging Face checkpoint)")


def adapt_params(params: Mapping, src_head: str, dst_head: str, config: ModelConfig,
                 seed: int = 0) -> dict:
  """Moves a params tree saved with `src_head` onto a model with `dst_head`.

  Backbone weights are taken over (the embeddings and layers must all be there, with their
  shapes); head parameters the source lacks, or whose shape changed (a new label count), are
  initialised fresh and logged. Takes either layout; returns the canonical one.
  """
  model = build_model(config, dst_head)
  reference = to_canonical_layout(abstract_params(model, config), config)
  params = to_canonical_layout(params, config)
  src_backbone = params if src_head == "base" else params.get("backbone", {})
  src_heads = {} if src_head == "base" else {k: v for k, v in params.items() if k != "backbone"}
  fresh: list[str] = []
  out: dict = {}

  def take(ref, src, path):
    if isinstance(ref, Mapping):
      return {k: take(v, src.get(k) if isinstance(src, Mapping) else None, path + (k,))
              for k, v in ref.items()}
    name = "/".join(path)
    if src is None or tuple(np.shape(src)) != tuple(ref.shape):
      core = path[1 if dst_head != "base" else 0].startswith(_CORE_PREFIXES)
      if core:
        found = "missing" if src is None else f"shape {tuple(np.shape(src))}"
        raise hf.ConversionError(f"backbone parameter {name}: {found}, expected {tuple(ref.shape)}")
      fresh.append(name)
      return None
    return np.asarray(src)

  if dst_head == "base":
    out = take(reference, src_backbone, ())
  else:
    out = {"backbone": take(reference["backbone"], src_backbone, ("backbone",))}
    for k, v in reference.items():
      if k != "backbone":
        out[k] = take(v, src_heads.get(k), (k,))
  if fresh:
    log.warning("initialised %d parameters not in the checkpoint (new head or shape): %s",
                len(fresh), fresh)
    init = to_canonical_layout(init_params(model, config, jax.random.PRNGKey(seed)), config)
    out = jax.tree.map(lambda o, i: np.asarray(i) if o is None else o, out, init,
                       is_leaf=lambda x: x is None)
  return out


def load_pretrained(path: str, head: str | None = None, *, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32, num_labels: int | None = None,
                    seed: int = 0) -> tuple[nn.Module, dict]:
  """Loads a native or Hugging Face checkpoint directory as ``(model, params)``.

  Args:
    path: a directory written by `save_pretrained` / `convert import-hf`, or a transformers
      directory with config.json and model.safetensors or pytorch_model.bin.
    head: the head to put on the backbone (one of `HEADS`); default: the checkpoint's own.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); param_dtype: dtype of the returned params.
    num_labels: override the classification label count (the classifier is then re-initialised).
    seed: seed for any freshly initialised head parameters.

  Returns params in the layout of the returned model (stacked layers when the checkpoint's
  config has `scan_layers`). Usage:
  ``model.apply({"params": params}, input_ids=ids, attention_mask=mask)``.
  """
  config, src_head, params = read_checkpoint(path)
  head = head or src_head
  if head not in HEADS:
    raise ValueError(f"unknown head {head!r}; valid heads: {sorted(HEADS)}")
  if num_labels is not None and num_labels != config.num_labels:
    config = config.replace(num_labels=num_labels)
  if head != src_head or num_labels is not None:
    params = adapt_params(params, src_head, head, config, seed=seed)
  model = build_model(config, head, dtype=dtype, param_dtype=param_dtype)
  params = to_model_layout(params, config)
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype=param_dtype), params)
  return model, params


def checkpoint_config(path: str) -> ModelConfig:
  """The ModelConfig of a native or Hugging Face checkpoint, without reading its weights."""
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(f"{path}: no such checkpoint directory")
  if is_native_dir(path):
    return ModelConfig.from_dict(read_native_meta(path)["model"],
                                 source=os.path.join(path, NATIVE_CONFIG))
  if hf.is_hf_dir(path):
    return hf.config_from_hf(hf.read_hf_config(path), source=os.path.join(path, "config.json"))
  raise hf.ConversionError(f"{path}: no model config found (expected {NATIVE_CONFIG} or a "
                           "Hugging Face config.json)")
