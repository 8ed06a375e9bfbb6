# shellcheck shell=bash
#
# scripts/lib/topology.sh -- the production shape as local processes (see
# scripts/topology).  Sourced after scripts/lib/servers.sh, whose helpers
# (ports, redis configs, spawning, waiting, MariaDB) it reuses.
#
# Public functions:
#   topology_start BIN_DIR      servers, databases, TLS, tokens, processes;
#                               writes $TOPO_DIR/topology.json; installs
#                               EXIT/INT/TERM traps that stop everything
#   topology_run_check BIN_DIR ROUNDS [CHAOS]
#                               livemesh topology-check against it
#   topology_stop               SIGTERM every process (each must exit 0),
#                               then the servers; idempotent
#   topology_print              the address table
#   topology_all_alive          every service process still runs

TOPO_DOMAIN=livemesh.mesh.internal
TOPO_DIR=""
TOPO_STARTUP_SECS=0
TOPO_NAMES=() # process names, in start order
declare -A TOPO_PID TOPO_URL TOPO_HEALTH TOPO_METRICS TOPO_LOG TOPO_SERVICE TOPO_BIN
TOPO_DBS=()       # databases created on a MariaDB we did not start
TOPO_MYSQL_URL="" # mysql://user:pass@host:port (no database)
TOPO_REDIS_URLS=""
TOPO_STOPPED=0

_topo_log() { printf '[topology] %s\n' "$*" >&2; }

# A 6-node Redis Cluster: 3 masters, each with a replica.
_topo_redis_cluster() {
    local base="$_LM_TMPDIR/redis-cluster" ports=() i dir addrs=() urls=()
    mkdir -p "$base"
    mapfile -t ports < <(livemesh_pick_ports 12)
    ((${#ports[@]} == 12)) || { _lm_fail "redis cluster (no free ports)"; return 1; }
    local pids=()
    for i in 0 1 2 3 4 5; do
        dir="$base/${ports[i]}"
        mkdir -p "$dir"
        _lm_write_redis_conf "$dir" "${ports[i]}" "${ports[i + 6]}"
        # No 5 s pause before a replica's first sync: replicas are part of
        # the shape from the start.
        _lm_spawn "$dir/redis.pid" "$dir/redis.log" \
            redis-server "$dir/redis.conf" --daemonize no --repl-diskless-sync-delay 0 || return 1
        pids+=("$_LM_LAST_PID")
    done
    for i in 0 1 2 3 4 5; do
        _lm_wait_up "redis node 127.0.0.1:${ports[i]}" "${pids[i]}" "$base/${ports[i]}/redis.log" \
            _lm_redis_ping "${ports[i]}" || return 1
        addrs+=("127.0.0.1:${ports[i]}")
        urls+=("redis://127.0.0.1:${ports[i]}")
    done
    if ! timeout --foreground "$LIVEMESH_TEST_SERVER_START_TIMEOUT" \
        redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
        >"$base/create.log" 2>&1; then
        _lm_fail "redis cluster (redis-cli --cluster create)" "$base/create.log"
        return 1
    fi
    _topo_cluster_ok() {
        local p info nodes
        for p in "$@"; do
            info=$(redis-cli -p "$p" cluster info 2>/dev/null) || return 1
            [[ $info == *cluster_state:ok* && $info == *cluster_known_nodes:6* \
                && $info == *cluster_slots_assigned:16384* ]] || return 1
        done
        nodes=$(redis-cli -p "$1" cluster nodes 2>/dev/null) || return 1
        (($(awk '$3 ~ /slave/' <<<"$nodes" | wc -l) == 3 && $(awk '$3 ~ /master/' <<<"$nodes" | wc -l) == 3))
    }
    if ! _lm_wait_for "$LIVEMESH_TEST_SERVER_START_TIMEOUT" _topo_cluster_ok "${ports[@]:0:6}"; then
        redis-cli -p "${ports[0]}" cluster nodes >&2 || true
        _lm_fail "redis cluster (3 masters + 3 replicas not ok in time)" "$base/${ports[0]}/redis.log"
        return 1
    fi
    TOPO_REDIS_URLS=$(IFS=,; echo "${urls[*]}")
    TOPO_REDIS_PORTS=("${ports[@]:0:6}")
}

# MariaDB: the harness's when scripts/test runs us, else our own.
_topo_mariadb() {
    if [[ -n ${LIVEMESH_TEST_MYSQL_URL:-} ]]; then
        TOPO_MYSQL_URL=$LIVEMESH_TEST_MYSQL_URL
        TOPO_OWN_MYSQL=0
    else
        _lm_mysql_launch && _lm_mysql_ready || return 1
        TOPO_MYSQL_URL=$LIVEMESH_TEST_MYSQL_URL
        TOPO_OWN_MYSQL=1
    fi
    local prefix="topology_$$_" db
    TOPO_DB_ROOMS="${prefix}rooms"
    TOPO_DB_LOVES="${prefix}loves"
    TOPO_DB_SHARDS=("${prefix}balance_0" "${prefix}balance_1" "${prefix}balance_2" "${prefix}balance_3")
    for db in "$TOPO_DB_ROOMS" "$TOPO_DB_LOVES" "${TOPO_DB_SHARDS[@]}"; do
        _topo_sql "CREATE DATABASE \`$db\`" || return 1
        TOPO_DBS+=("$db")
    done
}

_topo_sql() {
    mariadb --no-defaults --protocol=tcp -h "$LIVEMESH_TEST_MYSQL_HOST" -P "$LIVEMESH_TEST_MYSQL_PORT" \
        -u "$LIVEMESH_TEST_MYSQL_USER" -p"$LIVEMESH_TEST_MYSQL_PASSWORD" -e "$1"
}

# A CA and one certificate for the whole mesh (the chart's
# auth.tls.domain), as a cert-manager Certificate would provide.
_topo_tls() {
    local dir=$1
    mkdir -p "$dir"
    cat >"$dir/openssl.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = $TOPO_DOMAIN
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:$TOPO_DOMAIN
EOF
    (
        cd "$dir" &&
            openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
                -keyout ca.key -out ca.crt -days 2 -subj "/CN=livemesh topology CA" \
                -config openssl.cnf -extensions ca &&
            openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
                -keyout tls.key -out tls.csr -config openssl.cnf &&
            openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
                -out tls.crt -days 2 -extfile openssl.cnf -extensions leaf
    ) >"$dir/openssl.log" 2>&1 || { _lm_fail "TLS certificates (openssl)" "$dir/openssl.log"; return 1; }
}

# The environment every container of the chart gets (values-production:
# enforce, token secret file, mutual TLS, the mounted TOML).
_topo_common_env() {
    TOPO_COMMON_ENV=(
        "PATH=$PATH"
        "HOME=$TOPO_DIR"
        "LIVEMESH_CONFIG=$TOPO_DIR/config/livemesh.toml"
        "LIVEMESH_AUTH__MODE=enforce"
        "LIVEMESH_AUTH__TOKEN_SECRET_FILE=$TOPO_DIR/token/token-secret"
        "LIVEMESH_AUTH__TLS_CERT=$TOPO_DIR/tls/tls.crt"
        "LIVEMESH_AUTH__TLS_KEY=$TOPO_DIR/tls/tls.key"
        "LIVEMESH_AUTH__TLS_CA=$TOPO_DIR/tls/ca.crt"
        "LIVEMESH_AUTH__TLS_DOMAIN=$TOPO_DOMAIN"
    )
}

# Plans process NAME of SERVICE: takes its three ports from TOPO_PORTS
# (picked in one go, so no two processes get the same one).
_topo_plan() {
    local name=$1 service=$2 ports=("${TOPO_PORTS[@]:0:3}")
    TOPO_PORTS=("${TOPO_PORTS[@]:3}")
    TOPO_NAMES+=("$name")
    TOPO_SERVICE[$name]=$service
    TOPO_URL[$name]="https://127.0.0.1:${ports[0]}"
    TOPO_HEALTH[$name]="127.0.0.1:${ports[1]}"
    TOPO_METRICS[$name]="127.0.0.1:${ports[2]}"
    TOPO_LOG[$name]="$TOPO_DIR/logs/$name.log"
}

# Starts process NAME with the chart's per-pod environment plus EXTRA
# (KEY=VALUE...), and nothing else from this shell's environment.
_topo_spawn() {
    local bin_dir=$1 name=$2; shift 2
    local service=${TOPO_SERVICE[$name]} url=${TOPO_URL[$name]}
    mkdir -p "$TOPO_DIR/data/$name" "$TOPO_DIR/env"
    local env=(
        "${TOPO_COMMON_ENV[@]}"
        "LIVEMESH_LISTEN=${url#https://}"
        "LIVEMESH_SERVER__HEALTH_LISTEN=${TOPO_HEALTH[$name]}"
        "LIVEMESH_TELEMETRY__METRICS_LISTEN=${TOPO_METRICS[$name]}"
        "LIVEMESH_DATA_DIR=$TOPO_DIR/data/$name"
        "$@"
    )
    # The exact environment (NUL-separated) and binary, so that the chaos
    # of topology-check restarts a killed process as this started it.
    printf '%s\0' "${env[@]}" >"$TOPO_DIR/env/$name.env"
    TOPO_BIN[$name]="$bin_dir/livemesh-$service"
    env -i "${env[@]}" "${TOPO_BIN[$name]}" </dev/null >"${TOPO_LOG[$name]}" 2>&1 &
    TOPO_PID[$name]=$!
}

_topo_db_url() { echo "$TOPO_MYSQL_URL/$1"; }

topology_start() {
    local bin_dir=$1 t0=$SECONDS name i
    _LM_TMPDIR=$(mktemp -d "${TMPDIR:-/tmp}/livemesh-topology.XXXXXX")
    TOPO_DIR=$_LM_TMPDIR
    mkdir -p "$TOPO_DIR/logs" "$TOPO_DIR/config" "$TOPO_DIR/token"
    trap '_topo_on_exit' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    _topo_redis_cluster || return 1
    _topo_mariadb || return 1
    _topo_tls "$TOPO_DIR/tls" || return 1
    openssl rand -hex 32 >"$TOPO_DIR/token/token-secret"
    # The chart's mesh-wide TOML (values-production's `config`, trimmed to
    # what matters here).
    cat >"$TOPO_DIR/config/livemesh.toml" <<EOF
[fanout]
phase = "topology"
wait_replicas = 1

[counter]
phase = "topology"
total_shards = 8
wait_replicas = 1

[gifts]
shards = 4
EOF
    _topo_common_env

    mapfile -t TOPO_PORTS < <(livemesh_pick_ports 30)
    ((${#TOPO_PORTS[@]} == 30)) || { _topo_log "no 30 free ports"; return 1; }
    _topo_plan ongoing-query-0 ongoing-query
    _topo_plan publish-0 publish
    _topo_plan publish-1 publish
    for i in 0 1 2; do _topo_plan "subscribe-$i" subscribe; done
    for i in 0 1; do _topo_plan "counter-$i" counter; done
    for i in 0 1; do _topo_plan "gift-settler-$i" gift-settler; done

    local oq=${TOPO_URL[ongoing-query-0]} shards=() db
    for db in "${TOPO_DB_SHARDS[@]}"; do shards+=("$(_topo_db_url "$db")"); done
    # Without a load balancer in front of the dispatchers, each client
    # replica is pointed at one of them, alternating.
    _topo_publish_of() { echo "${TOPO_URL[publish-$(($1 % 2))]}"; }

    _topo_spawn "$bin_dir" ongoing-query-0 \
        "LIVEMESH_DATABASE_URL=$(_topo_db_url "$TOPO_DB_ROOMS")" \
        "LIVEMESH_ROOMS__FEED_CONSUMER=ongoing-query-0"
    for i in 0 1; do
        _topo_spawn "$bin_dir" "publish-$i" \
            "LIVEMESH_REDIS_URL=$TOPO_REDIS_URLS" \
            "LIVEMESH_PUBLISH__ONGOING_QUERY_URL=$oq" \
            "LIVEMESH_PUBLISH__DATACENTER=local"
    done
    for i in 0 1 2; do
        _topo_spawn "$bin_dir" "subscribe-$i" \
            "LIVEMESH_REDIS_URL=$TOPO_REDIS_URLS" \
            "LIVEMESH_SUBSCRIBE__ONGOING_QUERY_URL=$oq" \
            "LIVEMESH_SUBSCRIBE__PUBLISH_URL=$(_topo_publish_of "$i")" \
            "LIVEMESH_SUBSCRIBE__NODE_URL=${TOPO_URL[subscribe-$i]}"
    done
    for i in 0 1; do
        _topo_spawn "$bin_dir" "counter-$i" \
            "LIVEMESH_REDIS_URL=$TOPO_REDIS_URLS" \
            "LIVEMESH_COUNTER__DATABASE_URL=$(_topo_db_url "$TOPO_DB_LOVES")" \
            "LIVEMESH_COUNTER__ONGOING_QUERY_URL=$oq" \
            "LIVEMESH_COUNTER__PUBLISH_URL=$(_topo_publish_of "$i")" \
            "LIVEMESH_COUNTER__WAIT_REPLICAS=1"
    done
    for i in 0 1; do
        _topo_spawn "$bin_dir" "gift-settler-$i" \
            "LIVEMESH_GIFTS__SHARD_URLS=$(IFS=,; echo "${shards[*]}")" \
            "LIVEMESH_GIFTS__ONGOING_QUERY_URL=$oq" \
            "LIVEMESH_GIFTS__PUBLISH_URL=$(_topo_publish_of "$i")"
    done

    # Ready = each one's plaintext health port answers SERVING, the way
    # kubelet's gRPC readiness probe sees it.
    local addrs=()
    for name in "${TOPO_NAMES[@]}"; do addrs+=(--addr "http://${TOPO_HEALTH[$name]}"); done
    local deadline=$((SECONDS + 90)) died=0
    until env -i "PATH=$PATH" "$bin_dir/livemesh" health --wait-secs 1 "${addrs[@]}" \
        >"$TOPO_DIR/logs/health.log" 2>&1; do
        for name in "${TOPO_NAMES[@]}"; do
            if ! _lm_pid_is "${TOPO_PID[$name]}" ""; then
                _topo_log "$name exited during start-up; last lines of its log:"
                tail -n 20 "${TOPO_LOG[$name]}" >&2
                died=1
            fi
        done
        if ((died || SECONDS >= deadline)); then
            cat "$TOPO_DIR/logs/health.log" >&2
            return 1
        fi
    done
    _topo_write_json
    TOPO_STARTUP_SECS=$((SECONDS - t0))
    _topo_log "${#TOPO_NAMES[@]} service processes SERVING after ${TOPO_STARTUP_SECS}s; topology in $TOPO_DIR/topology.json"
}

_topo_write_json() {
    local name service first=1 svc_first
    {
        printf '{\n  "counter_database_url": "%s",\n  "services": {\n' "$(_topo_db_url "$TOPO_DB_LOVES")"
        for service in ongoing-query publish subscribe counter gift-settler; do
            ((first)) || printf ',\n'
            first=0
            printf '    "%s": [' "$service"
            svc_first=1
            for name in "${TOPO_NAMES[@]}"; do
                [[ ${TOPO_SERVICE[$name]} == "$service" ]] || continue
                ((svc_first)) || printf ','
                svc_first=0
                printf '\n      {"name": "%s", "url": "%s", "health": "http://%s", "metrics": "http://%s/metrics", "pid": %s, "log": "%s", "bin": "%s", "env_file": "%s"}' \
                    "$name" "${TOPO_URL[$name]}" "${TOPO_HEALTH[$name]}" "${TOPO_METRICS[$name]}" \
                    "${TOPO_PID[$name]}" "${TOPO_LOG[$name]}" "${TOPO_BIN[$name]}" "$TOPO_DIR/env/$name.env"
            done
            printf '\n    ]'
        done
        printf '\n  },\n  "redis_cluster": "%s",\n  "redis_nodes": [' "$TOPO_REDIS_URLS"
        local p node_first=1
        for p in "${TOPO_REDIS_PORTS[@]}"; do
            ((node_first)) || printf ','
            node_first=0
            printf '\n    {"port": %s, "dir": "%s"}' "$p" "$_LM_TMPDIR/redis-cluster/$p"
        done
        printf '\n  ],\n  "mysql": "%s",\n  "mysql_pidfile": "%s",\n  "mysql_cnf": "%s",\n  "chaos_replaced": "%s"\n}\n' \
            "$(livemesh_redact "$TOPO_MYSQL_URL")" "$LIVEMESH_TEST_MYSQL_PIDFILE" "$LIVEMESH_TEST_MYSQL_CNF" \
            "$TOPO_DIR/chaos-replaced"
    } >"$TOPO_DIR/topology.json"
}

livemesh_redact() { sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#' <<<"$1"; }

topology_print() {
    local name
    printf '\n%-16s %-28s %-22s %-36s %s\n' PROCESS GRPC HEALTH METRICS PID
    for name in "${TOPO_NAMES[@]}"; do
        printf '%-16s %-28s %-22s %-36s %s\n' "$name" "${TOPO_URL[$name]}" "${TOPO_HEALTH[$name]}" \
            "http://${TOPO_METRICS[$name]}/metrics" "${TOPO_PID[$name]}"
    done
    printf '\nredis cluster (3 masters + 3 replicas): %s\n' "$TOPO_REDIS_URLS"
    printf 'mariadb: %s  databases: %s %s %s\n' "$(livemesh_redact "$TOPO_MYSQL_URL")" \
        "$TOPO_DB_ROOMS" "$TOPO_DB_LOVES" "${TOPO_DB_SHARDS[*]}"
    printf 'auth: enforce, mutual TLS for %s (CA %s), token secret %s\n' "$TOPO_DOMAIN" \
        "$TOPO_DIR/tls/ca.crt" "$TOPO_DIR/token/token-secret"
    printf 'client environment: %s\n' "${TOPO_COMMON_ENV[*]:2}"
    printf 'logs: %s/logs   topology: %s/topology.json\n\n' "$TOPO_DIR" "$TOPO_DIR"
}

topology_all_alive() {
    local name
    # (_lm_pid_is: an exited child stays a zombie until waited for.)
    for name in "${TOPO_NAMES[@]}"; do _lm_pid_is "${TOPO_PID[$name]}" "" || return 1; done
}

topology_run_check() {
    local bin_dir=$1 rounds=$2 chaos=${3:-1} flags=()
    ((chaos)) || flags=(--no-chaos)
    env -i "${TOPO_COMMON_ENV[@]}" "$bin_dir/livemesh" topology-check \
        --topology "$TOPO_DIR/topology.json" --rounds "$rounds" "${flags[@]}"
}

# The processes the check's chaos SIGKILLed (it restarted them as its own
# children and stopped those itself, each draining and exiting 0).
_topo_replaced() {
    local name
    [[ -f $TOPO_DIR/chaos-replaced ]] || return 1
    while read -r name; do [[ $name == "$1" ]] && return 0; done <"$TOPO_DIR/chaos-replaced"
    return 1
}

# SIGTERM to every process; each must drain and exit 0 within 15 s.
topology_stop() {
    ((TOPO_STOPPED)) && return 0
    TOPO_STOPPED=1
    local name rc=0 status deadline
    for name in "${TOPO_NAMES[@]}"; do kill -TERM "${TOPO_PID[$name]}" 2>/dev/null || true; done
    deadline=$((SECONDS + 15))
    for name in "${TOPO_NAMES[@]}"; do
        while _lm_pid_is "${TOPO_PID[$name]}" "" && ((SECONDS < deadline)); do sleep 0.1; done
        if _lm_pid_is "${TOPO_PID[$name]}" ""; then
            _topo_log "$name did not stop within 15s of SIGTERM; killing it"
            kill -KILL "${TOPO_PID[$name]}" 2>/dev/null || true
            rc=1
        fi
        status=0
        wait "${TOPO_PID[$name]}" 2>/dev/null || status=$?
        if _topo_replaced "$name"; then
            if ((status != 137)); then
                _topo_log "$name: the chaos SIGKILLed it, yet it exited with status $status"
                rc=1
            fi
            continue
        fi
        if ((status != 0)); then
            _topo_log "$name exited with status $status after SIGTERM; last lines of its log:"
            tail -n 15 "${TOPO_LOG[$name]}" >&2
            rc=1
        fi
    done
    if ((rc == 0 && ${#TOPO_NAMES[@]})); then
        _topo_log "all ${#TOPO_NAMES[@]} processes drained and exited 0 on SIGTERM (those the chaos SIGKILLed: their restarted copies, stopped by topology-check)"
    fi
    return "$rc"
}

_topo_on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    if ((!TOPO_STOPPED)); then
        for name in "${TOPO_NAMES[@]}"; do kill -TERM "${TOPO_PID[$name]}" 2>/dev/null || true; done
        TOPO_STOPPED=1
        sleep 0.5
        for name in "${TOPO_NAMES[@]}"; do kill -KILL "${TOPO_PID[$name]}" 2>/dev/null || true; done
    fi
    if ((${TOPO_OWN_MYSQL:-0} == 0)); then
        local db
        for db in "${TOPO_DBS[@]}"; do _topo_sql "DROP DATABASE IF EXISTS \`$db\`" 2>/dev/null || true; done
    fi
    if ((rc != 0)) && [[ -n $TOPO_DIR && -d $TOPO_DIR/logs ]]; then
        mkdir -p "${TMPDIR:-/tmp}/livemesh-topology-logs"
        cp -r "$TOPO_DIR/logs/." "${TMPDIR:-/tmp}/livemesh-topology-logs/" 2>/dev/null || true
        _topo_log "logs kept in ${TMPDIR:-/tmp}/livemesh-topology-logs"
    fi
    stop_servers
    exit "$rc"
}
