#!/usr/bin/env bash
# Creates a Cloud TPU VM (or pod slice), installs this repository on every worker, and runs the same
# `python -m mobilebert_jax.main` command on all of them. See launch/README.md.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOCAL_REPO="$(cd "$SCRIPT_DIR/.." && pwd)"
REMOTE_DIR="${REMOTE_DIR:-mobilebert_jax}"  # on each worker; relative paths are under $HOME
DEFAULT_VERSION="tpu-ubuntu2204-base"

usage() {
  cat <<EOF
Usage: launch/tpu_vm.sh SUBCOMMAND NAME [OPTIONS]

Subcommands (each runs gcloud; every ssh goes to --worker=all unless stated):
  create  NAME --accelerator-type TYPE [--zone Z] [--version V] [--project P] [--spot|--preemptible]
          gcloud compute tpus tpu-vm create. TYPE e.g. v4-32 (a pod slice: 4 workers) or v4-8.
          V defaults to $DEFAULT_VERSION (v4); v5e wants v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
          v6e v2-alpha-tpuv6e.
  install NAME [--zone Z] [--project P] [--repo URL_OR_PATH] [--ref REF] [--extras tfds]
          Puts the code in ~/$REMOTE_DIR on every worker, then creates a Python >= 3.11 virtualenv
          (~/.venvs/mobilebert_jax) and runs: pip install -e ".[EXTRAS]" "jax[tpu]" gcsfs
          --repo a local directory (default: this checkout, uncommitted edits included; with --ref,
          that commit via git archive) is copied; anything else is a git URL, cloned or fetched
          (--ref: branch, tag or commit; default: the remote's default branch). Safe to rerun.
  run     NAME [--zone Z] [--project P] [--detach] -- MAIN_ARGS...
          On every worker: cd ~/$REMOTE_DIR && python -m mobilebert_jax.main MAIN_ARGS
          (each argument quoted with printf %q), started with setsid + nohup so a dropped ssh
          connection does not stop it, output appended to ~/mobilebert_jax_logs/train-HOSTNAME.log on
          each worker. Follows the logs until the trainer exits (Ctrl-C stops following only);
          --detach returns at once. On a pod slice the coordinator flags come from the TPU metadata.
  logs    NAME [--zone Z] [--project P] [--worker N|all] [--lines N] [--no-follow]
          Tails a worker's log (default: worker 0, the one that logs training progress).
  stop    NAME [--zone Z] [--project P] [--timeout SECONDS]
          SIGTERM to the trainer on every worker: it saves a checkpoint at the current step and
          exits; after SECONDS (600) it is killed. Rerunning the same 'run' command resumes.
  status  NAME [--zone Z] [--project P]
          gcloud describe (state, health), then whether the trainer runs on each worker.
  delete  NAME [--zone Z] [--project P] [--yes]
          gcloud compute tpus tpu-vm delete (--yes: no confirmation prompt).

--workdir may be gs://BUCKET/DIR: orbax writes the checkpoints there from every worker, so a run
survives preemption and the deletion of the VM (the workers' service account needs write access).
Without --zone, gcloud's configured compute/zone applies.

Environment:
  DRY_RUN=1      print every gcloud command (and local tar) instead of running it
  REMOTE_DIR     checkout directory on the workers (default: mobilebert_jax, under \$HOME)
  TPU_SSH_FLAGS  extra flags for gcloud ssh/scp, e.g. "--tunnel-through-iap" or "--internal-ip"

Example:
  launch/tpu_vm.sh create bert-pod --zone us-central2-b --accelerator-type v4-32 --spot
  launch/tpu_vm.sh install bert-pod --zone us-central2-b --extras tfds
  launch/tpu_vm.sh run bert-pod --zone us-central2-b -- \\
      --config=configs/ib_bert_large_pretrain.py --workdir=gs://my-bucket/runs/ib_bert \\
      --config.data.tfds_data_dir=gs://my-bucket/tfds --config.data.vocab_path=vocab/vocab.txt
  launch/tpu_vm.sh logs bert-pod --zone us-central2-b
  launch/tpu_vm.sh stop bert-pod --zone us-central2-b
  launch/tpu_vm.sh delete bert-pod --zone us-central2-b
EOF
}

die() {
  echo "tpu_vm.sh: $*" >&2
  echo >&2
  usage >&2
  exit 2
}

# quote_word: shared with the other launchers.
# shellcheck source=launch/lib.sh disable=SC1091
source "$SCRIPT_DIR/lib.sh"

# Runs a command, or prints it (one line, shell-quoted) under DRY_RUN=1.
run_cmd() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    local first=1 w
    for w in "$@"; do
      ((first)) || printf ' '
      first=0
      quote_word "$w"
    done
    printf '\n'
  else
    "$@"
  fi
}

# ------------------------------------------------------------------------- argument parsing

NAME=""
ZONE=""
PROJECT=""
ACCELERATOR_TYPE=""
VERSION=""
REPO=""
REF=""
EXTRAS=""
WORKER=""
TAIL_LINES=""
TIMEOUT=""
SPOT=0
PREEMPTIBLE=0
YES=0
DETACH=0
NO_FOLLOW=0
HAVE_DASHDASH=0
MAIN_ARGS=()
TARBALL=""
SETUP=""
SUB=""

# parse_args "allowed options" ARGS... : sets the globals above; options not allowed are errors.
parse_args() {
  local allowed=" $1 " opt val
  shift
  while (($#)); do
    case $1 in
      -h|--help) usage; exit 0 ;;
      --)
        [[ $allowed == *" -- "* ]] || die "$SUB takes no '--' arguments"
        shift
        HAVE_DASHDASH=1
        MAIN_ARGS=("$@")
        break
        ;;
      --*)
        opt=${1%%=*}
        [[ $allowed == *" $opt "* ]] || die "$SUB: unknown option $opt"
        case $opt in
          --spot) SPOT=1; shift; continue ;;
          --preemptible) PREEMPTIBLE=1; shift; continue ;;
          --yes) YES=1; shift; continue ;;
          --detach) DETACH=1; shift; continue ;;
          --no-follow) NO_FOLLOW=1; shift; continue ;;
        esac
        if [[ $1 == *=* ]]; then
          val=${1#*=}
          shift
        else
          (($# >= 2)) || die "$opt needs a value"
          val=$2
          shift 2
        fi
        case $opt in
          --zone) ZONE=$val ;;
          --project) PROJECT=$val ;;
          --accelerator-type) ACCELERATOR_TYPE=$val ;;
          --version) VERSION=$val ;;
          --repo) REPO=$val ;;
          --ref) REF=$val ;;
          --extras) EXTRAS=$val ;;
          --worker) WORKER=$val ;;
          --lines) TAIL_LINES=$val ;;
          --timeout) TIMEOUT=$val ;;
        esac
        ;;
      -*) die "$SUB: unknown option $1" ;;
      *)
        [[ -z $NAME ]] || die "$SUB: unexpected argument '$1'"
        NAME=$1
        shift
        ;;
    esac
  done
  [[ -n $NAME ]] || die "$SUB: missing the TPU NAME"
}

# Flags every gcloud tpu-vm command takes.
location_flags() {
  LOCATION=()
  [[ -z $ZONE ]] || LOCATION+=("--zone=$ZONE")
  [[ -z $PROJECT ]] || LOCATION+=("--project=$PROJECT")
}

ssh_extra_flags() {
  SSH_EXTRA=()
  [[ -z ${TPU_SSH_FLAGS:-} ]] || read -ra SSH_EXTRA <<<"$TPU_SSH_FLAGS"
}

# The checkout on the workers, as a shell word for the remote command (~ expands there).
remote_dir() {
  if [[ $REMOTE_DIR == /* ]]; then
    printf '%q' "$REMOTE_DIR"
  else
    # shellcheck disable=SC2088  # the ~ is for the worker's shell
    printf '~/%q' "$REMOTE_DIR"
  fi
}

# tpu_ssh WORKER REMOTE_COMMAND
tpu_ssh() {
  location_flags
  ssh_extra_flags
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" ${LOCATION[@]+"${LOCATION[@]}"} "--worker=$1" \
    ${SSH_EXTRA[@]+"${SSH_EXTRA[@]}"} "--command=$2"
}

# ------------------------------------------------------------------------------ subcommands

cmd_create() {
  parse_args "--zone --project --accelerator-type --version --spot --preemptible" "$@"
  [[ -n $ACCELERATOR_TYPE ]] || die "create: --accelerator-type is required (e.g. v4-32)"
  ((SPOT + PREEMPTIBLE <= 1)) || die "create: choose one of --spot and --preemptible"
  location_flags
  local -a cmd=(gcloud compute tpus tpu-vm create "$NAME" ${LOCATION[@]+"${LOCATION[@]}"}
                "--accelerator-type=$ACCELERATOR_TYPE" "--version=${VERSION:-$DEFAULT_VERSION}")
  ((SPOT)) && cmd+=(--spot)
  ((PREEMPTIBLE)) && cmd+=(--preemptible)
  run_cmd "${cmd[@]}"
}

# The remote setup step (MBJ_EXTRAS selects the project's pip extras).
setup_command() {
  if [[ -n $EXTRAS ]]; then
    printf 'MBJ_EXTRAS=%q bash launch/tpu_worker.sh setup' "$EXTRAS"
  else
    printf 'bash launch/tpu_worker.sh setup'
  fi
}

cmd_install() {
  parse_args "--zone --project --repo --ref --extras" "$@"
  [[ $EXTRAS =~ ^[A-Za-z0-9_,-]*$ ]] || die "install: --extras takes names like tfds"
  local repo=${REPO:-$LOCAL_REPO} dir
  dir="$(remote_dir)"
  SETUP="$(setup_command)"
  if [[ -d $repo ]]; then
    install_by_copy "$repo" "$dir"
  else
    install_by_clone "$repo" "$dir"
  fi
}

install_by_copy() {
  local repo=$1 dir=$2 remote_tar="mobilebert_jax_src.tar.gz"
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    TARBALL="${TMPDIR:-/tmp}/mobilebert_jax_src.XXXXXX"
  else
    TARBALL="$(mktemp "${TMPDIR:-/tmp}/mobilebert_jax_src.XXXXXX")"
    trap 'rm -f "$TARBALL"' EXIT
  fi
  if [[ -n $REF ]]; then
    run_cmd git -C "$repo" archive --format=tar.gz "--output=$TARBALL" "$REF"
  else
    run_cmd tar -czf "$TARBALL" -C "$repo" --exclude=./.git --exclude='./workdir*' \
      --exclude=./runs --exclude=./.venv --exclude=__pycache__ --exclude='*.egg-info' \
      --exclude=.pytest_cache .
  fi
  location_flags
  ssh_extra_flags
  run_cmd gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:$remote_tar" ${LOCATION[@]+"${LOCATION[@]}"} \
    --worker=all ${SSH_EXTRA[@]+"${SSH_EXTRA[@]}"}
  # Source directories are replaced so files deleted locally disappear; workdirs under the
  # checkout are left alone.
  tpu_ssh all "mkdir -p $dir && cd $dir && rm -rf mobilebert_jax configs launch tests && \
tar -xzf ~/$remote_tar && rm -f ~/$remote_tar && ${SETUP}"
}

install_by_clone() {
  local url=$1 dir=$2 checkout
  if [[ -n $REF ]]; then
    checkout="git fetch --tags origin $(printf '%q' "$REF") && git checkout --force --detach FETCH_HEAD"
  else
    checkout="git fetch origin && git checkout --force --detach origin/HEAD"
  fi
  tpu_ssh all "if [ -e $dir ] && [ ! -d $dir/.git ]; then \
echo \"$dir exists but is not a git checkout (installed by copy): remove it first\" >&2; exit 1; fi && \
{ [ -d $dir/.git ] || git clone $(printf '%q' "$url") $dir; } && cd $dir && $checkout && \
${SETUP}"
}

cmd_run() {
  parse_args "--zone --project --detach --" "$@"
  ((HAVE_DASHDASH)) || die "run: put main's arguments after '--' (e.g. -- --config=configs/demo.py --workdir=gs://B/D)"
  local main_args="" flags="--prefix"
  ((${#MAIN_ARGS[@]} == 0)) || main_args="$(printf ' %q' "${MAIN_ARGS[@]}")"
  ((DETACH)) && flags+=" --detach"
  tpu_ssh all "cd $(remote_dir) && bash launch/tpu_worker.sh start $flags --$main_args"
}

cmd_logs() {
  parse_args "--zone --project --worker --lines --no-follow" "$@"
  local worker=${WORKER:-0} flags="--lines ${TAIL_LINES:-100}"
  [[ $worker == all || $worker =~ ^[0-9]+$ ]] || die "logs: --worker takes a number or 'all'"
  [[ ${TAIL_LINES:-100} =~ ^[0-9]+$ ]] || die "logs: --lines takes a number"
  ((NO_FOLLOW)) && flags+=" --no-follow"
  [[ $worker != all ]] || flags+=" --prefix"
  tpu_ssh "$worker" "cd $(remote_dir) && bash launch/tpu_worker.sh logs $flags"
}

cmd_stop() {
  parse_args "--zone --project --timeout" "$@"
  [[ ${TIMEOUT:-600} =~ ^[0-9]+$ ]] || die "stop: --timeout takes a number of seconds"
  tpu_ssh all "cd $(remote_dir) && bash launch/tpu_worker.sh stop --timeout ${TIMEOUT:-600}"
}

cmd_status() {
  parse_args "--zone --project" "$@"
  location_flags
  run_cmd gcloud compute tpus tpu-vm describe "$NAME" ${LOCATION[@]+"${LOCATION[@]}"} \
    "--format=yaml(state,health,healthDescription,acceleratorType,runtimeVersion,schedulingConfig)"
  tpu_ssh all "cd $(remote_dir) && bash launch/tpu_worker.sh status" ||
    echo "tpu_vm.sh: could not reach every worker (is the TPU READY and installed?)" >&2
}

cmd_delete() {
  parse_args "--zone --project --yes" "$@"
  location_flags
  local -a cmd=(gcloud compute tpus tpu-vm delete "$NAME" ${LOCATION[@]+"${LOCATION[@]}"})
  ((YES)) && cmd+=(--quiet)
  run_cmd "${cmd[@]}"
}

main() {
  (($#)) || { usage >&2; exit 2; }
  SUB=$1
  shift
  case $SUB in
    create) cmd_create "$@" ;;
    install) cmd_install "$@" ;;
    run) cmd_run "$@" ;;
    logs) cmd_logs "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    delete) cmd_delete "$@" ;;
    -h|--help|help) usage ;;
    *)
      echo "tpu_vm.sh: unknown subcommand '$SUB'" >&2
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
