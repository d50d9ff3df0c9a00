#!/usr/bin/env bash
# vhost-restart-host.sh: the host half of scenarios/vhost-blk-restart.sh,
# run by run-guest.sh as --host-cmd (needs UNVME_SHARE). The test script
# has started `unvme target` (pid in PIDFILE) on 127.0.0.1:PORT with file
# namespace IMG; this answers the guest's steps:
#   kill     SIGKILL the target (the port stays closed until `restart`)
#   restart  start the target again on the same port and file; its pid
#            goes to PIDFILE (the test script stops it)
# usage: vhost-restart-host.sh UNVME PORT IMG PIDFILE TARGET_LOG
set -euo pipefail

export UNVME=$1
PORT=$2 IMG=$3 PIDFILE=$4 TLOG=$5
# shellcheck source=SCRIPTDIR/lib-host.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-host.sh"
log() { echo "vhost-restart-host: $*" >&2; }

wait_step kill 120
pid=$(cat "$PIDFILE")
kill -KILL "$pid" 2>/dev/null || true
for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
log "target $pid killed"
ack_step kill 0

wait_step restart 180
echo "---- target restart ----" >> "$TLOG"
# Detached from this shell's job control so the launcher does not wait
# for it; the test script stops it by pid.
st=0 tpid=""
target_start tpid "$PORT" "$TLOG" --file "$IMG" --reactors 1 --log info || st=1
[[ $st -eq 0 ]] && echo "$tpid" > "$PIDFILE"
log "target restarted (pid ${tpid:-none})"
ack_step restart "$st"
