#!/usr/bin/env bash
# tests/nbd-clients.sh — `unvme nbd` against real NBD clients (Debian's
# libnbd-bin, qemu-utils and fio), each step bounded in time.
#
# Served three ways: `unvme nbd --ram` over TCP, the same over a Unix
# socket, and `unvme nbd` bridged to `unvme target --ram` over NVMe/TCP.
# For each: nbdinfo --list/--json (size, block sizes, flags), qemu-io
# write/read/discard/write-zeroes with -P pattern verification, qemu-img
# info/convert in and out + compare, nbdcopy of a 256 MiB random image in and
# out with multi-conn + cmp, fio's nbd engine with verify=crc32c at QD1 and
# QD32, and an nbdsh script exercising every command, flag and error reply.
# A read-only export is checked for EPERM, and sparse exports (ram and a
# sparse file) show their holes to nbdinfo --map and qemu-img map/convert.
#
# Usage: tests/nbd-clients.sh            (builds target/release/unvme)
#        UNVME_BIN=path/to/unvme tests/nbd-clients.sh
# Needs: nbdinfo nbdcopy nbdsh (libnbd-bin, python3-libnbd), qemu-img,
# qemu-io, fio — qemu-scripts/install-deps.sh installs them. Missing tools
# fail the script (set UNVME_NBD_ALLOW_MISSING=1 to skip those steps).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
WORK=$(mktemp -d /tmp/unvme-nbd-clients.XXXXXX)
PIDS=()
FAILED=0
PASSED=0

cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "nbd-clients: $*" >&2; }
die() { log "error: $*"; exit 1; }

# libnbd's Python module lives in Debian's python3; nbdsh runs `python3`.
export PATH=/usr/bin:/usr/sbin:/bin:$PATH

missing=()
for t in nbdinfo nbdcopy nbdsh qemu-img qemu-io fio python3; do
    command -v "$t" >/dev/null || missing+=("$t")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    if [[ ${UNVME_NBD_ALLOW_MISSING:-0} == 1 ]]; then
        log "missing tools (skipping their steps): ${missing[*]}"
    else
        die "missing tools: ${missing[*]} (run qemu-scripts/install-deps.sh as root)"
    fi
fi
have() { command -v "$1" >/dev/null; }
FIO_NBD=0
if have fio && fio --enghelp 2>/dev/null | grep -qw nbd; then FIO_NBD=1; fi

if [[ -z ${UNVME_BIN:-} ]]; then
    log "building unvme (release)"
    timeout 1200 cargo build -q --release --bin unvme
    UNVME_BIN=$ROOT/target/release/unvme
fi
[[ -x $UNVME_BIN ]] || die "no unvme binary at $UNVME_BIN"

# step NAME TIMEOUT CMD...: run, record PASS/FAIL, never abort the script.
step() {
    local name=$1 limit=$2 rc=0
    shift 2
    # The checks are shell functions: run them in a bounded child bash.
    timeout -k 5 "$limit" bash -c 'set -euo pipefail; "$@"' _ "$@" >"$WORK/step.out" 2>&1 || rc=$?
    if [[ $rc -eq 0 ]]; then
        PASSED=$((PASSED + 1))
        log "PASS $name"
    else
        FAILED=$((FAILED + 1))
        log "FAIL $name (status $rc)"
        tail -n 30 "$WORK/step.out" | sed 's/^/    /' >&2
    fi
}

# Starts a server in the background and waits for its "listening" line;
# its listen address is left in $WORK/NAME.addr. start NAME CMD...
start() {
    local name=$1 logf="$WORK/$1.log" i
    shift
    # Created before the server starts, so the first grep finds a file.
    : >"$logf"
    UNVME_LOG=info "$@" >"$logf" 2>&1 &
    PIDS+=($!)
    for ((i = 0; i < 200; i++)); do
        if grep -q 'listening' "$logf"; then
            grep -m1 -o 'la=[^ ]*' "$logf" | cut -d= -f2 >"$WORK/$name.addr" || true
            return 0
        fi
        kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$logf" >&2; die "$name exited"; }
        sleep 0.1
    done
    cat "$logf" >&2
    die "$name did not start listening"
}

SIZE=$((256 << 20))
export WORK SIZE
head -c "$SIZE" /dev/urandom >"$WORK/rand1.img"
head -c "$SIZE" /dev/urandom >"$WORK/rand2.img"

# ---- the checks, for one URI ------------------------------------------------

check_nbdinfo() { # URI
    nbdinfo --list "$1" | tee "$WORK/list.txt"
    grep -q 'export=' "$WORK/list.txt"
    nbdinfo --json "$1" >"$WORK/info.json"
    python3 - "$WORK/info.json" "$SIZE" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
e = j["exports"][0]
want = {
    "export-size": int(sys.argv[2]),
    "block_size_minimum": 512,
    "block_size_preferred": 4096,
    "block_size_maximum": 32 << 20,
    "is_read_only": False,
    "can_flush": True, "can_fua": True, "can_trim": True, "can_zero": True,
    "can_fast_zero": True, "can_cache": True, "can_multi_conn": True,
    "can_df": True,
}
bad = {k: (e.get(k), v) for k, v in want.items() if e.get(k) != v}
assert j["structured"] is True, "structured replies"
assert "base:allocation" in e.get("contexts", []), e.get("contexts")
assert not bad, bad
print("nbdinfo ok:", {k: e[k] for k in want})
EOF
}

check_qemu_io() { # URI
    qemu-io -f raw \
        -c 'write -P 0xa5 0 1M' -c 'read -P 0xa5 0 1M' \
        -c 'write -P 0x5c -f 1M 512k' -c 'read -P 0x5c 1M 512k' \
        -c 'discard 1M 256k' -c 'read -P 0 1M 256k' -c 'read -P 0x5c 1280k 256k' \
        -c 'write -z 2M 1M' -c 'read -P 0 2M 1M' \
        -c 'write -P 0x11 3M 4k' -c 'write -z -u 3M 4k' -c 'read -P 0 3M 4k' \
        -c 'aio_write -P 0x21 4M 64k' -c 'aio_write -P 0x22 5M 3M' -c 'aio_flush' \
        -c 'read -P 0x21 4M 64k' -c 'read -P 0x22 5M 3M' \
        -c 'write -P 0x33 8M 37k' -c 'read -P 0x33 8M 37k' \
        -c 'flush' "$1" | tee "$WORK/qemu-io.txt"
    ! grep -qiE 'fail|error|invalid|usage' "$WORK/qemu-io.txt"
}

check_qemu_img() { # URI
    qemu-img info --output=json "$1" | python3 -c \
        "import json,sys; j=json.load(sys.stdin); assert j['virtual-size']==$SIZE, j"
    qemu-img convert -n -f raw -O raw "$WORK/rand1.img" "$1"
    qemu-img compare -f raw -F raw "$WORK/rand1.img" "$1"
    qemu-img convert -f raw -O raw "$1" "$WORK/out1.img"
    cmp "$WORK/rand1.img" "$WORK/out1.img"
    rm -f "$WORK/out1.img"
}

check_nbdcopy() { # URI
    nbdcopy --connections=4 --requests=32 "$WORK/rand2.img" "$1"
    nbdcopy --connections=4 --requests=32 "$1" "$WORK/out2.img"
    cmp "$WORK/rand2.img" "$WORK/out2.img"
    rm -f "$WORK/out2.img"
    nbdcopy "$1" - | cmp - "$WORK/rand2.img"
}

check_fio() { # URI QD
    fio --name=verify --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k \
        --iodepth="$2" --size=32m --offset=64m --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --verify_backlog=512 --randrepeat=0 --output-format=terse \
        --group_reporting >/dev/null
    fio --name=verify-mixed --ioengine=nbd --uri="$1" --rw=randrw --bsrange=4k-128k \
        --iodepth="$2" --size=16m --offset=128m --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --output-format=terse >/dev/null
}

check_nbdsh() { # URI
    nbdsh -c "
import errno
uri = '$1'
h.set_strict_mode(0)            # let bad requests reach the server
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
size = h.get_size()
assert size == $SIZE, size
for f in ('can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero',
          'can_cache', 'can_multi_conn', 'can_df'):
    assert getattr(h, f)(), f
assert not h.is_read_only()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20

buf = bytes(range(256)) * 64
h.pwrite(buf, 0)
h.pwrite(buf, 16384, nbd.CMD_FLAG_FUA)
assert h.pread(len(buf), 0) == buf
assert h.pread(len(buf), 16384, nbd.CMD_FLAG_DF) == buf
h.flush()
h.cache(65536, 0)
h.trim(4096, 0)
assert h.pread(4096, 0) == bytes(4096)
h.zero(4096, 4096, nbd.CMD_FLAG_NO_HOLE)
h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
assert h.pread(8192, 4096) == bytes(8192)
assert h.pread(4096, 12288) == buf[12288:16384]
seen = []
def cb(meta, offset, entries, err):
    seen.append((meta, offset, list(entries)))
    return 0
h.block_status(1 << 20, 0, cb)
assert seen and seen[0][0] == nbd.CONTEXT_BASE_ALLOCATION, seen
assert seen[0][2] == [1 << 20, 0], seen  # one extent: allocated data
h.block_status(1 << 20, 0, cb, nbd.CMD_FLAG_REQ_ONE)

def expect(code, what, fn, *a):
    try:
        fn(*a)
    except nbd.Error as e:
        assert e.errnum == code, (what, e.errnum, e.string)
        print('ok', what, '->', errno.errorcode[code], '|', e.string)
        return
    raise AssertionError(what + ': no error')

expect(errno.EINVAL, 'read past end', h.pread, 512, size)
expect(errno.ENOSPC, 'write past end', h.pwrite, b'x' * 512, size)
expect(errno.ENOSPC, 'zero past end', h.zero, 512, size)
expect(errno.EINVAL, 'trim past end', h.trim, 512, size)
expect(errno.EINVAL, 'cache past end', h.cache, 512, size)
expect(errno.EINVAL, 'misaligned read', h.pread, 100, 1)
expect(errno.EINVAL, 'misaligned write', h.pwrite, b'x' * 100, 0)
expect(errno.EOVERFLOW, 'read over max block size', h.pread, (32 << 20) + 512, 0)
expect(errno.EINVAL, 'unknown flag', h.pread, 512, 0, 1 << 9)
expect(errno.EINVAL, 'flag not for this command', h.flush, nbd.CMD_FLAG_NO_HOLE)
# the connection survives every error
h.pwrite(buf, 0)
assert h.pread(len(buf), 0) == buf
h.shutdown()
print('nbdsh ok')
"
}

check_read_only() { # URI
    nbdsh -c "
import errno
h.set_strict_mode(0)
h.connect_uri('$1')
assert h.is_read_only()
assert not h.can_trim() and not h.can_zero()
for what, fn, a in (('write', h.pwrite, (b'x' * 512, 0)), ('trim', h.trim, (512, 0)),
                    ('zero', h.zero, (512, 0))):
    try:
        fn(*a)
        raise AssertionError(what + ': no error')
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, (what, e.errnum, e.string)
assert h.pread(512, 0) == bytes(512)
h.shutdown()
print('read-only ok')
"
}

# BLOCK_STATUS (base:allocation) from the device's allocation: an export
# with 1 MiB of data at 8 MiB shows exactly that run as data and the rest as
# hole+zero to nbdinfo --map and qemu-img map, and qemu-img convert copies it
# into a sparse file. The data is written by the caller (qemu-io).
check_map() { # URI SIZE
    local uri=$1 size=$2
    nbdinfo --map "$uri" | tee "$WORK/map.txt"
    python3 - "$WORK/map.txt" "$size" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
got = [(int(r[0]), int(r[1]), int(r[2])) for r in rows]
size = int(sys.argv[2])
want = [(0, 8 << 20, 3), (8 << 20, 1 << 20, 0), (9 << 20, size - (9 << 20), 3)]
assert got == want, f"map {got} != {want}"
print("nbdinfo --map ok")
PY
    qemu-img map --output=json -f raw "$uri" | python3 -c "
import json, sys
m = json.load(sys.stdin)
data = [(e['start'], e['length']) for e in m if e['data']]
assert data == [(8 << 20, 1 << 20)], m
assert all(e['zero'] for e in m if not e['data']), m
print('qemu-img map ok')"
    qemu-img convert -f raw -O raw "$uri" "$WORK/sparse-out.img"
    qemu-io -f raw -c 'read -P 0x3c 8M 1M' -c 'read -P 0 0 8M' "$WORK/sparse-out.img" | tee "$WORK/sparse-io.txt"
    ! grep -qiE 'fail|error' "$WORK/sparse-io.txt"
    local kib
    kib=$(du -k "$WORK/sparse-out.img" | cut -f1)
    rm -f "$WORK/sparse-out.img"
    [[ $kib -lt 4096 ]] || { echo "converted image not sparse: $kib KiB allocated"; return 1; }
}

export -f check_nbdinfo check_qemu_io check_qemu_img check_nbdcopy check_fio check_nbdsh check_read_only check_map

suite() { # LABEL URI
    local label=$1 uri=$2
    log "---- $label: $uri"
    have nbdinfo && step "$label: nbdinfo --list/--json" 60 check_nbdinfo "$uri"
    have qemu-io && step "$label: qemu-io patterns" 120 check_qemu_io "$uri"
    have qemu-img && step "$label: qemu-img convert in/out + compare" 300 check_qemu_img "$uri"
    have nbdcopy && step "$label: nbdcopy 256 MiB multi-conn in/out" 300 check_nbdcopy "$uri"
    if [[ $FIO_NBD == 1 ]]; then
        step "$label: fio nbd verify=crc32c QD1" 300 check_fio "$uri" 1
        step "$label: fio nbd verify=crc32c QD32" 300 check_fio "$uri" 32
    fi
    have nbdsh && step "$label: nbdsh commands, flags, errors" 120 check_nbdsh "$uri"
    return 0
}

# ---- 1. unvme nbd --ram, TCP and Unix socket --------------------------------

SOCK=$WORK/nbd.sock
start nbd-ram "$UNVME_BIN" nbd --ram 256M --listen 127.0.0.1:0 --unix "$SOCK"
ADDR=$(cat "$WORK/nbd-ram.addr")
suite "ram/tcp" "nbd://$ADDR"
suite "ram/unix" "nbd+unix:///?socket=$SOCK"

# ---- 2. unvme nbd bridged to unvme target (NVMe/TCP) ------------------------

start target "$UNVME_BIN" target --ram 256M --listen 127.0.0.1:0 --reactors 1
TADDR=$(cat "$WORK/target.addr")
start nbd-bridge "$UNVME_BIN" nbd --port "${TADDR##*:}" --listen 127.0.0.1:0
BADDR=$(cat "$WORK/nbd-bridge.addr")
suite "bridge/nvme-tcp" "nbd://$BADDR"

# ---- 3. read-only export ----------------------------------------------------

start nbd-ro "$UNVME_BIN" nbd --ram 16M --read-only --listen 127.0.0.1:0
RADDR=$(cat "$WORK/nbd-ro.addr")
have nbdsh && step "read-only: writes, trims and zeroes get EPERM" 60 check_read_only "nbd://$RADDR"

# ---- 4. sparse exports: BLOCK_STATUS holes (ram and a sparse file) ---------

start nbd-sparse "$UNVME_BIN" nbd --ram 64M --listen 127.0.0.1:0
SADDR=$(cat "$WORK/nbd-sparse.addr")
qemu-io -f raw -c 'write -P 0x3c 8M 1M' "nbd://$SADDR" >/dev/null
step "sparse ram: nbdinfo --map, qemu-img map, sparse convert" 120 check_map "nbd://$SADDR" $((64 << 20))
truncate -s 64M "$WORK/sparse-src.img"
start nbd-sparse-file "$UNVME_BIN" nbd --file "$WORK/sparse-src.img" --listen 127.0.0.1:0
FADDR=$(cat "$WORK/nbd-sparse-file.addr")
qemu-io -f raw -c 'write -P 0x3c 8M 1M' "nbd://$FADDR" >/dev/null
step "sparse file: nbdinfo --map, qemu-img map, sparse convert" 120 check_map "nbd://$FADDR" $((64 << 20))

log "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
