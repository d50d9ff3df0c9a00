#!/usr/bin/env bash
# tests/nbd-blip.sh — `unvme nbd` bridged to `unvme target --file` (a remote
# namespace) rides through target faults under real NBD clients (fio's nbd
# engine, nbdcopy, qemu-io), each step bounded in time.
#
# The bridge reaches the target through tests/cut-proxy.py (a loopback TCP
# proxy whose connections can be cut) with --kato-ms 2000. A 64 MiB random
# pattern is written with nbdcopy first; then fio randwrite QD16 with
# verify=crc32c, verify_fatal=1 (rate-limited so it spans the fault) runs
# across each fault, and must exit 0 with no verify error:
#   blip   the target is killed with SIGKILL and restarted after 1 s
#   stop   the target is SIGSTOPped for 4 s (> keep-alive), then SIGCONTed
#   cut    every target connection is cut (the proxy closes them)
# Afterwards nbdcopy copies the export out and the pattern must be intact.
# Loss: a second bridge, straight to the target, with --ctrl-loss-tmo 3
# --reconnect-delay 0.5; the target is killed and not restarted: a qemu-io
# read fails with an error after about 3 s (between 2 and 10 s after the
# kill, never a hang), and after the restart reads succeed again.
#
# Usage: tests/nbd-blip.sh  (UNVME_BIN=path/to/unvme, else builds release)
# Needs fio (nbd engine), nbdcopy, qemu-io, python3.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
export PATH=/usr/bin:/usr/sbin:/bin:$PATH
WORK=$(mktemp -d /tmp/unvme-nbd-blip.XXXXXX)
PIDS=()
TPID=
FAILED=0
PASSED=0
log() { echo "nbd-blip: $*" >&2; }
die() { log "error: $*"; exit 1; }

cleanup() {
    local p
    if [[ -n $TPID ]]; then kill -CONT "$TPID" 2>/dev/null || true; fi
    for p in "${PIDS[@]}" $TPID; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}" $TPID; do wait "$p" 2>/dev/null || true; done
    [[ -n ${UNVME_BLIP_KEEP:-} ]] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for t in fio nbdcopy qemu-io python3; do
    command -v "$t" >/dev/null || die "missing $t (qemu-scripts/install-deps.sh)"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "fio has no nbd engine"
if [[ -z ${UNVME_BIN:-} ]]; then
    timeout 1200 cargo build -q --release --bin unvme
    UNVME_BIN=$ROOT/target/release/unvme
fi
[[ -x $UNVME_BIN ]] || die "no unvme binary at $UNVME_BIN"
export UNVME=$UNVME_BIN
# shellcheck source=../qemu-scripts/tests/lib-host.sh
. "$ROOT/qemu-scripts/tests/lib-host.sh"

IMG=$WORK/disk.img
TPORT=$(free_port)
TLOG=$WORK/target.log
start_target() { target_start TPID "$TPORT" "$TLOG" --file "$IMG:create=256M" --reactors 1 --log info; }
kill_target() {
    kill -KILL "$TPID" 2>/dev/null || true
    wait "$TPID" 2>/dev/null || true
    TPID=
}

# bg NAME PATTERN CMD...: start a helper, wait for PATTERN in its output.
bg() {
    local name=$1 pat=$2 i
    shift 2
    : >"$WORK/$name.log"
    "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    for ((i = 0; i < 200; i++)); do
        grep -q "$pat" "$WORK/$name.log" && return 0
        kill -0 "${PIDS[-1]}" 2>/dev/null || break
        sleep 0.05
    done
    cat "$WORK/$name.log" >&2
    die "$name did not start"
}
addr_of() { grep -m1 -oE '(la=|listening )127\.0\.0\.1:[0-9]+' "$WORK/$1.log" | grep -oE '[0-9]+$'; }

result() { # NAME RC
    if [[ $2 -eq 0 ]]; then PASSED=$((PASSED + 1)); log "PASS $1"; else
        FAILED=$((FAILED + 1)); log "FAIL $1 (status $2)"; fi
}

start_target
bg proxy listening python3 "$ROOT/tests/cut-proxy.py" "$TPORT"
PPORT=$(addr_of proxy)
bg nbd listening env UNVME_LOG=info "$UNVME_BIN" nbd --port "$PPORT" --kato-ms 2000 \
    --listen 127.0.0.1:0
URI=nbd://127.0.0.1:$(addr_of nbd)
log "target :$TPORT, proxy :$PPORT, bridge $URI"

head -c $((64 << 20)) /dev/urandom >"$WORK/pattern"
timeout 120 nbdcopy "$WORK/pattern" "$URI" || die "nbdcopy of the pattern in failed"

# fio across a fault: rate-limited to ~3000 writes/s so its 24 MiB of 4 KiB
# random writes (6144) take ~2 s before the verify pass; the fault comes at
# 0.7 s. Verified region: 64..88 MiB (the pattern is at 0..64 MiB).
fio_across() { # NAME ACTION
    local name=$1 action=$2 rc=0 fpid t0 t1
    t0=$(date +%s.%N)
    timeout -k 5 120 fio --name="$name" --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k \
        --iodepth=16 --offset=64m --size=24m --rate_iops=3000 --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --randrepeat=0 --lat_percentiles=1 \
        --output-format=json --output="$WORK/fio-$name.json" >"$WORK/fio-$name.out" 2>&1 &
    fpid=$!
    sleep 0.7
    $action
    wait "$fpid" || rc=$?
    t1=$(date +%s.%N)
    if [[ $rc -eq 0 ]] && grep -qi 'verify' "$WORK/fio-$name.out"; then
        log "$name: fio printed a verify message"; cat "$WORK/fio-$name.out" >&2; rc=1
    fi
    python3 - "$WORK/fio-$name.json" "$name" "$t0" "$t1" <<'PY' >&2 || rc=1
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])["jobs"][0]
w = j["write"]
assert j["error"] == 0, j["error"]
assert w["total_ios"] >= 6144, w["total_ios"]
assert j["read"]["total_ios"] >= 6144, ("verify reads", j["read"]["total_ios"])
print("nbd-blip: %s: fio ok, %d writes verified, max write latency %.2f s, %.1f s in all"
      % (sys.argv[2], w["total_ios"], w["clat_ns"]["max"] / 1e9, float(sys.argv[4]) - float(sys.argv[3])))
PY
    [[ $rc -eq 0 ]] || { tail -n 20 "$WORK/fio-$name.out" >&2; tail -n 20 "$WORK/nbd.log" >&2; }
    result "$name: fio randwrite QD16 + verify across the fault" "$rc"
}

act_blip() {
    kill_target
    log "blip: target killed"
    sleep 1
    start_target
    log "blip: target restarted"
}
act_stop() {
    kill -STOP "$TPID"
    log "stop: target stopped"
    sleep 4
    kill -CONT "$TPID"
    log "stop: target continued"
}
act_cut() {
    kill -USR1 "${PIDS[0]}"
    sleep 0.3
    log "cut: $(tail -n 1 "$WORK/proxy.log")"
}

fio_across blip act_blip
fio_across stop act_stop
fio_across cut act_cut
grep -q 'cut [1-9]' "$WORK/proxy.log" || { log "the proxy cut no connection"; result "cut: connections cut" 1; }

rc=0
timeout 120 nbdcopy "$URI" "$WORK/out.img" || rc=$?
if [[ $rc -eq 0 ]]; then
    cmp -n $((64 << 20)) "$WORK/pattern" "$WORK/out.img" || rc=1
fi
rm -f "$WORK/out.img"
result "the nbdcopy pattern written before the faults reads back intact" "$rc"

# ---- loss: --ctrl-loss-tmo 3 ------------------------------------------------
bg nbd-loss listening env UNVME_LOG=info "$UNVME_BIN" nbd --port "$TPORT" --kato-ms 2000 \
    --ctrl-loss-tmo 3 --reconnect-delay 0.5 --listen 127.0.0.1:0
LURI=nbd://127.0.0.1:$(addr_of nbd-loss)
# One qemu-io session (one NBD connection) holds on across the loss: it
# writes, sleeps while the target is killed, reads (must fail with an
# error ~3 s after the kill), sleeps while the target comes back, reads
# again, and once more 1 s later: the last read must succeed with the data.
# (The first read after the restart may fail: an idle NBD connection does
# not drive its queue, so the lost controller is reconnected only once a
# request comes; that is logged, see the report of issue #12.) Its lines
# are timestamped.
stdbuf -oL timeout -k 5 60 qemu-io -f raw -c 'write -P 0x5a 100M 1M' -c 'sleep 1500' \
    -c 'read -P 0x5a 100M 64k' -c 'sleep 4000' -c 'read -P 0x5a 100M 512k' -c 'sleep 1000' \
    -c 'read -P 0x5a 100M 1M' "$LURI" 2>&1 |
    while IFS= read -r l; do echo "$(date +%s.%N) $l"; done >"$WORK/qio.txt" &
QIO=$!
for ((i = 0; i < 200; i++)); do grep -q 'wrote 1048576' "$WORK/qio.txt" && break; sleep 0.05; done
grep -q 'wrote 1048576' "$WORK/qio.txt" || { cat "$WORK/qio.txt" >&2; die "loss: the first write failed"; }
kill_target
t0=$(date +%s.%N)
log "loss: target killed"
for ((i = 0; i < 300; i++)); do grep -qiE 'read 65536|error|fail' "$WORK/qio.txt" && break; sleep 0.05; done
rc=0
if grep -q 'read 65536' "$WORK/qio.txt"; then
    log "loss: a read succeeded with the target gone"; rc=1
elif ! grep -qiE 'error|fail' "$WORK/qio.txt"; then
    log "loss: the read neither failed nor succeeded in 15 s (a hang):"; cat "$WORK/qio.txt" >&2; rc=1
else
    t1=$(grep -m1 -iE 'error|fail' "$WORK/qio.txt" | cut -d' ' -f1)
    took=$(python3 -c "print('%.2f' % ($t1 - $t0))")
    python3 -c "import sys; sys.exit(0 if 2.0 <= $took <= 10.0 else 1)" ||
        { log "loss: the read failed ${took}s after the kill, want ~3"; rc=1; }
    log "loss: the read failed ${took}s after the kill: $(grep -m1 -iE 'error|fail' "$WORK/qio.txt" | cut -d' ' -f2-)"
fi
result "loss: I/O fails with an error ~3 s after the target is gone (ctrl-loss-tmo 3)" "$rc"

start_target
t0=$(date +%s.%N)
log "loss: target restarted"
wait "$QIO" || true
rc=0
grep -q 'read 1048576' "$WORK/qio.txt" && ! grep -qi mismatch "$WORK/qio.txt" || rc=1
if grep -q 'read 524288' "$WORK/qio.txt"; then
    log "loss: the first read after the restart succeeded"
else
    log "loss: the first read after the restart failed (the idle connection had not reconnected)"
fi
[[ $rc -eq 0 ]] || { cat "$WORK/qio.txt" >&2; tail -n 20 "$WORK/nbd-loss.log" >&2; }
result "loss: the same connection reads the data again after the target is back" "$rc"
# A new connection works too (a new NBD connection while the target is
# gone fails its handshake at once: the bridge opens an I/O queue for it).
rc=0
timeout 30 qemu-io -f raw -c 'read -P 0x5a 100M 1M' "$LURI" >"$WORK/qio2.txt" 2>&1 || true
grep -q 'read 1048576' "$WORK/qio2.txt" && ! grep -qiE 'error|fail|mismatch' "$WORK/qio2.txt" || rc=1
[[ $rc -eq 0 ]] || cat "$WORK/qio2.txt" >&2
result "loss: a new connection reads the data after the target is back" "$rc"

if grep -q panicked "$WORK"/*.log "$TLOG"; then result "no panics" 1; fi
log "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
