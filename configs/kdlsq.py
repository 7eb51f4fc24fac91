"""KDLSQ-BERT (Jin et al. 2021): quantization-aware training with learned step sizes, distilled
from the float model.

    python -m mobilebert_jax.main --config=configs/kdlsq.py --workdir=DIR --config.task=sst2 \
        --config.data_dir=GLUE_DIR --config.teacher_checkpoint=FT --config.init_checkpoint=FT

FT is a fine-tuned classifier (a configs/glue.py result): it is the full-precision teacher and the
starting point of the quantized student. Weights, dense-layer inputs and the word embeddings are
fake-quantized with LSQ (straight-through estimator, learned step sizes with the LSQ gradient
scale), by default at the paper's 2-bit weights / 8-bit activations (`weight_bits`, `act_bits`,
`embedding_bits`, `quantize_embeddings`), steps initialised from KDLSQ's truncated range
(`step_init`). The loss is hidden-state + attention-score MSE over every layer plus the
prediction soft cross-entropy, and `ground_truth_weight` x the hard-label loss (0: off); the keys
and their sources are in `mobilebert_jax.quantization.kdlsq.STAGE_KEYS`. `eval_results.json` gets
`lsq<bits>_dev_<metric>`, the stored model's size in bits and its compression ratio against
float32 (step sizes included); the steps are stored in `quantize/final/lsq_steps.npz`. Set
`--config.quantization.ptq_eval=True` on a configs/glue.py run for post-training int8 instead.
"""

import ml_collections

from mobilebert_jax.default_config import model_block, optimizer
from mobilebert_jax.default_config import get_config as demo_config
from mobilebert_jax.quantization.kdlsq import STAGE_KEYS


def get_config() -> ml_collections.ConfigDict:
  c = demo_config()
  c.stages = "quantize"
  c.task = "sst2"
  c.data_dir = ""
  c.teacher_checkpoint = ""
  c.init_checkpoint = ""
  c.check_teacher_config = False
  c.teacher = model_block("mobilebert")
  c.student = model_block("mobilebert")
  c.data.update(dict(max_seq_length=128, batch_size=32))
  c.checkpoint.update(dict(save_every_steps=1000, keep=2))
  c.log_every_steps = 50
  opt = optimizer(learning_rate=2e-5, warmup_steps=300)
  opt.optimizer = "adamw"
  c.quantize = ml_collections.ConfigDict(dict(
      strategy="kdlsq", model="student", num_steps=6000, optimizer=opt, **STAGE_KEYS))
  del c["teacher_pretrain"], c["pkt"], c["pd"]
  return c
