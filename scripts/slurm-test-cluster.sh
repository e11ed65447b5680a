#!/usr/bin/env bash
# A one-node Slurm cluster on localhost for spur's tests: munged, slurmctld and
# slurmd started directly (no systemd), with fake GPUs. Idempotent.
#
#   scripts/slurm-test-cluster.sh start [STATE_DIR]   install if needed, (re)start, wait until idle
#   scripts/slurm-test-cluster.sh stop  [STATE_DIR]   stop the three daemons
#   scripts/slurm-test-cluster.sh status [STATE_DIR]  exit 0 if the node answers, 1 otherwise
#
# STATE_DIR defaults to $SPUR_SLURM_STATE, else /tmp/spur-slurm. Clients find the
# cluster through SLURM_CONF=$STATE_DIR/slurm.conf (also written to $STATE_DIR/env).
# Installing Debian's packages needs root; running the cluster needs root too,
# because slurmd must start jobs as their owner.
#
# Environment: SPUR_SLURM_CPUS (CPUs the node claims, default 16),
# SPUR_SLURM_CTLD_PORT / SPUR_SLURM_SLURMD_PORT (default 6817 / 6818).
set -euo pipefail

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

cmd=${1:-start}
state=${2:-${SPUR_SLURM_STATE:-/tmp/spur-slurm}}
case "$cmd" in start | stop | status) ;; *) usage ;; esac
case "$state" in /*) ;; *) state="$PWD/$state" ;; esac

conf="$state/slurm.conf"
node=spurnode
partition=debug
cpus=${SPUR_SLURM_CPUS:-16}
ctld_port=${SPUR_SLURM_CTLD_PORT:-6817}
slurmd_port=${SPUR_SLURM_SLURMD_PORT:-6818}

log() { echo "slurm-test-cluster: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# True if the pid file names a live process of that name (not a reused pid).
alive() {
    local pidfile=$1 name=$2 pid
    [ -s "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}

stop_daemon() {
    local name=$1 pidfile=$2 pid i
    alive "$pidfile" "$name" || return 0
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) did not stop on SIGTERM; killing it"
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

stop_all() {
    stop_daemon slurmd "$state/run/slurmd.pid"
    stop_daemon slurmctld "$state/run/slurmctld.pid"
    stop_daemon munged "$state/run/munged.pid"
}

node_state() {
    SLURM_CONF=$conf timeout 10 sinfo --noheader --nodes="$node" --format=%T 2>/dev/null | head -n1
}

mkdir -p "$state"/{log,run,spool/ctld,spool/d}
chmod 700 "$state/run"
# One start or stop at a time (test binaries and CI may call this together).
exec 9>"$state/lock"
flock 9

if [ "$cmd" = stop ]; then
    stop_all
    log "stopped (state kept in $state)"
    exit 0
fi

if [ "$cmd" = status ]; then
    s=$(node_state || true)
    [ -n "$s" ] || {
        log "not running"
        exit 1
    }
    echo "$s"
    exit 0
fi

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; install them as root: apt-get install slurmctld slurmd slurm-client munge"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them with"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >"$state/log/apt.log" 2>&1 || die "apt-get update failed; see $state/log/apt.log"
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >>"$state/log/apt.log" 2>&1 ||
        die "apt-get install failed; see $state/log/apt.log"
}

render_slurm_conf() {
    local host
    host=$(hostname -s)
    cat <<EOF
# Written by scripts/slurm-test-cluster.sh: a one-node test cluster.
ClusterName=spurtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Short credential life so that a requeued job may start again after ~10 s, not 120 s.
AuthInfo=socket=$state/run/munge.socket,cred_expire=10
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/d
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Look at pending jobs every second (default 60 s / 30 s), so that dependent and
# requeued jobs start within seconds on this small cluster.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
# Without a default, each job would take the node's whole memory and jobs would run one at a time.
DefMemPerCPU=100
SlurmdParameters=config_overrides
ReturnToService=2
# Keep finished jobs visible to squeue/scontrol for an hour (there is no accounting).
MinJobAge=3600
MaxJobCount=100000
MaxArraySize=100001
KillWait=5
InactiveLimit=0
GresTypes=gpu
NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=16000 Gres=gpu:fake:4 State=UNKNOWN
PartitionName=$partition Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

render_gres_conf() {
    cat <<EOF
# Fake GPUs: Slurm only needs device files to hand out; it then sets CUDA_VISIBLE_DEVICES per job.
NodeName=$node Name=gpu Type=fake File=/dev/tty[0-3]
EOF
}

install_packages

new_conf=$(render_slurm_conf)
new_gres=$(render_gres_conf)
if alive "$state/run/munged.pid" munged && alive "$state/run/slurmctld.pid" slurmctld &&
    alive "$state/run/slurmd.pid" slurmd &&
    [ "$new_conf" = "$(cat "$conf" 2>/dev/null)" ] && [ "$new_gres" = "$(cat "$state/gres.conf" 2>/dev/null)" ]; then
    log "already running with this configuration"
else
    [ "$(id -u)" -eq 0 ] || die "the test cluster must be started as root (slurmd starts jobs as their owner)"
    for t in /dev/tty0 /dev/tty1 /dev/tty2 /dev/tty3; do
        [ -e "$t" ] || die "$t is missing: the fake GPUs in gres.conf are mapped to /dev/tty[0-3]"
    done
    stop_all
    printf '%s\n' "$new_conf" >"$conf"
    printf '%s\n' "$new_gres" >"$state/gres.conf"
    if [ ! -s "$state/munge.key" ]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$state/munge.key"
        else
            dd if=/dev/urandom of="$state/munge.key" bs=1024 count=1 2>/dev/null
        fi
    fi
    chmod 600 "$state/munge.key"
    # Daemons get their own session and no inherited stdio, so a caller that
    # captures this script's output (e.g. a test) is not kept waiting.
    setsid munged --force --key-file="$state/munge.key" --socket="$state/run/munge.socket" \
        --pid-file="$state/run/munged.pid" --log-file="$state/log/munged.log" \
        --seed-file="$state/run/munged.seed" </dev/null >>"$state/log/munged.out" 2>&1 9>&- ||
        die "munged did not start; see $state/log/munged.log"
    # -c: start with no jobs from an earlier run of the test cluster.
    setsid slurmctld -c -f "$conf" </dev/null >>"$state/log/slurmctld.out" 2>&1 9>&- ||
        die "slurmctld did not start; see $state/log/slurmctld.log"
    setsid slurmd -f "$conf" -N "$node" </dev/null >>"$state/log/slurmd.out" 2>&1 9>&- ||
        die "slurmd did not start; see $state/log/slurmd.log"
fi

printf 'export SLURM_CONF=%s\n' "$conf" >"$state/env"

s=""
for i in $(seq 1 120); do
    s=$(node_state || true)
    case "$s" in
    idle | mixed | allocated | completing) break ;;
    down* | drain* | fail*)
        SLURM_CONF=$conf scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
        ;;
    esac
    sleep 0.5
done
case "$s" in
idle | mixed | allocated | completing) ;;
*) die "node $node is '${s:-not answering}' after 60 s; see $state/log/slurmctld.log and $state/log/slurmd.log" ;;
esac
log "node $node is $s; use: export SLURM_CONF=$conf"
