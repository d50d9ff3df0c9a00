# shellcheck shell=sh
# vhost-blk: the guest kernel's virtio_blk driver against `unvme vhost-blk`
# on the host, attached as `-device vhost-user-blk-pci`. The host side
# (qemu-scripts/tests/vhost-blk.sh) starts the device and passes
# UNVME_VB_SIZE (bytes), UNVME_VB_QUEUES (num-queues) and UNVME_VB_SERIAL.
#
# Checks: /dev/vda with the right size, limits and queue count; the serial
# (GET_ID); the cache mode switch (CONFIG_WCE, SET_CONFIG); a 64 MiB random
# pattern written and read back with O_DIRECT in block sizes 4 KiB .. 1 MiB
# (and written with one size, read with another); flush; blkdiscard
# reading back as zeroes with the neighbours intact; write zeroes
# (fallocate ZERO_RANGE / PUNCH_HOLE on the device, which the kernel never
# emulates) likewise; a read beyond the end failing cleanly; fio randwrite
# with verify (2 jobs) when the guest has fio; an ext2
# filesystem with files across sync, unmount, cache drop and remount, and
# across a device reset (driver unbind/bind: vhost-user stop + start); with
# UNVME_VB_FINAL=FILE, FILE written at 32 MiB and flushed last (the host
# checks it in the backing file).
set -eu
# shellcheck source=SCRIPTDIR/../guest/lib.sh
. /share/lib.sh

SIZE=${UNVME_VB_SIZE:?}
QUEUES=${UNVME_VB_QUEUES:-1}
SERIAL=${UNVME_VB_SERIAL:-}
DEV=/dev/vda
SYS=/sys/block/vda
MIB=$((1024 * 1024))
PAT=64

run modprobe virtio_blk
modprobe ext4 2>/dev/null || true
wait_for "$DEV" 20 || fail "no $DEV"

got=$(blockdev --getsize64 "$DEV")
[ "$got" = "$SIZE" ] || fail "size $got, expected $SIZE"
log "$DEV: $got bytes"
for f in logical_block_size physical_block_size max_segments max_segment_size \
    max_hw_sectors_kb max_sectors_kb discard_max_bytes discard_granularity \
    write_zeroes_max_bytes write_cache; do
    log "queue/$f: $(cat "$SYS/queue/$f" 2>/dev/null || echo '?')"
done
set -- "$SYS"/mq/*
nq=$#
[ "$nq" = "$QUEUES" ] || fail "$nq blk-mq queues, expected $QUEUES"
log "$nq virtqueue(s)"
[ "$(cat "$SYS/queue/discard_max_bytes")" != 0 ] || fail "discard not offered"
[ "$(cat "$SYS/ro")" = 0 ] || fail "device is read-only"
if [ -n "$SERIAL" ]; then
    s=$(cat "$SYS/serial" 2>/dev/null || true)
    [ "$s" = "$SERIAL" ] || fail "serial '$s', expected '$SERIAL'"
    log "serial (GET_ID): $s"
fi

# CONFIG_WCE: the driver switches the cache mode through SET_CONFIG.
if [ -w "$SYS/cache_type" ]; then
    orig=$(cat "$SYS/cache_type")
    echo "write through" > "$SYS/cache_type"
    [ "$(cat "$SYS/cache_type")" = "write through" ] || fail "cache_type did not switch to write through"
    echo "write back" > "$SYS/cache_type"
    [ "$(cat "$SYS/cache_type")" = "write back" ] || fail "cache_type did not switch to write back"
    log "cache_type switches (was '$orig', now write back)"
fi

dd if=/dev/urandom of=/tmp/pattern bs=1M count=$PAT 2>/dev/null
for bs in 4096 65536 1048576; do
    n=$((PAT * MIB / bs))
    run dd if=/tmp/pattern of="$DEV" bs="$bs" count="$n" oflag=direct conv=fsync
    run dd if="$DEV" of=/tmp/readback bs="$bs" count="$n" iflag=direct
    cmp /tmp/pattern /tmp/readback || fail "read-back with bs=$bs differs from the written pattern"
    rm -f /tmp/readback
done
# Written with one size, read with another (and at an offset).
run dd if=/tmp/pattern of="$DEV" bs=1M count=$PAT seek=8 oflag=direct
run dd if="$DEV" of=/tmp/readback bs=8192 skip=$((8 * MIB / 8192)) count=$((PAT * MIB / 8192)) iflag=direct
cmp /tmp/pattern /tmp/readback || fail "1 MiB writes read back with 8 KiB reads differ"
rm -f /tmp/readback
run sync
run blockdev --flushbufs "$DEV"
log "64 MiB pattern round-trips with bs 4 KiB .. 1 MiB; flush ok"

# Discard 1 MiB at 8 MiB: zeroes there, the pattern around it.
run blkdiscard -o $((8 * MIB)) -l "$MIB" "$DEV"
dd if="$DEV" bs=1M skip=8 count=1 iflag=direct 2>/dev/null | cmp -s -n "$MIB" - /dev/zero \
    || fail "discarded range does not read back as zeroes"
dd if="$DEV" bs=1M skip=9 count=1 iflag=direct 2>/dev/null | cmp -s -n "$MIB" - /tmp/pattern 0 "$MIB" \
    || fail "data after the discarded range changed"
log "blkdiscard reads back as zeroes, neighbours intact"
# Write zeroes: fallocate on the block device (/share/zero-range, built
# by the host test) makes the kernel send VIRTIO_BLK_T_WRITE_ZEROES and
# never falls back to writing zero pages, so success means the device did
# it. ZERO_RANGE at 16 MiB (no unmap), PUNCH_HOLE at 18 MiB (unmap allowed).
[ -x /share/zero-range ] || fail "no /share/zero-range (the host test builds it)"
run /share/zero-range zero "$DEV" $((16 * MIB)) "$MIB"
run /share/zero-range punch "$DEV" $((18 * MIB)) $((MIB / 2))
dd if="$DEV" bs=1M skip=16 count=1 iflag=direct 2>/dev/null | cmp -s -n "$MIB" - /dev/zero \
    || fail "write-zeroes (zero range) does not read back as zeroes"
dd if="$DEV" bs=512k skip=36 count=1 iflag=direct 2>/dev/null | cmp -s -n $((MIB / 2)) - /dev/zero \
    || fail "write-zeroes (punch hole) does not read back as zeroes"
dd if="$DEV" bs=1M skip=17 count=1 iflag=direct 2>/dev/null | cmp -s -n "$MIB" - /tmp/pattern 0 $((9 * MIB)) \
    || fail "data between the zeroed ranges changed"
dd if="$DEV" bs=512k skip=37 count=1 iflag=direct 2>/dev/null \
    | cmp -s -n $((MIB / 2)) - /tmp/pattern 0 $((10 * MIB + MIB / 2)) \
    || fail "data after the punched range changed"
log "write zeroes (fallocate zero range / punch hole, no fallback) reads back as zeroes, neighbours intact"

# A read past the end fails cleanly (the kernel stops it; the device
# keeps serving).
if dd if="$DEV" of=/dev/null bs=4096 skip=$((SIZE / 4096)) count=1 iflag=direct 2>/dev/null; then
    log "read at the end returned EOF"
fi
dd if="$DEV" of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null || fail "device stopped serving"

# fio with verify when the guest has it (run-guest.sh --with-fio): random
# writes of mixed sizes from 2 jobs at QD16 (both virtqueues with
# num-queues=2), each job verifying its own region.
if command -v fio >/dev/null 2>&1; then
    run fio --name=verify --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite \
        --bsrange=4k-256k --iodepth=16 --numjobs=2 --size=32M --offset_increment=64M \
        --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 --group_reporting \
        --output=/tmp/fio.out
    grep -q "err= 0" /tmp/fio.out || { cat /tmp/fio.out; fail "fio verify reported errors"; }
    log "fio randwrite + verify (2 jobs, QD16, 4k-256k) passed"
fi

run mke2fs -q -b 4096 "$DEV"
mkdir -p /mnt/t
run mount -t ext2 "$DEV" /mnt/t
for i in 1 2 3 4; do
    dd if=/dev/urandom of=/mnt/t/file$i bs=64k count=$((i * 8)) 2>/dev/null
done
md5sum /mnt/t/file* > /tmp/sums
run sync
run umount /mnt/t
echo 3 > /proc/sys/vm/drop_caches
run mount -t ext2 "$DEV" /mnt/t
(cd / && md5sum -c /tmp/sums) || fail "files differ after unmount/remount"
run umount /mnt/t
log "filesystem survives sync/unmount/remount"

# Device reset: unbinding and rebinding virtio_blk resets the device, which
# QEMU turns into a vhost-user stop (GET_VRING_BASE) and a fresh start; the
# disk must come back with its data.
vdev=$(basename "$(readlink -f "$SYS/device")")
echo "$vdev" > /sys/bus/virtio/drivers/virtio_blk/unbind
i=0
while [ -b "$DEV" ] && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ ! -b "$DEV" ] || fail "$DEV still present after unbind"
echo "$vdev" > /sys/bus/virtio/drivers/virtio_blk/bind
wait_for "$DEV" 20 || fail "$DEV did not come back after rebind"
run mount -t ext2 "$DEV" /mnt/t
(cd / && md5sum -c /tmp/sums) || fail "files differ after a device reset"
run umount /mnt/t
log "device reset (unbind/bind): stop, restart, data intact"

# The whole-chain check: a host-made pattern at 32 MiB, flushed; the host
# reads it from the backing file after we power off.
if [ -n "${UNVME_VB_FINAL:-}" ]; then
    run dd if="$UNVME_VB_FINAL" of="$DEV" bs=1M seek=32 oflag=direct conv=fsync
    run sync
    run blockdev --flushbufs "$DEV"
    log "final pattern written and flushed"
fi
log "vhost-blk scenario passed"
