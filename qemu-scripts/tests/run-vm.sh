#!/usr/bin/env bash
# run-vm.sh: tests the qemu-scripts/run-vm launcher.
#   1. --dry-run: the printed QEMU command line has guest RAM on a shared
#      memfd (share=on, the machine's memory-backend), the vhost-user chardev
#      on the device's socket (with reconnect-ms when asked), and
#      vhost-user-blk-pci with num-queues=2; the device command listens on
#      that socket with the same queue count; the image format is detected;
#      bad input (missing image/kernel/binary/socket, bad numbers, no disk)
#      fails with status 2 and a message.
#   2. A real boot under TCG: run-vm starts `unvme vhost-blk --ram 64M`
#      itself and boots the harness kernel + initramfs (qemu-scripts/build)
#      with the harness's 9p share and command line passed through run-vm
#      (--append, QEMU args after --). The guest scenario checks /dev/vda is
#      131072 sectors with the serial given to run-vm and 2 blk-mq queues,
#      writes and reads back a pattern with O_DIRECT dd and prints a marker.
#      The test asserts the marker, the exit marker and run-vm's status 0,
#      that the device served the requests (its log), and that the device
#      and its temp dir are gone afterwards.
#   3. SIGTERM to run-vm while the guest runs: status 130, QEMU and the
#      device stopped, temp dir removed.
# One guest at a time (flock on /tmp/unvme-qemu-guest.lock, as run-guest.sh).
set -euo pipefail

QS=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$(cd "$QS/.." && pwd)
RUNVM=$QS/run-vm
UNVME=${UNVME_BIN:-$ROOT/target/release/unvme}
LOCK_FILE=${UNVME_QEMU_LOCK:-/tmp/unvme-qemu-guest.lock}
BOOT_TIMEOUT=${UNVME_GUEST_TIMEOUT:-150}
SERIAL=unvme-run-vm-test
# The harness's kernel command line (run-guest.sh).
CMDLINE="console=ttyS0,115200 panic=-1 loglevel=4 mitigations=off random.trust_cpu=on 8250.nr_uarts=1"

log() { echo "run-vm test: $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
[[ -x $RUNVM ]] || fail "$RUNVM missing or not executable"
[[ -x $UNVME ]] || { log "FAIL: $UNVME missing (cargo build --release)"; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { log "FAIL: qemu-system-x86_64 missing"; exit 2; }

t_start=$(date +%s)
work=$(mktemp -d /tmp/unvme-run-vm-test.XXXXXX)
rv_pid=""
# shellcheck disable=SC2317  # invoked via trap
cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    if [[ -n $rv_pid ]] && kill -0 "$rv_pid" 2>/dev/null; then
        kill -TERM "$rv_pid" 2>/dev/null || true
        for ((i = 0; i < 300; i++)); do kill -0 "$rv_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$rv_pid" 2>/dev/null || true
        wait "$rv_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- 1. dry runs ----------------------------------------------------------------------
# dry NAME ARGS...: run-vm --dry-run ARGS; must exit 0. Sets $dev (the device
# command line, "" if none) and $qemu (the QEMU command line).
dev="" qemu=""
dry() {
    local name=$1 rc=0
    shift
    timeout -k 5 30 "$RUNVM" --dry-run "$@" >"$work/out" 2>"$work/err" </dev/null || rc=$?
    [[ $rc -eq 0 ]] || { cat "$work/err" >&2; fail "dry run '$name' exited with $rc"; }
    dev=$(grep -E '^[^#].* vhost-blk ' "$work/out" || true)
    qemu=$(grep -E '^qemu-system-x86_64 ' "$work/out" || true)
    [[ -n $qemu ]] || { cat "$work/out" >&2; fail "dry run '$name' printed no QEMU command"; }
}
has() {  # WHAT STRING: the QEMU line has STRING (as whole words)
    [[ " $qemu " == *" $2 "* ]] || { echo "$qemu" >&2; fail "$1: QEMU command lacks '$2'"; }
}
lacks() {
    [[ " $qemu " != *"$2"* ]] || { echo "$qemu" >&2; fail "$1: QEMU command has '$2'"; }
}
dev_has() {
    [[ " $dev " == *" $2 "* ]] || { echo "$dev" >&2; fail "$1: device command lacks '$2'"; }
}
# bad NAME PATTERN ARGS...: run-vm ARGS must exit 2 with PATTERN on stderr.
bad() {
    local name=$1 pat=$2 rc=0
    shift 2
    timeout -k 5 30 "$RUNVM" "$@" >"$work/out" 2>"$work/err" </dev/null || rc=$?
    [[ $rc -eq 2 ]] || { cat "$work/err" >&2; fail "'$name' exited with $rc, expected 2"; }
    grep -q -- "$pat" "$work/err" || { cat "$work/err" >&2; fail "'$name': no message matching '$pat'"; }
    [[ ! -s $work/out ]] || fail "'$name' printed a command anyway"
}

qemu-img create -q -f qcow2 "$work/disk.qcow2" 64M
truncate -s 16M "$work/disk.raw"

dry "image + started device" --image "$work/disk.qcow2" --vhost-args "--ram 1G" \
    --num-queues 2 --memory 1G --accel tcg
has memfd "-object memory-backend-memfd,id=mem,size=1G,share=on"
has memfd "-machine q35,memory-backend=mem"
has memfd "-m 1G"
has vhost "-device vhost-user-blk-pci,chardev=vblk0,num-queues=2"
has image "-drive file=$work/disk.qcow2,format=qcow2,if=none,id=boot0"
has image "-device virtio-blk-pci,drive=boot0,bootindex=0"
has accel "-accel tcg"
lacks chardev reconnect-ms
[[ -n $dev ]] || fail "no device command printed"
dev_has device "vhost-blk"
dev_has device "--num-queues 2"
dev_has device "--ram 1G"
dev_has device "--log info"
sock=$(sed -n 's/.* --socket \([^ ]*\) .*/\1/p' <<<"$dev")
[[ -n $sock ]] || fail "device command has no --socket: $dev"
has chardev "-chardev socket,id=vblk0,path=$sock"

dry "kernel + existing socket + reconnect" --kernel "$work/disk.raw" --initrd "$work/disk.raw" \
    --append "panic=-1" --socket "$work/ext.sock" --reconnect-ms 250 --num-queues 2 \
    --memory 512 --cpus 1 -- -no-reboot -name t1
[[ -z $dev ]] || fail "a device command printed for --socket alone: $dev"
has chardev "-chardev socket,id=vblk0,path=$work/ext.sock,reconnect-ms=250"
has vhost "-device vhost-user-blk-pci,chardev=vblk0,num-queues=2"
has memfd "-object memory-backend-memfd,id=mem,size=512M,share=on"
has kernel "-kernel $work/disk.raw"
has kernel "-append 'console=ttyS0 panic=-1'"
has smp "-smp 1"
has extra "-no-reboot -name t1"

dry "raw image on ide, device at a given socket" --image "$work/disk.raw" --image-if ide \
    --vhost-args "--addr 10.0.0.5 --port 4420 --nqn 'nqn.2024-11.io.unvme:a b'" \
    --socket "$work/mine.sock" --serial s1 --net user
has image "-drive file=$work/disk.raw,format=raw,if=none,id=boot0"
has image "-device ide-hd,drive=boot0,bootindex=0"
has vhost "-device vhost-user-blk-pci,chardev=vblk0,num-queues=1"
has chardev "-chardev socket,id=vblk0,path=$work/mine.sock"
has net "-nic user,model=virtio-net-pci"
dev_has device "--socket $work/mine.sock"
dev_has device "--addr 10.0.0.5 --port 4420 --nqn 'nqn.2024-11.io.unvme:a b'"
dev_has device "--serial s1"

bad "missing image" "image .* not found" --image "$work/nope.qcow2" --vhost-args "--ram 1G"
bad "missing kernel" "kernel .* not found" --kernel "$work/nope" --vhost-args "--ram 1G"
bad "--num-queues 0" "num-queues wants a positive integer" --image "$work/disk.raw" --vhost-args "--ram 1G" --num-queues 0
bad "--num-queues abc" "num-queues wants a positive integer" --image "$work/disk.raw" --vhost-args "--ram 1G" --num-queues abc
bad "--reconnect-ms x" "reconnect-ms wants a positive integer" --image "$work/disk.raw" --socket "$work/s" --reconnect-ms x --dry-run
bad "--memory 1X" "memory wants" --image "$work/disk.raw" --vhost-args "--ram 1G" --memory 1X
bad "--cpus -1" "cpus wants a positive integer" --image "$work/disk.raw" --vhost-args "--ram 1G" --cpus -1
bad "missing binary" "unvme binary .* not found" --image "$work/disk.raw" --vhost-args "--ram 1G" --unvme "$work/nope"
bad "missing socket" "no such socket" --image "$work/disk.raw" --socket "$work/nope.sock"
bad "no disk" "no unvme disk" --image "$work/disk.raw"
bad "nothing to boot" "nothing to boot" --vhost-args "--ram 1G"
bad "--socket inside --vhost-args" "must not set --socket" --image "$work/disk.raw" --vhost-args "--ram 1G --socket x"
bad "unbalanced quotes" "cannot split" --image "$work/disk.raw" --vhost-args "--ram '1G"
bad "unknown option" "unknown argument" --image "$work/disk.raw" --vhost-args "--ram 1G" --bogus
timeout -k 5 30 "$RUNVM" --help | grep -q -- '--vhost-args' || fail "--help does not describe --vhost-args"
log "PASS dry runs and argument errors"

# ---- 2, 3. real boots -----------------------------------------------------------------
timeout -k 10 900 "$QS/build-guest.sh" >&2 || fail "guest build (qemu-scripts/build-guest.sh)"
[[ -s $QS/build/vmlinux && -s $QS/build/initramfs.cpio ]] || fail "no guest kernel/initramfs in $QS/build"

exec 9>>"$LOCK_FILE"
if ! flock -n 9; then
    log "another guest is running; waiting up to 600s for $LOCK_FILE"
    flock -w 600 9 || fail "timed out waiting for the other guest ($LOCK_FILE)"
fi

share=$work/share
mkdir -p "$share"
chmod 0755 "$share"
cp "$QS/guest/lib.sh" "$share/lib.sh"
printf 'export RV_SERIAL=%s\n' "$SERIAL" > "$share/env.sh"
mkdir -p "$QS/build/logs"

# boot NAME [RUN-VM ARGS...]: start run-vm in the background (pid rv_pid),
# console in $work/NAME.console, run-vm's stderr in $work/NAME.err.
boot() {
    local name=$1
    shift
    "$RUNVM" --kernel "$QS/build/vmlinux" --initrd "$QS/build/initramfs.cpio" --append "$CMDLINE" \
        --accel tcg --memory 1G --cpus 2 --num-queues 2 --serial "$SERIAL" \
        --vhost-args "--ram 64M" --vhost-log "$work/$name.vb.log" "$@" \
        -- -no-reboot \
        -fsdev "local,id=fs0,path=$share,security_model=none" \
        -device 'virtio-9p-pci,fsdev=fs0,mount_tag=share' \
        </dev/null >"$work/$name.console" 2>"$work/$name.err" &
    rv_pid=$!
}
show_logs() {  # NAME
    local f
    for f in "$work/$1.console" "$work/$1.err" "$work/$1.vb.log"; do
        [[ -e $f ]] || continue
        echo "---- last 30 lines of $(basename "$f") ----" >&2
        tail -n 30 "$f" | tr -d '\r' >&2
    done
    echo "----" >&2
    cp "$work/$1.console" "$QS/build/logs/run-vm-$1.console.log" 2>/dev/null || true
}
# wait_rv NAME LIMIT_S: wait for run-vm to exit; its status in $rv_rc.
wait_rv() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        kill -0 "$rv_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$rv_pid" 2>/dev/null; then
        show_logs "$1"
        fail "$1: run-vm still running after ${2}s"
    fi
    rv_rc=0
    wait "$rv_pid" || rv_rc=$?
    rv_pid=""
}
# started_pids NAME: the device pid, its socket and the QEMU pid run-vm reported.
started_pids() {
    dev_pid=$(sed -n 's/^run-vm: unvme vhost-blk pid \([0-9]*\) listening on \(.*\) (log .*/\1/p' "$work/$1.err")
    dev_sock=$(sed -n 's/^run-vm: unvme vhost-blk pid \([0-9]*\) listening on \(.*\) (log .*/\2/p' "$work/$1.err")
    qemu_pid=$(sed -n 's/^run-vm: qemu pid \([0-9]*\) .*/\1/p' "$work/$1.err")
    [[ -n $dev_pid && -n $dev_sock && -n $qemu_pid ]] || { show_logs "$1"; fail "$1: run-vm did not report the device and QEMU pids"; }
}
# all_gone NAME: the device, QEMU and the private temp dir are gone.
all_gone() {
    local p
    for p in "$dev_pid" "$qemu_pid"; do
        if kill -0 "$p" 2>/dev/null; then
            ps -o pid,args -p "$p" >&2 || true
            fail "$1: pid $p still running after run-vm exited"
        fi
    done
    [[ ! -e $(dirname "$dev_sock") ]] || fail "$1: run-vm left its temp dir $(dirname "$dev_sock")"
}

# 2. The guest uses the disk.
cat > "$share/scenario.sh" <<'EOF'
set -eu
. /share/lib.sh
run modprobe virtio_blk
wait_for /dev/vda 20 || fail "no /dev/vda"
size=$(cat /sys/block/vda/size)
[ "$size" = 131072 ] || fail "/dev/vda has $size sectors, expected 131072 (64 MiB)"
serial=$(cat /sys/block/vda/serial 2>/dev/null || true)
[ "$serial" = "$RV_SERIAL" ] || fail "/dev/vda serial '$serial', expected '$RV_SERIAL'"
set -- /sys/block/vda/mq/*
[ $# = 2 ] || fail "$# blk-mq queues, expected 2"
queues=$#
dd if=/dev/urandom of=/tmp/pattern bs=64k count=64 2>/dev/null
run dd if=/tmp/pattern of=/dev/vda bs=64k seek=100 oflag=direct conv=fsync
run dd if=/dev/vda of=/tmp/readback bs=64k skip=100 count=64 iflag=direct
cmp /tmp/pattern /tmp/readback || fail "read-back differs from the pattern written"
echo "RUN-VM-DISK-OK size=$size serial=$serial queues=$queues"
EOF
t0=$(date +%s)
boot disk
wait_rv disk "$BOOT_TIMEOUT"
dt=$(($(date +%s) - t0))
console=$(tr -d '\r' < "$work/disk.console")
[[ $rv_rc -eq 0 ]] || { show_logs disk; fail "disk: run-vm exited with $rv_rc"; }
grep -q "^RUN-VM-DISK-OK size=131072 serial=$SERIAL queues=2\$" <<<"$console" \
    || { show_logs disk; fail "disk: no RUN-VM-DISK-OK marker on the console"; }
grep -q '^UNVME-SCENARIO-EXIT=0$' <<<"$console" \
    || { show_logs disk; fail "disk: no UNVME-SCENARIO-EXIT=0 on the console"; }
# The device logs per-queue request counts when QEMU disconnects.
grep -Eq 'vhost-blk queue [0-9]+: [0-9]+ requests zero-copy, [0-9]+ copied' "$work/disk.vb.log" \
    || { show_logs disk; fail "disk: the device logged no request counts"; }
served=$(grep -Eo 'queue [0-9]+: [0-9]+ requests zero-copy, [0-9]+ copied' "$work/disk.vb.log" \
    | awk '{ n += $3 + $6 } END { print n + 0 }')
[[ $served -gt 0 ]] || { show_logs disk; fail "disk: the device served no requests"; }
! grep -q panicked "$work/disk.vb.log" || { show_logs disk; fail "disk: the device panicked"; }
started_pids disk
all_gone disk
log "PASS boot: the guest used the unvme disk ($served requests; ${dt}s)"

# 3. SIGTERM stops everything.
cat > "$share/scenario.sh" <<'EOF'
set -eu
. /share/lib.sh
modprobe virtio_blk
wait_for /dev/vda 20 || fail "no /dev/vda"
echo "RUN-VM-WAITING"
sleep 600
EOF
boot term
for ((i = 0; i < BOOT_TIMEOUT * 10; i++)); do
    grep -q 'RUN-VM-WAITING' "$work/term.console" 2>/dev/null && break
    kill -0 "$rv_pid" 2>/dev/null || break
    sleep 0.1
done
grep -q 'RUN-VM-WAITING' "$work/term.console" || { show_logs term; fail "term: the guest did not come up"; }
started_pids term
if ! kill -0 "$qemu_pid" 2>/dev/null || ! kill -0 "$dev_pid" 2>/dev/null; then
    show_logs term
    fail "term: QEMU or the device is not running"
fi
kill -TERM "$rv_pid"
wait_rv term 30
[[ $rv_rc -eq 130 ]] || { show_logs term; fail "term: run-vm exited with $rv_rc after SIGTERM, expected 130"; }
all_gone term
log "PASS SIGTERM: QEMU, device and temp dir gone"

log "all passed ($(($(date +%s) - t_start))s)"
