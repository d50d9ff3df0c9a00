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

# Active apt source files (.list and deb822 .sources only; apt ignores others).
source_files() {
    local f
    [[ -f /etc/apt/sources.list ]] && echo /etc/apt/sources.list
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && echo "$f"
    done
    return 0
}

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

# The mirror URI serving the main bookworm suite.
debian_mirror() {
    local f uri
    while read -r f; do
        case $f in
            *.sources)
                # Print the URIs of stanzas whose Suites include "bookworm".
                uri=$(awk '
                    function flush() { if (ok > 0 && deb && uris != "") { print uris; exit } ok = 0; deb = 1; uris = "" }
                    BEGIN { deb = 1 }
                    /^[[:space:]]*$/ { flush(); next }
                    /^[[:space:]]*#/ { next }
                    tolower($1) == "enabled:" && tolower($2) == "no" { ok = -1000 }
                    tolower($1) == "uris:" { uris = $2 }
                    tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == "bookworm") ok += 1 }
                    tolower($1) == "types:" { deb = 0; for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
                    END { flush() }
                ' "$f" | head -n1) ;;
            *)
                uri=$(awk '
                    /^[[:space:]]*deb[[:space:]]/ {
                        i = 2
                        if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; i++ }
                        if ($(i + 1) == "bookworm") { print $i; exit }
                    }' "$f") ;;
        esac
        if [[ -n $uri ]]; then echo "$uri"; return 0; fi
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
