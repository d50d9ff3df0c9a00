# vfio-nvme: `unvme target --vfio` driving the guest's emulated NVMe
# controller from user space, checked through the guest kernel's nvme-tcp
# host and `unvme perf --verify` (host half: qemu-scripts/tests/vfio-nvme.sh,
# which boots q35 + intel-iommu + `-device nvme,serial=deadbeef`).
#
# Needs /share/unvme, /share/vfio-bind.sh and /share/vfio-conformance. Steps:
#  1. error paths: an absent device, the device still bound to the kernel
#     nvme driver, vfio-bind.sh on an absent device, no permission on the
#     VFIO group (as uid 1000) — each must fail with its clear message;
#  2. vfio-bind.sh binds the device; `unvme identify --vfio` (text, JSON);
#     2b. the bdev conformance kit on the VFIO bdev (/share/vfio-conformance,
#     nvme-vfio/tests/conformance.rs) with the DMA pool on and off, bounded
#     by VFIO_CONFORMANCE_TIMEOUT (default 180 s; it takes ~15 s under TCG);
#  3. `unvme target --vfio ADDR` on 127.0.0.1:4420; `unvme perf --verify`
#     randwrite then randread (4 KiB, 128 KiB, and 1 MiB — above the
#     controller's 512 KiB MDTS, so split — over a 32 MiB range);
#  4. kernel nvme-tcp host: 16 MiB random pattern (O_DIRECT, 4 KiB..1 MiB
#     blocks) round-trips; Write Zeroes (nvme-cli) reads back zeroes with the
#     neighbours intact; Dataset Management deallocate; Flush; at the stop,
#     the target's queues report their data requests zero-copy (the DMA
#     buffer pool served them all: none, or hardly any, copied);
#  5. the target is restarted (SIGTERM: controller shut down and released)
#     with the pool off (UNVME_VFIO_DMA_POOL=0): the data reads back through
#     the copy path, and every request was copied; then with a 1 MiB pool
#     that QD32 128 KiB I/O exhausts: `unvme perf --verify` passes with
#     requests on both paths, and the kernel host writes the pattern again
#     and reads it back; the target is stopped again;
#  6. vfio-bind.sh --unbind gives the device back to the kernel nvme driver,
#     which reads the same data: the user-space driver wrote the real device.
#  Issue #6 (blocks marked "==== #6"; run between steps 5 and 6):
#  7. controller reset: the target runs with UNVME_VFIO_INJECT_DISABLE_MS
#     (the driver clears CC.EN on the live controller) while the kernel
#     nvme-tcp host writes the pattern in O_DIRECT passes; the target logs
#     the failure, the failed outstanding requests, the completed reset and
#     the re-created queue; every pass completes (the host retried) and the
#     pattern reads back;
#  8. admin pass-through: `nvme id-ns` (NSZE, LBA formats, EUI-64, NGUID),
#     the namespace identification descriptors (uuid, eui64, nguid), the
#     namespace's sysfs uuid and wwid and
#     `nvme smart-log` (temperature; host write commands grown past the
#     count at boot) seen by the kernel nvme-tcp host through the target
#     match what the guest kernel's own nvme driver reported for the device
#     at boot (step 1, before it was bound to vfio-pci).
set -eu
# shellcheck source=SCRIPTDIR/../guest/lib.sh
. /share/lib.sh

NQN=nqn.2024-11.io.unvme:default
SERIAL=${VFIO_SERIAL:-deadbeef}
U=/tmp/unvme
bind() { sh /share/vfio-bind.sh "$@"; }
MB=$((1024 * 1024))

[ -f /share/unvme ] || fail "no /share/unvme (run-guest.sh --file target/release/unvme=unvme)"
cp /share/unvme "$U"
chmod 755 "$U"
"$U" --version || fail "unvme does not run in the guest"

# The emulated NVMe controller: PCI class 0x010802, serial $SERIAL.
ADDR=${VFIO_ADDR:-}
if [ -z "$ADDR" ]; then
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat "$d/class")" = 0x010802 ] && { ADDR=$(basename "$d"); break; }
    done
fi
[ -n "$ADDR" ] || fail "no NVMe PCI device in the guest"
log "NVMe controller at $ADDR (driver: $(basename "$(readlink /sys/bus/pci/devices/"$ADDR"/driver)" 2>/dev/null))"

# expect_fail NAME PATTERN CMD...: CMD must fail and print PATTERN.
expect_fail() {
    _name=$1 _pat=$2
    shift 2
    if "$@" > /tmp/err.out 2>&1; then
        cat /tmp/err.out
        fail "$_name: succeeded, expected a failure"
    fi
    cat /tmp/err.out
    grep -q "$_pat" /tmp/err.out || fail "$_name: message lacks '$_pat'"
    log "ok: $_name gives a clear error"
}

# ---- 1. error paths ---------------------------------------------------
expect_fail "absent device" "0000:00:1e.7 not found" "$U" identify --vfio 0000:00:1e.7
expect_fail "target on an absent device" "not found" \
    "$U" target --vfio 0000:00:1e.7 --listen 127.0.0.1:4421 --reactors 1
expect_fail "vfio-bind.sh on an absent device" "no PCI device 0000:00:1e.7" bind 0000:00:1e.7
wait_for /sys/bus/pci/devices/"$ADDR"/driver 10 || fail "$ADDR has no driver at boot"
expect_fail "device bound to nvme" "bound to the nvme driver, not vfio-pci" \
    "$U" identify --vfio "$ADDR"

# ==== #6 admin pass-through, part 1 ========================================
# What the guest kernel's own nvme driver reports for the device, for step 8.
kernel_ns_dev() {  # the namespace block device of $ADDR under the nvme driver
    for b in /sys/bus/pci/devices/"$ADDR"/nvme/nvme*/nvme*n1 /sys/class/nvme-subsystem/*/nvme*n1; do
        [ -e "$b" ] || continue
        [ "$(tr -d ' ' < "$(dirname "$b")/serial")" = "$SERIAL" ] || continue
        [ -b "/dev/$(basename "$b")" ] && { echo "/dev/$(basename "$b")"; return 0; }
    done
    return 1
}
i=0
until LDEV=$(kernel_ns_dev); do
    i=$((i + 1))
    [ "$i" -ge 100 ] && fail "no kernel block device for $ADDR at boot"
    sleep 0.1
done
run nvme id-ns "$LDEV" > /tmp/local-idns.txt
run nvme smart-log "$LDEV" > /tmp/local-smart.txt
# The namespace identification descriptors (CNS 3) as the device gives
# them. (The kernel driver itself ignores them for QEMU's controller, quirk
# BOGUS_NID, so sysfs has no uuid/eui/nguid here to compare with.)
run nvme ns-descs "$LDEV" > /tmp/local-descs.txt
grep -Eq '^uuid *:' /tmp/local-descs.txt || {
    cat /tmp/local-descs.txt
    fail "the emulated namespace has no UUID descriptor (qemu-scripts/tests/vfio-nvme.sh gives it eui64/nguid/uuid)"
}
LUUID=$(sed -n 's/^uuid *: *//p' /tmp/local-descs.txt)
log "kernel nvme driver's view of $LDEV recorded: uuid $LUUID, $(grep '^temperature' /tmp/local-smart.txt)"
# ==== end #6 part 1 ========================================================

# ---- 2. bind, identify --------------------------------------------------
run bind "$ADDR"
GROUP=$(basename "$(readlink /sys/bus/pci/devices/"$ADDR"/iommu_group)")
run bind "$ADDR"   # idempotent
grep -q '^unvmetest:' /etc/passwd || echo 'unvmetest:x:1000:1000::/tmp:/bin/sh' >> /etc/passwd
expect_fail "no permission on /dev/vfio/$GROUP" "/dev/vfio/$GROUP: Permission denied" \
    su -s /bin/sh unvmetest -c "$U identify --vfio $ADDR"

run "$U" identify --vfio "$ADDR" > /tmp/id.txt
cat /tmp/id.txt
grep -q "^sn *: $SERIAL" /tmp/id.txt || fail "identify: serial $SERIAL missing"
grep -q "^mn *: QEMU NVMe Ctrl" /tmp/id.txt || fail "identify: model missing"
grep -q "NVME Identify Namespace 1" /tmp/id.txt || fail "identify: namespace 1 missing"
run "$U" identify --vfio "$ADDR" --json > /tmp/id.json
grep -q "\"sn\":\"$SERIAL\"" /tmp/id.json || fail "identify --json: serial missing"
log "identify --vfio: controller and namespace 1 shown (text and JSON)"

# ---- 2b. the bdev conformance kit on the VFIO bdev --------------------------
# nvme-vfio/tests/conformance.rs (built by the host half): every check of
# unvme_bdev::conformance plus the random-operations model test, with the
# DMA pool on (zero-copy) and off (copied). QEMU's controller has Compare,
# Write Zeroes and Dataset Management (DLFEAT: deallocated blocks read as
# zeroes), so the driver must report all three and the kit check them.
[ -f /share/vfio-conformance ] || fail "no /share/vfio-conformance (the host half ships the test binary)"
cp /share/vfio-conformance /tmp/vfio-conformance
chmod 755 /tmp/vfio-conformance
CONF_LIMIT=${VFIO_CONFORMANCE_TIMEOUT:-180}
log "+ vfio conformance on $ADDR (at most ${CONF_LIMIT}s)"
rc=0
UNVME_VFIO_CONFORMANCE_BDF=$ADDR UNVME_VFIO_CONFORMANCE_CASES=${VFIO_CONFORMANCE_CASES:-32} \
    timeout "$CONF_LIMIT" /tmp/vfio-conformance > /tmp/conformance.out 2>&1 || rc=$?
cat /tmp/conformance.out
[ "$rc" -eq 0 ] || fail "the conformance kit failed on the VFIO bdev (exit $rc; 124 or 143: killed after ${CONF_LIMIT}s)"
grep -q '^vfio conformance: PASS' /tmp/conformance.out || fail "the conformance test did not run (no PASS line)"
[ "$(grep -c '^vfio conformance: ok: DMA pool' /tmp/conformance.out)" -eq 2 ] \
    || fail "the conformance test did not run with the pool on and off"
grep -q 'compare yes, write-zeroes yes, deallocate yes' /tmp/conformance.out \
    || fail "the VFIO bdev does not report Compare, Write Zeroes and Deallocate of QEMU's NVMe"
log "conformance kit: $(grep '^vfio conformance: PASS' /tmp/conformance.out | cut -d' ' -f4-)"

# ---- 3. target + unvme perf --verify ------------------------------------
# Default reactor settings: a reactor never sleeps in epoll while a bdev
# queue holds I/O (a VFIO queue has no descriptor to wake it), so no spin
# override is needed. The backend accepts 1 MiB requests and splits them
# into commands within this controller's 512 KiB MDTS.
TARGET_ARGS=${VFIO_TARGET_ARGS:-}
TPID=
POOL=   # UNVME_VFIO_DMA_POOL for the next target_start (empty: the default)
target_start() {
    # Emptied first: the last run's "listening" must not pass for this one's.
    : > /tmp/target.log
    # shellcheck disable=SC2086 # TARGET_ARGS is a list of options
    env ${POOL:+UNVME_VFIO_DMA_POOL=$POOL} \
        "$U" target --vfio "$ADDR" --listen 127.0.0.1:4420 --reactors 1 $TARGET_ARGS \
        --log info > /tmp/target.log 2>&1 &
    TPID=$!
    wait_log /tmp/target.log listening "$TPID" 30 || fail "unvme target --vfio did not start"
    log "unvme target --vfio $ADDR listening (pid $TPID)"
}
target_stop() {
    kill -TERM "$TPID"
    i=0
    while kill -0 "$TPID" 2>/dev/null; do
        i=$((i + 1))
        [ "$i" -ge 300 ] && { cat /tmp/target.log; fail "unvme target did not exit on SIGTERM"; }
        sleep 0.1
    done
    wait "$TPID" || { cat /tmp/target.log; fail "unvme target exited with an error"; }
    cat /tmp/target.log
    grep -q "shut down and released" /tmp/target.log || fail "the target did not release the controller"
    grep -q panicked /tmp/target.log && fail "the target panicked"
    log "unvme target stopped; controller released"
}
# data_paths: sets ZC and CP to the data requests of the last target run
# that went zero-copy and through copies, summed over the lines its VFIO
# queues log when they close ("vfio queue N: X requests zero-copy, Y copied").
data_paths() {
    sed -n 's/.*vfio queue [0-9]*: \([0-9]*\) requests zero-copy, \([0-9]*\) copied.*/\1 \2/p' \
        /tmp/target.log | awk '{ z += $1; c += $2 } END { print z + 0, c + 0 }' > /tmp/paths
    read -r ZC CP < /tmp/paths
    log "data requests: $ZC zero-copy, $CP copied (UNVME_VFIO_DMA_POOL=${POOL:-default})"
}
perf_verify() {  # IO-SIZE: randwrite then randread, checked
    for pat in randwrite randread; do
        run "$U" perf --verify --pattern "$pat" --io-size "$1" --qd 32 --time 3 \
            --range 32M --json > /tmp/perf.out
        tail -1 /tmp/perf.out
        tail -1 /tmp/perf.out | grep -q '"errors": *0[,}]' \
            || fail "unvme perf --verify $pat $1 reported errors"
        tail -1 /tmp/perf.out | grep -q '"ios": *[1-9]' || fail "unvme perf $pat $1 did no I/O"
    done
}
trap '[ -n "$TPID" ] && kill -KILL "$TPID" 2>/dev/null; true' EXIT

target_start
for io in 4096 131072 1048576; do
    perf_verify "$io"
done
log "unvme perf --verify: randwrite/randread 4 KiB, 128 KiB and 1 MiB (split in two NVMe commands) without errors"

# ---- 4. kernel nvme-tcp host ---------------------------------------------
connect() {
    run nvme connect -t tcp -a 127.0.0.1 -s 4420 -n "$NQN"
    i=0
    DEV=
    while [ -z "$DEV" ] && [ "$i" -lt 100 ]; do
        DEV=$(nvme_dev_for_nqn "$NQN" || true)
        [ -n "$DEV" ] && [ -b "$DEV" ] || DEV=
        sleep 0.1
        i=$((i + 1))
    done
    [ -n "$DEV" ] || fail "no block device for $NQN"
    log "connected: $DEV ($(blockdev --getsize64 "$DEV") bytes, $(blockdev --getss "$DEV")-byte blocks)"
}
disconnect() { run nvme disconnect -n "$NQN"; }

connect
BS=$(blockdev --getss "$DEV")
dd if=/dev/urandom of=/tmp/pattern bs=1M count=16 2>/dev/null
for bs in 4096 65536 1048576; do
    run dd if=/tmp/pattern of="$DEV" bs="$bs" count=$((16 * MB / bs)) oflag=direct
    run dd if="$DEV" of=/tmp/readback bs="$bs" count=$((16 * MB / bs)) iflag=direct
    cmp /tmp/pattern /tmp/readback || fail "read-back with bs=$bs differs from the pattern"
done
log "16 MiB pattern round-trips with bs 4 KiB .. 1 MiB"

# Write Zeroes over 1 MiB at 4 MiB; expected image updated to match.
run nvme write-zeroes "$DEV" -s $((4 * MB / BS)) -c $((MB / BS - 1))
dd if=/dev/zero of=/tmp/pattern bs=1M seek=4 count=1 conv=notrunc 2>/dev/null
run dd if="$DEV" of=/tmp/readback bs=1M count=16 iflag=direct
cmp /tmp/pattern /tmp/readback || fail "after Write Zeroes the device differs from the expected image"
log "Write Zeroes: the range reads back as zeroes, neighbours intact"

# Dataset Management (deallocate) past the pattern, then Flush.
run nvme dsm "$DEV" --ad -s $((32 * MB / BS)) -b $((MB / BS))
run nvme flush "$DEV"
run dd if="$DEV" of=/tmp/readback bs=1M count=16 iflag=direct
cmp /tmp/pattern /tmp/readback || fail "data changed after DSM/Flush"
log "Dataset Management deallocate and Flush succeed"
disconnect

target_stop
data_paths
[ "$ZC" -gt 0 ] || fail "no request took the zero-copy path"
[ $((CP * 20)) -le "$ZC" ] || fail "$CP of $((ZC + CP)) requests were copied with a pool that suffices"

# ---- 5. restart -------------------------------------------------------------
POOL=0
target_start
connect
run dd if="$DEV" of=/tmp/readback bs=1M count=16 iflag=direct
cmp /tmp/pattern /tmp/readback || fail "data did not survive the target restart"
log "data survives the target restart (read through the copy path: pool off)"
disconnect
target_stop
data_paths
if [ "$ZC" -ne 0 ] || [ "$CP" -eq 0 ]; then
    fail "with the pool off, requests must all be copied"
fi

# A pool smaller than QD32 x 128 KiB runs dry: both paths, data intact.
# perf overwrote the pattern: the kernel host writes it again (for step 6).
POOL=1M
target_start
perf_verify 131072
connect
run dd if=/tmp/pattern of="$DEV" bs=128k count=128 oflag=direct
run dd if="$DEV" of=/tmp/readback bs=1M count=16 iflag=direct
cmp /tmp/pattern /tmp/readback || fail "pattern read-back differs (1 MiB pool)"
disconnect
target_stop
data_paths
if [ "$ZC" -eq 0 ] || [ "$CP" -eq 0 ]; then
    fail "a 1 MiB pool under QD32 x 128 KiB should serve some requests, not all"
fi
log "unvme perf --verify 128 KiB passes with the pool running dry (both data paths)"
TPID=

# ==== #6 controller reset and admin pass-through (steps 7 and 8) ===========
# 7. The driver clears CC.EN on the live controller INJECT_MS after it opens
# it; the kernel host keeps writing the pattern (4 KiB O_DIRECT writes, one
# at a time, so a command is with the device whenever it goes) until the
# target has logged a completed reset. Every pass must succeed.
INJECT_MS=${VFIO_INJECT_MS:-1500}
POOL=
export UNVME_VFIO_INJECT_DISABLE_MS="$INJECT_MS"
target_start
unset UNVME_VFIO_INJECT_DISABLE_MS
connect
pass=0
while ! grep -q "reset complete" /tmp/target.log; do
    pass=$((pass + 1))
    [ "$pass" -gt 20 ] && { cat /tmp/target.log; fail "no controller reset after 20 write passes"; }
    run dd if=/tmp/pattern of="$DEV" bs=4096 count=4096 oflag=direct
done
run dd if=/tmp/pattern of="$DEV" bs=128k count=128 oflag=direct
run dd if="$DEV" of=/tmp/readback bs=1M count=16 iflag=direct
cmp /tmp/pattern /tmp/readback || fail "pattern read-back differs after the controller reset"
grep "vfio" /tmp/target.log | grep -E "fault injection|controller failed|reset|outstanding|re-created" || true
grep -q "fault injection armed" /tmp/target.log || fail "the fault injection was not armed"
grep -q "controller failed (CSTS.RDY dropped)" /tmp/target.log \
    || fail "the target did not log the controller failure"
grep -q "resetting (attempt 1/3)" /tmp/target.log || fail "the target did not log the reset attempt"
grep -Eq "failing [1-9][0-9]* outstanding requests" /tmp/target.log \
    || fail "no outstanding request was failed: the fault did not hit mid-I/O"
grep -q "SQ/CQ pair re-created" /tmp/target.log || fail "the I/O queue was not re-created"
if grep -q "giving up" /tmp/target.log; then fail "the target gave up on the controller"; fi
log "controller reset: failure (CSTS.RDY dropped) mid-I/O, reset, queue re-created; $pass write passes completed and the pattern verifies"

# 8. Admin pass-through: the kernel nvme-tcp host sees the device's
# Identify Namespace fields, identifiers and SMART / health log.
run nvme id-ns "$DEV" > /tmp/fab-idns.txt
cat /tmp/fab-idns.txt
for fld in nsze nlbaf eui64 nguid; do
    want=$(grep "^$fld *:" /tmp/local-idns.txt) || fail "id-ns at boot lacks $fld"
    got=$(grep "^$fld *:" /tmp/fab-idns.txt) || fail "id-ns through the target lacks $fld"
    [ "$want" = "$got" ] || fail "id-ns $fld: kernel driver '$want', through the target '$got'"
done
grep '^lbaf' /tmp/local-idns.txt > /tmp/local-lbaf
grep '^lbaf' /tmp/fab-idns.txt > /tmp/fab-lbaf
cmp /tmp/local-lbaf /tmp/fab-lbaf || fail "LBA formats differ from the kernel driver's"
run nvme ns-descs "$DEV" > /tmp/fab-descs.txt
for fld in uuid eui64 nguid; do
    want=$(grep "^$fld *:" /tmp/local-descs.txt) || continue
    got=$(grep "^$fld *:" /tmp/fab-descs.txt) || fail "ns-descs through the target lack $fld"
    [ "$want" = "$got" ] || fail "ns-descs $fld: device '$want', through the target '$got'"
done
sysuuid=$(cat "/sys/block/$(basename "$DEV")/uuid") || fail "no sysfs uuid through the target"
[ "$sysuuid" = "$LUUID" ] || fail "sysfs uuid through the target $sysuuid, device $LUUID"
wwid=$(cat "/sys/block/$(basename "$DEV")/wwid")
[ "$wwid" = "uuid.$LUUID" ] || fail "wwid through the target '$wwid', want uuid.$LUUID"
ids=" uuid=$LUUID wwid=$wwid"
run nvme smart-log "$DEV" > /tmp/fab-smart.txt
cat /tmp/fab-smart.txt
want=$(grep '^temperature' /tmp/local-smart.txt)
got=$(grep '^temperature' /tmp/fab-smart.txt) || fail "no temperature through the target"
[ "$want" = "$got" ] || fail "SMART temperature: kernel driver '$want', through the target '$got'"
writes() { sed -n 's/^host_write_commands[^:]*: *//p' "$1" | tr -dc '0-9'; }
w0=$(writes /tmp/local-smart.txt)
w1=$(writes /tmp/fab-smart.txt)
if [ -z "$w1" ] || [ "$w1" -le "${w0:-0}" ]; then
    fail "SMART host write commands through the target ($w1) not past the count at boot ($w0)"
fi
run nvme smart-log "$DEV" --namespace-id=1 > /tmp/fab-smart-ns.txt
grep -q "^temperature" /tmp/fab-smart-ns.txt || fail "no per-namespace SMART log through the target"
log "admin pass-through: id-ns (nsze, nlbaf, LBA formats, eui64, nguid),$ids and SMART ($got, host writes $w0 -> $w1) match the device"
disconnect
target_stop
TPID=
# ==== end #6 ===============================================================

# ---- 6. back to the kernel driver ------------------------------------------
run bind --unbind "$ADDR"
wait_for /sys/bus/pci/devices/"$ADDR"/nvme 20 || fail "the nvme driver did not take $ADDR back"
KDEV=
i=0
while [ -z "$KDEV" ] && [ "$i" -lt 100 ]; do
    for b in /sys/bus/pci/devices/"$ADDR"/nvme/nvme*/nvme*n1 /sys/class/nvme-subsystem/*/nvme*n1; do
        [ -e "$b" ] || continue
        [ "$(tr -d ' ' < "$(dirname "$b")/serial")" = "$SERIAL" ] || continue
        [ -b "/dev/$(basename "$b")" ] && KDEV=/dev/$(basename "$b")
    done
    sleep 0.1
    i=$((i + 1))
done
[ -n "$KDEV" ] || fail "no kernel block device for $ADDR after --unbind"
run dd if="$KDEV" of=/tmp/readback bs=1M count=16 iflag=direct
cmp /tmp/pattern /tmp/readback || fail "the kernel nvme driver reads different data"
log "released to the kernel nvme driver ($KDEV), which reads the same data"
log "vfio-nvme: all checks passed"
