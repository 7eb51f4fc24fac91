"""The files that travel with every model directory: tokenizer files, label names, model card.

Native checkpoints (`save_pretrained`), Hugging Face exports (`convert export-hf`) and on-device
exports to a directory (`convert export-litert|export-onnx OUT_DIR`) all carry:

  vocab.txt / tokenizer.json       copied from the tokenizer the model was trained with;
  tokenizer_config.json            written when the source has none, so `AutoTokenizer` loads
                                   the directory (`BertTokenizer`, lower-cased, the model's
                                   maximum length), with special_tokens_map.json;
  README.md                        a short model card: architecture, parameters, head and label
                                   names, training stages, dev metrics when known.

Label names live in the native metadata as `id2label` ({"0": "entailment", ...}); models saved
without them are given `LABEL_i`, as transformers does.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from etils import epath

from mobilebert_jax.interop import hf

CARD_FILE = "README.md"
# Heads `python -m mobilebert_jax.predict` serves (its PREDICTABLE_HEADS).
PREDICT_HEADS = ("classification", "question_answering", "token_classification")
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "mask_token": "[MASK]"}


def id2label(names: Sequence[str] | None, num_labels: int) -> dict[str, str]:
  """{"0": name, ...} for `num_labels` outputs: `names` when given (their count must match),
  else LABEL_0 .. LABEL_{n-1}."""
  if names is None:
    return {str(i): f"LABEL_{i}" for i in range(num_labels)}
  if len(names) != num_labels:
    raise ValueError(f"{len(names)} label names {list(names)} for a head with {num_labels} "
                     "outputs")
  return {str(i): str(name) for i, name in enumerate(names)}


def label_names(meta: Mapping[str, Any], num_labels: int) -> list[str]:
  """The label names of a model's metadata (its `id2label`, else LABEL_i), in id order."""
  mapping = meta.get("id2label") or id2label(None, num_labels)
  return [mapping[str(i)] for i in range(len(mapping))]


def write_tokenizer_config(directory: str, max_length: int) -> list[str]:
  """Writes tokenizer_config.json and special_tokens_map.json into `directory` when it holds a
  vocab.txt but no tokenizer_config.json; returns the names written."""
  path = epath.Path(directory)
  if (path / TOKENIZER_CONFIG).exists() or not (path / "vocab.txt").exists():
    return []
  config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
            "model_max_length": int(max_length), "clean_up_tokenization_spaces": True,
            **SPECIAL_TOKENS}
  (path / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
  written = [TOKENIZER_CONFIG]
  if not (path / SPECIAL_TOKENS_MAP).exists():
    (path / SPECIAL_TOKENS_MAP).write_text(json.dumps(SPECIAL_TOKENS, indent=2, sort_keys=True))
    written.append(SPECIAL_TOKENS_MAP)
  return written


def architecture_line(model: Mapping[str, Any]) -> str:
  """One line describing a ModelConfig dict (`ModelConfig.to_dict()`)."""
  parts = [f"{model['model_type']}", f"{model['num_layers']} layers",
           f"hidden {model['hidden_size']}", f"{model['num_heads']} heads"]
  if model.get("use_bottleneck"):
    parts.append(f"bottleneck {model['intra_size']}")
  ffn = model.get("num_ffn", 1)
  parts.append(f"FFN {model['intermediate_size']}" + (f" x {ffn}" if ffn > 1 else ""))
  if model.get("embedding_size") and model["embedding_size"] != model["hidden_size"]:
    trigram = " (kernel-3 widening)" if model.get("trigram_input") else ""
    parts.append(f"embedding {model['embedding_size']}{trigram}")
  parts.append(f"{model.get('normalization', 'layer_norm')}, {model.get('hidden_act', 'gelu')}")
  if model.get("layer_ops"):
    parts.append("searched layers " + ", ".join(model["layer_ops"]))
  parts.append(f"vocab {model['vocab_size']}, positions {model['max_position_embeddings']}")
  return "; ".join(parts)


def _stage_text(stage: Mapping[str, Any]) -> str:
  facts = [stage.get("strategy"), f"{stage['steps']} steps" if stage.get("steps") else None]
  facts = ", ".join(f for f in facts if f)
  return f"{stage['name']} ({facts})" if facts else stage["name"]


def _metric(value: Any) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


NATIVE_USAGE = (
    "python -m mobilebert_jax.predict THIS_DIR --input=sentences.txt   # JSON lines",
    "python -m mobilebert_jax.convert export-hf THIS_DIR HF_DIR         # transformers",
    "python -m mobilebert_jax.convert export-litert THIS_DIR OUT_DIR    # LiteRT (TFLite)",
)


def model_card(meta: Mapping[str, Any], num_params: int | None = None,
               details: Sequence[tuple[str, str]] = (), usage: Sequence[str] = NATIVE_USAGE
               ) -> str:
  """The README.md of a model directory from its native metadata (`mobilebert_jax.json`:
  `model`, `head`, optional `id2label`, `stages` [{name, strategy, steps}], `metrics`), with
  extra table rows `details` and the command lines `usage`."""
  model, head = meta["model"], meta["head"]
  lines = [f"# {model['model_type']} ({head} head), written by mobilebert_jax", "",
           "| | |", "|---|---|", f"| architecture | {architecture_line(model)} |"]
  if num_params is not None:
    lines.append(f"| parameters | {num_params / 1e6:.2f} M |")
  lines.append(f"| head | {head} |")
  if head in ("classification", "token_classification"):
    names = label_names(meta, int(model.get("num_labels", 2)))
    lines.append(f"| labels | {', '.join(names)} |")
  stages = meta.get("stages") or ([{"name": meta["stage"], "strategy": meta.get("strategy")}]
                                  if meta.get("stage") else [])
  if stages:
    lines.append(f"| training stages | {' -> '.join(_stage_text(s) for s in stages)} |")
  if meta.get("converted_from"):
    lines.append(f"| converted from | {meta['converted_from']} |")
  lines += [f"| {key} | {value} |" for key, value in details]
  metrics = meta.get("metrics") or {}
  if metrics:
    lines += ["", "## Dev metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_metric(v)} |" for k, v in sorted(metrics.items())]
  if head not in PREDICT_HEADS:  # predict serves task heads only
    usage = [line for line in usage if "mobilebert_jax.predict" not in line]
  lines += ["", "## Use", ""] + [f"    {line}" for line in usage] + [""]
  return "\n".join(lines)


def write_companions(directory: str, meta: Mapping[str, Any], *, tokenizer_dir: str | None,
                     num_params: int | None = None, details: Sequence[tuple[str, str]] = (),
                     usage: Sequence[str] = NATIVE_USAGE) -> None:
  """Copies the tokenizer files of `tokenizer_dir` into `directory`, adds tokenizer_config.json
  where missing, and writes the model card."""
  hf.copy_tokenizer_files(tokenizer_dir, directory)
  write_tokenizer_config(directory, int(meta["model"]["max_position_embeddings"]))
  epath.Path(directory, CARD_FILE).write_text(model_card(meta, num_params, details, usage))
