# kernel-multipath: the guest kernel's native NVMe multipath against two
# `unvme target` processes on the host that export one subsystem NQN over
# one shared file (same NGUID/UUID, disjoint CNTLID ranges), the first
# listener ANA optimized, the second non-optimized.  The host side is
# tests/multipath-kernel.sh --host-half (run as --host-cmd); the steps are
# rendezvous through the share (guest_step in lib.sh).
# Env: UNVME_PORT_OPT, UNVME_PORT_NONOPT, UNVME_NQN.
#
#  1. nvme_core must have multipath=Y (else: say so, fail).
#  2. step start: the host starts both targets; connect to both.
#  3. one nvme-subsystem with two controllers and ONE namespace head
#     (nvmeXnY); the paths report ana_state optimized / non-optimized.
#  4. step mark-a / write 16 MiB / step mark-b: the host compares how many
#     bytes each target wrote to the file in between: the optimized one
#     took the I/O.
#  5. a chunked O_DIRECT write (chunk by chunk, each timed) runs; after a
#     few chunks, step kill: the host SIGKILLs the optimized target.  Every
#     chunk must succeed; the longest chunk after the kill bounds the
#     failover stall (printed with the longest before the kill and the
#     median).  The whole region then reads back intact (the other path).
set -eu
# shellcheck source=SCRIPTDIR/../guest/lib.sh
. /share/lib.sh

HOST=10.0.2.2
P_OPT=${UNVME_PORT_OPT:?}
P_NON=${UNVME_PORT_NONOPT:?}
NQN=${UNVME_NQN:?}
KIB=1024
MIB=1048576
CHUNK_KIB=512
CHUNKS=64
KILL_AFTER=12

up() { cut -d' ' -f1 /proc/uptime; }

# ---- 1. native multipath in this kernel -----------------------------------
modprobe nvme_tcp 2>/dev/null || true
mp=$(cat /sys/module/nvme_core/parameters/multipath 2>/dev/null || echo missing)
log "kernel $(uname -r): nvme_core multipath=$mp"
echo "UNVME-MULTIPATH kernel=$(uname -r) nvme_core.multipath=$mp"
[ "$mp" = Y ] || fail "this kernel has no native NVMe multipath (CONFIG_NVME_MULTIPATH / nvme_core.multipath=$mp)"

# ---- 2. connect to both targets --------------------------------------------
signal_ready
guest_step start 60 || fail "host did not start the targets"
run nvme connect -t tcp -a "$HOST" -s "$P_OPT" -n "$NQN" --reconnect-delay 1 --ctrl-loss-tmo 20
run nvme connect -t tcp -a "$HOST" -s "$P_NON" -n "$NQN" --reconnect-delay 1 --ctrl-loss-tmo 20

# ---- 3. one subsystem, two controllers, one namespace head ----------------
subsys=""
for s in /sys/class/nvme-subsystem/nvme-subsys*; do
    [ "$(cat "$s/subsysnqn" 2>/dev/null)" = "$NQN" ] && subsys=$s
done
[ -n "$subsys" ] || { ls -l /sys/class/nvme-subsystem/; fail "no nvme-subsystem for $NQN"; }
heads="" i=0
while [ "$i" -lt 100 ]; do
    heads=""
    for h in "$subsys"/nvme*n*; do if [ -e "$h" ]; then heads="$heads${h##*/} "; fi; done
    [ -n "$heads" ] && [ -b "/dev/${heads%% *}" ] && break
    sleep 0.1; i=$((i + 1))
done
nheads=$(echo "$heads" | wc -w)
ctrls=""
for c in "$subsys"/nvme[0-9]*; do
    case ${c##*/} in nvme*n*) ;; *) ctrls="$ctrls${c##*/} " ;; esac
done
nctrls=$(echo "$ctrls" | wc -w)
log "subsystem ${subsys##*/}: controllers [$ctrls] namespace heads [$heads] iopolicy=$(cat "$subsys/iopolicy" 2>/dev/null || echo ?)"
nvme list-subsys 2>&1 || true
[ "$nctrls" -eq 2 ] || fail "expected 2 controllers in ${subsys##*/}, found $nctrls"
[ "$nheads" -eq 1 ] || fail "expected ONE multipath namespace, found $nheads: $heads"
head=${heads%% *}
dev=/dev/$head
# the per-path namespaces: nvme<subsys>c<ctrl>n<ns>, one per controller
opt_path="" non_path=""
for c in $ctrls; do
    port=$(sed -n 's/.*trsvcid=\([0-9]*\).*/\1/p' "/sys/class/nvme/$c/address")
    cntlid=$(cat "/sys/class/nvme/$c/cntlid")
    for p in /sys/class/nvme/"$c"/nvme*c*n*; do
        [ -e "$p/ana_state" ] || continue
        st=$(cat "$p/ana_state")
        log "path ${p##*/}: controller $c cntlid $cntlid port $port ana_state=$st ana_grpid=$(cat "$p/ana_grpid" 2>/dev/null || echo ?)"
        echo "UNVME-MULTIPATH path=${p##*/} port=$port cntlid=$cntlid ana_state=$st"
        if [ "$port" = "$P_OPT" ]; then
            [ "$st" = optimized ] || fail "path on port $port reports $st, expected optimized"
            [ "$cntlid" -lt 100 ] || fail "cntlid $cntlid outside the first target's range"
            opt_path=${p##*/}; opt_ctrl=$c
        elif [ "$port" = "$P_NON" ]; then
            [ "$st" = non-optimized ] || fail "path on port $port reports $st, expected non-optimized"
            [ "$cntlid" -ge 100 ] || fail "cntlid $cntlid outside the second target's range"
            non_path=${p##*/}
        fi
    done
done
if [ -z "$opt_path" ] || [ -z "$non_path" ]; then fail "did not find both paths with their ANA states"; fi
log "one multipath namespace $dev over $opt_path (optimized) and $non_path (non-optimized)"

# ---- 4. I/O goes to the optimized path ------------------------------------
head -c $((16 * MIB)) /dev/urandom > /tmp/warm
guest_step mark-a 60 || fail "host: mark-a"
run dd if=/tmp/warm of="$dev" bs=128k oflag=direct conv=notrunc 2>/dev/null
guest_step mark-b 60 || fail "host: the optimized target did not carry the I/O (see the host log)"
log "the host saw the 16 MiB arrive at the optimized target"

# ---- 5. failover: kill -9 the optimized target during a write -------------
head -c $((CHUNKS * CHUNK_KIB * KIB)) /dev/urandom > /tmp/pattern
: > /tmp/chunks
(
    n=0
    while [ "$n" -lt "$CHUNKS" ]; do
        t0=$(up)
        if dd if=/tmp/pattern of="$dev" bs=$((CHUNK_KIB * KIB)) count=1 skip="$n" seek=$((n + 64)) \
            oflag=direct conv=notrunc 2>/tmp/dd.err; then rc=0; else rc=$?; fi
        echo "$n $t0 $(up) $rc" >> /tmp/chunks
        [ "$rc" -eq 0 ] || cat /tmp/dd.err
        n=$((n + 1))
    done
    : > /tmp/writer.done
) &
writer=$!
i=0
while [ "$(wc -l < /tmp/chunks)" -lt "$KILL_AFTER" ] && [ "$i" -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
t_kill=$(up)
log "writer at chunk $(wc -l < /tmp/chunks)/$CHUNKS: asking the host to kill -9 the optimized target"
guest_step kill 60 || fail "host could not kill the optimized target"
i=0
while [ ! -e /tmp/writer.done ] && [ "$i" -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /tmp/writer.done ] || { kill "$writer" 2>/dev/null; fail "the writer hangs 120 s after the kill"; }
wait "$writer" 2>/dev/null || true
log "controller $opt_ctrl state after the kill: $(cat "/sys/class/nvme/$opt_ctrl/state" 2>/dev/null || echo gone)"
bad=$(awk '$4 != 0' /tmp/chunks | wc -l)
[ "$bad" -eq 0 ] || { cat /tmp/chunks; fail "$bad chunk writes failed across the failover"; }
after_kill=$(awk -v k="$t_kill" '$2 >= k' /tmp/chunks | wc -l)
[ "$after_kill" -gt 0 ] || fail "no chunk was written after the kill (the writer finished first)"
# The failover stall: the longest chunk that was still running, or started,
# once the kill was asked for (the host kills within the step); compared with
# the chunks before it.
stall=$(awk -v k="$t_kill" '$3 > k { d = $3 - $2; if (d > m) { m = d; c = $1 } } END { printf "%.2f %d", m, c }' /tmp/chunks)
before=$(awk -v k="$t_kill" '$3 <= k { d = $3 - $2; if (d > m) m = d } END { printf "%.2f", m }' /tmp/chunks)
median=$(awk '{ print $3 - $2 }' /tmp/chunks | sort -n | awk '{ a[NR] = $1 } END { printf "%.2f", a[int((NR + 1) / 2)] }')
log "all $CHUNKS chunks (${CHUNK_KIB} KiB, O_DIRECT) written, $after_kill after the kill;" \
    "longest chunk across the failover ${stall% *} s (chunk ${stall#* }), longest before it $before s, median $median s"
rm -f /tmp/readback
dd if="$dev" of=/tmp/readback bs=$((CHUNK_KIB * KIB)) skip=64 count="$CHUNKS" iflag=direct 2>/dev/null \
    || fail "read-back after the failover failed"
cmp /tmp/pattern /tmp/readback || fail "data written across the failover differs on read-back"
log "the $((CHUNKS * CHUNK_KIB / 1024)) MiB written across the failover read back intact"
for p in /sys/block/nvme*c*n*; do
    [ -e "$p/ana_state" ] && log "after: ${p##*/} ana_state=$(cat "$p/ana_state")"
done
nvme list-subsys 2>&1 || true
dmesg | grep -i nvme | tail -n 25
echo "UNVME-MULTIPATH failover_stall_s=${stall% *} longest_chunk_before_kill_s=$before median_chunk_s=$median chunks_after_kill=$after_kill"
run nvme disconnect -n "$NQN"
guest_step finish 60 || fail "host: the non-optimized target did not stop cleanly"
log "PASS"
rc=0
wait_host_done 60 || rc=$?
exit "$rc"
