#!/usr/bin/env bash
# initiator-kernel.sh: unvme's initiator and tools against the Linux kernel's
# nvmet-tcp target (scenarios/kernel-target-export.sh in the guest, reached
# through hostfwd).  Run as --host-cmd by tests/kernel-interop-more.sh.
#
#   unvme discover (discovery port and I/O port; text and --json): lists NQN
#   unvme identify (text and --json, parsed by python3): subsystem NQN,
#     namespace 1 of SIZE_MB MiB
#   unvme perf --verify, randwrite then randread (then randrw) at QD 8/32,
#     4 KiB (in-capsule writes) and 128 KiB (R2T writes, multi-PDU reads):
#     no digests; header + data digests; two threads (two I/O queues).
#     Each must exit 0 with "errors": 0 in its JSON line.
#
# usage: initiator-kernel.sh ADDR IO_PORT DISC_PORT NQN SIZE_MB
# Env: UNVME (binary), PERF_TIME (seconds per perf run, default 4).
set -euo pipefail

ADDR=$1 IO=$2 DISC=$3 NQN=$4 SIZE_MB=$5
UNVME=${UNVME:?}
PERF_TIME=${PERF_TIME:-4}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

log() { echo "initiator-kernel: $*" >&2; }
failed=()
fail() { log "FAIL: $*"; failed+=("$1"); }

# tool NAME SECONDS ARGS...: run unvme ARGS with a bound; stdout in $out/NAME
tool() {
    local name=$1 t=$2 rc=0
    shift 2
    timeout -k 5 "$t" "$UNVME" "$@" >"$out/$name" 2>"$out/$name.err" || rc=$?
    if [[ $rc -ne 0 ]]; then
        log "unvme $* exited with status $rc; stderr:"
        tail -n 15 "$out/$name.err" >&2
    fi
    return "$rc"
}

# ---- discover ------------------------------------------------------------------
for port in "$DISC" "$IO"; do
    if tool disc.txt 30 discover --addr "$ADDR" --port "$port"; then
        grep -q "subnqn: *$NQN\$" "$out/disc.txt" || { cat "$out/disc.txt" >&2; fail "discover-$port: $NQN not listed"; }
    else
        fail "discover-$port"
    fi
    if tool disc.json 30 discover --addr "$ADDR" --port "$port" --json; then
        python3 - "$out/disc.json" "$NQN" <<'EOF' || fail "discover-json-$port"
import json, sys
d = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
nqns = [r["subnqn"] for r in d["records"]]
assert sys.argv[2] in nqns, f"{sys.argv[2]} not in {nqns}"
r = [r for r in d["records"] if r["subnqn"] == sys.argv[2]][0]
assert r["trtype"] == "tcp" and r["trsvcid"] in ("4420", "8009"), r
print(f"initiator-kernel: discover: {len(nqns)} records: {nqns}", file=sys.stderr)
EOF
    else
        fail "discover-json-$port"
    fi
done

# ---- identify -------------------------------------------------------------------
if tool id.txt 30 identify --addr "$ADDR" --port "$IO" --nqn "$NQN"; then
    grep -q "$NQN" "$out/id.txt" || { cat "$out/id.txt" >&2; fail "identify: no subsystem NQN in the text output"; }
else
    fail identify
fi
if tool id.json 30 identify --addr "$ADDR" --port "$IO" --nqn "$NQN" --nsid 1 --json; then
    python3 - "$out/id.json" "$NQN" "$SIZE_MB" <<'EOF' || fail "identify-json"
import json, sys
d = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
c, nss = d["controller"], d["namespaces"]
want = int(sys.argv[3]) * 1024 * 1024
assert c["subnqn"] == sys.argv[2], c["subnqn"]
assert "Linux" in c["mn"], c["mn"]
assert len(nss) == 1 and nss[0]["nsid"] == 1, nss
ns = nss[0]
assert ns["size_bytes"] == want, (ns["size_bytes"], want)
assert ns["nsze"] * ns["block_size"] == want, ns
print(f"initiator-kernel: identify: mn={c['mn']!r} fr={c['fr']!r} subnqn={c['subnqn']} mdts={c['mdts']} "
      f"ioccsz={c['ioccsz']} ns1={ns['nsze']}x{ns['block_size']} B ({ns['size_bytes'] >> 20} MiB)", file=sys.stderr)
EOF
else
    fail identify-json
fi

# ---- perf --verify ------------------------------------------------------------------
printf '%-8s %-9s %4s %7s %10s %10s %10s %6s\n' mode pattern qd io_size iops "MiB/s" "mean_us" errors >&2
# perf MODE PATTERN QD IO_SIZE EXTRA...
perf() {
    local mode=$1 pat=$2 qd=$3 bs=$4 name
    shift 4
    name=perf-$mode-$pat-$qd-$bs
    if ! tool "$name" $((PERF_TIME + 60)) perf --addr "$ADDR" --port "$IO" --nqn "$NQN" --nsid 1 \
        --pattern "$pat" --qd "$qd" --io-size "$bs" --time "$PERF_TIME" --range 32M --verify --json "$@"; then
        fail "$name"
        return 0
    fi
    python3 - "$out/$name" "$mode" "$pat" "$qd" "$bs" <<'EOF' || { tail -n 5 "$out/$name.err" >&2; fail "$name: errors or no JSON"; }
import json, sys
lines = [l for l in open(sys.argv[1]).read().splitlines() if l.startswith("{")]
d = json.loads(lines[-1])
mode, pat, qd, bs = sys.argv[2:6]
print(f"{mode:8} {pat:9} {qd:>4} {bs:>7} {d['iops']:10.0f} {d['mib_s']:10.1f} {d['lat_us']['mean']:10.1f} {d['errors']:6}",
      file=sys.stderr)
assert d["errors"] == 0 and d["ios"] > 0, d
EOF
}

for cfg in "8 4096" "32 131072" "32 4096" "8 131072"; do
    read -r qd bs <<<"$cfg"
    perf plain randwrite "$qd" "$bs"
    perf plain randread "$qd" "$bs"
done
perf plain randrw 16 65536 --mix 50
for cfg in "8 4096" "32 131072"; do
    read -r qd bs <<<"$cfg"
    perf digests randwrite "$qd" "$bs" --hdr-digest --data-digest
    perf digests randread "$qd" "$bs" --hdr-digest --data-digest
done
for cfg in "32 4096" "8 131072"; do
    read -r qd bs <<<"$cfg"
    perf 2threads randwrite "$qd" "$bs" --threads 2
    perf 2threads randread "$qd" "$bs" --threads 2
done
perf dig-2thr randrw 16 131072 --mix 50 --threads 2 --hdr-digest --data-digest

if [[ ${#failed[@]} -gt 0 ]]; then
    log "FAIL: ${failed[*]}"
    log "guest kernel messages (if any) are in the guest log: ${UNVME_GUEST_LOG:-?}"
    exit 1
fi
log "PASS: discover, identify and perf --verify against the kernel target"
