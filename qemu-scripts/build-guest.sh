#!/usr/bin/env bash
# build-guest.sh [--force]
# Build the QEMU guest (kernel + initramfs) from Debian packages only, into
# qemu-scripts/build/ (override with UNVME_QEMU_BUILD).  Cached: rebuilds only
# when an input changed (the stamp file records a hash of all inputs).
#
# Outputs:  build/vmlinux            uncompressed kernel (QEMU -kernel, PVH boot)
#           build/initramfs.cpio     cpio newc archive (uncompressed; faster
#                                    than gunzip under TCG emulation)
#           build/initramfs-fio.cpio the same plus fio and its libraries
#           build/kernel-version
set -euo pipefail

QS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=${UNVME_QEMU_BUILD:-$QS/build}
FORCE=0
[[ ${1:-} == --force ]] && FORCE=1

die() { echo "build-guest: error: $*" >&2; exit 1; }
log() { echo "build-guest: $*" >&2; }

for t in apt-get apt-cache dpkg-deb dpkg-query depmod modprobe cpio xz ldd busybox; do
    command -v "$t" >/dev/null || die "$t not found; run qemu-scripts/install-deps.sh (as root)"
done
[[ -x /bin/busybox ]] || die "/bin/busybox missing; install busybox-static"
if ldd /bin/busybox >/dev/null 2>&1; then
    die "/bin/busybox is dynamically linked; install busybox-static"
fi

# Modules loaded at boot (dependencies are added automatically).
BOOT_MODULES=(
    virtio_pci virtio_net 9p 9pnet_virtio configfs
    crc32c_generic crc32c-intel
    nvme nvme-fabrics nvme-tcp nvmet nvmet-tcp
)
# Modules shipped but not loaded at boot: the scenario runs `modprobe X [params]`
# (e.g. `modprobe null_blk nr_devices=1 gb=1`, `modprobe nbd nbds_max=4`).
# Loading nbd/loop at boot creates their devices and costs ~0.8 s under TCG.
EXTRA_MODULES=(
    null_blk nbd loop virtio_blk ext4 jbd2 mbcache crc16
    vfio vfio_iommu_type1 vfio-pci e1000 virtio_console
)
# Dynamically linked host tools copied in with their libraries.  fio pulls in
# ~75 MB of libraries (ceph, gluster, ICU), which would double the boot time,
# so it goes into a separate archive appended only for `run-guest.sh --with-fio`.
BASE_TOOLS=(/usr/sbin/nvme /usr/sbin/nbd-client)
FIO_TOOLS=(/usr/bin/fio)
TOOL_PKGS=(busybox-static nvme-cli nbd-client fio libc6)

# ---- which kernel -----------------------------------------------------------
if [[ -n ${UNVME_KERNEL_PKG:-} ]]; then
    kpkg=$UNVME_KERNEL_PKG
else
    # The candidate linux-image-amd64 (bookworm: 6.1) depends on the real
    # package, e.g. linux-image-6.1.0-56-amd64.
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
    [[ -n $kpkg ]] || die "cannot resolve linux-image-amd64 (apt-get update?)"
fi
kver=$(apt-cache policy "$kpkg" 2>/dev/null | awk '$1 == "Candidate:" { print $2 }')
[[ -n $kver && $kver != "(none)" ]] || die "no installable version of $kpkg"

# ---- cache check --------------------------------------------------------------
pkg_versions=$(dpkg-query -W -f='${Package}=${Version}\n' "${TOOL_PKGS[@]}" 2>/dev/null) \
    || die "missing packages; run qemu-scripts/install-deps.sh"
stamp_input=$(
    echo "kernel=$kpkg=$kver"
    echo "$pkg_versions"
    echo "boot=${BOOT_MODULES[*]} extra=${EXTRA_MODULES[*]} tools=${BASE_TOOLS[*]} fio=${FIO_TOOLS[*]}"
    cat "$QS/build-guest.sh" "$QS/extract-vmlinux.sh" "$QS/guest/init"
)
stamp=$(sha256sum <<<"$stamp_input" | cut -d' ' -f1)
if [[ $FORCE -eq 0 && -f $BUILD/stamp && $(cat "$BUILD/stamp") == "$stamp" \
      && -s $BUILD/vmlinux && -s $BUILD/initramfs.cpio && -s $BUILD/initramfs-fio.cpio ]]; then
    log "up to date ($BUILD)"
    exit 0
fi

mkdir -p "$BUILD/dl"
rm -f "$BUILD/stamp"

# ---- kernel -------------------------------------------------------------------
deb=$(find "$BUILD/dl" -maxdepth 1 -name "${kpkg}_*.deb" -print -quit)
want_deb="${kpkg}_${kver//:/%3a}_amd64.deb"
if [[ -z $deb || $(basename "$deb") != "$want_deb" ]]; then
    log "downloading $kpkg $kver"
    rm -f "$BUILD/dl/${kpkg}_"*.deb
    # apt-get download as root warns that _apt cannot write here; harmless.
    (cd "$BUILD/dl" && apt-get download -q "$kpkg=$kver" >/dev/null 2>"$BUILD/dl/apt.err") \
        || { cat "$BUILD/dl/apt.err" >&2; die "apt-get download $kpkg failed"; }
    deb=$(find "$BUILD/dl" -maxdepth 1 -name "${kpkg}_*.deb" -print -quit)
    [[ -n $deb ]] || die "downloaded $kpkg but cannot find the .deb"
fi

log "extracting $(basename "$deb")"
KROOT=$BUILD/kernel-root
rm -rf "$KROOT"
mkdir -p "$KROOT"
dpkg-deb -x "$deb" "$KROOT"
moddir=$(find "$KROOT/lib/modules" -mindepth 1 -maxdepth 1 -type d -print -quit)
[[ -n $moddir ]] || die "no /lib/modules in $deb"
uname_r=$(basename "$moddir")
vmlinuz=$KROOT/boot/vmlinuz-$uname_r
[[ -f $vmlinuz ]] || die "no $vmlinuz in $deb"
# The package ships no modules.dep (postinst runs depmod); make one.
depmod -b "$KROOT" "$uname_r"

"$QS/extract-vmlinux.sh" "$vmlinuz" "$BUILD/vmlinux.new"
mv -f "$BUILD/vmlinux.new" "$BUILD/vmlinux"

# ---- initramfs ------------------------------------------------------------------
ROOT=$BUILD/initramfs-root
rm -rf "$ROOT"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,etc/unvme,proc,sys,dev,tmp,run,share,root,mnt}

# busybox + applet links
cp /bin/busybox "$ROOT/bin/busybox"
while read -r applet; do
    rel=${applet#/}
    [[ -e $ROOT/$rel || -L $ROOT/$rel ]] && continue
    mkdir -p "$ROOT/$(dirname "$rel")"
    ln -s /bin/busybox "$ROOT/$rel"
done < <("$ROOT/bin/busybox" --list-full)

# modules, resolved (with softdeps) by kmod's modprobe from modules.dep
resolve() {  # VAR MODULE...: absolute .ko paths in load order, deduplicated
    local -n _out=$1
    local m dep list=""
    shift
    for m in "$@"; do
        dep=$(modprobe -d "$KROOT" -S "$uname_r" --show-depends "$m" 2>&1) \
            || die "module $m: $dep"
        list+=$(awk '$1 == "insmod" { print $2 }' <<<"$dep")$'\n'
    done
    mapfile -t _out < <(awk 'NF && !seen[$0]++' <<<"$list")
}
boot_kos=() extra_kos=()
resolve boot_kos "${BOOT_MODULES[@]}"
resolve extra_kos "${EXTRA_MODULES[@]}"
: > "$ROOT/etc/unvme/boot-modules"
for ko in "${boot_kos[@]}" "${extra_kos[@]}"; do
    rel=${ko#"$KROOT"}
    mkdir -p "$ROOT/$(dirname "$rel")"
    cp "$ko" "$ROOT/$rel"
done
for ko in "${boot_kos[@]}"; do
    echo "${ko#"$KROOT"}" >> "$ROOT/etc/unvme/boot-modules"
done
for f in modules.order modules.builtin modules.builtin.modinfo; do
    cp "$moddir/$f" "$ROOT/lib/modules/$uname_r/"
done
depmod -b "$ROOT" "$uname_r"   # so `modprobe X` works in the guest

# dynamically linked tools + their libraries (ldd) + the dynamic loader
copy_tool() {  # DESTROOT TOOL: copy TOOL and the libraries it needs, unless
               # already present in DESTROOT or in the base $ROOT
    local dest=$1 tool=$2 lib
    [[ -x $tool ]] || die "$tool missing; run qemu-scripts/install-deps.sh"
    mkdir -p "$dest$(dirname "$tool")"
    rm -f "$dest$tool"        # may be a busybox applet link
    cp -L "$tool" "$dest$tool"
    while read -r lib; do
        [[ -e $ROOT$lib || -e $dest$lib ]] && continue
        mkdir -p "$dest$(dirname "$lib")"
        cp -L "$lib" "$dest$lib"
    done < <(ldd "$tool" | awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]+ \(/ { print $1 }')
}
for tool in "${BASE_TOOLS[@]}"; do copy_tool "$ROOT" "$tool"; done
[[ -e $ROOT/lib64/ld-linux-x86-64.so.2 ]] || die "dynamic loader not copied"
FIOROOT=$BUILD/initramfs-fio-root
rm -rf "$FIOROOT"
mkdir -p "$FIOROOT"
for tool in "${FIO_TOOLS[@]}"; do copy_tool "$FIOROOT" "$tool"; done

cp "$QS/guest/init" "$ROOT/init"
chmod 0755 "$ROOT/init"
echo "root:x:0:0:root:/root:/bin/sh" > "$ROOT/etc/passwd"
echo "root:x:0:" > "$ROOT/etc/group"
printf '127.0.0.1 localhost\n10.0.2.2 host\n10.0.2.15 unvme-guest\n' > "$ROOT/etc/hosts"
: > "$ROOT/etc/fstab"
echo "$uname_r" > "$ROOT/etc/unvme/kernel-version"

# strip what Debian left in the copied libraries/binaries (smaller image)
if command -v strip >/dev/null; then
    find "$ROOT/lib" "$ROOT/usr" "$FIOROOT" -type f ! -name '*.ko' \
        -exec strip --strip-unneeded {} + 2>/dev/null || true
fi

pack() {  # DIR OUT
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$2.new"
    mv -f "$2.new" "$2"
}
log "packing initramfs"
pack "$ROOT" "$BUILD/initramfs.cpio"
# The kernel unpacks concatenated newc archives in order: base + fio overlay.
pack "$FIOROOT" "$BUILD/fio-overlay.cpio"
cat "$BUILD/initramfs.cpio" "$BUILD/fio-overlay.cpio" > "$BUILD/initramfs-fio.cpio.new"
mv -f "$BUILD/initramfs-fio.cpio.new" "$BUILD/initramfs-fio.cpio"
rm -f "$BUILD/fio-overlay.cpio"
echo "$uname_r" > "$BUILD/kernel-version"
echo "$stamp" > "$BUILD/stamp"
log "built: kernel $uname_r, vmlinux $(du -h "$BUILD/vmlinux" | cut -f1), initramfs $(du -h "$BUILD/initramfs.cpio" | cut -f1), with fio $(du -h "$BUILD/initramfs-fio.cpio" | cut -f1)"
