"""Layer-mapping search (Jiao et al., 2020) for TinyBERT general distillation (BERT-base teacher).

    python -m mobilebert_jax.search.layer_mapping --config=configs/layer_mapping_search.py \
        --workdir=DIR --config.teacher_checkpoint=BERT_BASE --config.data.vocab_path=BERT_BASE \
        --config.data.tfds_data_dir=TFDS_DIR --config.proxy.data_dir=GLUE_DIR

(or `--config.data.input_files=CORPUS.txt`, BERT-format text, which takes precedence over
`data.tfds_name`; the proxy's corpus sample is prepared once into `DIR/prepared_data/`).

A genetic algorithm (`ga`) over the mappings of the 4 student layers onto the 12 teacher layers
(non-decreasing: 1365 of them) scores every mapping it breeds in the proxy setting (`proxy`): a
short general distillation (the `general` stage of configs/tinybert_general_distill.py with that
`layer_mapping`, `proxy.num_steps` steps instead of 300k, warm-up scaled alike) on
`proxy.corpus_documents` documents of the corpus, then `proxy.finetune_steps` steps of fine-tuning
on each proxy task (`proxy.tasks`: GLUE names, optionally `task=DIR`; `proxy.data_dir` holds the
official GLUE TSVs, empty = tensorflow-datasets `glue/<task>` in `data.tfds_data_dir`), the score
being the mean dev score. `DIR/layer_mapping.json` gets the best mapping; the full distillation
reads it as `--config.general.layer_mapping=<mapping>` of configs/tinybert_general_distill.py.

Full-size values: `ga.population_size` x (1 + `ga.generations`) bounds the proxy runs (here at
most 16 + 10 x 14 = 156; fewer since no mapping is scored twice), each one distillation of
`proxy.num_steps` at the reference batch of 256 x 128 tokens (10k steps = 1/30 of the full run)
plus one fine-tuning per task (2k steps of 32 = ~64k examples, about 1/6 epoch of MNLI or QQP).
Scale `proxy.num_steps`/`proxy.finetune_steps` down for a cheaper, noisier search;
`ga.initial` seeds the first generation with hand-picked mappings ("1,2,3,4;9,10,11,12").
"""

import ml_collections

from mobilebert_jax.default_config import sibling_config


def get_config() -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "tinybert_general_distill")
  # The proxy samples raw documents: data.input_files (BERT-format text, preferred) or
  # data.tfds_name; the proxy runs prepare their sample on the fly.
  c.data.update(dict(require_prepared=False, tfds_name="wikipedia/20230601.en"))
  c.ga = ml_collections.ConfigDict(dict(
      population_size=16, generations=10, monotone=True, mutation_rate=0.15, crossover_rate=0.8,
      crossover="one_point", elite=2, tournament_size=4, seed=0, initial=""))
  c.proxy = ml_collections.ConfigDict(dict(
      num_steps=10_000, corpus_documents=100_000, tasks="mnli,qqp,sst2", data_dir="",
      finetune_steps=2000, finetune_batch_size=32, finetune_learning_rate=5e-5,
      finetune_warmup_fraction=0.1, cleanup=True))
  return c
