#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for checking the submitit_slurm launcher preset
# (tests/test_slurm.py, `make test-slurm`). Needs root and Debian/Ubuntu (apt) when SLURM is missing.
#
#   scripts/slurm_localhost.sh start    install slurm-wlm + munge if missing, configure, start the
#                                       daemons, wait until the node is idle (a no-op when running)
#   scripts/slurm_localhost.sh status   the daemons and `sinfo`; exit 0 only when the node is up
#   scripts/slurm_localhost.sh stop     stop the daemons this script started
#
# Everything (slurm.conf, munge key and socket, state, spool, logs, pid files) lives in one private
# folder, $RFTBENCH_SLURM_DIR (default /tmp/rftbench-slurm); /etc/slurm and a system munged are left
# alone. SLURM commands find this cluster through SLURM_CONF:
#   export SLURM_CONF=/tmp/rftbench-slurm/slurm.conf; sinfo; sbatch ...
#
# Container notes (what a plain `apt-get install` + systemd would otherwise do for you):
# - no systemd: the daemons are started directly and tracked by their pid files;
# - no cgroup v1/v2 delegation: ProctrackType=proctrack/linuxproc (process tree via /proc),
#   TaskPlugin=task/none (no CPU binding), JobAcctGatherType=jobacct_gather/none;
# - munged runs on a private key and socket (AuthInfo=socket=...), as root (--force: /tmp is
#   world-writable);
# - no slurmdbd: accounting is off, so `sacct` does not work (submitit then reads job states from
#   its result files and warns "Bypassing sacct error");
# - short KillWait and cred_expire, so that `scontrol requeue` restarts a job within about 40 s
#   (SLURM holds a requeued job back until its old credential expired, 120 s by default; then the
#   backfill scheduler starts it). submitit ignores SIGTERM: a requeued job runs on for KillWait.
set -euo pipefail

DIR=${RFTBENCH_SLURM_DIR:-/tmp/rftbench-slurm}
HOST=$(hostname -s)
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket.2
CTLD_PORT=${RFTBENCH_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${RFTBENCH_SLURM_SLURMD_PORT:-6818}
PARTITION=${RFTBENCH_SLURM_PARTITION:-debug}
export SLURM_CONF=$CONF

say() { echo "slurm_localhost: $*" >&2; }
die() { say "$*"; exit 1; }

# The pid of a daemon from its pid file when that process is alive and is the daemon (not a reused
# pid); empty otherwise.
live_pid() {  # name pidfile
    local pid
    pid=$(cat "$2" 2>/dev/null) || return 0
    [[ $pid =~ ^[0-9]+$ ]] && [[ -d /proc/$pid ]] || return 0
    [[ $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) == *"$1"* ]] && echo "$pid"
    return 0
}

stop_daemon() {  # name pidfile
    local pid
    pid=$(live_pid "$1" "$2")
    if [[ -n $pid ]]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do [[ -d /proc/$pid ]] || break; sleep 0.2; done
        if [[ -d /proc/$pid ]]; then kill -9 "$pid" 2>/dev/null || true; fi
        say "stopped $1 (pid $pid)"
    fi
    rm -f "$2"
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    { command -v slurmctld && command -v slurmd && command -v sinfo; } >/dev/null || missing+=(slurm-wlm)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || die "SLURM is not installed and apt-get is missing: install ${missing[*]} yourself"
    [[ $(id -u) -eq 0 ]] || die "installing ${missing[*]} needs root (sudo $0 start)"
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; } ||
        die "apt-get install ${missing[*]} failed"
}

write_conf() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    mkdir -p "$DIR"/{munge,state,spool,log,jobs}
    chmod 700 "$DIR/munge"
    cat > "$CONF.tmp" <<EOF
# one-node cluster written by scripts/slurm_localhost.sh (rftbench); do not edit, rerun the script
ClusterName=rftbench
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=2
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    if cmp -s "$CONF.tmp" "$CONF"; then rm "$CONF.tmp"; return 1; fi  # unchanged
    mv "$CONF.tmp" "$CONF"
    return 0
}

node_state() { timeout 10 sinfo -h -n "$HOST" -o %t 2>/dev/null | head -1; }

running() {
    [[ -n $(live_pid munged "$DIR/munge/munged.pid") && -n $(live_pid slurmctld "$DIR/slurmctld.pid") &&
       -n $(live_pid slurmd "$DIR/slurmd.pid") ]]
}

start() {
    install_packages
    local changed=0
    write_conf && changed=1
    if [[ $changed -eq 0 ]] && running && [[ $(node_state) =~ ^(idle|mix|alloc) ]]; then
        say "already running: $(node_state) ($CONF)"
        return 0
    fi
    stop_all  # a stale or half-started previous instance, or an old configuration
    [[ -s $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key" --bits=1024
    chmod 600 "$DIR/munge/munge.key"
    munged --force --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
    munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null || die "munge does not work: $DIR/log/munged.log"
    # -c: a fresh start drops the jobs of an earlier instance
    slurmctld -c -f "$CONF" || die "slurmctld did not start: $DIR/log/slurmctld.log"
    slurmd -c -f "$CONF" -N "$HOST" || die "slurmd did not start: $DIR/log/slurmd.log"
    local state=""
    for _ in $(seq 120); do
        state=$(node_state)
        [[ $state == idle ]] && break
        [[ $state =~ ^(down|drain|drng|fail) ]] &&
            scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
        sleep 0.5
    done
    [[ $state == idle ]] || die "node $HOST is '$state', not idle, after 60 s: $DIR/log/slurm{ctld,d}.log"
    say "running: node $HOST idle in partition $PARTITION; export SLURM_CONF=$CONF"
}

stop_all() {
    stop_daemon slurmd "$DIR/slurmd.pid"
    stop_daemon slurmctld "$DIR/slurmctld.pid"
    stop_daemon munged "$DIR/munge/munged.pid"
}

status() {
    local ok=0 name pidfile
    for name in munged slurmctld slurmd; do
        pidfile=$DIR/$name.pid
        [[ $name == munged ]] && pidfile=$DIR/munge/munged.pid
        if [[ -n $(live_pid "$name" "$pidfile") ]]; then echo "$name: running (pid $(cat "$pidfile"))"
        else echo "$name: not running"; ok=1; fi
    done
    if [[ $ok -eq 0 ]]; then
        timeout 10 sinfo || ok=1
        echo "export SLURM_CONF=$CONF"
    fi
    return $ok
}

case "${1:-}" in
    start) start ;;
    stop) stop_all ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status   (folder: \$RFTBENCH_SLURM_DIR, default /tmp/rftbench-slurm)" >&2; exit 2 ;;
esac
