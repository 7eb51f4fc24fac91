"""NAS-BERT search: weight slicing == standalone models, pruning, costs, latency table, search,
and the tiny end-to-end run through the trainer (architectures, loading, resume, distillation)."""

import importlib.util
import itertools
import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilebert_jax import load_pretrained, pretrained
from mobilebert_jax.models import Backbone, ModelConfig, build_model
from mobilebert_jax.search import costs, nas, selection, supernet
from mobilebert_jax.search.supernet import SearchSpace
from mobilebert_jax.stages import Trainer

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "nas_bert.py"
BASE = ModelConfig(vocab_size=97, embedding_size=8, hidden_size=24, intra_size=24, num_layers=4,
                   num_heads=2, intermediate_size=32, num_ffn=1, normalization="layer_norm",
                   hidden_act="gelu", trigram_input=False, use_bottleneck=False,
                   attention_input="layer_input", model_type="bert", max_position_embeddings=32,
                   hidden_dropout=0.0, attention_dropout=0.0)


def nas_config(variant="tiny"):
  spec = importlib.util.spec_from_file_location("nas_bert_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def space(**changes):
  values = dict(base=BASE, hidden_sizes=(8, 16, 24), mha_heads=(2, 4), ffn_sizes=(16, 32),
                conv_kernels=(3, 5), identity=True, num_layers=4, num_blocks=2)
  values.update(changes)
  return SearchSpace(**values)


def batch(rng, size=3, length=12, vocab=97):
  ids = rng.integers(1, vocab, (size, length))
  mask = np.ones((size, length), np.int32)
  mask[0, 9:] = 0  # padding must not change real tokens' outputs
  ids[0, 9:] = 0
  return {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask),
          "token_type_ids": jnp.asarray(rng.integers(0, 2, (size, length)), jnp.int32)}


@pytest.fixture(scope="module")
def trained_like_supernet():
  """Supernet parameters with every leaf perturbed (norms and biases not at their init)."""
  sp = space()
  params = nn.meta.unbox(supernet.init_supernet(sp, teacher_hidden=20, rng=jax.random.PRNGKey(0)))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return sp, jax.tree.unflatten(tree, leaves)


# ----------------------------------------------------------------------------- slicing


@pytest.mark.parametrize("hidden,ops", [
    (24, ("mha4", "ffn32", "conv5", "identity")),
    (16, ("conv3", "mha2", "identity", "ffn16")),
    (8, ("ffn16", "ffn32", "mha4", "conv5")),
])
def test_supernet_path_equals_the_extracted_standalone_model(trained_like_supernet, hidden, ops):
  sp, params = trained_like_supernet
  data = batch(np.random.default_rng(0))
  mask = data["attention_mask"].astype(bool)
  # The supernet's path: its embeddings, then every layer's op, on sliced shared weights.
  x = supernet.embed(sp, params, hidden, data)
  for layer, op in enumerate(ops):
    x = supernet.apply_op(sp, params, layer, hidden, op, x, mask)
  config, backbone = supernet.extract(sp, params, hidden, ops, jax.random.PRNGKey(3))
  assert config.layer_ops == ops and config.hidden_size == hidden
  out = Backbone(config).apply({"params": backbone}, data["input_ids"], data["attention_mask"],
                               data["token_type_ids"])
  np.testing.assert_array_equal(np.asarray(out.last_hidden_state), np.asarray(x))
  # Every extracted tensor is a slice of a shared weight, and the tree is exactly the model's.
  reference = pretrained.abstract_params(Backbone(config), config)
  assert jax.tree.structure(reference) == jax.tree.structure(backbone)
  assert costs.model_params(config) == sum(x.size for x in jax.tree.leaves(backbone))


def test_padding_does_not_reach_real_tokens(trained_like_supernet):
  sp, params = trained_like_supernet
  data = batch(np.random.default_rng(0))
  short = {k: v[:1, :9] for k, v in data.items()}
  config, backbone = supernet.extract(sp, params, 16, ("conv5", "mha2", "ffn32", "conv3"),
                                      jax.random.PRNGKey(0))
  model = Backbone(config)
  padded = model.apply({"params": backbone}, data["input_ids"][:1], data["attention_mask"][:1],
                       data["token_type_ids"][:1]).last_hidden_state[:, :9]
  exact = model.apply({"params": backbone}, short["input_ids"], short["attention_mask"],
                      short["token_type_ids"]).last_hidden_state
  np.testing.assert_allclose(np.asarray(padded), np.asarray(exact), atol=1e-5)


def test_switched_block_loss_is_the_standalone_path_plus_adapters(trained_like_supernet):
  """The jitted, lax.switch-encoded block loss computes exactly the decoded path."""
  sp, params = trained_like_supernet
  data = batch(np.random.default_rng(1))
  mask = data["attention_mask"].astype(bool)
  rng = np.random.default_rng(2)
  bounds = [jnp.asarray(rng.standard_normal((3, 12, 20)), jnp.float32) for _ in range(3)]
  paths = np.asarray([sp.encode(16, ("mha4", "conv3")), sp.encode(16, ("identity", "ffn32"))])
  got = jax.jit(lambda p, b, d, q: supernet.block_losses(sp, p, b, d, q))(params, bounds, data,
                                                                            jnp.asarray(paths))

  def mse(out, target):
    w = np.asarray(mask, np.float32)
    return np.sum(np.mean((np.asarray(out) - np.asarray(target)) ** 2, -1) * w) / w.sum()

  expected = []
  for block, path in enumerate(paths):
    hidden, ops = sp.decode(path)
    if block == 0:
      x = supernet.embed(sp, params, hidden, data)
    else:
      adapter = params[f"block_{block}_input"]
      x = bounds[block] @ adapter["kernel"][:, :hidden] + adapter["bias"][:hidden]
    for j, op in enumerate(ops):
      x = supernet.apply_op(sp, params, block * 2 + j, hidden, op, x, mask)
    adapter = params[f"block_{block}_output"]
    expected.append(mse(x @ adapter["kernel"][:hidden] + adapter["bias"], bounds[block + 1]))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_supernet_parameters_carry_logical_axes():
  boxed = jax.eval_shape(lambda: supernet.init_supernet(space(), 20, jax.random.PRNGKey(0)))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  assert boxed["layer_0_mha"]["query"]["kernel"].names == ("embed", "heads")
  assert boxed["layer_3_ffn"]["intermediate"]["kernel"].names == ("embed", "mlp")
  assert boxed["embeddings"]["word_embeddings"]["embedding"].names == ("vocab", "token_embed")


def test_full_size_search_space_is_constructed_abstractly():
  c = nas_config("full")
  from mobilebert_jax.stages import model_config
  sp = nas.search_space(c.nas, model_config(c.student, "config.student"))
  assert sp.num_layers == 24 and sp.layers_per_block == 6 and len(sp.ops_for(512)) == 11
  shapes = jax.eval_shape(lambda: supernet.init_supernet(sp, 768, jax.random.PRNGKey(0)))
  total = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes)))
  assert 70e6 < total < 120e6  # one shared set of ops per layer at width 512, plus embeddings
  config = sp.model_config(512, ("mha8", "ffn3072") * 12)
  params = pretrained.abstract_params(build_model(config, "base"), config)
  assert costs.model_params(config) == sum(x.size for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- candidates, pruning


def test_candidates_enumerate_small_spaces_and_sample_large_ones():
  sp = space()
  every = supernet.candidate_paths(sp, max_per_block=10_000, seed=0)
  assert every.shape == (2, sp.paths_per_block(), 3)
  decoded = {sp.decode(p) for p in every[0]}
  assert len(decoded) == sp.paths_per_block()
  some = supernet.candidate_paths(sp, max_per_block=30, seed=0)
  assert some.shape == (2, 30, 3)
  for block in some:  # an equal share per hidden size, no repeats
    assert np.bincount(block[:, 0]).tolist() == [10, 10, 10]
    assert len({tuple(p) for p in block}) == 30
  np.testing.assert_array_equal(some, supernet.candidate_paths(sp, 30, seed=0))


def test_prune_drops_the_worst_fraction_per_block_and_hidden_size():
  scores = np.asarray([[5.0, 1.0, 3.0, 4.0, 2.0, 9.0, 0.5, 7.0],
                       [1.0, 2.0, 3.0, 4.0, 8.0, 7.0, 6.0, 5.0]])
  groups = np.asarray([[0, 0, 0, 0, 1, 1, 1, 1]] * 2)
  valid = np.ones((2, 8), bool)
  valid[1, 0] = False  # already pruned: stays pruned, not counted
  out = selection.prune(valid, scores, groups, fraction=0.5, min_keep=1)
  np.testing.assert_array_equal(out[0], [False, True, True, False, True, False, True, False])
  # block 1, group 0: 3 valid (2, 3, 4) -> drop 1 (score 4); group 1: drop 8 and 7
  np.testing.assert_array_equal(out[1], [False, True, True, False, False, False, True, True])
  kept = selection.prune(valid, scores, groups, fraction=0.9, min_keep=3)
  assert kept[0, :4].sum() == 3 and kept[0, 4:].sum() == 3 and not kept[0, 0]
  with pytest.raises(ValueError, match="fraction"):
    selection.prune(valid, scores, groups, fraction=1.0, min_keep=1)


def test_beam_search_is_exact_on_small_instances():
  rng = np.random.default_rng(0)
  for _ in range(20):
    options = [[selection.Option(i, float(rng.random()), {"params": float(rng.integers(1, 10)),
                                                           "latency_ms": float(rng.random())})
                for i in range(4)] for _ in range(3)]
    limits = {"params": 15.0, "latency_ms": 1.6}
    fixed = {"params": 2.0, "latency_ms": 0.1}
    best = None
    for combo in itertools.product(*options):
      p = fixed["params"] + sum(o.costs["params"] for o in combo)
      t = fixed["latency_ms"] + sum(o.costs["latency_ms"] for o in combo)
      if p <= limits["params"] and t <= limits["latency_ms"]:
        loss = sum(o.loss for o in combo)
        best = loss if best is None or loss < best else best
    found = selection.beam_search(options, limits, fixed, beam_size=64)
    if best is None:
      assert found is None
    else:
      assert found is not None and found[0] == pytest.approx(best)


# ----------------------------------------------------------------------------- costs, latency


def test_latency_table_round_trips_and_drives_the_search(tmp_path):
  sp = space(hidden_sizes=(8, 16), mha_heads=(2,), ffn_sizes=(16,), conv_kernels=(3,))
  table = costs.measure_latency_table(sp, batch_size=1, seq_length=8, repeats=2)
  assert not table.covers(sp) and all(v > 0 for t in table.ops.values() for v in t.values())
  path = str(tmp_path / "latency.json")
  table.save(path)
  loaded = costs.LatencyTable.load(path)
  assert loaded.to_json() == table.to_json()

  candidates = supernet.candidate_paths(sp, 10_000, seed=0)
  valid = np.ones(candidates.shape[:2], bool)
  # Scores favour convolutions strongly; a table where they are slow must steer away from them.
  scores = np.asarray([[sum(-1.0 if op.startswith("conv") else 0.0 for op in sp.decode(p)[1])
                        for p in block] for block in candidates])

  def searched(ops_ms, budget_ms):
    data = table.to_json()
    data["ops_ms"] = {h: {op: ops_ms(op) for op in ops} for h, ops in data["ops_ms"].items()}
    data["embeddings_ms"] = {h: 0.1 for h in data["embeddings_ms"]}
    pathlib.Path(path).write_text(json.dumps(data))
    return nas.search(sp, candidates, valid, scores, costs.LatencyTable.load(path),
                      {"max_latency_ms": budget_ms})

  hidden, ops, _ = searched(lambda op: 1.0, budget_ms=10.0)
  assert ops.count("conv3") == 4  # conv is cheap and best
  hidden, ops, _ = searched(lambda op: 50.0 if op.startswith("conv") else 1.0, budget_ms=10.0)
  assert "conv3" not in ops
  assert searched(lambda op: 1.0, budget_ms=0.05) is None

  broken = tmp_path / "broken.json"
  broken.write_text(json.dumps({"device": "x"}))
  with pytest.raises(ValueError, match="lacks the keys"):
    costs.LatencyTable.load(str(broken))
  partial = costs.LatencyTable({"8": {}}, {"8": 1.0}, device="x", batch_size=1, seq_length=8)
  assert "mha2@8" in partial.covers(sp)
  with pytest.raises(KeyError, match="mha2"):
    partial.op_ms("mha2", 8)


def test_flops_follow_the_ops():
  config = space().model_config(16, ("mha2", "ffn32", "conv3", "identity"))
  per_token = (8 * 16 * 16 + 4 * 12 * 16) + 4 * 16 * 32 + (2 * 3 * 16 + 2 * 16 * 16)
  assert costs.model_flops(config, 12) == (per_token + 2 * 8 * 16) * 12


def test_bad_search_spaces_and_ops_are_named():
  with pytest.raises(ValueError, match="num_blocks"):
    space(num_blocks=3)
  with pytest.raises(ValueError, match="embedding_size"):
    space(hidden_sizes=(4, 16))
  with pytest.raises(ValueError, match="conv4"):
    space(conv_kernels=(4,))
  with pytest.raises(ValueError, match="unknown layer op 'attn2'"):
    BASE.replace(layer_ops=("attn2",) * 4)
  with pytest.raises(ValueError, match="num_layers"):
    BASE.replace(layer_ops=("mha2",))
  with pytest.raises(ValueError, match="divisible"):
    BASE.replace(layer_ops=("mha5",) * 4)
  from mobilebert_jax.interop import hf
  with pytest.raises(hf.ConversionError, match="NAS architecture"):
    hf.check_exportable(BASE.replace(layer_ops=("mha2",) * 4))


# ----------------------------------------------------------------------------- end to end


def tiny_nas_config(teacher_dir, latency_table, steps=12):
  c = nas_config("tiny")
  c.stages = "nas"
  c.teacher_checkpoint = teacher_dir
  c.data.update(dict(max_seq_length=32, max_predictions_per_seq=5, batch_size=8, dupe_factor=1))
  c.log_every_steps = 2
  c.checkpoint.update(dict(save_every_steps=3, keep=10, async_save=False))
  # A smaller space than the default's (fewer switch branches to compile): 2 hidden sizes x 5 ops.
  c.nas.update(dict(num_steps=steps, prune_every=4, latency_table=latency_table,
                    hidden_sizes=(32, 64), ffn_sizes=(64,), conv_kernels=(3,),
                    param_budgets=(60_000, 70_000, 90_000)))
  c.nas.optimizer.warmup_steps = 2
  c.mesh.update(dict(data=2, fsdp=2, tensor=2))
  return c


@pytest.fixture(scope="module")
def teacher_and_table(tmp_path_factory):
  root = tmp_path_factory.mktemp("nas")
  c = nas_config("tiny")
  c.stages = "teacher_pretrain"
  c.data.update(dict(max_seq_length=32, max_predictions_per_seq=5, batch_size=8, dupe_factor=1))
  c.teacher_pretrain.num_steps = 6
  c.teacher_pretrain.optimizer.warmup_steps = 1
  c.checkpoint.async_save = False
  teacher = Trainer(c, str(root / "teacher_run")).run()["teacher"]
  from mobilebert_jax.stages import model_config
  sp = nas.search_space(c.nas, model_config(c.student, "config.student"))
  table = costs.LatencyTable(
      {str(h): {op: 0.1 + 0.001 * costs.op_params(op, h) / h for op in sp.ops_for(h)}
       for h in sp.hidden_sizes}, {str(h): 0.05 for h in sp.hidden_sizes},
      device="synthetic", batch_size=1, seq_length=32)
  table.save(str(root / "latency.json"))
  return root, teacher, str(root / "latency.json")


@pytest.fixture(scope="module")
def finished_run(teacher_and_table):
  root, teacher, table = teacher_and_table
  workdir = str(root / "full")
  outputs = Trainer(tiny_nas_config(teacher, table), workdir).run()
  return workdir, outputs


def test_tiny_nas_run_writes_loadable_architectures_of_different_sizes(finished_run):
  workdir, outputs = finished_run
  assert outputs["architectures"] == os.path.join(workdir, "architectures.json")
  entries = nas.read_architectures(workdir)
  assert len(entries) >= 3
  assert len({e["params"] for e in entries}) == len(entries)
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 100, (2, 16)), jnp.int32)
  for entry in entries:
    assert entry["params"] <= entry["budget"]["max_params"]
    model, params = load_pretrained(entry["checkpoint"])
    assert model.config == ModelConfig.from_dict(entry["config"])
    assert model.config.layer_ops == tuple(entry["ops"])
    assert sum(x.size for x in jax.tree.leaves(params)) == entry["params"]
    out = model.apply({"params": params}, ids)
    assert out.last_hidden_state.shape == (2, 16, entry["hidden_size"])
    assert np.all(np.isfinite(np.asarray(out.last_hidden_state)))
  # Pruning ran: half of every (block, hidden) group went at steps 4 and 8.
  scores = json.loads(pathlib.Path(workdir, "nas", "scores.json").read_text())
  valid = np.asarray(scores["valid"])
  # 2 hidden sizes x 3 cost bins of 9/8/8 paths: 9 -> 5 -> 3, 8 -> 4 -> 2.
  assert valid.sum(axis=1).tolist() == [2 * (3 + 2 + 2)] * 2
  losses = [m for m in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
            if m["stage"] == "nas" and "loss" in m]
  assert losses[-1]["loss"] < losses[0]["loss"]


def test_nas_resume_after_a_stop_matches_the_uninterrupted_run(teacher_and_table, finished_run):
  root, teacher, table = teacher_and_table
  full, _ = finished_run
  broken = str(root / "broken")
  trainer = Trainer(tiny_nas_config(teacher, table), broken)
  calls = []

  def stop_at_step_6():
    calls.append(1)
    return len(calls) == 6
  trainer.stop.agreed = stop_at_step_6
  assert "architectures" not in trainer.run()
  assert not os.path.exists(os.path.join(broken, "architectures.json"))
  Trainer(tiny_nas_config(teacher, table), broken).run()
  read = lambda w: json.loads(pathlib.Path(w, "nas", "scores.json").read_text())
  assert read(broken) == read(full)
  for a, b in zip(nas.read_architectures(full), nas.read_architectures(broken)):
    assert (a["ops"], a["hidden_size"], a["proxy_loss"]) == (b["ops"], b["hidden_size"],
                                                             b["proxy_loss"])
    _, pa = load_pretrained(a["checkpoint"])
    _, pb = load_pretrained(b["checkpoint"])
    jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_searched_architecture_trains_with_pretraining_distillation(teacher_and_table,
                                                                   finished_run):
  root, teacher, _ = teacher_and_table
  workdir, _ = finished_run
  entry = nas.read_architectures(workdir)[0]
  c = nas_config("tiny")
  from mobilebert_jax.default_config import get_config as demo
  c.pd = demo().pd
  c.stages = "pd"
  c.pd.update(dict(num_steps=3))
  c.pd.optimizer.warmup_steps = 1
  c.teacher_checkpoint, c.student_checkpoint = teacher, entry["checkpoint"]
  c.data.update(dict(max_seq_length=32, max_predictions_per_seq=5, batch_size=8, dupe_factor=1))
  c.log_every_steps = 1
  out = Trainer(c, str(root / "pd")).run()
  model, params = load_pretrained(out["student"])
  assert model.config.layer_ops == tuple(entry["ops"])
  _, extracted = load_pretrained(entry["checkpoint"])
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       params["backbone"]["embeddings"], extracted["embeddings"])
  assert max(jax.tree.leaves(moved)) > 0  # trained from the extracted weights


def test_nas_stage_config_errors_come_before_any_compute(teacher_and_table, tmp_path):
  _, teacher, table = teacher_and_table
  c = tiny_nas_config(teacher, table)
  c.nas.num_blocks = 3
  with pytest.raises(ValueError, match="num_blocks"):
    Trainer(c, str(tmp_path / "a"))
  c = tiny_nas_config(teacher, table)
  c.nas.param_budgets, c.nas.latency_budgets_ms = (), ()
  with pytest.raises(ValueError, match="budget"):
    Trainer(c, str(tmp_path / "b"))
  c = tiny_nas_config("", table)
  with pytest.raises(ValueError, match="needs a teacher"):
    Trainer(c, str(tmp_path / "c"))
