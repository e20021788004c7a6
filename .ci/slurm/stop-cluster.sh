#!/usr/bin/env bash
# Stop exactly the daemons .ci/slurm/start-cluster.sh started (by the pids it recorded in $STATE),
# cancel what is left in the queue first, and remove the /etc/slurm/slurm.conf it wrote.
#
# Removing slurm.conf matters: with the client tools installed, the Snakemake SLURM executor
# plugin runs `scontrol show config` whenever snakemake starts; without a config it fails at
# once, with a config but no controller it waits ~10 s (its timeout) on every start.
# The Debian packages stay installed (a later start is then ~2 s instead of ~15 s).
set -uo pipefail

STATE=${CELLSTAGE_SLURM_STATE:-/run/cellstage-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by cellstage .ci/slurm/start-cluster.sh"

log() { echo "[stop-cluster] $*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "error: must run as root"; exit 1; }

if [ -f "$STATE/slurmctld.pid" ] && command -v scancel >/dev/null; then
    timeout 10 scancel --user=root >/dev/null 2>&1 || true
fi

stop() { # name: TERM, wait up to 10 s, then KILL
    local name=$1 pidfile="$STATE/$1.pid" pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) ignored TERM; killing"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "$name (pid $pid) stopped"
    fi
    rm -f "$pidfile"
}
# reverse order of start; munged only when this script's partner started it
stop slurmd
stop slurmctld
stop munged

if [ -f "$CONF" ] && grep -qF "$MARKER" "$CONF"; then
    rm -f "$CONF"
    log "removed $CONF"
fi
rmdir "$STATE" 2>/dev/null || true
exit 0
