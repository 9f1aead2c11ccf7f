#!/usr/bin/env bash
# Stop what tools/slurm/up.sh started, by PID file (slurmd, slurmctld, munged), and remove the
# slurm.conf it wrote. Exits 0 when nothing runs, so CI can always call it.
set -uo pipefail
STATE="${STEPSEG_SLURM_STATE:-/var/lib/stepseg-slurm}"
CONF=/etc/slurm/slurm.conf

stop() {  # stop <name> <pidfile>: TERM, wait up to 10 s, then KILL
    local name=$1 pidfile=$2 pid
    [[ -s $pidfile ]] || return 0
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        echo "slurm-down: stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
}

if [[ -s $STATE/slurmctld.pid ]] && command -v scancel >/dev/null; then
    scancel --quiet --full --user root 2>/dev/null || true   # leave no job running
fi
stop slurmd "$STATE/slurmd.pid"
stop slurmctld "$STATE/slurmctld.pid"
stop munged /run/munge/munged.pid
if [[ -e $CONF ]] && grep -q stepseg-test-slurm "$CONF"; then
    rm -f "$CONF"
fi
exit 0
