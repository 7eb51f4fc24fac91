"""Reference teacher run: IB-BERT-large pretrained with MLM + NSP (MobileBERT paper).

500k steps at batch 4096 with LAMB on 256 TPU v3 chips in the paper. Prepare the corpus once with
the BERT uncased vocab (`python -m mobilebert_jax.data.prepare --input=... --vocab=VOCAB
--output=gs://B/prepared/wiki_books_512 --max_seq_length=512`), then:

  python -m mobilebert_jax.main --config=configs/ib_bert_large_pretrain.py --workdir=gs://B/ibbert \
    --config.data.prepared_dir=gs://B/prepared/wiki_books_512 --config.data.vocab_path=VOCAB
"""

import ml_collections

from mobilebert_jax.default_config import model_block, optimizer, prepared_corpus
from mobilebert_jax.default_config import get_config as demo_config


def get_config() -> ml_collections.ConfigDict:
  c = demo_config()
  c.stages = "teacher_pretrain"
  c.dtype = "bfloat16"
  c.teacher = model_block("ib_bert_large")
  c.student = model_block("mobilebert")
  c.data.update(prepared_corpus(max_seq_length=512, max_predictions_per_seq=20,
                                batch_size=4096))
  c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  c.checkpoint.update(dict(save_every_steps=10_000, keep=3))
  c.log_every_steps = 100
  # The paper does not state the teacher's learning rate; this is MobileBERT's distillation rate.
  c.teacher_pretrain = ml_collections.ConfigDict(dict(
      strategy="pretrain", model="teacher", num_steps=500_000,
      optimizer=optimizer(learning_rate=1.5e-3, warmup_steps=10_000, bias_correction=False)))
  del c["pkt"], c["pd"]
  c.teacher.remat = True
  return c
