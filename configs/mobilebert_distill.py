"""Reference MobileBERT distillation: PKT (24 layer-wise phases) then pretraining distillation.

The values of the google-research release (mobilebert/README.md distillation command and
run_pretraining.py, optimization.py, lamb_optimizer.py, distill_util.py; Sun et al., 2020):
LAMB, weight decay 0.01, gradient clipping 1.0, batch 2048, sequence 512, 20 predictions per
sequence, checkpoint every 10k steps. Both stages run the student without dropout (a teacher is
present) and the teacher at inference.

  pkt  240k steps (`num_distill_steps`), 10k per layer. Constant base rate 1.5e-3 with no global
       warm-up or decay (`num_warmup_steps=0`, `end_lr_rate=1.0`). Layer l in its phase gets
       3 x b(t) x 1.5e-3, after it 3 x 0.1 x b(t) x 1.5e-3, before it 0, with b(t) the per-phase
       warm-up min(0.9 + 0.1 sqrt(1 - t/S), 10 t/S) at step t of a phase of S = 10k steps.
       Embeddings, pooler and heads copied from the teacher (its LayerNorm not into NoNorm) and
       frozen. Loss: layer l's transfer losses / 24, factors hidden 100, mean 5000,
       variance 5, attention 1.
  pd   500k steps (`num_train_steps`) from the PKT student: 10k linear warm-up to 1.5e-3, linear
       decay to 1.5e-3 x 1e-4 (`end_lr_rate` default); L = 0.5 MLM + 0.5 KD (T = 1) + NSP.

Needs a trained IB-BERT teacher (`--config.teacher_checkpoint=DIR`, native or Hugging Face) and
the corpus prepared once at sequence length 512 (`--config.data.prepared_dir=DIR`, see
`mobilebert_jax.data.prepare`).
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
  # The release's LAMB (lamb_optimizer.py) keeps raw Adam moments: no bias correction.
  pkt_opt = optimizer(learning_rate=1.5e-3, warmup_steps=0, schedule="constant",
                      bias_correction=False)
  c.pkt = ml_collections.ConfigDict(dict(
      strategy="pkt", model="student", num_steps=240_000, copy_from_teacher=True,
      current_layer_multiplier=3.0, lower_layer_multiplier=0.3, student_dropout=False,
      optimizer=pkt_opt, **transfer_factors()))
  pd_opt = optimizer(learning_rate=1.5e-3, warmup_steps=10_000, bias_correction=False)
  pd_opt.end_learning_rate = 1.5e-3 * 1e-4
  c.pd = ml_collections.ConfigDict(dict(
      strategy="pd", model="student", num_steps=500_000, alpha=0.5, temperature=1.0,
      student_dropout=False, optimizer=pd_opt))
  del c["teacher_pretrain"]
  return c
