#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine (CI, or a laptop to try the profile).
#
#   sudo .ci/slurm/start-cluster.sh     # idempotent; prints the node state when ready
#   sudo .ci/slurm/stop-cluster.sh      # stops exactly what this script started
#
# What it does, as root and without systemd:
#   1. installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing;
#   2. writes /etc/slurm/slurm.conf for this machine (nproc CPUs, total memory minus 512 MB).
#      It must live there: the SLURM executor's job step strips every SLURM_* variable
#      (SLURM_CONF too) before its inner srun;
#   3. creates a munge key if there is none, starts munged (as user munge), slurmctld and slurmd;
#   4. waits until `sinfo` shows the node idle.
# The pids of the daemons it started go to $STATE (default /run/cellstage-slurm); a daemon that
# was already running is reused and not recorded, so stop-cluster.sh never stops it.
set -euo pipefail

STATE=${CELLSTAGE_SLURM_STATE:-/run/cellstage-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by cellstage .ci/slurm/start-cluster.sh"
TIMEOUT=${CELLSTAGE_SLURM_TIMEOUT:-60}

log() { echo "[start-cluster] $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages, starts daemons)"

# --- 1. packages --------------------------------------------------------------------------
missing=()
for bin in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sinfo /usr/sbin/munged; do
    [ -x "$bin" ] || missing+=("$bin")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null || die "apt-get install failed"
fi

mkdir -p "$STATE"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Already up (started by us earlier)? Then there is nothing to do.
if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && sinfo -h >/dev/null 2>&1; then
    log "cluster already running: $(sinfo -h -o '%N %T')"
    exit 0
fi

# --- 2. slurm.conf --------------------------------------------------------------------------
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo) - 512 ))
if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to overwrite a real site config"
fi
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat >"$CONF" <<EOF
$MARKER ($(date -u +%FT%TZ)); stop-cluster.sh removes it.
ClusterName=cellstage-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# no slurmdbd: jobs are tracked with squeue, which needs finished jobs kept >= 3x the first
# status-check delay (profile: slurm-status-command: squeue)
MinJobAge=300
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=ci Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
log "wrote $CONF (node $HOST, $CPUS CPUs, $MEM_MB MB)"

# --- 3. daemons -------------------------------------------------------------------------------
# munge: reuse a running munged (its socket answers), otherwise start one as user munge.
if ! munge -n </dev/null >/dev/null 2>&1; then
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
    [ -s /run/munge/munged.pid ] || die "munged did not start"
    cp /run/munge/munged.pid "$STATE/munged.pid"
    log "munged started (pid $(cat "$STATE/munged.pid"))"
else
    log "munged already running; reusing it"
fi
munge -n </dev/null | unmunge >/dev/null || die "munge round trip failed"

start_daemon() { # name, pidfile written by the daemon, command...
    local name=$1 pidfile=$2
    shift 2
    if alive "$pidfile"; then
        die "$name already runs (pid $(cat "$pidfile")) but was not started by this script"
    fi
    rm -f "$pidfile"
    "$@"
    for _ in $(seq 100); do [ -s "$pidfile" ] && break; sleep 0.1; done
    alive "$pidfile" || die "$name did not start; see /var/log/slurm/$name.log"
    cp "$pidfile" "$STATE/$name.pid"
    log "$name started (pid $(cat "$pidfile"))"
}
# -c: start with a clean job state (no jobs left over from an earlier CI run)
start_daemon slurmctld /run/slurmctld.pid /usr/sbin/slurmctld -c
start_daemon slurmd /run/slurmd.pid /usr/sbin/slurmd

# --- 4. wait for the node ---------------------------------------------------------------------
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
    node_state=$(sinfo -h -n "$HOST" -o '%T' 2>/dev/null | head -1 || true)
    case "$node_state" in
        idle|mixed|allocated) break ;;
        down*|drain*|drained*)
            scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        scontrol show node "$HOST" >&2 || true
        die "node $HOST not idle after ${TIMEOUT}s (state: ${node_state:-none})"
    fi
    sleep 0.5
done
log "cluster ready: $(sinfo -h -o '%P %N %T %c CPUs %m MB')"
