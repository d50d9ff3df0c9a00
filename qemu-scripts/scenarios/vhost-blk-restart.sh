# shellcheck shell=sh
# vhost-blk-restart: the guest's virtio_blk disk is `unvme vhost-blk`
# (--kato-ms 2000 --ctrl-loss-tmo 5 --reconnect-delay 0.5) bridged over
# NVMe/TCP to `unvme target --file` on the host; the host faults the target
# (qemu-scripts/tests/vhost-restart-host.sh answers the steps). A
# --with-fio guest.
#
# Checks:
#   blip  fio randwrite QD16 + verify (libaio, crc32c, verify_fatal) and a
#         32 MiB O_DIRECT dd run while the host SIGKILLs the target and
#         restarts it 1 s later: both complete without error, the patterns
#         read back intact (the device holds and resubmits the requests)
#   stop  fio verify while the host SIGSTOPs the target for 4 s (past the
#         keep-alive) and SIGCONTs it: no error
#   loss  the host SIGKILLs the target and does not restart it: a read and a
#         write fail with an error, the first after about ctrl-loss-tmo
#         (5 s; bounded, no hang); after the restart I/O resumes, every
#         flushed pattern is intact, and a new one round-trips.
# The longest stall is logged for each.
set -eu
# shellcheck source=SCRIPTDIR/../guest/lib.sh
. /share/lib.sh

DEV=/dev/vda
run modprobe virtio_blk
wait_for "$DEV" 20 || fail "no $DEV"
command -v fio >/dev/null 2>&1 || fail "no fio in the guest (boot it --with-fio)"
signal_ready
now() { cut -d' ' -f1 /proc/uptime; }
secs() { awk "BEGIN { printf \"%.2f\", $2 - $1 }"; }

dd if=/dev/urandom of=/tmp/a bs=1M count=16 2>/dev/null
dd if=/dev/urandom of=/tmp/b bs=1M count=32 2>/dev/null
run dd if=/tmp/a of="$DEV" bs=1M count=16 oflag=direct conv=fsync
dd if="$DEV" of=/tmp/r bs=1M count=16 iflag=direct 2>/dev/null
cmp /tmp/a /tmp/r || fail "pattern differs before the faults"
log "16 MiB pattern written, flushed and read back"

# fio_bg NAME OFFSET SIZE: fio randwrite QD16 + verify in the background;
# its status goes to /tmp/NAME.rc, its report to /tmp/NAME.out.
fio_bg() {
    rm -f "/tmp/$1.rc"
    ( fio --name="$1" --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
        --iodepth=16 --offset="$2" --size="$3" --verify=crc32c --verify_fatal=1 --do_verify=1 \
        --randrepeat=0 --output-format=json --output="/tmp/$1.out" > /dev/null 2>&1
      echo $? > "/tmp/$1.rc" ) &
}
# fio_wait NAME: wait (bounded) for fio_bg NAME, fail on any error; logs
# the longest write latency fio saw (the stall).
fio_wait() {
    _i=0
    while [ ! -f "/tmp/$1.rc" ] && [ "$_i" -lt 3000 ]; do sleep 0.1; _i=$((_i + 1)); done
    [ -f "/tmp/$1.rc" ] || fail "$1: fio across the fault hangs"
    [ "$(cat "/tmp/$1.rc")" = 0 ] || { cat "/tmp/$1.out"; fail "$1: fio verify across the fault failed"; }
    grep -q '"error" *: *0' "/tmp/$1.out" || { cat "/tmp/$1.out"; fail "$1: fio reported an error"; }
    _max=$(tr -d ' \n' < "/tmp/$1.out" | sed -n 's/.*"write":{[^}]*"clat_ns":{"min":[0-9]*,"max":\([0-9]*\).*/\1/p')
    log "$1: fio randwrite QD16 + verify passed; longest write ${_max:-?} ns"
}

# ---- blip: kill -9 and restart after 1 s, under fio verify and dd ----------
fio_bg blip 48M 64M
rm -f /tmp/dd.rc
( dd if=/tmp/b of="$DEV" bs=16k seek=$((16 * 64)) oflag=direct conv=fsync 2>/tmp/dd.err
  echo $? > /tmp/dd.rc ) &
sleep 0.5
t0=$(now)
guest_step blip 120 || fail "host could not kill and restart the target"
i=0
while [ ! -f /tmp/dd.rc ] && [ "$i" -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
[ -f /tmp/dd.rc ] || fail "blip: the dd write across the restart hangs"
[ "$(cat /tmp/dd.rc)" = 0 ] || { cat /tmp/dd.err; fail "blip: the dd write across the restart failed"; }
log "blip: 32 MiB dd write across the kill and restart completed ($(secs "$t0" "$(now)") s after the kill)"
fio_wait blip
dd if="$DEV" of=/tmp/r bs=1M count=16 iflag=direct 2>/dev/null
cmp /tmp/a /tmp/r || fail "blip: the flushed pattern changed"
dd if="$DEV" of=/tmp/r bs=1M skip=16 count=32 iflag=direct 2>/dev/null
cmp /tmp/b /tmp/r || fail "blip: the dd pattern written across the restart reads back different"
log "blip: both patterns intact"

# ---- stop: SIGSTOP for 4 s (keep-alive 2 s), then SIGCONT, under fio ------
fio_bg stop 128M 32M
sleep 0.5
guest_step stop 120 || fail "host could not stop and continue the target"
fio_wait stop

# ---- loss: kill without restart; I/O fails after ~ctrl-loss-tmo ----------
guest_step kill 60 || fail "host could not kill the target"
t0=$(now)
if timeout 60 dd if="$DEV" of=/dev/null bs=4096 count=1 skip=1000 iflag=direct 2>/dev/null; then
    fail "loss: a read succeeded with the target gone"
fi
t1=$(now)
if timeout 60 dd if=/tmp/a of="$DEV" bs=4096 count=1 seek=5000 oflag=direct 2>/dev/null; then
    fail "loss: a write succeeded with the target gone"
fi
t2=$(now)
r=$(secs "$t0" "$t1")
w=$(secs "$t1" "$t2")
awk "BEGIN { exit !($r >= 2 && $r < 30) }" || fail "loss: the read failed after $r s, want ~5 (ctrl-loss-tmo)"
awk "BEGIN { exit !($w < 30) }" || fail "loss: the write failed after $w s"
log "loss: with the target gone, the read failed after $r s (ctrl-loss-tmo 5), the write after $w s"

guest_step restart 60 || fail "host could not restart the target"
t0=$(now)
i=0
until dd if="$DEV" of=/tmp/r bs=1M count=16 iflag=direct 2>/dev/null; do
    i=$((i + 1))
    [ "$i" -lt 60 ] || fail "I/O did not resume within 30 s of the restart"
    sleep 0.5
done
log "loss: I/O resumed $(secs "$t0" "$(now)") s after the restart ($i failed tries)"
cmp /tmp/a /tmp/r || fail "the flushed pattern changed across the target restart"
dd if=/dev/urandom of=/tmp/c bs=1M count=16 2>/dev/null
run dd if=/tmp/c of="$DEV" bs=1M count=16 seek=16 oflag=direct conv=fsync
dd if="$DEV" of=/tmp/r bs=1M count=16 skip=16 iflag=direct 2>/dev/null
cmp /tmp/c /tmp/r || fail "a new pattern differs after the restart"
log "flushed data intact and new I/O works after the target restart"
