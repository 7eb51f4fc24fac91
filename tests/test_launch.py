"""launch/: shell syntax, shellcheck, DRY_RUN output of the TPU and GPU launchers, the supervisor's
restart loop against a scripted fake `gcloud`, the constraints files, and the TPU worker script's
start/wait/stop/logs against a stub interpreter. Offline: the real gcloud is never run (a fake
`gcloud` first on PATH fails the test if anything calls it, or plays a scripted cloud) and no
metadata server is asked."""

import os
import pathlib
import re
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
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm_example.sbatch"]
CONSTRAINTS = LAUNCH / "constraints"
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


def test_install_constraints_option(fake_bin):
  *_, ssh = _lines(_tpu(["install", "p", "--constraints", "none"], fake_bin))
  assert _option(ssh, "--command").endswith("MBJ_CONSTRAINTS=none bash launch/tpu_worker.sh setup")
  *_, ssh = _lines(_tpu(["install", "p", "--extras=tfds", "--constraints=my/pins.txt"], fake_bin))
  assert _option(ssh, "--command").endswith(
      "MBJ_EXTRAS=tfds MBJ_CONSTRAINTS=my/pins.txt bash launch/tpu_worker.sh setup")
  assert _tpu(["install", "p", "--constraints", "x;reboot"], fake_bin).returncode != 0


# ------------------------------------------------------------------ queued resources, supervise

def test_create_queued_prints_the_queued_resource_request(fake_bin):
  (argv,) = _lines(_tpu(["create", "pod", "--queued", "--zone", "us-central2-b", "--accelerator-type",
                         "v4-32", "--spot", "--valid-until-duration", "6h"], fake_bin))
  assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod"]
  assert _option(argv, "--node-id") == "pod"
  assert _option(argv, "--accelerator-type") == "v4-32"
  assert _option(argv, "--runtime-version") == "tpu-ubuntu2204-base"
  assert _option(argv, "--valid-until-duration") == "6h"
  assert "--spot" in argv and "--reserved" not in argv
  (argv,) = _lines(_tpu(["create", "pod", "--queued", "--accelerator-type=v5litepod-16",
                         "--version=v2-alpha-tpuv5-lite", "--reserved"], fake_bin))
  assert "--reserved" in argv and _option(argv, "--runtime-version") == "v2-alpha-tpuv5-lite"
  for bad in (["--queued", "--preemptible"], ["--queued", "--spot", "--reserved"], ["--reserved"],
              ["--valid-until-duration=1h"]):
    assert _tpu(["create", "pod", "--accelerator-type=v4-8", *bad], fake_bin).returncode != 0, bad


def test_delete_and_status_queued(fake_bin):
  (argv,) = _lines(_tpu(["delete", "pod", "--queued", "--zone=z", "--yes"], fake_bin))
  assert argv[3:6] == ["queued-resources", "delete", "pod"]
  assert "--force" in argv and "--quiet" in argv
  (argv,) = _lines(_tpu(["delete", "pod", "--queued"], fake_bin))
  assert "--quiet" not in argv
  queued, node, _ = _lines(_tpu(["status", "pod", "--queued"], fake_bin))
  assert queued[3:6] == ["queued-resources", "describe", "pod"] and node[3:5] == ["tpu-vm", "describe"]


def test_supervise_dry_run_prints_one_pass(fake_bin):
  result = _tpu(["supervise", "pod", "--zone", "us-central2-b", "--accelerator-type", "v4-32", "--spot",
                 "--repo", "https://example.com/r.git", "--delete-when-done", "--", *MAIN_ARGS],
                fake_bin)
  lines = _lines(result)
  (create,) = [a for a in lines if a[3:5] == ["queued-resources", "create"]]
  assert create[5] == "pod" and "--spot" in create
  assert _option(create, "--node-id") == "pod"
  assert _option(create, "--zone") == "us-central2-b"
  assert _option(create, "--accelerator-type") == "v4-32"
  commands = [_option(a, "--command") for a in lines if a[4] == "ssh"]
  assert "git clone https://example.com/r.git" in commands[0]  # install
  start = shlex.split(commands[1])
  assert start[start.index("start"):start.index("--") + 1] == ["start", "--prefix", "--detach", "--"]
  assert start[start.index("--") + 1:] == MAIN_ARGS
  assert commands[2:] == ["cd ~/mobilebert_jax && bash launch/tpu_worker.sh wait",
                          "cd ~/mobilebert_jax && bash launch/tpu_worker.sh exit-status"]
  assert lines[-1][3:6] == ["queued-resources", "delete", "pod"]  # --delete-when-done
  assert "the trainer finished (status 0)" in result.stderr
  assert all(line[:2] == "20" and line[10] == "T" for line in result.stderr.splitlines())  # timestamps


@pytest.mark.parametrize("args", [
    ["--preemptible", "--"], ["--spot", "--reserved", "--"], ["--max-restarts=many", "--"],
    ["--poll-interval=1m", "--"], ["--wait-timeout=-1", "--"], ["--extras=a;b", "--"], ["--workdir=w"]],
    ids=["preemptible", "spot-and-reserved", "max-restarts", "poll-interval", "wait-timeout",
         "extras", "no-dashdash"])
def test_supervise_checks_its_options(fake_bin, args):
  result = _tpu(["supervise", "pod", "--accelerator-type=v4-8", *args], fake_bin)
  assert result.returncode == 2 and "Usage: launch/tpu_vm.sh" in result.stderr
  assert result.stdout == ""  # nothing was run


# A scripted cloud for the supervisor. State lives in files under $FAKE_CLOUD: `qr` (the queued
# resource's state; absent: not found), `after_create` (the states it passes through on successive
# describes once created), `node` (overrides the TPU VM's state, READY while the queued resource is
# ACTIVE), `trainer` (what worker 0's exit-status says) and `runs`: one line per `wait` on worker 0,
# EXIT[:QUEUED_STATE[:NODE_STATE]], EXIT a status the trainer ends with or `ssh` for a dropped
# connection. Every call is appended to `calls`.
FAKE_GCLOUD = r"""#!/bin/bash
d=$FAKE_CLOUD
printf '%q ' gcloud "$@" >>"$d/calls"; echo >>"$d/calls"
case "$*" in
  *"queued-resources describe"*)
    if [ -f "$d/queue" ] && read -r first rest <"$d/queue" && [ -n "$first" ]; then
      echo "$first" >"$d/qr"; echo "$rest" >"$d/queue"
    fi
    [ -f "$d/qr" ] || { echo "ERROR: (gcloud) NOT_FOUND: Resource not found" >&2; exit 1; }
    cat "$d/qr" ;;
  *"queued-resources create"*)
    [ ! -f "$d/qr" ] || { echo "ERROR: ALREADY_EXISTS" >&2; exit 1; }
    echo ACCEPTED >"$d/qr"; cp "$d/after_create" "$d/queue"; rm -f "$d/node"; echo none >"$d/trainer" ;;
  *"queued-resources delete"*) rm -f "$d/qr" "$d/queue" "$d/node" ;;
  *"tpu-vm describe"*)
    [ -f "$d/qr" ] || { echo "ERROR: (gcloud) NOT_FOUND" >&2; exit 1; }
    if [ -f "$d/node" ]; then cat "$d/node"
    elif [ "$(cat "$d/qr")" = ACTIVE ]; then echo READY
    else echo PREEMPTED; fi ;;
  *"tpu-vm ssh"*"tpu_worker.sh exit-status"*) cat "$d/trainer" ;;
  *"tpu-vm ssh"*"tpu_worker.sh start"*) echo running >"$d/trainer" ;;
  *"tpu-vm ssh"*"tpu_worker.sh stop"*) ;;
  *"tpu-vm ssh"*"tpu_worker.sh wait"*)
    IFS=: read -r status qr node <"$d/runs"; sed -i 1d "$d/runs"
    [ -z "$qr" ] || echo "$qr" >"$d/qr"
    [ -z "$node" ] || echo "$node" >"$d/node"
    [ "$status" != ssh ] || exit 1
    echo "$status" >"$d/trainer"; echo "trainer exited with status $status"; exit "$status" ;;
  *"tpu-vm ssh"*"tpu_worker.sh setup"*) ;;
  *) echo "fake gcloud: unexpected $*" >&2; exit 98 ;;
esac
"""


def _supervise(tmp_path, runs, *, qr=None, after_create="ACTIVE", trainer="none", args=()):
  """Runs `tpu_vm.sh supervise pod` against the scripted cloud; returns (result, gcloud calls)."""
  cloud = tmp_path / "cloud"
  cloud.mkdir()
  bin_dir = tmp_path / "cloud_bin"
  bin_dir.mkdir()
  _write_exe(bin_dir / "gcloud", FAKE_GCLOUD)
  (cloud / "runs").write_text("".join(f"{r}\n" for r in runs))
  (cloud / "after_create").write_text(after_create + "\n")
  (cloud / "trainer").write_text(trainer + "\n")
  if qr:
    (cloud / "qr").write_text(qr + "\n")
  result = _run(TPU_VM, ["supervise", "pod", "--zone=z", "--accelerator-type=v4-32", "--spot",
                         "--repo=https://example.com/r.git", "--poll-interval=0.01", *args, "--",
                         "--workdir=gs://b/r"],
                env={"FAKE_CLOUD": str(cloud)},
                path=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", timeout=30)
  calls = [shlex.split(line) for line in (cloud / "calls").read_text().splitlines()]
  assert "unexpected" not in result.stderr, result.stderr
  return result, calls


def _count(calls, *words):
  return sum(1 for argv in calls if all(w in " ".join(argv) for w in words))


@pytest.mark.parametrize("first_run", ["75:SUSPENDED", "ssh:SUSPENDED", "1:ACTIVE:PREEMPTED"],
                         ids=["exit-75-suspended", "ssh-drop-suspended", "node-preempted"])
def test_supervise_recreates_a_preempted_slice_and_reruns(tmp_path, first_run):
  result, calls = _supervise(tmp_path, [first_run, "0"], after_create="WAITING_FOR_RESOURCES ACTIVE")
  assert result.returncode == 0, result.stderr
  assert _count(calls, "queued-resources create") == 2
  assert _count(calls, "queued-resources delete") == 1
  assert _count(calls, "tpu_worker.sh setup") == 2  # reinstalled on the new slice
  starts = [argv for argv in calls if "tpu_worker.sh start" in " ".join(argv)]
  assert len(starts) == 2 and starts[0] == starts[1]  # the same command: it resumes
  create_at = [i for i, argv in enumerate(calls) if "queued-resources create" in " ".join(argv)]
  (delete_at,) = [i for i, argv in enumerate(calls) if "queued-resources delete" in " ".join(argv)]
  assert create_at[0] < delete_at < create_at[1]
  assert "the slice was preempted: recreating it; restart 1 of 20" in result.stderr
  assert "queued resource WAITING_FOR_RESOURCES" in result.stderr
  assert "the trainer finished (status 0)" in result.stderr


def test_supervise_reruns_a_stopped_trainer_on_a_healthy_slice(tmp_path):
  """Status 75 while the slice stays ACTIVE/READY (a maintenance restart): stop, rerun, no new slice."""
  result, calls = _supervise(tmp_path, ["75", "ssh", "0"])
  assert result.returncode == 0, result.stderr
  assert _count(calls, "queued-resources create") == 1
  assert _count(calls, "queued-resources delete") == 0
  assert _count(calls, "tpu_worker.sh setup") == 1
  assert _count(calls, "tpu_worker.sh stop") == 1
  assert _count(calls, "tpu_worker.sh start") == 2
  assert _count(calls, "tpu_worker.sh wait") == 3  # the dropped connection is followed again
  assert "following again" in result.stderr


def test_supervise_stops_on_a_trainer_failure(tmp_path):
  result, calls = _supervise(tmp_path, ["3"])
  assert result.returncode == 3
  assert _count(calls, "queued-resources create") == 1
  assert _count(calls, "queued-resources delete") == 0
  assert _count(calls, "tpu_worker.sh start") == 1
  assert "the trainer failed (status 3): not retrying" in result.stderr


def test_supervise_gives_up_after_max_restarts(tmp_path):
  result, calls = _supervise(tmp_path, ["75:SUSPENDED"] * 3, args=["--max-restarts=2"])
  assert result.returncode == 75
  assert _count(calls, "queued-resources create") == 3
  assert _count(calls, "tpu_worker.sh start") == 3
  assert "giving up after 2 restarts" in result.stderr


def test_supervise_wait_timeout_deletes_the_request(tmp_path):
  result, calls = _supervise(tmp_path, [], after_create="WAITING_FOR_RESOURCES",
                             args=["--wait-timeout=0"])
  assert result.returncode == 75
  assert [argv[3:5] for argv in calls] == [["queued-resources", "describe"],
                                           ["queued-resources", "create"],
                                           ["queued-resources", "describe"],
                                           ["queued-resources", "delete"]]
  assert "--wait-timeout" in result.stderr


def test_supervise_follows_a_trainer_already_running(tmp_path):
  """Started again while its slice and trainer live: no create, install or start; it follows."""
  result, calls = _supervise(tmp_path, ["0"], qr="ACTIVE", trainer="running")
  assert result.returncode == 0, result.stderr
  assert _count(calls, "queued-resources create") == 0
  assert _count(calls, "tpu_worker.sh setup") == 0 and _count(calls, "tpu_worker.sh start") == 0
  assert "already runs" in result.stderr


def test_supervise_replaces_a_leftover_suspended_resource(tmp_path):
  result, calls = _supervise(tmp_path, ["0"], qr="SUSPENDED", args=["--delete-when-done"])
  assert result.returncode == 0, result.stderr
  assert [argv[3:5] for argv in calls if argv[3] == "queued-resources" and argv[4] != "describe"] == [
      ["queued-resources", "delete"], ["queued-resources", "create"], ["queued-resources", "delete"]]


# -------------------------------------------------------------------------- constraints files

def _pins(path):
  pins = {}
  for line in path.read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      name, version = line.split("==")
      pins[name.lower().replace("_", "-")] = version
  return pins


def test_constraints_pin_every_direct_dependency():
  setup = (LAUNCH.parent / "setup.py").read_text()
  block = setup[setup.index("install_requires=["):setup.index("],", setup.index("install_requires="))]
  direct = {re.split(r"[\[<>=;! ]", req, maxsplit=1)[0].lower().replace("_", "-")
            for req in re.findall(r'"([^"]+)"', block)}
  tpu, cuda = _pins(CONSTRAINTS / "tpu.txt"), _pins(CONSTRAINTS / "cuda12.txt")
  for pins in (tpu, cuda):
    assert direct | {"jaxlib", "gcsfs"} <= set(pins), direct - set(pins)
    assert pins["jax"] == pins["jaxlib"]
  assert "libtpu" in tpu and "libtpu" not in cuda
  assert cuda["jax-cuda12-plugin"] == cuda["jax-cuda12-pjrt"] == cuda["jax"]
  shared = set(tpu) & set(cuda)
  assert {name: tpu[name] for name in shared} == {name: cuda[name] for name in shared}


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


def _setup(tmp_path, **env):
  """Runs `tpu_worker.sh setup` with a recording stand-in for the virtualenv's python."""
  venv_bin = tmp_path / "venv" / "bin"
  venv_bin.mkdir(parents=True, exist_ok=True)
  calls = tmp_path / "calls"
  calls.unlink(missing_ok=True)
  _write_exe(venv_bin / "python", f"#!/bin/sh\necho \"$*\" >> {shlex.quote(str(calls))}\n"
             "case \"$1\" in -c) echo 'jax 0.0';; esac\n")
  result = _run(TPU_WORKER, ["setup"], env={"MBJ_VENV": str(tmp_path / "venv"),
                                            "MBJ_BASE_PYTHON": "/nonexistent", **env})
  return result, (calls.read_text().splitlines() if calls.exists() else [])


def test_worker_setup_installs_into_the_virtualenv_with_the_constraints(tmp_path):
  result, lines = _setup(tmp_path, MBJ_EXTRAS="tfds")
  assert result.returncode == 0, result.stderr
  assert lines[0] == "-m pip install -q -U pip"
  assert lines[1] == (f"-m pip install -q -c {CONSTRAINTS}/tpu.txt -e {LAUNCH.parent}[tfds] "
                      "jax[tpu] gcsfs")
  assert "installed jax 0.0" in result.stdout


def test_worker_setup_constraints_choice(tmp_path):
  result, lines = _setup(tmp_path, MBJ_CONSTRAINTS="none")
  assert result.returncode == 0, result.stderr
  assert lines[1] == f"-m pip install -q -e {LAUNCH.parent} jax[tpu] gcsfs"
  result, lines = _setup(tmp_path, MBJ_CONSTRAINTS="launch/constraints/cuda12.txt")
  assert f"-c {CONSTRAINTS}/cuda12.txt " in lines[1]
  result, lines = _setup(tmp_path, MBJ_CONSTRAINTS="launch/constraints/missing.txt")
  assert result.returncode != 0 and "MBJ_CONSTRAINTS=none" in result.stderr
  assert lines == ["-m pip install -q -U pip"]  # stopped before installing anything


def test_worker_wait_and_exit_status(worker_env):
  """The runner records the trainer's status; `wait` follows this run's log and returns it."""
  env = dict(worker_env, MBJ_WORKER_ENDPOINTS="10.0.0.5")
  assert _run(TPU_WORKER, ["exit-status"], env=env).stdout == "none\n"
  assert _run(TPU_WORKER, ["start", "--detach", "--", "--workdir=a"], env=dict(env, STUB_EXIT="75")
              ).returncode == 0
  waited = _run(TPU_WORKER, ["wait"], env=env)
  assert waited.returncode == 75 and "saved (status 75)" in waited.stdout
  assert _run(TPU_WORKER, ["exit-status"], env=env).stdout == "75\n"

  assert _run(TPU_WORKER, ["start", "--detach", "--", "--workdir=b"], env=env).returncode == 0
  assert _wait_for(lambda: "stub: ready" in _log(env).rsplit("=== ", 1)[1])
  assert _run(TPU_WORKER, ["exit-status"], env=env).stdout == "running\n"
  follower = subprocess.Popen([BASH, str(TPU_WORKER), "wait", "--prefix"], env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert _run(TPU_WORKER, ["stop", "--timeout", "20"], env=env).returncode == 0
  out, err = follower.communicate(timeout=20)
  assert follower.returncode == 0, err  # the stub saves and exits 0 on SIGTERM, through the runner
  assert "arg=--workdir=b" in out and "arg=--workdir=a" not in out  # this run's log only
  assert "stub: got SIGTERM" in out and "trainer finished (status 0)" in out
  assert _run(TPU_WORKER, ["exit-status"], env=env).stdout == "0\n"


def test_worker_rejects_bad_arguments(worker_env):
  for args in (["start", "--workdir=w"], ["stop", "--timeout", "soon"], ["bogus"], []):
    result = _run(TPU_WORKER, args, env=worker_env)
    assert result.returncode != 0, args
