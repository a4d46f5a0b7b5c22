#!/usr/bin/env bash
# A real two-node Slurm cluster on this host for the launch tests (tests/launch/).
#
#   scripts/ci_slurm.sh install   # Debian's slurmctld, slurmd, slurm-client, munge (if absent)
#   scripts/ci_slurm.sh start     # munged, slurmctld, slurmd for node1 and node2; waits until idle
#   scripts/ci_slurm.sh stop      # the daemons this script started, in the order that works
#
# Needs root and no systemd (daemons are started by hand, as in shared FINDINGS "Launching").
# The configuration is tests/launch/slurm.conf; an /etc/slurm/slurm.conf that is not ours is
# never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
CONF=tests/launch/slurm.conf
MARKER="trillora-ci-slurm"
RUN=/run/trillora-slurm
NODES=(node1 node2)

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    if [ -f /etc/slurm/slurm.conf ] && ! grep -q "$MARKER" /etc/slurm/slurm.conf; then
        echo "ci_slurm: /etc/slurm/slurm.conf is not ours; not replacing it" >&2
        exit 1
    fi
    mkdir -p /etc/slurm "$RUN" /var/log/trillora-slurm
    if ! alive "$RUN/slurmctld.pid"; then
        cp "$CONF" /etc/slurm/slurm.conf
        # Old node states (DRAIN) survive restarts through the state directory: start clean.
        rm -rf /var/spool/trillora-slurm && mkdir -p /var/spool/trillora-slurm/ctld
        for node in "${NODES[@]}"; do mkdir -p "/var/spool/trillora-slurm/d-$node"; done
    fi
    if ! pgrep -x munged >/dev/null; then
        mkdir -p /run/munge && chown munge:munge /run/munge
        runuser -u munge -- /usr/sbin/munged
        touch "$RUN/munged.ours"
    fi
    alive "$RUN/slurmctld.pid" || setsid slurmctld -i >/dev/null 2>&1
    for node in "${NODES[@]}"; do
        alive "$RUN/slurmd-$node.pid" || setsid slurmd -N "$node" >/dev/null 2>&1
    done
    for _ in $(seq 60); do
        if [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" -eq "${#NODES[@]}" ]; then
            sinfo -N
            return 0
        fi
        sleep 1
    done
    echo "ci_slurm: nodes not idle after 60 s:" >&2
    sinfo -N -o "%N %T %E" >&2 || true
    exit 1
}

stop_pidfile() {
    if alive "$1"; then
        local pid; pid=$(cat "$1")
        kill "$pid"
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
    fi
}

stop() {
    # slurmd first, munged last: without munged, slurmd hangs on shutdown.
    for node in "${NODES[@]}"; do stop_pidfile "$RUN/slurmd-$node.pid"; done
    stop_pidfile "$RUN/slurmctld.pid"
    if [ -f "$RUN/munged.ours" ]; then
        stop_pidfile /run/munge/munged.pid
        rm -f "$RUN/munged.ours"
    fi
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
