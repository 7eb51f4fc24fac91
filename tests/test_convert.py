"""Hugging Face <-> native conversion: exact round trips, the CLI, and clear errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from hf_helpers import batch, perturbed_model
from mobilebert_jax import convert, get_preset, load_pretrained, save_pretrained
from mobilebert_jax.interop import hf
from mobilebert_jax.models import build_model, tiny
from mobilebert_jax.pretrained import init_params


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "mobilebert_jax.convert", *args],
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("model_type,cls", [("mobilebert", "MobileBertForPreTraining"),
                                            ("bert", "BertForPreTraining")])
def test_cli_round_trip_gives_identical_transformers_logits(model_type, cls, tmp_path):
  src, native, out = tmp_path / "src", tmp_path / "native", tmp_path / "out"
  torch_model = perturbed_model(model_type, "pretraining", seed=5)
  torch_model.save_pretrained(src)
  (src / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
  result = _cli("import-hf", str(src), str(native))
  assert result.returncode == 0, result.stderr
  result = _cli("export-hf", str(native), str(out))
  assert result.returncode == 0, result.stderr
  assert result.stderr == "", result.stderr  # no library INFO logs or backend probing
  assert (out / "vocab.txt").read_text() == (src / "vocab.txt").read_text()

  original, exported = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
  for name, value in exported.items():
    if name in original:
      np.testing.assert_array_equal(value, original[name], err_msg=name)

  reloaded = getattr(transformers, cls).from_pretrained(out, attn_implementation="eager").eval()
  ids, mask, types = (torch.tensor(a) for a in batch(torch_model.config.vocab_size, seed=5))
  with torch.no_grad():
    a = torch_model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    b = reloaded(input_ids=ids, attention_mask=mask, token_type_ids=types)
  assert torch.equal(a.prediction_logits, b.prediction_logits)
  assert torch.equal(a.seq_relationship_logits, b.seq_relationship_logits)


@pytest.mark.parametrize("head,cls", [("classification", "MobileBertForSequenceClassification"),
                                      ("question_answering", "MobileBertForQuestionAnswering"),
                                      ("token_classification", "MobileBertForTokenClassification")])
def test_export_native_heads_to_transformers(head, cls, tmp_path):
  config = tiny(get_preset("mobilebert"), vocab_size=64).replace(num_labels=3)
  import jax
  params = init_params(build_model(config, head), config, jax.random.PRNGKey(0))
  params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * np.random.RandomState(0).randn(*x.shape)
                        .astype(np.float32), params)
  save_pretrained(tmp_path / "native", config, params, head)
  convert.export_hf(str(tmp_path / "native"), str(tmp_path / "hf"))
  torch_model = getattr(transformers, cls).from_pretrained(tmp_path / "hf").eval()
  model, loaded = load_pretrained(str(tmp_path / "native"))
  ids, mask, types = batch(64, seed=6)
  with torch.no_grad():
    expected = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           token_type_ids=torch.tensor(types))
  got = model.apply({"params": loaded}, ids, mask, types)
  if head in ("classification", "token_classification"):
    np.testing.assert_allclose(np.asarray(got.logits), expected.logits.numpy(), atol=1e-5)
  else:
    np.testing.assert_allclose(np.asarray(got.start_logits), expected.start_logits.numpy(),
                               atol=1e-5)


def test_load_with_another_head_keeps_backbone(tmp_path):
  perturbed_model("mobilebert", "pretraining", seed=7).save_pretrained(tmp_path)
  _, pre = load_pretrained(str(tmp_path))
  model, cls = load_pretrained(str(tmp_path), head="classification", num_labels=5)
  np.testing.assert_array_equal(
      np.asarray(cls["backbone"]["layer_1"]["ffn"]["output"]["kernel"]),
      np.asarray(pre["backbone"]["layer_1"]["ffn"]["output"]["kernel"]))
  out = model.apply({"params": cls}, np.ones((2, 6), np.int32))
  assert out.logits.shape == (2, 5)


def test_error_directory_without_config(tmp_path):
  with pytest.raises(hf.ConversionError, match="no model config"):
    load_pretrained(str(tmp_path))
  result = _cli("import-hf", str(tmp_path), str(tmp_path / "x"))
  assert result.returncode == 2 and "config.json" in result.stderr


def test_error_unknown_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
  with pytest.raises(hf.ConversionError, match="unsupported model_type 'roberta'"):
    load_pretrained(str(tmp_path))


def test_error_shape_mismatch_names_tensor_and_shapes(tmp_path):
  torch_model = perturbed_model("mobilebert", "pretraining")
  torch_model.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["intermediate_size"] = 28
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf.ConversionError,
                     match=r"mobilebert\.encoder\.layer\.0\.ffn\.0\.intermediate\.dense\.weight "
                           r"has shape \(24, 16\), the model expects \(28, 16\)"):
    load_pretrained(str(tmp_path))


def test_error_missing_tensors_listed(tmp_path):
  torch_model = perturbed_model("bert", "base")
  state = {k: v for k, v in torch_model.state_dict().items()
           if not k.startswith("encoder.layer.1.attention.self")}
  torch_model.config.save_pretrained(tmp_path)
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
  with pytest.raises(hf.ConversionError, match="6 tensors missing") as err:
    load_pretrained(str(tmp_path))
  assert "encoder.layer.1.attention.self.query.weight" in str(err.value)


def test_error_exporting_original_ib_bert_attention(tmp_path):
  config = tiny(get_preset("ib_bert_large"), vocab_size=64)
  import jax
  params = init_params(build_model(config, "pretraining"), config, jax.random.PRNGKey(0))
  save_pretrained(tmp_path / "native", config, params, "pretraining")
  with pytest.raises(hf.ConversionError, match="original IB-BERT attention"):
    convert.export_hf(str(tmp_path / "native"), str(tmp_path / "hf"))
  result = _cli("export-hf", str(tmp_path / "native"), str(tmp_path / "hf2"))
  assert result.returncode == 2 and "IB-BERT" in result.stderr


def _hf_dir(path, seed=3):
  perturbed_model("mobilebert", "pretraining", seed=seed).save_pretrained(path)
  (path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
  return path


def _snapshot(root):
  return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_refuses_a_non_empty_destination_unless_overwrite(tmp_path):
  src, dst = _hf_dir(tmp_path / "src"), tmp_path / "dst"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  (dst / "vocab.txt").write_text("old")
  before = _snapshot(dst)
  result = _cli("import-hf", str(src), str(dst))
  assert result.returncode == 2 and not result.stdout
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and str(dst) in lines[0] and "--overwrite" in lines[0], result.stderr
  assert _snapshot(dst) == before  # nothing written

  result = _cli("import-hf", str(src), str(dst), "--overwrite")
  assert result.returncode == 0, result.stderr
  assert (dst / "keep.txt").read_text() == "mine"  # other files are left alone
  assert (dst / "vocab.txt").read_text() == (src / "vocab.txt").read_text()
  _, params = load_pretrained(str(dst))
  assert "backbone" in params

  (tmp_path / "empty").mkdir()  # an existing but empty directory needs no flag
  assert convert.export_hf(str(dst), str(tmp_path / "empty")) == "pretraining"
  with pytest.raises(hf.ConversionError, match="not empty; pass --overwrite"):
    convert.export_hf(str(dst), str(tmp_path / "empty"))
  with pytest.raises(hf.ConversionError, match="is the source"):
    convert.export_hf(str(dst), str(dst), overwrite=True)


# An NVIDIA GPU seen by a CPU-only jaxlib: JAX would warn "Falling back to cpu" when probing.
_FAKE_GPU_RUN = """
import sys
import jax._src.hardware_utils as hardware_utils
hardware_utils.has_visible_nvidia_gpu = lambda: True
from mobilebert_jax import convert
sys.argv[0] = "mobilebert-jax-convert"
sys.exit(convert.run())
"""


def test_cli_stderr_has_no_backend_probe_noise(tmp_path):
  src = _hf_dir(tmp_path / "src")
  result = subprocess.run([sys.executable, "-c", _FAKE_GPU_RUN, "import-hf", str(src),
                           str(tmp_path / "native")], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  for noise in ("Falling back to cpu", "Unable to initialize backend", "orbax"):
    assert noise not in result.stderr, result.stderr
  assert result.stderr == "", result.stderr
  assert result.stdout.startswith("import-hf: wrote")
