"""MobileBERT's distillation recipe against the google-research release (mobilebert/):
PKT's per-layer rates, the layer mean of AKT/JKT, the student without dropout, what is copied
from the teacher and frozen."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mobilebert_jax import objectives, pretrained
from mobilebert_jax.distill import strategies
from mobilebert_jax.models import build_model, get_preset
from mobilebert_jax.stages import builtin
from mobilebert_jax.stages.planner import resolve_stage
from mobilebert_jax.stages.runner import copy_teacher_parts
from mobilebert_jax.training import optimizer as opt
from mobilebert_jax.training.context import LossContext

VOCAB = 100


def stage_block(strategy, **keys):
  """The stage block with the registry's defaults, as `plan` resolves it."""
  optimizer = keys.pop("optimizer", dict(learning_rate=1e-3, warmup_steps=0))
  block = ml_collections.ConfigDict(dict(strategy=strategy, num_steps=keys.pop("num_steps", 8),
                                         optimizer=optimizer, **keys))
  return resolve_stage("s", block)[1]


# ---------------------------------------------------------------- PKT's per-layer rates

# The release's rate of encoder layer l at optimizer step n (lamb_optimizer.py, distill_util.py):
# base 1.5e-3 -> here 1e-3, constant (end_lr_rate=1.0, no warm-up); S = num_steps // L = 50;
# p = n // S, t = n % S; b(t) = min(0.9 + 0.1 sqrt(1 - t/S), 10 t/S);
# rate = base * 3 * b(t) * {0 before the phase (p < l), 1 in it (p = l), 0.1 after (p > l)}.
# Worked by hand: b(1) = 0.2, b(3) = 0.6, b(5) = min(1.0, 0.9 + 0.1 sqrt(0.9)) = 0.9948683,
# b(25) = 0.9 + 0.1 sqrt(0.5) = 0.9707107, b(49) = 0.9 + 0.1 sqrt(0.02) = 0.9141421, b(0) = 0.
RELEASE_TABLE = {  # step: (layer_0, layer_1, layer_2)
    0: (0.0, 0.0, 0.0),
    1: (6.0e-4, 0.0, 0.0),                    # 3 x 0.2
    3: (1.8e-3, 0.0, 0.0),                    # 3 x 0.6
    5: (2.9846050e-3, 0.0, 0.0),              # 3 x 0.9948683
    25: (2.9121320e-3, 0.0, 0.0),             # 3 x 0.9707107
    49: (2.7424264e-3, 0.0, 0.0),             # 3 x 0.9141421
    50: (0.0, 0.0, 0.0),                      # t = 0: a new phase starts from rate 0
    51: (6.0e-5, 6.0e-4, 0.0),                # 0.3 x 0.2, 3 x 0.2
    75: (2.9121320e-4, 2.9121320e-3, 0.0),
    100: (0.0, 0.0, 0.0),
    101: (6.0e-5, 6.0e-5, 6.0e-4),
    149: (2.7424264e-4, 2.7424264e-4, 2.7424264e-3),
}


@pytest.mark.parametrize("accum", [1, 2])
def test_pkt_layer_rates_match_the_release(accum):
  """Runs the real optimizer with PKT's multipliers on a constant gradient: AdamW without decay
  or clipping then moves every parameter by exactly -rate (u = g / |g| = 1 each step)."""
  num_layers, updates = 3, 150
  stage = stage_block("pkt", num_steps=updates * accum, optimizer=dict(
      optimizer="adamw", learning_rate=1e-3, warmup_steps=0, schedule="constant",
      weight_decay=0.0, grad_clip_norm=0.0, eps=1e-12, grad_accum_steps=accum))
  assert (stage.current_layer_multiplier, stage.lower_layer_multiplier) == (3.0, 0.3)
  assert stage.copy_from_teacher and not stage.student_dropout
  ctx = types.SimpleNamespace(stage=stage, model=types.SimpleNamespace(
      config=types.SimpleNamespace(num_layers=num_layers)))
  leaf = lambda: {"w": jnp.zeros(2)}
  params = {"model": {"backbone": {"embeddings": leaf(), "pooler": leaf(),
                                   **{f"layer_{i}": leaf() for i in range(num_layers)}},
                      "mlm": leaf(), "nsp": leaf()}, "aux": {}}
  tx, schedule = opt.create_optimizer(
      dict(stage.optimizer.to_dict(), total_steps=stage.num_steps),
      lambda n: strategies.pkt_multipliers(ctx, n, params))
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)

  @jax.jit
  def micro_step(params, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  rates = []  # the update does not depend on the weights: each starts from 0 (float32 exact)
  for _ in range(updates):
    moved = params
    for _ in range(accum):
      moved, state = micro_step(moved, state)
    rates.append(jax.tree.map(lambda a: -float(a[0]), moved))
  for n, expected in RELEASE_TABLE.items():
    got = [rates[n]["model"]["backbone"][f"layer_{i}"]["w"] for i in range(num_layers)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-10, err_msg=f"step {n}")
    frozen = [rates[n]["model"]["backbone"][k]["w"] for k in ("embeddings", "pooler")]
    assert frozen + [rates[n]["model"][k]["w"] for k in ("mlm", "nsp")] == [0.0] * 4, n
  assert float(schedule(0)) == float(schedule(updates - 1)) == pytest.approx(1e-3)


def test_pkt_phase_counts_optimizer_steps_and_the_last_phase_takes_the_rest():
  stage = stage_block("pkt", num_steps=62, optimizer=dict(
      learning_rate=1e-3, warmup_steps=0, schedule="constant", grad_accum_steps=2))
  steps_per_phase = strategies.pkt_steps_per_phase(stage, 3)
  assert steps_per_phase == 10  # 62 micro-steps -> 31 updates -> 10 per layer
  phases = [int(strategies.pkt_phase(n, steps_per_phase, 3)[0]) for n in (0, 9, 10, 29, 30)]
  assert phases == [0, 0, 1, 2, 2]
  assert int(strategies.pkt_phase(30, steps_per_phase, 3)[1]) == 10
  assert float(strategies.phase_warmup(10, steps_per_phase)) == pytest.approx(0.9)
  assert float(strategies.phase_warmup(3, 1)) == 1.0  # one step per phase: no warm-up


def test_pkt_needs_a_constant_base_rate():
  teacher, student = tiny_pair()
  stage = stage_block("pkt", optimizer=dict(learning_rate=1e-3, warmup_steps=0))
  with pytest.raises(ValueError, match=r"config.s.optimizer.schedule='linear'.*schedule=constant"):
    builtin.check_pkt("s", stage, teacher, student)
  stage.optimizer.schedule = "constant"
  builtin.check_pkt("s", stage, teacher, student)


# ---------------------------------------------------------------- losses on a tiny pair


def tiny_pair(dropout=0.1):
  kw = dict(vocab_size=VOCAB, hidden_dropout=dropout, attention_dropout=dropout)
  return (get_preset("ib_bert_large", tiny_variant=True, **kw),
          get_preset("mobilebert", tiny_variant=True, **kw))


def tiny_batch(batch=2, length=16, predictions=3, seed=0):
  r = np.random.RandomState(seed)
  mask = np.ones((batch, length), np.int32)
  mask[1, 11:] = 0
  return {"input_ids": jnp.asarray(r.randint(5, VOCAB, (batch, length)) * mask),
          "attention_mask": jnp.asarray(mask),
          "token_type_ids": jnp.asarray((np.arange(length) >= 8) * mask, jnp.int32),
          "masked_lm_positions": jnp.asarray(r.randint(1, 10, (batch, predictions))),
          "masked_lm_ids": jnp.asarray(r.randint(5, VOCAB, (batch, predictions))),
          "masked_lm_weights": jnp.asarray([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
          "next_sentence_labels": jnp.asarray([0, 1])}


@pytest.fixture(scope="module")
def pair():
  """(teacher model, teacher params, student model, student params), weights moved away from
  their init so every layer's transfer loss is well away from 0."""
  out = []
  for i, config in enumerate(tiny_pair()):
    model = build_model(config, "pretraining")
    params = pretrained.init_params(model, config, jax.random.PRNGKey(i))
    noise = jax.tree.map(lambda x: 0.05 * jax.random.normal(jax.random.PRNGKey(7 + i), x.shape),
                         params)
    out += [model, jax.tree.map(jnp.add, params, noise)]
  return tuple(out)


def context(pair, strategy, **keys):
  teacher_model, _, student_model, _ = pair
  return LossContext(stage=stage_block(strategy, **keys), model=student_model,
                     teacher_model=teacher_model)


def by_hand(pair, batch):
  """Per-layer transfer losses and PD straight from the objectives: ([L] totals, PD)."""
  teacher_model, teacher_params, student_model, student_params = pair
  flags = dict(deterministic=True, output_hidden_states=True, output_attentions=True,
               masked_lm_positions=batch["masked_lm_positions"])
  args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  t = teacher_model.apply({"params": teacher_params}, *args, **flags)
  s = student_model.apply({"params": student_params}, *args, **flags)
  mask = batch["attention_mask"]
  layers = []
  for l in range(1, len(s.hidden_states)):
    fmt, _ = objectives.feature_map_transfer(t.hidden_states[l], s.hidden_states[l], mask,
                                             hidden_factor=100.0, beta_factor=5000.0,
                                             gamma_factor=5.0)
    layers.append(float(fmt) + float(objectives.attention_transfer(
        t.attentions[l - 1], s.attentions[l - 1], mask, factor=1.0)))
  pd, _ = objectives.pretraining_distillation(
      s.prediction_logits, t.prediction_logits, batch["masked_lm_ids"],
      batch["masked_lm_weights"], alpha=0.5, temperature=1.0,
      nsp_logits=s.seq_relationship_logits, nsp_labels=batch["next_sentence_labels"])
  return np.asarray(layers), float(pd)


def test_transfer_losses_are_averaged_over_layers(pair):
  batch = tiny_batch()
  layers, pd = by_hand(pair, batch)
  assert len(layers) == 2 and np.all(layers > 1e-3)
  params, teacher_params = {"model": pair[3], "aux": {}}, pair[1]
  rng = jax.random.PRNGKey(0)
  akt, _ = strategies.akt_loss(context(pair, "akt"), params, teacher_params, batch, rng, 0)
  np.testing.assert_allclose(float(akt), layers.mean() + pd, rtol=1e-5)
  jkt, _ = strategies.jkt_loss(context(pair, "jkt"), params, teacher_params, batch, rng, 0)
  np.testing.assert_allclose(float(jkt), layers.mean(), rtol=1e-5)
  # PKT, num_steps 8 over 2 layers: phase 0 for steps 0-3, phase 1 from step 4; the release
  # gates the other layers' terms to 0 and still divides by the layer count.
  ctx = context(pair, "pkt", optimizer=dict(learning_rate=1e-3, warmup_steps=0,
                                            schedule="constant"))
  for step, layer in ((0, 0), (3, 0), (4, 1)):
    pkt, metrics = strategies.pkt_loss(ctx, params, teacher_params, batch, rng, step)
    np.testing.assert_allclose(float(pkt), layers[layer] / 2, rtol=1e-5)
    assert float(metrics["phase"]) == layer


@pytest.mark.parametrize("strategy", ["akt", "jkt", "pkt", "pd"])
def test_distillation_student_runs_without_dropout(pair, strategy):
  batch, params, teacher_params = tiny_batch(), {"model": pair[3], "aux": {}}, pair[1]
  loss = getattr(strategies, f"{strategy}_loss")
  keys = dict(optimizer=dict(learning_rate=1e-3, warmup_steps=0, schedule="constant"))
  values = [float(loss(context(pair, strategy, **keys), params, teacher_params, batch,
                       jax.random.PRNGKey(seed), 0)[0]) for seed in (0, 1)]
  assert values[0] == values[1]
  dropout = context(pair, strategy, student_dropout=True, **keys)
  values = [float(loss(dropout, params, teacher_params, batch, jax.random.PRNGKey(seed), 0)[0])
            for seed in (0, 1)]
  assert values[0] != values[1]


def test_teacher_pretraining_keeps_dropout(pair):
  model, params = pair[0], {"model": pair[1], "aux": {}}
  ctx = LossContext(stage=stage_block("pretrain"), model=model)
  values = [float(strategies.pretrain_loss(ctx, params, None, tiny_batch(),
                                           jax.random.PRNGKey(seed), 0)[0]) for seed in (0, 1)]
  assert values[0] != values[1]


# ---------------------------------------------------------------- copying and freezing


def test_copy_defaults_follow_the_release():
  assert [stage_block(s).copy_from_teacher for s in ("akt", "jkt", "pkt", "pd", "tinybert")] == [
      False, True, True, False, False]


def test_copy_skips_the_teachers_layernorm_for_a_nonorm_student(pair):
  teacher_params, student_config = pair[1], tiny_pair()[1]
  assert (tiny_pair()[0].normalization, student_config.normalization) == ("layer_norm", "no_norm")
  host = lambda tree: jax.tree.map(np.asarray, tree)
  student = host(pretrained.init_params(build_model(student_config, "pretraining"),
                                        student_config, jax.random.PRNGKey(3)))
  fresh_norm = dict(student["backbone"]["embeddings"]["norm"])
  copied = copy_teacher_parts(student, host(teacher_params), same_norm=False)
  emb = student["backbone"]["embeddings"]
  for name in ("word_embeddings", "position_embeddings", "token_type_embeddings",
               "embedding_transformation"):
    assert any(p.startswith(f"backbone/embeddings/{name}/") for p in copied), name
  assert not any("/norm/" in p and p.startswith("backbone/") for p in copied)
  assert emb["norm"] == fresh_norm  # NoNorm keeps its 1 / 0 init
  assert "mlm/transform_norm/scale" in copied and "nsp/kernel" in copied  # a LayerNorm in both
  np.testing.assert_array_equal(student["mlm"]["transform_norm"]["scale"],
                                teacher_params["mlm"]["transform_norm"]["scale"])
  # The same normalization on both sides (e.g. both layer_norm): the norm is copied.
  student2 = host(pretrained.init_params(build_model(student_config, "pretraining"),
                                         student_config, jax.random.PRNGKey(3)))
  assert "backbone/embeddings/norm/scale" in copy_teacher_parts(student2, host(teacher_params))


def test_copy_from_a_teacher_without_heads_or_backbone(pair):
  config = tiny_pair()[1]
  student = jax.tree.map(np.asarray, pretrained.init_params(build_model(config, "pretraining"),
                                                             config, jax.random.PRNGKey(0)))
  # transformers' BertModel is read as a `base` model: the backbone's own tree, no heads.
  base = jax.tree.map(np.asarray, pair[3]["backbone"])
  copied = copy_teacher_parts(student, base, teacher_head="base", same_norm=False)
  assert copied and all(p.startswith(("backbone/embeddings/", "backbone/pooler/"))
                        for p in copied)
  assert copy_teacher_parts(student, {"encoder": {"w": np.zeros(3)}}) == []
  assert copy_teacher_parts(student, {}, teacher_head="base") == []


def test_jkt_freezes_what_it_copies():
  params = {"model": {"backbone": {"embeddings": 0, "layer_0": 0, "layer_1": 0, "pooler": 0},
                      "mlm": 0, "nsp": 0}, "aux": {}}
  for copy, outside in ((True, 0.0), (False, 1.0)):
    ctx = types.SimpleNamespace(stage=stage_block("jkt", copy_from_teacher=copy))
    tree = strategies.jkt_multipliers(ctx, 0, params)
    assert tree["model"] == {"backbone": {"embeddings": outside, "layer_0": 1.0, "layer_1": 1.0,
                                          "pooler": outside}, "mlm": outside, "nsp": outside}
  ctx = types.SimpleNamespace(stage=stage_block("jkt"))
  stacked = {"model": {"backbone": {"embeddings": 0, "layers": 0}, "mlm": 0}, "aux": {}}
  assert strategies.jkt_multipliers(ctx, 0, stacked)["model"]["backbone"]["layers"] == 1.0


def test_frozen_copies_need_matching_embeddings():
  teacher, student = tiny_pair()
  stage = stage_block("jkt")
  strategies.check_pair("s", stage, teacher, student)
  narrow = student.replace(embedding_size=16)
  with pytest.raises(ValueError, match=r"equal embedding_size .*copy_from_teacher=False"):
    strategies.check_pair("s", stage, teacher, narrow)
  stage.copy_from_teacher = False
  strategies.check_pair("s", stage, teacher, narrow)
