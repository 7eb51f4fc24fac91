"""ETD-Impt: TinyBERT general distillation from BERT-base into a student cut out of the teacher.

Extract Then Distill (Chen et al. 2021): instead of starting at random, the student is
initialised with the teacher's most important sub-network: teacher layers 2, 4, ..., 12 (the
uniform mapping), and in each of them the heads, per-head dimensions, FFN neurons and hidden
channels with the largest first-order (Taylor) importance for the teacher's MLM + NSP loss,
estimated on the first `etd_num_batches` batches (`mobilebert_jax/distill/etd.py`). The paper
reports the same quality as the randomly initialised baseline for about 30% of its distillation
compute; the step count here is 30% of `tinybert_general_distill.py`'s 300k accordingly.

The paper extracts depth and width for students of several sizes and two distillation methods
(TinyBERT, MiniLM); the student here (6 layers, hidden 384, 12 heads of 32, FFN 1536: the
MiniLM-L6-H384 shape) is this config's choice, not a size quoted from the paper. Like the TinyBERT
config, it needs a pretrained BERT-base: --config.teacher_checkpoint=/path/to/bert-base-uncased
--config.data.vocab_path=same. `--config.general.init_from_teacher=etd_rand` gives ETD-Rand;
`--config.general.etd_importance=magnitude` ranks units by weight norms without data.
"""

import ml_collections

from mobilebert_jax.default_config import model_block, sibling_config


def get_config() -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "tinybert_general_distill")
  c.student = model_block("bert_base", embedding_size=384, hidden_size=384, intra_size=384,
                          num_layers=6, num_heads=12, intermediate_size=1536)
  c.general.update(dict(num_steps=90_000, init_from_teacher="etd_impt",
                        etd_importance="first_order", etd_num_batches=8,
                        etd_layer_mapping="uniform"))
  return c
