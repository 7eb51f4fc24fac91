"""SQuAD v1.1 / v2.0 fine-tuning of a pretrained or distilled checkpoint.

    python -m mobilebert_jax.main --config=configs/squad.py --workdir=DIR \
        --config.init_checkpoint=CKPT --config.squad_data.train_file=train-v1.1.json \
        --config.squad_data.dev_file=dev-v1.1.json [--config.squad_data.version_2=True]

Windows of 384 tokens every 128 (doc stride), questions cut at 64 tokens; answers decoded from the
20 best starts and ends, at most 30 tokens; v2.0 answers "" when the [CLS] null score beats the best
span by more than `null_threshold`. Writes `eval_results.json` (`squad_exact`, `squad_f1`, and the
HasAns/NoAns breakdown for v2.0) and `predictions.json`. Reference: lr 5e-5 (MobileBERT uses up to
1e-4), batch 32, 2-3 epochs, AdamW, 10% warm-up.
"""

import ml_collections

from mobilebert_jax.default_config import model_block, optimizer
from mobilebert_jax.default_config import get_config as demo_config


def get_config() -> ml_collections.ConfigDict:
  c = demo_config()
  c.stages = "squad"
  c.init_checkpoint = ""
  c.student = model_block("mobilebert")
  c.data.update(dict(max_seq_length=384, batch_size=32))
  c.checkpoint.update(dict(save_every_steps=1000, keep=2))
  c.log_every_steps = 50
  opt = optimizer(learning_rate=5e-5, warmup_steps=0)
  opt.optimizer = "adamw"
  # BERT's SQuAD recipe: 2-3 epochs, 10% warm-up; --config.squad.num_steps=N overrides.
  c.squad = ml_collections.ConfigDict(dict(
      strategy="squad", model="student", num_steps=0, num_epochs=2.0, warmup_fraction=0.1,
      optimizer=opt))
  del c["teacher_pretrain"], c["pkt"], c["pd"]
  return c
