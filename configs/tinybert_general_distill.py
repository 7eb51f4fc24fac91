"""TinyBERT general distillation: BERT-base teacher -> TinyBERT-4L (312 hidden, 1200 FFN, 12 heads).

Embedding + attention-score + hidden MSE with learned projections (312 -> 768) and the uniform
layer mapping; the teacher is a pretrained (not fine-tuned) BERT-base, e.g. a Hugging Face
directory: --config.teacher_checkpoint=/path/to/bert-base-uncased --config.data.vocab_path=same,
and the corpus prepared once at length 128 with that vocab: --config.data.prepared_dir=DIR
(`python -m mobilebert_jax.data.prepare --vocab=same --max_seq_length=128 ...`).
"""

import ml_collections

from mobilebert_jax.default_config import model_block, optimizer, prepared_corpus
from mobilebert_jax.default_config import get_config as demo_config


def get_config() -> ml_collections.ConfigDict:
  c = demo_config()
  c.stages = "general"
  c.teacher = model_block("bert_base")
  c.student = model_block("tinybert_4l")
  c.teacher_checkpoint = ""
  c.data.update(prepared_corpus(max_seq_length=128, max_predictions_per_seq=20,
                                batch_size=256))
  c.checkpoint.update(dict(save_every_steps=10_000, keep=3))
  c.log_every_steps = 100
  tiny_opt = optimizer(learning_rate=1e-4, warmup_steps=10_000)
  tiny_opt.optimizer = "adamw"
  c.general = ml_collections.ConfigDict(dict(
      strategy="tinybert", model="student", num_steps=300_000, layer_mapping="uniform",
      layer_mapping_order="nondecreasing",
      optimizer=tiny_opt))
  del c["teacher_pretrain"], c["pkt"], c["pd"]
  return c
