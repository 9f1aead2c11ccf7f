#!/usr/bin/env bash
# Bring up a single-node SLURM on 127.0.0.1 (munged, slurmctld, slurmd) for the integration test
# (tests/test_slurm.py). Debian 12 as root: installs slurm-wlm and munge with apt-get when missing.
# Idempotent: a second call with the daemons alive only waits for the node to be idle.
# tools/slurm/down.sh stops exactly the processes started here, by their PID files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
STATE="${STEPSEG_SLURM_STATE:-/var/lib/stepseg-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="stepseg-test-slurm"

alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [[ $EUID -ne 0 ]]; then
    echo "slurm-up: needs root (installs packages and starts daemons)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

if [[ -e $CONF ]] && ! grep -q "$MARK" "$CONF"; then
    echo "slurm-up: $CONF exists and was not written by $0; refusing to replace it" >&2
    exit 1
fi

mkdir -p "$STATE/ctld" "$STATE/spool" /etc/slurm
cpus="$(nproc)"
# leave ~15% of the memory to the OS and the submitting Snakemake
mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.85)}' /proc/meminfo)"
sed -e "s|@STATE@|$STATE|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEM_MB@|$mem_mb|g" \
    "$here/slurm.conf.in" >"$CONF"

# munge: Debian's postinst normally creates the key; create one if it did not (containers).
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! alive /run/munge/munged.pid; then
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
fi

if ! alive "$STATE/slurmctld.pid"; then
    slurmctld -c   # -c: clear saved state, a fresh queue for every bring-up
fi
if ! alive "$STATE/slurmd.pid"; then
    slurmd -N localhost
fi

# Wait until the node takes jobs (sinfo reaches the controller and the node is idle).
for _ in $(seq 60); do
    state="$(sinfo -h -n localhost -o %T 2>/dev/null || true)"
    if [[ $state == idle* || $state == mixed* || $state == allocated* ]]; then
        echo "slurm-up: node localhost $state (CPUs=$cpus RealMemory=$mem_mb MB, state in $STATE)"
        exit 0
    fi
    if [[ $state == down* || $state == drain* ]]; then
        scontrol update nodename=localhost state=resume 2>/dev/null || true
    fi
    sleep 1
done
echo "slurm-up: node did not become idle; last state '$state'. Logs:" >&2
tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
exit 1
