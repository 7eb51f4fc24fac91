"""A 2-process run over loopback (2 x 4 CPU devices) equals, bit for bit, a 1-process run on 8
devices through teacher pretraining, PKT and PD, both reading the same corpus prepared into
several shards (the 2-process run through grain workers).

Both runs use gloo for the CPU collectives (the 1-process one joins a 1-process `jax.distributed`
run). A lone process otherwise uses XLA:CPU's in-process all-reduce, which sums the devices'
partial gradients in another order: the same program on the same data then differs in the last
bits, and PKT amplifies that. Measured on the demo config, relative loss difference to the
in-process 1-process run at PKT steps 20 / 50 / 60-200 (median): 2 processes 2e-7 / 3e-5 / 2e-2;
1 process in-process with the PKT initial params moved 1 ulp 8e-8 / 9e-6 / 2e-2; 1 process with
gloo bit-identical to 2 processes (teacher pretraining stays within 1.6e-7 over its 400 steps).
So no tolerance derived from rounding holds for PKT, while with the reduction order fixed the
layouts agree exactly: any difference here is a layout bug (data, rng, placement), not rounding.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from mobilebert_jax import load_pretrained
from mobilebert_jax.data import CorpusSource, PrepareOptions, prepare_corpus, sample_text_path
from mobilebert_jax.training.metrics import read_metrics

# Steps per stage: a checkpoint every 2 steps; PKT's 2 steps are its two phases (one per layer).
STEPS = {"teacher_pretrain": 4, "pkt": 2, "pd": 2}
ARGS = [
    f"--config.stages={','.join(STEPS)}", "--config.data.max_seq_length=32",
    "--config.data.batch_size=8", "--config.log_every_steps=1",
    "--config.checkpoint.save_every_steps=2", "--config.checkpoint.async_save=False",
    "--config.teacher_pretrain.optimizer.warmup_steps=1", "--config.pd.optimizer.warmup_steps=1",
] + [f"--config.{stage}.num_steps={n}" for stage, n in STEPS.items()]
# What the loop measures in wall-clock time beside each step's values (rates, ETA, time shares).
MEASURED = re.compile(r"per_sec|eta_seconds|^time_|flops|^mfu$")


def _env(devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _main(workdir, *extra):
  return [sys.executable, "-m", "mobilebert_jax.main", f"--workdir={workdir}", *ARGS, *extra]


def _joined(address, num_processes, process_id):
  """The flags of process `process_id` of a `jax.distributed` run (gloo CPU collectives)."""
  return [f"--coordinator_address={address}", f"--num_processes={num_processes}",
          f"--process_id={process_id}"]


def _values(metrics):
  return [{k: v for k, v in m.items() if not MEASURED.search(k)} for m in metrics]


def _assert_same_params(a, b):
  pa, pb = load_pretrained(a)[1], load_pretrained(b)[1]
  jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_two_processes_equal_one_process(tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  corpus = prepare_corpus(CorpusSource(input_files=str(sample_text_path())), "",
                          str(tmp_path / "prepared"),
                          PrepareOptions(max_seq_length=32, dupe_factor=2, shard_size_mb=0.015,
                                         num_workers=0))
  assert len(corpus.shards) == 3
  data = f"--config.data.prepared_dir={corpus.directory}"
  subprocess.run(_main(single, data, *_joined(f"127.0.0.1:{_free_port()}", 1, 0)),
                 env=_env(8), check=True, timeout=600, capture_output=True)
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(_main(multi, data, "--config.data.num_workers=1",
                                  *_joined(address, 2, i)),
                            env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]

  a = read_metrics(os.path.join(single, "metrics.jsonl"))
  b = read_metrics(os.path.join(multi, "metrics.jsonl"))  # written by process 0 only
  assert [(m["stage"], m["step"]) for m in b] == [
      (stage, i) for stage, n in STEPS.items() for i in range(1, n + 1)]
  assert _values(a) == _values(b)
  for role in ("teacher", "student"):
    _assert_same_params(os.path.join(single, role), os.path.join(multi, role))


def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path):
  """SIGTERM to process 1 alone: jax's preemption service agrees a step, both processes save
  that step's checkpoint together and exit 75 naming it."""
  workdir = str(tmp_path / "run")
  address = f"127.0.0.1:{_free_port()}"
  args = ["--config.stages=teacher_pretrain", "--config.teacher_pretrain.num_steps=1000"]
  procs = [subprocess.Popen(_main(workdir, *args, *_joined(address, 2, i)), env=_env(4),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.monotonic() + 400
  while not (os.path.exists(metrics) and len(read_metrics(metrics)) >= 2):
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.5)
  procs[1].send_signal(signal.SIGTERM)
  logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
  assert [p.returncode for p in procs] == [75, 75], logs[0][-2000:] + logs[1][-2000:]
  steps = [re.findall(r"stopped by .* at step (\d+), saved in", log) for log in logs]
  assert steps[0] and steps[0] == steps[1], logs
  step = int(steps[0][0])
  assert 2 <= step < 1000
  assert os.path.isdir(os.path.join(workdir, "teacher_pretrain", "checkpoints", str(step)))
