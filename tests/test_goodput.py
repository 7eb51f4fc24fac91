"""Goodput pieces: device peaks, the analytic model FLOPs against XLA's count, the wall-time
split. (MFU and the time split in a real run's metrics.jsonl: tests/test_trainer.py.)"""

import time
import types

import jax
import jax.numpy as jnp
import pytest

from mobilebert_jax.models import ModelConfig, build_model
from mobilebert_jax.pretrained import init_params
from mobilebert_jax.training import goodput


@pytest.mark.parametrize("kind, peak", [("TPU v4", 275.0), ("TPU v5 lite", 197.0),
                                        ("TPU v5p", 459.0), ("TPU v6 lite", 918.0),
                                        ("NVIDIA H100 80GB HBM3", 989.0), ("cpu", None)])
def test_peak_by_device_kind_and_override(kind, peak):
  device = types.SimpleNamespace(device_kind=kind)
  assert goodput.peak_tflops(device) == peak
  assert goodput.peak_tflops(device, override=12.5) == 12.5


def test_analytic_forward_flops_match_xla_for_a_dense_model():
  """For a BERT whose matmuls dominate, the analytic count (2 x non-embedding params per
  token + attention products) is within 10% of XLA's count of the compiled forward pass (which
  adds softmax, norms and activations, and leaves out the embedding lookups)."""
  config = ModelConfig(vocab_size=64, embedding_size=256, hidden_size=256, intra_size=256,
                       num_layers=2, num_heads=4, intermediate_size=1024, num_ffn=1,
                       normalization="layer_norm", hidden_act="gelu", trigram_input=False,
                       use_bottleneck=False, attention_input="layer_input", model_type="bert",
                       max_position_embeddings=128, hidden_dropout=0.0, attention_dropout=0.0)
  model = build_model(config, "base")
  params = init_params(model, config, jax.random.PRNGKey(0))
  ids = jnp.ones((4, 128), jnp.int32)
  cost = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, ids).compile()
  analysis = cost.cost_analysis()
  xla = (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]
  analytic = goodput.forward_flops(config, params, tokens=4 * 128, length=128)
  assert analytic == pytest.approx(xla, rel=0.10)
  # Training: 3 forward passes of the student and one of a frozen teacher.
  step = goodput.train_step_flops((config, params), (config, params), batch=4, length=128)
  assert step == pytest.approx(4 * analytic)


def test_wall_clock_splits_time_into_activities():
  clock = goodput.WallClock()
  with clock.measure("data"):
    time.sleep(0.05)
  time.sleep(0.05)
  shares = clock.fractions()
  assert set(shares) == {f"time_{a}_frac" for a in goodput.ACTIVITIES}
  assert sum(shares.values()) == pytest.approx(1.0)
  assert 0.3 < shares["time_data_frac"] < 0.7 and shares["time_checkpoint_frac"] == 0
  assert clock.fractions()["time_data_frac"] == 0  # a new interval
  with pytest.raises(ValueError, match="unknown activity 'step'"):
    with clock.measure("step"):
      pass


def test_utilisation_needs_flops_and_peak():
  out = goodput.utilisation(2.0, flops_per_step=4e12, peak=100.0, tokens_per_sec=800.0,
                            num_devices=4)
  assert out == {"tokens_per_sec_per_device": 200.0, "model_tflops_per_device": 2.0,
                 "mfu": 0.02}
  assert set(goodput.utilisation(2.0, flops_per_step=4e12, peak=None, tokens_per_sec=8.0,
                                 num_devices=1)) == {"tokens_per_sec_per_device",
                                                     "model_tflops_per_device"}
