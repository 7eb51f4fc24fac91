"""MetricsWriter sinks (jsonl, TensorBoard, console, config.json), Throughput and read_metrics."""

import dataclasses
import json
import logging
import math
import struct
import sys
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mobilebert_jax.training import metrics
from mobilebert_jax.training.metrics import (MetricsWriter, Throughput, closing_summary,
                                             format_line, read_metrics)


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
  # Without eta_seconds from Throughput, the ETA is the steps left over steps/s: 380 / 12.3.
  assert caplog.messages == [
      "[distill] step 120/500 (24%) | loss 3.21 | mlm 2.9 | lr 1.2e-03 | 12.3 steps/s | "
      "4.1k tok/s | eta 31s"]
  record = read_metrics(str(tmp_path))[0]
  assert "total_steps" not in record
  assert record["eta_seconds"] == pytest.approx(380 / 12.3)
  assert format_line(7, {"loss": 1.0}, "s") == "[s] step 7 | loss 1"


def test_progress_and_eta_text():
  assert format_line(120, {"loss": 1.0, "eta_seconds": 80.0}, "s", 400) == (
      "[s] step 120/400 (30%) | loss 1 | eta 1m20s")
  assert format_line(399, {"eta_seconds": 0.4}, "s", 400) == "[s] step 399/400 (99%) | eta 0s"
  assert format_line(400, {"eta_seconds": 0.0}, "s", 400) == "[s] step 400/400 (100%)"
  assert format_line(5, {"eta_seconds": float("nan")}, "s") == "[s] step 5"
  etas = {45.2: "45s", 60: "1m00s", 3725: "1h02m", 2 * 86400 + 4 * 3600 + 60: "2d04h"}
  for seconds, text in etas.items():
    assert format_line(1, {"eta_seconds": seconds}, "s").endswith(f"| eta {text}"), seconds


def test_throughput_eta_leaves_out_the_compile_interval(monkeypatch):
  """ETA = steps left x an EMA of the seconds per step, without the first (compiling) interval
  after construction or reset unless it is the only one."""
  clock = [0.0]
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
  meter = Throughput(start_step=0, total_steps=400)

  def at(t, step):
    clock[0] = t
    return meter.update(step, tokens_per_step=100)

  first = at(30.0, 10)  # 3 s/step: compilation; the only interval so far
  assert first["steps_per_sec"] == pytest.approx(10 / 30)
  assert first["tokens_per_sec"] == pytest.approx(1000 / 30)
  assert first["eta_seconds"] == pytest.approx(390 * 3.0)
  assert at(31.0, 20)["eta_seconds"] == pytest.approx(380 * 0.1)  # compile interval dropped
  assert at(33.0, 30)["eta_seconds"] == pytest.approx(370 * 0.15)  # EMA of 0.1 and 0.2 s/step
  meter.reset(30)  # e.g. after an evaluation: the next interval is left out again
  clock[0] = 100.0
  assert at(102.0, 40)["eta_seconds"] == pytest.approx(360 * 0.15)
  assert at(103.0, 50)["eta_seconds"] == pytest.approx(350 * 0.125)
  assert at(104.0, 400)["eta_seconds"] == 0.0
  assert at(105.0, 400) == {"steps_per_sec": 0.0, "tokens_per_sec": 0.0}

  unknown = Throughput(start_step=0)
  clock[0] = 110.0
  assert "eta_seconds" not in unknown.update(10, tokens_per_step=1)
  clock[0] = 111.0
  assert unknown.update(20, tokens_per_step=1, total_steps=30)["eta_seconds"] == (
      pytest.approx(10 * 0.1))


def test_throughput_eta_reaches_the_console_line(tmp_path, caplog, monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
  meter = Throughput(start_step=0, total_steps=400)
  writer = MetricsWriter(str(tmp_path), tensorboard=False)
  with caplog.at_level(logging.INFO, logger="mobilebert_jax"):
    for step, t in ((40, 60.0), (80, 64.0), (120, 68.0)):  # 1.5 s/step compiling, then 0.1
      clock[0] = t
      writer.write(step, {"loss": 1.0, **meter.update(step, 128), "total_steps": 400},
                   stage="pd")
  writer.close()
  assert caplog.messages[-1] == (
      "[pd] step 120/400 (30%) | loss 1 | 10 steps/s | 1.28k tok/s | eta 28s")
  assert [r["eta_seconds"] for r in read_metrics(str(tmp_path))] == pytest.approx(
      [360 * 1.5, 320 * 0.1, 280 * 0.1])


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


def _tb_summaries(directory):
  """(tag, summary value) of every summary in the event files directly in `directory`."""
  from tensorboardX.proto import event_pb2
  values = []
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      values += [(v.tag, v) for v in event.summary.value]
  return values


def test_write_config_adds_text_and_hparams_to_tensorboard(tmp_path):
  pytest.importorskip("tensorboardX")
  from tensorboardX.proto import plugin_hparams_pb2
  config = ml_collections.ConfigDict({
      "stages": "pkt,pd", "seed": 0, "pd": {"num_steps": 400, "learning_rate": 1e-3,
                                            "fused": True, "sizes": [1, 2], "note": "a|b"},
      "teacher_checkpoint": None})
  writer = MetricsWriter(str(tmp_path))
  writer.write_config(config)
  writer.close()
  assert json.loads((tmp_path / "config.json").read_text()) == config.to_dict()

  summaries = dict(_tb_summaries(tmp_path / "tensorboard"))
  text = next(v for tag, v in summaries.items() if tag.startswith("config"))
  table = text.tensor.string_val[0].decode()
  assert table.splitlines() == [
      "| key | value |", "|---|---|", '| pd.fused | true |', '| pd.learning_rate | 0.001 |',
      '| pd.note | "a\\|b" |', '| pd.num_steps | 400 |', '| pd.sizes | [1, 2] |',
      '| seed | 0 |', '| stages | "pkt,pd" |', '| teacher_checkpoint | null |']

  start = summaries["_hparams_/session_start_info"]
  assert start.metadata.plugin_data.plugin_name == "hparams"
  hparams = plugin_hparams_pb2.HParamsPluginData.FromString(
      start.metadata.plugin_data.content).session_start_info.hparams
  assert hparams["pd.num_steps"].number_value == 400
  assert hparams["pd.learning_rate"].number_value == pytest.approx(1e-3)
  assert hparams["pd.fused"].bool_value is True
  assert hparams["stages"].string_value == "pkt,pd"
  assert hparams["pd.sizes"].string_value == "[1, 2]"
  assert "teacher_checkpoint" not in hparams


def test_without_tensorboardx_only_jsonl_is_written(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # the import raises ImportError
  with caplog.at_level(logging.WARNING, logger="mobilebert_jax"):
    with MetricsWriter(str(tmp_path)) as writer:
      writer.write_config({"a": 1})
      writer.write(1, {"loss": 1.0}, stage="s")
  assert read_metrics(str(tmp_path)) == [{"step": 1, "stage": "s", "loss": 1.0}]
  assert (tmp_path / "config.json").exists() and not (tmp_path / "tensorboard").exists()
  assert sum("tensorboardX is not installed" in m for m in caplog.messages) == 1


def test_closing_summary_lists_results_files_and_outputs(tmp_path):
  workdir = tmp_path / "run"
  with MetricsWriter(str(workdir)) as writer:
    writer.write(1, {"loss": 1.0}, stage="finetune")
  scores = {f"dev_m{i}": 0.5 + i / 100 for i in range(7)}
  (workdir / "eval_results.json").write_text(json.dumps({**scores, "task": "sst2"}))
  outputs = {"student": str(workdir / "student"),
             "architectures": str(workdir / "architectures.json")}
  lines = closing_summary(str(workdir), outputs).splitlines()
  tb = workdir / "tensorboard"
  assert lines == [
      f"run finished: {workdir}",
      f"  eval results:           {workdir}/eval_results.json  (dev_m0 0.5, dev_m1 0.51, "
      "dev_m2 0.52, dev_m3 0.53, dev_m4 0.54, dev_m5 0.55, +2 more)",
      f"  metrics:                {workdir}/metrics.jsonl",
      f"  tensorboard:            {tb}  (tensorboard --logdir={tb})",
      f"  student model:          {workdir}/student  "
      f"(mobilebert_jax.load_pretrained('{workdir}/student'))",
      f"  searched architectures: {workdir}/architectures.json  (each entry's checkpoint "
      "loads with mobilebert_jax.load_pretrained)"]

  # Missing files are left out; a path with a space is quoted in the command.
  empty = tmp_path / "a run"
  assert closing_summary(str(empty), {}) == f"run finished: {empty}"
  (empty / "tensorboard").mkdir(parents=True)
  assert f"--logdir='{empty}/tensorboard'" in closing_summary(str(empty), {})


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
