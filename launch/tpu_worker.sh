#!/usr/bin/env bash
# Runs on each worker of a Cloud TPU VM (launch/tpu_vm.sh calls it over `gcloud ... ssh
# --worker=all`): sets up Python, starts the trainer detached from the ssh session, follows its
# log, stops it with SIGTERM, reports its state and exit status. Nothing here talks to gcloud.
#
#   bash launch/tpu_worker.sh setup
#   bash launch/tpu_worker.sh start [--detach] [--prefix] -- ARGS...   (python -m mobilebert_jax.main ARGS)
#   bash launch/tpu_worker.sh wait [--prefix]     follow the running trainer's log; exit with its status
#   bash launch/tpu_worker.sh exit-status         print running, none, or the last trainer's exit status
#   bash launch/tpu_worker.sh logs [--lines N] [--no-follow] [--prefix]
#   bash launch/tpu_worker.sh stop [--timeout SECONDS]
#   bash launch/tpu_worker.sh status
#
# `start` runs the trainer under a small detached runner (this script's `_run`) that forwards
# SIGTERM to it and writes its exit status to $MBJ_LOG_DIR/train.exit when it ends.
#
# Environment (all optional):
#   MBJ_VENV              virtualenv that `setup` creates and `start` uses ($HOME/.venvs/mobilebert_jax)
#   MBJ_PYTHON            interpreter `start` runs (default: the virtualenv's, else python3)
#   MBJ_BASE_PYTHON       Python >= 3.11 that `setup` builds the virtualenv from (default: the first
#                         of python3.13/3.12/3.11/python3 that is >= 3.11; else apt-get python3.11)
#   MBJ_EXTRAS            the project's pip extras for `setup`, e.g. tfds (none)
#   MBJ_CONSTRAINTS       pip constraints file for `setup`, relative to the checkout
#                         (launch/constraints/tpu.txt); `none` installs the newest releases
#   MBJ_LOG_DIR           where logs and the pid file go ($HOME/mobilebert_jax_logs)
#   MBJ_WORKER_ID         this worker's index        } default: the TPU VM metadata server
#   MBJ_WORKER_ENDPOINTS  comma-separated worker IPs } (agent-worker-number, worker-network-endpoints)
#   MBJ_COORDINATOR_PORT  port of process 0's coordinator (8476)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MBJ_VENV:-$HOME/.venvs/mobilebert_jax}"
LOG_DIR="${MBJ_LOG_DIR:-$HOME/mobilebert_jax_logs}"
HOST="$(hostname)"
LOG="$LOG_DIR/train-$HOST.log"
PID_FILE="$LOG_DIR/train.pid"
EXIT_FILE="$LOG_DIR/train.exit"
METADATA_URL="http://metadata.google.internal/computeMetadata/v1/instance/attributes"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
  echo "tpu_worker.sh ($HOST): $*" >&2
  exit 1
}

# Prints the pid of the trainer's runner this script started, if it is still running.
running_pid() {
  local pid
  [[ -f $PID_FILE ]] || return 1
  pid="$(<"$PID_FILE")"
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Guard against pid reuse: only a mobilebert_jax trainer counts.
  grep -qa 'mobilebert_jax.main' "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

metadata() {
  curl -sf --max-time 5 -H 'Metadata-Flavor: Google' "$METADATA_URL/$1"
}

# Prepends --coordinator_address/--num_processes/--process_id to the array named $1 on multi-host
# slices. The TPU VM metadata server names this worker and its peers (the same source JAX's own
# Cloud TPU discovery reads); passing the flags explicitly makes main.py call
# jax.distributed.initialize(), which orbax needs for multi-host checkpoints.
add_distributed_flags() {
  local -n out=$1
  local id endpoints first
  local -a hosts
  id="${MBJ_WORKER_ID:-}"
  endpoints="${MBJ_WORKER_ENDPOINTS:-}"
  if [[ -z $id ]]; then id="$(metadata agent-worker-number || true)"; fi
  if [[ -z $endpoints ]]; then endpoints="$(metadata worker-network-endpoints || true)"; fi
  if [[ -z $id || -z $endpoints ]]; then
    echo "tpu_worker.sh ($HOST): no TPU worker metadata; starting a single process" >&2
    return 0
  fi
  IFS=',' read -ra hosts <<<"$endpoints"
  ((${#hosts[@]} > 1)) || return 0
  first="${hosts[0]##*:}"  # entries are IPs or name:id:ip triples
  out=("--coordinator_address=$first:${MBJ_COORDINATOR_PORT:-8476}"
       "--num_processes=${#hosts[@]}" "--process_id=$id" ${out[@]+"${out[@]}"})
}

cmd_setup() {
  local py="${MBJ_BASE_PYTHON:-}" candidate
  if [[ -z $py ]]; then
    for candidate in python3.13 python3.12 python3.11 python3; do
      if command -v "$candidate" >/dev/null &&
          "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        py="$candidate"
        break
      fi
    done
  fi
  if [[ -z $py ]]; then
    # tpu-ubuntu2204-base ships Python 3.10; Ubuntu 22.04's universe repository has 3.11.
    echo "$HOST: installing python3.11 with apt-get"
    sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
      python3.11 python3.11-venv ||
      die "could not install python3.11; install Python >= 3.11 and set MBJ_BASE_PYTHON"
    py=python3.11
  fi
  if [[ ! -x $VENV/bin/python ]]; then
    echo "$HOST: creating $VENV with $py"
    "$py" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q -U pip
  # One resolve: the project (with MBJ_EXTRAS, e.g. "tfds"), libtpu through jax's `tpu` extra,
  # gcsfs for gs:// workdirs, all at the versions the constraints file pins.
  local project=$ROOT constraints=${MBJ_CONSTRAINTS:-launch/constraints/tpu.txt}
  local -a pins=()
  [[ -z ${MBJ_EXTRAS:-} ]] || project="${ROOT}[${MBJ_EXTRAS}]"
  if [[ $constraints != none ]]; then
    [[ $constraints == /* ]] || constraints="$ROOT/$constraints"
    [[ -f $constraints ]] || die "no constraints file $constraints (MBJ_CONSTRAINTS=none skips it)"
    pins=(-c "$constraints")
  fi
  "$VENV/bin/python" -m pip install -q ${pins[@]+"${pins[@]}"} -e "$project" "jax[tpu]" gcsfs
  echo "$HOST: installed $("$VENV/bin/python" -c 'import jax; print("jax", jax.__version__)') in $VENV"
}

cmd_start() {
  local detach=0 prefix=0 py pid offset
  while (($#)); do
    case $1 in
      --detach) detach=1; shift ;;
      --prefix) prefix=1; shift ;;
      --) shift; break ;;
      *) die "start: unexpected argument $1 (main's arguments go after --)" ;;
    esac
  done
  local -a args=("$@")
  if pid="$(running_pid)"; then
    die "a trainer is already running (pid $pid, log $LOG); stop it first"
  fi
  case " ${args[*]-} " in
    *" --coordinator_address"*) ;;
    *) add_distributed_flags args ;;
  esac
  py="${MBJ_PYTHON:-}"
  if [[ -z $py ]]; then
    if [[ -x $VENV/bin/python ]]; then py="$VENV/bin/python"; else py=python3; fi
  fi
  local -a cmd=("$py" -m mobilebert_jax.main ${args[@]+"${args[@]}"})
  cd "$ROOT"
  mkdir -p "$LOG_DIR"
  touch "$LOG"
  offset=$(($(stat -c %s "$LOG") + 1))
  {
    printf '=== %s %s: cd %q &&' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$HOST" "$ROOT"
    printf ' %q' "${cmd[@]}"
    printf '\n'
  } >>"$LOG"
  rm -f "$EXIT_FILE"
  # setsid + nohup + output to the file only: a dropped ssh connection cannot kill the trainer.
  PYTHONUNBUFFERED=1 setsid nohup bash "$ROOT/launch/tpu_worker.sh" _run -- "${cmd[@]}" \
    >>"$LOG" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$PID_FILE"
  echo "$HOST: started pid $pid; log $LOG"
  ((detach)) && return 0
  follow_until_exit "$pid" "$offset" "$prefix"
}

# The runner `start` detaches: runs ARGS as its child, passes SIGTERM on to it (from `stop`, or the
# one a maintenance event sends every process), and records its exit status.
cmd_run() {
  [[ ${1:-} != -- ]] || shift
  local child="" status interrupted
  trap 'interrupted=1; [[ -z $child ]] || kill -TERM "$child" 2>/dev/null || true' TERM
  "$@" &
  child=$!
  while :; do
    # A trapped signal ends `wait` early (status > 128) while the trainer still runs: wait again.
    interrupted=0
    status=0
    wait "$child" || status=$?
    ((interrupted)) || break
  done
  echo "$status" >"$EXIT_FILE"
  return "$status"
}

# Follows the log from byte OFFSET while the runner PID lives, then reports the exit status.
follow_until_exit() {
  local pid=$1 offset=$2 prefix=$3
  # Ctrl-C or a dropped connection stops the following, never the trainer.
  if ((prefix)); then
    tail -s 0.2 -c "+$offset" --pid="$pid" -f "$LOG" | sed -u "s/^/[$HOST] /"
  else
    tail -s 0.2 -c "+$offset" --pid="$pid" -f "$LOG"
  fi
  report_exit
}

# Says how the last trainer ended and returns its exit status (1 when none was recorded).
report_exit() {
  local status
  status="$(cat "$EXIT_FILE" 2>/dev/null || true)"
  case "$status" in
    0) echo "$HOST: trainer finished (status 0)" ;;
    75) echo "$HOST: trainer stopped by a signal and saved (status 75): rerun the same command to resume" ;;
    *[!0-9]*|"")
      echo "$HOST: no exit status recorded (the runner was killed or the VM restarted)"
      return 1
      ;;
    *) echo "$HOST: trainer exited with status $status" ;;
  esac
  return "$status"
}

cmd_wait() {
  local prefix=0 pid offset
  while (($#)); do
    case $1 in
      --prefix) prefix=1; shift ;;
      *) die "wait: unexpected argument $1" ;;
    esac
  done
  if ! pid="$(running_pid)"; then
    report_exit
    return
  fi
  # From the header line `start` wrote for this run.
  offset="$(grep -ab '^=== ' "$LOG" | tail -n 1 | cut -d: -f1)"
  follow_until_exit "$pid" "$((${offset:-0} + 1))" "$prefix"
}

# One word for a supervisor: running, none (nothing recorded), or the last exit status.
cmd_exit_status() {
  if running_pid >/dev/null; then
    echo running
  elif [[ -s $EXIT_FILE ]]; then
    cat "$EXIT_FILE"
  else
    echo none
  fi
}

cmd_logs() {
  local lines=100 follow=1 prefix=0
  while (($#)); do
    case $1 in
      --lines) (($# >= 2)) || die "--lines needs a value"; lines=$2; shift 2 ;;
      --lines=*) lines=${1#*=}; shift ;;
      --no-follow) follow=0; shift ;;
      --prefix) prefix=1; shift ;;
      *) die "logs: unexpected argument $1" ;;
    esac
  done
  [[ $lines =~ ^[0-9]+$ ]] || die "--lines must be a number, got $lines"
  [[ -f $LOG ]] || die "no log yet at $LOG"
  local -a tail_cmd=(tail -n "$lines")
  ((follow)) && tail_cmd+=(-F)
  if ((prefix)); then
    "${tail_cmd[@]}" "$LOG" | sed -u "s/^/[$HOST] /"
  else
    "${tail_cmd[@]}" "$LOG"
  fi
}

cmd_stop() {
  local timeout=600 pid waited=0
  while (($#)); do
    case $1 in
      --timeout) (($# >= 2)) || die "--timeout needs a value"; timeout=$2; shift 2 ;;
      --timeout=*) timeout=${1#*=}; shift ;;
      *) die "stop: unexpected argument $1" ;;
    esac
  done
  [[ $timeout =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds, got $timeout"
  if ! pid="$(running_pid)"; then
    echo "$HOST: no trainer running"
    return 0
  fi
  echo "$HOST: SIGTERM to pid $pid (the trainer saves a checkpoint, then exits)"
  kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null && ((waited < timeout)); do
    sleep 1
    waited=$((waited + 1))
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$HOST: pid $pid still running after ${timeout}s; SIGKILL (the last complete checkpoint is kept)"
    # The runner leads its own process group (setsid): the trainer and its children go with it.
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  else
    echo "$HOST: pid $pid exited after ${waited}s"
  fi
}

cmd_status() {
  local pid
  if pid="$(running_pid)"; then
    echo "$HOST: running pid $pid (for $(ps -o etime= -p "$pid" | tr -d ' ')); log $LOG"
  else
    echo "$HOST: not running"
  fi
  if [[ -s $LOG ]]; then
    echo "$HOST: last log line: $(tail -n 1 "$LOG")"
  fi
}

main() {
  (($#)) || { usage >&2; exit 2; }
  local sub=$1
  shift
  case $sub in
    setup) cmd_setup "$@" ;;
    start) cmd_start "$@" ;;
    _run) cmd_run "$@" ;;
    wait) cmd_wait "$@" ;;
    exit-status) cmd_exit_status "$@" ;;
    logs) cmd_logs "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    -h|--help|help) usage ;;
    *) echo "tpu_worker.sh: unknown subcommand '$sub'" >&2; usage >&2; exit 2 ;;
  esac
}

main "$@"
