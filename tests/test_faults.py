"""Faults a restart loop must survive, each injected: a damaged newest checkpoint, two runs on one
workdir, a stop signal (exit status 75), a failed background save, a stop at a stage boundary;
and the persistent compilation cache a restarted run compiles from."""

import errno
import glob
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mobilebert_jax.stages import Trainer
from mobilebert_jax.training import operations
from mobilebert_jax.training.checkpointing import (CheckpointDamagedError, CheckpointSaveError,
                                                   Checkpointer)
from mobilebert_jax.training.core import EXIT_STOPPED
from mobilebert_jax.training.metrics import read_metrics
from mobilebert_jax.training.operations import WorkdirLock, WorkdirLockedError

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import tiny_config  # noqa: E402


def _config(stages, steps):
  c = tiny_config(stages, steps=steps)
  c.data.prepare_workers = 0  # no worker processes to start for the small corpus
  return c


def _state(seed):
  return {"a": jnp.arange(1000.0) + seed, "b": {"c": jnp.full((30, 40), float(seed))}}


def _abstract(tree):
  sharding = NamedSharding(Mesh(np.asarray(jax.devices()[:1]), ("d",)), P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _two_steps(directory):
  ckpt = Checkpointer(directory, save_every_steps=1, async_save=True)
  for step in (1, 2):
    ckpt.save(step, _state(step), {"step": step})
  ckpt.close()


def _largest_data_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
             key=os.path.getsize)


def _truncate(step_dir):
  with open(_largest_data_file(step_dir), "r+b") as f:
    f.truncate(100)


def _garble(step_dir):  # same size, other bytes: only reading it finds out
  with open(_largest_data_file(step_dir), "r+b") as f:
    f.write(b"\0" * 64)


DAMAGE = {
    "truncated data file": (_truncate, r"file state/ocdbt\.process_0/d/\w+ has 100 bytes but "
                                       r"\d+ were saved"),
    "missing data file": (lambda d: os.remove(_largest_data_file(d)),
                          r"file state/ocdbt\.process_0/d/\w+ is missing"),
    "garbled data file": (_garble, r"reading it failed: .*ZSTD"),
    "missing _METADATA": (lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
                          r"file state/_METADATA is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_step_is_moved_aside_and_the_older_one_restored(damage, tmp_path,
                                                                         caplog):
  directory = str(tmp_path / "ckpt")
  _two_steps(directory)
  inflict, message = DAMAGE[damage]
  inflict(os.path.join(directory, "2"))
  ckpt = Checkpointer(directory, save_every_steps=1, async_save=False)
  with caplog.at_level(logging.WARNING, logger="mobilebert_jax"):
    state, extra = ckpt.restore(_abstract(_state(0)))
  assert extra == {"step": 1}
  np.testing.assert_array_equal(state["a"], _state(1)["a"])
  warnings = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("checkpoint ") and " is damaged " in r.getMessage()]
  assert len(warnings) == 1
  assert f"checkpoint {directory}/2 is damaged" in warnings[0]
  assert f"moved it aside to {directory}/2.damaged; resuming from step 1" in warnings[0]
  assert re.search(message, warnings[0]), warnings[0]
  assert sorted(os.listdir(directory)) == ["1", "2.damaged"]  # kept, not deleted
  assert ckpt.latest_step() == 1
  ckpt.save(2, _state(5), {"step": 2})  # the run goes on and saves that step again
  assert ckpt.restore(_abstract(_state(0)))[1] == {"step": 2}
  ckpt.close()


def test_no_intact_step_is_one_error_naming_the_directory_and_moves_nothing(tmp_path):
  directory = str(tmp_path / "ckpt")
  _two_steps(directory)
  os.remove(os.path.join(directory, "2", "state", "_METADATA"))
  _truncate(os.path.join(directory, "1"))
  ckpt = Checkpointer(directory, save_every_steps=1, async_save=False)
  with pytest.raises(CheckpointDamagedError,
                     match=rf"no intact checkpoint to restore in {directory} \(step 2: file "
                           r"state/_METADATA is missing; step 1: file .* has 100 bytes"):
    ckpt.restore(_abstract(_state(0)))
  with pytest.raises(CheckpointDamagedError, match=rf"step 2 in {directory} is damaged: file "
                                                   r"state/_METADATA is missing"):
    ckpt.restore(_abstract(_state(0)), step=2)
  assert sorted(os.listdir(directory)) == ["1", "2"]
  ckpt.close()


def test_a_state_of_another_model_is_a_mismatch_not_damage(tmp_path):
  directory = str(tmp_path / "ckpt")
  _two_steps(directory)
  ckpt = Checkpointer(directory, save_every_steps=1, async_save=False)
  other = {"a": jnp.zeros(7), "b": {"c": jnp.zeros((30, 40))}}
  with pytest.raises(ValueError, match=r"leaf a has shape \(1000,\) .* expects \(7,\)"):
    ckpt.restore(_abstract(other))
  assert sorted(os.listdir(directory)) == ["1", "2"]
  ckpt.close()


def _fail_saves_of(monkeypatch, step):
  """Makes the commit of checkpoint `step` fail as on a full disk."""
  original = ocp.JsonCheckpointHandler.async_save

  async def async_save(self, directory, *args, **kwargs):
    futures = await original(self, directory, *args, **kwargs)
    if f"/{step}.orbax-checkpoint-tmp" not in os.fspath(directory):
      return futures

    class Full:
      def result(self, timeout=None):
        raise OSError(errno.ENOSPC, "No space left on device", os.fspath(directory))
    return [Full()]

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", async_save)


def test_a_failed_synchronous_save_names_the_step_directory_and_error(tmp_path, monkeypatch):
  directory = str(tmp_path / "ckpt")
  _fail_saves_of(monkeypatch, 2)
  ckpt = Checkpointer(directory, save_every_steps=1, async_save=False)
  ckpt.save(1, _state(1), {})
  with pytest.raises(CheckpointSaveError,
                     match=rf"saving checkpoint step 2 to {directory} failed: .*No space left on "
                           r"device.*step 1 is the last good checkpoint"):
    ckpt.save(2, _state(2), {})
  ckpt.close()
  assert Checkpointer(directory, save_every_steps=1).all_steps() == [1]


def test_a_failed_background_save_stops_the_run_before_the_next_save(tmp_path, monkeypatch):
  c = _config("teacher_pretrain", steps=(30,))
  c.checkpoint.async_save = True
  c.checkpoint.save_every_steps = 8
  _fail_saves_of(monkeypatch, 16)
  workdir = str(tmp_path)
  directory = os.path.join(workdir, "teacher_pretrain", "checkpoints")
  with pytest.raises(CheckpointSaveError,
                     match=rf"step 16 to {directory} failed: .*No space left on device.*step 8 "
                           "is the last good checkpoint"):
    Trainer(c, workdir).run()
  last = max(m["step"] for m in read_metrics(os.path.join(workdir, "metrics.jsonl")))
  assert 16 <= last < 24, last  # not one save interval late
  assert Checkpointer(directory, save_every_steps=1).all_steps() == [8]
  assert not os.path.exists(os.path.join(workdir, operations.LOCK_FILE))


def test_a_rerun_resumes_from_the_intact_step_and_loads_its_compiled_step_from_the_cache(
    tmp_path, caplog):
  c = _config("teacher_pretrain", steps=(8,))
  workdir = str(tmp_path)
  Trainer(c, workdir).run()
  cache = os.path.join(workdir, operations.COMPILATION_CACHE_DIR)  # the default place
  entries = sorted(os.listdir(cache))
  assert any("train_step" in name for name in entries), entries
  stage = os.path.join(workdir, "teacher_pretrain")
  os.rename(os.path.join(stage, "final"), str(tmp_path / "final.kept"))  # died before `final`
  os.remove(os.path.join(stage, "checkpoints", "8", "state", "_METADATA"))
  events = []
  listener = lambda event, **kwargs: events.append(event)
  jax.monitoring.register_event_listener(listener)
  try:
    with caplog.at_level(logging.INFO, logger="mobilebert_jax"):
      Trainer(c, workdir).run()
  finally:
    jax.monitoring.unregister_event_listener(listener)
  assert "checkpoints/8 is damaged (file state/_METADATA is missing)" in caplog.text
  assert "resumed from step 4" in caplog.text
  assert os.path.isdir(os.path.join(stage, "checkpoints", "8.damaged"))
  assert os.path.isdir(os.path.join(stage, "final"))
  # Every program the rerun compiled came from the cache: nothing compiled anew.
  assert events.count("/jax/compilation_cache/cache_hits") >= 1, events
  assert events.count("/jax/compilation_cache/cache_misses") == 0, events
  assert sorted(os.listdir(cache)) == entries
  assert operations.use_compilation_cache("none", workdir) is None
  assert jax.config.jax_compilation_cache_dir is None


def test_a_second_run_on_the_workdir_is_refused_naming_the_holder(tmp_path):
  workdir = str(tmp_path)
  with WorkdirLock(workdir) as held:
    record = json.loads(open(held.path).read())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["started"]
    with pytest.raises(WorkdirLockedError,
                       match=rf"workdir {workdir} is in use by host {socket.gethostname()} pid "
                             rf"{os.getpid()} since .*lock file {held.path}"):
      WorkdirLock(workdir).acquire()
    with pytest.raises(WorkdirLockedError):
      Trainer(_config("teacher_pretrain", steps=(2,)), workdir).run()
  assert not os.path.exists(held.path)  # released
  assert not os.path.exists(os.path.join(workdir, "config.json"))  # the refused run wrote nothing
  WorkdirLock(workdir).acquire().release()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
  workdir = str(tmp_path)
  dead = subprocess.Popen(["true"])
  dead.wait()
  path = os.path.join(workdir, operations.LOCK_FILE)
  here = dict(host=socket.gethostname(), pid=dead.pid, started="2020-01-01T00:00:00+00:00",
              boot_id=operations._boot_id(), heartbeat=time.time())
  with open(path, "w") as f:
    json.dump(here, f)
  with caplog.at_level(logging.WARNING, logger="mobilebert_jax"):
    lock = WorkdirLock(workdir).acquire()
  assert f"taking over the stale lock {path}" in caplog.text
  assert f"process {dead.pid} is gone" in caplog.text
  lock.release()
  # Another host: held while its heartbeat is fresh, stale once it is old.
  elsewhere = dict(here, host="other-host", pid=1)
  with open(path, "w") as f:
    json.dump(elsewhere, f)
  with pytest.raises(WorkdirLockedError, match="host other-host pid 1"):
    WorkdirLock(workdir).acquire()
  with open(path, "w") as f:
    json.dump(dict(elsewhere, heartbeat=time.time() - 3600), f)
  with caplog.at_level(logging.WARNING, logger="mobilebert_jax"):
    WorkdirLock(workdir).acquire().release()
  assert "no heartbeat for 3600 s" in caplog.text


def test_a_stop_pending_at_a_stage_boundary_builds_and_compiles_nothing(tmp_path, monkeypatch):
  trainer = Trainer(_config("teacher_pretrain,pd", steps=(2, 2)), str(tmp_path))
  built = []
  monkeypatch.setattr(trainer, "build_stage", lambda planned, stage: built.append(planned))
  check_workdir = trainer.check_workdir

  def check_then_signal():  # SIGTERM just before the first stage
    check_workdir()
    os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(trainer, "check_workdir", check_then_signal)
  assert trainer.run() == {}
  assert trainer.stopped and built == []
  assert trainer.stop.report() == (
      "stopped by signal 15 before stage 'teacher_pretrain' (the stages before it are "
      f"finished): rerun the same command to resume (exit status {EXIT_STOPPED})")
  assert not os.path.exists(os.path.join(tmp_path, "teacher_pretrain"))


MAIN_ARGS = [
    "--config.stages=teacher_pretrain", "--config.teacher_pretrain.num_steps=100000",
    "--config.teacher_pretrain.optimizer.warmup_steps=1", "--config.data.max_seq_length=32",
    "--config.data.max_predictions_per_seq=5", "--config.data.batch_size=8",
    "--config.data.dupe_factor=1", "--config.log_every_steps=1",
    "--config.checkpoint.save_every_steps=1000", "--config.checkpoint.async_save=False",
    "--config.data.prepare_workers=0",
]


def _main(workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.Popen([sys.executable, "-m", "mobilebert_jax.main", f"--workdir={workdir}",
                           *MAIN_ARGS], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _wait_for_step(workdir, step, proc, timeout=240):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    try:
      if any(m["step"] >= step for m in read_metrics(path)):
        return
    except (OSError, ValueError, KeyError):  # not there yet, or a line being written
      pass
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f"no step {step} in {path}: {proc.communicate()[1][-3000:]}")


def test_sigterm_exits_75_naming_the_checkpoint_and_a_second_run_is_refused(tmp_path):
  workdir = str(tmp_path)
  first = _main(workdir)
  _wait_for_step(workdir, 3, first)
  second = _main(workdir)  # while the first one trains
  out, err = second.communicate(timeout=240)
  assert second.returncode == 1, err[-3000:]
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, err[-3000:]
  assert lines[0].startswith(f"error: workdir {workdir} is in use by host "
                             f"{socket.gethostname()} pid {first.pid} since "), lines[0]

  first.send_signal(signal.SIGTERM)
  out, err = first.communicate(timeout=240)
  assert first.returncode == EXIT_STOPPED, err[-3000:]
  step = max(m["step"] for m in read_metrics(os.path.join(workdir, "metrics.jsonl")))
  checkpoint = os.path.join(workdir, "teacher_pretrain", "checkpoints", str(step))
  assert out.strip().splitlines()[-1] == (
      f"stopped by signal 15 in stage 'teacher_pretrain' at step {step}, saved in {checkpoint}: "
      f"rerun the same command to resume (exit status {EXIT_STOPPED})")
  assert "model" not in out  # no closing summary of models the workdir does not hold yet
  assert os.path.exists(os.path.join(checkpoint, "files.json"))
  assert not os.path.exists(os.path.join(workdir, operations.LOCK_FILE))


def test_several_processes_agree_through_the_preemption_service_not_a_collective(monkeypatch):
  from mobilebert_jax.training import core
  calls = []
  monkeypatch.setattr(core.jax, "process_count", lambda: 2)
  monkeypatch.setattr(core.multihost_utils, "reached_preemption_sync_point",
                      lambda step: calls.append(step) or step == 3)
  monkeypatch.setattr(core.multihost_utils, "process_allgather", None)  # must not be called
  forwarded = []
  monkeypatch.setattr(core.os, "kill", lambda pid, sig: forwarded.append(sig))
  stop = core.StopRequest()
  before = signal.getsignal(signal.SIGTERM)
  with stop.installed():
    assert signal.getsignal(signal.SIGTERM) is before  # left to jax's preemption service
    assert signal.getsignal(signal.SIGINT) is stop
    stop(signal.SIGINT, None)
    assert forwarded == [signal.SIGTERM]  # Ctrl-C on one process stops them all
    assert [stop.agreed() for _ in range(4)] == [False, False, True, True]
  assert calls == [0, 1, 2, 3]  # one call per check, the same count on every process


def test_each_start_records_the_installed_versions_and_a_change_is_named(tmp_path, caplog):
  """environment.json holds one entry per start (versions, backend, devices); a restart on
  other versions than the previous start's says which changed."""
  assert operations.record_environment(str(tmp_path)) == []
  path = tmp_path / operations.ENVIRONMENT_FILE
  entries = json.loads(path.read_text())
  assert entries[0]["packages"]["jax"] == jax.__version__ and entries[0]["devices"] >= 1
  entries[0]["packages"]["jax"] = "0.0.1"
  path.write_text(json.dumps(entries))
  with caplog.at_level(logging.WARNING, logger="mobilebert_jax"):
    changes = operations.record_environment(str(tmp_path))
  assert changes == [f"jax: 0.0.1 -> {jax.__version__}"]
  assert "previous run used other versions (jax: 0.0.1" in caplog.text
  assert len(json.loads(path.read_text())) == 2
