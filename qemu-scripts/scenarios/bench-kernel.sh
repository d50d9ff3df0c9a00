# bench-kernel: the guest half of bench/kernel (a benchmark, never a test).
# Needs run-guest.sh --with-fio and the unvme binary in the share
# (--file target/release/unvme=unvme).  Inside this one guest, on loopback:
#
#   kt  kernel nvmet-tcp target, null_blk (1 GiB, irqmode=0), 127.0.0.1:4420
#   ut  `unvme target --null 1G --reactors 1 --cpus 0`, 127.0.0.1:4421
#       (again with --spin-us 0 for the fio runs, tag ut0)
#   fio (io_uring, else libaio; O_DIRECT, 1 job, CPU 1) through the kernel
#       nvme-tcp host, and `unvme perf --cpus 1`, against each target:
#       4 KiB randread / randwrite at QD1 and QD32, BENCH_TIME s each.
#
# Results: one file per run in /share/results (fio JSON, unvme perf JSON),
# plus results/meta; then signal_ready so the host command copies them out.
# Env: BENCH_TIME (default 10), BENCH_QDS ("1 32"), BENCH_PATTERNS
# ("randread randwrite"), BENCH_TARGET_ARGS (extra `unvme target` options),
# BENCH_TARGET_CPU (unvme target reactor, default 0), BENCH_CLIENT_CPU (fio
# and unvme perf, default 1).
set -eu
# shellcheck source=SCRIPTDIR/../guest/lib.sh
. /share/lib.sh

T=${BENCH_TIME:-10}
QDS=${BENCH_QDS:-1 32}
PATTERNS=${BENCH_PATTERNS:-randread randwrite}
TCPU=${BENCH_TARGET_CPU:-0}   # unvme target reactor
CCPU=${BENCH_CLIENT_CPU:-1}   # fio, unvme perf
NQN_K=nqn.2024-11.io.unvme:bench-kernel
NQN_U=nqn.2024-11.io.unvme:bench-unvme
RES=/share/results
mkdir -p "$RES"

command -v fio >/dev/null || fail "no fio (run-guest.sh --with-fio)"
[ -f /share/unvme ] || fail "no /share/unvme (run-guest.sh --file target/release/unvme=unvme)"
cp /share/unvme /tmp/unvme
chmod +x /tmp/unvme
/tmp/unvme --version > "$RES/unvme-version" 2>&1 || { cat "$RES/unvme-version"; fail "unvme does not run in the guest"; }

# io_uring if this kernel and fio have it, else libaio.
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
    echo "cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "fio=$(fio --version) engine=$ENGINE"
    echo "time=$T"
    echo "target_args=${BENCH_TARGET_ARGS:-}"
    echo "target_cpu=$TCPU client_cpu=$CCPU"
} > "$RES/meta"
cat "$RES/meta"

connect() {  # NQN PORT: kernel host connects; prints the block device
    nvme connect -t tcp -a 127.0.0.1 -s "$2" -n "$1" >/dev/null || return 1
    _i=0
    while [ "$_i" -lt 100 ]; do
        _d=$(nvme_dev_for_nqn "$1" || true)
        [ -n "$_d" ] && [ -b "$_d" ] && { echo "$_d"; return 0; }
        sleep 0.1
        _i=$((_i + 1))
    done
    return 1
}

run_fio() {  # TAG DEV
    for pat in $PATTERNS; do
        for qd in $QDS; do
            log "fio $1 $pat qd$qd"
            fio --name=b --filename="$2" --ioengine="$ENGINE" --direct=1 --rw="$pat" --bs=4k \
                --iodepth="$qd" --numjobs=1 --cpus_allowed="$CCPU" --time_based --runtime="$T" --ramp_time=1 \
                --norandommap --randrepeat=0 --output-format=json --output="$RES/fio-$1-$pat-$qd.json" \
                > /dev/null 2>"$RES/fio-$1-$pat-$qd.err" || log "fio $1 $pat qd$qd failed: $(tail -n 3 "$RES/fio-$1-$pat-$qd.err")"
        done
    done
}

run_perf() {  # TAG PORT NQN
    for pat in $PATTERNS; do
        for qd in $QDS; do
            log "unvme perf $1 $pat qd$qd"
            timeout $((T + 60)) /tmp/unvme perf --addr 127.0.0.1 --port "$2" --nqn "$3" --nsid 1 \
                --pattern "$pat" --qd "$qd" --io-size 4096 --time "$T" --cpus "$CCPU" --json \
                > "$RES/perf-$1-$pat-$qd.out" 2>"$RES/perf-$1-$pat-$qd.err" \
                || log "unvme perf $1 $pat qd$qd failed: $(tail -n 3 "$RES/perf-$1-$pat-$qd.err")"
        done
    done
}

# ---- (a) kernel nvmet-tcp target on null_blk --------------------------------
run modprobe null_blk nr_devices=1 gb=1 bs=512 irqmode=0 queue_mode=2 hw_queue_depth=256 submit_queues=2
wait_for /dev/nullb0 10 || fail "no /dev/nullb0"
nvmet_subsys "$NQN_K" /dev/nullb0
nvmet_port 1 127.0.0.1 4420 "$NQN_K"
dev=$(connect "$NQN_K" 4420) || fail "kernel host cannot connect to the kernel target"
log "kernel target: $dev ($(cat /sys/class/nvme/*/queue_count 2>/dev/null | head -n1) queues incl. admin)"
run_fio kt "$dev"
run nvme disconnect -n "$NQN_K"
run_perf kt 4420 "$NQN_K"

# ---- (b) unvme target in the guest ---------------------------------------------
# start_ut EXTRA-ARGS...: unvme target on 127.0.0.1:4421 (reactor on $TCPU)
start_ut() {
    : > /tmp/ut.log
    # shellcheck disable=SC2086  # BENCH_TARGET_ARGS: extra words
    /tmp/unvme target --listen 127.0.0.1:4421 --nqn "$NQN_U" --null 1G --reactors 1 --cpus "$TCPU" \
        ${BENCH_TARGET_ARGS:-} "$@" --log info 2>/tmp/ut.log &
    ut_pid=$!
    wait_log /tmp/ut.log listening "$ut_pid" 10 || fail "unvme target did not start"
}
stop_ut() {
    kill -TERM "$ut_pid" 2>/dev/null || true
    wait "$ut_pid" 2>/dev/null || true
    cat /tmp/ut.log >> "$RES/unvme-target.log"
}
start_ut
dev=$(connect "$NQN_U" 4421) || { tail /tmp/ut.log; fail "kernel host cannot connect to unvme target"; }
log "unvme target: $dev"
run_fio ut "$dev"
run nvme disconnect -n "$NQN_U"
run_perf ut 4421 "$NQN_U"
stop_ut
# The same kernel-host runs against a reactor that never spins (--spin-us 0):
# a spinning reactor holds its vCPU, and kernel work queued there (the
# nvme-tcp host's io_work, softirqs deferred to ksoftirqd) waits for the
# scheduler tick to preempt it.
start_ut --spin-us 0
dev=$(connect "$NQN_U" 4421) || { tail /tmp/ut.log; fail "kernel host cannot connect to unvme target"; }
run_fio ut0 "$dev"
run nvme disconnect -n "$NQN_U"
stop_ut
nvmet_clear

log "done; handing the results to the host"
signal_ready
wait_host_done 120
