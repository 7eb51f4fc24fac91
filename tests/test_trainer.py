"""The trainer end to end on tiny configs: falling losses, PKT freezing, sharding, resume, errors."""

import os
import threading
import time

import jax
import numpy as np
import pytest

from mobilebert_jax import default_config, load_pretrained
from mobilebert_jax.data import sample_text_path
from mobilebert_jax.training.metrics import read_metrics
from mobilebert_jax.stages import Trainer
from mobilebert_jax.training import goodput
from mobilebert_jax.training.core import TrainingDivergedError


def tiny_config(stages="teacher_pretrain,pkt,pd", steps=(8, 8, 8), **mesh):
  c = default_config.get_config()
  c.stages = stages
  c.data.max_seq_length = 32
  c.data.max_predictions_per_seq = 5
  c.data.batch_size = 8
  c.data.dupe_factor = 1
  c.data.shard_size_mb = 0.015  # the shipped corpus prepared into 3 shards
  c.log_every_steps = 1
  c.checkpoint.save_every_steps = 4
  c.checkpoint.keep = 5
  c.checkpoint.async_save = False
  c.mesh.update(mesh or dict(data=1, fsdp=1, tensor=1))
  for name, n in zip(stages.split(","), steps):
    c[name].num_steps = n
    c[name].optimizer.warmup_steps = 1
  return c


def losses(workdir, stage):
  return [(m["step"], m["loss"]) for m in read_metrics(os.path.join(workdir, "metrics.jsonl"))
          if m["stage"] == stage]


def params_of(path):
  return jax.tree.map(np.asarray, load_pretrained(path)[1])


def test_teacher_loss_falls(tmp_path):
  """...with goodput in every log line (MFU against a given peak, the analytic model FLOPs,
  where the wall time went) and a profiler trace of the steps asked for."""
  c = tiny_config("teacher_pretrain", steps=(40,))
  c.teacher_pretrain.optimizer.learning_rate = 2e-2
  c.peak_tflops = 0.5
  c.profile = "teacher_pretrain:2:4"
  Trainer(c, str(tmp_path)).run()
  curve = [loss for _, loss in losses(str(tmp_path), "teacher_pretrain")]
  assert len(curve) == 40
  assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 0.5

  rows = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  model, params = load_pretrained(os.path.join(tmp_path, "teacher"))
  flops = goodput.train_step_flops((model.config, params), None, batch=8, length=32,
                                   masked_per_sequence=5)
  for row in rows:
    assert row["mfu"] == pytest.approx(row["model_tflops_per_device"] / 0.5)
    assert row["model_tflops_per_device"] * 1e12 == pytest.approx(flops * row["steps_per_sec"])
    assert sum(row[f"time_{a}_frac"] for a in goodput.ACTIVITIES) == pytest.approx(1.0)
  assert rows[0]["time_compile_frac"] > 0.5 and rows[-1]["time_compile_frac"] == 0
  traces = list((tmp_path / "teacher_pretrain" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traces) == 1


def _restore_ckpt_params(path):
  import orbax.checkpoint as ocp
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(path, "state"))
  return jax.tree.map(np.asarray, tree["params"]["model"])


def test_pkt_freezes_exactly_the_layers_it_should(tmp_path):
  # 2 layers, 8 steps: phase 0 = steps 0-3 (layer_0 trains), phase 1 = steps 4-7 (layer_1).
  c = tiny_config("teacher_pretrain,pkt", steps=(4, 8))
  c.pkt.lower_layer_multiplier = 0.0  # the paper's strict variant (the release: 0.3)
  Trainer(c, str(tmp_path)).run()
  teacher = params_of(os.path.join(tmp_path, "teacher"))
  at4 = _restore_ckpt_params(os.path.join(tmp_path, "pkt", "checkpoints", "4"))
  at8 = _restore_ckpt_params(os.path.join(tmp_path, "pkt", "checkpoints", "8"))
  eq = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  # Embeddings and heads: copied from the teacher and frozen for the whole stage; the teacher's
  # LayerNorm is not copied into the student's NoNorm, which keeps its 1 / 0 init.
  embeddings = dict(at8["backbone"]["embeddings"])
  norm = embeddings.pop("norm")
  assert eq(embeddings, {k: v for k, v in teacher["backbone"]["embeddings"].items() if k != "norm"})
  assert np.all(norm["scale"] == 1.0) and np.all(norm["bias"] == 0.0)
  assert eq(at8["backbone"]["pooler"], teacher["backbone"]["pooler"])
  assert eq(at8["mlm"], teacher["mlm"]) and eq(at8["nsp"], teacher["nsp"])
  # Layer 0 trained in phase 0, then frozen (lower_layer_multiplier=0) through phase 1.
  assert eq(at4["backbone"]["layer_0"], at8["backbone"]["layer_0"])
  # Layer 1 trains in phase 1.
  assert not eq(at4["backbone"]["layer_1"], at8["backbone"]["layer_1"])
  phases = [m["phase"] for m in read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
            if m["stage"] == "pkt"]
  assert phases == [0.0] * 4 + [1.0] * 4


MESHES = {"one": dict(data=1, fsdp=1, tensor=1), "data8": dict(data=8, fsdp=1, tensor=1),
          "mixed": dict(data=2, fsdp=2, tensor=2),
          "hybrid": dict(dcn_data=2, data=2, fsdp=2, tensor=1)}


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
  """Losses of teacher_pretrain then pd, 3 steps each, on one device and on meshes of 8 host
  devices (data; data x fsdp x tensor; a hybrid mesh with two simulated slices over
  dcn_data)."""
  root = tmp_path_factory.mktemp("meshes")
  runs = {}
  for name, mesh in MESHES.items():
    Trainer(tiny_config("teacher_pretrain,pd", steps=(3, 3), **mesh), str(root / name)).run()
    runs[name] = {stage: losses(str(root / name), stage) for stage in ("teacher_pretrain", "pd")}
  return runs


@pytest.mark.parametrize("mesh", ["data8", "mixed", "hybrid"])
def test_sharded_losses_match_single_device(mesh, mesh_runs):
  for stage in ("teacher_pretrain", "pd"):
    a, b = mesh_runs["one"][stage], mesh_runs[mesh][stage]
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    # Step 1 sees identical parameters: float tolerance. Later steps follow LAMB updates, whose
    # first steps are ~sign(g) per element, so reduction-order noise in near-zero gradients
    # moves the loss slightly more.
    if stage == "teacher_pretrain":  # the pd teacher already differs by the tolerance below
      np.testing.assert_allclose(a[0][1], b[0][1], rtol=2e-5)
    np.testing.assert_allclose([l for _, l in a[1:]], [l for _, l in b[1:]], rtol=1e-3)


def test_a_hybrid_mesh_trains_like_plain_data_parallelism(mesh_runs):
  """Two simulated slices (dcn_data=2) x data=2 x fsdp=2 against data=8: the same programme
  up to the order of the cross-device sums."""
  for stage in ("teacher_pretrain", "pd"):
    np.testing.assert_allclose([l for _, l in mesh_runs["hybrid"][stage]],
                               [l for _, l in mesh_runs["data8"][stage]], rtol=1e-5)


def test_sigterm_then_resume_equals_uninterrupted(tmp_path):
  c = tiny_config("teacher_pretrain,pkt,pd", steps=(6, 6, 40))
  c.checkpoint.save_every_steps = 5
  full = str(tmp_path / "full")
  Trainer(c, full).run()

  broken = str(tmp_path / "broken")
  metrics_path = os.path.join(broken, "metrics.jsonl")

  def interrupt():  # SIGTERM once the pd stage has made a few steps
    deadline = time.time() + 120
    while time.time() < deadline:
      try:
        progress = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
      except Exception:  # a line being written right now
        progress = []
      if any(m["stage"] == "pd" and m["step"] >= 7 for m in progress):
        os.kill(os.getpid(), 15)
        return
      time.sleep(0.01)

  killer = threading.Thread(target=interrupt)
  killer.start()
  Trainer(c, broken).run()
  killer.join()
  assert not os.path.exists(os.path.join(broken, "pd", "final")), "the run was not interrupted"
  stopped_at = max(s for s, _ in losses(broken, "pd"))
  assert stopped_at < 40
  saved = sorted(int(d) for d in os.listdir(os.path.join(broken, "pd", "checkpoints")))
  assert saved[-1] == stopped_at  # saved at the step it stopped, not only on the interval

  Trainer(c, broken).run()
  assert os.path.exists(os.path.join(broken, "pd", "final"))
  resumed = dict(losses(broken, "pd"))
  uninterrupted = dict(losses(full, "pd"))
  for step in range(stopped_at + 1, 41):
    np.testing.assert_allclose(resumed[step], uninterrupted[step], rtol=1e-6, err_msg=str(step))
  a, b = params_of(os.path.join(full, "student")), params_of(os.path.join(broken, "student"))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def test_nan_loss_stops_with_step_and_term_and_keeps_last_good_checkpoint(tmp_path):
  c = tiny_config("teacher_pretrain", steps=(20,))
  c.checkpoint.save_every_steps = 2
  c.teacher_pretrain.optimizer.learning_rate = 1e38
  c.teacher_pretrain.optimizer.warmup_steps = 4
  with pytest.raises(TrainingDivergedError, match=r"loss term '\w+' is (nan|inf) at step \d+"):
    Trainer(c, str(tmp_path)).run()
  ckpts = os.path.join(tmp_path, "teacher_pretrain", "checkpoints")
  for step in (os.listdir(ckpts) if os.path.isdir(ckpts) else []):
    params = _restore_ckpt_params(os.path.join(ckpts, step))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params)), step


def test_bad_inputs_fail_before_compute(tmp_path):
  c = tiny_config()
  c.stages = "teacher_pretrain,distil"
  with pytest.raises(ValueError, match="unknown stage 'distil'"):
    Trainer(c, str(tmp_path))
  c = tiny_config()
  c.pkt.strategy = "ptk"
  with pytest.raises(ValueError, match="unknown strategy 'ptk'"):
    Trainer(c, str(tmp_path))
  c = tiny_config()
  c.data.input_files = str(tmp_path / "missing.txt")
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    Trainer(c, str(tmp_path))
  (tmp_path / "empty.txt").write_text("")
  c.data.input_files = str(tmp_path / "empty.txt")
  with pytest.raises(ValueError, match="empty.txt"):
    Trainer(c, str(tmp_path))
  c = tiny_config()
  c.student.vocab_size = 1000
  c.teacher.vocab_size = 1000
  with pytest.raises(ValueError, match="1000"):
    Trainer(c, str(tmp_path))
  with pytest.raises(ValueError, match="needs a teacher"):
    Trainer(tiny_config("pkt"), str(tmp_path))
  c = tiny_config()
  c.student.num_layers = 3
  with pytest.raises(ValueError, match="equal num_layers"):
    Trainer(c, str(tmp_path))
  c = tiny_config(data=4, fsdp=2, tensor=1)
  c.data.batch_size = 12
  with pytest.raises(ValueError, match=r"batch_size=12 does not split over .* 8 devices"):
    Trainer(c, str(tmp_path))


def test_teacher_checkpoint_of_wrong_shape(tmp_path):
  c = tiny_config("teacher_pretrain", steps=(1,))
  Trainer(c, str(tmp_path / "t")).run()
  c = tiny_config("pd")
  c.teacher_checkpoint = str(tmp_path / "t" / "teacher")
  c.teacher.hidden_size = 128
  with pytest.raises(ValueError, match="hidden_size: checkpoint 64 vs config 128"):
    Trainer(c, str(tmp_path / "s"))
  assert sample_text_path().exists()


@pytest.mark.parametrize("strategy", ["akt", "jkt", "tinybert"])
def test_other_strategies_train_with_finite_losses(strategy, tmp_path):
  c = tiny_config("teacher_pretrain,distill", steps=(2,))
  # Every other key of the block comes from the strategy's registry defaults.
  c.distill = dict(strategy=strategy, model="student", num_steps=3,
                   optimizer=c.pd.optimizer.to_dict())
  c.distill.optimizer.warmup_steps = 1
  if strategy == "tinybert":  # a narrower BERT-style student: projections 32 -> 64 are learned
    c.student = dict(preset="tinybert_4l", vocab_size=c.teacher.vocab_size, embedding_size=32,
                     hidden_size=32, intra_size=32, num_layers=2, num_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
  Trainer(c, str(tmp_path)).run()
  rows = [m for m in read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
          if m["stage"] == "distill"]
  assert len(rows) == 3 and all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in rows)
  expected = {"akt": {"fmt_hidden", "attention", "kd", "mlm", "nsp"},
              "jkt": {"fmt_hidden", "fmt_beta", "fmt_gamma", "attention"},
              "tinybert": {"embedding", "attention", "hidden"}}[strategy]
  assert expected <= set(rows[0])
  model, params = load_pretrained(os.path.join(tmp_path, "student"))
  assert model.config.hidden_size == (32 if strategy == "tinybert" else 64)
