"""Entry point: `python -m mobilebert_jax.main --config=configs/X.py --workdir=DIR`.

Any config value can be overridden (`--config.pd.num_steps=100`); `--print_config` prints the
resolved config and exits. Without --config the embedded default (configs/demo.py: a tiny
teacher-to-student run on the shipped corpus) runs.
Multi-host: on Cloud TPU pods `jax.distributed.initialize()` finds its peers; elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I.
"""

import logging
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mobilebert_jax import default_config

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", default_config.__file__, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdir/demo", "Directory for checkpoints, metrics and models.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")
flags.DEFINE_bool("print_config", False, "Print the resolved config (file + overrides) and exit "
                  "without training.")


def initialize_distributed() -> None:
  """Joins a multi-process run: explicit flags, or automatic discovery on TPU pods."""
  import jax
  if FLAGS.coordinator_address:
    if FLAGS.num_processes is None or FLAGS.process_id is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    # Only affects the CPU backend: lets CPU processes exchange data (e.g. over loopback).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif on_cloud_tpu():
    jax.distributed.initialize()  # finds the other workers through the TPU VM metadata


def on_cloud_tpu() -> bool:
  """Whether this process runs on a Cloud TPU VM (or a TPU pod on GKE)."""
  env = ("TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "TPU_ACCELERATOR_TYPE", "TPU_NAME")
  return any(os.environ.get(name) for name in env) or os.path.exists("/dev/accel0") or \
      os.path.exists("/dev/vfio/0")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.print_config:
    print(FLAGS.config)
    return
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  # Orbax and absl log every checkpoint step at INFO; keep the console to this project's lines.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("mobilebert_jax").setLevel(logging.INFO)
  initialize_distributed()
  import jax
  from mobilebert_jax.training.trainer import train_and_evaluate
  if jax.process_index() != 0:
    logging.getLogger("mobilebert_jax").setLevel(logging.WARNING)
  outputs = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    for role, path in outputs.items():
      if role == "architectures":
        print(f"searched architectures: {path}  (each entry's checkpoint loads with "
              "mobilebert_jax.load_pretrained)")
      else:
        print(f"{role} model: {path}  (mobilebert_jax.load_pretrained({path!r}))")


if __name__ == "__main__":
  app.run(main)
