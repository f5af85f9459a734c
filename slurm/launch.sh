#!/bin/bash
# Shared launcher behind every slurm/pretrain_*.sh: one trainer task per GPU through srun, then requeue the
# job if the trainer was preempted (or failed) and the restart budget allows it.
#
#   slurm/launch.sh --config NAME [--run-dir DIR] [key=value ...]      (inside an sbatch allocation)
#
# The last --config wins, so a job script's default can be replaced at submission. Environment knobs (set
# them at submission: `EVE_VENV=~/venvs/eve sbatch slurm/pretrain_large.sh`; all are described in
# slurm/README.md):
#   EVE_ROOT                checkout to run (default: the submission directory)
#   EVE_ENV_SCRIPT          file sourced first (module loads, proxies, ...)
#   EVE_VENV                virtualenv to activate
#   EVE_CONDA_ENV           conda environment to activate
#   EVE_PYTHON              interpreter (default: python)
#   EVE_DATA_ROOT           shard root, expanded by the configs' shard paths (${EVE_DATA_ROOT}/coco/...)
#   EVE_RUN_ROOT            parent of the default run directory <config>-<jobid> (default: $EVE_ROOT/runs)
#   EVE_MAX_RESTARTS        requeue only while SLURM_RESTART_COUNT < this (default 20)
#   EVE_REQUEUE_ON_FAILURE  1: a crash (any exit code but 0, 85, 2 = config error, 3 = non-finite
#                           losses) also requeues (default 1)
#   EVE_MASTER_PORT         rendezvous port (default 20000 + job id mod 20000)
#
# Exit codes: the trainer's (0 done, 85 preempted after saving a checkpoint, 2 config error, 3 non-finite
# losses, other: crashed); a job that requeues itself is killed by Slurm right after `scontrol requeue`.
set -euo pipefail

EXIT_PREEMPTED=85 # eve_ds.train.EXIT_PREEMPTED

# To the job's stdout and, once the run directory is known, to this attempt's log in it.
log() {
    local line
    line="[launch $(date +%FT%T)] $*"
    echo "$line"
    if [[ -n ${LOG:-} ]]; then echo "$line" >>"$LOG"; fi
}
die() {
    log "error: $*"
    exit 2
}

# -> CONFIG, RUN_DIR, TRAIN_ARGS (everything but --config/--run-dir, in order)
parse_args() {
    CONFIG="" RUN_DIR="" TRAIN_ARGS=()
    while (($#)); do
        case $1 in
        --config | --run-dir)
            (($# >= 2)) || die "$1 needs a value"
            if [[ $1 == --config ]]; then CONFIG=$2; else RUN_DIR=$2; fi
            shift 2
            ;;
        --config=*) CONFIG=${1#*=} && shift ;;
        --run-dir=*) RUN_DIR=${1#*=} && shift ;;
        *) TRAIN_ARGS+=("$1") && shift ;;
        esac
    done
    [[ -n $CONFIG ]] || die "no --config given"
    local tag
    tag=$(basename "${CONFIG%.y*ml}")
    RUN_DIR=${RUN_DIR:-${EVE_RUN_ROOT:-runs}/$tag-$SLURM_JOB_ID}
    mkdir -p "$RUN_DIR/logs"
    RUN_DIR=$(cd "$RUN_DIR" && pwd) # absolute: the tasks may start in another directory
}

activate_env() {
    set +u # activation scripts (conda's above all) read unset variables
    # shellcheck disable=SC1090 # user-provided files
    if [[ -n ${EVE_ENV_SCRIPT:-} ]]; then source "$EVE_ENV_SCRIPT"; fi
    # shellcheck disable=SC1091
    if [[ -n ${EVE_VENV:-} ]]; then source "$EVE_VENV/bin/activate"; fi
    if [[ -n ${EVE_CONDA_ENV:-} ]]; then
        eval "$(conda shell.bash hook)"
        conda activate "$EVE_CONDA_ENV"
    fi
    set -u
    export PYTHONPATH=$EVE_ROOT${PYTHONPATH:+:$PYTHONPATH}
}

setup_dist() {
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    MASTER_PORT=${EVE_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    # One task per GPU, each with its own cores: torch's intra-op pool must not spill onto a neighbour's.
    OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
    export MASTER_ADDR MASTER_PORT OMP_NUM_THREADS
}

# Runs the trainer on every task; its output goes to the job's stdout and to $LOG. Returns srun's exit code
# (the highest of the tasks').
run_tasks() {
    local rc=0
    # srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05), so pass it on. Each task exports
    # the torch.distributed variables from its Slurm ones, then becomes the trainer.
    # The tee ignores USR1/TERM: with `scancel --full` or at the time limit they reach every process of the
    # batch step, and a dead tee would take the log (and the launcher, by SIGPIPE) with it.
    # shellcheck disable=SC2016 # expanded by each task, not here
    srun --label --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
        bash -c 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"' \
        eve-task "${EVE_PYTHON:-python}" -m eve_ds.cli.pretrain --config "$CONFIG" --run-dir "$RUN_DIR" \
        "${TRAIN_ARGS[@]}" 2>&1 | (trap '' USR1 TERM && exec tee -a "$LOG") || rc=$?
    return "$rc"
}

# `eve-pretrain --dry-run` in the batch shell, before srun: a missing shard, init checkpoint or a bad
# layout costs seconds, not an allocation. Exit 2 (no requeue) with every problem in the log.
preflight() {
    [[ ${EVE_SKIP_PREFLIGHT:-0} == 1 ]] && return 0
    local rc=0
    "${EVE_PYTHON:-python}" -m eve_ds.cli.pretrain --config "$CONFIG" --run-dir "$RUN_DIR" --dry-run \
        --world-size "$SLURM_NTASKS" "${TRAIN_ARGS[@]}" 2>&1 | tee -a "$LOG" || rc=$?
    if ((rc != 0)); then
        log "preflight failed (exit $rc): nothing was started; fix the problems above and resubmit"
        exit 2
    fi
}

# Decide what a finished srun means for the job: done, requeue, or give up.
finish() {
    local rc=$1 restarts=${SLURM_RESTART_COUNT:-0} max=${EVE_MAX_RESTARTS:-20}
    if ((rc == 0)); then
        log "trainer finished (exit 0)"
        exit 0
    elif ((rc == EXIT_PREEMPTED)); then
        log "trainer saved a checkpoint and stopped on a signal (exit $rc)"
    elif ((rc == 2 || rc == 3)); then
        # Failures a restart would only repeat: a config error, or the non-finite-loss stop.
        log "trainer failed (exit $rc: $([[ $rc == 2 ]] && echo "config error" || echo "non-finite losses")); not requeueing"
        exit "$rc"
    elif [[ ${EVE_REQUEUE_ON_FAILURE:-1} == 1 ]]; then
        log "trainer failed (exit $rc); it will resume from the latest complete checkpoint"
    else
        log "trainer failed (exit $rc); EVE_REQUEUE_ON_FAILURE=0, not requeueing"
        exit "$rc"
    fi
    if ((ENDING)); then
        log "not requeueing: the job was cancelled, hit its time limit or was preempted; resubmit with" \
            "--run-dir $RUN_DIR to resume"
        exit "$rc"
    fi
    if ((restarts >= max)); then
        log "not requeueing: restart $restarts reached EVE_MAX_RESTARTS=$max"
        exit "$rc"
    fi
    log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $max)"
    scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed (job cancelled or not requeueable)"
    exit "$rc"
}

main() {
    # The signals that stop the trainer go to its tasks (sbatch --signal without B:); the batch shell only
    # has to survive them. SIGTERM reaches the batch shell when Slurm itself ends the job (scancel, time
    # limit, preemption): then the job must not requeue itself.
    ENDING=0
    trap 'log "batch shell got SIGUSR1"' USR1
    trap 'ENDING=1 && log "batch shell got SIGTERM: Slurm is ending this job"' TERM
    [[ -n ${SLURM_JOB_ID:-} ]] || die "run this inside a Slurm job: sbatch slurm/pretrain_<model>.sh"
    EVE_ROOT=$(cd "${EVE_ROOT:-${SLURM_SUBMIT_DIR:-.}}" && pwd)
    [[ -d $EVE_ROOT/eve_ds ]] || die "EVE_ROOT=$EVE_ROOT is not an EVE-DS checkout (submit from the repo root or set EVE_ROOT)"
    cd "$EVE_ROOT"
    parse_args "$@"
    activate_env
    setup_dist
    LOG=$RUN_DIR/logs/slurm-$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}.log
    log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: config $CONFIG, run dir $RUN_DIR"
    log "nodes $SLURM_JOB_NODELIST, $SLURM_NTASKS tasks x ${SLURM_CPUS_PER_TASK:-1} cpus, master $MASTER_ADDR:$MASTER_PORT"
    log "trainer args: ${TRAIN_ARGS[*]}"
    preflight
    local rc=0
    run_tasks || rc=$?
    finish "$rc"
}

main "$@"
