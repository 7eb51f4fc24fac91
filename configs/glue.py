"""GLUE fine-tuning of a pretrained or distilled checkpoint.

    python -m mobilebert_jax.main --config=configs/glue.py --workdir=DIR \
        --config.task=sst2 --config.init_checkpoint=CKPT [--config.data_dir=GLUE_DIR]

`init_checkpoint` is a native directory (e.g. a distillation run's `student/`) or a Hugging Face
directory; its vocab.txt is used for tokenisation. `data_dir` holds the official GLUE TSV files
(`GLUE_DIR/SST-2/train.tsv` or `GLUE_DIR/train.tsv`); empty means tensorflow-datasets `glue/<task>`
from `data.tfds_data_dir`. Writes `eval_results.json` (dev metrics), `predictions/<TASK>.tsv` for
test splits present, and the fine-tuned model in `finetune/final` and `student/`.

The length is `finetune.num_epochs` (default 3) over the task's training data, with a linear
warm-up over `finetune.warmup_fraction` (default 0.1) of the steps; `--config.finetune.num_steps=N`
overrides the epochs. Reference fine-tuning grid (BERT / MobileBERT papers): learning rate in
{1e-5, 2e-5, 3e-5, 5e-5} (MobileBERT also uses up to 1e-4 for small tasks), batch size in
{16, 32, 48}, 2-5 epochs, 10% warm-up, AdamW, weight decay 0.01, sequence length 128.
"""

import ml_collections

from mobilebert_jax.default_config import model_block, optimizer
from mobilebert_jax.default_config import get_config as demo_config


def get_config() -> ml_collections.ConfigDict:
  c = demo_config()
  c.stages = "finetune"
  c.task = "sst2"
  c.init_checkpoint = ""
  c.data_dir = ""
  c.student = model_block("mobilebert")
  c.data.update(dict(max_seq_length=128, batch_size=32, tfds_data_dir=""))
  c.checkpoint.update(dict(save_every_steps=1000, keep=2))
  c.log_every_steps = 50
  opt = optimizer(learning_rate=3e-5, warmup_steps=0)
  opt.update(dict(optimizer="adamw", grad_clip_norm=1.0))
  c.finetune = ml_collections.ConfigDict(dict(
      strategy="finetune", model="student", num_steps=0, num_epochs=3.0, warmup_fraction=0.1,
      optimizer=opt))
  del c["teacher_pretrain"], c["pkt"], c["pd"]
  return c
