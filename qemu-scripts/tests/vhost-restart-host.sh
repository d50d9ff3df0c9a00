#!/usr/bin/env bash
# vhost-restart-host.sh: the host half of scenarios/vhost-blk-restart.sh,
# run by run-guest.sh as --host-cmd (needs UNVME_SHARE). The test script
# has started `unvme target` (pid in PIDFILE) on 127.0.0.1:PORT with file
# namespace IMG; this answers the guest's steps, in order:
#   blip     SIGKILL the target, start it again 1 s later (same port, file)
#   stop     SIGSTOP the target for 4 s (longer than the device's 2 s
#            keep-alive), then SIGCONT it; acknowledged after the SIGCONT
#   kill     SIGKILL the target (the port stays closed until `restart`)
#   restart  start the target again on the same port and file
# Every new pid goes to PIDFILE (the test script stops the last one).
# usage: vhost-restart-host.sh UNVME PORT IMG PIDFILE TARGET_LOG
set -euo pipefail

export UNVME=$1
PORT=$2 IMG=$3 PIDFILE=$4 TLOG=$5
# shellcheck source=SCRIPTDIR/lib-host.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-host.sh"
log() { echo "vhost-restart-host: $(date +%T.%N | cut -c1-12) $*" >&2; }

kill_target() {
    local pid
    pid=$(cat "$PIDFILE")
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    log "target $pid killed"
}
# Detached from this shell's job control so the launcher does not wait
# for it; the test script stops it by pid.
restart_target() {
    local tpid="" st=0
    echo "---- target restart ----" >> "$TLOG"
    target_start tpid "$PORT" "$TLOG" --file "$IMG" --reactors 1 --log info || st=1
    [[ $st -eq 0 ]] && echo "$tpid" > "$PIDFILE"
    log "target restarted (pid ${tpid:-none})"
    return "$st"
}

wait_step blip 180
kill_target
sleep 1
st=0
restart_target || st=1
ack_step blip "$st"

wait_step stop 300
pid=$(cat "$PIDFILE")
kill -STOP "$pid"
log "target $pid stopped"
sleep 4
kill -CONT "$pid"
log "target $pid continued"
ack_step stop 0

wait_step kill 300
kill_target
ack_step kill 0

wait_step restart 180
st=0
restart_target || st=1
ack_step restart "$st"
