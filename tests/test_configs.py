"""Every shipped config loads through the CLI flag machinery and validates before any compute."""

import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from mobilebert_jax.stages import model_config, registry, stage_names

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
EXPECTED = {
    "demo.py": ("teacher_pretrain,pkt,pd", "ib_bert_large", "mobilebert"),
    "ib_bert_large_pretrain.py": ("teacher_pretrain", "ib_bert_large", "mobilebert"),
    "mobilebert_distill.py": ("pkt,pd", "ib_bert_large", "mobilebert"),
    "mobilebert_tiny_distill.py": ("pkt,pd", "ib_bert_large", "mobilebert_tiny"),
    "tinybert_general_distill.py": ("general", "bert_base", "tinybert_4l"),
    "glue.py": ("finetune", "ib_bert_large", "mobilebert"),
    "squad.py": ("squad", "ib_bert_large", "mobilebert"),
    "tinybert_task_distill.py": ("intermediate,prediction", "bert_base", "tinybert_4l"),
    "kdlsq.py": ("quantize", "mobilebert", "mobilebert"),
    "nas_bert.py": ("teacher_pretrain,nas", "ib_bert_large", "bert_base"),
    "etd_distill.py": ("general", "bert_base", "bert_base"),
    "layer_mapping_search.py": ("general", "bert_base", "tinybert_4l"),
    "tagging.py": ("tagging", "ib_bert_large", "mobilebert"),
    "cvt.py": ("cvt,bert_tagging", "ib_bert_large", "bert_base"),
}


def load(name):
  values = flags.FlagValues()
  path = os.path.join(CONFIG_DIR, name)
  config_flags.DEFINE_config_file("config", path, flag_values=values)
  values(["prog", f"--config={path}"])
  return values.config


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_validates(name):
  stages, teacher, student = EXPECTED[name]
  config = load(name)
  assert ",".join(stage_names(config)) == stages
  assert config.teacher.preset == teacher and config.student.preset == student
  model_config(config.teacher, "config.teacher")
  model_config(config.student, "config.student")
  for stage in stages.split(","):
    registry.get(config[stage].strategy, stage)


def test_full_size_nas_config_validates():
  from mobilebert_jax.search import nas
  values = flags.FlagValues()
  path = os.path.join(CONFIG_DIR, "nas_bert.py")
  config_flags.DEFINE_config_file("config", path, flag_values=values)
  values(["prog", f"--config={path}:full"])
  config = values.config
  assert stage_names(config) == ["nas"]
  space = nas.check_stage("nas", config.nas, model_config(config.teacher, "config.teacher"),
                          model_config(config.student, "config.student"))
  assert (space.num_layers, space.num_blocks, space.hidden_sizes) == (24, 4, (128, 192, 256, 384,
                                                                              512))


def test_reference_distillation_hyper_parameters():
  config = load("mobilebert_distill.py")
  assert config.pkt.optimizer.learning_rate == 1.5e-3
  assert config.pkt.optimizer.warmup_steps == 0 and config.pkt.optimizer.schedule == "constant"
  assert config.pd.optimizer.warmup_steps == 10_000
  assert config.pkt.optimizer.optimizer == "lamb"
  assert (config.data.batch_size, config.data.max_seq_length) == (2048, 512)
  assert config.data.max_predictions_per_seq == 20
  assert (config.pkt.num_steps, config.pd.num_steps) == (240_000, 500_000)
  assert (config.pkt.hidden_factor, config.pkt.beta_factor, config.pkt.gamma_factor) == (
      100.0, 5000.0, 5.0)
  assert (config.pd.alpha, config.pd.temperature) == (0.5, 1.0)



DATA_CONFIGS = ("demo.py", "ib_bert_large_pretrain.py", "mobilebert_distill.py",
                "mobilebert_tiny_distill.py", "tinybert_general_distill.py", "nas_bert.py",
                "etd_distill.py", "layer_mapping_search.py")


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_data_sources_override_from_the_command_line(name, monkeypatch):
  values = flags.FlagValues()
  path = os.path.join(CONFIG_DIR, name)
  config_flags.DEFINE_config_file("config", path, flag_values=values, lock_config=True)
  argv = ["prog", f"--config={path}", "--config.data.input_files=a.txt,b/*.txt",
          "--config.data.prepared_dir=gs://bucket/prepared", "--config.data.num_workers=2",
          "--config.data.tfds_name=wiki", "--config.data.require_prepared=False"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
  values(argv)
  data = values.config.data
  assert (data.input_files, data.prepared_dir, data.num_workers, data.tfds_name) == (
      "a.txt,b/*.txt", "gs://bucket/prepared", 2, "wiki")
  full_size = name not in ("demo.py", "layer_mapping_search.py", "nas_bert.py")  # nas: tiny
  assert load(name).data.require_prepared == full_size


def test_print_config_shows_the_resolved_config_and_trains_nothing(tmp_path):
  import subprocess
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-m", "mobilebert_jax.main", "--print_config", f"--workdir={workdir}",
       "--config.pd.num_steps=7", "--config.data.input_files=corpus.txt"],
      capture_output=True, text=True, timeout=120, check=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout
  assert "stages: teacher_pretrain,pkt,pd" in out and "input_files: corpus.txt" in out
  pd_block = out[out.index("\npd:"):]
  assert "num_steps: 7" in pd_block[:pd_block.index("\npkt:")]
  assert not workdir.exists()
