#!/usr/bin/env bash
# multipath-kernel.sh: the Linux kernel's native NVMe multipath (in a QEMU
# guest) against two `unvme target` processes on the host.
#
#   target A  127.0.0.1:PA  ANA optimized      CNTLIDs 1..=99
#   target B  127.0.0.1:PB  ANA non-optimized  CNTLIDs 100..=199
#   both: subsystem NQN, one namespace on the same file (/dev/shm), same
#   NGUID and UUID
#
# The guest (scenarios/kernel-multipath.sh) connects to both, must see one
# nvme-subsystem with two controllers and ONE multipath namespace, the ANA
# states of both paths, I/O on the optimized path (checked here: how many
# bytes each target read from its file meanwhile), and a chunked write
# that keeps going when A is killed with SIGKILL, then reads back intact.
# It prints the failover stall (the longest chunk write).
#
# This script also is the guest's host half: run-guest.sh runs
# `multipath-kernel.sh --host-half …` as --host-cmd.  Every step is bounded;
# everything started here is stopped on exit.
set -euo pipefail

QS=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$(cd "$QS/.." && pwd)
NQN=nqn.2024-11.io.unvme:multipath
NGUID=6e766d65-6d75-6c74-6970-617468000001
UUID=3c1a6f0e-9d2b-4c47-8e51-7a0d2c9b4e11

if [[ ${1:-} == --host-half ]]; then
    # ---- the host half: owns both targets, answers the guest's steps -------
    export UNVME=$2
    PA=$3 PB=$4 IMG=$5 LOGA=$6 LOGB=$7
    # shellcheck source=SCRIPTDIR/lib-host.sh
    . "$QS/tests/lib-host.sh"
    log() { echo "multipath-host: $*" >&2; }
    now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
    pa="" pb=""
    # shellcheck disable=SC2317  # invoked via trap
    cleanup() {
        [[ -z $pa ]] || target_stop "$pa" KILL >/dev/null 2>&1 || true
        [[ -z $pb ]] || target_stop "$pb" TERM >/dev/null 2>&1 || true
    }
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    common=(--nqn "$NQN" --file "$IMG:512" --nguid "$NGUID" --uuid "$UUID" --serial UNVMEMPATH0001
            --reactors 1 --log info)
    # wchar: bytes the process wrote with write/pwrite (the backing file;
    # socket sends are recv/send, not counted).
    wchar() { awk '$1 == "wchar:" { print $2 }' "/proc/$1/io"; }

    wait_step start 60
    truncate -s 256M "$IMG"
    st=0
    target_start pa "$PA" "$LOGA" "${common[@]}" --ana-state optimized --cntlid-min 1 --cntlid-max 99 || st=1
    target_start pb "$PB" "$LOGB" "${common[@]}" --ana-state non-optimized --cntlid-min 100 --cntlid-max 199 || st=1
    log "target A (optimized) pid $pa on $PA, target B (non-optimized) pid $pb on $PB"
    ack_step start "$st"
    [[ $st -eq 0 ]] || exit 1

    wait_step mark-a 120
    a0=$(wchar "$pa") b0=$(wchar "$pb")
    ack_step mark-a 0
    wait_step mark-b 120
    da=$(( $(wchar "$pa") - a0 )) db=$(( $(wchar "$pb") - b0 ))
    log "during the 16 MiB write: target A (optimized) wrote $da bytes to the file, target B (non-optimized) $db bytes"
    echo "UNVME-MULTIPATH io_bytes optimized=$da non_optimized=$db" >&2
    st=0
    (( da >= 16 * 1048576 )) || { log "FAIL: the optimized target did not receive the write"; st=1; }
    (( db < 1048576 )) || { log "FAIL: the non-optimized path carried I/O while the optimized one was up"; st=1; }
    ack_step mark-b "$st"
    [[ $st -eq 0 ]] || exit 1

    wait_step kill 180
    t0=$(now_ms)
    kill -KILL "$pa"
    wait "$pa" 2>/dev/null || true
    pa=""
    log "target A killed (SIGKILL) at $t0 ms"
    ack_step kill 0

    wait_step finish 300
    st=0
    rc=0
    target_stop "$pb" TERM || rc=$?
    pb=""
    [[ $rc -eq 0 ]] || { log "FAIL: target B exited with status $rc after SIGTERM"; st=1; }
    ack_step finish "$st"
    exit "$st"
fi

UNVME=${UNVME_BIN:-$ROOT/target/release/unvme}
GUEST_TIMEOUT=${UNVME_GUEST_TIMEOUT:-420}
log() { echo "multipath-kernel: $*" >&2; }
[[ -x $UNVME ]] || { log "FAIL: $UNVME missing (cargo build --release)"; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { log "FAIL: qemu-system-x86_64 missing"; exit 2; }
timeout -k 10 900 "$QS/build-guest.sh" || { log "FAIL: guest build"; exit 1; }
# shellcheck source=SCRIPTDIR/lib-host.sh
. "$QS/tests/lib-host.sh"

work=$(mktemp -d /dev/shm/unvme-multipath.XXXXXX)
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
read -r PA PB < <(free_ports2)
mkdir -p "$QS/build/logs"
glog=$QS/build/logs/kernel-multipath.log
rc=0
timeout -k 10 $((GUEST_TIMEOUT + 60)) "$QS/run-guest.sh" --timeout "$GUEST_TIMEOUT" --host-timeout "$GUEST_TIMEOUT" \
    --env "UNVME_PORT_OPT=$PA" --env "UNVME_PORT_NONOPT=$PB" --env "UNVME_NQN=$NQN" \
    --host-cmd "$QS/tests/multipath-kernel.sh --host-half $UNVME $PA $PB $work/ns.img $work/a.log $work/b.log" \
    --log "$glog" "$QS/scenarios/kernel-multipath.sh" || rc=$?
for f in a b; do
    if grep -q panicked "$work/$f.log" 2>/dev/null; then log "target $f panicked"; rc=1; fi
done
grep -h "UNVME-MULTIPATH" "$glog" | tr -d '\r' >&2 || true
if [[ $rc -ne 0 ]]; then
    log "FAIL (status $rc); guest log $glog; target A log:"
    tail -n 30 "$work/a.log" >&2 || true
    log "target B log:"
    tail -n 30 "$work/b.log" >&2 || true
    exit 1
fi
stall=$(grep -ho 'failover_stall_s=[0-9.]*' "$glog" | tail -n1 | cut -d= -f2)
log "PASS: the kernel's native multipath sees one namespace over two unvme targets, uses the optimized path, and fails over on kill -9 (longest write stall ${stall:-?} s)"
