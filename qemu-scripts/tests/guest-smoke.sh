#!/usr/bin/env bash
# guest-smoke.sh: build the guest if needed and run the harness's own
# scenarios.  Exit 0 only if all pass.  Every step is time-bounded.
# Prerequisite (root, once per machine): qemu-scripts/install-deps.sh
set -euo pipefail

QS=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_TIMEOUT=${UNVME_GUEST_BUILD_TIMEOUT:-900}
GUEST_TIMEOUT=${UNVME_GUEST_TIMEOUT:-240}

log() { echo "guest-smoke: $*" >&2; }

command -v qemu-system-x86_64 >/dev/null \
    || { log "FAIL: qemu-system-x86_64 missing; run qemu-scripts/install-deps.sh as root"; exit 2; }

# A free loopback port for the host side of a hostfwd.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

timeout -k 10 "$BUILD_TIMEOUT" "$QS/build-guest.sh" \
    || { log "FAIL: build-guest.sh failed or timed out (${BUILD_TIMEOUT}s)"; exit 1; }

failed=()
run() {  # NAME ARGS...: run-guest.sh with an outer time limit as a backstop
    local name=$1 rc=0
    shift
    log "=== $name"
    timeout -k 10 $((GUEST_TIMEOUT + 60)) "$QS/run-guest.sh" --timeout "$GUEST_TIMEOUT" "$@" || rc=$?
    if [[ $rc -eq 0 ]]; then log "=== $name: PASS"; else log "=== $name: FAIL (status $rc)"; failed+=("$name"); fi
}

run kernel-loopback "$QS/scenarios/kernel-loopback.sh"

io_port=$(free_port)
disc_port=$(free_port)
while [[ $disc_port == "$io_port" ]]; do disc_port=$(free_port); done
run kernel-target-export \
    --hostfwd "tcp:127.0.0.1:$io_port-:4420" --hostfwd "tcp:127.0.0.1:$disc_port-:8009" \
    --host-cmd "python3 '$QS/tests/icreq-check.py' 127.0.0.1 $io_port $disc_port" \
    --host-timeout 60 \
    "$QS/scenarios/kernel-target-export.sh"

if [[ ${#failed[@]} -gt 0 ]]; then
    log "FAIL: ${failed[*]} (guest logs in $QS/build/logs/)"
    exit 1
fi
log "PASS: all guest scenarios"
