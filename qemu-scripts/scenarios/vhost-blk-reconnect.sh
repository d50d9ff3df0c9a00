# shellcheck shell=sh
# vhost-blk-reconnect: the guest's virtio_blk disk is `unvme vhost-blk
# --file` on the host, attached through a chardev with reconnect-ms; the
# host kills the backend with SIGKILL while the guest writes, and starts it
# again on the same socket and file (qemu-scripts/tests/vhost-reconnect-host.sh
# answers the step). QEMU reconnects and restarts the rings.
#
# Checks: a flushed 16 MiB pattern; a 32 MiB O_DIRECT write (and, in a
# --with-fio guest, fio randwrite QD16 with verify) running across the kill
# and restart completes without error; afterwards both patterns read back
# intact.
set -eu
# shellcheck source=SCRIPTDIR/../guest/lib.sh
. /share/lib.sh

DEV=/dev/vda

run modprobe virtio_blk
wait_for "$DEV" 20 || fail "no $DEV"
signal_ready

dd if=/dev/urandom of=/tmp/a bs=1M count=16 2>/dev/null
dd if=/dev/urandom of=/tmp/b bs=1M count=32 2>/dev/null
run dd if=/tmp/a of="$DEV" bs=1M count=16 oflag=direct conv=fsync
dd if="$DEV" of=/tmp/r bs=1M count=16 iflag=direct 2>/dev/null
cmp /tmp/a /tmp/r || fail "pattern differs before the restart"
log "16 MiB pattern written, flushed and read back"

# Writes in flight when the backend dies: with fio (--with-fio guest),
# random writes at QD16 with verify over 48..112 MiB; and a dd of 16 KiB
# writes over 16..48 MiB.
if command -v fio >/dev/null 2>&1; then
    ( fio --name=rc --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
        --iodepth=16 --offset=48M --size=64M --verify=crc32c --verify_fatal=1 --do_verify=1 \
        --randrepeat=0 --output=/tmp/fio.out > /dev/null 2>&1
      echo $? > /tmp/fio.rc ) &
else
    echo 0 > /tmp/fio.rc
fi
( dd if=/tmp/b of="$DEV" bs=16k seek=$((16 * 64)) oflag=direct conv=fsync 2>/tmp/dd.err
  echo $? > /tmp/dd.rc ) &
ddpid=$!
sleep 0.3
guest_step restart 120 || fail "host could not restart the backend"
i=0
while [ ! -f /tmp/dd.rc ] && [ "$i" -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
[ -f /tmp/dd.rc ] || { kill "$ddpid" 2>/dev/null || true; fail "the write across the restart hangs"; }
[ "$(cat /tmp/dd.rc)" = 0 ] || { cat /tmp/dd.err; fail "the write across the restart failed"; }
log "32 MiB write across the backend restart completed"
i=0
while [ ! -f /tmp/fio.rc ] && [ "$i" -lt 1800 ]; do sleep 0.1; i=$((i + 1)); done
[ -f /tmp/fio.rc ] || fail "fio across the restart hangs"
[ "$(cat /tmp/fio.rc)" = 0 ] || { cat /tmp/fio.out; fail "fio verify across the restart failed"; }
command -v fio >/dev/null 2>&1 && log "fio randwrite QD16 + verify across the backend restart passed"
dd if="$DEV" of=/tmp/r bs=1M count=16 iflag=direct 2>/dev/null
cmp /tmp/a /tmp/r || fail "the flushed pattern changed across the backend restart"
dd if="$DEV" of=/tmp/r bs=1M skip=16 count=32 iflag=direct 2>/dev/null
cmp /tmp/b /tmp/r || fail "the pattern written across the restart reads back different"
log "both patterns intact after the backend restart"
