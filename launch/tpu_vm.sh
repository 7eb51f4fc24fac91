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
  create  NAME --queued --accelerator-type TYPE [--spot|--reserved] [--valid-until-duration D] ...
          gcloud compute tpus queued-resources create NAME --node-id NAME: a request that waits in
          the queue until capacity is free (D e.g. 6h: it fails if not provisioned by then). The
          TPU VM it brings is called NAME too, so every other subcommand works on it.
  install NAME [--zone Z] [--project P] [--repo URL_OR_PATH] [--ref REF] [--extras tfds]
          [--constraints FILE|none]
          Puts the code in ~/$REMOTE_DIR on every worker, then creates a Python >= 3.11 virtualenv
          (~/.venvs/mobilebert_jax) and runs: pip install -c FILE -e ".[EXTRAS]" "jax[tpu]" gcsfs
          --repo a local directory (default: this checkout, uncommitted edits included; with --ref,
          that commit via git archive) is copied; anything else is a git URL, cloned or fetched
          (--ref: branch, tag or commit; default: the remote's default branch). Safe to rerun.
          FILE, a path in the checkout, pins the versions (default launch/constraints/tpu.txt);
          none: the newest releases.
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
  status  NAME [--zone Z] [--project P] [--queued]
          gcloud describe (state, health; --queued: the queued resource's state first), then
          whether the trainer runs on each worker.
  delete  NAME [--zone Z] [--project P] [--yes] [--queued]
          gcloud compute tpus tpu-vm delete (--yes: no confirmation prompt); --queued deletes the
          queued resource NAME with its TPU VM (queued-resources delete --force).
  supervise NAME --accelerator-type TYPE [--spot|--reserved] [--valid-until-duration D]
          [--zone Z] [--project P] [--version V] [--repo R] [--ref REF] [--extras E]
          [--constraints FILE|none] [--max-restarts N] [--poll-interval S] [--wait-timeout S]
          [--delete-when-done] -- MAIN_ARGS...
          Runs a training command to its end on preemptible capacity, from this machine: creates
          the queued resource NAME if missing, polls it every S seconds (60) until ACTIVE (at most
          --wait-timeout S, 86400), installs, starts MAIN_ARGS on every worker and follows worker 0.
          When the slice is preempted (queued resource SUSPENDED/FAILED or gone, TPU VM PREEMPTED)
          it deletes and recreates it, reinstalls and reruns the same command, which resumes from
          the last checkpoint under a gs:// --workdir. A trainer stopped by SIGTERM (status 75) on
          a healthy slice, e.g. after a maintenance restart, is rerun on the same slice. Ends with
          the trainer's status: 0 done (--delete-when-done: then deletes the slice); any other
          status of the trainer at once, no retry; 75 after N restarts (20) or a wait past
          --wait-timeout: rerun the same command to go on. Transitions are logged to stderr with
          UTC timestamps. Ctrl-C stops supervising only: the trainer keeps running.

--workdir may be gs://BUCKET/DIR: orbax writes the checkpoints there from every worker, so a run
survives preemption and the deletion of the VM (the workers' service account needs write access).
Without --zone, gcloud's configured compute/zone applies.

Environment:
  DRY_RUN=1      print every gcloud command (and local tar) instead of running it; supervise
                 then prints one pass, as if the slice came up and the run finished
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

  launch/tpu_vm.sh supervise bert-pod --zone us-central2-b --accelerator-type v4-32 --spot \\
      --extras tfds -- --config=configs/ib_bert_large_pretrain.py --workdir=gs://my-bucket/runs/ib_bert
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

# Temporary files, removed on exit.
TEMP_FILES=()
remove_temp_files() {
  ((${#TEMP_FILES[@]} == 0)) || rm -f "${TEMP_FILES[@]}"
}
trap remove_temp_files EXIT

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
VALID_UNTIL=""
CONSTRAINTS=""
MAX_RESTARTS=""
POLL_INTERVAL=""
WAIT_TIMEOUT=""
SPOT=0
PREEMPTIBLE=0
RESERVED=0
QUEUED=0
DELETE_WHEN_DONE=0
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
          --reserved) RESERVED=1; shift; continue ;;
          --queued) QUEUED=1; shift; continue ;;
          --delete-when-done) DELETE_WHEN_DONE=1; shift; continue ;;
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
          --valid-until-duration) VALID_UNTIL=$val ;;
          --constraints) CONSTRAINTS=$val ;;
          --max-restarts) MAX_RESTARTS=$val ;;
          --poll-interval) POLL_INTERVAL=$val ;;
          --wait-timeout) WAIT_TIMEOUT=$val ;;
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

# The remote command that runs `tpu_worker.sh ARGS` in the checkout.
worker_command() {
  printf 'cd %s && bash launch/tpu_worker.sh %s' "$(remote_dir)" "$*"
}

# ssh_argv WORKER REMOTE_COMMAND: sets SSH_ARGV to the gcloud ssh command.
ssh_argv() {
  location_flags
  ssh_extra_flags
  SSH_ARGV=(gcloud compute tpus tpu-vm ssh "$NAME" ${LOCATION[@]+"${LOCATION[@]}"} "--worker=$1"
            ${SSH_EXTRA[@]+"${SSH_EXTRA[@]}"} "--command=$2")
}

# tpu_ssh WORKER REMOTE_COMMAND
tpu_ssh() {
  ssh_argv "$1" "$2"
  run_cmd "${SSH_ARGV[@]}"
}

# query DRY_ANSWER COMMAND...: sets REPLY to the last line COMMAND prints and returns its status
# (its stderr goes to QUERY_ERRORS); under DRY_RUN=1 prints COMMAND and answers DRY_ANSWER.
QUERY_ERRORS=/dev/null
query() {
  local answer=$1 out status=0
  shift
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    run_cmd "$@"
    REPLY=$answer
    return 0
  fi
  out="$("$@" 2>"$QUERY_ERRORS")" || status=$?
  out=${out//$'\r'/}
  REPLY=${out##*$'\n'}
  return "$status"
}

# describe_state DRY_ANSWER KIND FORMAT: sets STATE to what `gcloud compute tpus KIND describe NAME
# --format=FORMAT` says: NOT_FOUND when there is no such resource, UNKNOWN when gcloud cannot tell
# (a network or API error: ask again later).
describe_state() {
  local answer=$1 kind=$2 format=$3
  location_flags
  if query "$answer" gcloud compute tpus "$kind" describe "$NAME" ${LOCATION[@]+"${LOCATION[@]}"} \
      "--format=$format"; then
    STATE=${REPLY:-UNKNOWN}
  elif grep -qiE 'NOT_FOUND|not found' "$QUERY_ERRORS" 2>/dev/null; then
    STATE=NOT_FOUND
  else
    STATE=UNKNOWN
  fi
}

# Sets STATE to the queued resource's: ACCEPTED, PROVISIONING, WAITING_FOR_RESOURCES, ACTIVE,
# SUSPENDING, SUSPENDED, FAILED, ...
queued_state() {
  describe_state "$1" queued-resources 'value(state.state)'
}

# Sets STATE to the TPU VM's: READY, CREATING, RESTARTING, REPAIRING, PREEMPTED, ...
node_state() {
  describe_state "$1" tpu-vm 'value(state)'
}

# ------------------------------------------------------------------------------ subcommands

# Checks the options `create --queued` and `supervise` share.
check_queued_options() {
  [[ -n $ACCELERATOR_TYPE ]] || die "$SUB: --accelerator-type is required (e.g. v4-32)"
  ((PREEMPTIBLE == 0)) || die "$SUB: a queued resource takes --spot or --reserved, not --preemptible"
  ((SPOT + RESERVED <= 1)) || die "$SUB: choose one of --spot and --reserved"
}

# gcloud compute tpus queued-resources create: the queued resource NAME, for the TPU VM NAME.
queued_create() {
  location_flags
  local -a cmd=(gcloud compute tpus queued-resources create "$NAME" ${LOCATION[@]+"${LOCATION[@]}"}
                "--node-id=$NAME" "--accelerator-type=$ACCELERATOR_TYPE"
                "--runtime-version=${VERSION:-$DEFAULT_VERSION}")
  ((SPOT == 0)) || cmd+=(--spot)
  ((RESERVED == 0)) || cmd+=(--reserved)
  [[ -z $VALID_UNTIL ]] || cmd+=("--valid-until-duration=$VALID_UNTIL")
  run_cmd "${cmd[@]}"
}

# queued_delete [--quiet]: the queued resource and its TPU VM (--force: even while ACTIVE).
queued_delete() {
  location_flags
  run_cmd gcloud compute tpus queued-resources delete "$NAME" ${LOCATION[@]+"${LOCATION[@]}"} --force "$@"
}

cmd_create() {
  parse_args "--zone --project --accelerator-type --version --spot --preemptible --queued --reserved \
--valid-until-duration" "$@"
  if ((QUEUED)); then
    check_queued_options
    queued_create
    return
  fi
  if ((RESERVED)) || [[ -n $VALID_UNTIL ]]; then
    die "create: --reserved and --valid-until-duration are for a queued resource (--queued)"
  fi
  [[ -n $ACCELERATOR_TYPE ]] || die "create: --accelerator-type is required (e.g. v4-32)"
  ((SPOT + PREEMPTIBLE <= 1)) || die "create: choose one of --spot and --preemptible"
  location_flags
  local -a cmd=(gcloud compute tpus tpu-vm create "$NAME" ${LOCATION[@]+"${LOCATION[@]}"}
                "--accelerator-type=$ACCELERATOR_TYPE" "--version=${VERSION:-$DEFAULT_VERSION}")
  ((SPOT)) && cmd+=(--spot)
  ((PREEMPTIBLE)) && cmd+=(--preemptible)
  run_cmd "${cmd[@]}"
}

# The remote setup step (MBJ_EXTRAS selects the project's pip extras, MBJ_CONSTRAINTS the pins).
setup_command() {
  local env=""
  [[ -z $EXTRAS ]] || env+="MBJ_EXTRAS=$(printf '%q' "$EXTRAS") "
  [[ -z $CONSTRAINTS ]] || env+="MBJ_CONSTRAINTS=$(printf '%q' "$CONSTRAINTS") "
  printf '%sbash launch/tpu_worker.sh setup' "$env"
}

# Checks the options `install` and `supervise` share.
check_install_options() {
  [[ $EXTRAS =~ ^[A-Za-z0-9_,-]*$ ]] || die "$SUB: --extras takes names like tfds"
  [[ $CONSTRAINTS =~ ^[A-Za-z0-9_./-]*$ ]] ||
    die "$SUB: --constraints takes a path in the checkout (launch/constraints/tpu.txt) or none"
}

# Puts the code on every worker and sets up its virtualenv (the options as parsed).
install_code() {
  local repo=${REPO:-$LOCAL_REPO} dir
  dir="$(remote_dir)"
  SETUP="$(setup_command)"
  if [[ -d $repo ]]; then
    install_by_copy "$repo" "$dir"
  else
    install_by_clone "$repo" "$dir"
  fi
}

cmd_install() {
  parse_args "--zone --project --repo --ref --extras --constraints" "$@"
  check_install_options
  install_code
}

install_by_copy() {
  local repo=$1 dir=$2 remote_tar="mobilebert_jax_src.tar.gz"
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    TARBALL="${TMPDIR:-/tmp}/mobilebert_jax_src.XXXXXX"
  else
    TARBALL="$(mktemp "${TMPDIR:-/tmp}/mobilebert_jax_src.XXXXXX")"
    TEMP_FILES+=("$TARBALL")
  fi
  if [[ -n $REF ]]; then
    run_cmd git -C "$repo" archive --format=tar.gz "--output=$TARBALL" "$REF" || return
  else
    run_cmd tar -czf "$TARBALL" -C "$repo" --exclude=./.git --exclude='./workdir*' \
      --exclude=./runs --exclude=./.venv --exclude=__pycache__ --exclude='*.egg-info' \
      --exclude=.pytest_cache . || return
  fi
  location_flags
  ssh_extra_flags
  run_cmd gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:$remote_tar" ${LOCATION[@]+"${LOCATION[@]}"} \
    --worker=all ${SSH_EXTRA[@]+"${SSH_EXTRA[@]}"} || return
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
  local flags="--prefix"
  ((DETACH)) && flags+=" --detach"
  tpu_ssh all "$(start_command "$flags")"
}

# The remote command that starts MAIN_ARGS with `tpu_worker.sh start FLAGS`.
start_command() {
  local main_args=""
  ((${#MAIN_ARGS[@]} == 0)) || main_args="$(printf ' %q' "${MAIN_ARGS[@]}")"
  worker_command "start $1 --$main_args"
}

cmd_logs() {
  parse_args "--zone --project --worker --lines --no-follow" "$@"
  local worker=${WORKER:-0} flags="--lines ${TAIL_LINES:-100}"
  [[ $worker == all || $worker =~ ^[0-9]+$ ]] || die "logs: --worker takes a number or 'all'"
  [[ ${TAIL_LINES:-100} =~ ^[0-9]+$ ]] || die "logs: --lines takes a number"
  ((NO_FOLLOW)) && flags+=" --no-follow"
  [[ $worker != all ]] || flags+=" --prefix"
  tpu_ssh "$worker" "$(worker_command logs "$flags")"
}

cmd_stop() {
  parse_args "--zone --project --timeout" "$@"
  [[ ${TIMEOUT:-600} =~ ^[0-9]+$ ]] || die "stop: --timeout takes a number of seconds"
  tpu_ssh all "$(worker_command stop --timeout "${TIMEOUT:-600}")"
}

cmd_status() {
  parse_args "--zone --project --queued" "$@"
  location_flags
  ((QUEUED == 0)) || run_cmd gcloud compute tpus queued-resources describe "$NAME" \
    ${LOCATION[@]+"${LOCATION[@]}"} "--format=yaml(state,tpu)"
  run_cmd gcloud compute tpus tpu-vm describe "$NAME" ${LOCATION[@]+"${LOCATION[@]}"} \
    "--format=yaml(state,health,healthDescription,acceleratorType,runtimeVersion,schedulingConfig)"
  tpu_ssh all "$(worker_command status)" ||
    echo "tpu_vm.sh: could not reach every worker (is the TPU READY and installed?)" >&2
}

cmd_delete() {
  parse_args "--zone --project --yes --queued" "$@"
  if ((QUEUED)); then
    if ((YES)); then queued_delete --quiet; else queued_delete; fi
    return
  fi
  location_flags
  local -a cmd=(gcloud compute tpus tpu-vm delete "$NAME" ${LOCATION[@]+"${LOCATION[@]}"})
  ((YES)) && cmd+=(--quiet)
  run_cmd "${cmd[@]}"
}

# ------------------------------------------------------------------------------ supervise

# A timestamped line on stderr for each transition (stdout carries worker 0's log, or under DRY_RUN
# the commands).
say() {
  printf '%s tpu_vm.sh supervise %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$NAME" "$*" >&2
}

# slice_health DRY_ANSWER: sets HEALTH from the queued resource's and the TPU VM's states: ready
# (ACTIVE and READY), gone (none, or suspended, failed, preempted: to be replaced) or waiting
# (queued, provisioning, restarting, or gcloud could not tell). QUEUED_STATE is the queued
# resource's state, SLICE_STATE both, for the log; DRY_ANSWER the queued resource's under DRY_RUN.
slice_health() {
  queued_state "$1"
  QUEUED_STATE=$STATE
  SLICE_STATE="queued resource $STATE"
  case $STATE in
    ACTIVE) ;;
    NOT_FOUND|SUSPENDING|SUSPENDED|FAILED) HEALTH=gone; return 0 ;;
    *) HEALTH=waiting; return 0 ;;
  esac
  node_state READY
  SLICE_STATE+=", TPU VM $STATE"
  case $STATE in
    READY) HEALTH=ready ;;
    NOT_FOUND|PREEMPTED|TERMINATED|STOPPING|STOPPED) HEALTH=gone ;;
    *) HEALTH=waiting ;;
  esac
}

# Returns once the slice is ready: creates the queued resource when there is none, deletes and
# recreates one that was suspended, failed or preempted, and polls every --poll-interval. Past
# --wait-timeout it deletes the request and exits 75. Sets CREATED=1 when it created one.
wait_until_ready() {
  local started=$SECONDS last="" dry=NOT_FOUND status
  CREATED=0
  while :; do
    slice_health "$dry"
    [[ $SLICE_STATE == "$last" ]] || say "$SLICE_STATE"
    last=$SLICE_STATE
    if [[ $HEALTH == ready ]]; then
      return 0
    elif [[ $HEALTH == gone && $QUEUED_STATE != NOT_FOUND ]]; then
      say "deleting queued resource $NAME"
      queued_delete --quiet || say "delete failed (status $?); asking again"
    elif [[ $HEALTH == gone ]]; then
      say "creating queued resource $NAME ($ACCELERATOR_TYPE)"
      status=0
      queued_create || status=$?
      if ((status)); then
        say "queued-resources create failed (status $status)"
        exit "$status"
      fi
      CREATED=1 NEEDS_INSTALL=1 dry=ACTIVE
      continue
    fi
    if ((SECONDS - started >= WAIT_TIMEOUT)); then
      say "not ready after ${WAIT_TIMEOUT}s (--wait-timeout): deleting the request; rerun to try again"
      queued_delete --quiet || true
      exit 75
    fi
    sleep "$POLL_INTERVAL"
  done
}

# Sets TRAINER to what worker 0's `tpu_worker.sh exit-status` says: running, none, the exit status
# of the last trainer, or unreachable.
trainer_status() {
  ssh_argv 0 "$(worker_command exit-status)"
  if query 0 "${SSH_ARGV[@]}" && [[ $REPLY =~ ^([0-9]+|running|none)$ ]]; then
    TRAINER=$REPLY
  else
    TRAINER=unreachable
  fi
}

# Follows worker 0's log until its trainer ends or the connection drops, then sets OUTCOME: gone
# (the slice was preempted or lost), or worker 0's answer: 0, 75, another status, none, unreachable.
follow_until_end() {
  local started
  while :; do
    say "following worker 0's log"
    tpu_ssh 0 "$(worker_command wait)" || true
    started=$SECONDS
    slice_health ACTIVE
    while [[ $HEALTH == waiting ]] && ((SECONDS - started < WAIT_TIMEOUT)); do
      say "$SLICE_STATE: waiting"
      sleep "$POLL_INTERVAL"
      slice_health ACTIVE
    done
    if [[ $HEALTH != ready ]]; then
      say "slice lost: $SLICE_STATE"
      OUTCOME=gone
      return 0
    fi
    trainer_status
    if [[ $TRAINER != running ]]; then
      OUTCOME=$TRAINER
      return 0
    fi
    say "the connection ended while the trainer runs: following again"
    sleep "$POLL_INTERVAL"
  done
}

# Counts one more rerun for REASON; past --max-restarts exits 75.
count_restart() {
  if ((RESTARTS >= MAX_RESTARTS)); then
    say "$1; giving up after $RESTARTS restarts (--max-restarts): rerun the same command to go on"
    exit 75
  fi
  RESTARTS=$((RESTARTS + 1))
  say "$1; restart $RESTARTS of $MAX_RESTARTS"
}

# Starts MAIN_ARGS on a ready slice, installing first when it is new; on the first pass a trainer
# that already runs there (a supervisor started again) is followed instead. Returns 1 when the
# slice was lost while installing.
start_training() {
  local status=0
  if ((RESTARTS == 0 && CREATED == 0)); then
    trainer_status
    if [[ $TRAINER == running ]]; then
      say "a trainer already runs on $NAME: following it"
      return 0
    fi
  fi
  if ((NEEDS_INSTALL)); then
    say "installing on every worker"
    install_code || status=$?
    if ((status)); then
      slice_health ACTIVE
      if [[ $HEALTH == gone ]]; then
        say "slice lost while installing: $SLICE_STATE"
        return 1
      fi
      say "install failed (status $status) on a healthy slice: not retrying"
      exit "$status"
    fi
    NEEDS_INSTALL=0
  fi
  say "starting the trainer on every worker"
  tpu_ssh all "$(start_command "--prefix --detach")" || say "start ended with status $?"
}

cmd_supervise() {
  parse_args "--zone --project --accelerator-type --version --spot --reserved --valid-until-duration \
--repo --ref --extras --constraints --max-restarts --poll-interval --wait-timeout --delete-when-done \
--" "$@"
  ((HAVE_DASHDASH)) || die "supervise: put main's arguments after '--' (e.g. -- --config=configs/demo.py --workdir=gs://B/D)"
  check_queued_options
  check_install_options
  MAX_RESTARTS=${MAX_RESTARTS:-20}
  POLL_INTERVAL=${POLL_INTERVAL:-60}
  WAIT_TIMEOUT=${WAIT_TIMEOUT:-86400}
  [[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "supervise: --max-restarts takes a number"
  [[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] || die "supervise: --wait-timeout takes a number of seconds"
  [[ $POLL_INTERVAL =~ ^[0-9]+([.][0-9]+)?$ ]] || die "supervise: --poll-interval takes seconds"
  if [[ ${DRY_RUN:-0} != 1 ]]; then
    QUERY_ERRORS="$(mktemp "${TMPDIR:-/tmp}/tpu_vm_errors.XXXXXX")"
    TEMP_FILES+=("$QUERY_ERRORS")
  fi
  RESTARTS=0 NEEDS_INSTALL=1
  say "supervising: at most $MAX_RESTARTS restarts, polling every ${POLL_INTERVAL}s"
  case " ${MAIN_ARGS[*]-} " in
    *" --workdir=gs://"*|*" --workdir gs://"*) ;;
    *) say "warning: no --workdir=gs://...: a recreated slice has new disks and starts from scratch" ;;
  esac
  while :; do
    wait_until_ready
    if start_training; then
      follow_until_end
    else
      OUTCOME=gone
    fi
    case $OUTCOME in
      0)
        say "the trainer finished (status 0)"
        if ((DELETE_WHEN_DONE)); then
          say "deleting queued resource $NAME (--delete-when-done)"
          queued_delete --quiet || say "delete failed (status $?): run delete $NAME --queued"
        fi
        exit 0
        ;;
      gone) count_restart "the slice was preempted: recreating it" ;;
      75|none|unreachable)
        count_restart "the trainer stopped ($OUTCOME) on a healthy slice: rerunning it there"
        tpu_ssh all "$(worker_command stop)" || true
        ;;
      *)
        say "the trainer failed (status $OUTCOME): not retrying"
        exit "$OUTCOME"
        ;;
    esac
  done
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
    supervise) cmd_supervise "$@" ;;
    -h|--help|help) usage ;;
    *)
      echo "tpu_vm.sh: unknown subcommand '$SUB'" >&2
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
