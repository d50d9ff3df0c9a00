#!/usr/bin/env bash
# vfio-nvme.sh: `unvme target --vfio` in a QEMU guest (q35, intel-iommu,
# emulated `-device nvme`), checked by the guest kernel's nvme-tcp host and
# `unvme perf --verify`, plus the error paths and the data paths (zero-copy
# through the DMA buffer pool, copies with the pool off or run dry, counted
# from the target's log; scenario qemu-scripts/scenarios/vfio-nvme.sh has
# the list), and the bdev conformance kit on the VFIO bdev (the test binary
# of nvme-vfio/tests/conformance.rs, built here in release).
#
# The base initramfs lacks libgcc_s.so.1, which target/release/unvme links;
# the --with-fio initramfs has it (as for bench/kernel).
# Needs target/release/unvme and the guest harness
# (qemu-scripts/install-deps.sh). Bounded; the temp dir is removed on exit.
set -euo pipefail

QS=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$(cd "$QS/.." && pwd)
UNVME=${UNVME_BIN:-$ROOT/target/release/unvme}
GUEST_TIMEOUT=${UNVME_GUEST_TIMEOUT:-420}

log() { echo "vfio-nvme: $*" >&2; }
[[ -x $UNVME ]] || { log "FAIL: $UNVME missing (cargo build --release)"; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { log "FAIL: qemu-system-x86_64 missing"; exit 2; }
timeout -k 10 900 "$QS/build-guest.sh" || { log "FAIL: guest build"; exit 1; }

# The bdev conformance kit on the VFIO bdev (nvme-vfio/tests/conformance.rs,
# a harness = false test), run by the scenario's step 2b: its test binary,
# built in release here (or given as UNVME_VFIO_CONFORMANCE_BIN).
CONF=${UNVME_VFIO_CONFORMANCE_BIN:-}
if [[ -z $CONF ]]; then
    conf_json=$(cd "$ROOT" && timeout -k 10 600 cargo test -p unvme-nvme-vfio --release \
        --test conformance --no-run --message-format=json) \
        || { log "FAIL: building the conformance test (cargo test -p unvme-nvme-vfio --test conformance)"; exit 1; }
    CONF=$(sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' <<< "$conf_json" | tail -1)
fi
[[ -n $CONF && -x $CONF ]] || { log "FAIL: no conformance test binary ('$CONF')"; exit 1; }

work=$(mktemp -d /tmp/unvme-vfio-nvme.XXXXXX)
trap 'rm -rf "$work"' EXIT
truncate -s 256M "$work/nvme.img"

# ==== #6: the namespace carries identifiers (EUI-64, NGUID, UUID), as a real
# SSD's does, so the admin pass-through step can compare what the NVMe/TCP
# host sees through the target with what the kernel nvme driver saw.
NS_IDS="eui64=0x5254000000000a01,nguid=0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9,uuid=6e76d2a1-3c4b-4d5e-8f60-718293a4b5c6"
# ==== end #6

# discard=unmap: QEMU's namespace always reports DLFEAT 001b (deallocated
# blocks read as zeroes) and turns Deallocate into a discard of the drive,
# which the default discard=ignore drops, so the blocks would keep their
# data; the conformance kit (step 2b) checks that they read back as zeroes.
rc=0
timeout -k 10 $((GUEST_TIMEOUT + 120)) "$QS/run-guest.sh" --timeout "$GUEST_TIMEOUT" \
    --machine q35,kernel-irqchip=split --append intel_iommu=on --with-fio \
    --file "$UNVME=unvme" --file "$QS/vfio-bind.sh=vfio-bind.sh" \
    --file "$CONF=vfio-conformance" \
    --log "$QS/build/logs/vfio-nvme.log" \
    "$QS/scenarios/vfio-nvme.sh" -- \
    -device intel-iommu,intremap=on,caching-mode=on \
    -drive "file=$work/nvme.img,if=none,id=nvm,format=raw,discard=unmap" \
    -device nvme,id=nvme0,serial=deadbeef \
    -device "nvme-ns,drive=nvm,bus=nvme0,nsid=1,$NS_IDS" || rc=$?
if [[ $rc == 0 ]]; then
    log "PASS"
else
    log "FAIL (status $rc; console: $QS/build/logs/vfio-nvme.log)"
fi
exit "$rc"
