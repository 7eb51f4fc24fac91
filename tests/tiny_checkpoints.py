"""Tiny native checkpoints with random weights and a 64-token vocabulary, for the export and
predict tests."""

import jax
import numpy as np

from mobilebert_jax import save_pretrained
from mobilebert_jax.models import ModelConfig, build_model
from mobilebert_jax.pretrained import abstract_params

WORDS = [f"word{i}" for i in range(59)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS  # 64 tokens
LABELS = ("negative", "neutral", "positive")
NAS = ModelConfig(vocab_size=64, embedding_size=16, hidden_size=32, intra_size=32, num_layers=4,
                  num_heads=2, intermediate_size=32, num_ffn=1, normalization="layer_norm",
                  hidden_act="gelu", trigram_input=False, use_bottleneck=False,
                  attention_input="layer_input", model_type="bert", max_position_embeddings=32,
                  hidden_dropout=0.0, attention_dropout=0.0, num_labels=3,
                  layer_ops=("mha2", "ffn64", "conv3", "identity"))


def native_checkpoint(path, config, head="classification", seed=0, labels=None):
  """A tiny native checkpoint at `path` (a pathlib.Path) with random weights (norm scales near
  1; filled from shapes alone, quicker than compiling the initialisers), a 64-token vocab.txt
  and label names (`LABELS` for a three-way classifier unless `labels` says otherwise)."""
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    noise = rng.randn(*leaf.shape).astype(np.float32)
    return 1 + 0.05 * noise if path[-1].key == "scale" else 0.1 * noise

  shapes = abstract_params(build_model(config, head), config)
  params = jax.tree_util.tree_map_with_path(fill, shapes)
  vocab_dir = path.parent / f"{path.name}_vocab"
  vocab_dir.mkdir(parents=True)
  (vocab_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  if labels is None and head == "classification" and config.num_labels == len(LABELS):
    labels = LABELS
  save_pretrained(str(path), config, params, head, tokenizer_dir=str(vocab_dir), labels=labels)
  return str(path)
