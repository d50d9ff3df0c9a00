#!/usr/bin/env bash
# vhost-blk.sh: the Linux kernel's virtio_blk driver (in a QEMU guest with
# memfd-shared RAM) against `unvme vhost-blk` on the host, attached as
# `-device vhost-user-blk-pci` (scenario vhost-blk.sh), in three setups:
#   ram        unvme vhost-blk --ram 256M, one virtqueue
#   bridge     unvme vhost-blk bridged to `unvme target --ram 256M` over
#              NVMe/TCP, one virtqueue (one queue pair)
#   bridge-mq  the same with two virtqueues (two queue pairs), 2 guest vCPUs,
#              and fio randwrite + verify from 2 jobs (--with-fio guest)
#              (ram, bridge, bridge-mq: the device's log must show that at
#              least 99% of requests moved data zero-copy, guest pages <->
#              RAM disk or socket)
#   chain-file the whole chain onto a file: guest virtio_blk -> unvme
#              vhost-blk -> NVMe/TCP -> `unvme target --file`; after the
#              scenario the guest writes a host-made 64 MiB pattern at
#              32 MiB, flushes and powers off; both servers are then killed
#              with SIGKILL and the pattern is checked in the file
#   target-restart  the same chain (vhost-blk --kato-ms 2000
#              --ctrl-loss-tmo 5 --reconnect-delay 0.5, a --with-fio guest;
#              scenario vhost-blk-restart.sh, host half
#              vhost-restart-host.sh): fio verify and dd ride through a
#              SIGKILL + restart 1 s later and a 4 s SIGSTOP of `unvme
#              target`; killed for good, I/O fails after ~5 s without
#              hanging, and resumes after the restart, flushed data intact
#   reconnect  `unvme vhost-blk --file` behind a chardev with reconnect-ms:
#              the host SIGKILLs the backend during a guest write and
#              restarts it (scenario vhost-blk-reconnect.sh, host half
#              vhost-reconnect-host.sh); QEMU reconnects, the writes
#              (dd, fio QD16 + verify) complete, data intact
#   inflight   `unvme vhost-blk` bridged to `unvme target --ram`, behind a
#              chardev with reconnect-ms: the host SIGSTOPs the target while
#              4 guest writers run, SIGKILLs vhost-blk with their requests
#              in flight, restarts it and SIGCONTs the target (scenario
#              vhost-blk-inflight.sh, host half vhost-inflight-host.sh); the
#              new device must log that it resubmitted >0 in-flight
#              requests from QEMU's inflight region (INFLIGHT_SHMFD), the
#              writes complete, the pattern reads back intact
# Select some with UNVME_VB_CASES="ram bridge" (default: all).
#
# Needs target/release/unvme and the guest harness
# (qemu-scripts/install-deps.sh). Every step is bounded; everything started
# here is stopped on exit.
set -euo pipefail

QS=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$(cd "$QS/.." && pwd)
UNVME=${UNVME_BIN:-$ROOT/target/release/unvme}
GUEST_TIMEOUT=${UNVME_GUEST_TIMEOUT:-420}
CASES=${UNVME_VB_CASES:-ram bridge bridge-mq chain-file target-restart reconnect inflight}
SIZE=$((256 << 20))
SERIAL=unvme-vb-test

log() { echo "vhost-blk: $*" >&2; }
[[ -x $UNVME ]] || { log "FAIL: $UNVME missing (cargo build --release)"; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { log "FAIL: qemu-system-x86_64 missing"; exit 2; }
timeout -k 10 900 "$QS/build-guest.sh" || { log "FAIL: guest build"; exit 1; }

# shellcheck source=SCRIPTDIR/lib-host.sh
. "$QS/tests/lib-host.sh"

work=$(mktemp -d /tmp/unvme-vhost-blk.XXXXXX)
pids=()
stop_all() {
    local p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    pids=()
}
cleanup() {
    stop_all
    if [[ -s $work/target.pid ]]; then kill -KILL "$(cat "$work/target.pid")" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# The guest's write-zeroes trigger (busybox has no blkdiscard -z).
gcc -static -O2 -Wall -Wextra -Werror -o "$work/zero-range" "$QS/guest/zero-range.c" \
    || { log "FAIL: cannot build guest/zero-range.c (gcc with static libc)"; exit 1; }

# start NAME PATTERN CMD...: start a server, wait for PATTERN in its log.
start() {
    local name=$1 pat=$2
    shift 2
    "$@" --log info 2>"$work/$name.log" &
    pids+=($!)
    for _ in $(seq 100); do
        grep -q "$pat" "$work/$name.log" 2>/dev/null && return 0
        kill -0 "${pids[-1]}" 2>/dev/null || break
        sleep 0.1
    done
    log "$name did not start:"; cat "$work/$name.log" >&2
    return 1
}

# The restarted device resubmitted requests from the inflight region.
check_resubmitted() {
    grep -E 'queue [0-9]+: resubmitting [1-9][0-9]* in-flight requests' "$work/vb.log" >&2
}

# The guest's final pattern sits at 32 MiB of the target's file.
check_file() {
    cmp <(dd if="$work/disk.img" bs=1M skip=32 count=64 2>/dev/null) "$work/pattern" \
        && log "the file holds the pattern the guest flushed"
}

# The device moved data in guest memory (zero copy): its queues log
# "vhost-blk queue N: Z requests zero-copy, C copied" when the frontend
# disconnects. At least 99% of the requests must have gone without a copy.
check_zero_copy() {
    local line=
    for _ in $(seq 100); do
        line=$(grep -Eo 'vhost-blk queue [0-9]+: [0-9]+ requests zero-copy, [0-9]+ copied'             "$work/vb.log" | head -n 1) && break
        sleep 0.1
    done
    [[ -n $line ]] || { log "vhost-blk logged no data path counts"; return 1; }
    grep -Eo 'vhost-blk queue [0-9]+: [0-9]+ requests zero-copy, [0-9]+ copied' "$work/vb.log" >&2
    # Scattered pages go as request segments (a RAM disk and an NVMe/TCP
    # queue pair take them), so hardly anything may be copied: only a
    # segment across two of QEMU's memory regions is.
    local z c
    z=$(grep -Eo '[0-9]+ requests zero-copy' "$work/vb.log" | awk '{s += $1} END {print s + 0}')
    c=$(grep -Eo '[0-9]+ copied' "$work/vb.log" | awk '{s += $1} END {print s + 0}')
    ((z > 0 && c * 100 <= z)) || { log "zero-copy $z, copied $c: more than 1% copied"; return 1; }
}

post_check=
zc_check=
failed=()
scenario() { # NAME QUEUES SOCKET [RUN-GUEST ARGS...] (device already started)
    local name=$1 queues=$2 sock=$3 rc=0
    shift 3
    timeout -k 10 $((GUEST_TIMEOUT + 660)) "$QS/run-guest.sh" --timeout "$GUEST_TIMEOUT" \
        --shared-memory --memory 1G --cpus 2 \
        --env "UNVME_VB_SIZE=$SIZE" --env "UNVME_VB_QUEUES=$queues" \
        --env "UNVME_VB_SERIAL=$SERIAL" \
        --log "$QS/build/logs/vhost-blk-$name.log" \
        --qemu-arg -chardev --qemu-arg "socket,id=vb0,path=$sock${chardev_opts:-}" \
        --qemu-arg -device --qemu-arg "vhost-user-blk-pci,chardev=vb0,num-queues=$queues" \
        --file "$work/zero-range=zero-range" \
        "$@" "$QS/scenarios/${scen:-vhost-blk.sh}" || rc=$?
    if [[ -n ${zc_check:-} && $rc -eq 0 ]]; then
        check_zero_copy || { log "$name: zero-copy check failed"; rc=1; }
    fi
    zc_check=
    if grep -q panicked "$work"/*.log; then log "a server panicked"; rc=1; fi
    for p in "${pids[@]}"; do
        kill -0 "$p" 2>/dev/null || { log "a server exited early"; rc=1; }
    done
    if [[ -n ${post_check:-} ]]; then
        # No graceful shutdown: what the guest flushed must already be there.
        for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
        if [[ $rc -eq 0 ]]; then
            $post_check || { log "$name: post-check failed"; rc=1; }
        fi
        post_check=
    fi
    stop_all
    scen='' chardev_opts=''
    if [[ -s $work/target.pid ]]; then target_stop "$(cat "$work/target.pid")" TERM || true; fi
    rm -f "$work/target.pid"
    if [[ $rc -ne 0 ]]; then
        for f in "$work"/*.log; do log "--- $f"; tail -n 20 "$f" >&2; done
    fi
    rm -f "$work"/*.log
    if [[ $rc -eq 0 ]]; then log "PASS $name"; else log "FAIL $name ($rc)"; failed+=("$name"); fi
}

for c in $CASES; do
    sock=$work/$c.sock
    case $c in
        ram)
            start vb "listening" "$UNVME" vhost-blk --ram 256M --socket "$sock" --serial "$SERIAL"
            zc_check=1
            scenario ram 1 "$sock"
            ;;
        bridge | bridge-mq)
            q=1
            [[ $c == bridge-mq ]] && q=2
            tport=$(free_port)
            start target "listening.*:$tport" "$UNVME" target --ram 256M \
                --listen "127.0.0.1:$tport" --reactors 1
            start vb "listening" "$UNVME" vhost-blk --port "$tport" --socket "$sock" \
                --num-queues "$q" --serial "$SERIAL"
            zc_check=1
            if [[ $c == bridge-mq ]]; then
                scenario "$c" "$q" "$sock" --with-fio
            else
                scenario "$c" "$q" "$sock"
            fi
            ;;
        chain-file)
            head -c $((64 << 20)) /dev/urandom > "$work/pattern"
            tport=$(free_port)
            start target "listening.*:$tport" "$UNVME" target --file "$work/disk.img:create=256M" \
                --listen "127.0.0.1:$tport" --reactors 1
            start vb "listening" "$UNVME" vhost-blk --port "$tport" --socket "$sock" \
                --serial "$SERIAL"
            post_check=check_file
            scenario "$c" 1 "$sock" --file "$work/pattern=pattern" --env UNVME_VB_FINAL=/share/pattern
            ;;
        target-restart)
            tport=$(free_port)
            start target "listening.*:$tport" "$UNVME" target --file "$work/restart.img:create=256M" \
                --listen "127.0.0.1:$tport" --reactors 1
            echo "${pids[-1]}" > "$work/target.pid"
            start vb "listening" "$UNVME" vhost-blk --port "$tport" --socket "$sock" \
                --kato-ms 2000 --ctrl-loss-tmo 5 --reconnect-delay 0.5
            # The target is the host command's to kill and restart.
            unset 'pids[0]'
            pids=("${pids[@]}")
            scen=vhost-blk-restart.sh
            scenario "$c" 1 "$sock" --with-fio --host-timeout 600 \
                --host-cmd "'$QS/tests/vhost-restart-host.sh' '$UNVME' $tport '$work/restart.img' '$work/target.pid' '$work/target.log'"
            ;;
        reconnect)
            start vb "listening" "$UNVME" vhost-blk --file "$work/reconnect.img:create=64M" --socket "$sock"
            # The backend is the host command's to kill and restart.
            echo "${pids[-1]}" > "$work/target.pid"
            unset 'pids[0]'
            pids=("${pids[@]}")
            scen=vhost-blk-reconnect.sh chardev_opts=,reconnect-ms=200
            scenario "$c" 1 "$sock" --with-fio --host-timeout 300 \
                --host-cmd "'$QS/tests/vhost-reconnect-host.sh' '$UNVME' '$sock' '$work/reconnect.img' '$work/target.pid' '$work/vb.log'"
            ;;
        inflight)
            tport=$(free_port)
            start target "listening.*:$tport" "$UNVME" target --ram 256M \
                --listen "127.0.0.1:$tport" --reactors 1
            echo "${pids[-1]}" > "$work/tgt.pid"
            start vb "listening" "$UNVME" vhost-blk --port "$tport" --socket "$sock"
            # vhost-blk is the host command's to kill and restart; the
            # target stays ours (the host command stops and continues it).
            echo "${pids[-1]}" > "$work/target.pid"
            unset 'pids[1]'
            pids=("${pids[@]}")
            scen=vhost-blk-inflight.sh chardev_opts=,reconnect-ms=200
            post_check=check_resubmitted
            scenario "$c" 1 "$sock" --host-timeout 300 \
                --host-cmd "'$QS/tests/vhost-inflight-host.sh' '$UNVME' '$sock' $tport '$work/tgt.pid' '$work/target.pid' '$work/vb.log'"
            ;;
        *) log "unknown case $c"; failed+=("$c") ;;
    esac
done

if [[ ${#failed[@]} -gt 0 ]]; then log "failed: ${failed[*]}"; exit 1; fi
log "all passed"
