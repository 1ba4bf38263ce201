#!/usr/bin/env bash
# A local single-node SLURM cluster (munge, MariaDB + slurmdbd, slurmctld, slurmd) for contributors and CI.
#
#   scripts/slurm-local.sh up        install the Debian packages if missing, start the cluster (fast if already up)
#   scripts/slurm-local.sh down      cancel all jobs, stop the daemons by PID
#   scripts/slurm-local.sh status    show the daemons and the node; exit 0 only if the cluster takes jobs
#   scripts/slurm-local.sh env       print shell exports for this cluster: eval "$(scripts/slurm-local.sh env)"
#
# Runs as root, without systemd or cgroups. State, spool, logs and the MariaDB data live under
# $DIFFCREDIT_SLURM_DIR (default /tmp/diffcredit-slurm); the config is also installed as /etc/slurm/slurm.conf
# because the executor plugin's job step drops SLURM_CONF before its inner srun. Two `gpu` gres of type `standin`,
# backed by stand-in character devices, let `--gpus=1` requests really schedule on a machine without a GPU (one per
# core, so two GPU jobs run at once). Accounting works (`sacct`), with the account $DIFFCREDIT_SLURM_ACCOUNT.
set -euo pipefail

DIR=${DIFFCREDIT_SLURM_DIR:-/tmp/diffcredit-slurm}
PARTITION=${DIFFCREDIT_SLURM_PARTITION:-debug}
ACCOUNT=${DIFFCREDIT_SLURM_ACCOUNT:-diffcredit}
GPUS=2
CLUSTER=diffcredit
ETC=/etc/slurm
MARKER="# Written by DiffCredit scripts/slurm-local.sh"
PORT_CTLD=6817 PORT_SLURMD=6818 PORT_DBD=6819 PORT_DB=6820
NODE=$(hostname -s)
# Slurm 22.05 ignores AuthInfo=socket= for its slurmdbd connections, so munged serves the default socket.
MUNGE_SOCKET=/run/munge/munge.socket.2
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
export SLURM_CONF=$DIR/etc/slurm.conf

log() { echo "slurm-local: $*" >&2; }
die() { log "error: $*"; exit 1; }

# run/DAEMON.pid holds the PID this script started; each daemon writes its own pid file elsewhere (state/, spool/,
# munge/, mysql/), since a daemon rewriting the file that alive() polls can be read empty.
pid_of() { cat "$DIR/run/$1.pid" 2>/dev/null || true; }
alive() { local pid; pid=$(pid_of "$1"); [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; }

# die_with_log DAEMON MESSAGE: fail with the end of DAEMON's log, so that a CI log shows the cause.
die_with_log() {
    local file=$DIR/log/$1.log
    [[ -s $file ]] && { log "last lines of $file:"; tail -n 20 "$file" >&2; }
    die "$2; see $file"
}

# wait_for SECONDS DAEMON COMMAND...: poll COMMAND every 0.2 s while DAEMON runs.
wait_for() {
    local deadline=$((SECONDS + $1)) daemon=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        alive "$daemon" || die_with_log "$daemon" "$daemon exited while starting"
        ((SECONDS < deadline)) || die_with_log "$daemon" "timed out waiting for $daemon ($*)"
        sleep 0.2
    done
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    ((${#missing[@]})) || return 0
    [[ $EUID -eq 0 ]] || die "installing ${missing[*]} needs root: run as root or 'apt-get install ${missing[*]}'"
    log "installing ${missing[*]}"
    # Keep the packages' maintainer scripts from starting system-wide daemons: this script starts its own.
    local policy=/usr/sbin/policy-rc.d own_policy=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
    fi
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}")
    "${apt[@]}" >"$DIR/log/apt.log" 2>&1 || { apt-get update -q >>"$DIR/log/apt.log" 2>&1 && "${apt[@]}" >>"$DIR/log/apt.log" 2>&1; } \
        || { [[ -z $own_policy ]] || rm -f "$policy"; die "apt-get install failed; see $DIR/log/apt.log"; }
    [[ -z $own_policy ]] || rm -f "$policy"
}

# write_config OUT: write slurm.conf, cgroup.conf, gres.conf and slurmdbd.conf into the folder OUT.
write_config() {
    local out=$1 mem_mb cpus
    cpus=$(nproc)
    # Leave a quarter of the memory to the system; slurmd drains a node that declares more than it has.
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.75)}' /proc/meminfo)
    mkdir -p "$out"
    cat >"$out/slurm.conf" <<EOF
$MARKER for the local test cluster under $DIR.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT_CTLD
SlurmdPort=$PORT_SLURMD
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmdPidFile=$DIR/spool/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No systemd or cgroups here.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, one job takes the node's whole memory and jobs run one at a time.
DefMemPerCPU=1000
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$PORT_DBD
AccountingStorageTRES=gres/gpu
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:standin:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    # slurmd 22.05 loads a cgroup plugin even with proctrack/linuxproc and task/none, and autodetection picks
    # cgroup/v2 wherever /sys/fs/cgroup is a cgroup2 mount; that plugin needs systemd's dbus and a delegated,
    # non-hybrid hierarchy at start. The v1 plugin does nothing until a cgroup task or proctrack plugin asks.
    cat >"$out/cgroup.conf" <<EOF
$MARKER
CgroupPlugin=cgroup/v1
EOF
    cat >"$out/gres.conf" <<EOF
$MARKER
NodeName=$NODE Name=gpu Type=standin File=$DIR/dev/gpu[0-$((GPUS - 1))]
EOF
    (
        umask 077
        cat >"$out/slurmdbd.conf" <<EOF
$MARKER
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$PORT_DBD
SlurmUser=root
AuthType=auth/munge
PidFile=$DIR/state/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$PORT_DB
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    )
}

install_config() {
    local f
    mkdir -p "$ETC"
    for f in slurm.conf cgroup.conf gres.conf; do
        if [[ -e $ETC/$f ]] && ! grep -qF "$MARKER" "$ETC/$f"; then
            die "$ETC/$f exists and was not written by this script; refusing to overwrite a real cluster's config"
        fi
        cp "$DIR/etc/$f" "$ETC/$f"
    done
}

# True if the running cluster uses the config this version of the script writes.
config_current() {
    local new rc=0
    new=$(mktemp -d)
    write_config "$new"
    diff -rq "$new" "$DIR/etc" >/dev/null || rc=1
    rm -rf "$new"
    return $rc
}

cluster_ready() {
    local d
    for d in "${DAEMONS[@]}"; do alive "$d" || return 1; done
    [[ -e $ETC/slurm.conf ]] && cmp -s "$DIR/etc/slurm.conf" "$ETC/slurm.conf" || return 1
    sinfo -h -n "$NODE" -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)' || return 1
    sacct -n -X -S now-1minutes -o JobID >/dev/null 2>&1
}

start_munge() {
    mkdir -p "$DIR/munge"
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    mkdir -p /run/munge
    chown -R munge:munge /run/munge "$DIR/munge"
    chmod 400 "$DIR/munge/munge.key"
    # munged must run as the munge user; setpriv execs it (no wrapper process), so $! is munged's PID.
    setsid setpriv --reuid=munge --regid=munge --init-groups munged --foreground --socket="$MUNGE_SOCKET" \
        --key-file="$DIR/munge/munge.key" --seed-file="$DIR/munge/munge.seed" --pid-file="$DIR/munge/munged.pid" \
        </dev/null >"$DIR/log/munged.log" 2>&1 &
    echo $! >"$DIR/run/munged.pid"
    wait_for 10 munged munge -S "$MUNGE_SOCKET" -n
}

start_mariadb() {
    mkdir -p "$DIR/mysql"
    mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
        >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
    setsid mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$DIR/run/mysql.sock" \
        --bind-address=127.0.0.1 --port=$PORT_DB --pid-file="$DIR/mysql/mariadbd.pid" \
        --log-error="$DIR/log/mariadbd.log" --innodb-buffer-pool-size=64M --skip-log-bin \
        </dev/null >/dev/null 2>&1 &
    echo $! >"$DIR/run/mariadbd.pid"
    wait_for 30 mariadbd mariadb --no-defaults --socket="$DIR/run/mysql.sock" -u root -e 'select 1'
    mariadb --no-defaults --socket="$DIR/run/mysql.sock" -u root -e "
        CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        CREATE USER 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurm() {
    # slurmdbd reads slurmdbd.conf beside $SLURM_CONF.
    setsid slurmdbd -D </dev/null >/dev/null 2>&1 &
    echo $! >"$DIR/run/slurmdbd.pid"
    wait_for 30 slurmdbd port_open $PORT_DBD
    # slurmctld registers the cluster in the database on its first start.
    setsid slurmctld -D -i </dev/null >/dev/null 2>&1 &
    echo $! >"$DIR/run/slurmctld.pid"
    wait_for 30 slurmctld scontrol ping
    setsid slurmd -D -N "$NODE" </dev/null >/dev/null 2>&1 &
    echo $! >"$DIR/run/slurmd.pid"
    wait_for 60 slurmd bash -c "sinfo -h -n '$NODE' -o %t | grep -qE '^(idle|mix|alloc)'"
    wait_for 30 slurmdbd sacct -n -X -S now-1minutes -o JobID
    # The account a real cluster would make users name (-A); sbatch refuses unknown ones like a real cluster.
    sacctmgr -i add account "$ACCOUNT" Description="DiffCredit tests" Organization=diffcredit >/dev/null
    sacctmgr -i add user "$(id -un)" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

any_alive() {
    local pid
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
    return 1
}

stop_daemons() {
    local d pid pids=()
    if alive slurmctld; then squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true; fi
    for d in "${DAEMONS[@]}"; do
        pid=$(pid_of "$d")
        if [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null; then pids+=("$pid"); fi
        rm -f "$DIR/run/$d.pid"
    done
    # Each daemon takes about 2 s to exit; stop them together, then kill what is left after 10 s.
    for _ in $(seq 50); do
        any_alive "${pids[@]}" || break
        sleep 0.2
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}

cmd_up() {
    local i
    mkdir -p "$DIR/log" "$DIR/run"
    install_packages
    if cluster_ready && config_current; then
        log "already up ($DIR)"
        return 0
    fi
    stop_daemons
    local port
    for port in $PORT_CTLD $PORT_SLURMD $PORT_DBD $PORT_DB; do
        ! port_open "$port" || die "port $port is in use by a process this script did not start (a cluster under another" \
            "DIFFCREDIT_SLURM_DIR, or a system slurm/mariadb?): stop it first"
    done
    # Saved state from an earlier run can leave the node drained or jobs half-known: always start clean.
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/mysql" "$DIR/munge" "$DIR/dev" "$DIR/etc"
    find "$DIR/log" -type f ! -name apt.log -delete
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/dev"
    for ((i = 0; i < GPUS; i++)); do mknod "$DIR/dev/gpu$i" c 1 3; done  # the numbers of /dev/null
    write_config "$DIR/etc"
    install_config
    start_munge
    start_mariadb
    start_slurm
    log "up: partition '$PARTITION', account '$ACCOUNT', node $NODE with gres gpu:standin:$GPUS ($DIR)"
}

cmd_down() {
    [[ -d $DIR/run ]] || { log "not running"; return 0; }
    stop_daemons
    local f
    for f in slurm.conf cgroup.conf gres.conf; do
        if grep -qsF "$MARKER" "$ETC/$f"; then rm -f "$ETC/$f"; fi
    done
    log "down"
}

cmd_status() {
    local d pid
    for d in "${DAEMONS[@]}"; do
        pid=$(pid_of "$d")
        if alive "$d"; then echo "$d: running (pid $pid)"; else echo "$d: stopped"; fi
    done
    if alive slurmctld; then sinfo -N -o '%N %P %t %c %m %G' 2>&1 || true; fi
    cluster_ready
}

cmd_env() {
    echo "export SLURM_CONF=$SLURM_CONF"
    echo "export DIFFCREDIT_SLURM_PARTITION=$PARTITION"
    echo "export DIFFCREDIT_SLURM_ACCOUNT=$ACCOUNT"
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
