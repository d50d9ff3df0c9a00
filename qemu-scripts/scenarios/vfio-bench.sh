# vfio-bench: the guest half of bench/vfio (a benchmark, never a test).
# Needs run-guest.sh --with-fio, q35 + intel-iommu + an emulated
# `-device nvme,serial=deadbeef` (bench/vfio sets that up), /share/unvme and
# /share/vfio-bind.sh. On one emulated NVMe controller, random I/O of
# BENCH_IO_SIZE bytes (default 4 KiB):
#
#   kd  fio (io_uring, else libaio; O_DIRECT) on the kernel nvme driver's
#       namespace — no network at all
#   kt  `unvme perf` -> kernel nvmet-tcp (127.0.0.1:4421) exporting that
#       namespace -> kernel nvme driver
#   uv  `unvme perf` -> `unvme target --vfio` (127.0.0.1:4420), the device
#       bound to vfio-pci and driven from user space (zero-copy: the target
#       receives and sends data in the device's DMA buffer pool)
#   uc  the same with the pool off (UNVME_VFIO_DMA_POOL=0): data copied
#       between the target's heap buffers and the queue's DMA pages
#
# Clients run on vCPU 1 (BENCH_CLIENT_CPU), the unvme target's reactor on
# vCPU 0. For each run the guest's busy CPU time (user+nice+system+irq+
# softirq jiffies of all vCPUs, /proc/stat) is recorded beside the result.
# Results in /share/results; then signal_ready so the host copies them.
# Env: BENCH_TIME (default 5), BENCH_QDS ("1 32"), BENCH_PATTERNS
# ("randread randwrite"), BENCH_IO_SIZE (4096).
set -eu
# shellcheck source=SCRIPTDIR/../guest/lib.sh
. /share/lib.sh

T=${BENCH_TIME:-5}
QDS=${BENCH_QDS:-1 32}
PATTERNS=${BENCH_PATTERNS:-randread randwrite}
IOS=${BENCH_IO_SIZE:-4096}
TCPU=${BENCH_TARGET_CPU:-0}
CCPU=${BENCH_CLIENT_CPU:-1}
SERIAL=deadbeef
NQN_K=nqn.2024-11.io.unvme:bench-vfio-kernel
NQN_U=nqn.2024-11.io.unvme:default
RES=/share/results
U=/tmp/unvme
mkdir -p "$RES"

command -v fio >/dev/null || fail "no fio (run-guest.sh --with-fio)"
cp /share/unvme "$U"
chmod 755 "$U"

ADDR=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/class")" = 0x010802 ] && { ADDR=$(basename "$d"); break; }
done
[ -n "$ADDR" ] || fail "no NVMe PCI device"
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
[ -n "$KDEV" ] || fail "no kernel block device for $ADDR"

head -c 1048576 /dev/zero > /tmp/probe
ENGINE=libaio
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
    echo "io_size=$IOS"
    echo "device=$ADDR $KDEV"
    echo "hz=100"
    echo "clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
} > "$RES/meta"
cat "$RES/meta"

busy() { awk '/^cpu /{ print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }

run_fio() {  # TAG DEV
    for pat in $PATTERNS; do
        for qd in $QDS; do
            log "fio $1 $pat qd$qd"
            b0=$(busy)
            fio --name=b --filename="$2" --ioengine="$ENGINE" --direct=1 --rw="$pat" --bs="$IOS" \
                --iodepth="$qd" --numjobs=1 --cpus_allowed="$CCPU" --time_based --runtime="$T" \
                --norandommap --randrepeat=0 --size=128M --output-format=json \
                --output="$RES/fio-$1-$pat-$qd.json" > /dev/null 2>"$RES/fio-$1-$pat-$qd.err" \
                || log "fio $1 $pat qd$qd failed: $(tail -n 3 "$RES/fio-$1-$pat-$qd.err")"
            echo $(($(busy) - b0)) > "$RES/cpu-$1-$pat-$qd"
        done
    done
}

run_perf() {  # TAG PORT NQN
    for pat in $PATTERNS; do
        for qd in $QDS; do
            log "unvme perf $1 $pat qd$qd"
            b0=$(busy)
            timeout $((T + 60)) "$U" perf --addr 127.0.0.1 --port "$2" --nqn "$3" --nsid 1 \
                --pattern "$pat" --qd "$qd" --io-size "$IOS" --time "$T" --cpus "$CCPU" \
                --range 128M --json > "$RES/perf-$1-$pat-$qd.out" 2>"$RES/perf-$1-$pat-$qd.err" \
                || log "unvme perf $1 $pat qd$qd failed: $(tail -n 3 "$RES/perf-$1-$pat-$qd.err")"
            echo $(($(busy) - b0)) > "$RES/cpu-$1-$pat-$qd"
        done
    done
}

# ---- kd: the kernel nvme driver, locally ------------------------------------
run_fio kd "$KDEV"

# ---- kt: kernel nvmet-tcp exporting the kernel namespace ---------------------
nvmet_subsys "$NQN_K" "$KDEV"
nvmet_port 1 127.0.0.1 4421 "$NQN_K"
sleep 0.5
run_perf kt 4421 "$NQN_K"
nvmet_clear

# ---- uv / uc: unvme target --vfio, DMA buffer pool on / off ------------------
run sh /share/vfio-bind.sh "$ADDR"
run_unvme() {  # TAG UNVME_VFIO_DMA_POOL-or-empty
    # --spin-us: see scenarios/vfio-nvme.sh. The log is emptied first: the
    # last run's "listening" must not pass for this one's.
    : > /tmp/ut.log
    env ${2:+UNVME_VFIO_DMA_POOL=$2} "$U" target --vfio "$ADDR" --listen 127.0.0.1:4420 \
        --reactors 1 --cpus "$TCPU" --spin-us 2000000 --log info 2>/tmp/ut.log &
    ut_pid=$!
    wait_log /tmp/ut.log listening "$ut_pid" 30 || fail "unvme target --vfio did not start"
    run_perf "$1" 4420 "$NQN_U"
    kill -TERM "$ut_pid"
    wait "$ut_pid" || true
    cp /tmp/ut.log "$RES/unvme-target-$1.log"
    grep "requests zero-copy" /tmp/ut.log || true
}
run_unvme uv ""
run_unvme uc 0
run sh /share/vfio-bind.sh --unbind "$ADDR"

log "done; handing the results to the host"
signal_ready
wait_host_done 120
