#!/usr/bin/env bash
# Starts one mobilebert_jax process on this node of a multi-node GPU job: works out
# --coordinator_address, --num_processes and --process_id, then execs
#   python -m mobilebert_jax.main <those flags> "$@"
# Run it once per node (under SLURM: srun --ntasks-per-node=1 launch/gpu_multinode.sh ARGS...);
# each process drives every GPU of its node. See launch/slurm_example.sbatch and launch/README.md.
#
# Where the three values come from, first match wins:
#   1. Plain environment: COORDINATOR_ADDRESS (HOST:PORT of process 0), NUM_PROCESSES, PROCESS_ID
#      (set all three; for any launcher: mpirun, pdsh, Kubernetes, by hand).
#   2. SLURM: PROCESS_ID = SLURM_NODEID, NUM_PROCESSES = SLURM_NNODES, coordinator = the first host
#      of SLURM_JOB_NODELIST (`scontrol show hostnames`, or, without scontrol, this script's own
#      parser of the compressed list, e.g. gpu[003-006,9] -> gpu003), or SLURM_COORDINATOR=HOST if
#      set (e.g. to name a faster interface: node01-ib). Port: COORDINATOR_PORT, default
#      20000 + SLURM_JOB_ID % 20000 (so two jobs sharing a node do not collide).
#   3. Neither: a single process, no flags.
# If the arguments already contain --coordinator_address, nothing is added.
#
# The environment (once, where every node sees it), at versions known to work together:
#   pip install -c launch/constraints/cuda12.txt -e . "jax[cuda12]" gcsfs
# (without `-c launch/constraints/cuda12.txt`: the newest releases).
#
# Environment: PYTHON (interpreter, default python), DRY_RUN=1 (print the command, run nothing).
set -euo pipefail

die() {
  echo "gpu_multinode.sh: $*" >&2
  exit 2
}

# quote_word: shared with the other launchers.
launch_dir=${BASH_SOURCE[0]%/*}
[[ $launch_dir == "${BASH_SOURCE[0]}" ]] && launch_dir=.
# shellcheck source=launch/lib.sh disable=SC1091
source "$launch_dir/lib.sh"

is_uint() {
  [[ $1 =~ ^[0-9]+$ ]]
}

# First host of a SLURM compressed node list: "gpu[001-004,007],cpu5" -> gpu001,
# "rack[1-2]-n[08-09]" -> rack1-n08, "a,b" -> a. Pure bash: no scontrol needed.
first_host() {
  local list=$1 item="" host="" inner c i depth=0
  for ((i = 0; i < ${#list}; i++)); do
    c=${list:i:1}
    if [[ $c == '[' ]]; then
      depth=$((depth + 1))
    elif [[ $c == ']' ]]; then
      depth=$((depth - 1))
    elif [[ $c == ',' ]] && ((depth == 0)); then
      break
    fi
    item+=$c
  done
  while [[ $item == *'['*']'* ]]; do
    host+=${item%%\[*}
    item=${item#*\[}
    inner=${item%%\]*}
    item=${item#*\]}
    inner=${inner%%,*}
    host+=${inner%%-*}
  done
  printf '%s\n' "$host$item"
}

# Sets COORD, NPROC, PID_ (empty when this is a single-process run).
derive() {
  COORD="" NPROC="" PID_=""
  if [[ -n ${COORDINATOR_ADDRESS:-} || -n ${NUM_PROCESSES:-} || -n ${PROCESS_ID:-} ]]; then
    [[ -n ${COORDINATOR_ADDRESS:-} && -n ${NUM_PROCESSES:-} && -n ${PROCESS_ID:-} ]] ||
      die "set all of COORDINATOR_ADDRESS (HOST:PORT), NUM_PROCESSES and PROCESS_ID"
    [[ $COORDINATOR_ADDRESS == *:* ]] || die "COORDINATOR_ADDRESS must be HOST:PORT, got $COORDINATOR_ADDRESS"
    COORD=$COORDINATOR_ADDRESS NPROC=$NUM_PROCESSES PID_=$PROCESS_ID
  elif [[ -n ${SLURM_NNODES:-} && -n ${SLURM_NODEID:-} ]]; then
    if [[ -n ${SLURM_NTASKS:-} && $SLURM_NTASKS != "$SLURM_NNODES" ]]; then
      die "SLURM has $SLURM_NTASKS tasks on $SLURM_NNODES nodes; run one task per node" \
        "(srun --ntasks-per-node=1): each process uses all of its node's GPUs"
    fi
    local host port nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
    if [[ -n ${SLURM_COORDINATOR:-} ]]; then
      host=$SLURM_COORDINATOR
    elif [[ -z $nodelist ]]; then
      die "SLURM_JOB_NODELIST is not set; set SLURM_COORDINATOR=HOST"
    elif command -v scontrol >/dev/null 2>&1; then
      host="$(scontrol show hostnames "$nodelist")"
      host=${host%%$'\n'*}
    else
      host="$(first_host "$nodelist")"
    fi
    [[ -n $host ]] || die "could not find the first host of '$nodelist'; set SLURM_COORDINATOR=HOST"
    if [[ $host == *:* ]]; then
      COORD=$host
    else
      port=${COORDINATOR_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
      COORD="$host:$port"
    fi
    NPROC=$SLURM_NNODES PID_=$SLURM_NODEID
  else
    return 0
  fi
  is_uint "$NPROC" || die "number of processes must be a number, got '$NPROC'"
  is_uint "$PID_" || die "process id must be a number, got '$PID_'"
  ((PID_ < NPROC)) || die "process id $PID_ is not below the number of processes $NPROC"
}

main() {
  local -a cmd=("${PYTHON:-python}" -m mobilebert_jax.main)
  case " $* " in
    *" --coordinator_address"*) ;;
    *)
      derive
      if [[ -n $COORD ]]; then
        cmd+=("--coordinator_address=$COORD" "--num_processes=$NPROC" "--process_id=$PID_")
      fi
      ;;
  esac
  cmd+=("$@")
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    local first=1 w
    for w in "${cmd[@]}"; do
      ((first)) || printf ' '
      first=0
      quote_word "$w"
    done
    printf '\n'
    return 0
  fi
  exec "${cmd[@]}"
}

main "$@"
