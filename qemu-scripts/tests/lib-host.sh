# shellcheck shell=bash
# lib-host.sh: helpers for host-side test scripts (bash; source it).
#   free_port                      a free TCP port on 127.0.0.1
#   target_start VAR PORT LOG ARGS...  start `unvme target --listen 127.0.0.1:PORT ARGS...`
#                                  in the background, stderr to LOG; PID in $VAR;
#                                  waits (10 s) for its "listening" line
#   target_stop PID [SIG]          SIG (default TERM), wait up to 10 s, then KILL;
#                                  returns the target's exit status (137 if killed)
#   wait_step NAME [TIMEOUT_S]     (in a --host-cmd) wait for the guest's step.NAME
#   ack_step NAME [STATUS]         (in a --host-cmd) answer it (guest_step in lib.sh)
# Needs UNVME (path of the unvme binary); wait_step/ack_step need UNVME_SHARE
# (set by run-guest.sh for the host command).

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Two different free ports, printed on one line.
free_ports2() {
    local a b
    a=$(free_port)
    b=$(free_port)
    while [[ $b == "$a" ]]; do b=$(free_port); done
    echo "$a $b"
}

target_start() {
    local __var=$1 port=$2 logf=$3 pid
    shift 3
    "$UNVME" target --listen "127.0.0.1:$port" "$@" 2>>"$logf" &
    pid=$!
    printf -v "$__var" '%s' "$pid"
    for _ in $(seq 100); do
        grep -q "listening.*:$port" "$logf" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "target on port $port did not start:" >&2
    tail -n 20 "$logf" >&2
    return 1
}

target_stop() {
    local pid=$1 sig=${2:-TERM} rc=0
    [[ -n $pid ]] || return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || rc=$?; return "$rc"; }
    kill "-$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || rc=$?
    return "$rc"
}

wait_step() {
    local name=$1 t=${2:-120} i
    for ((i = 0; i < t * 10; i++)); do
        [[ -e $UNVME_SHARE/step.$name ]] && return 0
        sleep 0.1
    done
    echo "timed out after ${t}s waiting for guest step '$name'" >&2
    return 1
}

ack_step() {
    echo "${2:-0}" > "$UNVME_SHARE/ack.$1.tmp" && mv "$UNVME_SHARE/ack.$1.tmp" "$UNVME_SHARE/ack.$1"
}
