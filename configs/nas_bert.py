"""NAS-BERT: block-wise supernet training, search-space pruning and extraction of several models.

`--config=configs/nas_bert.py` (or `:tiny`) is a tiny run on the shipped corpus that finishes in
a few minutes on a 2-core CPU: the demo's tiny teacher is pretrained, then a 4-layer supernet
(2 blocks of 2 layers; hidden 32/48/64; attention with 2 or 4 heads, FFN 64/128, separable
convolution 3/5, identity) is trained block-wise against it, pruned twice, and three
architectures of different parameter budgets are written to `<workdir>/architectures.json`.

`--config=configs/nas_bert.py:full` follows the paper's search space: a 24-layer supernet in 4
blocks against a BERT-base teacher (`--config.teacher_checkpoint=DIR`, e.g. a Hugging Face
bert-base-uncased directory, with `--config.data.vocab_path=DIR` and the corpus prepared once at
length 128 with that vocab, `--config.data.prepared_dir=PREPARED`), hidden sizes
128/192/256/384/512, attention with 2/4/8 heads, FFN 512/1024/2048/3072, separable convolution
3/5/7 and identity, and budgets of 5M/10M/30M/60M parameters. Measure the latency table on the
device you deploy to and pass it with `--config.nas.latency_table=PATH` (otherwise the search
device is measured). Each extracted model is then trained with pretraining distillation:
`python -m mobilebert_jax.main --config=configs/mobilebert_distill.py --config.stages=pd
--config.student_checkpoint=<entry's checkpoint> --config.teacher_checkpoint=...`.
"""

import ml_collections

from mobilebert_jax.default_config import model_block, optimizer, prepared_corpus
from mobilebert_jax.default_config import get_config as demo_config


def nas_stage(**values) -> ml_collections.ConfigDict:
  stage = dict(
      strategy="nas", model="student", num_steps=300,
      optimizer=optimizer(learning_rate=5e-3, warmup_steps=30),
      # search space
      num_layers=4, num_blocks=2, hidden_sizes=(32, 48, 64), mha_heads=(2, 4),
      ffn_sizes=(64, 128), conv_kernels=(3, 5), identity=True,
      # candidates, pruning and the accuracy proxy
      max_candidates=512, prune_every=100, prune_fraction=0.5, prune_bins=3, min_keep=2,
      eval_batches=2,
      # performance approximation and budgets
      latency_table="", latency_batch_size=1, latency_seq_length=64, latency_repeats=10,
      param_budgets=(62_000, 75_000, 100_000), latency_budgets_ms=(), beam_size=64)
  stage.update(values)
  return ml_collections.ConfigDict(stage)


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in ("tiny", "full"):
    raise ValueError(f"configs/nas_bert.py: unknown variant {variant!r}; use 'tiny' or 'full'")
  c = demo_config()
  c.stages = "teacher_pretrain,nas"
  c.teacher_pretrain.num_steps = 300
  # The student template: vocabulary, embedding width, positions, norms, activation.
  c.student = model_block(
      "bert_base", vocab_size=c.teacher.vocab_size, embedding_size=16, hidden_size=64,
      intra_size=64, num_layers=4, num_heads=4, intermediate_size=128,
      max_position_embeddings=128, hidden_dropout=0.0, attention_dropout=0.0)
  c.nas = nas_stage()
  del c["pkt"], c["pd"]
  if variant == "tiny":
    return c
  c.stages = "nas"
  c.dtype = "bfloat16"
  c.teacher = model_block("bert_base")
  c.student = model_block("bert_base", embedding_size=128)
  c.teacher_checkpoint = ""
  c.data.update(prepared_corpus(max_seq_length=128, max_predictions_per_seq=20,
                                batch_size=1024))
  c.checkpoint.update(dict(save_every_steps=5_000, keep=3))
  c.log_every_steps = 100
  c.nas = nas_stage(
      num_steps=100_000, optimizer=optimizer(learning_rate=5e-4, warmup_steps=5_000),
      num_layers=24, num_blocks=4, hidden_sizes=(128, 192, 256, 384, 512), mha_heads=(2, 4, 8),
      ffn_sizes=(512, 1024, 2048, 3072), conv_kernels=(3, 5, 7), identity=True,
      max_candidates=5_000, prune_every=20_000, prune_fraction=0.5, prune_bins=5, min_keep=20,
      eval_batches=8,
      latency_batch_size=1, latency_seq_length=128, latency_repeats=20,
      param_budgets=(5_000_000, 10_000_000, 30_000_000, 60_000_000), beam_size=256)
  del c["teacher_pretrain"]
  return c
