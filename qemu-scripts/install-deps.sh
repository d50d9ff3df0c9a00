#!/usr/bin/env bash
# Install everything the QEMU guest harness needs on a Debian 12 (bookworm)
# machine.  Idempotent; run as root.  Adds bookworm-backports (same mirror as
# the machine's existing Debian source) when missing, because the preinstalled
# qemu-utils 10.0 comes from there and conflicts with bookworm's QEMU 7.2.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-q -y -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

die() { echo "install-deps: error: $*" >&2; exit 1; }
log() { echo "install-deps: $*" >&2; }

# Run a command with its output captured; show the output only on failure.
quiet() {
    local out rc=0
    out=$(mktemp)
    "$@" >"$out" 2>&1 || rc=$?
    if [[ $rc -ne 0 ]]; then
        cat "$out" >&2
        rm -f "$out"
        die "command failed (exit $rc): $*"
    fi
    rm -f "$out"
}

[[ $(id -u) -eq 0 ]] || die "must run as root"
command -v apt-get >/dev/null || die "apt-get not found (Debian 12 expected)"

if [[ -r /etc/os-release ]]; then
    # shellcheck disable=SC1091
    . /etc/os-release
    [[ ${VERSION_CODENAME:-} == bookworm ]] || log "warning: expected Debian bookworm, found '${VERSION_CODENAME:-unknown}'"
fi

# shellcheck source=SCRIPTDIR/lib-apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-apt.sh"

# Does any active source already provide bookworm-backports?
have_backports() {
    local f
    while read -r f; do
        case $f in
            *.sources)
                # deb822: a "Suites:" line mentioning bookworm-backports
                grep -Eiq '^[[:space:]]*Suites:.*[[:space:]]bookworm-backports([[:space:]]|$)' "$f" && return 0 ;;
            *)
                grep -Eq '^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[^[:space:]]+[[:space:]]+bookworm-backports([[:space:]]|$)' "$f" && return 0 ;;
        esac
    done < <(source_files)
    return 1
}

log "apt-get update"
quiet apt-get "${APT_OPTS[@]}" update

if have_backports; then
    log "bookworm-backports already configured"
else
    mirror=$(debian_mirror) || mirror=http://deb.debian.org/debian
    log "adding bookworm-backports from $mirror"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    {
        echo "# Added by unvme qemu-scripts/install-deps.sh"
        echo "Types: deb"
        echo "URIs: $mirror"
        echo "Suites: bookworm-backports"
        echo "Components: main"
        [[ -f $keyring ]] && echo "Signed-By: $keyring"
    } > /etc/apt/sources.list.d/unvme-bookworm-backports.sources
    quiet apt-get "${APT_OPTS[@]}" update
fi

# QEMU from backports (matches the preinstalled qemu-utils 10.0).
BPO_PKGS=(qemu-system-x86 qemu-block-extra qemu-utils)  # qemu-utils: qemu-img/io/nbd, qemu-storage-daemon
# Guest build inputs and host-side tools.
PKGS=(
    busybox-static   # guest userland
    nvme-cli         # copied into the guest
    nbd-client       # copied into the guest
    fio              # copied into the guest
    cpio             # initramfs archive
    xz-utils         # vmlinuz payload / .ko.xz modules
    zstd             # modules may be zstd-compressed in future kernels
    kmod             # modinfo/depmod helpers
    gzip
    binutils         # readelf for sanity checks
    ca-certificates
    shellcheck       # lint for the harness scripts
    tshark           # decodes NVMe/TCP captures (tests/wire-check.sh)
    nbdkit           # NBD reference server (bench/nbd)
    libnbd-bin       # nbdinfo, nbdcopy, nbdsh (tests/nbd-clients.sh)
    python3-libnbd   # nbdsh's Python module
    gcc              # builds guest/zero-range.c (tests/vhost-blk.sh)
    libc6-dev        # its static libc
)

# tshark's wireshark-common asks whether non-root users may capture; answer
# no (tests capture as root) so the install never prompts.
if command -v debconf-set-selections >/dev/null; then
    echo 'wireshark-common wireshark-common/install-setuid boolean false' | debconf-set-selections
fi

missing=()
for p in "${BPO_PKGS[@]}" "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [[ ${#missing[@]} -eq 0 ]]; then
    log "all packages already installed"
else
    log "installing: ${missing[*]}"
    quiet apt-get "${APT_OPTS[@]}" -t bookworm-backports install --no-install-recommends "${BPO_PKGS[@]}"
    quiet apt-get "${APT_OPTS[@]}" install --no-install-recommends "${PKGS[@]}"
fi

command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing after install"
log "ok: $(qemu-system-x86_64 --version | head -n1)"

# The prebuilt SPDK peer (../shared/peers/spdk), when this checkout has one; required in CI.
rc=0
"$(dirname "${BASH_SOURCE[0]}")/install-spdk.sh" >/dev/null || rc=$?
[[ $rc -eq 0 || $rc -eq 3 ]] || die "install-spdk.sh failed (exit $rc)"
