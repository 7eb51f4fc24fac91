"""launch/: shell syntax, shellcheck, DRY_RUN output of the TPU and GPU launchers, and the TPU
worker script's start/stop/logs against a stub interpreter. Offline: gcloud is never run (a fake
`gcloud` first on PATH fails the test if anything calls it) and no metadata server is asked."""

import os
import pathlib
import shlex
import shutil
import signal
import stat
import subprocess
import time

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
TPU_VM = LAUNCH / "tpu_vm.sh"
TPU_WORKER = LAUNCH / "tpu_worker.sh"
GPU = LAUNCH / "gpu_multinode.sh"
SCRIPTS = [TPU_VM, TPU_WORKER, GPU, LAUNCH / "slurm_example.sbatch"]
BASH = shutil.which("bash") or "/bin/bash"


def _write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


@pytest.fixture
def fake_bin(tmp_path):
  """A bin dir first on PATH whose `gcloud` records the call and fails."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  marker = tmp_path / "gcloud_was_called"
  _write_exe(bin_dir / "gcloud", f"#!/bin/sh\necho \"$@\" >> {shlex.quote(str(marker))}\nexit 99\n")
  yield bin_dir
  assert not marker.exists(), f"gcloud was run: {marker.read_text()}"


def _run(script, args, *, env=None, path=None, timeout=60):
  full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
              "LC_ALL": "C"}
  if path is not None:
    full_env["PATH"] = path
  full_env.update(env or {})
  return subprocess.run([BASH, str(script), *args], env=full_env, capture_output=True, text=True,
                        timeout=timeout, check=False)


def _tpu(args, fake_bin, **env):
  return _run(TPU_VM, args, env={"DRY_RUN": "1", **env},
              path=f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}")


def _lines(result):
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def _option(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


# ----------------------------------------------------------------------------------- static


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  result = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed")
  result = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", [TPU_VM, TPU_WORKER, GPU], ids=lambda p: p.name)
def test_executable_with_strict_mode(script):
  assert os.access(script, os.X_OK)
  assert "set -euo pipefail" in script.read_text()


# ------------------------------------------------------------------------------ tpu_vm.sh

MAIN_ARGS = ["--config=configs/mobilebert_distill.py", "--workdir=gs://bucket/runs/a",
             "--config.data.text_paths=/data/my corpus.txt", "--config.note=it's $HOME; rm -rf /",
             "--config.pd.num_steps=100"]


def test_run_prints_ssh_to_all_workers_with_quoted_args(fake_bin):
  result = _tpu(["run", "my-pod", "--zone", "us-central2-b", "--", *MAIN_ARGS], fake_bin)
  (argv,) = _lines(result)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
  assert "--worker=all" in argv
  assert _option(argv, "--zone") == "us-central2-b"
  remote = _option(argv, "--command")
  assert remote.startswith("cd ~/mobilebert_jax && ")
  words = shlex.split(remote)
  assert words[words.index("--") + 1:] == MAIN_ARGS
  assert "launch/tpu_worker.sh" in words and "start" in words


def test_run_remote_command_survives_a_real_shell(fake_bin, tmp_path):
  """The --command string, run by bash on a 'worker', hands the worker script exactly MAIN_ARGS."""
  (argv,) = _lines(_tpu(["run", "my-pod", "--zone=z", "--detach", "--", *MAIN_ARGS], fake_bin))
  home = tmp_path / "home"
  (home / "mobilebert_jax" / "launch").mkdir(parents=True)
  received = tmp_path / "received"
  (home / "mobilebert_jax" / "launch" / "tpu_worker.sh").write_text(
      f"printf '%s\\0' \"$@\" > {shlex.quote(str(received))}\n")
  result = subprocess.run([BASH, "-c", _option(argv, "--command")], env={"HOME": str(home),
                          "PATH": os.environ["PATH"]}, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  args = received.read_text().split("\0")[:-1]
  assert args == ["start", "--prefix", "--detach", "--", *MAIN_ARGS]


def test_run_without_main_args_separator_fails(fake_bin):
  result = _tpu(["run", "my-pod", "--zone", "z", "--config=x"], fake_bin)
  assert result.returncode != 0
  assert result.stdout == ""


def test_create_prints_accelerator_type_and_zone(fake_bin):
  (argv,) = _lines(_tpu(["create", "my-pod", "--zone", "us-central2-b", "--accelerator-type",
                         "v4-32", "--version", "tpu-ubuntu2204-base", "--project", "proj",
                         "--spot"], fake_bin))
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-pod"]
  assert _option(argv, "--accelerator-type") == "v4-32"
  assert _option(argv, "--zone") == "us-central2-b"
  assert _option(argv, "--version") == "tpu-ubuntu2204-base"
  assert _option(argv, "--project") == "proj"
  assert "--spot" in argv and "--preemptible" not in argv


def test_create_defaults_and_checks(fake_bin):
  (argv,) = _lines(_tpu(["create", "p", "--accelerator-type=v4-8", "--preemptible"], fake_bin))
  assert _option(argv, "--version") == "tpu-ubuntu2204-base"
  assert "--preemptible" in argv
  assert not any(a.startswith("--zone") for a in argv)
  assert _tpu(["create", "p", "--zone", "z"], fake_bin).returncode != 0  # no accelerator type
  assert _tpu(["create", "p", "--accelerator-type=v4-8", "--spot", "--preemptible"],
              fake_bin).returncode != 0


@pytest.mark.parametrize("args", [["frobnicate", "my-pod"], ["run"], ["create", "--zone", "z"],
                                  ["stop"], [], ["logs", "a", "b"], ["run", "p", "--spot", "--"]],
                         ids=["unknown-subcommand", "run-no-name", "create-no-name", "stop-no-name",
                              "nothing", "extra-positional", "option-not-for-subcommand"])
def test_bad_invocations_exit_nonzero_with_usage_on_stderr(fake_bin, args):
  result = _tpu(args, fake_bin)
  assert result.returncode != 0
  assert "Usage: launch/tpu_vm.sh" in result.stderr
  assert result.stdout == ""


def test_help_goes_to_stdout_and_mentions_gs_workdirs(fake_bin):
  result = _tpu(["--help"], fake_bin)
  assert result.returncode == 0
  assert "Usage: launch/tpu_vm.sh" in result.stdout and "gs://" in result.stdout


def test_stop_logs_status_delete(fake_bin):
  (stop,) = _lines(_tpu(["stop", "p", "--zone", "z", "--timeout", "30"], fake_bin))
  assert stop[4] == "ssh" and "--worker=all" in stop
  assert "tpu_worker.sh stop --timeout 30" in _option(stop, "--command")

  (logs,) = _lines(_tpu(["logs", "p", "--zone", "z"], fake_bin))
  assert "--worker=0" in logs and "tpu_worker.sh logs --lines 100" in _option(logs, "--command")
  (logs_all,) = _lines(_tpu(["logs", "p", "--worker", "all", "--no-follow", "--lines=5"], fake_bin))
  assert "--worker=all" in logs_all
  assert "logs --lines 5 --no-follow --prefix" in _option(logs_all, "--command")
  assert _tpu(["logs", "p", "--worker", "first"], fake_bin).returncode != 0

  describe, ssh = _lines(_tpu(["status", "p", "--zone", "z"], fake_bin))
  assert describe[4:6] == ["describe", "p"] and "--worker=all" in ssh

  (delete,) = _lines(_tpu(["delete", "p", "--zone", "z", "--yes"], fake_bin))
  assert delete[4:6] == ["delete", "p"] and "--quiet" in delete
  (delete,) = _lines(_tpu(["delete", "p", "--zone", "z"], fake_bin))
  assert "--quiet" not in delete


def test_install_copies_this_checkout_to_all_workers(fake_bin):
  tar, scp, ssh = _lines(_tpu(["install", "p", "--zone", "z"], fake_bin))
  assert tar[0] == "tar" and str(LAUNCH.parent) in tar and "--exclude=./.git" in tar
  assert scp[4] == "scp" and "--worker=all" in scp and scp[6] == "p:mobilebert_jax_src.tar.gz"
  assert ssh[4] == "ssh" and "--worker=all" in ssh
  remote = _option(ssh, "--command")
  assert "tar -xzf ~/mobilebert_jax_src.tar.gz" in remote
  assert remote.endswith("bash launch/tpu_worker.sh setup")


def test_install_extras(fake_bin):
  *_, ssh = _lines(_tpu(["install", "p", "--extras", "tfds"], fake_bin))
  assert _option(ssh, "--command").endswith("MBJ_EXTRAS=tfds bash launch/tpu_worker.sh setup")
  assert _tpu(["install", "p", "--extras", "tfds;reboot"], fake_bin).returncode != 0


def test_install_clones_a_git_url_at_a_ref(fake_bin):
  (ssh,) = _lines(_tpu(["install", "p", "--zone", "z", "--repo", "https://example.com/r.git",
                        "--ref", "v1.2"], fake_bin, REMOTE_DIR="code/mbj"))
  remote = _option(ssh, "--command")
  assert "git clone https://example.com/r.git ~/code/mbj" in remote
  assert "git fetch --tags origin v1.2 && git checkout --force --detach FETCH_HEAD" in remote
  assert remote.endswith("bash launch/tpu_worker.sh setup")


def test_ssh_flags_pass_through(fake_bin):
  (argv,) = _lines(_tpu(["stop", "p"], fake_bin, TPU_SSH_FLAGS="--tunnel-through-iap"))
  assert "--tunnel-through-iap" in argv


# ------------------------------------------------------------------------ gpu_multinode.sh

SLURM_ENV = {"SLURM_NODEID": "3", "SLURM_NNODES": "4", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "777",
             "SLURM_JOB_NODELIST": "gpu[001-004]"}


def _gpu(args, tmp_path, path=None, **env):
  empty = tmp_path / "empty_bin"
  empty.mkdir(exist_ok=True)
  # PATH holds nothing by default: no scontrol, and the script needs no external command.
  return _run(GPU, args, env={"DRY_RUN": "1", **env}, path=str(path or empty))


def test_gpu_slurm_without_scontrol(tmp_path):
  result = _gpu(["--config=configs/demo.py", "--workdir=/shared/my run"], tmp_path, **SLURM_ENV)
  (argv,) = _lines(result)
  assert argv[:3] == ["python", "-m", "mobilebert_jax.main"]
  assert "--process_id=3" in argv and "--num_processes=4" in argv
  assert _option(argv, "--coordinator_address") == "gpu001:20777"
  assert argv[-2:] == ["--config=configs/demo.py", "--workdir=/shared/my run"]


def test_gpu_slurm_with_scontrol(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_exe(bin_dir / "scontrol", "#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
  (argv,) = _lines(_gpu([], tmp_path, path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                        **SLURM_ENV, COORDINATOR_PORT="9999"))
  assert _option(argv, "--coordinator_address") == "node-a:9999"


def test_gpu_slurm_coordinator_override(tmp_path):
  (argv,) = _lines(_gpu([], tmp_path, **SLURM_ENV, SLURM_COORDINATOR="node01-ib"))
  assert _option(argv, "--coordinator_address") == "node01-ib:20777"
  (argv,) = _lines(_gpu([], tmp_path, **SLURM_ENV, SLURM_COORDINATOR="10.1.2.3:4444"))
  assert _option(argv, "--coordinator_address") == "10.1.2.3:4444"


@pytest.mark.parametrize("nodelist,first", [
    ("gpu[001-004,007],cpu5", "gpu001"), ("a,b", "a"), ("rack[1-2]-n[08-09]", "rack1-n08"),
    ("n7", "n7"), ("x-[3-5]-ib,y", "x-3-ib"), ("node[12,3-4]", "node12")])
def test_gpu_nodelist_parser(tmp_path, nodelist, first):
  env = dict(SLURM_ENV, SLURM_JOB_NODELIST=nodelist, COORDINATOR_PORT="1")
  (argv,) = _lines(_gpu([], tmp_path, **env))
  assert _option(argv, "--coordinator_address") == f"{first}:1"


def test_gpu_plain_env_wins_over_slurm(tmp_path):
  (argv,) = _lines(_gpu(["--workdir=w"], tmp_path, **SLURM_ENV, COORDINATOR_ADDRESS="10.0.0.1:1234",
                        NUM_PROCESSES="2", PROCESS_ID="1"))
  assert argv[3:] == ["--coordinator_address=10.0.0.1:1234", "--num_processes=2", "--process_id=1",
                      "--workdir=w"]


def test_gpu_single_process_and_explicit_flags(tmp_path):
  (argv,) = _lines(_gpu(["--workdir=w"], tmp_path))
  assert argv == ["python", "-m", "mobilebert_jax.main", "--workdir=w"]
  explicit = ["--coordinator_address=h:1", "--num_processes=2", "--process_id=0"]
  (argv,) = _lines(_gpu(explicit, tmp_path, **SLURM_ENV))
  assert argv[3:] == explicit
  (argv,) = _lines(_gpu([], tmp_path, PYTHON="/opt/venv/bin/python"))
  assert argv[0] == "/opt/venv/bin/python"


@pytest.mark.parametrize("env", [
    {"NUM_PROCESSES": "2"},
    {"COORDINATOR_ADDRESS": "nohostport", "NUM_PROCESSES": "2", "PROCESS_ID": "0"},
    dict(SLURM_ENV, SLURM_NTASKS="32"),
    dict(SLURM_ENV, SLURM_NODEID="4"),
    {"SLURM_NODEID": "0", "SLURM_NNODES": "2"},
], ids=["partial-env", "no-port", "tasks-per-gpu", "id-out-of-range", "no-nodelist"])
def test_gpu_bad_environments_fail(tmp_path, env):
  result = _gpu([], tmp_path, **env)
  assert result.returncode != 0 and result.stdout == ""
  assert "gpu_multinode.sh:" in result.stderr


def test_gpu_execs_python_with_the_flags(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_exe(bin_dir / "fakepython", "#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
  result = _run(GPU, ["--workdir=a b"], env={**SLURM_ENV, "PYTHON": str(bin_dir / "fakepython")},
                path=os.environ["PATH"])
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == ["-m", "mobilebert_jax.main",
                                        "--coordinator_address=gpu001:20777", "--num_processes=4",
                                        "--process_id=3", "--workdir=a b"]


# -------------------------------------------------------------------------- tpu_worker.sh

STUB = """#!/bin/bash
trap 'echo "stub: got SIGTERM, saving"; exit 0' TERM
if [ -n "${STUB_IGNORE_TERM:-}" ]; then trap 'echo "stub: ignoring SIGTERM"' TERM; fi
printf 'arg=%s\\n' "$@"
echo "stub: ready"
if [ -n "${STUB_EXIT:-}" ]; then exit "$STUB_EXIT"; fi
while :; do sleep 0.05; done
"""


@pytest.fixture
def worker_env(tmp_path):
  if shutil.which("setsid") is None or not os.path.isdir("/proc/self"):
    pytest.skip("needs Linux (setsid, /proc)")
  stub = _write_exe(tmp_path / "stubpython", STUB)
  env = {"MBJ_PYTHON": str(stub), "MBJ_LOG_DIR": str(tmp_path / "logs"), "HOME": str(tmp_path),
         "MBJ_WORKER_ID": "1", "MBJ_WORKER_ENDPOINTS": "10.0.0.5,10.0.0.6,10.0.0.7,10.0.0.8"}
  yield env
  pid_file = tmp_path / "logs" / "train.pid"
  if pid_file.exists():  # never leave a stub behind
    try:
      os.kill(int(pid_file.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


def _log(env):
  (log,) = pathlib.Path(env["MBJ_LOG_DIR"]).glob("train-*.log")
  return log.read_text()


def _wait_for(predicate, timeout=10.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.05)
  return False


def test_worker_start_detached_status_stop(worker_env):
  result = _run(TPU_WORKER, ["start", "--detach", "--", "--workdir=gs://b/r", "--config.x=a b"],
                env=worker_env)
  assert result.returncode == 0, result.stderr
  pid = int((pathlib.Path(worker_env["MBJ_LOG_DIR"]) / "train.pid").read_text())
  assert _wait_for(lambda: "stub: ready" in _log(worker_env))
  log = _log(worker_env)
  args = [line[4:] for line in log.splitlines() if line.startswith("arg=")]
  assert args == ["-m", "mobilebert_jax.main", "--coordinator_address=10.0.0.5:8476",
                  "--num_processes=4", "--process_id=1", "--workdir=gs://b/r", "--config.x=a b"]
  assert log.startswith("=== ")  # header line naming the command

  status = _run(TPU_WORKER, ["status"], env=worker_env)
  assert f"running pid {pid}" in status.stdout
  again = _run(TPU_WORKER, ["start", "--detach", "--", "--workdir=w"], env=worker_env)
  assert again.returncode != 0 and "already running" in again.stderr

  stop = _run(TPU_WORKER, ["stop", "--timeout", "20"], env=worker_env)
  assert stop.returncode == 0, stop.stderr
  assert "exited" in stop.stdout
  assert "stub: got SIGTERM" in _log(worker_env)
  assert _wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                   open(f"/proc/{pid}/stat").read().split()[2] == "Z")
  assert "not running" in _run(TPU_WORKER, ["status"], env=worker_env).stdout
  assert "no trainer running" in _run(TPU_WORKER, ["stop"], env=worker_env).stdout


def test_worker_start_follows_log_and_returns_exit_status(worker_env):
  env = dict(worker_env, STUB_EXIT="3", MBJ_WORKER_ENDPOINTS="10.0.0.5")  # single host: no flags
  result = _run(TPU_WORKER, ["start", "--prefix", "--", "--workdir=w"], env=env)
  assert result.returncode == 3
  host = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
  assert f"[{host}] stub: ready" in result.stdout
  assert f"[{host}] arg=--workdir=w" in result.stdout
  assert "coordinator_address" not in result.stdout
  assert "exited with status 3" in result.stdout
  # A second run appends to the same per-worker log; `logs` shows its tail.
  result = _run(TPU_WORKER, ["start", "--", "--workdir=second"], env=env)
  assert result.returncode == 3 and "arg=--workdir=w\n" not in result.stdout
  logs = _run(TPU_WORKER, ["logs", "--no-follow", "--lines", "3"], env=env)
  assert logs.returncode == 0 and "arg=--workdir=second" in logs.stdout
  assert _log(env).count("=== ") == 2


def test_worker_stop_escalates_to_sigkill(worker_env):
  env = dict(worker_env, STUB_IGNORE_TERM="1")
  assert _run(TPU_WORKER, ["start", "--detach", "--", "--workdir=w"], env=env).returncode == 0
  pid = int((pathlib.Path(env["MBJ_LOG_DIR"]) / "train.pid").read_text())
  assert _wait_for(lambda: "stub: ready" in _log(env))
  stop = _run(TPU_WORKER, ["stop", "--timeout=1"], env=env)
  assert stop.returncode == 0 and "SIGKILL" in stop.stdout
  assert _wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                   open(f"/proc/{pid}/stat").read().split()[2] == "Z")


def test_worker_setup_installs_into_the_virtualenv(tmp_path):
  venv_bin = tmp_path / "venv" / "bin"
  venv_bin.mkdir(parents=True)
  calls = tmp_path / "calls"
  _write_exe(venv_bin / "python", f"#!/bin/sh\necho \"$*\" >> {shlex.quote(str(calls))}\n"
             "case \"$1\" in -c) echo 'jax 0.0';; esac\n")
  result = _run(TPU_WORKER, ["setup"], env={"MBJ_VENV": str(tmp_path / "venv"),
                                            "MBJ_BASE_PYTHON": "/nonexistent", "MBJ_EXTRAS": "tfds"})
  assert result.returncode == 0, result.stderr
  lines = calls.read_text().splitlines()
  assert lines[0] == "-m pip install -q -U pip"
  assert lines[1] == f"-m pip install -q -e {LAUNCH.parent}[tfds] jax[tpu] gcsfs"
  assert "installed jax 0.0" in result.stdout


def test_worker_rejects_bad_arguments(worker_env):
  for args in (["start", "--workdir=w"], ["stop", "--timeout", "soon"], ["bogus"], []):
    result = _run(TPU_WORKER, args, env=worker_env)
    assert result.returncode != 0, args
