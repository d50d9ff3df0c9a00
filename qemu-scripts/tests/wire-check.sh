#!/usr/bin/env bash
# wire-check.sh: capture NVMe/TCP between unvme and the Linux kernel on the
# host's loopback and have tshark's nvme-tcp dissector judge it.
#
#   direction 1: guest kernel host → `unvme target` on the host (the guest's
#     connections arrive through QEMU user networking as 127.0.0.1 traffic):
#     scenarios/kernel-host-wire.sh, one session without digests (port A) and
#     one with header + data digests (port B; one target listening on both).
#   direction 2: `unvme identify` + `unvme perf --verify` → the guest kernel's
#     nvmet-tcp target through hostfwd (127.0.0.1:C → guest 4420 without
#     digests, 127.0.0.1:D → guest 8009 with header + data digests):
#     scenarios/kernel-target-export.sh with this script as --host-cmd.
#
# For each session: the PDU types ICReq, ICResp, CapsuleCommand,
# CapsuleResponse, H2CData, C2HData and R2T are all decoded; no TermReq; no
# malformed packet, no expert error (with the dissector's header and data
# digest checks on, so a wrong CRC32C shows up as an error) and no TCP
# payload outside a decoded PDU; the digest
# sessions carry header and data digests.
#
# usage: wire-check.sh            (UNVME_WIRE_KEEP=1 keeps the captures in build/logs; needs tshark: qemu-scripts/install-deps.sh)
#        wire-check.sh --dir2-host-cmd PLAIN_PORT DIGEST_PORT NQN   (internal)
set -euo pipefail

QS=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$(cd "$QS/.." && pwd)
export UNVME=${UNVME:-${UNVME_BIN:-$ROOT/target/release/unvme}}
# shellcheck source=SCRIPTDIR/lib-host.sh
. "$QS/tests/lib-host.sh"
log() { echo "wire-check: $*" >&2; }

# ---- direction 2, host half (runs as --host-cmd) ---------------------------------
if [[ ${1:-} == --dir2-host-cmd ]]; then
    plain=$2 dig=$3 nqn=$4 rc=0
    u() { timeout -k 5 60 "$UNVME" "$@" >/dev/null 2>"$UNVME_SHARE/unvme.err" || { rc=1; log "FAIL: unvme $*"; cat "$UNVME_SHARE/unvme.err" >&2; }; }
    for pd in "$plain" "$dig --hdr-digest --data-digest"; do
        read -r port dgst <<<"$pd"
        # shellcheck disable=SC2086  # dgst: zero or two words
        {
            u identify --addr 127.0.0.1 --port "$port" --nqn "$nqn" $dgst
            u perf --addr 127.0.0.1 --port "$port" --nqn "$nqn" $dgst --pattern randwrite --qd 4 --io-size 4096 --time 1 --range 1M --verify
            u perf --addr 127.0.0.1 --port "$port" --nqn "$nqn" $dgst --pattern randrw --qd 4 --io-size 131072 --time 1 --range 2M --verify
        }
    done
    exit "$rc"
fi

command -v tshark >/dev/null || { log "FAIL: tshark missing (qemu-scripts/install-deps.sh)"; exit 2; }
[[ -x $UNVME ]] || { log "FAIL: $UNVME missing (cargo build --release -p unvme)"; exit 2; }
GUEST_TIMEOUT=${UNVME_GUEST_TIMEOUT:-180}
LOGS=$QS/build/logs
mkdir -p "$LOGS"
NQN=nqn.2024-11.io.unvme:wire
work=$(mktemp -d /dev/shm/unvme-wire.XXXXXX)
chmod 0755 "$work"   # dumpcap may drop privileges to write the capture
tpid="" cpid=""
# shellcheck disable=SC2317  # invoked via trap
cleanup() {
    [[ -z $cpid ]] || { kill -INT "$cpid" 2>/dev/null; sleep 0.5; kill -KILL "$cpid" 2>/dev/null; wait "$cpid" 2>/dev/null; } || true
    [[ -z $tpid ]] || target_stop "$tpid" TERM >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# capture_start FILE PORT...: tshark on lo, every byte of those TCP ports.
capture_start() {
    local file=$1 filter="" p
    shift
    for p in "$@"; do filter+="${filter:+ or }tcp port $p"; done
    : > "$file.log"
    timeout -k 5 $((GUEST_TIMEOUT + 120)) tshark -i lo -f "$filter" -B 64 -s 0 -w "$file" -q 2>"$file.log" &
    cpid=$!
    for _ in $(seq 100); do
        grep -q "Capturing on" "$file.log" && return 0
        kill -0 "$cpid" 2>/dev/null || break
        sleep 0.1
    done
    log "tshark did not start:"; cat "$file.log" >&2
    return 1
}
capture_stop() {
    sleep 0.5   # let the last segments through
    kill -INT "$cpid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$cpid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$cpid" 2>/dev/null || true
    wait "$cpid" 2>/dev/null || true
    cpid=""
    grep -E "dropped|packets captured" "$1.log" | sed 's/^/  tshark: /' >&2 || true
}

declare -A TYPE_NAME=([0]=ICReq [1]=ICResp [2]=H2CTermReq [3]=C2HTermReq [4]=CapsuleCommand
    [5]=CapsuleResponse [6]=H2CData [7]=C2HData [9]=R2T)
failed=()

# check FILE LABEL PORT DIGESTS(0|1) ALL_PORTS...: judge one session's port.
check() {
    local file=$1 label=$2 port=$3 digests=$4 ok=1 t n types bad summary
    shift 4
    # Out-of-order reassembly: loopback does drop segments when the host is
    # busy (backlog overflow), and TCP's retransmissions then overlap data
    # already seen, which in-order reassembly cannot stitch back.
    local dopts=(-o nvme-tcp.check_hdgst:TRUE -o nvme-tcp.check_ddgst:TRUE -o tcp.reassemble_out_of_order:TRUE)
    for p in "$@"; do dopts+=(-d "tcp.port==$p,nvme-tcp"); done
    types=$(timeout 120 tshark -r "$file" "${dopts[@]}" -Y "nvme-tcp && tcp.port==$port" -T fields -e nvme-tcp.type 2>/dev/null \
        | tr ',' '\n' | grep -E '^[0-9]+$' | sort -n | uniq -c) || true
    summary=""
    for t in 0 1 4 5 6 7 9 2 3; do
        n=$(awk -v t="$t" '$2 == t { print $1 }' <<<"$types")
        n=${n:-0}
        summary+=" ${TYPE_NAME[$t]}=$n"
        case $t in
            2 | 3) [[ $n -eq 0 ]] || { log "$label: $n ${TYPE_NAME[$t]} PDUs"; ok=0; } ;;
            *) [[ $n -gt 0 ]] || { log "$label: no ${TYPE_NAME[$t]} PDU decoded"; ok=0; } ;;
        esac
    done
    local experr='_ws.expert.severity >= 0x00800000'   # PI_ERROR
    bad=$(timeout 120 tshark -r "$file" "${dopts[@]}" -Y "tcp.port==$port && (_ws.malformed || $experr)" 2>/dev/null | wc -l) || bad=err
    summary+=" malformed/expert-error frames=$bad"
    # Every payload byte belongs to a decoded PDU (two passes, so segments of
    # a reassembled PDU are marked; retransmitted copies do not count).
    n=$(timeout 120 tshark -2 -r "$file" "${dopts[@]}" \
        -Y "tcp.port==$port && tcp.len>0 && !nvme-tcp && !tcp.reassembled_in && !tcp.analysis.retransmission" 2>/dev/null | wc -l) || n=err
    summary+=" undecoded-payload frames=$n"
    local rtx
    rtx=$(timeout 120 tshark -r "$file" -Y "tcp.port==$port && tcp.analysis.retransmission" 2>/dev/null | wc -l) || rtx=err
    summary+=" (TCP retransmissions: $rtx)"
    [[ $n == 0 ]] || ok=0
    [[ $bad == 0 ]] || {
        ok=0
        timeout 120 tshark -r "$file" "${dopts[@]}" -Y "tcp.port==$port" -q -z expert,error 2>/dev/null | head -n 30 >&2 || true
    }
    if [[ $digests -eq 1 ]]; then
        local hd dd
        hd=$(timeout 120 tshark -r "$file" "${dopts[@]}" -Y "tcp.port==$port && nvme-tcp.hdgst" 2>/dev/null | wc -l) || hd=0
        dd=$(timeout 120 tshark -r "$file" "${dopts[@]}" -Y "tcp.port==$port && nvme-tcp.ddgst" 2>/dev/null | wc -l) || dd=0
        summary+=" frames with hdgst=$hd ddgst=$dd"
        [[ $hd -gt 0 && $dd -gt 0 ]] || { log "$label: digests not seen on the wire"; ok=0; }
    fi
    if [[ $ok -eq 1 ]]; then
        log "$label: PASS:$summary"
    else
        log "$label: FAIL:$summary"
        failed+=("$label")
    fi
}

timeout -k 10 900 "$QS/build-guest.sh" >/dev/null || { log "FAIL: guest build"; exit 1; }

# ---- direction 1: kernel host → unvme target ------------------------------------------
read -r pa pb < <(free_ports2)
cap1=$work/kernel-host-unvme.pcapng
log "=== direction 1: guest kernel host -> unvme target on 127.0.0.1:$pa (plain) and :$pb (digests)"
capture_start "$cap1" "$pa" "$pb"
: > "$LOGS/wire-target.log"
"$UNVME" target --listen "127.0.0.1:$pa" --listen "127.0.0.1:$pb" --nqn "$NQN" --ram 64M --reactors 1 \
    --log info 2>>"$LOGS/wire-target.log" &
tpid=$!
for _ in $(seq 100); do grep -q "listening.*:$pb" "$LOGS/wire-target.log" && break; sleep 0.1; done
rc=0
timeout -k 10 $((GUEST_TIMEOUT + 60)) "$QS/run-guest.sh" --timeout "$GUEST_TIMEOUT" --log "$LOGS/kernel-host-wire.log" \
    --env "UNVME_PORT=$pa" --env "UNVME_PORT_DIGEST=$pb" --env "UNVME_NQN=$NQN" \
    "$QS/scenarios/kernel-host-wire.sh" || rc=$?
capture_stop "$cap1"
target_stop "$tpid" TERM || { log "target did not exit cleanly"; rc=1; }
tpid=""
if [[ $rc -ne 0 ]]; then
    log "direction 1: the guest scenario failed (status $rc)"; failed+=(dir1-scenario)
else
    log "capture: $(du -h "$cap1" | cut -f1)"
    check "$cap1" "dir1-kernel-host-plain" "$pa" 0 "$pa" "$pb"
    check "$cap1" "dir1-kernel-host-digests" "$pb" 1 "$pa" "$pb"
fi

# ---- direction 2: unvme → kernel target ---------------------------------------------------
read -r pc pd < <(free_ports2)
cap2=$work/unvme-kernel-target.pcapng
log "=== direction 2: unvme identify/perf -> guest kernel target via 127.0.0.1:$pc (plain) and :$pd (digests)"
capture_start "$cap2" "$pc" "$pd"
rc=0
timeout -k 10 $((GUEST_TIMEOUT + 60)) "$QS/run-guest.sh" --timeout "$GUEST_TIMEOUT" --log "$LOGS/wire-kernel-target.log" \
    --hostfwd "tcp:127.0.0.1:$pc-:4420" --hostfwd "tcp:127.0.0.1:$pd-:8009" \
    --env "EXPORT_NQN=$NQN" --env EXPORT_SIZE_MB=64 --env HOST_TIMEOUT=150 \
    --host-timeout 120 --host-cmd "bash '$QS/tests/wire-check.sh' --dir2-host-cmd $pc $pd $NQN" \
    "$QS/scenarios/kernel-target-export.sh" || rc=$?
capture_stop "$cap2"
if [[ $rc -ne 0 ]]; then
    log "direction 2: unvme against the kernel target failed (status $rc)"; failed+=(dir2-host-cmd)
else
    log "capture: $(du -h "$cap2" | cut -f1)"
    check "$cap2" "dir2-unvme-kernel-target-plain" "$pc" 0 "$pc" "$pd"
    check "$cap2" "dir2-unvme-kernel-target-digests" "$pd" 1 "$pc" "$pd"
fi

if [[ -n ${UNVME_WIRE_KEEP:-} ]]; then cp "$work"/*.pcapng "$LOGS/" && log "captures copied to $LOGS"; fi
if [[ ${#failed[@]} -gt 0 ]]; then
    log "FAIL: ${failed[*]}"
    exit 1
fi
log "PASS: both directions decode cleanly (with and without digests)"
