#!/usr/bin/env bash
# extract-vmlinux.sh VMLINUZ OUT
# Extract the uncompressed ELF vmlinux from a bzImage whose payload is
# xz-compressed (Debian's kernels).  Same approach as the kernel's
# scripts/extract-vmlinux: find each xz stream magic, decompress from there,
# and keep the first result that is an ELF file.
set -euo pipefail

die() { echo "extract-vmlinux: error: $*" >&2; exit 1; }

[[ $# -eq 2 ]] || die "usage: $0 VMLINUZ OUT"
in=$1 out=$2
[[ -r $in ]] || die "cannot read $in"
command -v xz >/dev/null || die "xz not found (apt-get install xz-utils)"

tmp=$(mktemp "${out}.XXXXXX")
trap 'rm -f "$tmp"' EXIT

# xz stream header magic: FD 37 7A 58 5A 00
mapfile -t offsets < <(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$in" | cut -d: -f1)
[[ ${#offsets[@]} -gt 0 ]] || die "no xz payload found in $in"

for off in "${offsets[@]}"; do
    # --single-stream: stop at the end of the first stream and ignore the
    # trailing bzImage data (tail then dies of SIGPIPE, hence no pipe here).
    # A garbage candidate just fails to decompress.
    if xz -dc --single-stream < <(tail -c "+$((off + 1))" "$in" 2>/dev/null) >"$tmp" 2>/dev/null \
        && [[ $(head -c 4 "$tmp" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; then
        chmod 0644 "$tmp"
        mv -f "$tmp" "$out"
        exit 0
    fi
done
die "no xz stream in $in decompressed to an ELF image"
