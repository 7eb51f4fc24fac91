"""A 2-process run over loopback (2 x 4 CPU devices) equals a 1-process run on 8 devices, both
reading the same corpus prepared into several shards (the 2-process run through grain workers)."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from mobilebert_jax import load_pretrained
from mobilebert_jax.data import CorpusSource, PrepareOptions, prepare_corpus, sample_text_path
from mobilebert_jax.training.metrics import read_metrics

ARGS = [
    "--config.stages=teacher_pretrain,pd", "--config.teacher_pretrain.num_steps=4",
    "--config.pd.num_steps=4", "--config.teacher_pretrain.optimizer.warmup_steps=1",
    "--config.pd.optimizer.warmup_steps=1", "--config.data.max_seq_length=32",
    "--config.data.batch_size=8", "--config.log_every_steps=1",
    "--config.checkpoint.save_every_steps=2", "--config.checkpoint.async_save=False",
]


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


def test_two_processes_equal_one_process(tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  corpus = prepare_corpus(CorpusSource(input_files=str(sample_text_path())), "",
                          str(tmp_path / "prepared"),
                          PrepareOptions(max_seq_length=32, dupe_factor=2, shard_size_mb=0.015,
                                         num_workers=0))
  assert len(corpus.shards) == 3
  data = f"--config.data.prepared_dir={corpus.directory}"
  subprocess.run(_main(single, data), env=_env(8), check=True, timeout=600, capture_output=True)
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(_main(multi, data, "--config.data.num_workers=1",
                                  f"--coordinator_address={address}",
                                  "--num_processes=2", f"--process_id={i}"),
                            env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]

  a = read_metrics(os.path.join(single, "metrics.jsonl"))
  b = read_metrics(os.path.join(multi, "metrics.jsonl"))  # written by process 0 only
  assert [(m["stage"], m["step"]) for m in a] == [(m["stage"], m["step"]) for m in b]
  assert len(b) == 8
  np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b], rtol=1e-5)
  pa = load_pretrained(os.path.join(single, "student"))[1]
  pb = load_pretrained(os.path.join(multi, "student"))[1]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), pa, pb)
