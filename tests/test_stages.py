"""The stage registry, `plan`, honest reruns and epoch-based fine-tuning."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mobilebert_jax import default_config, objectives, save_pretrained, stages
from mobilebert_jax.models import build_model, get_preset
from mobilebert_jax.pretrained import init_params
from mobilebert_jax.stages import ConfigChangedError, PlanError, StageSpec, Trainer, plan
from mobilebert_jax.stages.planner import optimizer_config, resolve_stage, stage_length
from mobilebert_jax.training.metrics import read_metrics
from test_finetune import vocab_words, write_sst2
from test_trainer import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_training_imports_no_stage_search_downstream_or_distill_module():
  code = ("import sys, mobilebert_jax.training, mobilebert_jax.training.core, "
          "mobilebert_jax.training.context, mobilebert_jax.training.checkpointing, "
          "mobilebert_jax.training.metrics, mobilebert_jax.training.optimizer\n"
          "print([m for m in sys.modules if m.split('.')[:2] in (['mobilebert_jax', 'search'], "
          "['mobilebert_jax', 'downstream'], ['mobilebert_jax', 'distill'], "
          "['mobilebert_jax', 'stages'])])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT)
  assert out.stdout.strip() == "[]", out.stdout
  for path in (ROOT / "mobilebert_jax" / "training").glob("*.py"):
    assert not re.search(r"strategy (==|in|!=)", path.read_text()), path


def toy_loss(ctx, params, teacher_params, batch, rng, step):
  """L = scale * MLM: masked-LM cross-entropy only, scaled by the stage's `scale`."""
  out = ctx.model.apply({"params": params["model"]}, batch["input_ids"], batch["attention_mask"],
                        batch["token_type_ids"], masked_lm_positions=batch["masked_lm_positions"],
                        deterministic=False, rngs={"dropout": rng})
  mlm = objectives.mlm_loss(out.prediction_logits, batch["masked_lm_ids"],
                            batch["masked_lm_weights"])
  return ctx.stage.scale * mlm, {"toy_mlm": mlm, "scale": jnp.float32(ctx.stage.scale)}


def test_a_toy_strategy_trains_through_the_registry_alone(tmp_path):
  stages.register(StageSpec("toy_mlm", loss=toy_loss, role="teacher", keys={"scale": 0.5}))
  try:
    c = tiny_config("teacher_pretrain", steps=(1,))
    c.stages = "toy"
    c.toy = dict(strategy="toy_mlm", num_steps=30,
                 optimizer=default_config.optimizer(learning_rate=2e-2, warmup_steps=2))
    Trainer(c, str(tmp_path)).run()
  finally:
    stages.unregister("toy_mlm")
  rows = [m for m in read_metrics(tmp_path / "metrics.jsonl") if m["stage"] == "toy"]
  assert len(rows) == 30 and all(m["scale"] == 0.5 for m in rows)
  np.testing.assert_allclose([m["loss"] for m in rows], [m["toy_mlm"] / 2 for m in rows],
                             rtol=1e-5)
  curve = [m["toy_mlm"] for m in rows]
  assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 0.3
  assert (tmp_path / "teacher" / "mobilebert_jax.json").exists()
  stored = json.loads((tmp_path / "config.json").read_text())
  assert stored["toy"]["scale"] == 0.5  # the default the entry declared, recorded


def test_plan_fills_defaults_and_names_unknown_keys():
  c = tiny_config()
  resolved = plan(c).config
  assert resolved.pd.alpha == 0.5 and resolved.pkt.hidden_factor == 100.0
  assert resolved.pkt.current_layer_multiplier == 3.0 and "alpha" not in resolved.pkt
  c.pd.temprature = 2.0
  with pytest.raises(PlanError, match=r"config\.pd: unknown key\(s\) \['temprature'\]"):
    plan(c)
  c = tiny_config()
  c.pd.strategy = "pdd"
  with pytest.raises(PlanError, match="config.pd.strategy: unknown strategy 'pdd'"):
    plan(c)


def test_overriding_the_hidden_size_moves_the_widths_tied_to_it():
  from mobilebert_jax.stages.planner import model_config
  bert = model_config(default_config.model_block("bert_base", hidden_size=384), "config.teacher")
  assert (bert.hidden_size, bert.intra_size, bert.embedding_size) == (384, 384, 384)
  mobile = model_config(default_config.model_block("mobilebert", hidden_size=256), "x")
  assert (mobile.intra_size, mobile.embedding_size) == (128, 128)  # a bottleneck's own widths
  with pytest.raises(PlanError, match=r"config.student.preset: unknown model preset 'bert'"):
    model_config(default_config.model_block("bert"), "config.student")


def test_a_batch_that_does_not_split_over_the_devices_fails_in_plan():
  c = tiny_config()
  c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  c.data.batch_size = 12
  with pytest.raises(PlanError, match=r"config.data.batch_size=12 does not split over .* 8 "
                                      r"devices .*use a multiple of 8"):
    plan(c)


def test_a_teacher_checkpoint_of_another_size_names_the_overrides(tmp_path):
  c = tiny_config("pd", steps=(4,))
  teacher = get_preset("ib_bert_large", tiny_variant=True, vocab_size=c.student.vocab_size)
  save_pretrained(str(tmp_path / "t"), teacher, init_params(
      build_model(teacher, "pretraining"), teacher, jax.random.PRNGKey(0)), "pretraining")
  c.teacher_checkpoint = str(tmp_path / "t")
  with pytest.raises(PlanError) as e:
    plan(c)
  message = str(e.value)
  fixes = re.search(r"; pass (.*), or --config.check_teacher_config=False", message)
  assert fixes, message
  for fix in fixes.group(1).split():  # each named override is the checkpoint's value
    key, value = re.fullmatch(r"--config\.teacher\.(\w+)=(\S+)", fix).groups()
    assert str(getattr(teacher, key)) == value
    c.teacher[key] = type(getattr(teacher, key))(value)
  assert plan(c).model_configs["teacher"] == teacher  # the overrides fix it
  c = tiny_config("pd", steps=(4,))
  c.teacher_checkpoint = str(tmp_path / "t")
  c.check_teacher_config = False
  assert plan(c).model_configs["teacher"] == teacher


@pytest.mark.parametrize("name", ["glue.py", "tinybert_task_distill.py", "kdlsq.py",
                                  "tinybert_general_distill.py"])
def test_teacher_overrides_work_in_every_config_with_a_teacher(name, monkeypatch):
  from absl import flags
  from ml_collections import config_flags
  values = flags.FlagValues()
  path = str(ROOT / "configs" / name)
  config_flags.DEFINE_config_file("config", path, flag_values=values, lock_config=True)
  argv = ["prog", f"--config={path}", "--config.check_teacher_config=False",
          "--config.teacher.hidden_size=384", "--config.student.num_layers=3",
          "--config.quantization.ptq_eval=True"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
  values(argv)
  config = values.config
  assert (config.check_teacher_config, config.teacher.hidden_size) == (False, 384)
  assert stages.model_config(config.student, "config.student").num_layers == 3


def test_an_unknown_override_key_is_one_line():
  out = subprocess.run(
      [sys.executable, "-m", "mobilebert_jax.main", "--print_config", "--config.nonexistent=1"],
      capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 2
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "--config.nonexistent" in lines[0], out.stderr


def test_stage_length_from_epochs_and_warmup_fraction():
  _, stage = resolve_stage("finetune", ml_collections.ConfigDict(dict(
      strategy="finetune", optimizer=default_config.optimizer(1e-3, 7))))
  assert (stage.num_epochs, stage.warmup_fraction, stage.num_steps) == (3.0, 0.1, 0)
  assert stage_length(stage, batches_per_epoch=17) == 51
  stage.num_epochs = 0.5
  assert stage_length(stage, batches_per_epoch=17) == 9
  assert optimizer_config(stage, 51).warmup_steps == 5
  stage.num_steps = 40  # an explicit length overrides the epochs
  assert stage_length(stage, batches_per_epoch=17) == 40
  stage.warmup_fraction = 0.0  # no fraction: the optimizer's own warm-up
  assert optimizer_config(stage, 40).warmup_steps == 7


def glue_run_config(tmp_path, **finetune):
  write_sst2(tmp_path / "glue" / "SST-2", np.random.default_rng(0), vocab_words())
  c = default_config.get_config()
  c.stages = "finetune"
  c.task = "sst2"
  c.data_dir = str(tmp_path / "glue")
  c.data.update(dict(max_seq_length=32, batch_size=32))
  c.mesh.update(dict(data=1, fsdp=1, tensor=1))
  c.log_every_steps = 4
  c.checkpoint.async_save = False
  opt = default_config.optimizer(learning_rate=1e-3, warmup_steps=0)
  opt.optimizer = "adamw"
  c.finetune = dict(strategy="finetune", optimizer=opt, **finetune)
  return c


def test_finetuning_runs_for_its_epochs(tmp_path):
  c = glue_run_config(tmp_path, num_epochs=2.0, warmup_fraction=0.25)  # 256 examples / 32
  Trainer(c, str(tmp_path / "run")).run()
  rows = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["stage"] == "finetune"
          and "loss" in m]
  assert [m["step"] for m in rows] == [4, 8, 12, 16]
  # Warm-up over the first 4 of 16 steps (the rate logged at step s is the one step s used,
  # 1e-3 x (s - 1) / 4 while warming up), then linear decay.
  lr = {m["step"]: m["learning_rate"] for m in rows}
  assert lr[4] == pytest.approx(0.75e-3, rel=1e-5) and lr[12] < lr[8] < 1e-3
  assert "dev_accuracy" in json.loads((tmp_path / "run" / "eval_results.json").read_text())


def test_a_rerun_with_another_config_is_refused_with_the_changed_keys(tmp_path):
  c = tiny_config("teacher_pretrain", steps=(2,))
  workdir = str(tmp_path / "run")
  Trainer(c, workdir).run()
  stored = (tmp_path / "run" / "config.json").read_text()
  changed = tiny_config("teacher_pretrain", steps=(2,))
  changed.teacher_pretrain.optimizer.learning_rate = 5e-3
  changed.log_every_steps = 7  # operational: not a change of what was trained
  with pytest.raises(ConfigChangedError, match=r"teacher_pretrain\.optimizer\.learning_rate: "
                                               r"0\.01 -> 0\.005.*allow_config_change=True"):
    Trainer(changed, workdir).run()
  assert (tmp_path / "run" / "config.json").read_text() == stored  # nothing rewritten
  # The same config (a plain resume) goes on; an explicit allowance records the new config.
  Trainer(tiny_config("teacher_pretrain", steps=(2,)), workdir).run()
  changed.allow_config_change = True
  Trainer(changed, workdir).run()
  now = json.loads((tmp_path / "run" / "config.json").read_text())
  assert now["teacher_pretrain"]["optimizer"]["learning_rate"] == 5e-3
  assert json.loads((tmp_path / "run" / "config.0.json").read_text()) == json.loads(stored)


def test_layers_under_scan_train_like_the_layer_loop(tmp_path):
  runs = {}
  for scan in (False, True):
    c = tiny_config("teacher_pretrain", steps=(4,))
    c.teacher.scan_layers = scan
    Trainer(c, str(tmp_path / str(scan))).run()
    runs[scan] = [m["loss"] for m in read_metrics(tmp_path / str(scan) / "metrics.jsonl")]
  np.testing.assert_allclose(runs[True], runs[False], rtol=2e-5)
  # The saved teacher is canonical (per-layer) whichever way it ran, with equal weights.
  from mobilebert_jax.pretrained import read_checkpoint
  _, _, loop = read_checkpoint(str(tmp_path / "False" / "teacher"))
  config, _, scanned = read_checkpoint(str(tmp_path / "True" / "teacher"))
  assert config.scan_layers and "layer_0" in scanned["backbone"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), scanned, loop)
  c = tiny_config()
  c.student.scan_layers = True
  with pytest.raises(PlanError, match=r"config.pkt: strategy 'pkt' .*student.scan_layers=False"):
    plan(c)
