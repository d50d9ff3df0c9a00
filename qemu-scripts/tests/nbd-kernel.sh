#!/usr/bin/env bash
# nbd-kernel.sh: the Linux kernel's NBD client (in a QEMU guest) against
# `unvme nbd` on the host: once over a RAM disk, once bridged to
# `unvme target` over NVMe/TCP (scenario nbd-kernel-client.sh).
#
# Needs target/release/unvme and the guest harness
# (qemu-scripts/install-deps.sh). Every step is bounded; everything started
# here is stopped on exit.
set -euo pipefail

QS=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$(cd "$QS/.." && pwd)
UNVME=${UNVME_BIN:-$ROOT/target/release/unvme}
GUEST_TIMEOUT=${UNVME_GUEST_TIMEOUT:-300}
SIZE=$((256 << 20))

log() { echo "nbd-kernel: $*" >&2; }
[[ -x $UNVME ]] || { log "FAIL: $UNVME missing (cargo build --release)"; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { log "FAIL: qemu-system-x86_64 missing"; exit 2; }
timeout -k 10 900 "$QS/build-guest.sh" || { log "FAIL: guest build"; exit 1; }

work=$(mktemp -d /tmp/unvme-nbd-kernel.XXXXXX)
pids=()
stop_all() {
    local p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}
cleanup() { stop_all; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# serve NAME PORT CMD...: start a server, wait until it listens on PORT.
serve() {
    local name=$1 port=$2
    shift 2
    "$@" --log info 2>"$work/$name.log" &
    pids+=($!)
    for _ in $(seq 100); do
        grep -q "listening.*:$port" "$work/$name.log" 2>/dev/null && return 0
        kill -0 "${pids[-1]}" 2>/dev/null || break
        sleep 0.1
    done
    log "$name did not start:"; cat "$work/$name.log" >&2
    return 1
}

failed=()
scenario() { # NAME (servers already started) PORT
    local name=$1 port=$2 rc=0
    timeout -k 10 $((GUEST_TIMEOUT + 60)) "$QS/run-guest.sh" --timeout "$GUEST_TIMEOUT" \
        --env "UNVME_NBD_PORT=$port" --env "UNVME_NBD_SIZE=$SIZE" \
        --log "$QS/build/logs/nbd-kernel-client-$name.log" \
        "$QS/scenarios/nbd-kernel-client.sh" || rc=$?
    if grep -q panicked "$work"/*.log; then log "a server panicked"; rc=1; fi
    stop_all
    if [[ $rc -eq 0 ]]; then log "PASS $name"; else log "FAIL $name ($rc)"; failed+=("$name"); fi
}

port=$(free_port)
serve nbd-ram "$port" "$UNVME" nbd --ram 256M --listen "127.0.0.1:$port"
scenario ram "$port"

tport=$(free_port)
port=$(free_port)
serve target "$tport" "$UNVME" target --ram 256M --listen "127.0.0.1:$tport" --reactors 1
serve nbd-bridge "$port" "$UNVME" nbd --port "$tport" --listen "127.0.0.1:$port"
scenario bridge "$port"

if [[ ${#failed[@]} -gt 0 ]]; then log "failed: ${failed[*]}"; exit 1; fi
log "all passed"
