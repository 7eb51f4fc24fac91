"""Every config key with its default (`base_config`), and the embedded default run
(configs/demo.py, `get_config`): tiny teacher -> tiny MobileBERT on shipped data.

Every config file builds on `get_config()` (or `base_config()`), so every key any stage reads
exists, with its default, in every config, and `--config.<key>=...` works everywhere. Stage
blocks take their keys and defaults from the stage registry (`mobilebert_jax.stages`), which
`plan` fills in. A tiny IB-BERT-style teacher (inverted bottleneck, q/k/v from the layer input) is pretrained with
MLM + NSP on the shipped `sample_text` corpus, then distilled into a tiny MobileBERT with
progressive knowledge transfer (one phase per layer) followed by pretraining distillation.
A few minutes on a 2-core CPU.
"""

import dataclasses
import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from mobilebert_jax.data.pipeline import DataConfig
from mobilebert_jax.models.config import ModelConfig
from mobilebert_jax.training import optimizer as optim

# The Python type of every ModelConfig field, for the placeholders of `model_block`.
_FIELD_TYPES = {"intra_size": int, "classifier_dropout": float, "layer_ops": tuple}


def optimizer(learning_rate: float, warmup_steps: int, **values) -> ml_collections.ConfigDict:
  """A stage's `optimizer` block: every key of `training.optimizer.DEFAULTS` with its default,
  then the values given."""
  unknown = sorted(set(values) - set(optim.DEFAULTS))
  if unknown:
    raise ValueError(f"optimizer: unknown keys {unknown}; valid keys: {sorted(optim.DEFAULTS)}")
  return ml_collections.ConfigDict(dict(optim.DEFAULTS, learning_rate=learning_rate,
                                        warmup_steps=warmup_steps, **values))


def transfer_factors(**extra) -> dict:
  """MobileBERT's reference layer-wise transfer weights (Sun et al., 2020)."""
  return dict(hidden_factor=100.0, beta_factor=5000.0, gamma_factor=5.0, attention_factor=1.0,
              **extra)


def data_config(**values) -> ml_collections.ConfigDict:
  """`config.data`: every pretraining data key (`mobilebert_jax.data.DataConfig`) with its
  default, then `values`."""
  return ml_collections.ConfigDict(dataclasses.asdict(DataConfig(**values)))


def prepared_corpus(**values) -> dict:
  """`config.data` values of the full-size configs: a corpus prepared once
  (`--config.data.prepared_dir=DIR` from `python -m mobilebert_jax.data.prepare`, required)
  and read by grain worker processes."""
  return dict(prepared_dir="", require_prepared=True, input_files="", tfds_name="",
              num_workers=4, **values)


def sibling_config(config_file: str, name: str) -> ml_collections.ConfigDict:
  """`get_config()` of the config file `name`.py in the directory of `config_file` (a config
  built on another: pass `__file__`)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def model_block(preset: str = "", **values) -> ml_collections.ConfigDict:
  """`config.teacher` / `config.student`: a preset name, `tiny`, and every ModelConfig field;
  fields not given are typed placeholders (None = the preset's value), so any of them can be
  overridden from the command line (`--config.teacher.hidden_size=384`)."""
  block = {"preset": preset, "tiny": bool(values.pop("tiny", False))}
  for field in dataclasses.fields(ModelConfig):
    if field.name in values:
      block[field.name] = values.pop(field.name)
    else:
      kind = _FIELD_TYPES.get(field.name, type(field.default))
      block[field.name] = config_dict.placeholder(kind)
  if values:
    raise ValueError(f"model_block: unknown model config keys {sorted(values)}")
  return ml_collections.ConfigDict(block)


def base_config() -> ml_collections.ConfigDict:
  """Every global key with its default; a config file sets `stages`, the stage blocks and what
  it changes."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = "float32"
  c.stages = ""
  c.teacher = model_block()
  c.student = model_block()
  # Checkpoints to start from: the teacher (native or Hugging Face), the student, the model a
  # downstream stage fine-tunes. check_teacher_config: the teacher checkpoint must match
  # config.teacher's sizes (False: take the checkpoint's architecture).
  c.teacher_checkpoint = ""
  c.student_checkpoint = ""
  c.init_checkpoint = ""
  c.check_teacher_config = True
  # Rerunning a workdir with a changed config is refused unless this is True.
  c.allow_config_change = False
  # Downstream data: the GLUE task and its TSV directory (empty: tensorflow-datasets).
  c.task = ""
  c.data_dir = ""
  c.data = data_config()
  c.squad_data = ml_collections.ConfigDict(dict(
      train_file="", dev_file="", version_2=False, doc_stride=128, max_query_length=64,
      n_best=20, max_answer_length=30, null_threshold=0.0))
  # Sequence tagging (CoNLL format: token ... tag per line, blank line between sentences):
  # the tag is column `tag_column` (-1: last); scheme "bio" scores span F1 (NER, chunking),
  # "accuracy" per-word accuracy (POS); unlabeled_file (one sentence per line) feeds CVT.
  c.tagging_data = ml_collections.ConfigDict(dict(
      train_file="", dev_file="", unlabeled_file="", tag_column=-1, scheme="bio"))
  # TinyBERT data augmentation for task distillation (mlm_checkpoint: a pretrained model with
  # an MLM head; n_aug 0 = the release's per-task N_a, downstream.tasks.TINYBERT_AUGMENTATION_N).
  c.augmentation = ml_collections.ConfigDict(dict(enabled=False, mlm_checkpoint="", p_t=0.4,
                                                  n_aug=0, k=15, cache=""))
  # Evaluations after a GLUE stage: the TextFooler attack (Jin et al., 2020), post-training
  # int8. Attack defaults are the release's (jind11/TextFooler): 1000 examples, 50 synonyms
  # with cosine >= 0.5 (-1: no threshold), no budget of changed words (max_fraction 1.0), the
  # hypothesis of a pair (fields "auto"), similarity >= 0.7 over 15 words (0.1 for shorter
  # texts), angular ("angular" | "cosine"). word_vectors: a "word v1 v2 ..." file
  # (counter-fitted vectors; empty: the model's token embeddings); sentence_encoder: a local
  # BERT-family checkpoint dir (empty: no similarity check); pos_tagger: "module:function"
  # returning universal tags (empty: no POS check).
  c.robustness = ml_collections.ConfigDict(dict(
      enabled=False, max_examples=1000, k=50, min_similarity=0.5, max_fraction=1.0,
      fields="auto", importance="delete", word_vectors="", sentence_encoder="",
      sentence_threshold=0.7, sentence_window=15, sentence_threshold_short=0.1,
      sentence_metric="angular", pos_tagger=""))
  c.quantization = ml_collections.ConfigDict(dict(
      ptq_eval=False, weight_bits=8, act_bits=8, embedding_bits=8, calibration="max",
      calibration_batches=8))
  # The device mesh (mobilebert_jax.parallel.sharding.create_mesh): dcn_data = data parallelism
  # across TPU slices over the data-centre network (a divisor of the slice count); data, fsdp and
  # tensor within a slice, one of them -1 for the rest of its devices.
  c.mesh = ml_collections.ConfigDict(dict(dcn_data=1, data=-1, fsdp=1, tensor=1))
  c.logical_rules = ()  # empty: mobilebert_jax.parallel.sharding.LOGICAL_RULES
  c.checkpoint = ml_collections.ConfigDict(dict(save_every_steps=100, keep=2, async_save=True))
  # JAX's persistent compilation cache: empty = <workdir>/compilation_cache, "none" = off; a
  # restarted run loads its compiled steps from it instead of compiling them again.
  c.compilation_cache_dir = ""
  c.log_every_steps = 50
  # Peak dense TFLOP/s of one device, for the model FLOPs utilisation in every log line; 0 =
  # looked up by device kind (mobilebert_jax.training.goodput.PEAK_TFLOPS; none on CPU).
  c.peak_tflops = 0.0
  # A jax.profiler trace of some steps into <workdir>/<stage>/plugins/profile/ (TensorBoard's
  # profile plugin): "START:STOP" = steps [START, STOP) of every trained stage,
  # "STAGE:START:STOP" of one stage; "" = off.
  c.profile = ""
  return c


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.stages = "teacher_pretrain,pkt,pd"
  vocab = 2972  # the shipped demo vocab (mobilebert_jax/data/assets/vocab.txt)
  c.teacher = model_block(
      "ib_bert_large", vocab_size=vocab, embedding_size=32, hidden_size=64, intra_size=128,
      num_layers=2, num_heads=4, intermediate_size=256, max_position_embeddings=128,
      hidden_dropout=0.0, attention_dropout=0.0)
  c.student = model_block(
      "mobilebert", vocab_size=vocab, embedding_size=32, hidden_size=64, intra_size=16,
      num_layers=2, num_heads=4, intermediate_size=64, num_ffn=4, max_position_embeddings=128,
      attention_dropout=0.0)
  # The shipped corpus (data.input_files empty), prepared once into workdir/prepared_data/.
  c.data = data_config(max_seq_length=64, max_predictions_per_seq=10, dupe_factor=5,
                       batch_size=32)
  c.log_every_steps = 20

  c.teacher_pretrain = ml_collections.ConfigDict(dict(
      strategy="pretrain", model="teacher", num_steps=400,
      optimizer=optimizer(learning_rate=1e-2, warmup_steps=40)))
  # The release's layer-wise schedule (configs/mobilebert_distill.py): a constant base rate,
  # 3 x a per-phase warm-up on the layer in its phase, 3 x 0.1 x it on the layers below.
  c.pkt = ml_collections.ConfigDict(dict(
      strategy="pkt", model="student", num_steps=200, copy_from_teacher=True,
      lower_layer_multiplier=0.3, current_layer_multiplier=3.0,
      optimizer=dict(optimizer(learning_rate=3e-3, warmup_steps=0), schedule="constant"),
      **transfer_factors()))
  c.pd = ml_collections.ConfigDict(dict(
      strategy="pd", model="student", num_steps=300, alpha=0.5, temperature=1.0,
      optimizer=optimizer(learning_rate=5e-3, warmup_steps=30)))
  return c
