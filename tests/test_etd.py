"""ETD: extracted students are the teacher's sub-networks, importance finds planted units, and a
distillation stage with `init_from_teacher` starts from the extraction."""

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mobilebert_jax import default_config, load_pretrained, pretrained
from mobilebert_jax.distill import etd
from mobilebert_jax.models import build_model, get_preset
from mobilebert_jax.stages import Trainer

VOCAB = 64
DEMO_VOCAB = 2972  # the shipped demo vocab (mobilebert_jax/data/assets/vocab.txt)


def bert(hidden=32, heads=4, inter=64, layers=4, vocab=VOCAB, **overrides):
  return get_preset("bert_base").replace(
      vocab_size=vocab, embedding_size=hidden, hidden_size=hidden, intra_size=hidden,
      num_layers=layers, num_heads=heads, intermediate_size=inter, max_position_embeddings=32,
      hidden_dropout=0.0, attention_dropout=0.0, **overrides)


def mobile(hidden=32, intra=32, heads=4, inter=32, layers=3, **overrides):
  """MobileBERT-like (bottleneck, shared q/k bottleneck, 2 FFNs, trigram, 16-d token table):
  its norms are element-wise (no_norm), so channel extraction is exact too."""
  return get_preset("mobilebert").replace(**dict(dict(
      vocab_size=VOCAB, embedding_size=16, hidden_size=hidden, intra_size=intra, num_heads=heads,
      intermediate_size=inter, num_ffn=2, num_layers=layers, max_position_embeddings=32,
      attention_dropout=0.0), **overrides))


def random_params(cfg, seed=0, scale=0.2):
  shapes = pretrained.abstract_params(build_model(cfg, "pretraining"), cfg)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0.0, scale, s.shape).astype(np.float32), shapes)


def make_batch(seed=0, batch=2, length=12, predictions=3, vocab=VOCAB):
  rng = np.random.default_rng(seed)
  mask = np.ones((batch, length), np.int32)
  mask[-1, -3:] = 0
  types = np.zeros((batch, length), np.int32)
  types[:, length // 2:] = 1
  weights = np.ones((batch, predictions), np.float32)
  weights[-1, -1] = 0.0
  return dict(
      input_ids=rng.integers(5, vocab, (batch, length)).astype(np.int32), attention_mask=mask,
      token_type_ids=types,
      masked_lm_positions=rng.integers(1, length - 3, (batch, predictions)).astype(np.int32),
      masked_lm_ids=rng.integers(5, vocab, (batch, predictions)).astype(np.int32),
      masked_lm_weights=weights,
      next_sentence_labels=rng.integers(0, 2, (batch,)).astype(np.int32))


def forward(cfg, params, batch):
  return build_model(cfg, "pretraining").apply(
      {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
      masked_lm_positions=batch["masked_lm_positions"], output_hidden_states=True,
      output_attention_scores=True)


def leaves_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)


def dropped(size, kept):
  return np.setdiff1d(np.arange(size), kept)


def sub_teacher(t_cfg, params, sel):
  """The teacher restricted to the selected layers, with every dropped unit's outgoing weights
  zeroed (so dropped units cannot reach kept ones): what the student must compute."""
  p = jax.tree.map(np.array, params)
  bb = p["backbone"]
  units = sel.units
  drop_hidden = dropped(t_cfg.hidden_size, units["hidden"])
  layers = {}
  for s, t in enumerate(sel.layers):
    layer = jax.tree.map(np.array, bb[f"layer_{t}"])
    att = layer["attention"]
    for name in ("ffn", "stacked_ffn_0") if t_cfg.num_ffn == 2 else ("ffn",):
      layer[name]["output"]["kernel"][dropped(t_cfg.intermediate_size, units[name][s])] = 0
    att["output"]["kernel"][dropped(t_cfg.num_heads, units["heads"][s])] = 0
    for i, h in enumerate(units["heads"][s]):
      qk = dropped(t_cfg.head_dim, units["qk_dims"][s, i])
      att["query"]["kernel"][:, h, qk] = 0
      att["query"]["bias"][h, qk] = 0
      att["output"]["kernel"][h, dropped(t_cfg.head_dim, units["vo_dims"][s, i])] = 0
    if t_cfg.use_bottleneck:  # MobileBERT's wiring: q/k from bottleneck_attention, v from hidden
      for name in ("bottleneck_input", "bottleneck_attention"):
        layer[name]["kernel"][drop_hidden] = 0
      att["value"]["kernel"][drop_hidden] = 0
      drop_intra = dropped(t_cfg.intra_size, units["intra"][s])
      for name in ("ffn", "stacked_ffn_0"):
        layer[name]["intermediate"]["kernel"][drop_intra] = 0
      layer["output_bottleneck"]["kernel"][drop_intra] = 0
      drop_attention_intra = dropped(t_cfg.intra_size, units["attention_intra"][s])
      for name in ("query", "key"):
        att[name]["kernel"][drop_attention_intra] = 0
    layers[f"layer_{s}"] = layer
  bb = {k: v for k, v in bb.items() if not k.startswith("layer_")} | layers
  bb["pooler"]["kernel"][drop_hidden] = 0
  p["nsp"]["kernel"][drop_hidden] = 0
  p["mlm"]["transform"]["kernel"][drop_hidden] = 0
  if "extra_decoder" in p["mlm"]:
    p["mlm"]["extra_decoder"][drop_hidden - t_cfg.embedding_size] = 0
  p["backbone"] = bb
  return t_cfg.replace(num_layers=len(sel.layers)), p


# ----------------------------------------------------------------------------- sub-networks


@pytest.mark.parametrize("make_cfg", [bert, mobile])
@pytest.mark.parametrize("method", ["impt", "rand"])
def test_same_size_student_is_the_teacher(make_cfg, method):
  cfg = make_cfg()
  params = random_params(cfg)
  student = etd.extract_student(cfg, params, cfg, method=method, seed=3)
  leaves_equal(student, params)
  batch = make_batch()
  a, b = forward(cfg, student, batch), forward(cfg, params, batch)
  np.testing.assert_array_equal(a.prediction_logits, b.prediction_logits)


def test_fewer_ffn_neurons_is_the_teacher_with_those_neurons_zeroed():
  t_cfg, s_cfg = bert(), bert(inter=24)
  params = random_params(t_cfg)
  sel = etd.select_units(t_cfg, s_cfg, scores=etd.importance_scores(None, t_cfg, params,
                                                                    kind="magnitude"))
  student = etd.extract_student(t_cfg, params, s_cfg, selection=sel)
  zeroed = jax.tree.map(np.array, params)
  for layer in range(4):
    gone = dropped(64, sel.units["ffn"][layer])
    ffn = zeroed["backbone"][f"layer_{layer}"]["ffn"]
    ffn["intermediate"]["kernel"][:, gone] = 0
    ffn["intermediate"]["bias"][gone] = 0
    ffn["output"]["kernel"][gone] = 0
  batch = make_batch()
  s, t = forward(s_cfg, student, batch), forward(t_cfg, zeroed, batch)
  for name in ("prediction_logits", "seq_relationship_logits", "hidden_states",
               "attention_scores"):
    jax.tree.map(close, getattr(s, name), getattr(t, name))


@pytest.mark.parametrize("mapping,expected", [("uniform", (1, 3)), ("1,3", (0, 2)),
                                              ((3, 4), (2, 3))])
def test_fewer_layers_are_the_mapped_teacher_layers(mapping, expected):
  t_cfg, s_cfg = bert(), bert(layers=2)
  params = random_params(t_cfg)
  student = etd.extract_student(t_cfg, params, s_cfg, layer_mapping=mapping)
  for s, t in enumerate(expected):
    leaves_equal(student["backbone"][f"layer_{s}"], params["backbone"][f"layer_{t}"])
  for key in ("embeddings", "pooler"):
    leaves_equal(student["backbone"][key], params["backbone"][key])
  leaves_equal({k: student[k] for k in ("mlm", "nsp")}, {k: params[k] for k in ("mlm", "nsp")})
  sub_cfg, sub = sub_teacher(t_cfg, params, etd.select_units(
      t_cfg, s_cfg, method="rand", layer_mapping=mapping))
  batch = make_batch()
  jax.tree.map(close, forward(s_cfg, student, batch).hidden_states,
               forward(sub_cfg, sub, batch).hidden_states)


@pytest.mark.parametrize("sizes", [
    dict(heads=2, intra=16, inter=16),                              # fewer heads, same width
    dict(heads=4, intra=16, hidden=24, layers=2),                   # narrower heads, hidden
    dict(heads=2, intra=8, inter=8, hidden=20, layers=1),           # everything at once
])
@pytest.mark.parametrize("method", ["impt", "rand"])
def test_narrow_bottleneck_student_is_the_teacher_subnetwork(sizes, method):
  """No-norm bottleneck teacher: dropped heads, head dims, FFN neurons, intra and hidden
  channels and layers; the student computes the zeroed teacher's kept channels exactly."""
  t_cfg, s_cfg = mobile(), mobile(**sizes)
  params = random_params(t_cfg, seed=1)
  scores = etd.importance_scores(None, t_cfg, params, kind="magnitude")
  sel = etd.select_units(t_cfg, s_cfg, method=method, scores=scores, seed=5)
  student = etd.extract_student(t_cfg, params, s_cfg, selection=sel)
  sub_cfg, sub = sub_teacher(t_cfg, params, sel)
  batch = make_batch(seed=2)
  s, t = forward(s_cfg, student, batch), forward(sub_cfg, sub, batch)
  kept = sel.units["hidden"]
  for sh, th in zip(s.hidden_states, t.hidden_states, strict=True):
    close(sh, th[..., kept])
  for layer, (ss, ts) in enumerate(zip(s.attention_scores, t.attention_scores, strict=True)):
    close(ss, ts[:, sel.units["heads"][layer]])
  close(s.seq_relationship_logits, t.seq_relationship_logits)
  if s_cfg.hidden_size == t_cfg.hidden_size:  # the MLM transform's LayerNorm spans all channels
    close(s.prediction_logits, t.prediction_logits)


def test_hidden_channels_are_the_top_scored_and_sliced_everywhere():
  t_cfg, s_cfg = bert(), bert(hidden=16, heads=2)
  params = random_params(t_cfg)
  scores = etd.importance_scores(None, t_cfg, params, kind="magnitude")
  scores["hidden"] = np.random.default_rng(0).permutation(32).astype(float)
  top = np.sort(np.argsort(-scores["hidden"])[:16])
  sel = etd.select_units(t_cfg, s_cfg, scores=scores)
  np.testing.assert_array_equal(sel.units["hidden"], top)
  student = etd.extract_student(t_cfg, params, s_cfg, selection=sel)
  want = pretrained.abstract_params(build_model(s_cfg, "pretraining"), s_cfg)
  assert jax.tree.map(np.shape, student) == jax.tree.map(lambda x: x.shape, want)
  sb, tb = student["backbone"], params["backbone"]
  np.testing.assert_array_equal(sb["embeddings"]["word_embeddings"]["embedding"],
                                tb["embeddings"]["word_embeddings"]["embedding"][:, top])
  np.testing.assert_array_equal(sb["embeddings"]["norm"]["scale"],
                                tb["embeddings"]["norm"]["scale"][top])
  np.testing.assert_array_equal(sb["pooler"]["kernel"], tb["pooler"]["kernel"][np.ix_(top, top)])
  np.testing.assert_array_equal(student["nsp"]["kernel"], params["nsp"]["kernel"][top])
  np.testing.assert_array_equal(student["mlm"]["transform_norm"]["bias"],
                                params["mlm"]["transform_norm"]["bias"][top])
  heads = sel.units["heads"][0]
  np.testing.assert_array_equal(
      sb["layer_0"]["attention"]["value"]["kernel"],
      tb["layer_0"]["attention"]["value"]["kernel"][top][:, heads])
  np.testing.assert_array_equal(
      sb["layer_0"]["attention"]["output"]["kernel"],
      tb["layer_0"]["attention"]["output"]["kernel"][heads][..., top])
  ffn = sel.units["ffn"][0]
  np.testing.assert_array_equal(sb["layer_0"]["ffn"]["output"]["kernel"],
                                tb["layer_0"]["ffn"]["output"]["kernel"][np.ix_(ffn, top)])


def test_narrow_token_table_keeps_the_decoder_channels():
  """With a 16-d token table the tied decoder reads hidden channels 0..15: they stay, however
  they score, and the extra decoder rows follow the other kept channels."""
  t_cfg, s_cfg = mobile(), mobile(hidden=24)
  params = random_params(t_cfg)
  scores = etd.importance_scores(None, t_cfg, params, kind="magnitude")
  scores["hidden"] = np.arange(32.0)  # channels 0..15 score lowest
  sel = etd.select_units(t_cfg, s_cfg, scores=scores)
  np.testing.assert_array_equal(sel.units["hidden"], np.r_[0:16, 24:32])
  student = etd.extract_student(t_cfg, params, s_cfg, selection=sel)
  np.testing.assert_array_equal(student["mlm"]["extra_decoder"],
                                params["mlm"]["extra_decoder"][8:])


def test_classification_teacher_extracts_with_its_head():
  t_cfg, s_cfg = bert(layers=2), bert(hidden=16, heads=2, layers=2)
  shapes = pretrained.abstract_params(build_model(t_cfg, "classification"), t_cfg)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(0.0, 0.2, x.shape).astype(np.float32), shapes)
  sel = etd.select_units(t_cfg, s_cfg, scores=etd.importance_scores(None, t_cfg, params,
                                                                    kind="magnitude"))
  student = etd.extract_student(t_cfg, params, s_cfg, selection=sel)
  np.testing.assert_array_equal(student["classifier"]["kernel"],
                                params["classifier"]["kernel"][sel.units["hidden"]])
  with pytest.raises(ValueError, match="magnitude"):  # no MLM loss to take gradients of
    etd.importance_scores(None, t_cfg, params, [make_batch()])


# ----------------------------------------------------------------------------- importance


def test_impt_keeps_planted_heads_and_neurons():
  t_cfg, s_cfg = bert(), bert(hidden=16, heads=2, inter=8)
  params = jax.tree.map(np.array, random_params(t_cfg))
  layer = params["backbone"]["layer_2"]
  for name in ("query", "key", "value"):
    layer["attention"][name]["kernel"][:, 3] *= 10
  layer["attention"]["output"]["kernel"][3] *= 10
  layer["ffn"]["intermediate"]["kernel"][:, [5, 40]] *= 10
  layer["ffn"]["output"]["kernel"][[5, 40]] *= 10
  scores = etd.importance_scores(None, t_cfg, params, kind="magnitude")
  assert np.argmax(scores["heads"][2]) == 3
  sel = etd.select_units(t_cfg, s_cfg, scores=scores)
  assert 3 in sel.units["heads"][2]
  assert {5, 40} <= set(sel.units["ffn"][2].tolist())
  # Without scores ETD-Impt ranks by magnitude.
  leaves_equal(etd.extract_student(t_cfg, params, s_cfg),
               etd.extract_student(t_cfg, params, s_cfg, selection=sel))


def test_first_order_scores_are_the_gate_derivatives():
  """sum over batches of |dL_b/dg| of a gate scaling a head's context, an FFN neuron, a query dimension and a hidden
  channel (all of its residual-stream norms), by float64 central differences."""
  cfg = bert(layers=2)
  params = random_params(cfg, scale=0.3)
  batches = [make_batch(seed) for seed in range(2)]
  scores = etd.importance_scores(build_model(cfg, "pretraining"), cfg, params, batches)
  assert set(scores) == {"hidden", "heads", "qk_dims", "vo_dims", "ffn"}
  # The top unit of each kind (large derivatives: the float32 softmax limits the differences).
  head, neuron, channel = (int(np.argmax(scores["heads"][1])), int(np.argmax(scores["ffn"][0])),
                           int(np.argmax(scores["hidden"])))
  q_head, q_dim = np.unravel_index(np.argmax(scores["qk_dims"][0]), (4, 8))

  def scale_head(p, g):
    p["backbone"]["layer_1"]["attention"]["output"]["kernel"][head] *= g

  def scale_neuron(p, g):
    p["backbone"]["layer_0"]["ffn"]["output"]["kernel"][neuron] *= g

  def scale_query_dim(p, g):
    query = p["backbone"]["layer_0"]["attention"]["query"]
    query["kernel"][:, q_head, q_dim] *= g
    query["bias"][q_head, q_dim] *= g

  def scale_hidden(p, g):
    bb = p["backbone"]
    norms = [bb["embeddings"]["norm"]] + [bb[f"layer_{i}"][m]["norm"] for i in range(2)
                                           for m in ("attention", "ffn")]
    for norm in norms:
      norm["scale"][channel] *= g
      norm["bias"][channel] *= g

  with jax.enable_x64(True):
    model = build_model(cfg, "pretraining", dtype=jnp.float64, param_dtype=jnp.float64)
    per_batch = jax.jit(lambda p: jnp.stack([etd._mlm_loss(model, p, b) for b in batches]))

    def derivative(scale, eps=3e-2):  # the attention softmax runs in float32 even here
      values = []
      for g in (1 + eps, 1 - eps):
        p = jax.tree.map(lambda x: np.array(x, np.float64), params)
        scale(p, g)
        values.append(np.asarray(per_batch(p)))
      return float(np.sum(np.abs(values[0] - values[1]) / (2 * eps)))  # sum_b |dL_b/dg|

    found = {"head": scores["heads"][1, head], "neuron": scores["ffn"][0, neuron],
             "query dim": scores["qk_dims"][0, q_head, q_dim], "hidden": scores["hidden"][channel]}
    wanted = {"head": derivative(scale_head), "neuron": derivative(scale_neuron),
              "query dim": derivative(scale_query_dim), "hidden": derivative(scale_hidden)}
  for key in found:
    assert wanted[key] > 1e-3, key
    np.testing.assert_allclose(found[key], wanted[key], rtol=5e-3, atol=2e-5, err_msg=key)
  # A head's score is the sum of its value/output dims' gates (signed), so never more.
  assert np.all(scores["heads"] <= scores["vo_dims"].sum(-1) + 1e-6)

  # The absolute value is taken per batch: scores add up over batches (no cancelling).
  singles = [etd.importance_scores(None, cfg, params, [b]) for b in batches]
  for kind in scores:
    np.testing.assert_allclose(scores[kind], singles[0][kind] + singles[1][kind], rtol=1e-6,
                               err_msg=kind)

  # A head whose output is zero has no first-order importance: ETD-Impt drops it.
  dead = jax.tree.map(np.array, params)
  dead["backbone"]["layer_0"]["attention"]["output"]["kernel"][1] = 0
  scores = etd.importance_scores(None, cfg, dead, batches)
  assert scores["heads"][0, 1] == 0 and np.all(np.delete(scores["heads"][0], 1) > 0)
  sel = etd.select_units(cfg, bert(hidden=24, heads=3, layers=2), scores=scores)
  assert 1 not in sel.units["heads"][0]


def test_rand_is_seeded():
  t_cfg, s_cfg = bert(), bert(hidden=16, heads=2, inter=16, layers=2)
  params = random_params(t_cfg)
  a = etd.select_units(t_cfg, s_cfg, method="rand", seed=0)
  b = etd.select_units(t_cfg, s_cfg, method="rand", seed=0)
  c = etd.select_units(t_cfg, s_cfg, method="rand", seed=1)
  leaves_equal(a.units, b.units)
  assert not np.array_equal(a.units["hidden"], c.units["hidden"])
  assert not np.array_equal(a.units["ffn"], c.units["ffn"])
  for units in (a.units, c.units):
    assert all(np.all(np.diff(v, axis=-1) > 0) for v in units.values())  # sorted, distinct
  leaves_equal(etd.extract_student(t_cfg, params, s_cfg, method="etd_rand", seed=0),
               etd.extract_student(t_cfg, params, s_cfg, selection=a))


@pytest.mark.parametrize("teacher,student,field", [
    (bert(), bert(hidden=64, heads=8), "hidden_size"),
    (bert(), bert(layers=5), "num_layers"),
    (bert(), bert(inter=128), "intermediate_size"),
    (bert(), bert(heads=2), "num_heads"),  # head width 16 > 8
    (bert(), bert(hidden_act="relu"), "hidden_act"),
    (bert(), bert(normalization="no_norm"), "normalization"),
    (bert(), bert(vocab=65), "vocab_size"),
    (bert(), bert().replace(embedding_size=16), "embedding_size"),
    (mobile(), mobile().replace(embedding_size=8), "embedding_size"),
    (mobile(), mobile(num_ffn=1), "num_ffn"),
    (bert(), mobile(), "model_type"),
])
def test_incompatible_configs_name_the_field(teacher, student, field):
  with pytest.raises(ValueError, match=field):
    etd.extract_student(teacher, random_params(teacher), student, method="rand")


def test_bad_arguments_are_named():
  cfg = bert()
  with pytest.raises(ValueError, match="layer mapping"):
    etd.select_units(cfg, bert(layers=2), method="rand", layer_mapping="1,9")
  with pytest.raises(ValueError, match="ETD method 'best'"):
    etd.select_units(cfg, cfg, method="best")
  with pytest.raises(ValueError, match=r"scores\['heads'\]"):
    etd.select_units(cfg, cfg, scores={"hidden": np.zeros(32)})
  with pytest.raises(ValueError, match="importance kind"):
    etd.importance_scores(None, cfg, random_params(cfg), kind="second_order")


# ----------------------------------------------------------------------------- the trainer


def etd_config(teacher_dir, **stage):
  c = default_config.get_config()
  c.stages = "pd"
  teacher = dict(preset="bert_base", vocab_size=DEMO_VOCAB, embedding_size=32, hidden_size=32,
                 intra_size=32, num_layers=4, num_heads=4, intermediate_size=64,
                 max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
  c.teacher = ml_collections.ConfigDict(teacher)
  c.student = ml_collections.ConfigDict(dict(
      teacher, embedding_size=16, hidden_size=16, intra_size=16, num_layers=2, num_heads=2,
      intermediate_size=32))
  c.teacher_checkpoint = teacher_dir
  c.data.update(dict(max_seq_length=32, max_predictions_per_seq=5, batch_size=8, dupe_factor=1))
  c.mesh.update(dict(data=1, fsdp=1, tensor=1))
  c.checkpoint.update(dict(save_every_steps=2, async_save=False))
  c.log_every_steps = 1
  c.pd.num_steps = 2
  c.pd.optimizer.update(dict(learning_rate=0.0, warmup_steps=1))  # the start, unchanged
  c.pd.update(dict(init_from_teacher="etd_impt", etd_num_batches=2, etd_importance="first_order",
                   etd_layer_mapping="uniform"))
  c.pd.update(stage)
  return c


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  cfg = bert(vocab=DEMO_VOCAB, layers=4).replace(max_position_embeddings=64)
  path = str(tmp_path_factory.mktemp("teacher"))
  pretrained.save_pretrained(path, cfg, random_params(cfg, scale=0.1), "pretraining")
  return path


def test_trainer_pd_stage_starts_from_the_etd_impt_extraction(teacher_dir, tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="mobilebert_jax")
  c = etd_config(teacher_dir)
  trainer = Trainer(c, str(tmp_path))
  trainer.run()
  assert ("stage 'pd': ETD-Impt (first-order importance on 2 batches) extracted the student from "
          "the teacher: layers [2, 4] of 4, heads 2/4, head dims 8/8, FFN neurons 32/64, hidden "
          "channels 16/32") in caplog.text
  t_cfg, s_cfg = trainer.roles["teacher"].config, trainer.roles["student"].config
  _, teacher = load_pretrained(teacher_dir)
  data = trainer.dataset_for(trainer.plan.stages[0])
  scores = etd.importance_scores(None, t_cfg, teacher,
                                 [data.get_global_batch(0, i) for i in range(2)])
  expected = etd.extract_student(t_cfg, teacher, s_cfg, scores=scores)
  _, student = load_pretrained(os.path.join(tmp_path, "student"))
  leaves_equal(student, expected)


@pytest.mark.parametrize("stage,message", [
    (dict(init_from_teacher="etd_best"), r"config\.pd\.init_from_teacher='etd_best'"),
    (dict(etd_importance="taylor"), r"config\.pd\.etd_importance"),
    (dict(etd_layer_mapping="1,2,3"), r"config\.pd\.etd_layer_mapping"),
    (dict(etd_num_batches=0), r"config\.pd\.etd_num_batches"),
])
def test_trainer_validates_the_etd_options_before_any_compute(teacher_dir, tmp_path, stage,
                                                               message):
  with pytest.raises(ValueError, match=message):
    Trainer(etd_config(teacher_dir, **stage), str(tmp_path))
