#!/usr/bin/env bash
# vhost-inflight-host.sh: the host half of scenarios/vhost-blk-inflight.sh,
# run by run-guest.sh as --host-cmd (needs UNVME_SHARE). The test script
# has started `unvme target` on 127.0.0.1:PORT (pid in TPIDFILE) and
# `unvme vhost-blk --port PORT --socket SOCK` (pid in VBPIDFILE, stderr to
# VBLOG). Steps:
#   stop  SIGSTOP the target, so the guest's writes stay in flight
#   kill  SIGKILL vhost-blk, start it again on the same socket and target
#         (its pid goes to VBPIDFILE), SIGCONT the target; succeed once the
#         new device logged that it resubmitted more than 0 in-flight
#         requests from QEMU's inflight region
# The target is continued on every exit path.
# usage: vhost-inflight-host.sh UNVME SOCK PORT TPIDFILE VBPIDFILE VBLOG
set -euo pipefail

UNVME=$1 SOCK=$2 PORT=$3 TPIDFILE=$4 VBPIDFILE=$5 VBLOG=$6
# shellcheck source=SCRIPTDIR/lib-host.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-host.sh"
log() { echo "vhost-inflight-host: $*" >&2; }

tpid=$(cat "$TPIDFILE")
trap 'kill -CONT "$tpid" 2>/dev/null || true' EXIT

wait_step stop 120
kill -STOP "$tpid"
log "target $tpid stopped"
ack_step stop 0

wait_step kill 120
vpid=$(cat "$VBPIDFILE")
kill -KILL "$vpid" 2>/dev/null || true
for _ in $(seq 50); do kill -0 "$vpid" 2>/dev/null || break; sleep 0.1; done
log "vhost-blk $vpid killed with requests in flight"
echo "---- vhost-blk restart ----" >> "$VBLOG"
# Its connect to the (stopped) target waits until the target continues.
"$UNVME" vhost-blk --port "$PORT" --socket "$SOCK" --log info >/dev/null 2>>"$VBLOG" &
npid=$!
echo "$npid" > "$VBPIDFILE"
sleep 1
kill -CONT "$tpid"
log "target continued"
st=1
for _ in $(seq 600); do
    if sed -n '/---- vhost-blk restart ----/,$p' "$VBLOG" \
        | grep -Eq 'queue [0-9]+: resubmitting [1-9][0-9]* in-flight requests'; then
        st=0
        break
    fi
    kill -0 "$npid" 2>/dev/null || break
    sleep 0.1
done
if [[ $st -eq 0 ]]; then
    log "restarted vhost-blk (pid $npid): $(grep -Eo 'queue [0-9]+: resubmitting [0-9]+ in-flight requests' "$VBLOG" | tail -n 1)"
else
    log "restarted vhost-blk (pid $npid) resubmitted nothing within 60 s"
fi
ack_step kill "$st"
exit "$st"
