# shellcheck shell=sh
# vhost-bench: the guest half of bench/vhost (a benchmark, never a test).
# Needs run-guest.sh --with-fio --shared-memory and vhost-user-blk devices
# whose GET_ID serials name them (BENCH_DEVS="serial:tag ..."; a device
# whose serial matches none is tagged by BENCH_OTHER, for backends without
# a settable serial such as qemu-storage-daemon).
#
# For each device: fill the first BENCH_SIZE MiB (so reads hit data, not
# holes), then fio (io_uring, else libaio; O_DIRECT; 1 job) 4 KiB randread
# and randwrite at QD1 and QD32 over that range, BENCH_TIME s each.
# Results: /share/results/fio-TAG-PATTERN-QD.json and results/meta; then
# signal_ready so the host command copies them out.
set -eu
# shellcheck source=SCRIPTDIR/../guest/lib.sh
. /share/lib.sh

T=${BENCH_TIME:-10}
QDS=${BENCH_QDS:-1 32}
PATTERNS=${BENCH_PATTERNS:-randread randwrite}
SIZE_MB=${BENCH_SIZE:-256}
RES=/share/results
mkdir -p "$RES"

command -v fio >/dev/null || fail "no fio (run-guest.sh --with-fio)"
run modprobe virtio_blk
sleep 1

ENGINE=libaio
head -c 1048576 /dev/zero > /tmp/probe
if fio --name=probe --filename=/tmp/probe --ioengine=io_uring --rw=read --bs=4k --size=1M \
    --output=/dev/null > /dev/null 2>&1; then
    ENGINE=io_uring
fi
rm -f /tmp/probe
{
    echo "date=$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "kernel=$(uname -r)"
    echo "guest_cpus=$(nproc)"
    echo "fio=$(fio --version) engine=$ENGINE"
    echo "time=$T"
    echo "size_mb=$SIZE_MB"
} > "$RES/meta"
cat "$RES/meta"

tag_of() {  # DEV -> tag
    _s=$(cat "/sys/block/$1/serial" 2>/dev/null || true)
    for _m in $BENCH_DEVS; do
        [ "${_m%%:*}" = "$_s" ] && { echo "${_m#*:}"; return 0; }
    done
    echo "${BENCH_OTHER:-other}"
}

for sys in /sys/block/vd*; do
    dev=${sys##*/}
    tag=$(tag_of "$dev")
    log "$dev: $tag ($(blockdev --getsize64 "/dev/$dev") bytes, serial '$(cat "$sys/serial" 2>/dev/null || true)')"
    echo "$dev=$tag" >> "$RES/meta"
    dd if=/dev/urandom of=/tmp/fill bs=1M count=16 2>/dev/null
    i=0
    while [ "$i" -lt "$SIZE_MB" ]; do
        dd if=/tmp/fill of="/dev/$dev" bs=1M count=16 seek="$i" oflag=direct 2>/dev/null || fail "fill $dev"
        i=$((i + 16))
    done
    for pat in $PATTERNS; do
        for qd in $QDS; do
            log "fio $tag $pat qd$qd"
            fio --name=b --filename="/dev/$dev" --ioengine="$ENGINE" --direct=1 --rw="$pat" --bs=4k \
                --size="${SIZE_MB}M" --iodepth="$qd" --numjobs=1 --time_based --runtime="$T" --ramp_time=1 \
                --norandommap --randrepeat=0 --output-format=json --output="$RES/fio-$tag-$pat-$qd.json" \
                > /dev/null 2>"$RES/fio-$tag-$pat-$qd.err" \
                || log "fio $tag $pat qd$qd failed: $(tail -n 3 "$RES/fio-$tag-$pat-$qd.err")"
        done
    done
done
signal_ready
wait_host_done 120 || true
