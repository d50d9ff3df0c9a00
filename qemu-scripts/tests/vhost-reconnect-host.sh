#!/usr/bin/env bash
# vhost-reconnect-host.sh: the host half of scenarios/vhost-blk-reconnect.sh,
# run by run-guest.sh as --host-cmd (needs UNVME_SHARE). The test script
# has started `unvme vhost-blk --file IMG --socket SOCK` (pid in PIDFILE);
# on the guest's step `restart` this SIGKILLs it and starts it again on the
# same socket and file; the new pid goes to PIDFILE (the test script stops
# it).
# usage: vhost-reconnect-host.sh UNVME SOCK IMG PIDFILE LOG
set -euo pipefail

UNVME=$1 SOCK=$2 IMG=$3 PIDFILE=$4 LOG=$5
# shellcheck source=SCRIPTDIR/lib-host.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-host.sh"
log() { echo "vhost-reconnect-host: $*" >&2; }

wait_step restart 120
pid=$(cat "$PIDFILE")
kill -KILL "$pid" 2>/dev/null || true
for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
log "vhost-blk $pid killed"
sleep 0.5
echo "---- vhost-blk restart ----" >> "$LOG"
"$UNVME" vhost-blk --file "$IMG" --socket "$SOCK" --log info >/dev/null 2>>"$LOG" &
npid=$!
echo "$npid" > "$PIDFILE"
st=1
for _ in $(seq 100); do
    if [[ $(grep -c "listening" "$LOG") -ge 2 ]]; then st=0; break; fi
    kill -0 "$npid" 2>/dev/null || break
    sleep 0.1
done
log "vhost-blk restarted (pid $npid, status $st)"
ack_step restart "$st"
