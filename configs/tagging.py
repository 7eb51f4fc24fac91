"""Token classification (NER, chunking, POS) fine-tuning of a pretrained or distilled checkpoint.

    python -m mobilebert_jax.main --config=configs/tagging.py --workdir=DIR \
        --config.init_checkpoint=CKPT --config.tagging_data.train_file=train.txt \
        --config.tagging_data.dev_file=valid.txt [--config.tagging_data.tag_column=3]

CoNLL-format files: one token per line with its columns (token first, the tag in `tag_column`,
default the last), a blank line between sentences, `-DOCSTART-` skipped. The tag set is the
training file's. Each word's tag is predicted at its first word piece (BERT's NER recipe).
`scheme="bio"` scores span precision/recall/F1 as the CoNLL `conlleval` script does (NER,
chunking); `scheme="accuracy"` per-word accuracy (POS). Writes `eval_results.json`
(`dev_f1`, `dev_precision`, `dev_recall`, `dev_accuracy`, the stage's parameter count and
training FLOPs), `tagging_predictions.txt` (token gold predicted) and the tagger in `student/`.

Without files it runs on the synthetic NER sample the package ships
(`mobilebert_jax.data.sample_tagging_paths()`). Reference: lr 5e-5, batch 32, 3 epochs, AdamW,
10% warm-up, sequence length 128 (BERT's fine-tuning recipe; transformers' run_ner defaults).
"""

import ml_collections

from mobilebert_jax.data import sample_tagging_paths
from mobilebert_jax.default_config import model_block, optimizer
from mobilebert_jax.default_config import get_config as demo_config


def get_config() -> ml_collections.ConfigDict:
  c = demo_config()
  c.stages = "tagging"
  c.init_checkpoint = ""
  c.student = model_block("mobilebert")
  sample = sample_tagging_paths()
  c.tagging_data.update(dict(train_file=sample["train_file"], dev_file=sample["dev_file"],
                             tag_column=-1, scheme="bio"))
  c.data.update(dict(max_seq_length=128, batch_size=32))
  c.checkpoint.update(dict(save_every_steps=1000, keep=2))
  c.log_every_steps = 50
  opt = optimizer(learning_rate=5e-5, warmup_steps=0)
  opt.update(dict(optimizer="adamw", grad_clip_norm=1.0))
  c.tagging = ml_collections.ConfigDict(dict(
      strategy="tagging", model="student", num_steps=0, num_epochs=3.0, warmup_fraction=0.1,
      optimizer=opt))
  del c["teacher_pretrain"], c["pkt"], c["pd"]
  return c
