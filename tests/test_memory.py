"""Memory at pod scale: bfloat16 attention probabilities, student remat in a distillation
stage, and the memory / accelerator benchmarks on tiny configs."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from mobilebert_jax import default_config
from mobilebert_jax.models import ModelConfig, build_model, get_preset, layers
from mobilebert_jax.pretrained import init_params
from mobilebert_jax.stages import PlanError, model_config, plan


def original_attention(q, k, v, mask, dtype):
  """The attention before `attention_probs_dtype` existed (deterministic): the reference the
  float32 default must reproduce bit for bit."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), dtype)
  scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v), probs, scores


class AttentionOnly(nn.Module):
  """`layers.dot_product_attention` in a module (its dropout is a submodule)."""
  dtype: jnp.dtype
  probs_dtype: str

  @nn.compact
  def __call__(self, q, k, v, mask):
    return layers.dot_product_attention(q, k, v, mask, dropout_rate=0.1, deterministic=True,
                                        dtype=self.dtype, probs_dtype=self.probs_dtype)


def qkv_and_mask(dtype):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (3 * jax.random.normal(key, (2, 7, 4, 8)).astype(dtype) for key in keys)
  mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3], bool)
  return q, k, v, mask


def test_attention_probs_dtype_is_validated():
  with pytest.raises(ValueError, match=r"attention_probs_dtype='float16' is not one of"):
    ModelConfig(attention_probs_dtype="float16")
  assert ModelConfig().attention_probs_dtype == "float32"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_float32_probs_are_the_original_attention_bit_for_bit(dtype):
  q, k, v, mask = qkv_and_mask(dtype)
  module = AttentionOnly(dtype, "float32")
  new = lambda q, k, v: module.apply({}, q, k, v, mask)
  old = lambda q, k, v: original_attention(q, k, v, mask, dtype)
  for got, want in zip(new(q, k, v), old(q, k, v)):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  total = lambda f: lambda *x: sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in f(*x)[:2])
  grads_new = jax.grad(total(new), argnums=(0, 1, 2))(q, k, v)
  grads_old = jax.grad(total(old), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grads_new, grads_old):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def tiny_model(name, **changes):
  config = get_preset(name, tiny_variant=True, vocab_size=64, **changes)
  return build_model(config, "pretraining"), config


def forward_and_grads(model, params):
  ids = jax.random.randint(jax.random.PRNGKey(3), (2, 12), 1, 64)
  mask = jnp.ones_like(ids).at[1, 9:].set(0)

  def loss(params):
    out = model.apply({"params": params}, ids, mask, output_attentions=True,
                      output_hidden_states=True)
    return jnp.mean(out.prediction_logits.astype(jnp.float32) ** 2), out
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("name", ["mobilebert", "bert_base"])
def test_bfloat16_probs_stay_close_to_float32(name):
  model32, config = tiny_model(name)
  params = init_params(model32, config, jax.random.PRNGKey(0))
  model16, _ = tiny_model(name, attention_probs_dtype="bfloat16")
  (loss32, out32), grads32 = forward_and_grads(model32, params)
  (loss16, out16), grads16 = forward_and_grads(model16, params)
  assert out16.attentions[0].dtype == jnp.bfloat16 and out32.attentions[0].dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss32, rtol=1e-2)
  for got, want in zip(out16.attentions + out16.hidden_states,
                       out32.attentions + out32.hidden_states):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=1e-2, rtol=1e-2)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads32))
  for got, want in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32)):
    np.testing.assert_allclose(got, want, atol=1e-2 * scale)


def test_bfloat16_probs_leave_the_bfloat16_forward_unchanged():
  model, config = tiny_model("mobilebert")
  params = init_params(model, config, jax.random.PRNGKey(0))
  ids = jax.random.randint(jax.random.PRNGKey(3), (2, 12), 1, 64)
  outputs = []
  for probs in ("float32", "bfloat16"):
    bf16 = build_model(config.replace(attention_probs_dtype=probs), "pretraining",
                       dtype=jnp.bfloat16)
    outputs.append(jax.jit(lambda p, ids, model=bf16: model.apply(
        {"params": p}, ids, output_attentions=True))(params, ids))
  for got, want in zip(jax.tree.leaves(outputs[1]), jax.tree.leaves(outputs[0])):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_attention_probs_dtype_flows_from_a_config_block():
  block = default_config.model_block("mobilebert", tiny=True)
  assert model_config(block, "config.student").attention_probs_dtype == "float32"
  block.attention_probs_dtype = "bfloat16"  # as --config.student.attention_probs_dtype=bfloat16
  assert model_config(block, "config.student").attention_probs_dtype == "bfloat16"
  block.attention_probs_dtype = "half"
  with pytest.raises(PlanError, match=r"config\.student: .*attention_probs_dtype='half'"):
    model_config(block, "config.student")


@pytest.fixture
def tiny_benchmark_flags():
  """The benchmarks' absl flags parsed for tiny bfloat16 runs (restored afterwards)."""
  from benchmarks import accelerator, memory  # noqa: F401  (defines their flags)
  flags.FLAGS(["test", "--tiny", "--dtype=bfloat16", "--steps=1", "--predictions=4"])
  yield
  flags.FLAGS.unparse_flags()


def test_student_remat_and_bf16_probs_in_a_distillation_stage(tiny_benchmark_flags, tmp_path):
  """PKT with the student rematerialised: the config reaches the student, the lowered step
  has remat's barriers, and a real step gives the plain step's loss."""
  from benchmarks import memory, train_step
  devices = jax.devices()[:1]
  lowered = {}
  for variant in ("plain", "remat+bf16_probs"):
    config = memory.variant_config("pkt", 8, 32, variant)
    config.teacher_checkpoint = memory.teacher_checkpoint(config, str(tmp_path))
    trainer, built = memory.build_stage(config, str(tmp_path / variant))
    lowered[variant] = memory.lower_step(trainer, built, devices, 8, 32)
    student = trainer.roles["student"].config
    assert (student.remat, student.attention_probs_dtype) == (
        variant != "plain", "bfloat16" if variant != "plain" else "float32")
  assert "optimization_barrier" in lowered["remat+bf16_probs"].as_text()
  assert "optimization_barrier" not in lowered["plain"].as_text()

  losses = {}
  for remat in ("none", memory.REMAT_POLICY):
    losses[remat] = train_step.run_case("pkt", str(tmp_path / remat), 8, 32, remat)["loss"]
  assert math.isfinite(losses["none"])
  np.testing.assert_allclose(losses[memory.REMAT_POLICY], losses["none"], rtol=1e-3)


def test_accelerator_verdicts_flag_a_non_finite_loss_and_a_step_that_does_not_fit():
  from benchmarks import accelerator
  result = {"case": "pd", "strategy": "pd", "batch_per_device": 16, "seq_len": 512,
            "step_ms": 100.0, "tokens_per_sec": 81920.0, "mfu": 0.4, "loss": 2.5,
            "memory_bytes": {"argument": 3 * 2**30, "temp": 5 * 2**30, "output": 0}}
  ok = accelerator.check(result, memory_limit=80 * 2**30)
  assert ok["finite_loss"] and ok["fits"] and ok["meets_goal"] and ok["goal_mfu"] == 0.35
  bad = accelerator.check(dict(result, loss=float("nan"), mfu=0.2), memory_limit=7 * 2**30)
  assert not bad["finite_loss"] and not bad["fits"] and not bad["meets_goal"]
  assert accelerator.check(result, memory_limit=None)["fits"] is None
  line = accelerator.summary_line(dict(result, **bad))
  assert "NOT FINITE" in line and "DOES NOT FIT" in line and "NOT met" in line


def test_execution_settings_come_from_the_config_when_weights_come_from_a_checkpoint(tmp_path):
  """remat, scan_layers and attention_probs_dtype of config.teacher / config.student apply to
  a teacher or student read from a checkpoint (which records the writing run's choice)."""
  from mobilebert_jax.stages import Trainer
  from tiny_checkpoints import native_checkpoint
  c = default_config.get_config()
  teacher = model_config(c.teacher, "config.teacher")
  c.teacher_checkpoint = native_checkpoint(tmp_path / "teacher", teacher, "pretraining")
  c.teacher.update(dict(remat=True, attention_probs_dtype="bfloat16"))
  c.stages = "pd"
  planned = plan(c).model_configs["teacher"]
  assert (planned.remat, planned.attention_probs_dtype) == (True, "bfloat16")
  assert planned.hidden_size == teacher.hidden_size
  role = Trainer(c, str(tmp_path / "run")).roles["teacher"].config
  assert (role.remat, role.attention_probs_dtype) == (True, "bfloat16")
