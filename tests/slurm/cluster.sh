#!/usr/bin/env bash
# A real two-node Slurm cluster (node1, node2) with accounting on this one machine, for tests/test_slurm.py.
#
#   bash .ci/install_slurm.sh && bash tests/slurm/cluster.sh start    # idempotent
#   bash tests/slurm/cluster.sh status
#   bash tests/slurm/cluster.sh stop
#   eval "$(bash tests/slurm/cluster.sh env)"; sinfo                  # talk to it by hand
#
# The cluster lives entirely under its own config, so it runs beside any other Slurm cluster on the
# machine (one from /etc/slurm, say) without either seeing the other: config, state, spool, logs and
# pid files under $ROOT and $RUN_DIR, its own ClusterName, ports and accounting database. Every daemon
# and command here gets SLURM_CONF=$ROOT/etc/slurm.conf (slurmdbd reads slurmdbd.conf, and every
# daemon gres.conf, from the directory of SLURM_CONF); jobs inherit it, so the Slurm commands that
# submit.sbatch and pipeinfer.slurm run inside a job talk to this cluster too. The tests find it at
# that fixed path (see `env`), never through the environment's default.
#
# Debian's slurm-wlm 22.05 is built with MULTIPLE_SLURMD, so two slurmd daemons on one host act as
# two nodes. Needs root: starts daemons and adds node1/node2 to /etc/hosts (MASTER_ADDR is a node
# name, as on a real cluster). Munge and MariaDB are shared with any other cluster here; `stop` stops
# them only if `start` started them. The "GPU" of each node is a placeholder (/dev/null) so that
# `#SBATCH --gres=gpu:1` is accepted.
set -euo pipefail

ROOT=/var/lib/pipeinfer-slurm
RUN_DIR=/run/pipeinfer-slurm
CONF_DIR=$ROOT/etc
LOG_DIR=$ROOT/log
export SLURM_CONF=$CONF_DIR/slurm.conf
CLUSTER=pipeinfer
CTLD_PORT=17817                 # Slurm's defaults are 6817 (slurmctld), 6818 (slurmd), 6819 (slurmdbd)
NODE_PORTS=(17818 17819)        # node1, node2
DBD_PORT=17820
NODES=(node1 node2)
ACCOUNT=default
DB_NAME=pipeinfer_slurm_acct_db
DB_USER=pipeinfer_slurm
DB_PASS=pipeinfer-local-test    # throwaway database of a local test cluster
NODE_MEM_MB=10000
START_TIMEOUT_S=${START_TIMEOUT_S:-90}
CTL_HOST=$(hostname -s)

run() { echo "+ $*"; "$@"; }
die() { echo "cluster.sh: $*" >&2; exit 1; }

# The pid in pid file $1 if it is a live $2 (comm) started with this cluster's SLURM_CONF: a stale
# pid file, or a pid reused by another process or another cluster's daemon, is not ours.
our_pid() {
    local pid
    [[ -f $1 ]] && pid=$(cat "$1" 2>/dev/null) && [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] || return 1
    tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF"
}
daemons() {     # pid file, comm and port of each of this cluster's daemons, in the order stop ends them
    echo "$RUN_DIR/slurmctld.pid slurmctld $CTLD_PORT"
    local i
    for i in "${!NODES[@]}"; do echo "$RUN_DIR/slurmd.${NODES[i]}.pid slurmd ${NODE_PORTS[i]}"; done
    echo "$RUN_DIR/slurmdbd.pid slurmdbd $DBD_PORT"
}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

write_configs() {
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$ROOT/state" "$ROOT/spool" "$RUN_DIR"
    local i
    cat > "$CONF_DIR/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh: two nodes on one host, with accounting, beside any other cluster.
ClusterName=$CLUSTER
SlurmctldHost=$CTL_HOST
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdLogFile=$LOG_DIR/slurmd.%n.log
SlurmdPidFile=$RUN_DIR/slurmd.%n.pid
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
GresTypes=gpu
MinJobAge=30
KillWait=10
PrologFlags=Contain
EOF
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[i]} Gres=gpu:1 NodeHostname=$CTL_HOST NodeAddr=127.0.0.1 Port=${NODE_PORTS[i]} CPUs=1 RealMemory=$NODE_MEM_MB"
    done >> "$CONF_DIR/slurm.conf"
    echo "PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP" >> "$CONF_DIR/slurm.conf"
    {
        echo "AutoDetect=off"
        for node in "${NODES[@]}"; do echo "NodeName=$node Name=gpu File=/dev/null"; done
    } > "$CONF_DIR/gres.conf"
    # written mode 600 from the start: it holds the database password
    (umask 077 && cat > "$CONF_DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$RUN_DIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
    )
    chmod 600 "$CONF_DIR/slurmdbd.conf"
    grep -qE '^127\.0\.0\.1[[:space:]].*\bnode1\b' /etc/hosts || echo "127.0.0.1 node1 node2" >> /etc/hosts
}

# Daemons of another cluster (an older cluster.sh that ran from /etc/slurm on Slurm's default ports,
# or a site's own) are left alone: they cannot see this one. A port of ours held by something else
# would make a daemon fail to bind, so that is an error naming the port.
check_others() {
    local pid environ others=()
    for pid in $(pgrep -x slurmctld; pgrep -x slurmd; pgrep -x slurmdbd); do
        environ=$(tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null) && [[ -n $environ ]] || continue  # a zombie, or gone
        grep -qxF "SLURM_CONF=$SLURM_CONF" <<< "$environ" || others+=("$pid:$(cat "/proc/$pid/comm" 2>/dev/null)")
    done
    if ((${#others[@]})); then
        echo "cluster.sh: note: other Slurm daemons are running (${others[*]}), e.g. a cluster from /etc/slurm;" \
             "this cluster ($CLUSTER, $SLURM_CONF) runs beside them and does not talk to them"
    fi
    local pidfile comm port
    while read -r pidfile comm port; do
        if ! our_pid "$pidfile" "$comm" && port_busy "$port"; then
            die "port $port (for $comm of cluster $CLUSTER) is in use by another process: stop it, or change the ports at the top of $0"
        fi
    done < <(daemons)
}

start_munge() {
    [[ -S /run/munge/munge.socket.2 ]] && munge -n </dev/null >/dev/null 2>&1 && return
    [[ -f /etc/munge/munge.key ]] || run runuser -u munge -- mungekey -c
    mkdir -p /run/munge && chown munge:munge /run/munge
    run runuser -u munge -- /usr/sbin/munged
    touch "$RUN_DIR/munged.started"
}

start_mariadb() {
    if ! mysqladmin ping >/dev/null 2>&1; then
        mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
        echo "+ mysqld_safe &"
        setsid nohup mysqld_safe >"$LOG_DIR/mysqld_safe.log" 2>&1 < /dev/null &
        for _ in $(seq 30); do mysqladmin ping >/dev/null 2>&1 && break; sleep 1; done
        mysqladmin ping >/dev/null 2>&1 || die "MariaDB did not start in 30 s: see $LOG_DIR/mysqld_safe.log"
        touch "$RUN_DIR/mariadb.started"
    fi
    run mysql -e "CREATE DATABASE IF NOT EXISTS $DB_NAME;
        CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
    our_pid "$RUN_DIR/slurmdbd.pid" slurmdbd || run slurmdbd
    for _ in $(seq 30); do sacctmgr -n list cluster >/dev/null 2>&1 && return; sleep 1; done
    die "slurmdbd not answering on port $DBD_PORT after 30 s: see $LOG_DIR/slurmdbd.log"
}

start_slurm() {
    sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || run sacctmgr -i add cluster "$CLUSTER"
    our_pid "$RUN_DIR/slurmctld.pid" slurmctld || run slurmctld
    sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT" ||
        run sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER"
    sacctmgr -n -P list user format=user | grep -qx root || run sacctmgr -i add user root Account="$ACCOUNT"
    for node in "${NODES[@]}"; do
        our_pid "$RUN_DIR/slurmd.$node.pid" slurmd || run slurmd -N "$node"
    done
}

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT_S))
    while ((SECONDS < deadline)); do
        # Both nodes idle (or already running a job: start is idempotent on a busy cluster).
        if [[ $(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE '^node[12] (idle|mix|alloc)$') == 2 ]]; then
            run sinfo -N
            echo "cluster $CLUSTER is up: export SLURM_CONF=$SLURM_CONF to use it by hand"
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
    if our_pid "$RUN_DIR/slurmctld.pid" slurmctld; then run scontrol shutdown || true; fi  # stops the slurmds too
    local pidfile comm _port
    while read -r pidfile comm _port; do
        # slurmctld and the slurmds get 15 s to finish the shutdown; slurmdbd does not take part in it
        for _ in $(seq 15); do [[ $comm != slurmdbd ]] && our_pid "$pidfile" "$comm" || break; sleep 1; done
        if our_pid "$pidfile" "$comm"; then
            run kill "$(cat "$pidfile")"
            for _ in $(seq 15); do our_pid "$pidfile" "$comm" || break; sleep 1; done
        fi
    done < <(daemons)
    # the shared services only if start started them: another cluster may be using them
    if [[ -f $RUN_DIR/mariadb.started ]]; then
        if mysqladmin ping >/dev/null 2>&1; then run mysqladmin shutdown; fi
        rm -f "$RUN_DIR/mariadb.started"
    fi
    if [[ -f $RUN_DIR/munged.started ]]; then
        if [[ -f /run/munge/munged.pid ]]; then run kill "$(cat /run/munge/munged.pid)" || true; fi
        rm -f "$RUN_DIR/munged.started"
    fi
}

status() {
    local ok=0 pidfile comm port
    while read -r pidfile comm port; do
        if our_pid "$pidfile" "$comm"; then echo "up:   $comm :$port ($pidfile)"; else echo "down: $comm :$port ($pidfile)"; ok=1; fi
    done < <(daemons)
    sinfo -N 2>/dev/null || ok=1
    return $ok
}

case "${1:-}" in
    env) echo "export SLURM_CONF=$SLURM_CONF"; exit 0 ;;
esac
[[ $(id -u) == 0 ]] || die "must run as root (starts daemons, writes $ROOT and /etc/hosts)"
case "${1:-}" in
    start)
        command -v slurmctld >/dev/null || die "slurm not installed: run bash .ci/install_slurm.sh first"
        write_configs; check_others; start_munge; start_mariadb; start_slurmdbd; start_slurm; wait_idle ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status|env (got '${1:-}')" ;;
esac
