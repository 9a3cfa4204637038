#!/usr/bin/env bash
# A real SLURM cluster on this one Debian machine, for trying the sbatch templates and for the tests.
#
#   local-cluster.sh install            apt-get install slurm-wlm and munge (as root) when they are missing
#   local-cluster.sh start DIR [NODES]  start munged, slurmctld and NODES (1 or 2, default 2) slurmd nodes
#                                       whose config, state, logs and pid files all live in DIR
#   local-cluster.sh stop DIR           cancel its jobs, stop the daemons by the PIDs `start` recorded
#
# After `start`, point the SLURM commands at it: export SLURM_CONF=DIR/slurm.conf
#
# Every daemon is private to DIR (its own munge socket, free ports), so this never touches a cluster or a
# munged the machine already runs, and two such clusters can run side by side. Both nodes are this host
# (NodeAddr=127.0.0.1, one slurmd per node on its own port): a 2-node job really runs one task per slurmd.
# Needs root (slurmd runs jobs as their users); no systemd or cgroups: proctrack/linuxproc, task/none.
set -euo pipefail

die() { echo "local-cluster: $*" >&2; exit 1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "slurm-wlm and munge are not installed, and installing them needs root"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed, and there is no apt-get"
    echo "local-cluster: installing slurm-wlm and munge" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Start a foreground daemon detached from this shell and remember the PID we started, for `stop`.
spawn() {
    local name=$1; shift
    setsid nohup "$@" >"$DIR/log/$name.out" 2>&1 </dev/null &
    echo $! >"$DIR/pids/$name"
}

wait_idle() {
    local nodes=$1 started=$2 deadline=$((SECONDS + 60)) ready n boot
    while ((SECONDS < deadline)); do
        ready=0
        for n in $(seq 1 "$nodes"); do
            # A node restored from saved state can read idle before its new slurmd registered.
            boot=$(scontrol show node "n$n" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
            if [[ -n $boot && $boot != None ]] && (($(date -d "$boot" +%s) >= started)) \
                && [[ $(sinfo -h -n "n$n" -o %t 2>/dev/null) == idle ]]; then
                ready=$((ready + 1))
            fi
        done
        ((ready == nodes)) && return 0
        sleep 0.5
    done
    die "nodes not idle after 60 s; see $DIR/log/"
}

start() {
    [[ $(id -u) == 0 ]] || die "starting slurmd needs root"
    install_packages
    local nodes=${NODES:-2}
    [[ $nodes == 1 || $nodes == 2 ]] || die "NODES must be 1 or 2, got $nodes"
    [[ -e $DIR/pids/slurmctld ]] && die "$DIR already holds a started cluster; stop it first"
    mkdir -p "$DIR"/{log,pids,state,spool,munge,munge-key}
    DIR=$(cd "$DIR" && pwd)
    chmod 755 "$DIR"
    local started
    started=$(date +%s)

    # munged insists that its key is private to its user and its socket directory is searchable by all.
    [[ -f /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    cp /etc/munge/munge.key "$DIR/munge-key/munge.key"
    chown -R munge:munge "$DIR/munge" "$DIR/munge-key"
    chmod 711 "$DIR/munge"
    chmod 700 "$DIR/munge-key"
    chmod 600 "$DIR/munge-key/munge.key"
    local socket=$DIR/munge/munge.socket
    spawn munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground --socket="$socket" \
        --key-file="$DIR/munge-key/munge.key" --log-file="$DIR/munge-key/munged.log" \
        --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge-key/munged.seed"
    for _ in $(seq 50); do [[ -S $socket ]] && break; sleep 0.1; done
    [[ -S $socket ]] || die "munged did not start; see $DIR/log/munged.out"

    # The node line describes this machine (slurmd -C); every node claims all of it.
    local hw
    hw=$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //')
    {
        echo "ClusterName=masktrain-local"
        echo "SlurmctldHost=$(hostname -s)(127.0.0.1)"
        echo "SlurmctldPort=$(free_port)"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        # A requeued job waits for the launch credential to expire: 10 s here instead of 120 s.
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "AuthInfo=socket=$socket,cred_expire=10"
        echo "MpiDefault=none"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "SchedulerType=sched/backfill"
        echo "SchedulerParameters=sched_interval=2,bf_interval=2"
        echo "JobRequeue=1"
        echo "ReturnToService=2"
        echo "StateSaveLocation=$DIR/state"
        echo "SlurmdSpoolDir=$DIR/spool/%n"
        echo "SlurmctldPidFile=$DIR/state/slurmctld.pid"
        echo "SlurmdPidFile=$DIR/spool/slurmd-%n.pid"
        echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
        echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
        echo "JobCompType=jobcomp/none"
        echo "AccountingStorageType=accounting_storage/none"
        for n in $(seq 1 "$nodes"); do
            echo "NodeName=n$n NodeAddr=127.0.0.1 NodeHostname=$(hostname -s) Port=$(free_port) $hw State=UNKNOWN"
        done
        echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$DIR/slurm.conf"
    export SLURM_CONF=$DIR/slurm.conf

    spawn slurmctld slurmctld -D -f "$SLURM_CONF"
    for n in $(seq 1 "$nodes"); do
        mkdir -p "$DIR/spool/n$n"
        spawn "slurmd-n$n" slurmd -D -N "n$n" -f "$SLURM_CONF"
    done
    wait_idle "$nodes" "$started"
    echo "local-cluster: $nodes node(s) idle; export SLURM_CONF=$SLURM_CONF" >&2
}

# True when PID is alive and still the daemon we started (a PID can be reused after it exits).
ours() {
    local pid=$1 name=$2
    [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' </proc/"$pid"/cmdline | grep -q -- "$name"
}

stop() {
    [[ -d $DIR/pids ]] || die "$DIR holds no started cluster"
    DIR=$(cd "$DIR" && pwd)
    export SLURM_CONF=$DIR/slurm.conf
    if [[ -e $DIR/pids/slurmctld ]] && ours "$(cat "$DIR/pids/slurmctld")" slurmctld; then
        # Jobs' processes belong to slurmstepd, not to the daemons: cancel them while the controller is up.
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 100); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.2; done
        fi
    fi
    local file pid name
    # Nodes first, then the controller, then munged that both use.
    for file in "$DIR"/pids/slurmd-* "$DIR/pids/slurmctld" "$DIR/pids/munged"; do
        [[ -e $file ]] || continue
        pid=$(cat "$file")
        name=$(basename "$file")
        name=${name%%-n*}
        if ours "$pid" "$name"; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do ours "$pid" "$name" || break; sleep 0.1; done
            ours "$pid" "$name" && kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$file"
    done
    echo "local-cluster: stopped the cluster in $DIR" >&2
}

command=${1:-}
case $command in
    install) install_packages ;;
    start)
        [[ $# -ge 2 ]] || die "usage: $0 start DIR [NODES]"
        DIR=$2 NODES=${3:-2}
        start
        ;;
    stop)
        [[ $# -ge 2 ]] || die "usage: $0 stop DIR"
        DIR=$2
        stop
        ;;
    *) die "usage: $0 install | start DIR [NODES] | stop DIR" ;;
esac
