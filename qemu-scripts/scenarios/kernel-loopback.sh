# kernel-loopback: the guest kernel's nvme-tcp host against the guest kernel's
# nvmet-tcp target over 127.0.0.1:4420.  Writes an 8 MiB random pattern to the
# namespace, reads it back and compares.  Proves modules, nvme-cli and the
# harness work.
set -eu
# shellcheck source=SCRIPTDIR/../guest/lib.sh
. /share/lib.sh

NQN=nqn.2024-01.io.unvme:loopback
PORT=4420

backing=$(nvmet_ram_backing loopback 64)
nvmet_subsys "$NQN" "$backing"
nvmet_port 1 127.0.0.1 "$PORT" "$NQN"
log "nvmet target on 127.0.0.1:$PORT, namespace on $backing (buffered_io=1)"

run nvme discover -t tcp -a 127.0.0.1 -s "$PORT" > /tmp/discover.txt
cat /tmp/discover.txt
grep -q "subnqn: *$NQN" /tmp/discover.txt || fail "discovery log does not list $NQN"

run nvme connect -t tcp -a 127.0.0.1 -s "$PORT" -n "$NQN"
dev=""
i=0
while [ -z "$dev" ] && [ "$i" -lt 100 ]; do
    dev=$(nvme_dev_for_nqn "$NQN" || true)
    if [ -z "$dev" ] || [ ! -b "$dev" ]; then dev=""; sleep 0.1; fi
    i=$((i + 1))
done
[ -n "$dev" ] || { nvme list; fail "no block device for $NQN after connect"; }
log "connected: $dev ($(cat /sys/block/"${dev#/dev/}"/size) sectors)"
nvme list

head -c $((8 * 1024 * 1024)) /dev/urandom > /tmp/pattern
run dd if=/tmp/pattern of="$dev" bs=1M count=8 oflag=direct
# drop nothing cached on the host side: O_DIRECT reads go to the target
run dd if="$dev" of=/tmp/readback bs=1M count=8 iflag=direct
cmp /tmp/pattern /tmp/readback || fail "read-back differs from the written pattern"
log "8 MiB pattern written and read back identical"
# the data must also be in the target's backing file
cmp -n $((8 * 1024 * 1024)) /tmp/pattern "$backing" || fail "backing file differs from the pattern"
log "backing file holds the pattern"

run nvme disconnect -n "$NQN"
nvmet_clear
log "PASS"
