# kernel-host-wire: a short session of the guest kernel's nvme-tcp host
# against `unvme target` on the host, once without digests (UNVME_PORT) and
# once with header + data digests (UNVME_PORT_DIGEST), for tests/wire-check.sh,
# which captures the traffic on the host's loopback and decodes it with
# tshark.  Per session: connect (1 I/O queue), 4 KiB writes (in-capsule) and
# 128 KiB writes (R2T + H2CData), reads of both sizes (C2HData), compare,
# flush, disconnect.  Small on purpose: the capture holds every byte.
# Env: UNVME_PORT, UNVME_PORT_DIGEST, UNVME_NQN.
set -eu
# shellcheck source=SCRIPTDIR/../guest/lib.sh
. /share/lib.sh

HOST=10.0.2.2
NQN=${UNVME_NQN:?}

head -c $((1024 * 1024)) /dev/urandom > /tmp/pattern

session() {  # PORT DIGEST-OPTIONS...
    _port=$1
    shift
    run nvme connect -t tcp -a "$HOST" -s "$_port" -n "$NQN" -i 1 "$@"
    dev="" i=0
    while [ -z "$dev" ] && [ "$i" -lt 100 ]; do
        dev=$(nvme_dev_for_nqn "$NQN" || true)
        if [ -z "$dev" ] || [ ! -b "$dev" ]; then dev=""; sleep 0.1; fi
        i=$((i + 1))
    done
    [ -n "$dev" ] || fail "no block device for $NQN"
    # 16 x 4 KiB at 0, then 6 x 128 KiB at 64 KiB (both from the pattern's start)
    run dd if=/tmp/pattern of="$dev" bs=4096 count=16 oflag=direct conv=notrunc 2>/dev/null
    run dd if=/tmp/pattern of="$dev" bs=131072 count=6 seek=65536 oflag=seek_bytes,direct conv=notrunc 2>/dev/null
    run nvme flush "$dev"
    dd if="$dev" of=/tmp/rb4k bs=4096 count=16 iflag=direct 2>/dev/null || fail "4 KiB reads"
    dd if="$dev" of=/tmp/rb128k bs=131072 count=6 skip=65536 iflag=skip_bytes,direct 2>/dev/null || fail "128 KiB reads"
    cmp -n 65536 /tmp/pattern /tmp/rb4k || fail "4 KiB blocks differ"
    cmp -n $((6 * 131072)) /tmp/pattern /tmp/rb128k || fail "128 KiB blocks differ"
    run nvme disconnect -n "$NQN"
    log "session on port $_port ($*): written, read back, compared"
}

session "${UNVME_PORT:?}"
session "${UNVME_PORT_DIGEST:?}" --hdr-digest --data-digest
log "PASS"
