"""MetricsWriter sinks (jsonl, TensorBoard, console, config.json), Throughput and read_metrics."""

import dataclasses
import json
import logging
import math
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mobilebert_jax.training.metrics import MetricsWriter, Throughput, format_line, read_metrics


def test_jsonl_round_trip_converts_numpy_and_jax_scalars(tmp_path):
  writer = MetricsWriter(str(tmp_path), tensorboard=False)
  writer.write(1, {"loss": jnp.float32(3.5), "acc": np.float64(0.25), "tokens": np.int32(7)},
               stage="distill")
  writer.write(2, {"loss": 3.0, "lr": jnp.asarray(1e-3)}, stage="distill")
  writer.write(1, {"f1": 0.9}, stage="squad")
  writer.close()
  records = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert records == [
      {"step": 1, "stage": "distill", "loss": 3.5, "acc": 0.25, "tokens": 7},
      {"step": 2, "stage": "distill", "loss": 3.0, "lr": pytest.approx(1e-3)},
      {"step": 1, "stage": "squad", "f1": pytest.approx(0.9)},
  ]
  assert read_metrics(str(tmp_path)) == records  # a workdir resolves to its metrics.jsonl


def test_non_finite_values_are_written_as_null(tmp_path):
  with MetricsWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(3, {"loss": float("nan"), "grad_norm": np.inf, "ok": 1.5}, stage="s")
    writer.write(4, {"loss": 2.0}, stage="s")
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 2
  first = json.loads(lines[0])  # strict JSON: no NaN/Infinity tokens
  assert "NaN" not in lines[0] and "Infinity" not in lines[0]
  assert first == {"step": 3, "stage": "s", "loss": None, "grad_norm": None, "ok": 1.5}
  assert json.loads(lines[1])["loss"] == 2.0


def test_disabled_writer_creates_nothing(tmp_path):
  workdir = tmp_path / "workdir"
  writer = MetricsWriter(str(workdir), enabled=False)
  writer.write(1, {"loss": 1.0}, stage="distill")
  writer.write_config({"a": 1})
  writer.flush()
  writer.close()
  assert not workdir.exists()


def test_tensorboard_event_files_per_stage(tmp_path):
  writer = MetricsWriter(str(tmp_path))
  writer.write(1, {"loss": 1.0}, stage="distill")
  writer.write(1, {"f1": 0.5}, stage="glue")
  writer.flush()
  writer.close()
  for stage in ("distill", "glue"):
    events = list((tmp_path / "tensorboard" / stage).glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_console_line_and_total_steps(tmp_path, caplog):
  writer = MetricsWriter(str(tmp_path), tensorboard=False)
  with caplog.at_level(logging.INFO, logger="mobilebert_jax"):
    writer.write(120, {"loss": 3.21, "mlm": 2.9, "lr": 1.2e-3, "steps_per_sec": 12.3,
                       "tokens_per_sec": 4100.0, "total_steps": 500}, stage="distill")
  writer.close()
  assert caplog.messages == [
      "[distill] step 120/500 | loss 3.21 | mlm 2.9 | lr 1.2e-03 | 12.3 steps/s | 4.1k tok/s"]
  assert "total_steps" not in read_metrics(str(tmp_path))[0]
  assert format_line(7, {"loss": 1.0}, "s") == "[s] step 7 | loss 1"


def test_bad_values_and_reserved_names_raise(tmp_path):
  writer = MetricsWriter(str(tmp_path), tensorboard=False)
  with pytest.raises(TypeError, match="metric 'logits' must be a real scalar"):
    writer.write(1, {"logits": np.ones(3)}, stage="s")
  with pytest.raises(ValueError, match=r"\['step'\] are reserved"):
    writer.write(1, {"step": 1.0}, stage="s")
  writer.close()


def test_write_config_from_config_dict_dict_and_dataclass(tmp_path):
  config = ml_collections.ConfigDict({"model": {"preset": "tiny"}, "lr": 1e-3})
  MetricsWriter(str(tmp_path / "a")).write_config(config)
  assert json.loads((tmp_path / "a" / "config.json").read_text()) == config.to_dict()
  assert (tmp_path / "a" / "config.json").read_text().startswith("{\n  ")

  MetricsWriter(str(tmp_path / "b")).write_config({"batch_size": 8})
  assert json.loads((tmp_path / "b" / "config.json").read_text()) == {"batch_size": 8}

  @dataclasses.dataclass
  class Cfg:
    steps: int = 3
  MetricsWriter(str(tmp_path / "c")).write_config(Cfg())
  assert json.loads((tmp_path / "c" / "config.json").read_text()) == {"steps": 3}


def test_throughput_gives_positive_rates():
  meter = Throughput(start_step=10)
  time.sleep(0.02)
  rates = meter.update(14, tokens_per_step=256)
  assert rates["steps_per_sec"] > 0
  assert math.isclose(rates["tokens_per_sec"], 256 * rates["steps_per_sec"])
  assert rates["steps_per_sec"] < 4 / 0.02 * 1.01  # 4 steps over >= 20 ms
  time.sleep(0.01)
  assert meter.update(16, tokens_per_step=256)["steps_per_sec"] > 0
  assert meter.update(16, tokens_per_step=256) == {"steps_per_sec": 0.0, "tokens_per_sec": 0.0}


def test_read_metrics_reports_bad_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n\nnot json\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:3: invalid JSON"):
    read_metrics(str(path))


def test_remote_workdir_is_mirrored_locally_and_uploaded(tmp_path):
  """An object-store workdir (no appends) gets every sink through a local mirror: uploaded on
  flush/close and periodically, resumed runs append to the remote metrics.jsonl."""
  remote, mirror = tmp_path / "bucket" / "run", tmp_path / "mirror"
  writer = MetricsWriter(str(remote), mirror_dir=str(mirror), sync_every_s=3600)
  writer.write_config({"batch_size": 8})
  assert json.loads((remote / "config.json").read_text()) == {"batch_size": 8}
  writer.write(1, {"loss": 2.0}, stage="pd")
  assert not (remote / "metrics.jsonl").exists()  # not yet synced (sync_every_s)
  writer.flush()
  assert read_metrics(str(remote)) == [{"step": 1, "stage": "pd", "loss": 2.0}]
  writer.write(2, {"loss": 1.5}, stage="pd")
  writer.close()
  assert [r["step"] for r in read_metrics(str(remote))] == [1, 2]
  events = list((remote / "tensorboard" / "pd").iterdir())
  assert events and all(e.stat().st_size > 0 for e in events)

  # A resumed run on another machine (fresh mirror) appends to the remote file.
  again = MetricsWriter(str(remote), mirror_dir=str(tmp_path / "mirror2"), tensorboard=False,
                        sync_every_s=0.0)
  again.write(3, {"loss": 1.0}, stage="pd")  # sync_every_s=0: uploaded at once
  assert [r["step"] for r in read_metrics(str(remote))] == [1, 2, 3]
  again.close()


def test_url_workdirs_get_a_mirror_under_the_cache():
  from mobilebert_jax.training.metrics import default_mirror_dir
  writer = MetricsWriter("gs://bucket/runs/demo", enabled=False)
  assert writer.remote and writer.local_dir == default_mirror_dir("gs://bucket/runs/demo")
  assert writer.local_dir.endswith("/.cache/mobilebert_jax/workdirs/gs/bucket/runs/demo")
  assert not MetricsWriter("/tmp/local", enabled=False).remote
