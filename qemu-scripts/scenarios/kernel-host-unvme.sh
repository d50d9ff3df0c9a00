# kernel-host-unvme: the guest kernel's nvme-tcp host against `unvme target`
# running on the host (reached as 10.0.2.2). The host side
# (qemu-scripts/tests/kernel-interop.sh) starts the target and passes
# UNVME_PORT, UNVME_NQN, UNVME_DIGEST (none|hdr|data|both), UNVME_QUEUES.
#
# Checks: discovery, connect with the requested digests and queue count,
# Identify data, a 64 MiB random pattern written with O_DIRECT in block
# sizes from 4 KiB (in-capsule) to 1 MiB (R2T) and read back, flush,
# discard and write-zeroes reading back as zeroes, an ext2 filesystem with
# files that survive unmount/disconnect/reconnect/remount, and disconnect.
set -eu
# shellcheck source=SCRIPTDIR/../guest/lib.sh
. /share/lib.sh

HOST=10.0.2.2
PORT=${UNVME_PORT:?}
NQN=${UNVME_NQN:?}
DIGEST=${UNVME_DIGEST:-none}
QUEUES=${UNVME_QUEUES:-1}

opts="-t tcp -a $HOST -s $PORT -n $NQN -i $QUEUES"
case $DIGEST in
    none) ;;
    hdr) opts="$opts --hdr-digest" ;;
    data) opts="$opts --data-digest" ;;
    both) opts="$opts --hdr-digest --data-digest" ;;
    *) fail "unknown UNVME_DIGEST $DIGEST" ;;
esac

run nvme discover -t tcp -a "$HOST" -s "$PORT" > /tmp/discover.txt
cat /tmp/discover.txt
grep -q "subnqn: *$NQN" /tmp/discover.txt || fail "discovery log does not list $NQN"
grep -q "subnqn: *nqn.2014-08.org.nvmexpress.discovery" /tmp/discover.txt || fail "discovery log does not list the discovery subsystem"

connect() {
    # shellcheck disable=SC2086
    run nvme connect $opts
    dev=""
    i=0
    while [ -z "$dev" ] && [ "$i" -lt 100 ]; do
        dev=$(nvme_dev_for_nqn "$NQN" || true)
        if [ -z "$dev" ] || [ ! -b "$dev" ]; then dev=""; sleep 0.1; fi
        i=$((i + 1))
    done
    [ -n "$dev" ] || { nvme list; fail "no block device for $NQN after connect"; }
    ctrl=$(ls -d /sys/class/nvme-fabrics/ctl/nvme* 2>/dev/null | head -n1)
    log "connected: $dev via ${ctrl##*/}"
}

connect
nvme list
cdev=/dev/${ctrl##*/}
run nvme id-ctrl "$cdev" > /tmp/idctrl.txt
grep -q "subnqn *: *$NQN" /tmp/idctrl.txt || { cat /tmp/idctrl.txt; fail "id-ctrl subnqn"; }
grep -q "^mn *: *unvme" /tmp/idctrl.txt || { cat /tmp/idctrl.txt; fail "id-ctrl model"; }
grep -q "^mdts *: *8" /tmp/idctrl.txt || { cat /tmp/idctrl.txt; fail "id-ctrl mdts"; }
run nvme id-ns "$dev" > /tmp/idns.txt
grep -q "in use" /tmp/idns.txt || { cat /tmp/idns.txt; fail "id-ns has no LBA format in use"; }
# the queue count the kernel actually opened
qcount=$(cat /sys/class/nvme/"${ctrl##*/}"/queue_count 2>/dev/null || echo "?")
log "controller queue_count (admin + I/O) = $qcount; digest=$DIGEST"
[ "$qcount" = "?" ] || [ "$qcount" -eq $((QUEUES + 1)) ] || fail "expected $QUEUES I/O queues, have $((qcount - 1))"
[ "$DIGEST" = none ] || dmesg | tail -n 50 | grep -qi "digest" || log "note: kernel did not log digests (older kernels are silent)"

sectors=$(cat /sys/block/"${dev#/dev/}"/size)
[ "$sectors" -ge $((128 * 2048)) ] || fail "namespace smaller than 128 MiB ($sectors sectors)"

# 64 MiB random pattern, written in four 16 MiB parts with different block sizes.
head -c $((64 * 1024 * 1024)) /dev/urandom > /tmp/pattern
part=0
for bs in 4096 65536 262144 1048576; do
    off=$((part * 16 * 1024 * 1024))
    run dd if=/tmp/pattern of="$dev" bs="$bs" count=$((16 * 1024 * 1024 / bs)) skip="$off" seek="$off" \
        iflag=skip_bytes oflag=seek_bytes,direct conv=notrunc
    part=$((part + 1))
done
run nvme flush "$dev"
for bs in 1048576 4096; do
    rm -f /tmp/readback
    run dd if="$dev" of=/tmp/readback bs="$bs" count=$((64 * 1024 * 1024 / bs)) iflag=direct
    cmp /tmp/pattern /tmp/readback || fail "read-back with bs=$bs differs from the written pattern"
done
log "64 MiB pattern written (4k/64k/256k/1M) and read back identical (1M and 4k reads)"
rm -f /tmp/readback

# Discard and write zeroes.
run blkdiscard -o 0 -l $((1024 * 1024)) "$dev"
dd if="$dev" bs=1M count=1 iflag=direct 2>/dev/null | cmp -s -n $((1024 * 1024)) - /dev/zero \
    || { dd if="$dev" bs=1M count=1 iflag=direct 2>/dev/null | od -A d -t x1 | head; fail "discarded range does not read back as zeroes"; }
run nvme write-zeroes "$dev" -s 4096 -c 255
dd if="$dev" bs=512 skip=4096 count=256 iflag=direct 2>/dev/null | cmp -s -n $((256 * 512)) - /dev/zero \
    || fail "write-zeroes range does not read back as zeroes"
dd if="$dev" bs=512 skip=4352 count=8 iflag=direct 2>/dev/null | cmp -s -n 4096 - /tmp/pattern 0 $((4352 * 512)) \
    || fail "write-zeroes touched blocks past its range"
log "discard and write-zeroes read back as zeroes; neighbours intact"

# Filesystem: files, sync, unmount, disconnect, reconnect, remount, verify.
run mke2fs -q "$dev"
mkdir -p /mnt/t
run mount -t ext2 "$dev" /mnt/t
for i in 1 2 3; do
    head -c $((i * 1024 * 1024 + 123)) /tmp/pattern > /mnt/t/file$i
done
md5sum /mnt/t/file* > /tmp/sums
run sync
run umount /mnt/t
run nvme disconnect -n "$NQN"
sleep 0.5
connect
run mount -t ext2 "$dev" /mnt/t
(cd / && md5sum -c /tmp/sums) || fail "files differ after reconnect"
run umount /mnt/t
log "filesystem survives unmount/disconnect/reconnect/remount"

run nvme disconnect -n "$NQN"
log "PASS"
