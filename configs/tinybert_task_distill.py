"""TinyBERT task-specific distillation: a fine-tuned teacher -> a (generally distilled) student.

    python -m mobilebert_jax.main --config=configs/tinybert_task_distill.py --workdir=DIR \
        --config.task=sst2 --config.data_dir=GLUE_DIR \
        --config.teacher_checkpoint=FINETUNED_BERT_BASE --config.init_checkpoint=TINYBERT_GENERAL

Intermediate-layer distillation (embedding + attention-score + hidden MSE with learned
projections, uniform layer mapping), then prediction-layer distillation (soft cross-entropy at
temperature 1) on the task's training data, optionally augmented (Jiao et al., 2020:
p_t 0.4, N_a 20, K 15). Reference (TinyBERT): intermediate 10-20 epochs at lr 5e-5, prediction 3 epochs
at lr 3e-5, batch 32, seq 128. The dev evaluation adds loyalty to the teacher.
"""

import ml_collections

from mobilebert_jax.default_config import model_block, optimizer
from mobilebert_jax.default_config import get_config as demo_config


def adamw(learning_rate: float, warmup_steps: int) -> ml_collections.ConfigDict:
  opt = optimizer(learning_rate=learning_rate, warmup_steps=warmup_steps)
  opt.optimizer = "adamw"
  return opt


def get_config() -> ml_collections.ConfigDict:
  c = demo_config()
  c.stages = "intermediate,prediction"
  c.task = "sst2"
  c.data_dir = ""
  c.teacher_checkpoint = ""
  c.init_checkpoint = ""
  c.teacher = model_block("bert_base")
  c.student = model_block("tinybert_4l")
  c.data.update(dict(max_seq_length=128, batch_size=32))
  # config.augmentation.mlm_checkpoint: a pretrained (not fine-tuned) model with an MLM head,
  # e.g. bert-base-uncased; --config.augmentation.enabled=True turns TinyBERT's augmentation on.
  c.robustness.max_examples = 200
  c.checkpoint.update(dict(save_every_steps=1000, keep=2))
  c.log_every_steps = 50
  c.intermediate = ml_collections.ConfigDict(dict(
      strategy="task_intermediate", model="student", num_steps=20000, layer_mapping="uniform",
      optimizer=adamw(5e-5, 2000)))
  c.prediction = ml_collections.ConfigDict(dict(
      strategy="task_prediction", model="student", num_steps=6000, temperature=1.0,
      optimizer=adamw(3e-5, 600)))
  del c["teacher_pretrain"], c["pkt"], c["pd"]
  return c
