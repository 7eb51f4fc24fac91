"""Reference model sizes (MobileBERT paper Table 1, TinyBERT) and tiny variants for tests.

``get_preset("mobilebert")`` returns the full-size config; ``get_preset("mobilebert", tiny=True)``
returns a few-layer, narrow version with the same structure, for tests and the CPU demo.
"""

from __future__ import annotations

from mobilebert_jax.models.config import ModelConfig


def bert_base() -> ModelConfig:
  return ModelConfig(
      model_type="bert", embedding_size=768, hidden_size=768, intra_size=768, num_layers=12,
      num_heads=12, intermediate_size=3072, num_ffn=1, normalization="layer_norm",
      hidden_act="gelu", trigram_input=False, use_bottleneck=False, attention_input="layer_input",
      hidden_dropout=0.1, attention_dropout=0.1)


def bert_large() -> ModelConfig:
  return bert_base().replace(embedding_size=1024, hidden_size=1024, intra_size=1024,
                             num_layers=24, num_heads=16, intermediate_size=4096)


def ib_bert_large() -> ModelConfig:
  """The inverted-bottleneck teacher: 512-d inter-block, 1024-d intra-block, q/k/v from the input."""
  return ModelConfig(
      model_type="mobilebert", embedding_size=128, hidden_size=512, intra_size=1024, num_layers=24,
      num_heads=4, intermediate_size=4096, num_ffn=1, normalization="layer_norm",
      hidden_act="gelu", trigram_input=True, use_bottleneck=True, attention_input="layer_input",
      hidden_dropout=0.1, attention_dropout=0.1)


def mobilebert() -> ModelConfig:
  """MobileBERT as released (transformers' MobileBertConfig defaults)."""
  return ModelConfig()


def mobilebert_tiny() -> ModelConfig:
  return ModelConfig(num_ffn=2, attention_input="bottleneck")


def tinybert_4l() -> ModelConfig:
  return bert_base().replace(embedding_size=312, hidden_size=312, intra_size=312, num_layers=4,
                             num_heads=12, intermediate_size=1200)


PRESETS = {
    "bert_base": bert_base,
    "bert_large": bert_large,
    "ib_bert_large": ib_bert_large,
    "mobilebert": mobilebert,
    "mobilebert_tiny": mobilebert_tiny,
    "tinybert_4l": tinybert_4l,
}


def tiny(config: ModelConfig, vocab_size: int = 1024) -> ModelConfig:
  """Shrinks a config for tests and CPU demos while keeping its structure.

  Widths are divided by 8 (4 for the narrow embedding), layers capped at 2; the head count,
  bottleneck ratios, norm, activation and attention wiring are unchanged.
  """
  def shrink(width: int) -> int:
    return max(config.num_heads, (width // 8) // config.num_heads * config.num_heads)

  hidden = shrink(config.hidden_size)
  intra = hidden if config.intra_size == config.hidden_size else shrink(config.intra_size)
  embedding = hidden if config.embedding_size == config.hidden_size else min(
      hidden, max(config.embedding_size // 4, 8))
  return config.replace(
      vocab_size=vocab_size, hidden_size=hidden, intra_size=intra, embedding_size=embedding,
      num_layers=min(config.num_layers, 2), intermediate_size=max(config.intermediate_size // 8, 16),
      max_position_embeddings=128)


def get_preset(name: str, tiny_variant: bool = False, **overrides) -> ModelConfig:
  """Returns a preset by name, optionally shrunk with `tiny`, with field overrides applied."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
  config = PRESETS[name]()
  if tiny_variant:
    config = tiny(config)
  return config.replace(**overrides) if overrides else config
