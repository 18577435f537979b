#!/usr/bin/env bash
# A real two-node Slurm cluster (node1, node2) with accounting on this one machine, for tests/test_slurm.py.
#
#   bash .ci/install_slurm.sh && bash tests/slurm/cluster.sh start    # idempotent
#   bash tests/slurm/cluster.sh status
#   bash tests/slurm/cluster.sh stop
#
# Debian's slurm-wlm 22.05 is built with MULTIPLE_SLURMD, so two slurmd daemons on one host act as
# two nodes. Needs root: writes /etc/slurm/{slurm,gres,slurmdbd}.conf and adds node1/node2 to /etc/hosts.
# The "GPU" of each node is a placeholder (/dev/null) so that `#SBATCH --gres=gpu:1` is accepted.
set -euo pipefail

CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
CLUSTER=local
ACCOUNT=default
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=slurm-local-test       # throwaway database of a local test cluster
NODE_MEM_MB=10000
START_TIMEOUT_S=${START_TIMEOUT_S:-90}
CTL_HOST=$(hostname -s)

run() { echo "+ $*"; "$@"; }
die() { echo "cluster.sh: $*" >&2; exit 1; }
pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_configs() {
    mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    cat > "$CONF_DIR/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh: two nodes on one host, with accounting.
ClusterName=$CLUSTER
SlurmctldHost=$CTL_HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdLogFile=$LOG_DIR/slurmd.%n.log
SlurmdPidFile=/run/slurmd.%n.pid
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
GresTypes=gpu
MinJobAge=30
KillWait=10
PrologFlags=Contain
NodeName=node1 Gres=gpu:1 NodeHostname=$CTL_HOST NodeAddr=127.0.0.1 Port=17211 CPUs=1 RealMemory=$NODE_MEM_MB
NodeName=node2 Gres=gpu:1 NodeHostname=$CTL_HOST NodeAddr=127.0.0.1 Port=17212 CPUs=1 RealMemory=$NODE_MEM_MB
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$CONF_DIR/gres.conf" <<EOF
AutoDetect=off
NodeName=node1 Name=gpu File=/dev/null
NodeName=node2 Name=gpu File=/dev/null
EOF
    cat > "$CONF_DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$LOG_DIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
    chmod 600 "$CONF_DIR/slurmdbd.conf"
    grep -qE '^127\.0\.0\.1[[:space:]].*\bnode1\b' /etc/hosts || echo "127.0.0.1 node1 node2" >> /etc/hosts
}

start_munge() {
    pid_alive /run/munge/munged.pid && return
    [[ -f /etc/munge/munge.key ]] || run runuser -u munge -- mungekey -c
    mkdir -p /run/munge && chown munge:munge /run/munge
    run runuser -u munge -- /usr/sbin/munged
}

start_mariadb() {
    if ! mysqladmin ping >/dev/null 2>&1; then
        mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
        echo "+ mysqld_safe &"
        setsid nohup mysqld_safe >"$LOG_DIR/mysqld_safe.log" 2>&1 < /dev/null &
        for _ in $(seq 30); do mysqladmin ping >/dev/null 2>&1 && break; sleep 1; done
        mysqladmin ping >/dev/null 2>&1 || die "MariaDB did not start in 30 s: see $LOG_DIR/mysqld_safe.log"
    fi
    run mysql -e "CREATE DATABASE IF NOT EXISTS $DB_NAME;
        CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
    pid_alive /run/slurmdbd.pid || run slurmdbd
    for _ in $(seq 30); do sacctmgr -n list cluster >/dev/null 2>&1 && return; sleep 1; done
    die "slurmdbd not answering after 30 s: see $LOG_DIR/slurmdbd.log"
}

start_slurm() {
    sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || run sacctmgr -i add cluster "$CLUSTER"
    pid_alive /run/slurmctld.pid || run slurmctld
    sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT" ||
        run sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER"
    sacctmgr -n -P list user format=user | grep -qx root || run sacctmgr -i add user root Account="$ACCOUNT"
    for node in node1 node2; do
        pid_alive "/run/slurmd.$node.pid" || run slurmd -N "$node"
    done
}

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT_S))
    while ((SECONDS < deadline)); do
        # Both nodes idle (or already running a job: start is idempotent on a busy cluster).
        if [[ $(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE '^node[12] (idle|mix|alloc)$') == 2 ]]; then
            run sinfo -N
            return
        fi
        # A node left down/drained by an earlier stop comes back with RESUME.
        sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 ~ /down|drain/ {print $1}' |
            while read -r node; do scontrol update NodeName="$node" State=RESUME || true; done
        sleep 1
    done
    sinfo -N >&2 || true
    die "nodes not idle after ${START_TIMEOUT_S} s: see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.node*.log"
}

stop() {
    if pid_alive /run/slurmctld.pid; then run scontrol shutdown || true; fi   # stops the slurmds too
    for pidfile in /run/slurmd.node1.pid /run/slurmd.node2.pid /run/slurmctld.pid /run/slurmdbd.pid; do
        if pid_alive "$pidfile"; then run kill "$(cat "$pidfile")"; fi
    done
    if mysqladmin ping >/dev/null 2>&1; then run mysqladmin shutdown; fi
    if pid_alive /run/munge/munged.pid; then run kill "$(cat /run/munge/munged.pid)"; fi
}

status() {
    local ok=0
    for pidfile in /run/munge/munged.pid /run/slurmdbd.pid /run/slurmctld.pid /run/slurmd.node1.pid /run/slurmd.node2.pid; do
        if pid_alive "$pidfile"; then echo "up:   $pidfile"; else echo "down: $pidfile"; ok=1; fi
    done
    sinfo -N 2>/dev/null || ok=1
    return $ok
}

[[ $(id -u) == 0 ]] || die "must run as root (writes $CONF_DIR and /etc/hosts, starts daemons)"
case "${1:-}" in
    start)
        command -v slurmctld >/dev/null || die "slurm not installed: run bash .ci/install_slurm.sh first"
        write_configs; start_munge; start_mariadb; start_slurmdbd; start_slurm; wait_idle ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status (got '${1:-}')" ;;
esac
