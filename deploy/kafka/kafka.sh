#!/usr/bin/env bash
# Run a single-node Apache Kafka (KRaft) broker from Maven Central jars.
# No Docker, no Apache tarball: `fetch` copies the runtime jars named by
# pom.xml into $KAFKA_CACHE_DIR/libs, `start` runs kafka.Kafka from them.
#
# Usage: kafka.sh {fetch|start|stop|status|restart|restart-keep-data|logs|address}
#
# Environment (all optional):
#   KAFKA_CACHE_DIR         jar cache, default deploy/kafka/.cache
#   KAFKA_STATE_DIR         config, data, logs, pid; default $KAFKA_CACHE_DIR/run
#   KAFKA_PORT              broker (PLAINTEXT) port, default 19092
#   KAFKA_CONTROLLER_PORT   KRaft controller port, default 19093
#   KAFKA_KEEP_DATA=1       start: reuse an already formatted data dir
#                           (keeps topics and committed offsets)
#   KAFKA_HEAP_OPTS         default "-Xms512m -Xmx512m"
#   KAFKA_JVM_PERFORMANCE_OPTS  G1 flags, see DEFAULT_JVM_OPTS below
#   KAFKA_OPTS              extra JVM options appended last
#   KAFKA_LOG_LEVEL         root log level, default WARN
#   KAFKA_START_TIMEOUT     seconds to wait for the port, default 60
#   KAFKA_STOP_TIMEOUT      seconds between SIGTERM and SIGKILL, default 30
#   JAVA, MVN               java / mvn executables
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${KAFKA_CACHE_DIR:-$SCRIPT_DIR/.cache}"
LIBS="$CACHE/libs"
STAMP="$CACHE/libs.stamp"
STATE="${KAFKA_STATE_DIR:-$CACHE/run}"
DATA="$STATE/data"
LOGS="$STATE/logs"
PIDFILE="$STATE/kafka.pid"
PORTSFILE="$STATE/ports"
BROKER_LOG="$LOGS/broker.out"
POM="$SCRIPT_DIR/pom.xml"
TEMPLATE="$SCRIPT_DIR/server.properties.template"
LOG4J="$SCRIPT_DIR/log4j2.properties"
# Fixed cluster id: urlsafe base64 of the 16 bytes "llm-consumer-dev".
CLUSTER_ID="${KAFKA_CLUSTER_ID:-bGxtLWNvbnN1bWVyLWRldg}"
JAVA="${JAVA:-java}"
MVN="${MVN:-mvn}"
DEFAULT_HEAP_OPTS="-Xms512m -Xmx512m"
# Same as kafka-run-class.sh, plus C1-only JIT: the broker starts faster on
# 2 cores and a dev/test broker never gets hot enough to need C2.
DEFAULT_JVM_OPTS="-server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -XX:TieredStopAtLevel=1 -Djava.awt.headless=true"

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

pom_hash() { sha256sum "$POM" | cut -d' ' -f1; }

libs_ok() {
    [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(pom_hash)" ]] &&
        compgen -G "$LIBS/kafka_2.13-*.jar" >/dev/null
}

cmd_fetch() {
    mkdir -p "$CACHE"
    libs_ok && return 0
    # Serialise concurrent fetches (a test session and `make demo`).
    exec 9>"$CACHE/fetch.lock"
    flock 9
    if ! libs_ok; then
        command -v "$MVN" >/dev/null || die "mvn not found (needed once to fetch the Kafka jars)"
        log "fetching Kafka jars from Maven Central into $LIBS"
        rm -rf "$LIBS" "$STAMP"
        "$MVN" -B -q -f "$POM" \
            org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy-dependencies \
            -DoutputDirectory="$LIBS" -DincludeScope=runtime \
            >"$CACHE/fetch.log" 2>&1 || {
            cat "$CACHE/fetch.log" >&2
            die "mvn copy-dependencies failed (log: $CACHE/fetch.log)"
        }
        pom_hash >"$STAMP"
    fi
    flock -u 9
    exec 9>&-
}

# Is something accepting TCP connections on 127.0.0.1:$1?
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Prints the pid of our broker if it is alive, else fails.
running_pid() {
    local pid
    [[ -f "$PIDFILE" ]] || return 1
    pid="$(cat "$PIDFILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # Guard against pid reuse: it must be a JVM running kafka.Kafka.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
    printf '%s\n' "$pid"
}

# Ports: env wins; else those of the previous run in this state dir; else defaults.
load_ports() {
    local saved_broker="" saved_controller=""
    if [[ -f "$PORTSFILE" ]]; then
        read -r saved_broker saved_controller <"$PORTSFILE" || true
    fi
    BROKER_PORT="${KAFKA_PORT:-${saved_broker:-19092}}"
    CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-${saved_controller:-19093}}"
    [[ "$BROKER_PORT" =~ ^[0-9]+$ && "$CONTROLLER_PORT" =~ ^[0-9]+$ ]] ||
        die "ports must be numbers: KAFKA_PORT=$BROKER_PORT KAFKA_CONTROLLER_PORT=$CONTROLLER_PORT"
    [[ "$BROKER_PORT" != "$CONTROLLER_PORT" ]] || die "broker and controller port are both $BROKER_PORT"
}

address() { printf '127.0.0.1:%s\n' "$BROKER_PORT"; }

# A running broker keeps the ports it was started with, whatever the env says.
use_running_ports() {
    local saved_broker="" saved_controller=""
    if [[ -f "$PORTSFILE" ]]; then
        read -r saved_broker saved_controller <"$PORTSFILE" || true
    fi
    if [[ -n "$saved_broker" && "$saved_broker" != "$BROKER_PORT" ]]; then
        log "broker in $STATE already runs on port $saved_broker (not $BROKER_PORT)"
        BROKER_PORT="$saved_broker"
        CONTROLLER_PORT="${saved_controller:-$CONTROLLER_PORT}"
    fi
}

render_config() {
    local tpl
    tpl="$(<"$TEMPLATE")"
    tpl="${tpl//@BROKER_PORT@/$BROKER_PORT}"
    tpl="${tpl//@CONTROLLER_PORT@/$CONTROLLER_PORT}"
    tpl="${tpl//@DATA_DIR@/$DATA}"
    printf '%s\n' "$tpl" >"$STATE/server.properties"
}

show_log_tail() {
    if [[ -f "$BROKER_LOG" ]]; then
        log "last lines of $BROKER_LOG:"
        tail -n 40 "$BROKER_LOG" >&2
    fi
}

format_storage() {
    if [[ "${KAFKA_KEEP_DATA:-0}" == "1" && -f "$DATA/meta.properties" ]]; then
        return 0
    fi
    rm -rf "$DATA"
    mkdir -p "$DATA"
    if ! "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
        -Dlog4j2.configurationFile="$LOG4J" -Dkafka.root.loglevel=WARN \
        -cp "$LIBS/*" kafka.tools.StorageTool format \
        -t "$CLUSTER_ID" -c "$STATE/server.properties" >"$LOGS/format.out" 2>&1; then
        log "storage format failed:"
        cat "$LOGS/format.out" >&2
        exit 1
    fi
}

cmd_start() {
    load_ports
    if running_pid >/dev/null; then
        use_running_ports
        address
        return 0
    fi
    command -v "$JAVA" >/dev/null || die "java not found (Kafka 4.x needs Java 17+)"
    cmd_fetch
    mkdir -p "$STATE" "$LOGS"
    rm -f "$PIDFILE"
    local p
    for p in "$BROKER_PORT" "$CONTROLLER_PORT"; do
        ! port_open "$p" || die "port $p on 127.0.0.1 is already in use by another process"
    done
    render_config
    printf '%s %s\n' "$BROKER_PORT" "$CONTROLLER_PORT" >"$PORTSFILE"
    format_storage

    local heap_opts jvm_opts extra_opts
    read -r -a heap_opts <<<"${KAFKA_HEAP_OPTS:-$DEFAULT_HEAP_OPTS}"
    read -r -a jvm_opts <<<"${KAFKA_JVM_PERFORMANCE_OPTS:-$DEFAULT_JVM_OPTS}"
    read -r -a extra_opts <<<"${KAFKA_OPTS:-}"
    printf '\n===== kafka.sh start %s (127.0.0.1:%s, controller %s) =====\n' \
        "$(date -u +%FT%TZ)" "$BROKER_PORT" "$CONTROLLER_PORT" >>"$BROKER_LOG"
    # New session so that a Ctrl-C in the caller's terminal does not hit the
    # broker; the inner bash records its own pid and then becomes the JVM.
    # shellcheck disable=SC2016  # $$ and "$@" are for the inner bash
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$PIDFILE" \
        "$JAVA" "${heap_opts[@]}" "${jvm_opts[@]}" \
        -Dkafka.logs.dir="$LOGS" \
        -Dlog4j2.configurationFile="$LOG4J" \
        -Dkafka.root.loglevel="${KAFKA_LOG_LEVEL:-WARN}" \
        "${extra_opts[@]}" \
        -cp "$LIBS/*" kafka.Kafka "$STATE/server.properties" \
        </dev/null >>"$BROKER_LOG" 2>&1 &

    local deadline=$((SECONDS + ${KAFKA_START_TIMEOUT:-60})) pid=""
    while ((SECONDS < deadline)); do
        if [[ -z "$pid" && -s "$PIDFILE" ]]; then
            pid="$(cat "$PIDFILE")"
        fi
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE"
            log "broker exited during startup"
            show_log_tail
            exit 1
        fi
        # The listener opens only once the broker is unfenced and serving.
        if [[ -n "$pid" ]] && port_open "$BROKER_PORT"; then
            address
            return 0
        fi
        sleep 0.2
    done
    log "broker did not open 127.0.0.1:$BROKER_PORT within ${KAFKA_START_TIMEOUT:-60}s"
    show_log_tail
    cmd_stop
    exit 1
}

cmd_stop() {
    local pid i limit
    if ! pid="$(running_pid)"; then
        rm -f "$PIDFILE"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    limit=$((${KAFKA_STOP_TIMEOUT:-30} * 5))
    for ((i = 0; i < limit; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        ((limit == 0)) || log "broker $pid still alive after ${KAFKA_STOP_TIMEOUT:-30}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    rm -f "$PIDFILE"
}

cmd_status() {
    load_ports
    if running_pid >/dev/null; then
        use_running_ports
        if port_open "$BROKER_PORT"; then
            address
            return 0
        fi
        log "broker process is alive but 127.0.0.1:$BROKER_PORT is not accepting connections"
        return 1
    fi
    log "not running"
    return 1
}

case "${1:-}" in
fetch) cmd_fetch ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
restart)
    cmd_stop
    cmd_start
    ;;
restart-keep-data)
    cmd_stop
    KAFKA_KEEP_DATA=1 cmd_start
    ;;
logs) tail -n "${2:-100}" "$BROKER_LOG" ;;
address)
    load_ports
    address
    ;;
*)
    printf 'usage: %s {fetch|start|stop|status|restart|restart-keep-data|logs [N]|address}\n' "$0" >&2
    exit 2
    ;;
esac
