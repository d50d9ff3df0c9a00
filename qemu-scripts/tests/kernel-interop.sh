#!/usr/bin/env bash
# kernel-interop.sh: the Linux kernel (in a QEMU guest) against unvme.
#
#   kernel nvme-tcp host  →  `unvme target` on the host (guest sees it as 10.0.2.2)
#     with no digests and one I/O queue, with header+data digests and two
#     queues, and with header digests only (scenario kernel-host-unvme.sh).
#
# Needs target/release/unvme (tests/run builds it) and the guest harness
# (qemu-scripts/install-deps.sh). Every step is bounded; everything started
# here is stopped on exit.
set -euo pipefail

QS=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$(cd "$QS/.." && pwd)
UNVME=${UNVME_BIN:-$ROOT/target/release/unvme}
GUEST_TIMEOUT=${UNVME_GUEST_TIMEOUT:-420}
NQN=nqn.2024-11.io.unvme:interop

log() { echo "kernel-interop: $*" >&2; }
[[ -x $UNVME ]] || { log "FAIL: $UNVME missing (cargo build --release)"; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { log "FAIL: qemu-system-x86_64 missing"; exit 2; }
timeout -k 10 900 "$QS/build-guest.sh" || { log "FAIL: guest build"; exit 1; }

work=$(mktemp -d /dev/shm/unvme-interop.XXXXXX)
tpid=""
stop_target() {
    if [[ -n $tpid ]] && kill -0 "$tpid" 2>/dev/null; then
        kill -TERM "$tpid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$tpid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$tpid" 2>/dev/null || true
        wait "$tpid" 2>/dev/null || true
    fi
    tpid=""
}
cleanup() { stop_target; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# start_target PORT: unvme target with a 256 MiB file namespace in tmpfs.
start_target() {
    local port=$1
    "$UNVME" target --listen "127.0.0.1:$port" --nqn "$NQN" --file "$work/ns1.img:512:create=256M" \
        --reactors 1 --log info 2>>"$work/target.log" &
    tpid=$!
    for _ in $(seq 100); do
        grep -q "listening.*:$port" "$work/target.log" 2>/dev/null && return 0
        kill -0 "$tpid" 2>/dev/null || break
        sleep 0.1
    done
    log "target did not start:"; cat "$work/target.log" >&2
    return 1
}

failed=()
scenario() { # NAME DIGEST QUEUES
    local name=$1 digest=$2 queues=$3 rc=0 port
    port=$(free_port)
    log "=== $name (digest=$digest, I/O queues=$queues, target port $port)"
    : > "$work/target.log"
    start_target "$port" || { failed+=("$name: target start"); return; }
    timeout -k 10 $((GUEST_TIMEOUT + 60)) "$QS/run-guest.sh" --timeout "$GUEST_TIMEOUT" \
        --env "UNVME_PORT=$port" --env "UNVME_NQN=$NQN" --env "UNVME_DIGEST=$digest" --env "UNVME_QUEUES=$queues" \
        --log "$QS/build/logs/kernel-host-unvme-$name.log" \
        "$QS/scenarios/kernel-host-unvme.sh" || rc=$?
    if ! kill -0 "$tpid" 2>/dev/null; then
        log "target died during $name"; rc=1
    fi
    stop_target
    if grep -q "panicked" "$work/target.log"; then log "target panicked"; rc=1; fi
    # The target logs what each I/O queue negotiated: check the kernel asked for it.
    local want_h=false want_d=false nq
    case $digest in hdr) want_h=true ;; data) want_d=true ;; both) want_h=true; want_d=true ;; esac
    nq=$(grep "I/O queue connected" "$work/target.log" | grep -c "hdgst=$want_h ddgst=$want_d" || true)
    if [[ $nq -lt $queues ]]; then
        log "expected $queues I/O queue connections with hdgst=$want_h ddgst=$want_d, target logged $nq"; rc=1
    fi
    if [[ $rc -eq 0 ]]; then
        log "=== $name: PASS"
    else
        log "=== $name: FAIL (status $rc); target log:"; tail -n 40 "$work/target.log" >&2
        failed+=("$name")
    fi
}

scenario plain none 1
scenario digests-2q both 2
scenario hdr-digest hdr 1

if [[ ${#failed[@]} -gt 0 ]]; then
    log "FAIL: ${failed[*]} (guest logs in $QS/build/logs/)"
    exit 1
fi
log "PASS: kernel host against unvme target (plain, digests + 2 queues, header digest)"
