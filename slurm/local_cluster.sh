#!/bin/bash
# A one-node Slurm cluster on localhost, for tests and for trying the job scripts without a cluster.
#
#   slurm/local_cluster.sh start    # install Debian's slurm + munge if missing, start the daemons (idempotent)
#   slurm/local_cluster.sh status   # daemons we started, node state; exit 0 iff the node answers
#   slurm/local_cluster.sh stop     # stop exactly the daemons `start` started
#   slurm/local_cluster.sh env      # print `export SLURM_CONF=...` for the client commands
#
# Needs root (apt, munge, SlurmUser=root). Everything it writes lives under $EVE_SLURM_STATE
# (default /tmp/eve_slurm): slurm.conf, spool, state save location, logs, and `pids` (one "name pid" line
# per daemon this script started; `stop` signals only those). The munge key goes where munged expects it,
# /etc/munge/munge.key (created only if missing). Client commands find the config through SLURM_CONF;
# if /etc/slurm/slurm.conf does not exist, `start` also links it to ours so that a bare `sbatch` works,
# and `stop` removes that link again.
#
# Knobs: EVE_SLURM_STATE, EVE_SLURM_CPUS (default: max(2, nproc)), EVE_SLURM_MEM_MB (default 8000),
# EVE_SLURM_CTLD_PORT / EVE_SLURM_D_PORT (default 6817 / 6818).
set -euo pipefail

STATE=${EVE_SLURM_STATE:-/tmp/eve_slurm}
CONF=$STATE/slurm.conf
PIDS=$STATE/pids
ETC_LINK=/etc/slurm/slurm.conf
NODE=localhost

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    local apt_log=$STATE/log/apt.log
    log "installing ${missing[*]} (log: $apt_log)"
    export DEBIAN_FRONTEND=noninteractive
    # Without package lists (a fresh container) the first install fails: update, then try again.
    apt-get install -y --no-install-recommends "${missing[@]}" >"$apt_log" 2>&1 ||
        { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; } >>"$apt_log" 2>&1 ||
        die "apt-get install ${missing[*]} failed, see $apt_log"
}

write_conf() {
    local cpus mem
    cpus=${EVE_SLURM_CPUS:-$(nproc)}
    ((cpus >= 2)) || cpus=2
    mem=${EVE_SLURM_MEM_MB:-8000}
    # config_overrides: the node is what this file says (2 CPUs suffice for the 2-task test job even on a
    # 1-core machine). cred_expire is also how long a requeued job waits before it may start again
    # (default 120 s), hence the short value; the short scheduler intervals start it as soon as it may.
    cat >"$CONF.tmp" <<EOF
# Written by slurm/local_cluster.sh; regenerated on every start.
ClusterName=eve-local
SlurmctldHost=localhost
SlurmctldPort=${EVE_SLURM_CTLD_PORT:-6817}
SlurmdPort=${EVE_SLURM_D_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
MinJobAge=600
InactiveLimit=0
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

# "name pid" lines of the daemons this script started.
record() { echo "$1 $2" >>"$PIDS"; }
recorded_pid() { [[ -f $PIDS ]] && awk -v n="$1" '$1 == n {p = $2} END {if (p) print p}' "$PIDS"; }
# A recorded pid counts only while it still runs the program it was recorded for (pids get reused).
alive() { [[ -n ${2:-} && -r /proc/$2/comm && $(cat "/proc/$2/comm") == "$1" ]]; }

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then return 0; fi
    local key=/etc/munge/munge.key
    if [[ ! -s $key ]]; then
        log "creating $key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge "$key"
    chmod 700 /etc/munge
    chmod 400 "$key"
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    local pid=""
    for _ in $(seq 50); do
        pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
        munge_ok && break
        sleep 0.2
    done
    munge_ok || die "munged did not come up (see /var/log/munge/munged.log)"
    [[ -n $pid ]] && record munged "$pid"
    log "started munged (pid $pid)"
}

# start_daemon NAME PIDFILE ARGS...: daemonizes; the pid comes from its pid file.
start_daemon() {
    local name=$1 pidfile=$2
    shift 2
    if alive "$name" "$(recorded_pid "$name")"; then return 0; fi
    rm -f "$pidfile"
    "$name" "$@"
    local pid=""
    for _ in $(seq 50); do
        pid=$(cat "$pidfile" 2>/dev/null || true)
        alive "$name" "$pid" && break
        sleep 0.2
    done
    alive "$name" "$pid" || die "$name did not start (see $STATE/log/$name.log)"
    record "$name" "$pid"
    log "started $name (pid $pid)"
}

node_state() { SLURM_CONF=$CONF sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1; }

wait_idle() {
    local state=""
    for _ in $(seq 60); do
        state=$(node_state)
        case $state in
        idle | mixed | allocated) return 0 ;;
        down* | drain* | fail*) SLURM_CONF=$CONF scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    die "node $NODE is '${state:-unreachable}', not idle (see $STATE/log/)"
}

link_etc_conf() {
    # Only where no other Slurm is configured: then a bare `sbatch` (no SLURM_CONF) finds this cluster.
    if [[ ! -e $ETC_LINK && ! -L $ETC_LINK ]]; then
        mkdir -p "$(dirname "$ETC_LINK")"
        ln -s "$CONF" "$ETC_LINK"
        echo "$ETC_LINK" >"$STATE/etc_link"
    elif [[ $(readlink "$ETC_LINK" || true) != "$CONF" ]]; then
        log "$ETC_LINK belongs to another Slurm: export SLURM_CONF=$CONF for the client commands"
    fi
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (munge key, SlurmUser=root)"
    mkdir -p "$STATE"/{spool/ctld,spool/d,log}
    install_packages
    if ! alive slurmctld "$(recorded_pid slurmctld)"; then write_conf; fi
    start_munge
    start_daemon slurmctld "$STATE/slurmctld.pid" -f "$CONF" -i
    start_daemon slurmd "$STATE/slurmd.pid" -f "$CONF" -N "$NODE"
    link_etc_conf
    wait_idle
    log "node $NODE is $(node_state); export SLURM_CONF=$CONF"
}

stop_pid() {
    local name=$1 pid=$2
    alive "$name" "$pid" || return 0
    kill -TERM "$pid"
    for _ in $(seq 100); do
        alive "$name" "$pid" || { log "stopped $name (pid $pid)"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    log "killed $name (pid $pid)"
}

cmd_stop() {
    if [[ -f $PIDS ]]; then
        # slurmd first (it reports to slurmctld), munged last (both daemons authenticate through it).
        local name
        for name in slurmd slurmctld munged; do
            stop_pid "$name" "$(recorded_pid "$name")"
        done
        rm -f "$PIDS"
    else
        log "nothing recorded in $PIDS: no daemons of ours to stop"
    fi
    if [[ -f $STATE/etc_link && $(readlink "$ETC_LINK" || true) == "$CONF" ]]; then rm -f "$ETC_LINK"; fi
    rm -f "$STATE/etc_link"
}

cmd_status() {
    local name pid rc=0
    for name in munged slurmctld slurmd; do
        pid=$(recorded_pid "$name" || true)
        if alive "$name" "$pid"; then echo "$name: running (pid $pid, started by us)"; else echo "$name: not started by us"; fi
    done
    if [[ -f $CONF ]] && SLURM_CONF=$CONF sinfo >/dev/null 2>&1; then
        SLURM_CONF=$CONF sinfo -N -l
    else
        echo "slurmctld at $CONF does not answer"
        rc=1
    fi
    return "$rc"
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
    ;;
esac
