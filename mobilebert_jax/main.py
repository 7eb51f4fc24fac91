"""Entry point: `python -m mobilebert_jax.main --config=configs/X.py --workdir=DIR`.

Any config value can be overridden (`--config.pd.num_steps=100`); `--print_config` prints the
resolved config and exits. Without --config the embedded default (configs/demo.py: a tiny
teacher-to-student run on the shipped corpus) runs.
Multi-host: on Cloud TPU pods `jax.distributed.initialize()` finds its peers; elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I.

Exit status: 0 the run is done (the closing summary is printed); 75 (EX_TEMPFAIL) a SIGTERM or
SIGINT stopped it after saving a checkpoint (the line printed names the stage and step), so
rerunning the same command resumes: restart on 75; 1 an error (one line for a workdir in use,
a checkpoint that cannot be saved or restored; a traceback otherwise); 2 a bad config or flag.
"""

import logging
import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mobilebert_jax import default_config

FLAGS = flags.FLAGS
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


def report_bad_flags(error: Exception, argv: list[str]) -> None:
  """Prints one line naming the `--config.<key>` override at fault (an unknown key or a value of
  the wrong type) instead of a traceback, and exits with status 2."""
  message = str(error).strip()
  overrides = [a.split("=", 1)[0].lstrip("-") for a in argv[1:] if a.startswith("--config.")]
  found = re.search(r"'([A-Za-z_][\w]*)", message)
  if isinstance(error, (AttributeError, KeyError)) and found:
    name = found.group(1)
    culprit = next((o for o in overrides if f".{name}." in o + "."), None)
    hint = re.search(r'Did you mean "(\w+)"', message)
    if culprit:
      message = (f"unknown config key --{culprit}: the config has no key {name!r}"
                 + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
                 + "; --print_config lists every key")
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


try:  # with the default config, config_flags applies sys.argv's overrides right here
  config_flags.DEFINE_config_file("config", default_config.__file__,
                                  "Training configuration file.", lock_config=True)
except (AttributeError, KeyError, TypeError, ValueError) as error:
  report_bad_flags(error, sys.argv)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a bad `--config.<key>` override is reported in one line."""
  try:
    remaining = FLAGS(argv)
    FLAGS.config  # config_flags applies the overrides on first access: fail here, not later
    return remaining
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    report_bad_flags(e, argv)


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
  from mobilebert_jax.stages import ConfigChangedError, PlanError, Trainer
  from mobilebert_jax.training.checkpointing import CheckpointDamagedError, CheckpointSaveError
  from mobilebert_jax.training.core import EXIT_STOPPED
  from mobilebert_jax.training.metrics import closing_summary
  from mobilebert_jax.training.operations import WorkdirLockedError, workdir_lock
  if jax.process_index() != 0:
    logging.getLogger("mobilebert_jax").setLevel(logging.WARNING)
  try:
    with workdir_lock(FLAGS.workdir):  # before the data is prepared into the workdir
      trainer = Trainer(FLAGS.config, FLAGS.workdir)
      outputs = trainer.run()
  except (PlanError, ConfigChangedError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (WorkdirLockedError, CheckpointDamagedError, CheckpointSaveError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if trainer.stopped:  # not the summary: the models in the workdir may be an earlier stage's
    print(trainer.stop.report())  # on every process: each worker's log says where it stopped
    sys.exit(EXIT_STOPPED)
  if jax.process_index() == 0:
    print(closing_summary(FLAGS.workdir, outputs))


def run() -> None:
  """The `mobilebert-jax` console script."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
