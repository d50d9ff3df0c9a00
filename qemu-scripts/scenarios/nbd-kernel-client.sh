# nbd-kernel-client: the guest kernel's NBD client (nbd-client + nbd.ko)
# against `unvme nbd` running on the host (reached as 10.0.2.2). The host
# side (qemu-scripts/tests/nbd-kernel.sh) starts the server and passes
# UNVME_NBD_PORT and UNVME_NBD_SIZE (bytes).
#
# Checks: attach (simple replies: the kernel client does not negotiate
# structured replies), size, a 16 MiB random pattern written and read back
# with O_DIRECT in block sizes 4 KiB .. 1 MiB, blkdiscard reading back as
# zeroes, an ext2 filesystem with files that survive sync, unmount,
# detach, re-attach and remount, and detach.
set -eu
# shellcheck source=SCRIPTDIR/../guest/lib.sh
. /share/lib.sh

HOST=10.0.2.2
PORT=${UNVME_NBD_PORT:?}
SIZE=${UNVME_NBD_SIZE:?}
DEV=/dev/nbd0

run modprobe nbd nbds_max=2
modprobe ext4 2>/dev/null || true

attach() {
    run nbd-client "$HOST" "$PORT" "$DEV" -b 4096
    i=0
    while [ "$(blockdev --getsize64 "$DEV" 2>/dev/null || echo 0)" = 0 ] && [ "$i" -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    got=$(blockdev --getsize64 "$DEV")
    [ "$got" = "$SIZE" ] || fail "size $got, expected $SIZE"
    log "attached $DEV ($got bytes)"
}
detach() {
    run nbd-client -d "$DEV"
}

attach

dd if=/dev/urandom of=/tmp/pattern bs=1M count=16 2>/dev/null
for bs in 4096 65536 1048576; do
    run dd if=/tmp/pattern of="$DEV" bs="$bs" count=$((16 * 1024 * 1024 / bs)) oflag=direct conv=fsync
    run dd if="$DEV" of=/tmp/readback bs="$bs" count=$((16 * 1024 * 1024 / bs)) iflag=direct
    cmp /tmp/pattern /tmp/readback || fail "read-back with bs=$bs differs from the written pattern"
done
log "16 MiB pattern round-trips with bs 4 KiB .. 1 MiB"

run blkdiscard -o 0 -l $((1024 * 1024)) "$DEV"
dd if="$DEV" bs=1M count=1 iflag=direct 2>/dev/null | cmp -s -n $((1024 * 1024)) - /dev/zero \
    || fail "discarded range does not read back as zeroes"
dd if="$DEV" bs=1M skip=1 count=1 iflag=direct 2>/dev/null | cmp -s -n $((1024 * 1024)) - /tmp/pattern 0 $((1024 * 1024)) \
    || fail "data after the discarded range changed"
log "blkdiscard reads back as zeroes, neighbours intact"

run mke2fs -q -b 4096 "$DEV"
mkdir -p /mnt/t
run mount -t ext2 "$DEV" /mnt/t
for i in 1 2 3 4; do
    dd if=/dev/urandom of=/mnt/t/file$i bs=64k count=$((i * 8)) 2>/dev/null
done
md5sum /mnt/t/file* > /tmp/sums
run sync
run umount /mnt/t
detach
attach
run mount -t ext2 "$DEV" /mnt/t
(cd / && md5sum -c /tmp/sums) || fail "files differ after detach/re-attach"
run umount /mnt/t
detach
log "filesystem survives sync/unmount/detach/re-attach/remount"
