"""KDLSQ-BERT: quantization-aware training with learned step sizes, distilled from the float model.

    python -m mobilebert_jax.main --config=configs/kdlsq.py --workdir=DIR --config.task=sst2 \
        --config.data_dir=GLUE_DIR --config.teacher_checkpoint=FT --config.init_checkpoint=FT \
        --config.quantize.weight_bits=2 --config.quantize.act_bits=8

FT is a fine-tuned classifier (a configs/glue.py result): it is the full-precision teacher and the
starting point of the quantized student. Weights and dense-layer inputs are fake-quantized with
LSQ (straight-through estimator, learned step sizes with the LSQ gradient scale) at 2-8 bits;
the loss is the prediction soft cross-entropy plus hidden-state MSE over every layer.
`eval_results.json` gets `lsq<bits>_dev_<metric>`, the model size in bits and the compression
ratio against float32; the steps are stored in `quantize/final/lsq_steps.npz`. Set
`--config.quantization.ptq_eval=True` on a configs/glue.py run for post-training int8 instead.
"""

import ml_collections

from mobilebert_jax.default_config import model_block, optimizer
from mobilebert_jax.default_config import get_config as demo_config


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
      strategy="kdlsq", model="student", num_steps=6000, weight_bits=8, act_bits=8,
      temperature=1.0, optimizer=opt))
  del c["teacher_pretrain"], c["pkt"], c["pd"]
  return c
