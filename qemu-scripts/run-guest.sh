#!/usr/bin/env bash
# run-guest.sh: boot the unvme QEMU guest (TCG) and run one scenario in it.
# See qemu-scripts/README.md.  Exit status: the scenario's (or the host
# command's) exit status; 124 timeout; 125 no exit marker; 2 usage/setup error.
set -euo pipefail

QS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=${UNVME_QEMU_BUILD:-$QS/build}
LOCK_FILE=${UNVME_QEMU_LOCK:-/tmp/unvme-qemu-guest.lock}

usage() {
    cat <<'USAGE'
usage: run-guest.sh [options] SCENARIO.sh [-- EXTRA-QEMU-ARGS...]

  SCENARIO.sh            guest script, run with `sh` as /share/scenario.sh
  --file PATH[=NAME]     copy a file/dir into the share (/share/NAME); repeatable
  --env KEY=VALUE        exported to the scenario (via /share/env.sh); repeatable
  --hostfwd RULE         QEMU user-net forward, e.g. tcp:127.0.0.1:14420-:4420
                         (host side must be 127.0.0.1; empty means 127.0.0.1)
  --host-cmd CMD         run CMD (bash -c) on the host once the guest calls
                         signal_ready; its status goes to /share/host-done
  --host-timeout S       limit for --host-cmd (default 120)
  --memory SIZE          guest RAM (default 1G)
  --cpus N               guest vCPUs (default 2)
  --machine TYPE[,OPTS]  QEMU machine (default pc; e.g. q35,kernel-irqchip=split)
  --accel ACCEL          QEMU accelerator (default tcg)
  --append ARGS          extra kernel command line (e.g. intel_iommu=on)
  --with-fio             boot the initramfs that also has fio (slower boot)
  --shared-memory        back guest RAM by a shared memfd (vhost-user needs it)
  --qemu-arg ARG         extra QEMU argument; repeatable (or put them after --)
  --timeout S            kill the guest after S seconds (default 300)
  --log FILE             guest console log (default build/logs/NAME.log)
  --lock-wait S          wait up to S s for another guest to finish (default 600)
  --keep-share           do not delete the share dir (debugging)
  -v, --verbose          also copy the guest console to stderr
  -h, --help
The host command sees UNVME_SHARE (the share dir) and UNVME_GUEST_LOG.
USAGE
}

die() { echo "run-guest: error: $*" >&2; exit 2; }
log() { echo "run-guest: $*" >&2; }

scenario="" host_cmd="" host_timeout=120 memory=1G cpus=2 machine=pc accel=tcg
append="" with_fio=0 shared_mem=0 timeout_s=300 logfile="" lock_wait=600 keep_share=0 verbose=0
files=() envs=() fwds=() qemu_extra=()

need() { [[ $# -ge 2 && -n $2 ]] || die "option $1 needs an argument"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --file) need "$@"; files+=("$2"); shift 2 ;;
        --env) need "$@"; [[ $2 == [A-Za-z_]*=* ]] || die "--env wants KEY=VALUE, got '$2'"; envs+=("$2"); shift 2 ;;
        --hostfwd) need "$@"; fwds+=("$2"); shift 2 ;;
        --host-cmd) need "$@"; host_cmd=$2; shift 2 ;;
        --host-timeout) need "$@"; host_timeout=$2; shift 2 ;;
        --memory) need "$@"; memory=$2; shift 2 ;;
        --cpus) need "$@"; cpus=$2; shift 2 ;;
        --machine) need "$@"; machine=$2; shift 2 ;;
        --accel) need "$@"; accel=$2; shift 2 ;;
        --append) need "$@"; append=$2; shift 2 ;;
        --with-fio) with_fio=1; shift ;;
        --shared-memory) shared_mem=1; shift ;;
        --qemu-arg) need "$@"; qemu_extra+=("$2"); shift 2 ;;
        --timeout) need "$@"; timeout_s=$2; shift 2 ;;
        --log) need "$@"; logfile=$2; shift 2 ;;
        --lock-wait) need "$@"; lock_wait=$2; shift 2 ;;
        --keep-share) keep_share=1; shift ;;
        -v|--verbose) verbose=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; qemu_extra+=("$@"); break ;;
        -*) usage >&2; die "unknown option $1" ;;
        *) [[ -z $scenario ]] || die "more than one scenario given ($scenario, $1)"; scenario=$1; shift ;;
    esac
done
[[ -n $scenario ]] || { usage >&2; die "no scenario given"; }
[[ -f $scenario ]] || die "scenario $scenario not found"
for n in "$timeout_s" "$host_timeout" "$cpus" "$lock_wait"; do
    [[ $n =~ ^[0-9]+$ && $n -gt 0 ]] || die "not a positive integer: '$n'"
done
[[ $memory =~ ^[0-9]+[MG]?$ ]] || die "--memory wants e.g. 1G or 512M, got '$memory'"

command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found; run qemu-scripts/install-deps.sh"
initrd=$BUILD/initramfs.cpio
[[ $with_fio -eq 1 ]] && initrd=$BUILD/initramfs-fio.cpio
[[ -s $BUILD/vmlinux && -s $initrd ]] || die "no guest in $BUILD; run qemu-scripts/build-guest.sh"

# hostfwd: only ever bind host loopback.
netdev=user,id=n0
for r in "${fwds[@]}"; do
    [[ $r =~ ^(tcp|udp):([^:]*):([0-9]+)-([0-9.]*):([0-9]+)$ ]] \
        || die "bad --hostfwd '$r' (want tcp:127.0.0.1:HOSTPORT-:GUESTPORT)"
    haddr=${BASH_REMATCH[2]}
    [[ -z $haddr || $haddr == 127.0.0.1 ]] || die "--hostfwd must bind 127.0.0.1, not '$haddr'"
    netdev+=",hostfwd=${BASH_REMATCH[1]}:127.0.0.1:${BASH_REMATCH[3]}-${BASH_REMATCH[4]}:${BASH_REMATCH[5]}"
done

name=$(basename "$scenario" .sh)
if [[ -z $logfile ]]; then
    mkdir -p "$BUILD/logs"
    logfile=$BUILD/logs/$name.log
fi
mkdir -p "$(dirname "$logfile")"
logfile=$(cd "$(dirname "$logfile")" && pwd)/$(basename "$logfile")
qemu_err=$logfile.qemu-stderr

# ---- cleanup: everything we start is stopped here ---------------------------
share="" qemu_pid="" tail_pid="" host_pid=""
stop_pid() {  # PID [GRACE_S]: TERM, wait, KILL
    local pid=$1 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < ${2:-5} * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
# shellcheck disable=SC2317  # invoked via trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    stop_pid "$host_pid" 3
    stop_pid "$qemu_pid" 5
    if [[ -n $tail_pid ]]; then sleep 0.2; stop_pid "$tail_pid" 1; fi
    if [[ -n $share && -d $share ]]; then
        if [[ $keep_share -eq 1 ]]; then log "share kept: $share"; else rm -rf "$share"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

# ---- one guest at a time ---------------------------------------------------------
exec 9>>"$LOCK_FILE"
if ! flock -n 9; then
    log "another guest is running; waiting up to ${lock_wait}s for $LOCK_FILE"
    flock -w "$lock_wait" 9 || die "timed out waiting for the other guest ($LOCK_FILE)"
fi

# ---- the share ---------------------------------------------------------------------
# Shares left by a launcher that was SIGKILLed (its QEMU died with it through
# pdeathsig): safe to remove while we hold the lock.
for old in "${TMPDIR:-/tmp}"/unvme-share.*; do
    [[ -d $old && -f $old/.owner && ! -e $old/.keep ]] || continue
    kill -0 "$(cat "$old/.owner")" 2>/dev/null || rm -rf "$old"
done
share=$(mktemp -d "${TMPDIR:-/tmp}/unvme-share.XXXXXX")
chmod 0755 "$share"
echo $$ > "$share/.owner"
[[ $keep_share -eq 1 ]] && : > "$share/.keep"
cp "$scenario" "$share/scenario.sh"
cp "$QS/guest/lib.sh" "$share/lib.sh"
: > "$share/env.sh"
for kv in "${envs[@]}"; do
    printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}" >> "$share/env.sh"
done
for f in "${files[@]}"; do
    src=${f%%=*} dst=$(basename "${f%%=*}")
    [[ $f == *=* ]] && dst=${f#*=}
    [[ -e $src ]] || die "--file $src: not found"
    [[ $dst != */* && $dst != . && $dst != .. ]] || die "--file NAME must be a plain name, got '$dst'"
    cp -a "$src" "$share/$dst"
done

# ---- QEMU -----------------------------------------------------------------------------
cmdline="console=ttyS0,115200 panic=-1 loglevel=4 mitigations=off random.trust_cpu=on 8250.nr_uarts=1"
[[ -n $append ]] && cmdline+=" $append"
qemu=(qemu-system-x86_64
    -nodefaults -no-user-config -display none -monitor none -no-reboot
    -machine "$machine" -accel "$accel" -cpu max -smp "$cpus" -m "$memory"
    -kernel "$BUILD/vmlinux" -initrd "$initrd" -append "$cmdline"
    -chardev "file,id=con0,path=$logfile" -serial chardev:con0
    -netdev "$netdev" -device 'virtio-net-pci,netdev=n0'
    -fsdev "local,id=fs0,path=$share,security_model=none" -device 'virtio-9p-pci,fsdev=fs0,mount_tag=share'
)
if [[ $shared_mem -eq 1 ]]; then
    qemu+=(-object "memory-backend-memfd,id=mem0,size=$memory,share=on" -numa 'node,memdev=mem0')
fi
qemu+=("${qemu_extra[@]}")

# Kill QEMU if this script dies without running its trap (SIGKILL).
launcher=()
if setpriv --help 2>/dev/null | grep -q -- --pdeathsig; then
    launcher=(setpriv --pdeathsig KILL --)
fi

: > "$logfile"
log "guest: scenario $name, ${memory} RAM, $cpus CPUs, machine $machine, timeout ${timeout_s}s, log $logfile"
t0=$(date +%s%N)
"${launcher[@]}" "${qemu[@]}" </dev/null >"$qemu_err" 2>&1 &
qemu_pid=$!
if [[ $verbose -eq 1 ]]; then
    tail -n +1 -F "$logfile" 9>&- >&2 2>/dev/null &
    tail_pid=$!
fi

elapsed_ms() { echo $(( ($(date +%s%N) - t0) / 1000000 )); }
fmt_s() { printf '%d.%02d' $(( $1 / 1000 )) $(( $1 % 1000 / 10 )); }

guest_uptime() {
    tr -d '\r' < "$logfile" | sed -n 's/.*UNVME-SCENARIO-START uptime=\([0-9.]*\).*/\1/p' | head -n 1
}
check_boot() {  # NOW_MS|"": report the boot time once the start marker shows up
    [[ $booted -eq 0 ]] && grep -aq 'UNVME-SCENARIO-START' "$logfile" 2>/dev/null || return 0
    booted=1
    if [[ -n $1 ]]; then
        log "guest booted in $(fmt_s "$1") s (QEMU start to scenario start; guest kernel uptime $(guest_uptime) s)"
    else
        log "guest booted (scenario start at guest kernel uptime $(guest_uptime) s)"
    fi
}

deadline_ms=$((timeout_s * 1000))
booted=0 timed_out=0 host_rc="" host_started=0 host_deadline_ms=0
while kill -0 "$qemu_pid" 2>/dev/null; do
    now=$(elapsed_ms)
    check_boot "$now"
    if [[ -n $host_cmd && $host_started -eq 0 && -e $share/ready ]]; then
        host_started=1
        host_deadline_ms=$((now + host_timeout * 1000 + 5000))
        log "guest ready after $(fmt_s "$now") s; running host command (limit ${host_timeout}s)"
        UNVME_SHARE=$share UNVME_GUEST_LOG=$logfile \
            timeout -k 5 "$host_timeout" bash -c "$host_cmd" </dev/null 9>&- &
        host_pid=$!
    fi
    if [[ -n $host_pid ]] && ! kill -0 "$host_pid" 2>/dev/null; then
        host_rc=0
        wait "$host_pid" || host_rc=$?
        host_pid=""
        [[ $host_rc -eq 124 ]] && log "host command timed out after ${host_timeout}s"
        log "host command exited with status $host_rc"
        echo "$host_rc" > "$share/host-done.tmp" && mv "$share/host-done.tmp" "$share/host-done"
    elif [[ -n $host_pid && $now -gt $host_deadline_ms ]]; then
        stop_pid "$host_pid" 2; # reaped on the next turn
    fi
    if [[ $now -ge $deadline_ms ]]; then
        timed_out=1
        break
    fi
    sleep 0.1
done

if [[ $timed_out -eq 1 ]]; then
    stop_pid "$host_pid" 2; host_pid=""
    stop_pid "$qemu_pid" 5; qemu_pid=""
else
    qemu_rc=0
    wait "$qemu_pid" || qemu_rc=$?
    qemu_pid=""
    [[ $qemu_rc -eq 0 ]] || log "QEMU exited with status $qemu_rc"
fi
if [[ -n $host_pid ]]; then  # guest went away while the host command ran
    stop_pid "$host_pid" 2; host_pid=""
    [[ -n $host_rc ]] || host_rc=1
fi
total_ms=$(elapsed_ms)
check_boot ""   # the scenario may have finished between two polls

show_tail() {
    [[ $verbose -eq 1 ]] && return 0
    echo "---- last 40 lines of $logfile ----" >&2
    tail -n 40 "$logfile" | tr -d '\r' >&2 || true
    if [[ -s $qemu_err ]]; then
        echo "---- QEMU stderr ----" >&2
        cat "$qemu_err" >&2
    fi
    echo "----" >&2
}

marker=$(tr -d '\r' < "$logfile" | grep -ao 'UNVME-SCENARIO-EXIT=[0-9]*' | tail -n 1 || true)
rc=${marker#UNVME-SCENARIO-EXIT=}
if [[ -z $marker ]]; then
    # the marker can be lost on the console; the init also writes the status
    [[ -s $share/exit-status ]] && rc=$(tr -dc '0-9' < "$share/exit-status")
fi
if [[ $timed_out -eq 1 ]]; then
    show_tail
    log "FAIL: timed out after ${timeout_s}s (guest killed)$([[ $booted -eq 0 ]] && echo '; the scenario never started')"
    exit 124
fi
if [[ -z $rc ]]; then
    show_tail
    log "FAIL: no UNVME-SCENARIO-EXIT marker in the guest log (guest crashed or QEMU failed); see $logfile"
    exit 125
fi
[[ $booted -eq 1 ]] || log "warning: no scenario start marker seen"

final=$rc
if [[ -n $host_cmd ]]; then
    if [[ -z $host_rc ]]; then
        log "FAIL: the host command never ran (the scenario did not signal_ready)"
        host_rc=126
    fi
    [[ $final -ne 0 ]] || final=$host_rc
fi
if [[ $final -ne 0 ]]; then
    show_tail
    log "FAIL: scenario $name exit status $rc${host_cmd:+, host command status $host_rc} ($(fmt_s "$total_ms") s total)"
else
    log "PASS: scenario $name ($(fmt_s "$total_ms") s total)"
fi
exit "$final"
