#!/usr/bin/env bash
# restart-host.sh: the host half of scenarios/kernel-host-restart.sh, run by
# run-guest.sh as --host-cmd (needs UNVME_SHARE).  Owns `unvme target` on
# 127.0.0.1:PORT (file namespace IMG, in /dev/shm so the data survives the
# process) and answers the guest's steps:
#   start  start the target
#   term   SIGTERM it (must exit 0), restart it on the same port
#   kill   (a dd is running in the guest) wait 0.5 s, SIGKILL it, leave the
#          port closed for 2.5 s (the kernel's reconnect attempts are
#          refused), restart it
#   finish SIGTERM it (must exit 0)
# usage: restart-host.sh UNVME PORT NQN IMG TARGET_LOG
set -euo pipefail

export UNVME=$1; PORT=$2 NQN=$3 IMG=$4 TLOG=$5
# shellcheck source=SCRIPTDIR/lib-host.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-host.sh"

log() { echo "restart-host: $*" >&2; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

tpid=""
# shellcheck disable=SC2317  # invoked via trap
cleanup() { [[ -z $tpid ]] || target_stop "$tpid" TERM >/dev/null 2>&1 || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

start() {
    local t0
    t0=$(now_ms)
    echo "---- target start (restart-host) ----" >> "$TLOG"
    target_start tpid "$PORT" "$TLOG" --nqn "$NQN" --file "$IMG:512:create=256M" --reactors 1 --log info \
        || return 1
    log "target listening on 127.0.0.1:$PORT after $(( $(now_ms) - t0 )) ms (pid $tpid)"
}

# stop SIG WANT_RC
stop() {
    local rc=0 t0
    t0=$(now_ms)
    target_stop "$tpid" "$1" || rc=$?
    tpid=""
    log "target SIG$1: exited with status $rc after $(( $(now_ms) - t0 )) ms"
    [[ $rc -eq $2 ]] || { log "FAIL: expected exit status $2 after SIG$1"; return 1; }
}

wait_step start 60
start
ack_step start 0

wait_step term 180
st=0
stop TERM 0 || st=1
start || st=1
ack_step term "$st"
[[ $st -eq 0 ]] || exit 1

wait_step kill 180
sleep 0.5
st=0
stop KILL 137 || st=1
sleep 2.5
start || st=1
ack_step kill "$st"
[[ $st -eq 0 ]] || exit 1

wait_step finish 240
st=0
stop TERM 0 || st=1
ack_step finish "$st"
n=$(grep -c "I/O queue connected" "$TLOG" || true)
log "target log: $n I/O queue connections (expect >= 3: connect, reconnect after SIGTERM, after SIGKILL)"
[[ $n -ge 3 ]] || st=1
if grep -q panicked "$TLOG"; then log "FAIL: the target panicked"; st=1; fi
exit "$st"
