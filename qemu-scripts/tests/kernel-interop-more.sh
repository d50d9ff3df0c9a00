#!/usr/bin/env bash
# kernel-interop-more.sh: more Linux-kernel interoperability (QEMU guest),
# after tests/kernel-interop.sh:
#
#   restart    kernel nvme-tcp host stays connected while `unvme target` on
#              the host is SIGTERMed and restarted, then SIGKILLed during a
#              dd and restarted (scenarios/kernel-host-restart.sh +
#              tests/restart-host.sh)
#   initiator  unvme discover / identify / perf --verify against the guest
#              kernel's nvmet-tcp target through hostfwd, without and with
#              digests, one and two I/O queues (scenarios/kernel-target-export.sh
#              + tests/initiator-kernel.sh)
#   wire       tshark decodes both directions, with and without digests
#              (tests/wire-check.sh)
#
# usage: kernel-interop-more.sh [PART...]   (default: all parts, in this order)
# Exit 0 only if every part passes.  One guest at a time; every step is
# bounded; everything started here is stopped on exit.  Needs
# target/release/unvme (cargo build --release -p unvme) and the guest harness
# (qemu-scripts/install-deps.sh).
set -euo pipefail

QS=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$(cd "$QS/.." && pwd)
export UNVME=${UNVME_BIN:-$ROOT/target/release/unvme}
# shellcheck source=SCRIPTDIR/lib-host.sh
. "$QS/tests/lib-host.sh"

log() { echo "kernel-interop-more: $*" >&2; }
[[ -x $UNVME ]] || { log "FAIL: $UNVME missing (cargo build --release -p unvme)"; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { log "FAIL: qemu-system-x86_64 missing (qemu-scripts/install-deps.sh)"; exit 2; }
timeout -k 10 900 "$QS/build-guest.sh" || { log "FAIL: guest build"; exit 1; }

parts=("$@")
[[ ${#parts[@]} -gt 0 ]] || parts=(restart initiator wire)

work=$(mktemp -d /dev/shm/unvme-interop-more.XXXXXX)
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
LOGS=$QS/build/logs
mkdir -p "$LOGS"

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
fmt_s() { printf '%d.%d' $(( $1 / 1000 )) $(( $1 % 1000 / 100 )); }

# guest SECONDS ARGS...: run-guest.sh with its own timeout plus an outer backstop.
guest() {
    local t=$1
    shift
    timeout -k 10 $((t + 60)) "$QS/run-guest.sh" --timeout "$t" "$@"
}

part_restart() {
    local port nqn=nqn.2024-11.io.unvme:restart rc=0
    port=$(free_port)
    : > "$LOGS/restart-target.log"
    guest 300 --log "$LOGS/kernel-host-restart.log" \
        --env "UNVME_PORT=$port" --env "UNVME_NQN=$nqn" \
        --host-timeout 240 \
        --host-cmd "bash '$QS/tests/restart-host.sh' '$UNVME' $port $nqn '$work/restart.img' '$LOGS/restart-target.log'" \
        "$QS/scenarios/kernel-host-restart.sh" || rc=$?
    tr -d '\r' < "$LOGS/kernel-host-restart.log" | grep -a 'UNVME-RESTART' | sed 's/^/  /' >&2 || true
    rm -f "$work/restart.img"
    return "$rc"
}

part_initiator() {
    local io disc rc=0
    read -r io disc < <(free_ports2)
    guest 300 --log "$LOGS/initiator-kernel.log" \
        --hostfwd "tcp:127.0.0.1:$io-:4420" --hostfwd "tcp:127.0.0.1:$disc-:8009" \
        --env EXPORT_NQN=nqn.2024-11.io.unvme:kernel-export --env EXPORT_SIZE_MB=128 --env HOST_TIMEOUT=270 \
        --host-timeout 240 \
        --host-cmd "bash '$QS/tests/initiator-kernel.sh' 127.0.0.1 $io $disc nqn.2024-11.io.unvme:kernel-export 128" \
        "$QS/scenarios/kernel-target-export.sh" || rc=$?
    return "$rc"
}

part_wire() {
    timeout -k 10 400 "$QS/tests/wire-check.sh"
}

results=() failed=()
t_all=$(now_ms)
for p in "${parts[@]}"; do
    declare -F "part_$p" >/dev/null || { log "unknown part '$p' (restart, initiator, wire)"; exit 2; }
    log "=== $p"
    t0=$(now_ms) rc=0
    "part_$p" || rc=$?
    d=$(fmt_s $(( $(now_ms) - t0 )))
    if [[ $rc -eq 0 ]]; then
        log "=== $p: PASS (${d} s)"; results+=("$p PASS ${d}s")
    else
        log "=== $p: FAIL (status $rc, ${d} s; logs in $LOGS)"; results+=("$p FAIL ${d}s"); failed+=("$p")
    fi
done
log "summary ($(fmt_s $(( $(now_ms) - t_all ))) s):"
for r in "${results[@]}"; do log "  $r"; done
if [[ ${#failed[@]} -gt 0 ]]; then
    log "FAIL: ${failed[*]}"
    exit 1
fi
log "PASS: ${parts[*]}"
