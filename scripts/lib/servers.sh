# shellcheck shell=bash
#
# scripts/lib/servers.sh -- start and stop PRIVATE test servers for livemesh.
#
# Sourced (never executed) by scripts/with-servers, scripts/test and
# scripts/bench.  It starts, inside one fresh temp dir (mktemp -d):
#
#   * one standalone Redis,
#   * one Redis Cluster of 3 masters, each with one replica (6 nodes),
#   * one MariaDB with the binlog on (ROW format, FULL row image and FULL row
#     metadata, so CDC / binlog-tailing code can be tested for real),
#
# each on FREE loopback ports picked at start-up.  Why private instances
# rather than the machine's own servers on 6379/3306:
#   - tests can FLUSHALL, kill, restart or reconfigure them without touching
#     anybody else's data (the system servers are shared with other work);
#   - the system MariaDB may not have the binlog on, and there is no system
#     Redis Cluster at all;
#   - two checkouts (or CI and a developer) can run side by side.
#
# Public functions:
#   start_servers   start everything, export LIVEMESH_TEST_* (listed below),
#                   and install EXIT/INT/TERM traps that call stop_servers.
#   stop_servers    stop everything started and delete the temp dir.
#                   Safe to call any number of times, also after a partial
#                   start-up.
#
# Exported environment (all set by start_servers):
#   LIVEMESH_TEST_TMPDIR                 the temp dir holding everything below
#   LIVEMESH_TEST_REDIS_URL              redis://127.0.0.1:P
#   LIVEMESH_TEST_REDIS_PORT             P
#   LIVEMESH_TEST_REDIS_PID              pid at start-up (see the pid file)
#   LIVEMESH_TEST_REDIS_PIDFILE          always holds the CURRENT pid
#   LIVEMESH_TEST_REDIS_CONF             config file: `redis-server CONF` restarts it
#   LIVEMESH_TEST_REDIS_LOG              its log file
#   LIVEMESH_TEST_REDIS_CLUSTER_URLS     redis://127.0.0.1:P1,redis://...:P2,redis://...:P3 (the masters)
#   LIVEMESH_TEST_REDIS_CLUSTER_PORTS    P1,P2,P3
#   LIVEMESH_TEST_REDIS_CLUSTER_PIDS     pid1,pid2,pid3 (at start-up)
#   LIVEMESH_TEST_REDIS_CLUSTER_PIDFILES f1,f2,f3 (current pids)
#   LIVEMESH_TEST_REDIS_CLUSTER_CONFS    c1,c2,c3 (`redis-server cN` restarts node N)
#   LIVEMESH_TEST_REDIS_CLUSTER_REPLICA_PORTS    R1,R2,R3 (Ri replicates master Pi)
#   LIVEMESH_TEST_REDIS_CLUSTER_REPLICA_PIDFILES g1,g2,g3 (current pids)
#   LIVEMESH_TEST_REDIS_CLUSTER_REPLICA_CONFS    d1,d2,d3
#   (roles as at start-up: after a failover a replica is a master.)
#   LIVEMESH_TEST_MYSQL_URL              mysql://livemesh:livemesh@127.0.0.1:P (no db path)
#   LIVEMESH_TEST_MYSQL_HOST             127.0.0.1
#   LIVEMESH_TEST_MYSQL_PORT             P
#   LIVEMESH_TEST_MYSQL_USER             livemesh
#   LIVEMESH_TEST_MYSQL_PASSWORD         livemesh
#   LIVEMESH_TEST_MYSQL_SOCKET           unix socket path
#   LIVEMESH_TEST_MYSQL_PID              pid at start-up (see the pid file)
#   LIVEMESH_TEST_MYSQL_PIDFILE          always holds the CURRENT pid
#   LIVEMESH_TEST_MYSQL_DATADIR          data dir (binlogs live here too)
#   LIVEMESH_TEST_MYSQL_CNF              option file: `mariadbd --defaults-file=CNF` restarts it
#   LIVEMESH_TEST_MYSQL_LOG              its error log
#
# The livemesh MariaDB user has ALL PRIVILEGES ON *.* WITH GRANT OPTION, which
# includes REPLICATION SLAVE and REPLICATION CLIENT (BINLOG MONITOR), i.e. it
# can create databases and read the binlog as a replica would.
#
# ---------------------------------------------------------------------------
# Restart recipes for chaos tests (shell; port them to std::process::Command
# in Rust).  Always read the pid FILE: after a restart the pid changes, and
# stop_servers also goes by the pid files, so a restarted server is still
# cleaned up at the end.
#
#   # Redis (standalone or a cluster node; the config daemonizes itself):
#   kill -9 "$(cat "$LIVEMESH_TEST_REDIS_PIDFILE")"       # or -TERM
#   redis-server "$LIVEMESH_TEST_REDIS_CONF"               # same port, empty data
#   until redis-cli -u "$LIVEMESH_TEST_REDIS_URL" ping >/dev/null 2>&1; do sleep 0.1; done
#   # A restarted cluster node keeps its nodes.conf (identity and slots) and
#   # rejoins by itself; poll `redis-cli -p P cluster info` for cluster_state:ok.
#
#   # MariaDB (does not daemonize: background it, detach its stdio):
#   kill -9 "$(cat "$LIVEMESH_TEST_MYSQL_PIDFILE")"       # crash; -TERM = clean stop
#   while kill -0 "$(cat "$LIVEMESH_TEST_MYSQL_PIDFILE" 2>/dev/null)" 2>/dev/null; do sleep 0.1; done
#   mariadbd --defaults-file="$LIVEMESH_TEST_MYSQL_CNF" </dev/null >/dev/null 2>&1 &
#   until mariadb --no-defaults --protocol=tcp -h127.0.0.1 -P"$LIVEMESH_TEST_MYSQL_PORT" \
#         -u"$LIVEMESH_TEST_MYSQL_USER" -p"$LIVEMESH_TEST_MYSQL_PASSWORD" -e 'select 1' \
#         >/dev/null 2>&1; do sleep 0.2; done
#   # Data and binlogs survive the restart (same datadir); after kill -9 the
#   # pid file is stale until the new server overwrites it.
# ---------------------------------------------------------------------------
#
# Requires: redis-server, redis-cli, mariadbd, mariadb-install-db, mariadb,
# python3 (for picking ports).  scripts/install-deps installs them.

# mariadbd and mariadb-install-db may live in /usr/sbin, which is not on PATH
# in non-login shells of some setups (cron, CI runners, `su` without -).
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin" ;; esac
case ":$PATH:" in *:/sbin:*) ;; *) PATH="$PATH:/sbin" ;; esac
export PATH

# How long (seconds) to wait for each server to come up before giving up.
: "${LIVEMESH_TEST_SERVER_START_TIMEOUT:=30}"

# Internal state; start_servers and stop_servers both tolerate these being
# empty, which is what makes a double stop or a stop after a partial start safe.
_LM_TMPDIR=""
_LM_PIDFILES=()   # pid files of every server started, in start order
_LM_PIDS=()       # pids at start-up, used when a pid file has gone missing
_LM_MYSQL_PID="" _LM_MYSQL_PORT="" _LM_MYSQL_SOCKET="" _LM_MYSQL_ADMIN=""
_LM_REDIS_PID="" _LM_REDIS_PORT="" _LM_CLUSTER_PORTS=() _LM_CLUSTER_PIDS=()

_lm_log() { printf '[servers] %s\n' "$*" >&2; }

# Print a failure message naming the server, and the tail of its log.
_lm_fail() {
    local what=$1 log=${2:-}
    _lm_log "FAILED to start $what"
    if [[ -n $log && -f $log ]]; then
        _lm_log "---- last 40 lines of $log ----"
        tail -n 40 "$log" >&2 || true
        _lm_log "---- end of $log ----"
    fi
}

# Seconds since the epoch with sub-second precision ($EPOCHREALTIME, bash 5).
_lm_now() { printf '%s' "${EPOCHREALTIME:-$(date +%s)}"; }

# Print N distinct free TCP ports on 127.0.0.1, one per line.
#
# Ports are drawn at random BELOW the kernel's ephemeral range
# (ip_local_port_range, 32768+ by default): a port handed out by bind(0)
# lies inside that range, where any outgoing connection (cargo, a test's
# client) can grab it in the gap between picking it and the server binding
# it.  Each candidate is checked by binding it; all candidates stay bound
# until all N are picked so that no port is returned twice.  The system
# servers' ports (6379, 3306, ...) are skipped by that bind check, and also
# excluded by name in case they are down at the moment.
livemesh_pick_ports() {
    python3 - "$1" <<'PY'
import random, socket, sys

n = int(sys.argv[1])
try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        eph_lo = int(f.read().split()[0])
except OSError:
    eph_lo = 32768
lo, hi = 20000, max(min(eph_lo, 32768) - 1, 20999)
avoid = {3306, 5432, 5672, 6379, 1883, 4222, 4369, 25672, 15672}
held, ports = [], []
for _ in range(5000):
    if len(ports) == n:
        break
    p = random.randint(lo, hi)
    if p in avoid or p in ports:
        continue
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        s.close()
        continue
    held.append(s)
    ports.append(p)
if len(ports) != n:
    sys.exit("could not find %d free ports" % n)
print("\n".join(map(str, ports)))
PY
}

# Poll CMD... until it succeeds, for at most $1 seconds (0.1 s steps).
_lm_wait_for() {
    local timeout=$1; shift
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then return 1; fi
        sleep 0.1
    done
}

_lm_redis_ping() { [[ $(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null) == PONG ]]; }

# True if a pid is alive AND is the program we expect (guards against a pid
# that has since been reused by an unrelated process); NAME "" = any program.
_lm_pid_is() {
    local pid=$1 name=$2 comm stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name"* ]] || return 1
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

# Write a redis config file.  A config file (rather than a command line) is
# what makes a restart by a chaos test a one-liner: `redis-server CONF`.
#   _lm_write_redis_conf DIR PORT [BUSPORT]   (BUSPORT => cluster node)
_lm_write_redis_conf() {
    local dir=$1 port=$2 bus=${3:-}
    {
        echo "bind 127.0.0.1"
        echo "port $port"
        echo "daemonize yes"
        echo "pidfile \"$dir/redis.pid\""
        echo "logfile \"$dir/redis.log\""
        echo "dir \"$dir\""
        # Pure in-memory: nothing written to disk, restarts come back empty.
        echo "save \"\""
        echo "appendonly no"
        # Lets tests use DEBUG SLEEP etc. to simulate a slow server; only
        # from loopback connections.
        echo "enable-debug-command local"
        if [[ -n $bus ]]; then
            echo "cluster-enabled yes"
            echo "cluster-config-file \"$dir/nodes.conf\""
            # The bus port defaults to port+10000, which may be taken or
            # exceed 65535; pick it explicitly instead (Redis >= 7.0).
            echo "cluster-port $bus"
            echo "cluster-node-timeout 5000"
        fi
    } >"$dir/redis.conf"
}

# Start a server in the background, its stdio detached (so it never holds
# the caller's stdout pipe open: CI waits for that pipe to close), remember
# its pid file for stop_servers, and leave its pid in _LM_LAST_PID.
#   _lm_spawn PIDFILE LOG CMD [ARGS...]
_lm_spawn() {
    local pidfile=$1 log=$2; shift 2
    "$@" </dev/null >>"$log" 2>&1 &
    _LM_LAST_PID=$!
    # Out of the job table: no "Killed ..." line from bash when a chaos test
    # kills it (bash still reaps it).
    disown "$_LM_LAST_PID" 2>/dev/null || true
    _LM_PIDFILES+=("$pidfile")
    _LM_PIDS+=("$_LM_LAST_PID")
}

# Wait until CHECK... succeeds; fail early if the process died, fail after
# LIVEMESH_TEST_SERVER_START_TIMEOUT seconds otherwise.
#   _lm_wait_up WHAT PID LOG CHECK [ARGS...]
_lm_wait_up() {
    local what=$1 pid=$2 log=$3; shift 3
    local deadline=$((SECONDS + LIVEMESH_TEST_SERVER_START_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ! _lm_pid_is "$pid" ""; then
            _lm_fail "$what (the server process exited)" "$log"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            _lm_fail "$what (not ready after ${LIVEMESH_TEST_SERVER_START_TIMEOUT}s)" "$log"
            return 1
        fi
        sleep 0.05
    done
}

# Each server starts in two halves, launch (spawn, no waiting) and ready
# (wait, configure, export), so that start_servers can let all of them boot
# at the same time; start_X runs both halves for a single server.
start_redis_standalone() { _lm_redis_launch && _lm_redis_ready; }

_lm_redis_launch() {
    local dir="$_LM_TMPDIR/redis" port
    mkdir -p "$dir"
    port=$(livemesh_pick_ports 1) || { _lm_fail "redis (no free port)"; return 1; }
    _lm_write_redis_conf "$dir" "$port"
    _lm_spawn "$dir/redis.pid" "$dir/redis.log" \
        redis-server "$dir/redis.conf" --daemonize no || return 1
    _LM_REDIS_PORT=$port
    _LM_REDIS_PID=$_LM_LAST_PID
}

_lm_redis_ready() {
    local dir="$_LM_TMPDIR/redis" port=$_LM_REDIS_PORT
    _lm_wait_up "redis standalone on 127.0.0.1:$port" "$_LM_REDIS_PID" "$dir/redis.log" \
        _lm_redis_ping "$port" || return 1
    export LIVEMESH_TEST_REDIS_URL="redis://127.0.0.1:$port"
    export LIVEMESH_TEST_REDIS_PORT="$port"
    export LIVEMESH_TEST_REDIS_PID="$_LM_REDIS_PID"
    export LIVEMESH_TEST_REDIS_PIDFILE="$dir/redis.pid"
    export LIVEMESH_TEST_REDIS_CONF="$dir/redis.conf"
    export LIVEMESH_TEST_REDIS_LOG="$dir/redis.log"
}

_lm_cluster_ok_on() {
    local info
    info=$(redis-cli -h 127.0.0.1 -p "$1" cluster info 2>/dev/null) || return 1
    [[ $info == *cluster_state:ok* && $info == *cluster_known_nodes:6* \
        && $info == *cluster_slots_assigned:16384* ]]
}

_lm_cluster_ok_all() {
    local p
    for p in "$@"; do _lm_cluster_ok_on "$p" || return 1; done
}

# A replica whose link to its master is up (so WAIT can count it).
_lm_replica_up_on() {
    local info
    info=$(redis-cli -h 127.0.0.1 -p "$1" info replication 2>/dev/null) || return 1
    [[ $info == *role:slave* && $info == *master_link_status:up* ]]
}

_lm_replicas_up_all() {
    local p
    for p in "$@"; do _lm_replica_up_on "$p" || return 1; done
}

start_redis_cluster() { _lm_cluster_launch && _lm_cluster_ready; }

# Launch the six nodes (no waiting).  A fresh master only reports
# cluster_state:ok 2 s after it started, so launching early pays off.
_lm_cluster_launch() {
    local base="$_LM_TMPDIR/redis-cluster" ports=() i dir
    mkdir -p "$base"
    # 6 client ports + 6 cluster-bus ports.
    mapfile -t ports < <(livemesh_pick_ports 12)
    if ((${#ports[@]} != 12)); then _lm_fail "redis cluster (no free ports)"; return 1; fi
    _LM_CLUSTER_PORTS=("${ports[@]:0:6}")
    _LM_CLUSTER_PIDS=()
    for i in 0 1 2 3 4 5; do
        dir="$base/${ports[i]}"
        mkdir -p "$dir"
        _lm_write_redis_conf "$dir" "${ports[i]}" "${ports[i + 6]}"
        _lm_spawn "$dir/redis.pid" "$dir/redis.log" \
            redis-server "$dir/redis.conf" --daemonize no || return 1
        _LM_CLUSTER_PIDS+=("$_LM_LAST_PID")
    done
}

# Wait for the nodes, form the cluster (the first three given are the
# masters, the others their replicas), wait until all six agree it is ok and
# every replica is linked to its master.
_lm_cluster_ready() {
    local base="$_LM_TMPDIR/redis-cluster" i j dir info
    local ports=("${_LM_CLUSTER_PORTS[@]}") pids=("${_LM_CLUSTER_PIDS[@]}")
    local addrs=()
    for i in 0 1 2 3 4 5; do
        dir="$base/${ports[i]}"
        _lm_wait_up "redis cluster node 127.0.0.1:${ports[i]}" "${pids[i]}" \
            "$dir/redis.log" _lm_redis_ping "${ports[i]}" || return 1
        addrs+=("127.0.0.1:${ports[i]}")
    done
    # Assign the 16384 slots over three masters, one replica each.  Bounded
    # with timeout: redis-cli waits for the nodes to join with no limit of
    # its own, so a node dying at this point would otherwise hang the run
    # forever.  --foreground keeps redis-cli in our process group, so a
    # Ctrl-C or a TERM to the group reaches it (and our trap runs) at once.
    if ! timeout --foreground "$LIVEMESH_TEST_SERVER_START_TIMEOUT" \
        redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
        >"$base/create.log" 2>&1; then
        _lm_fail "redis cluster (redis-cli --cluster create)" "$base/create.log"
        return 1
    fi
    # `create` returns once slots are assigned; the nodes still have to gossip
    # until every one of them sees the full, healthy cluster.
    if ! _lm_wait_for "$LIVEMESH_TEST_SERVER_START_TIMEOUT" _lm_cluster_ok_all "${ports[@]}"; then
        for i in 0 1 2 3 4 5; do
            _lm_log "cluster info on ${ports[i]}:"
            redis-cli -p "${ports[i]}" cluster info 2>&1 | head -8 >&2 || true
        done
        _lm_fail "redis cluster (cluster_state:ok not reached in ${LIVEMESH_TEST_SERVER_START_TIMEOUT}s)" \
            "$base/${ports[0]}/redis.log"
        return 1
    fi
    # Who replicates whom, as redis-cli arranged it.
    local masters=() replicas=() master_of=()
    for i in 0 1 2 3 4 5; do
        info=$(redis-cli -p "${ports[i]}" info replication 2>/dev/null | tr -d '\r')
        if [[ $info == *role:master* ]]; then
            masters+=("$i")
        else
            master_of[i]=$(sed -n 's/^master_port://p' <<<"$info")
            replicas+=("$i")
        fi
    done
    if ((${#masters[@]} != 3 || ${#replicas[@]} != 3)); then
        _lm_fail "redis cluster (expected 3 masters and 3 replicas, got ${#masters[@]} and ${#replicas[@]})" \
            "$base/create.log"
        return 1
    fi
    local replica_ports=()
    for i in "${replicas[@]}"; do replica_ports+=("${ports[i]}"); done
    if ! _lm_wait_for "$LIVEMESH_TEST_SERVER_START_TIMEOUT" _lm_replicas_up_all "${replica_ports[@]}"; then
        _lm_fail "redis cluster (replicas not linked to their masters in ${LIVEMESH_TEST_SERVER_START_TIMEOUT}s)" \
            "$base/${replica_ports[0]}/redis.log"
        return 1
    fi
    local urls=() mports=() mpids=() pidfiles=() confs=() rports=() rpidfiles=() rconfs=()
    for i in "${masters[@]}"; do
        dir="$base/${ports[i]}"
        urls+=("redis://127.0.0.1:${ports[i]}")
        mports+=("${ports[i]}")
        mpids+=("${pids[i]}")
        pidfiles+=("$dir/redis.pid")
        confs+=("$dir/redis.conf")
        for j in "${replicas[@]}"; do
            if [[ ${master_of[j]} == "${ports[i]}" ]]; then
                dir="$base/${ports[j]}"
                rports+=("${ports[j]}")
                rpidfiles+=("$dir/redis.pid")
                rconfs+=("$dir/redis.conf")
            fi
        done
    done
    if ((${#rports[@]} != 3)); then
        _lm_fail "redis cluster (not one replica per master)" "$base/create.log"
        return 1
    fi
    local IFS=,
    export LIVEMESH_TEST_REDIS_CLUSTER_URLS="${urls[*]}"
    export LIVEMESH_TEST_REDIS_CLUSTER_PORTS="${mports[*]}"
    export LIVEMESH_TEST_REDIS_CLUSTER_PIDS="${mpids[*]}"
    export LIVEMESH_TEST_REDIS_CLUSTER_PIDFILES="${pidfiles[*]}"
    export LIVEMESH_TEST_REDIS_CLUSTER_CONFS="${confs[*]}"
    export LIVEMESH_TEST_REDIS_CLUSTER_REPLICA_PORTS="${rports[*]}"
    export LIVEMESH_TEST_REDIS_CLUSTER_REPLICA_PIDFILES="${rpidfiles[*]}"
    export LIVEMESH_TEST_REDIS_CLUSTER_REPLICA_CONFS="${rconfs[*]}"
}

# Run SQL as the server's all-powerful socket-authenticated account.
# shellcheck disable=SC2120 # args come through _lm_wait_up
_lm_mysql_admin() {
    mariadb --no-defaults --protocol=socket -S "$_LM_MYSQL_SOCKET" -u "$_LM_MYSQL_ADMIN" "$@"
}

start_mysql() { _lm_mysql_launch && _lm_mysql_ready; }

# First half: write the option file, create the system tables, launch mariadbd.
_lm_mysql_launch() {
    local dir="$_LM_TMPDIR/mysql" port me
    local data="$dir/data" cnf="$dir/my.cnf" log="$dir/mariadbd.err"
    mkdir -p "$data"
    port=$(livemesh_pick_ports 1) || { _lm_fail "mariadb (no free port)"; return 1; }
    me=$(id -un)
    _LM_MYSQL_SOCKET="$dir/mysqld.sock"
    _LM_MYSQL_ADMIN=$me

    # mariadbd refuses to run as root unless told --user=root; --user is only
    # allowed for root, so pass it only then.
    local user_opt=() user_line=""
    if ((EUID == 0)); then user_opt=(--user=root); user_line="user=root"; fi

    # One option file, read ALONE (--defaults-file) so that the system's
    # /etc/mysql config (port 3306, its socket, its datadir) never leaks in.
    cat >"$cnf" <<EOF
[mariadbd]
datadir=$data
socket=$_LM_MYSQL_SOCKET
port=$port
bind-address=127.0.0.1
pid-file=$dir/mariadbd.pid
log-error=$log
$user_line
# Binlog as a CDC consumer needs it: every row change, full before/after
# images, and column names/types in the table-map events.
server-id=1
log-bin=mysql-bin
binlog-format=ROW
binlog-row-image=FULL
binlog-row-metadata=FULL
# Lean: small memory, no DNS lookups on connect, room for parallel tests.
innodb-buffer-pool-size=64M
skip-name-resolve
max-connections=500
# Same default charset as Debian's own server config.
character-set-server=utf8mb4
collation-server=utf8mb4_general_ci
# Throwaway data: flush the redo log once a second instead of per commit
# (a killed mariadbd still loses nothing; only an OS crash could).
innodb-flush-log-at-trx-commit=2
EOF

    # System tables.  --no-defaults for the same reason as above; no binlog
    # during bootstrap, so the binlog starts clean with the first test.
    # root@localhost (and the socket user, the same when we are root) log in
    # through the unix socket with no password.
    if ! mariadb-install-db --no-defaults "${user_opt[@]}" --datadir="$data" \
        --auth-root-authentication-method=socket --auth-root-socket-user="$me" \
        --skip-test-db --skip-name-resolve >"$dir/install-db.log" 2>&1; then
        _lm_fail "mariadb (mariadb-install-db)" "$dir/install-db.log"
        return 1
    fi

    _lm_spawn "$dir/mariadbd.pid" "$log" mariadbd --defaults-file="$cnf" || return 1
    _LM_MYSQL_PID=$_LM_LAST_PID
    _LM_MYSQL_PORT=$port
}

# Second half of the MariaDB start: wait until it accepts connections, create
# the test user, export the LIVEMESH_TEST_MYSQL_* variables.
_lm_mysql_ready() {
    local dir="$_LM_TMPDIR/mysql" port=$_LM_MYSQL_PORT pid=$_LM_MYSQL_PID
    local data="$_LM_TMPDIR/mysql/data" cnf="$_LM_TMPDIR/mysql/my.cnf"
    local log="$_LM_TMPDIR/mysql/mariadbd.err" user=livemesh pass=livemesh
    _lm_wait_up "mariadb on 127.0.0.1:$port" "$pid" "$log" _lm_mysql_admin -e 'select 1' || return 1

    # A real password user for TCP, as the code under test will connect.
    # ALL PRIVILEGES includes REPLICATION SLAVE and REPLICATION CLIENT; they
    # are named too so that the intent is explicit.
    # shellcheck disable=SC2119 # SQL on stdin, no args needed
    if ! _lm_mysql_admin >"$dir/grant.log" 2>&1 <<SQL; then
-- Keep these out of the binlog: tests then see only their own events.
SET SESSION sql_log_bin = 0;
CREATE USER '$user'@'%' IDENTIFIED BY '$pass';
CREATE USER '$user'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL PRIVILEGES ON *.* TO '$user'@'%' WITH GRANT OPTION;
GRANT ALL PRIVILEGES ON *.* TO '$user'@'localhost' WITH GRANT OPTION;
GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '$user'@'%';
GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '$user'@'localhost';
SQL
        _lm_fail "mariadb (creating user $user)" "$dir/grant.log"
        return 1
    fi
    # Prove the TCP login the tests will use actually works.
    if ! mariadb --no-defaults --protocol=tcp -h 127.0.0.1 -P "$port" -u "$user" -p"$pass" \
        -e 'select 1' >"$dir/tcp-check.log" 2>&1; then
        _lm_fail "mariadb (TCP login as $user on 127.0.0.1:$port)" "$dir/tcp-check.log"
        return 1
    fi

    export LIVEMESH_TEST_MYSQL_URL="mysql://$user:$pass@127.0.0.1:$port"
    export LIVEMESH_TEST_MYSQL_HOST=127.0.0.1
    export LIVEMESH_TEST_MYSQL_PORT="$port"
    export LIVEMESH_TEST_MYSQL_USER="$user"
    export LIVEMESH_TEST_MYSQL_PASSWORD="$pass"
    export LIVEMESH_TEST_MYSQL_SOCKET="$_LM_MYSQL_SOCKET"
    export LIVEMESH_TEST_MYSQL_PID="$pid"
    export LIVEMESH_TEST_MYSQL_PIDFILE="$dir/mariadbd.pid"
    export LIVEMESH_TEST_MYSQL_DATADIR="$data"
    export LIVEMESH_TEST_MYSQL_CNF="$cnf"
    export LIVEMESH_TEST_MYSQL_LOG="$log"
}

# Send TERM to a server, wait up to $3 seconds, then KILL.
_lm_stop_pid() {
    local pid=$1 name=$2 grace=$3 deadline
    _lm_pid_is "$pid" "$name" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    deadline=$((SECONDS + grace))
    while _lm_pid_is "$pid" "$name"; do
        if ((SECONDS >= deadline)); then
            _lm_log "$name (pid $pid) ignored TERM for ${grace}s; killing"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
            break
        fi
        sleep 0.05
    done
}

# Stop stray server processes whose command line names our temp dir: the
# bootstrap mariadbd that mariadb-install-db runs (if we are interrupted
# during install-db it is in no pid file) and servers a test restarted by
# hand without a pid file.  Only server programs are touched, and only ones
# naming this run's private dir.
_lm_sweep() {
    local dir=$1 p pid comm args=()
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        # Builtins only (no fork per process): this loop sees every process.
        read -r comm <"$p/comm" 2>/dev/null || continue
        case $comm in mariadbd | mysqld | redis-server | mariadb-install* | mysql_install*) ;; *) continue ;; esac
        mapfile -d '' args <"$p/cmdline" 2>/dev/null || continue
        [[ "${args[*]}" == *"$dir/"* ]] || continue
        _lm_log "stopping stray $comm (pid $pid) of $dir"
        _lm_stop_pid "$pid" "$comm" 5 || true
    done
}

# Stop every server started (by the CURRENT pid in its pid file, so servers a
# chaos test restarted are caught too; else by the pid seen at start-up) and
# remove the temp dir.  Never fails, so it is safe in traps and twice over.
stop_servers() {
    local i pf pid name pids_seen=" "
    for ((i = ${#_LM_PIDFILES[@]} - 1; i >= 0; i--)); do
        pf=${_LM_PIDFILES[i]}
        case $pf in */mariadbd.pid) name=mariadbd ;; *) name=redis-server ;; esac
        for pid in "$(cat "$pf" 2>/dev/null || true)" "${_LM_PIDS[i]:-}"; do
            [[ -n $pid && $pids_seen != *" $pid "* ]] || continue
            pids_seen+="$pid "
            # The data is thrown away, so no need for a long clean shutdown.
            _lm_stop_pid "$pid" "$name" 10 || true
        done
    done
    _LM_PIDFILES=()
    _LM_PIDS=()
    if [[ -n $_LM_TMPDIR && -d $_LM_TMPDIR ]]; then
        _lm_sweep "$_LM_TMPDIR"
        # A server that was still writing could make the first rm fail.
        rm -rf -- "$_LM_TMPDIR" 2>/dev/null || { sleep 0.5; rm -rf -- "$_LM_TMPDIR" || true; }
    fi
    _LM_TMPDIR=""
    return 0
}

# Trap handlers: on a signal, stop the servers and exit with the usual
# 128+N status (which in turn fires the EXIT trap; stop_servers is idempotent).
_lm_on_exit() {
    local rc=$?
    stop_servers
    exit "$rc"
}
_lm_on_signal() {
    trap - INT TERM
    stop_servers
    exit "$1"
}

livemesh_install_server_traps() {
    trap _lm_on_exit EXIT
    trap '_lm_on_signal 130' INT
    trap '_lm_on_signal 143' TERM
}

_lm_launch_redis_all() { _lm_redis_launch && _lm_cluster_launch; }

# Run a start function and log how long it took.
_lm_timed() {
    local what=$1 t0 rc=0; shift
    t0=$(_lm_now)
    "$@" || rc=$?
    if ((rc == 0)); then _lm_log "$what: $(_lm_elapsed "$t0")s"; fi
    return "$rc"
}

_lm_elapsed() { awk -v a="$1" -v b="$(_lm_now)" 'BEGIN { printf "%.1f", b - a }'; }

# Start everything.  Returns non-zero (after cleaning up what did start) if
# any server fails; the message names the server and shows its log tail.
start_servers() {
    local t0 tool
    t0=$(_lm_now)
    for tool in redis-server redis-cli mariadbd mariadb-install-db mariadb python3 timeout; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            _lm_log "missing '$tool' on PATH; run scripts/install-deps"
            return 1
        fi
    done
    livemesh_install_server_traps
    _LM_TMPDIR=$(mktemp -d "${TMPDIR:-/tmp}/livemesh-test.XXXXXX") || return 1
    export LIVEMESH_TEST_TMPDIR="$_LM_TMPDIR"

    # Launch everything first, then wait: the Redis nodes boot (and sit out
    # their 2 s before a cluster can be ok) while mariadb-install-db runs,
    # and mariadbd initialises while the cluster forms.
    _lm_timed "launch redis + cluster nodes" _lm_launch_redis_all || { stop_servers; return 1; }
    _lm_timed "mariadb-install-db + launch" _lm_mysql_launch || { stop_servers; return 1; }
    _lm_timed "redis standalone ready" _lm_redis_ready || { stop_servers; return 1; }
    _lm_timed "redis cluster ready" _lm_cluster_ready || { stop_servers; return 1; }
    _lm_timed "mariadb ready" _lm_mysql_ready || { stop_servers; return 1; }

    _lm_log "redis $LIVEMESH_TEST_REDIS_URL | cluster $LIVEMESH_TEST_REDIS_CLUSTER_URLS | mariadb 127.0.0.1:$LIVEMESH_TEST_MYSQL_PORT"
    _lm_log "all servers up in $(_lm_elapsed "$t0")s (dir $LIVEMESH_TEST_TMPDIR)"
}
