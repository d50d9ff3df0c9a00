# kernel-host-restart: the guest kernel's nvme-tcp host stays connected while
# `unvme target` on the host is stopped and restarted under it.  The host
# side is tests/restart-host.sh (run as --host-cmd by
# tests/kernel-interop-more.sh); the steps are rendezvous through the share
# (guest_step in lib.sh).  Env: UNVME_PORT, UNVME_NQN.
#
#  1. connect with --reconnect-delay 1 --ctrl-loss-tmo 60; write pattern A
#     (8 MiB, O_DIRECT), flush.
#  2. step term: the host SIGTERMs the target and restarts it on the same
#     port; the controller must leave "live" and come back to "live"
#     (bounded); A reads back intact; write pattern B, flush, verify.
#  3. step kill: a 32 MiB O_DIRECT dd (pattern C) is running; the host
#     SIGKILLs the target, keeps the port closed 2.5 s, restarts it.  The dd
#     must complete or fail with an I/O error (never hang past the bound);
#     the controller comes back to "live"; A and B (flushed before the kill)
#     read back intact; C is compared too (reported, not required: the
#     controller has a volatile write cache and C was not flushed).
#  4. write pattern D, flush, verify; disconnect; step done.
# Every controller state change is logged with the guest's uptime.
set -eu
# shellcheck source=SCRIPTDIR/../guest/lib.sh
. /share/lib.sh

HOST=10.0.2.2
PORT=${UNVME_PORT:?}
NQN=${UNVME_NQN:?}
MIB=1048576

# ---- state monitor ---------------------------------------------------------
# Logs every change of /sys/class/nvme/$ctrl/state to /tmp/states as
# "UPTIME STATE" (polled every 50 ms) until /tmp/monitor.stop exists.
monitor() {
    _prev=""
    while [ ! -e /tmp/monitor.stop ]; do
        _s=$(cat "/sys/class/nvme/$ctrl/state" 2>/dev/null || echo gone)
        if [ "$_s" != "$_prev" ]; then
            echo "$(cut -d' ' -f1 /proc/uptime) $_s" >> /tmp/states
            _prev=$_s
        fi
        sleep 0.05
    done
}

# wait_cycle LABEL FROM_LINE TIMEOUT_S: wait until, after line FROM_LINE of
# /tmp/states, the controller was seen not live and then live again.  Prints
# the states seen and how long the outage lasted.
wait_cycle() {
    _label=$1 _from=$2 _t=$3
    _end=$(( $(cut -d. -f1 /proc/uptime) + _t ))
    while :; do
        _seen=$(tail -n +$((_from + 1)) /tmp/states | awk '{ print $2 }' | tr '\n' ' ')
        # a non-live state followed later by live
        if echo "$_seen" | grep -Eq '(resetting|connecting|deleting|new|gone)( [a-z]+)* live'; then
            break
        fi
        if [ "$(cut -d. -f1 /proc/uptime)" -ge "$_end" ]; then
            log "$_label: controller did not cycle back to live within ${_t}s; states after the step: $_seen"
            tail -n 20 /tmp/states
            dmesg | grep -i nvme | tail -n 20
            return 1
        fi
        sleep 0.1
    done
    _t_down=$(tail -n +$((_from + 1)) /tmp/states | awk '$2 != "live" { print $1; exit }')
    _t_up=$(tail -n +$((_from + 1)) /tmp/states | awk '$2 != "live" { d = 1 } d && $2 == "live" { print $1; exit }')
    log "$_label: states $_seen; not live from ${_t_down}s to ${_t_up}s (uptime)"
    echo "$_label $_t_down $_t_up" >> /tmp/cycles
}

# pattern NAME MIB: random data in /tmp/NAME
pattern() { head -c $(($2 * MIB)) /dev/urandom > "/tmp/$1"; }
# write_at NAME OFFSET_MIB BS
write_at() {
    run dd if="/tmp/$1" of="$dev" bs="$3" seek=$(($2 * MIB)) oflag=seek_bytes,direct conv=notrunc 2>/dev/null
}
# verify NAME OFFSET_MIB: O_DIRECT read of the region, compared with /tmp/NAME
verify() {
    _n=$(($(wc -c < "/tmp/$1") / MIB))
    rm -f /tmp/readback
    dd if="$dev" of=/tmp/readback bs=1M skip="$2" count="$_n" iflag=direct 2>/dev/null \
        || { log "read of $1 at ${2} MiB failed"; return 1; }
    cmp "/tmp/$1" /tmp/readback || { log "pattern $1 at ${2} MiB differs"; return 1; }
    log "pattern $1 (${_n} MiB at ${2} MiB) reads back intact"
}

# ---- 1. connect, pattern A --------------------------------------------------
signal_ready
guest_step start 60 || fail "host did not start the target"
run nvme connect -t tcp -a "$HOST" -s "$PORT" -n "$NQN" --reconnect-delay 1 --ctrl-loss-tmo 60
dev="" i=0
while [ -z "$dev" ] && [ "$i" -lt 100 ]; do
    dev=$(nvme_dev_for_nqn "$NQN" || true)
    if [ -z "$dev" ] || [ ! -b "$dev" ]; then dev=""; sleep 0.1; fi
    i=$((i + 1))
done
[ -n "$dev" ] || { nvme list; fail "no block device for $NQN"; }
ctrl=""
for c in /sys/class/nvme/nvme*; do
    [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$NQN" ] && ctrl=${c##*/}
done
[ -n "$ctrl" ] || fail "no controller for $NQN"
log "connected: $dev via $ctrl (reconnect_delay=$(cat /sys/class/nvme/"$ctrl"/reconnect_delay 2>/dev/null || echo ?)," \
    "ctrl_loss_tmo=$(cat /sys/class/nvme/"$ctrl"/ctrl_loss_tmo 2>/dev/null || echo ?), kato=$(cat /sys/class/nvme/"$ctrl"/kato 2>/dev/null || echo ?))"
: > /tmp/states
: > /tmp/cycles
monitor &
mon_pid=$!
trap 'touch /tmp/monitor.stop' EXIT

pattern A 8
pattern B 8
pattern C 32
pattern D 8
write_at A 0 65536
run nvme flush "$dev"
verify A 0 || fail "A before the restart"

# ---- 2. SIGTERM + restart -------------------------------------------------
from=$(wc -l < /tmp/states)
t_step=$(cut -d' ' -f1 /proc/uptime)
guest_step term 60 || fail "host could not SIGTERM/restart the target"
log "host restarted the target (step sent at ${t_step}s)"
wait_cycle sigterm "$from" 60 || fail "no reconnect after SIGTERM"
verify A 0 || fail "A after the SIGTERM restart"
write_at B 8 131072
run nvme flush "$dev"
verify B 8 || fail "B after the SIGTERM restart"

# ---- 3. SIGKILL during a dd -----------------------------------------------
from=$(wc -l < /tmp/states)
rm -f /tmp/dd.rc /tmp/dd.err
( dd if=/tmp/C of="$dev" bs=65536 seek=$((16 * MIB)) oflag=seek_bytes,direct conv=notrunc 2>/tmp/dd.err; echo $? > /tmp/dd.rc ) &
dd_pid=$!
sleep 0.2
[ -e /tmp/dd.rc ] && log "note: the dd finished before the kill step; the kill hits an idle connection"
t_step=$(cut -d' ' -f1 /proc/uptime)
guest_step kill 60 || fail "host could not SIGKILL/restart the target"
if [ -e /tmp/dd.rc ]; then
    log "dd finished before the host restarted the target (status $(cat /tmp/dd.rc))"
else
    log "dd still running when the target came back (step sent at ${t_step}s)"
fi
i=0
while [ ! -e /tmp/dd.rc ] && [ "$i" -lt 900 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /tmp/dd.rc ] || { kill "$dd_pid" 2>/dev/null; fail "dd still hangs 90 s after the target came back"; }
wait "$dd_pid" 2>/dev/null || true
dd_rc=$(cat /tmp/dd.rc)
log "dd status $dd_rc at $(cut -d' ' -f1 /proc/uptime)s: $(tr '\n' ' ' < /tmp/dd.err)"
if [ "$dd_rc" -ne 0 ]; then
    grep -qi "i/o error" /tmp/dd.err || fail "dd failed with something other than an I/O error"
    log "dd failed with an I/O error (allowed)"
fi
wait_cycle sigkill "$from" 70 || fail "no reconnect after SIGKILL"
verify A 0 || fail "A (flushed before the kill) after the SIGKILL restart"
verify B 8 || fail "B (flushed before the kill) after the SIGKILL restart"
if [ "$dd_rc" -eq 0 ]; then
    run nvme flush "$dev"
    if verify C 16; then
        log "C (written by the interrupted dd, acknowledged, not flushed) is intact too"
    else
        log "NOTE: C differs (allowed: volatile write cache, not flushed before the kill)"
    fi
fi

# ---- 4. more writes, disconnect ---------------------------------------------
write_at D 48 4096
run nvme flush "$dev"
verify D 48 || fail "D after the restarts"
verify A 0 || fail "A at the end"
log "state changes (uptime state):"
cat /tmp/states
touch /tmp/monitor.stop
wait "$mon_pid" 2>/dev/null || true
log "kernel log:"
dmesg | grep -i 'nvme' | tail -n 30
run nvme disconnect -n "$NQN"
guest_step finish 60 || fail "host: target did not stop cleanly"
while read -r label down up; do
    echo "UNVME-RESTART $label down=$down up=$up"
done < /tmp/cycles
log "PASS"
rc=0
wait_host_done 60 || rc=$?
exit "$rc"
