#!/usr/bin/env bash
# Install the prebuilt SPDK test peer (../shared/peers/spdk, see its README) into a fixed directory
# and check that its programs run. SPDK is a peer the tests and benchmarks talk to, never a
# dependency of unvme.
#
# usage: install-spdk.sh        (root the first time: install.sh may apt-get the runtime packages)
#
# Environment:
#   UNVME_SPDK_PEER  the peer folder (default: <repo>/../shared/peers/spdk)
#   UNVME_SPDK_DIR   where to install (default: /tmp/unvme-spdk); programs end up in
#                    $UNVME_SPDK_DIR/spdk/bin, libraries in $UNVME_SPDK_DIR/spdk/lib
#
# Besides what the peer's install.sh does, this adds libisal.so.2 >= 2.31 to SPDK's lib dir: the
# peer links against it (crc64_rocksoft_refl), Debian 12's libisal2 is 2.30 and lacks it, and
# install.sh does not install it. The library comes from Debian trixie's libisal2 .deb, fetched with
# a private apt configuration (its own sources, lists and cache under a temp dir; the machine's apt
# sources and installed packages are not changed) from the mirror the machine already uses, and is
# verified by apt against trixie's signed Release file.
#
# Idempotent: a second run only re-checks. Exit status: 0 installed and `nvmf_tgt -h` runs (the last
# line of stdout is the directory); 3 the peer folder is absent and CI is not "true" (one line on
# stderr: the SPDK tests are skipped); 1 anything else, including an absent peer in CI.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PEER=${UNVME_SPDK_PEER:-$HERE/../../shared/peers/spdk}
DIR=${UNVME_SPDK_DIR:-/tmp/unvme-spdk}
LIB=$DIR/spdk/lib

log() { echo "install-spdk: $*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ ! -x $PEER/install.sh ]]; then
    if [[ ${CI:-} == true ]]; then
        die "SPDK peer not found at $PEER (CI=true: the SPDK interop tests are required)"
    fi
    log "SPDK peer not found at $PEER: SPDK tests and benchmark rows skipped"
    exit 3
fi
PEER=$(cd "$PEER" && pwd)

# Do the programs load, with every symbol bound now (not at the first call)?
runs() {
    local b
    for b in nvmf_tgt spdk_tgt spdk_nvme_perf spdk_nvme_identify spdk_nvme_discover; do
        [[ -x $DIR/spdk/bin/$b ]] || return 1
    done
    LD_BIND_NOW=1 LD_LIBRARY_PATH=$LIB "$DIR/spdk/bin/nvmf_tgt" -h >/dev/null 2>&1 &&
        LD_BIND_NOW=1 LD_LIBRARY_PATH=$LIB "$DIR/spdk/bin/spdk_nvme_perf" -h >/dev/null 2>&1
}

if ! runs; then
    # Runtime packages and the tree; install.sh is itself idempotent.
    "$PEER/install.sh" "$DIR" >/dev/null || die "$PEER/install.sh $DIR failed"
fi

if ! runs; then
    [[ -f $LIB/libisal.so.2 ]] && die "SPDK in $DIR does not run even with $LIB/libisal.so.2"
    # shellcheck source=SCRIPTDIR/lib-apt.sh
    . "$HERE/lib-apt.sh"
    mirror=$(debian_mirror) || mirror=http://deb.debian.org/debian
    log "fetching libisal2 from trixie ($mirror) into $LIB"
    W=$(mktemp -d "${TMPDIR:-/tmp}/unvme-isal.XXXXXX")
    trap 'rm -rf "$W"' EXIT
    mkdir -p "$W/parts" "$W/lists/partial" "$W/cache/archives/partial"
    printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: %s\n' \
        "$mirror" /usr/share/keyrings/debian-archive-keyring.gpg >"$W/parts/trixie.sources"
    O=(-q -o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$W/parts"
        -o "Dir::State::Lists=$W/lists" -o "Dir::Cache=$W/cache")
    apt-get "${O[@]}" update >"$W/apt.log" 2>&1 || { cat "$W/apt.log" >&2; die "apt-get update (trixie) failed"; }
    (cd "$W" && apt-get "${O[@]}" download libisal2) >>"$W/apt.log" 2>&1 ||
        { cat "$W/apt.log" >&2; die "apt-get download libisal2 (trixie) failed"; }
    dpkg-deb -x "$W"/libisal2_*.deb "$W/x"
    cp -a "$W"/x/usr/lib/x86_64-linux-gnu/libisal.so.2* "$LIB/"
    runs || die "SPDK in $DIR does not run with trixie's libisal2 either"
fi

log "SPDK peer ready in $DIR"
echo "$DIR"
