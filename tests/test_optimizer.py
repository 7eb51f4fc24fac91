"""Optimiser: schedule, decay mask, LR multipliers, gradient accumulation, LAMB vs numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mobilebert_jax.training import core
from mobilebert_jax.training import optimizer as opt


def make_cfg(**overrides):
  cfg = ml_collections.ConfigDict({
      "learning_rate": 1e-2, "warmup_steps": 0, "total_steps": 100, "weight_decay": 0.01,
      "grad_clip_norm": 0.0,
  })
  cfg.update(overrides)
  return cfg


def realistic_params(seed=0):
  r = np.random.RandomState(seed)
  a = lambda *shape: jnp.asarray(r.randn(*shape).astype(np.float32))
  return {
      "embeddings": {
          "word_embeddings": {"embedding": a(11, 4)},
          "trigram": {"kernel": a(12, 4), "bias": a(4)},
          "norm": {"scale": a(4), "bias": a(4)},
      },
      "layer_0": {
          "attention": {"query": {"kernel": a(4, 4), "bias": a(4)}},
          "LayerNorm_0": {"scale": a(4), "bias": a(4)},
          "ffn_0": {"NoNorm_0": {"weight": a(4)}, "dense": {"kernel": a(4, 4)}},
      },
      "layer_1": {"attention": {"query": {"kernel": a(4, 4), "bias": a(4)}}},
  }


def random_grads(params, seed):
  r = np.random.RandomState(seed)
  return jax.tree_util.tree_map(lambda p: jnp.asarray(r.randn(*p.shape).astype(np.float32)), params)


def run_steps(tx, params, grads_list):
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  history = []
  for grads in grads_list:
    params, state = step(params, state, grads)
    history.append(params)
  return history


def bits(x):
  return np.asarray(x).view(np.uint32)


# ------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------

def test_learning_rate_schedule_values():
  sched = opt.learning_rate_schedule(1e-3, warmup_steps=10, total_steps=110, end_lr=1e-5)
  expected = {0: 0.0, 5: 5e-4, 10: 1e-3, 60: (1e-3 - 1e-5) * 0.5 + 1e-5, 110: 1e-5, 500: 1e-5}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(sched(step)), lr, rtol=1e-6, atol=1e-12)
  quad = opt.learning_rate_schedule(1.0, warmup_steps=0, total_steps=100, power=2.0)
  np.testing.assert_allclose([float(quad(0)), float(quad(50)), float(quad(100))], [1.0, 0.25, 0.0])
  np.testing.assert_allclose(float(jax.jit(sched)(jnp.int32(10))), 1e-3, rtol=1e-6)
  with pytest.raises(ValueError, match="total_steps must be an int >= warmup_steps \\(10\\)"):
    opt.learning_rate_schedule(1e-3, 10, 5)
  with pytest.raises(ValueError, match="power"):
    opt.learning_rate_schedule(1e-3, 0, 5, power=0.0)


# ------------------------------------------------------------------------------------
# Weight-decay mask and multipliers
# ------------------------------------------------------------------------------------

def test_decay_mask_on_realistic_tree():
  mask = opt.decay_mask(realistic_params())
  assert mask["embeddings"]["word_embeddings"]["embedding"] is True
  assert mask["embeddings"]["trigram"] == {"kernel": True, "bias": False}
  assert mask["embeddings"]["norm"] == {"scale": False, "bias": False}
  assert mask["layer_0"]["attention"]["query"] == {"kernel": True, "bias": False}
  assert mask["layer_0"]["LayerNorm_0"] == {"scale": False, "bias": False}
  assert mask["layer_0"]["ffn_0"] == {"NoNorm_0": {"weight": False}, "dense": {"kernel": True}}
  assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(realistic_params())


def test_decay_mask_and_paths_see_through_flax_boxes():
  params = {"dense": {"kernel": nn.LogicallyPartitioned(jnp.ones((2, 2)), names=("a", "b")),
                      "bias": nn.LogicallyPartitioned(jnp.ones(2), names=("b",))}}
  mask = opt.decay_mask(params)
  assert mask["dense"]["kernel"].value is True and mask["dense"]["bias"].value is False
  mult = opt.path_multipliers(params, [(r"^dense/kernel$", 0.5)])
  assert mult["dense"]["kernel"].value == 0.5 and mult["dense"]["bias"].value == 1.0


def test_path_multipliers_first_match_wins():
  params = realistic_params()
  mult = opt.path_multipliers(params, [(r"^layer_0/attention", 0.0), (r"^layer_0/", 0.1),
                                       (r"bias$", 3.0)], default=1.0)
  assert mult["layer_0"]["attention"]["query"] == {"kernel": 0.0, "bias": 0.0}
  assert mult["layer_0"]["LayerNorm_0"] == {"scale": 0.1, "bias": 0.1}
  assert mult["layer_1"]["attention"]["query"] == {"kernel": 1.0, "bias": 3.0}
  assert mult["embeddings"]["word_embeddings"]["embedding"] == 1.0
  with pytest.raises(ValueError, match="invalid regex '\\('"):
    opt.path_multipliers(params, [("(", 1.0)])
  with pytest.raises(ValueError, match="rule 0 must be a \\(regex, multiplier\\) pair"):
    opt.path_multipliers(params, ["layer_0"])


def test_scale_by_multipliers_prefix_tree_and_step_count():
  updates = {"a": {"x": jnp.ones(3), "y": jnp.ones(2)}, "b": jnp.ones(1)}
  fn = lambda step: {"a": jnp.where(step < 1, 0.0, 0.5), "b": 2.0}  # prefix of the tree
  tx = opt.scale_by_multipliers(fn)
  state = tx.init(updates)
  out, state = tx.update(updates, state)
  np.testing.assert_array_equal(out["a"]["x"], np.zeros(3))
  np.testing.assert_array_equal(out["b"], np.full(1, 2.0))
  out, state = tx.update(updates, state)
  np.testing.assert_array_equal(out["a"]["y"], np.full(2, 0.5))
  assert int(state.count) == 2
  bad = opt.scale_by_multipliers(lambda step: {"c": 1.0})
  with pytest.raises(ValueError, match="prefix"):
    bad.update(updates, bad.init(updates))


def test_zero_multiplier_freezes_params_bit_for_bit():
  params = realistic_params()
  params["layer_0"]["attention"]["query"]["bias"] = jnp.array([-0.0, 0.0, 1.0, -2.0])
  multiplier_fn = lambda step: opt.path_multipliers(params, [(r"^layer_0/", 0.0)])
  tx, _ = opt.create_optimizer(make_cfg(grad_clip_norm=1.0), multiplier_fn)
  history = run_steps(tx, params, [random_grads(params, s) for s in range(4)])
  final = history[-1]
  for a, b in zip(jax.tree_util.tree_leaves(params["layer_0"]),
                  jax.tree_util.tree_leaves(final["layer_0"])):
    np.testing.assert_array_equal(bits(a), bits(b))
  for key in ("embeddings", "layer_1"):
    for a, b in zip(jax.tree_util.tree_leaves(params[key]),
                    jax.tree_util.tree_leaves(final[key])):
      assert not np.allclose(a, b)


def test_multiplier_scales_update_and_depends_on_step():
  params = realistic_params()
  grads = [random_grads(params, s) for s in range(2)]
  q = lambda tree: np.asarray(tree["layer_1"]["attention"]["query"]["kernel"], np.float64)
  emb = lambda tree: tree["embeddings"]["word_embeddings"]["embedding"]
  runs = {}
  for value in (1.0, 0.1):
    fn = lambda step, value=value: opt.path_multipliers(params, [(r"^layer_1/", value)])
    tx, _ = opt.create_optimizer(make_cfg(grad_clip_norm=1.0), fn)
    runs[value] = run_steps(tx, params, grads[:1])[0]
  np.testing.assert_allclose(q(runs[0.1]) - q(params), 0.1 * (q(runs[1.0]) - q(params)),
                             rtol=1e-4, atol=1e-9)
  np.testing.assert_array_equal(emb(runs[0.1]), emb(runs[1.0]))
  # step-dependent multiplier: layer_1 frozen at step 0, updated from step 1
  fn = lambda step: opt.path_multipliers(params, [(r"^layer_1/", jnp.where(step < 1, 0.0, 1.0))])
  tx, _ = opt.create_optimizer(make_cfg(), fn)
  history = run_steps(tx, params, grads)
  np.testing.assert_array_equal(q(history[0]), q(params))
  assert not np.allclose(q(history[1]), q(params))


# ------------------------------------------------------------------------------------
# Accumulation, LAMB and AdamW
# ------------------------------------------------------------------------------------

def test_grad_accumulation_equals_one_step_on_mean_gradient():
  params = realistic_params()
  micro = [random_grads(params, s) for s in range(3)]
  mean = jax.tree_util.tree_map(lambda *g: sum(g) / 3.0, *micro)
  acc_tx, _ = opt.create_optimizer(make_cfg(grad_accum_steps=3, grad_clip_norm=1.0))
  one_tx, _ = opt.create_optimizer(make_cfg(grad_clip_norm=1.0))
  acc = run_steps(acc_tx, params, micro)
  one = run_steps(one_tx, params, [mean])
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(acc[1])):
    np.testing.assert_array_equal(a, b)  # no update before the k-th micro-step
  for a, b in zip(jax.tree_util.tree_leaves(acc[2]), jax.tree_util.tree_leaves(one[0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_schedule_counts_optimizer_steps_under_accumulation():
  """100 micro-steps, 4 per update: 25 updates, 5 of them warming up, decaying to 0 at update 25.
  The rate each update applies (AdamW on a constant gradient moves w by exactly -lr) is the
  logged learning_rate of its micro-step, and by hand lr(n) = 1e-2 * n / 5 for n < 5, else
  1e-2 * (1 - (n - 5) / 20)."""
  cfg = make_cfg(optimizer="adamw", learning_rate=1e-2, warmup_steps=5, total_steps=100,
                 grad_accum_steps=4, weight_decay=0.0, eps=1e-12)
  tx, schedule = opt.create_optimizer(cfg)
  loss = lambda params, context, batch, rng, step: (jnp.sum(params["w"]), {})  # gradient 1
  step = jax.jit(core.make_train_step(loss, tx, schedule, accum=4))
  state = core.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(2)},
                          opt_state=tx.init({"w": jnp.zeros(2)}), rng=jax.random.PRNGKey(0))
  applied, logged = [], []
  for _ in range(100):
    before = float(state.params["w"][0])
    state, metrics = step(state, None, {})
    applied.append(before - float(state.params["w"][0]))
    logged.append(float(metrics["learning_rate"]))
  hand = [1e-2 * n / 5 if n < 5 else 1e-2 * (1 - (n - 5) / 20) for n in range(25)]
  np.testing.assert_allclose(applied[3::4], hand, rtol=1e-4, atol=1e-9)
  assert all(applied[m] == 0.0 for m in range(100) if m % 4 != 3)  # accumulating
  np.testing.assert_allclose(logged[3::4], applied[3::4], rtol=1e-4, atol=1e-9)
  assert applied[4 * 5 + 3] == pytest.approx(1e-2, rel=1e-4)  # warm-up: 5 optimizer steps
  assert applied[-1] == pytest.approx(5e-4, rel=1e-4)  # the last update: 1/20 of the base
  assert float(schedule(25)) == 0.0  # the end rate, where the decay ends
  with pytest.raises(ValueError, match="make 2 optimizer steps .* fewer than warmup_steps=5"):
    opt.create_optimizer(make_cfg(total_steps=8, grad_accum_steps=4, warmup_steps=5))


def test_constant_schedule():
  sched = opt.learning_rate_schedule(1e-3, warmup_steps=4, total_steps=10, decay=False)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 2, 4, 9, 50)],
                             [0.0, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
  _, schedule = opt.create_optimizer(make_cfg(schedule="constant", learning_rate=2e-3))
  assert float(schedule(0)) == float(schedule(99)) == pytest.approx(2e-3)
  with pytest.raises(ValueError, match="schedule must be one of"):
    opt.create_optimizer(make_cfg(schedule="cosine"))


def numpy_lamb(params, grads_list, lr_fn, b1, b2, eps, wd, clip, decay, trust_all=False,
               bias_correction=True):
  """Hand-written LAMB: clip -> Adam moments (bias-corrected, or raw as the MobileBERT
  release's lamb_optimizer.py) -> + wd * p -> trust ratio -> -lr."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(p) for k, p in params.items()}
  for t, grads in enumerate(grads_list, start=1):
    grads = {k: np.asarray(g, np.float64) for k, g in grads.items()}
    norm = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
    if clip > 0 and norm > clip:
      grads = {k: g * clip / norm for k, g in grads.items()}
    for k in params:
      m[k] = b1 * m[k] + (1 - b1) * grads[k]
      v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
      c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if bias_correction else (1.0, 1.0)
      u = (m[k] / c1) / (np.sqrt(v[k] / c2) + eps)
      if decay[k]:
        u = u + wd * params[k]
      if decay[k] or trust_all:
        p_norm, u_norm = np.linalg.norm(params[k]), np.linalg.norm(u)
        u = u * (p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0)
      params[k] = params[k] - lr_fn(t - 1) * u
  return params


@pytest.mark.parametrize("trust_all,bias_correction", [(False, True), (True, True),
                                                       (False, False)])
def test_lamb_matches_numpy(trust_all, bias_correction):
  r = np.random.RandomState(3)
  flat = {"kernel": r.randn(3, 2), "bias": r.randn(2), "scale": 1.0 + r.rand(2)}
  params = {"dense": {"kernel": jnp.asarray(flat["kernel"], jnp.float32),
                      "bias": jnp.asarray(flat["bias"], jnp.float32)},
            "norm": {"scale": jnp.asarray(flat["scale"], jnp.float32)}}
  grads_flat = [{k: r.randn(*np.shape(v)) for k, v in flat.items()} for _ in range(2)]
  grads = [{"dense": {"kernel": jnp.asarray(g["kernel"], jnp.float32),
                      "bias": jnp.asarray(g["bias"], jnp.float32)},
            "norm": {"scale": jnp.asarray(g["scale"], jnp.float32)}} for g in grads_flat]
  cfg = make_cfg(learning_rate=0.05, warmup_steps=1, total_steps=4, grad_clip_norm=0.5,
                 weight_decay=0.1, eps=1e-6, trust_ratio_on_all_params=trust_all,
                 bias_correction=bias_correction)
  tx, schedule = opt.create_optimizer(cfg)
  assert float(schedule(1)) == pytest.approx(0.05)
  got = run_steps(tx, params, grads)
  f32 = lambda d: {k: np.asarray(v, np.float32).astype(np.float64) for k, v in d.items()}
  lr_fn = lambda step: float(schedule(step))  # step 0 has lr 0 (warm-up), step 1 has 0.05
  expected = numpy_lamb(f32(flat), grads_flat, lr_fn, 0.9, 0.999, 1e-6, 0.1, 0.5,
                        {"kernel": True, "bias": False, "scale": False}, trust_all,
                        bias_correction)
  for k, (mod, name) in {"kernel": ("dense", "kernel"), "bias": ("dense", "bias"),
                         "scale": ("norm", "scale")}.items():
    np.testing.assert_allclose(np.asarray(got[-1][mod][name]), expected[k], rtol=1e-5, atol=1e-7)
    assert not np.allclose(np.asarray(got[-1][mod][name]), np.asarray(params[mod][name]))


def test_one_lamb_step_trust_ratio_by_hand():
  p = np.array([[3.0, 4.0]], np.float32)  # ||p|| = 5
  g = np.array([[1.0, -2.0]], np.float32)
  tx, _ = opt.create_optimizer(make_cfg(learning_rate=0.1, weight_decay=0.0))
  new = run_steps(tx, {"w": {"kernel": jnp.asarray(p)}}, [{"w": {"kernel": jnp.asarray(g)}}])[0]
  u = g / (np.abs(g) + 1e-6)  # first Adam step = sign(g)
  expected = p - 0.1 * (5.0 / np.linalg.norm(u)) * u
  np.testing.assert_allclose(np.asarray(new["w"]["kernel"]), expected, rtol=1e-6)


def test_adamw_matches_optax_reference():
  params = realistic_params()
  grads = [random_grads(params, s) for s in range(3)]
  cfg = make_cfg(optimizer="adamw", warmup_steps=2, b2=0.99, eps=1e-8)
  tx, schedule = opt.create_optimizer(cfg)
  ref_tx = optax.adamw(schedule, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01,
                       mask=opt.decay_mask)
  for a, b in zip(jax.tree_util.tree_leaves(run_steps(tx, params, grads)[-1]),
                  jax.tree_util.tree_leaves(run_steps(ref_tx, params, grads)[-1])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def test_create_optimizer_config_errors_and_defaults():
  with pytest.raises(ValueError, match="total_steps"):
    opt.create_optimizer(ml_collections.ConfigDict({"learning_rate": 1e-3}))
  with pytest.raises(ValueError, match="'sgd'"):
    opt.create_optimizer(make_cfg(optimizer="sgd"))
  with pytest.raises(ValueError, match="grad_accum_steps must be an int >= 1, got 0"):
    opt.create_optimizer(make_cfg(grad_accum_steps=0))
  tx, schedule = opt.create_optimizer(ml_collections.ConfigDict({"total_steps": 20_000}))
  assert float(schedule(10_000)) == pytest.approx(1.5e-3)
  assert float(schedule(5_000)) == pytest.approx(0.75e-3)
  assert isinstance(tx, optax.GradientTransformation)


def test_trust_ratio_matches_optax_and_is_per_layer_for_stacked_layers():
  rng = np.random.default_rng(0)
  layer = lambda: {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                   "norm": {"scale": jnp.asarray(rng.normal(size=3), jnp.float32)}}
  params = {"backbone": {"layer_0": layer(), "layer_1": layer()}}
  updates = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
  ours = opt.scale_by_trust_ratio_per_layer()
  expected, _ = optax.scale_by_trust_ratio().update(updates, optax.EmptyState(), params)
  got, _ = ours.update(updates, ours.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, expected)
  # Layers stacked for nn.scan get one ratio per layer: the same update, stacked.
  stack = lambda t: {"backbone": {"layers": jax.tree.map(
      lambda *x: jnp.stack(x), t["backbone"]["layer_0"], t["backbone"]["layer_1"])}}
  stacked, _ = ours.update(stack(updates), ours.init(stack(params)), stack(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stacked, stack(got))
