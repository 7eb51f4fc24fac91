"""Cross-view training (Clark et al., 2018) of a CNN-BiLSTM tagger on the shipped tagging sample.

    python -m mobilebert_jax.main --config=configs/cvt.py --workdir=DIR

The sample (`mobilebert_jax.data.sample_tagging_paths()`) is a synthetic English NER set (BIO
tags, PER / LOC / ORG): 400 labelled sentences, 2000 unlabelled ones and 200 dev sentences whose
names mostly occur, untagged, only in the unlabelled text. Writes `eval_results.json`
(`cvt_dev_f1`, precision, recall, accuracy, `cvt_num_params`, `cvt_train_steps`,
`cvt_flops_per_step`), `cvt/dev_predictions.conll` and the tagger in `cvt/final/`
(`mobilebert_jax.cvt.stage.load_cvt`). One to two minutes on a 2-core CPU.

Own data: `--config.tagging_data.train_file=... --config.tagging_data.dev_file=...
--config.tagging_data.unlabeled_file=...` (empty: supervised training only), `tag_column` and
`scheme` ("bio" span F1, "accuracy" for POS). The paper's sizes are the stage's defaults
(`mobilebert_jax.cvt.stage.STAGE_KEYS`): drop the size overrides below for them. The paper
trains with SGD + momentum (see `mobilebert_jax.cvt.stage`); this short run uses AdamW.
The second stage, `bert_tagging`, fine-tunes a BERT-family student on the same labelled data
for the comparison (accuracy per parameter and per training FLOP); `--config.stages=cvt` runs
CVT alone.
"""

import ml_collections

from mobilebert_jax.data.paths import sample_tagging_paths
from mobilebert_jax.default_config import get_config as demo_config
from mobilebert_jax.default_config import model_block, optimizer


def get_config() -> ml_collections.ConfigDict:
  c = demo_config()
  for name in c.stages.split(","):
    del c[name]
  c.stages = "cvt"
  c.tagging_data.update(sample_tagging_paths())
  c.log_every_steps = 50
  opt = optimizer(learning_rate=1e-2, warmup_steps=30)
  opt.update(dict(optimizer="adamw", weight_decay=0.0, grad_clip_norm=1.0))
  # Small sizes and a short run: lighter dropout on labelled minibatches (the paper's 0.5 is for
  # long runs), whole-word dropout (the word vectors start from scratch, not from GloVe), and
  # the unlabelled term at a quarter weight (the mean of the four views' KLs); see
  # mobilebert_jax.cvt.stage.STAGE_KEYS.
  c.cvt = ml_collections.ConfigDict(dict(
      strategy="cvt", num_steps=600, word_embedding_size=64, char_embedding_size=16,
      char_filter_widths=(2, 3, 4), char_filters=32, first_lstm_size=128, second_lstm_size=64,
      projection_size=64, batch_size=32, unlabeled_batch_size=32, labeled_dropout=0.2,
      word_dropout=0.3, unlabeled_weight=0.25, optimizer=opt))
  # The comparison: a BERT-family student (BERT-Tiny's sizes: 2 layers, 128 hidden, 2 heads;
  # Turc et al., 2019) fine-tuned on the same labelled sentences with the `tagging` strategy,
  # from scratch here (--config.init_checkpoint=DIR starts it from a pretrained or distilled
  # checkpoint). eval_results.json then holds both taggers' dev F1 (`cvt_dev_f1`, `dev_f1`),
  # parameter counts and training FLOPs (`cvt_*`, `bert_tagging_*`).
  c.stages = "cvt,bert_tagging"
  c.student = model_block("bert_base", num_layers=2, hidden_size=128, num_heads=2,
                          intermediate_size=512, vocab_size=2972, max_position_embeddings=64)
  c.data.update(dict(max_seq_length=64, batch_size=32))
  bert_opt = optimizer(learning_rate=1e-3, warmup_steps=0, optimizer="adamw")
  c.bert_tagging = ml_collections.ConfigDict(dict(
      strategy="tagging", model="student", num_steps=600, warmup_fraction=0.1,
      optimizer=bert_opt))
  return c
