# shellcheck shell=sh
# vhost-blk-inflight: the guest's virtio_blk disk is `unvme vhost-blk`
# bridged to `unvme target` on the host, behind a chardev with reconnect-ms.
# Writes are made to be in flight inside the device when it dies: the host
# SIGSTOPs the target (step `stop`), the guest starts O_DIRECT writes, and
# the host SIGKILLs `unvme vhost-blk`, starts it again and SIGCONTs the
# target (step `kill`, qemu-scripts/tests/vhost-inflight-host.sh). QEMU
# reconnects and hands back its inflight region (INFLIGHT_SHMFD); the new
# device resubmits the requests the old one had taken (the host checks
# its log for that).
#
# Checks: the writes across the kill complete without error, and the
# pattern reads back intact.
set -eu
# shellcheck source=SCRIPTDIR/../guest/lib.sh
. /share/lib.sh

DEV=/dev/vda
JOBS=4
MB=8 # per job

run modprobe virtio_blk
wait_for "$DEV" 20 || fail "no $DEV"
signal_ready

dd if=/dev/urandom of=/tmp/p bs=1M count=$((JOBS * MB)) 2>/dev/null
guest_step stop 60 || fail "host could not stop the target"

# JOBS writers at once (several requests in flight), each over its own
# MB MiB; they stall on the stopped target.
j=0
while [ "$j" -lt "$JOBS" ]; do
    ( dd if=/tmp/p of="$DEV" bs=256k skip=$((j * MB * 4)) seek=$((j * MB * 4)) count=$((MB * 4)) \
        oflag=direct conv=fsync 2>/tmp/dd.$j.err
      echo $? > /tmp/dd.$j.rc ) &
    j=$((j + 1))
done
sleep 2
j=0
while [ "$j" -lt "$JOBS" ]; do
    [ ! -f /tmp/dd.$j.rc ] || { cat /tmp/dd.$j.err; fail "writer $j ended while the target was stopped"; }
    j=$((j + 1))
done
log "$JOBS writers stalled on the stopped target"

guest_step kill 120 || fail "host could not kill and restart the device"
j=0
while [ "$j" -lt "$JOBS" ]; do
    i=0
    while [ ! -f /tmp/dd.$j.rc ] && [ "$i" -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
    [ -f /tmp/dd.$j.rc ] || fail "writer $j hangs after the device restart"
    [ "$(cat /tmp/dd.$j.rc)" = 0 ] || { cat /tmp/dd.$j.err; fail "writer $j failed across the restart"; }
    j=$((j + 1))
done
log "all writes across the device kill and restart completed"
dd if="$DEV" of=/tmp/r bs=1M count=$((JOBS * MB)) iflag=direct 2>/dev/null
cmp /tmp/p /tmp/r || fail "the pattern written across the restart reads back different"
log "$((JOBS * MB)) MiB pattern intact after the restart"
