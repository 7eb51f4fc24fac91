"""Reference MobileBERT distillation: PKT (24 layer-wise phases) then pretraining distillation.

MobileBERT (Sun et al., 2020): lr 1.5e-3, 10k warm-up, batch 2048, seq 512, 20 predictions per
sequence, 240k layer-wise steps then 500k PD steps, LAMB, checkpoint every 10k steps. Needs a trained
IB-BERT teacher (`--config.teacher_checkpoint=DIR`, native or Hugging Face) and the corpus prepared
once at sequence length 512 (`--config.data.prepared_dir=DIR`, see `mobilebert_jax.data.prepare`).
"""

import ml_collections

from mobilebert_jax.default_config import model_block, optimizer, prepared_corpus, transfer_factors
from mobilebert_jax.default_config import get_config as demo_config

STUDENT_PRESET = "mobilebert"


def get_config() -> ml_collections.ConfigDict:
  c = demo_config()
  c.stages = "pkt,pd"
  c.dtype = "bfloat16"
  c.teacher = model_block("ib_bert_large")
  c.student = model_block(STUDENT_PRESET)
  c.teacher_checkpoint = ""
  c.data.update(prepared_corpus(max_seq_length=512, max_predictions_per_seq=20,
                                batch_size=2048))
  c.checkpoint.update(dict(save_every_steps=10_000, keep=3))
  c.log_every_steps = 100
  # The reference layer-wise schedule: 0 before a layer's phase, 1 during it, 0.1 after.
  c.pkt = ml_collections.ConfigDict(dict(
      strategy="pkt", model="student", num_steps=240_000, copy_from_teacher=True,
      lower_layer_multiplier=0.1, current_layer_multiplier=1.0,
      optimizer=optimizer(learning_rate=1.5e-3, warmup_steps=10_000), **transfer_factors()))
  c.pd = ml_collections.ConfigDict(dict(
      strategy="pd", model="student", num_steps=500_000, alpha=0.5, temperature=1.0,
      optimizer=optimizer(learning_rate=1.5e-3, warmup_steps=10_000)))
  del c["teacher_pretrain"]
  return c
