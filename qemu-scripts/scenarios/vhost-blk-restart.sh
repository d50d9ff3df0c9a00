# shellcheck shell=sh
# vhost-blk-restart: the guest's virtio_blk disk is `unvme vhost-blk`
# bridged over NVMe/TCP to `unvme target --file` on the host; the host kills
# the target (SIGKILL) and later restarts it on the same port and file
# (qemu-scripts/tests/vhost-restart-host.sh answers the steps).
#
# Checks: a flushed 16 MiB pattern; while the target is gone, I/O fails with
# an error within a bounded time (no hang) and the device keeps answering;
# after the restart I/O works again (the device's queue reconnects), the
# flushed pattern is intact, and a new pattern round-trips.
set -eu
# shellcheck source=SCRIPTDIR/../guest/lib.sh
. /share/lib.sh

DEV=/dev/vda
run modprobe virtio_blk
wait_for "$DEV" 20 || fail "no $DEV"
signal_ready

dd if=/dev/urandom of=/tmp/a bs=1M count=16 2>/dev/null
run dd if=/tmp/a of="$DEV" bs=1M count=16 oflag=direct conv=fsync
dd if="$DEV" of=/tmp/r bs=1M count=16 iflag=direct 2>/dev/null
cmp /tmp/a /tmp/r || fail "pattern differs before the restart"
log "16 MiB pattern written, flushed and read back"

guest_step kill 60 || fail "host could not kill the target"
t0=$(cut -d. -f1 /proc/uptime)
if timeout 60 dd if="$DEV" of=/dev/null bs=4096 count=1 skip=1000 iflag=direct 2>/dev/null; then
    fail "a read succeeded with the target gone"
fi
if timeout 60 dd if=/tmp/a of="$DEV" bs=4096 count=1 seek=5000 oflag=direct 2>/dev/null; then
    fail "a write succeeded with the target gone"
fi
t1=$(cut -d. -f1 /proc/uptime)
[ $((t1 - t0)) -lt 50 ] || fail "failing I/O took $((t1 - t0)) s"
log "with the target gone, reads and writes fail in $((t1 - t0)) s"

guest_step restart 60 || fail "host could not restart the target"
i=0
until dd if="$DEV" of=/tmp/r bs=1M count=16 iflag=direct 2>/dev/null; do
    i=$((i + 1))
    [ "$i" -lt 60 ] || fail "I/O did not resume within 30 s of the restart"
    sleep 0.5
done
log "I/O resumed after $i retries"
cmp /tmp/a /tmp/r || fail "the flushed pattern changed across the target restart"
dd if=/dev/urandom of=/tmp/b bs=1M count=16 2>/dev/null
run dd if=/tmp/b of="$DEV" bs=1M count=16 seek=16 oflag=direct conv=fsync
dd if="$DEV" of=/tmp/r bs=1M count=16 skip=16 iflag=direct 2>/dev/null
cmp /tmp/b /tmp/r || fail "a new pattern differs after the restart"
log "flushed data intact and new I/O works after the target restart"
